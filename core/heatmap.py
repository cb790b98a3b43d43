"""Where the model looked: a Grad-CAM map (torchcam) of the PNEUMONIA logit, over a film.

The target is the network's last convolutional stage (timm's ``bn2``: ``conv_head`` with its batch norm
and activation, the 7x7 feature map the classifier pools), so the map says which regions raised the score.
One function over a loaded model: the daemon calls it with a copy of the model that scored the film.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from xr.core.preprocessing import Preset

TARGET_LAYER = "bn2"
OVERLAY_SIDE = 768  # the film's longer side in the overlay: readable on a review screen


def heatmap_model(model: nn.Module) -> nn.Module:
    """A private fp32 copy of ``model`` on the CPU for Grad-CAM: its hooks and gradients never touch the
    model the daemon scores with, whatever thread runs it."""
    m = copy.deepcopy(model).float().cpu().eval()
    return m.to(memory_format=torch.contiguous_format)


def gradcam(model: nn.Module, preset: Preset, pixels: torch.Tensor) -> np.ndarray:
    """The Grad-CAM map in [0, 1] of one film's uint8 pixels [1, S, S] (what the model saw), at S x S."""
    from torchcam.methods import GradCAM

    x = preset.normalizer()(pixels.unsqueeze(0)).requires_grad_(True)
    cam = GradCAM(model, target_layer=TARGET_LAYER)
    try:
        with torch.enable_grad():
            scores = model(x)
            (coarse,) = cam(class_idx=0, scores=scores)
    finally:
        cam.remove_hooks()
    side = pixels.shape[-1]
    up = torch.nn.functional.interpolate(coarse[None].float(), size=(side, side), mode="bilinear", align_corners=False)
    return up[0, 0].clamp(0, 1).detach().numpy()


def overlay(film: Image.Image, cam: np.ndarray, preset: Preset, alpha: float = 0.4) -> Image.Image:
    """``film`` (the decoded picture) at a readable size with ``cam`` blended in where the model looked.

    The model saw the film squashed to ``resize_size`` and center-cropped to ``img_size``: the map is put
    back over that central region of the squashed picture."""
    from matplotlib import colormaps

    w, h = film.size
    scale = OVERLAY_SIDE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = film.convert("L").resize(size, Image.BILINEAR).convert("RGB")
    crop = preset.img_size / preset.resize_size if preset.resize_mode == "squash" else 1.0
    box = (round(size[0] * (1 - crop) / 2), round(size[1] * (1 - crop) / 2))
    region = (size[0] - 2 * box[0], size[1] - 2 * box[1])
    full = np.zeros((size[1], size[0]), dtype=np.float64)
    full[box[1] : box[1] + region[1], box[0] : box[0] + region[0]] = (
        np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(region, Image.BILINEAR), dtype=np.float64) / 255
    )
    colour = (colormaps["jet"](full)[..., :3] * 255).astype(np.float64)
    weight = alpha * full[..., None]  # only where the model looked: the rest stays the film
    blended = np.asarray(base, dtype=np.float64) * (1 - weight) + colour * weight
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "RGB")


def write_heatmap(folder: Path, stem: str, film: Image.Image, cam: np.ndarray, preset: Preset) -> Path:
    """``<stem>.png`` (the overlay) and ``<stem>.map.png`` (the raw map, 8-bit) in ``folder``, each written
    to a temp name and renamed: a reader never sees half a file. Returns the overlay's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in (
        (f"{stem}.map.png", Image.fromarray((cam * 255).round().astype(np.uint8), "L")),
        (f"{stem}.png", overlay(film, cam, preset)),
    ):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(buf.getvalue())
        tmp.replace(folder / name)
    return folder / f"{stem}.png"
