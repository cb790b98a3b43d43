"""The one preprocessing definition shared by training, evaluation and the daemon.

Like torchvision's ``references/classification/presets.py``: an eval preset, and a train preset that is
augmentation inserted before the same tail. The :class:`Preset` travels inside every checkpoint
(``Preset.to_dict``), so inference never re-declares it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from xr.core.config import AugmentConfig, PreprocessConfig
from xr.core.imaging import load_image


@dataclass(frozen=True)
class Preset:
    img_size: int = 224
    resize_size: int = 257
    resize_mode: str = "squash"  # squash | shorter_side
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_pixels: int = 80_000_000

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> "Preset":
        return cls(
            img_size=cfg.img_size,
            resize_size=int(cfg.img_size * cfg.resize_ratio),
            resize_mode=cfg.resize_mode,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            max_pixels=cfg.max_pixels,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preset":
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

    def _tail(self) -> list:
        # Grayscale copied to 3 channels so ImageNet weights see the input they were trained on.
        return [T.Grayscale(num_output_channels=3), T.ToTensor(), T.Normalize(self.mean, self.std)]

    def eval_transform(self) -> T.Compose:
        return T.Compose([self._resize(), T.CenterCrop(self.img_size), *self._tail()])

    def train_transform(self, aug: AugmentConfig) -> T.Compose:
        # Augment inside the eval field of view, so training and inference see objects at the same scale.
        return T.Compose(
            [
                self._resize(),
                T.CenterCrop(self.img_size),
                T.RandomResizedCrop(self.img_size, scale=tuple(aug.rrc_scale), antialias=True),
                T.RandomHorizontalFlip(aug.hflip_p),
                T.RandomRotation(aug.rotation_deg, interpolation=T.InterpolationMode.BILINEAR),
                T.RandomApply([T.GaussianBlur(5, sigma=tuple(aug.blur_sigma))], p=aug.blur_p),
                T.RandomApply([v2.JPEG(tuple(aug.jpeg_quality))], p=aug.jpeg_p),
                *self._tail(),
            ]
        )

    # -- decoding ---------------------------------------------------------------------------------
    def load(self, source: str | Path | bytes, name: str | Path | None = None) -> Image.Image:
        """Decode to mode "L", letting big JPEGs decode at reduced scale down to the resize size."""
        draft = (self.resize_size, self.resize_size)
        return load_image(source, max_pixels=self.max_pixels, draft_size=draft, name=name)

    def __call__(self, source: str | Path | bytes, name: str | Path | None = None) -> torch.Tensor:
        """File (path or bytes) -> normalised eval tensor [3, img_size, img_size]."""
        return self.eval_transform()(self.load(source, name=name))
