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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import v2

from xr.core.config import AugmentConfig, PreprocessConfig
from xr.core.imaging import load_image


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
    (with Pillow's ``resample`` filter, bicubic by default as in Pillow) and stored as a JPEG of ``quality``.

    The model learnt from such copies and reads their JPEG grain as signal; a full-resolution export,
    resized smoothly, scored about one logit lower than its own dataset copy on the 40 samples. Passing
    every input through the same rendering (training images too, where a re-encode at the same quality
    changes next to nothing) puts both on the same footing. README "Preprocessing" has the measurements.
    """

    FILTERS = {
        "nearest": Image.NEAREST, "box": Image.BOX, "bilinear": Image.BILINEAR, "hamming": Image.HAMMING,
        "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
    }

    def __init__(self, size: int, quality: int, resample: str = "bicubic"):
        super().__init__()
        if resample not in self.FILTERS:
            raise ValueError(f"render filter {resample!r} is not one of {sorted(self.FILTERS)}")
        self.size, self.quality, self.resample = size, quality, resample

    def forward(self, img: Image.Image) -> Image.Image:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), self.FILTERS[self.resample])
        return _jpeg_round_trip(img, self.quality)


class RandomJpegHistory(torch.nn.Module):
    """The same picture after another JPEG life: re-encoded at a random quality on an 8x8 block grid
    shifted by a random 1-7 pixels, so its blocking and ringing fall elsewhere.

    After :class:`RenderAsDataset` this differs from the plain rendering by 1-2 grey levels on average
    (quality 50-75), as a full-resolution export's rendering differs from its dataset copy (1.9).
    """

    def __init__(self, quality: tuple[int, int]):
        super().__init__()
        self.quality = quality

    def forward(self, img: Image.Image) -> Image.Image:
        dx, dy = (int(v) for v in torch.randint(1, 8, (2,)))
        q = int(torch.randint(self.quality[0], self.quality[1] + 1, (1,)))
        a = np.asarray(img)
        padded = np.pad(a, ((dy, 8 - dy), (dx, 8 - dx)), mode="edge")
        out = np.asarray(_jpeg_round_trip(Image.fromarray(padded), q))
        return Image.fromarray(np.ascontiguousarray(out[dy : dy + a.shape[0], dx : dx + a.shape[1]]))


class RandomRerender(torch.nn.Module):
    """The film as a full-resolution export of it might arrive: upsampled 2-6x to a random aspect ratio
    of 1.0-1.6 (chest films are about 1.1-1.6 : 1) with a random Pillow filter, then unsharp-masked by a
    random 0-300% at the scale of one pixel of the copy, so it carries more or less fine detail than the
    copy. :class:`RenderAsDataset` then shrinks it back as it would a real export.

    After the rendering this differs from the plain rendering by 3.9 grey levels rms on average, as a
    full-resolution export's rendering differs from its dataset copy (3.3) by its unknown shrink
    (README "The shipped model"). Draws from torch's generator, like torchvision's random transforms.
    """

    FILTERS = tuple(RenderAsDataset.FILTERS[name] for name in ("bicubic", "lanczos", "bilinear"))

    def __init__(self, upscale: tuple[float, float] = (2.0, 6.0), aspect: tuple[float, float] = (1.0, 1.6),
                 sharpen_percent: tuple[int, int] = (0, 300)):
        super().__init__()
        self.upscale, self.aspect, self.sharpen_percent = upscale, aspect, sharpen_percent

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def forward(self, img: Image.Image) -> Image.Image:
        u = self._uniform(*self.upscale)
        a = self._uniform(*self.aspect) ** 0.5
        size = (round(img.width * u * a), round(img.height * u / a))
        big = img.resize(size, self.FILTERS[int(torch.randint(len(self.FILTERS), ()))])
        percent = round(self._uniform(*self.sharpen_percent))
        radius = u * self._uniform(0.5, 1.5)
        return big.filter(ImageFilter.UnsharpMask(radius=radius, percent=percent, threshold=0)) if percent else big


class RandomChoice(torch.nn.Module):
    """One of ``transforms``, drawn from torch's generator (torchvision's RandomChoice uses Python's)."""

    def __init__(self, transforms: list):
        super().__init__()
        self.transforms = transforms

    def forward(self, img: Image.Image) -> Image.Image:
        return self.transforms[int(torch.randint(len(self.transforms), ()))](img)


class RandomDownscale(torch.nn.Module):
    """Down-sample by a random factor and back: the same film seen through a coarser resampling chain."""

    def __init__(self, scale: tuple[float, float]):
        super().__init__()
        self.scale = scale

    def forward(self, img: Image.Image) -> Image.Image:
        s = float(torch.empty(1).uniform_(*self.scale))
        w, h = img.size
        small = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR, reducing_gap=None)
        return small.resize((w, h), Image.BILINEAR)


class RandomSharpness(torch.nn.Module):
    """Sharpen by a random factor: the fine texture a full-resolution export keeps and a copy loses."""

    def __init__(self, factor: tuple[float, float]):
        super().__init__()
        self.factor = factor

    def forward(self, img: Image.Image) -> Image.Image:
        return T.functional.adjust_sharpness(img, float(torch.empty(1).uniform_(*self.factor)))


@dataclass(frozen=True)
class Preset:
    img_size: int = 224
    resize_size: int = 257
    resize_mode: str = "squash"  # squash | shorter_side
    # None in checkpoints made before the rendering step existed: they keep their original pipeline.
    render_size: int | None = None
    render_quality: int = 75
    render_filter: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_pixels: int = 80_000_000

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> "Preset":
        return cls(
            img_size=cfg.img_size,
            resize_size=int(cfg.img_size * cfg.resize_ratio),
            resize_mode=cfg.resize_mode,
            render_size=cfg.render_size,
            render_quality=cfg.render_quality,
            render_filter=cfg.render_filter,
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

    def _geometry(self) -> list:
        render = [RenderAsDataset(self.render_size, self.render_quality, self.render_filter)] if self.render_size else []
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
        return T.Compose(
            [
                *self._geometry(),
                T.RandomResizedCrop(self.img_size, scale=tuple(aug.rrc_scale), antialias=True),
                T.RandomHorizontalFlip(aug.hflip_p),
                T.RandomRotation(aug.rotation_deg, interpolation=T.InterpolationMode.BILINEAR),
                T.RandomApply([T.GaussianBlur(5, sigma=tuple(aug.blur_sigma))], p=aug.blur_p),
                T.RandomApply([v2.JPEG(tuple(aug.jpeg_quality))], p=aug.jpeg_p),
                T.RandomApply([RandomDownscale(tuple(aug.downscale_range))], p=aug.downscale_p),
                T.RandomApply([RandomSharpness(tuple(aug.sharpen_range))], p=aug.sharpen_p),
                *self._tail(),
            ]
        )

    # -- decoding ---------------------------------------------------------------------------------
    def load(self, source: str | Path | bytes, name: str | Path | None = None) -> Image.Image:
        """Decode to mode "L", letting big JPEGs decode at reduced scale (1/2, 1/4 or 1/8 in the DCT).

        With the rendering step the DCT may shrink only to twice the rendering size, so the bicubic
        shrink, as in the training copies, shapes the picture: with the shipped weights a draft down to
        the resize size (257 px) put 3 of the 40 samples over the 0.05 agreement, max 0.246, against 2,
        max 0.130 (README "Preprocessing").
        """
        side = 2 * self.render_size if self.render_size else self.resize_size
        draft = (side, side)
        return load_image(source, max_pixels=self.max_pixels, draft_size=draft, name=name)

    def __call__(self, source: str | Path | bytes, name: str | Path | None = None) -> torch.Tensor:
        """File (path or bytes) -> normalised eval tensor [3, img_size, img_size]."""
        return self.eval_transform()(self.load(source, name=name))
