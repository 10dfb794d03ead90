"""Regional compilation of a transformer: ``torch.compile`` of each repeated block, in place.

    blocks = compile_blocks(model, "sd3")   # SD3: the joint blocks; Flux: the double and single blocks
    compile_blocks(model, "flux", scope="model")   # the whole forward as one region

Every block is compiled with ``nn.Module.compile`` (state-dict keys and parameters unchanged). All blocks of
one class run the same code, and dynamo treats a block's parameters as inputs, so the blocks of a class share
the compiled graphs: compiling costs a few graphs per class, not one per block (diffusers'
``compile_repeated_blocks`` does the same for Flux; for SD3 it raises, its class lists no repeated blocks).
The blocks between them are most of the forward; the embedders, the final layer and the solver stay eager.

Shapes: ``dynamic=True`` (the default here) traces the batch and the token counts as symbols. A pipeline
call runs batch n (one forward a step) or 2 n (classifier-free guidance: cond and uncond in one batch), with
n = prompts x images, at a token count set by the image size; static shapes would compile again for every
new n and size. Dynamo still specialises a dimension of size 1 (PyTorch's 0/1 specialisation), so batch 1
gets graphs of its own. Graphs per batch class (1, or >= 2): one per block variant, where a variant is a
different module layout (SD3's last block, whose text stream has no queries and no MLP; Flux's last single
block, which keeps the image rows only) or a different kind of input (the first block of a list gets views
of the embedders' outputs, which dynamo guards with their base tensors; later blocks get plain tensors).
So SD3 compiles 3 graphs a batch class (2 for a 2-block model) and Flux 4, whatever the depth, and nothing
more afterwards. ``dynamic=False`` compiles one set per batch and size instead, each specialised.
``compile_blocks`` raises dynamo's per-function graph limit to ``RECOMPILE_LIMIT`` (see there).

``scope="model"`` compiles the whole forward instead (the embedders, the position table or rotary tables,
the final layer and unpatching as well): a longer first compile and one graph per batch class, and faster
where those eager parts weigh (the shipped tiny model's forward: 1.20x [1.12, 1.30] over eager in bf16
on the CPU, against 1.03x [0.94, 1.10] for the blocks alone). Step caching (``mmdit_flow.step_cache``) keeps
state between calls in the forward; use the blocks scope with it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

BLOCK_LISTS = {"sd3": ("blocks",), "flux": ("double_blocks", "single_blocks")}
BACKENDS = ("inductor", "aot_eager", "eager")  # eager / aot_eager: tracing only, no code generation
SCOPES = ("blocks", "model")
# dynamo keeps at most ``recompile_limit`` graphs per code object (8 by default), then runs it eager. All
# blocks of a class share one code object: one Flux model already needs 8 (4 variants x 2 batch classes), and
# each further dtype, device or model in the process adds its own
RECOMPILE_LIMIT = 64


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What ``TextToImagePipeline.compile`` did: blocks compiled, graphs made and the seconds it took."""

    blocks: int  # transformer blocks compiled in place (with scope "model": inside the compiled forward)
    graphs: int  # graphs dynamo compiled during the warm-up (0 without a warm-up)
    seconds: float  # wall time of the warm-up calls: tracing, code generation and the calls themselves
    scope: str = "blocks"  # "blocks" | "model"

    def __str__(self) -> str:
        what = f"{self.blocks} blocks"
        if self.scope == "model":
            what = f"the transformer ({what})"
        return f"compiled {what} into {self.graphs} graphs in {self.seconds:.1f} s"


def repeated_blocks(model: nn.Module, family: str) -> list[nn.Module]:
    """The transformer's repeated blocks, in forward order."""
    if family not in BLOCK_LISTS:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(BLOCK_LISTS)}")
    return [block for name in BLOCK_LISTS[family] for block in getattr(model, name)]


def compile_blocks(
    model: nn.Module,
    family: str,
    *,
    dynamic: bool | None = True,
    backend: str = "inductor",
    mode: str | None = None,
    scope: str = "blocks",
) -> int:
    """``torch.compile`` each repeated block of ``model`` (``scope="model"``: its whole forward) in place;
    returns how many blocks that covers. Compiling happens on the first call of each block variant and shape
    (see the module docstring for ``dynamic``)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown compile scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if dynamic not in (True, False, None):
        raise ValueError(f"dynamic must be True, False or None, got {dynamic!r}")
    blocks = repeated_blocks(model, family)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for module in blocks if scope == "blocks" else [model]:
        module.compile(backend=backend, dynamic=dynamic, mode=mode)
    return len(blocks)


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (every frame it compiled, recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def timed_warmup(calls: list[Callable[[], object]]) -> tuple[int, float]:
    """(graphs compiled, seconds) while running ``calls``: the compile cost of the shapes they cover."""
    graphs = compiled_graphs()
    start = time.perf_counter()
    with torch.no_grad():
        for call in calls:
            call()
    return compiled_graphs() - graphs, time.perf_counter() - start
