"""Image-to-image (SDEdit) and inpainting: the flow starts from the noised image instead of pure noise.

    pipe("a red cat", image=photo, strength=0.6)                  # image-to-image
    pipe("a red cat", image=photo, mask_image=mask, strength=1)   # inpainting: white (1) is repainted

Glossary: ``x0`` the image's latent (a VAE posterior sample), ``noise`` ~ N(0, I), ``t_start`` the time the
strength selects on the sampling grid, ``x_t = (1 - t) x0 + t noise`` the flow path (``flow.interpolate``),
``mask`` 1 where the image is regenerated, 0 where it is kept.

Image-to-image skips the first ``int(steps - steps * strength)`` steps of the grid (diffusers'
``get_timesteps``), starts at ``x_{t_start}`` and integrates to t = 0 with the chosen sampler. Inpainting
starts the same way; after each step the kept region is replaced by the image's own latent on the path at
the time reached, ``x_{t_next}`` with the same noise, so that at t = 0 it is ``x0`` and only the masked
region was generated. Masks are binarised at 0.5 at the image size and shrunk to the latent size by nearest
neighbour, as diffusers does.

Inputs: PIL images (converted to RGB; the image resized with Lanczos), numpy arrays [H, W, 3] / [B, H, W, 3]
and tensors [3, H, W] / [B, 3, H, W] (resized by nearest neighbour), as float in [0, 1] or uint8. Masks: PIL
images of any mode, arrays [H, W], [H, W, 1], [B, H, W], [B, H, W, 1] and tensors [H, W], [B, H, W],
[B, 1, H, W], float in [0, 1], uint8 or bool, any size. A batch holds 1 image (or mask), shared by every
generated image, or one per generated image (prompts x num_images).

Random draws follow diffusers' ``StableDiffusion3Img2ImgPipeline`` / ``FluxImg2ImgPipeline`` and their
inpaint pipelines, so a seed gives their images: the posterior sample first (one generator: the whole image
batch in one draw; one generator per image: image i with generator i), then the noise. Where we differ:

- strength 1 without a mask starts from pure noise, where the image plays no part: the call is text-to-image
  at the image's size, with the same noise for a seed (diffusers draws its posterior sample first, so its
  strength-1 image differs from its own text-to-image);
- ``height`` / ``width`` left unset take the image's size rounded down to a multiple of the latent patch
  (diffusers resizes every image to the model's default size);
- SD3 inpainting decodes with the VAE's shift factor, as text-to-image does (diffusers' SD3 inpaint pipeline
  leaves it out when decoding), and needs no 16-channel transformer;
- images that are not in [0, 1], masks that mark nothing, batches of another size and strengths outside
  (0, 1] are errors (diffusers takes a tensor in [-1, 1] as already normalised and runs strength 0 until
  an empty step list fails).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmdit_flow.flow import interpolate

STRENGTH = 0.6  # diffusers' default for image-to-image and inpainting
THRESHOLD = 0.5  # mask values >= THRESHOLD are regenerated (diffusers' binarize)


def check_strength(strength: Any) -> float:
    """A number in (0, 1]: how far from the image (0) towards pure noise (1) sampling starts."""
    if (
        isinstance(strength, bool)
        or not isinstance(strength, numbers.Real)
        or not math.isfinite(strength)
        or not 0 < strength <= 1
    ):
        raise ValueError(
            f"strength must be a number in (0, 1], got {strength!r}: it is how far along the path from the "
            "image (0) to pure noise (1) sampling starts, so at 0 nothing would be generated; 0.6 keeps the "
            "layout, 1 keeps only the size"
        )
    return float(strength)


def start_index(steps: int, strength: float) -> int:
    """The steps of a grid of ``steps`` that image-to-image skips: int(steps - steps * strength), as
    diffusers' ``get_timesteps`` rounds it (strength 0.5 of 5 steps skips 2 and runs 3)."""
    return int(max(steps - min(steps * strength, steps), 0))


# ------------------------------------------------------------------------------------- images and masks


@dataclass
class Pictures:
    """Images or masks as given, checked: PIL images, or a float tensor [B, C, H, W] in [0, 1]."""

    name: str  # the argument: image or mask_image
    pil: list | None = None
    tensor: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return len(self.pil) if self.pil is not None else self.tensor.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the first picture."""
        if self.pil is not None:
            return self.pil[0].height, self.pil[0].width
        return tuple(self.tensor.shape[-2:])

    def resized(self, height: int, width: int) -> torch.Tensor:
        """[B, C, height, width] float32 in [0, 1]: PIL images resized with Lanczos (a mask before its
        conversion to grey, as diffusers does), tensors by nearest neighbour (torch's interpolate)."""
        if self.tensor is not None:
            return torch.nn.functional.interpolate(self.tensor, size=(height, width))
        import numpy as np
        from PIL import Image

        arrays = []
        for img in self.pil:
            if self.name == "image" and img.mode != "RGB":
                img = img.convert("RGB")
            img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
            if self.name != "image":
                img = img.convert("L")
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        batch = torch.from_numpy(np.stack(arrays))  # [B, H, W, 3] or [B, H, W]
        return batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2)


def _pil_list(value: Any) -> list | None:
    from PIL import Image

    if isinstance(value, Image.Image):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Image.Image) for v in value):
        return list(value)
    return None


def _values(t: torch.Tensor, name: str, allow_bool: bool) -> torch.Tensor:
    """uint8 -> x / 255, bool -> 0 / 1 (masks), floating point checked finite and in [0, 1]; float32."""
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == torch.bool and allow_bool:
        return t.float()
    if not t.is_floating_point():
        kinds = "float in [0, 1], uint8" + (" or bool" if allow_bool else "")
        raise ValueError(f"{name} must hold {kinds} values, got {t.dtype}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or inf; pass finite values in [0, 1]")
    low, high = float(t.min()), float(t.max())
    if low < 0 or high > 1:
        hint = "; for values in [-1, 1] pass (x + 1) / 2" if low < 0 else "; for 0-255 values pass x / 255"
        raise ValueError(f"{name} values must lie in [0, 1], got [{low:.3g}, {high:.3g}]{hint}")
    return t


def _tensor(value: Any, name: str) -> torch.Tensor | None:
    """A numpy array or a tensor as a CPU tensor (numpy's channels-last order kept), None otherwise."""
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise ValueError(f"{name} is on the meta device (a shape without values); pass one with values")
        return value.detach().cpu()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fub":
            raise ValueError(f"{name} must hold float in [0, 1], uint8 or bool values, got {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def _not_empty(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one pixel")
    return t


def read_images(image: Any) -> Pictures:
    """``image`` as PIL image(s), an array [H, W, 3] / [B, H, W, 3] or a tensor [3, H, W] / [B, 3, H, W]."""
    pil = _pil_list(image)
    if pil is not None:
        return Pictures("image", pil=pil)
    t = _tensor(image, "image")
    if t is None:
        raise ValueError(
            "image must be a PIL image (or a list of them), a numpy array [H, W, 3] / [B, H, W, 3] or a "
            f"tensor [3, H, W] / [B, 3, H, W] with values in [0, 1]; got {type(image).__name__}"
        )
    is_numpy = not isinstance(image, torch.Tensor)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"image must have 3 or 4 dimensions, got shape {tuple(t.shape)}")
    if is_numpy:
        t = t.permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
    if t.shape[1] != 3:
        layout = "[B, H, W, 3]" if is_numpy else "[B, 3, H, W]"
        raise ValueError(
            f"image must be RGB, {layout}, got shape {tuple(image.shape)} ({t.shape[1]} channels); "
            "convert it to RGB first"
        )
    return Pictures("image", tensor=_values(_not_empty(t, "image"), "image", allow_bool=False))


def read_masks(mask: Any) -> Pictures:
    """``mask_image`` as PIL image(s), an array [H, W], [H, W, 1], [B, H, W], [B, H, W, 1] or a tensor
    [H, W], [B, H, W], [B, 1, H, W] (a 3-D array ending in 1 is one [H, W, 1] mask, as in diffusers)."""
    pil = _pil_list(mask)
    if pil is not None:
        return Pictures("mask_image", pil=pil)
    t = _tensor(mask, "mask_image")
    if t is None:
        raise ValueError(
            "mask_image must be a PIL image (or a list of them), a numpy array [H, W] / [B, H, W] or a "
            f"tensor [H, W] / [B, H, W] / [B, 1, H, W] (1 = regenerate); got {type(mask).__name__}"
        )
    shape = tuple(t.shape)
    if isinstance(mask, torch.Tensor):
        t = t[None, None] if t.ndim == 2 else t[:, None] if t.ndim == 3 else t
    else:
        if t.ndim == 3 and shape[-1] in (3, 4):
            raise ValueError(
                f"mask_image of shape {shape} looks like an RGB(A) image; masks have one channel: pass "
                "mask[..., 0] (masks 3 or 4 px wide: pass them as [B, H, W, 1])"
            )
        t = t[None] if t.ndim == 2 or (t.ndim == 3 and shape[-1] == 1) else t  # [B, H, W(, 1)]
        t = t[..., 0] if t.ndim == 4 and t.shape[-1] == 1 else t
        t = t[:, None] if t.ndim == 3 else t
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(
            f"mask_image must be one channel: [H, W], [B, H, W] or [B, 1, H, W] ([B, H, W, 1] for numpy), "
            f"got shape {shape}; for an RGB mask pass mask[..., 0]"
        )
    return Pictures("mask_image", tensor=_values(_not_empty(t, "mask_image"), "mask_image", allow_bool=True))


def _expand(t: torch.Tensor, n: int) -> torch.Tensor:
    """A batch of 1 repeated to n rows (a batch of n as it is)."""
    return t if t.shape[0] == n else t.repeat(n, *([1] * (t.ndim - 1)))


# ----------------------------------------------------------------------------------------------- the edit


@dataclass
class EditStart:
    """Where an edit's integration starts: the state ``x`` [n, C, h, w] at the grid's first time, and for
    inpainting what the kept region is rebuilt from (``x0``, ``noise``) and the latent ``mask``."""

    x: torch.Tensor
    x0: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [n, 1, h, w], 1 = regenerate


class ImageEdit:
    """The image (and mask) of a call, checked; ``grid`` cuts the time grid by the strength, ``start``
    encodes and noises the image, ``integrate`` solves (and for inpainting keeps the unmasked region)."""

    def __init__(self, images: Pictures, masks: Pictures | None, strength: float):
        self.images, self.masks, self.strength = images, masks, strength
        self.pixels: torch.Tensor | None = None  # [b, 3, H, W] once sized
        self.mask: torch.Tensor | None = None  # [b_m, 1, h, w] at the latent size, binary

    @staticmethod
    def from_call(image: Any, mask_image: Any, strength: Any, latents: Any) -> ImageEdit | None:
        """The edit of a call's arguments, or None for text-to-image."""
        if image is None:
            if mask_image is not None:
                raise ValueError("mask_image needs the image it masks: pass image=... as well")
            if strength is not None:
                raise ValueError(
                    "strength is for image-to-image and inpainting: pass image=... as well, or leave it unset"
                )
            return None
        if latents is not None:
            raise ValueError(
                "pass image or latents, not both: with an image the starting latents are the noised image"
            )
        strength = check_strength(STRENGTH if strength is None else strength)
        masks = read_masks(mask_image) if mask_image is not None else None
        return ImageEdit(read_images(image), masks, strength)

    def size(self, height: Any, width: Any, multiple: int) -> tuple[Any, Any]:
        """``height`` / ``width``, an unset one the image's own side rounded down to ``multiple``."""
        h, w = self.images.size
        if (height is None and h < multiple) or (width is None and w < multiple):
            raise ValueError(
                f"image is {h}x{w} px, smaller than {multiple} px (VAE scale x patch size) a side; pass a "
                "larger image, or height and width (the image is resized to them)"
            )
        return (h - h % multiple if height is None else height), (
            w - w % multiple if width is None else width
        )

    def prepare(self, height: int, width: int, n: int, scale: int) -> None:
        """Resize the images and masks to the output size and check their batches against the n images
        to generate and that each mask marks something at the latent size (1 / ``scale`` of the image)."""
        for pics in (self.images, self.masks):
            if pics is not None and pics.batch not in (1, n):
                raise ValueError(
                    f"got {pics.batch} {pics.name}s for {n} images (prompts x num_images); pass one for all, "
                    f"or exactly {n}"
                )
        self.pixels = self.images.resized(height, width)
        if self.masks is None:
            return
        full = (self.masks.resized(height, width) >= THRESHOLD).float()  # diffusers' binarize
        self.mask = torch.nn.functional.interpolate(full, size=(height // scale, width // scale))
        latent = f" once shrunk to the latent size ({height // scale}x{width // scale})"
        for what, m in (("", full), (latent, self.mask)):
            empty = [i for i in range(m.shape[0]) if not bool(m[i].any())]
            if empty:
                raise ValueError(
                    f"mask_image {empty} marks nothing to regenerate{what}: white (values >= 0.5) marks the "
                    f"region to repaint; make it cover at least {scale}x{scale} px, or drop mask_image for "
                    "image-to-image"
                )

    def grid(self, ts: torch.Tensor) -> torch.Tensor:
        """The part of the time grid [steps + 1] that the strength keeps (at least one step)."""
        steps = len(ts) - 1
        skip = start_index(steps, self.strength)
        if skip >= steps:
            raise ValueError(
                f"strength {self.strength:g} of {steps} steps leaves no step to run (diffusers rounds "
                f"steps * strength down); raise strength or steps"
            )
        return ts[skip:]

    def start(
        self,
        codec: Any,
        t_start: float,
        n: int,
        generators: list[torch.Generator] | None,
        draw_noise: Callable[[], torch.Tensor],
    ) -> EditStart:
        """Encode the images (posterior samples drawn first) and noise them to ``t_start``."""
        if self.strength == 1.0 and self.mask is None:  # pure noise: text-to-image, the same draws
            return EditStart(draw_noise().float())
        if generators is not None and len(generators) > 1:  # image i with generator i
            pixels = _expand(self.pixels, n)
            x0 = torch.cat([codec.encode(pixels[i : i + 1], generators[i]) for i in range(n)])
        else:
            x0 = _expand(codec.encode(self.pixels, generators[0] if generators else None), n)
        noise = draw_noise().float().to(x0.device)
        mask = None if self.mask is None else _expand(self.mask, n).to(x0.device)
        return EditStart(interpolate(x0, noise, t_start), x0, noise, mask)

    def integrate(
        self,
        start: EditStart,
        fn: Callable[..., torch.Tensor],
        ts: torch.Tensor,
        *,
        method: str,
        callback: Callable[[int, float, torch.Tensor], None] | None,
        **cond: Any,
    ) -> torch.Tensor:
        """Solve from ``start.x`` over ``ts``; with a mask, after each step the kept region is the image
        on the path at the time reached (diffusers' inpainting)."""
        from mmdit_flow.sampling import solve

        if start.mask is None:
            return solve(fn, start.x, ts, method=method, callback=callback, **cond)
        x, keep = start.x, 1 - start.mask
        for i in range(len(ts) - 1):
            x = solve(fn, x, ts[i : i + 2], method=method, **cond)
            t = float(ts[i + 1])
            x = keep * interpolate(start.x0, start.noise, t) + start.mask * x
            if callback is not None:
                callback(i, t, x)
        return x
