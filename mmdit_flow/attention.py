"""One attention entry point for every model.

Glossary: ``q``, ``k``, ``v`` are [B, H, L, D] (batch, heads, tokens, head dim); the result is [B, L, H * D].

Backends:
- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks flash or
  memory-efficient kernels on CUDA by itself.
- ``"math"``: q k^T and its product with v as plain matmuls in the inputs' dtype, the softmax in fp32.
  For short sequences on the CPU this is the fastest: in bf16 training of the tiny-shapes model (128
  tokens, head dim 64) a step is 1.35x faster than with ``"sdpa"``, whose CPU flash kernel spends most of
  the backward pass on bookkeeping (bench numbers in docs/benchmarks.md). Memory grows with L^2.
- ``"xformers"``: xformers' memory-efficient attention, imported lazily; CUDA tensors only.
- ``"reference"``: plain softmax(q k^T / sqrt(D)) v in fp32, kept for tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "xformers", "reference")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names a known attention backend, else raise a ValueError listing them."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "attention backend 'xformers' needs the xformers package: pip install 'mmdit-flow[xformers]'"
            ) from err
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q, k, v [B, H, L, D]; returns [B, L, H * D]."""
    B, H, L, D = q.shape
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]
        return out.transpose(1, 2).reshape(B, L, H * D)
    if backend == "math":
        scores = (q * (1 / math.sqrt(D))) @ k.transpose(-1, -2)  # [B, H, L, L], the inputs' dtype
        out = scores.float().softmax(dim=-1).to(v.dtype) @ v
        return out.transpose(1, 2).reshape(B, L, H * D)
    if backend == "xformers":
        if not q.is_cuda:
            raise ValueError("attention backend 'xformers' runs on CUDA tensors only; use 'sdpa' on the CPU")
        import xformers.ops

        # xformers wants [B, L, H, D]
        out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.reshape(B, L, H * D)
    if backend == "reference":
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(D)  # [B, H, L, L]
        out = scores.softmax(dim=-1) @ v.float()  # [B, H, L, D]
        return out.to(q.dtype).transpose(1, 2).reshape(B, L, H * D)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class AttentionBackendMixin:
    """A checked ``attention_backend`` property for models: setting an unknown name raises a ValueError."""

    _attention_backend: str

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        self._attention_backend = check_backend(backend)
