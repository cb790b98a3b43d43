"""The one preprocessing definition shared by training, evaluation and the daemon.

Like torchvision's ``references/classification/presets.py``: an eval preset, and a train preset that is
augmentation inserted before the same tail. The :class:`Preset` travels inside every checkpoint
(``Preset.to_dict``), so inference never re-declares it.

The tail is split in two so the daemon can run each half where it is cheapest: :class:`ToPixels` (the
8-bit picture as a uint8 tensor, no arithmetic) in its decode threads, and :class:`Normalize` (grey to
3 channels, ImageNet mean/std) once per batch in the model's thread. Training runs both halves per image;
the values are bitwise the same either way (tests/test_preprocessing.py).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from xr.core.config import AugmentConfig, PreprocessConfig
from xr.core.errors import CheckpointError
from xr.core.imaging import load_image
from xr.core.intake import DEFAULT_LIMITS, DecodeLimits


class ToPixels(torch.nn.Module):
    """Mode "L" picture -> uint8 tensor [1, H, W] (a copy of the pixels, no arithmetic)."""

    def forward(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "L":
            raise ValueError(f"expected a mode 'L' image, got mode {img.mode!r}")
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).unsqueeze(0)


class Normalize(torch.nn.Module):
    """uint8 [..., 1, H, W] -> float32 [..., 3, H, W]: grey copied to 3 channels, then ImageNet mean/std.

    The same float operations in the same order as torchvision's ``ToTensor`` + ``Normalize`` on the grey
    picture converted to RGB, so both give identical tensors; here one call covers a whole batch.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() < 3 or x.shape[-3] != 1:
            raise ValueError(f"expected uint8 pixels [..., 1, H, W], got {x.dtype} {tuple(x.shape)}")
        return x.to(torch.float32).div(255).sub(self.mean).div(self.std)


def _jpeg_round_trip(img: Image.Image, quality: int) -> Image.Image:
    """``img`` saved as a JPEG of ``quality`` and decoded again (same mode)."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    out = Image.open(buf)
    out.load()
    return out


class RenderAsDataset(torch.nn.Module):
    """Render a picture the way the training images were made: squashed straight to ``size`` x ``size``
    (bicubic) and stored as a JPEG of ``quality``.

    The model learnt from such copies and reads their JPEG grain as signal; a full-resolution export
    resized smoothly scored lower than its own dataset copy. Passing every input through the same
    rendering (training copies too, where it changes next to nothing) puts both on the same footing
    (docs/design.md, "The rendering step").
    """

    def __init__(self, size: int, quality: int):
        super().__init__()
        self.size, self.quality = size, quality

    def forward(self, img: Image.Image) -> Image.Image:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC)
        return _jpeg_round_trip(img, self.quality)


class RandomGamma(torch.nn.Module):
    """Gamma drawn uniformly from ``gamma``, from torch's generator: the film under another exposure curve."""

    def __init__(self, gamma: tuple[float, float]):
        super().__init__()
        self.gamma = gamma

    def forward(self, img: Image.Image) -> Image.Image:
        return T.functional.adjust_gamma(img, float(torch.empty(1).uniform_(*self.gamma)))


_OPERATOR_KEYS = ("max_pixels", "dicom_window")  # now in DecodeLimits (core/intake.py)


@dataclass(frozen=True)
class Preset:
    """What defines the model's input: the rendering, the geometry and the normalisation. Stored in every
    checkpoint. The operator's decode limits (pixel limit, DICOM window) are not part of it: each decode
    takes a :class:`~xr.core.intake.DecodeLimits`."""

    img_size: int = 224
    resize_size: int = 257
    resize_mode: str = "squash"  # squash | shorter_side
    # None in checkpoints made before the rendering step existed: they keep their original pipeline.
    render_size: int | None = None
    render_quality: int = 75
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> Preset:
        return cls(
            img_size=cfg.img_size,
            resize_size=int(cfg.img_size * cfg.resize_ratio),
            resize_mode=cfg.resize_mode,
            render_size=cfg.render_size,
            render_quality=cfg.render_quality,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        # Checkpoints made before DecodeLimits stored the operator's decode limits here; they never shaped
        # the model's input (the daemon replaced them with config.yaml's), so they are dropped.
        d = {k: v for k, v in d.items() if k not in _OPERATOR_KEYS}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:  # a field this version cannot apply would score the film through another pipeline
            raise CheckpointError(
                f"the checkpoint's preprocessing has fields this version does not know: {', '.join(unknown)}"
            )
        d = dict(d)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    # -- geometry ---------------------------------------------------------------------------------
    def _resize(self) -> T.Resize:
        size = (self.resize_size, self.resize_size) if self.resize_mode == "squash" else self.resize_size
        return T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)

    def _geometry(self) -> list:
        render = [RenderAsDataset(self.render_size, self.render_quality)] if self.render_size else []
        return [*render, self._resize(), T.CenterCrop(self.img_size)]

    def normalizer(self) -> Normalize:
        # Grayscale copied to 3 channels so ImageNet weights see the input they were trained on.
        return Normalize(self.mean, self.std)

    def _tail(self) -> list:
        return [ToPixels(), self.normalizer()]

    def eval_transform(self) -> T.Compose:
        return T.Compose([*self._geometry(), *self._tail()])

    def pixel_transform(self) -> T.Compose:
        """The eval preset up to the uint8 pixels: apply :meth:`normalizer` to (batches of) its output."""
        return T.Compose([*self._geometry(), ToPixels()])

    def train_transform(self, aug: AugmentConfig) -> T.Compose:
        # Augment inside the eval field of view, so training and inference see objects at the same scale.
        # Photometric steps stand for other exposures and scanners: a site's films differ in grey levels.
        photometric = []
        if aug.brightness or aug.contrast:
            photometric.append(T.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
        if tuple(aug.gamma) != (1.0, 1.0):
            photometric.append(RandomGamma(tuple(aug.gamma)))
        if aug.autocontrast_p:
            photometric.append(T.RandomAutocontrast(aug.autocontrast_p))
        if aug.equalize_p:
            photometric.append(T.RandomEqualize(aug.equalize_p))
        interpolation = T.InterpolationMode.BILINEAR
        if tuple(aug.affine_scale) != (1.0, 1.0) or aug.translate:
            affine = T.RandomAffine(
                aug.rotation_deg,
                translate=(aug.translate, aug.translate),
                scale=tuple(aug.affine_scale),
                interpolation=interpolation,
            )
        else:
            affine = T.RandomRotation(aug.rotation_deg, interpolation=interpolation)
        return T.Compose(
            [
                *self._geometry(),
                *photometric,
                T.RandomResizedCrop(self.img_size, scale=tuple(aug.rrc_scale), antialias=True),
                T.RandomHorizontalFlip(aug.hflip_p),
                affine,
                *self._tail(),
            ]
        )

    # -- decoding ---------------------------------------------------------------------------------
    def load(
        self, source: str | Path | bytes, limits: DecodeLimits = DEFAULT_LIMITS, *, name: str | Path | None = None
    ) -> Image.Image:
        """Decode to mode "L" within ``limits``, letting big JPEGs decode at reduced scale (1/2, 1/4 or 1/8
        in the DCT).

        With the rendering step the DCT may shrink only to twice the rendering size, so the bicubic
        shrink, as in the training copies, shapes the picture (docs/benchmarks.md, full-resolution table).
        """
        side = 2 * self.render_size if self.render_size else self.resize_size
        return load_image(source, limits, draft_size=(side, side), name=name)

    def __call__(
        self, source: str | Path | bytes, limits: DecodeLimits = DEFAULT_LIMITS, *, name: str | Path | None = None
    ) -> torch.Tensor:
        """File (path or bytes) -> normalised eval tensor [3, img_size, img_size]."""
        return self.eval_transform()(self.load(source, limits, name=name))
