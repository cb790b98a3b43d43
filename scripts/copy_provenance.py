"""Can the dataset's 224x224 copies be reproduced from their full-resolution originals? (Not a test.)

    python scripts/copy_provenance.py [--shared ../shared] [--limit 40] [--top 12]

The copies are 224x224 RGB JPEGs of IJG quality 75 with 4:2:0 chroma (what Pillow writes by default),
made from the originals by a pipeline not given with the data (../shared/README.md). If some pipeline here were theirs,
its output would land on the copy's own quantised DCT coefficients and the distance would collapse towards 0;
half a grey level of noise before encoding already gives about 1.2 grey levels rms after it. The script
scores every candidate (one-step shrinks with Pillow's filters, with and without ``reducing_gap``; torch's
resamplers with and without antialiasing, rounded or truncated to 8 bits; two-step shrinks through an
intermediate size, with and without an intermediate JPEG) by its rms distance, in grey levels, to the copies
after storing it the copies' way, and prints the closest ones beside two reference distances: the
same picture re-encoded with 0.5 grey levels of noise, and Pillow's bicubic against its bilinear shrink,
and the distance of the shipped rendering (Pillow's bicubic).
"""
from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xr.core.preprocessing import RenderAsDataset
from xr.train.analysis import fullres_pairs

ROOT = Path(__file__).resolve().parent.parent
SIZE = (224, 224)
PIL_FILTERS = RenderAsDataset.FILTERS  # Pillow's filters by name, as preprocess.render_filter takes them
Shrink = Callable[[Image.Image], np.ndarray]  # mode "L" original -> uint8 [224, 224]


def store_like_copies(pixels: np.ndarray) -> np.ndarray:
    """Stored as the copies were (RGB JPEG, quality 75, Pillow's default 4:2:0) and decoded to grey."""
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(buf).convert("L"), dtype=np.float64)


def pil_shrink(name: str, reducing_gap: float | None) -> Shrink:
    return lambda im: np.asarray(im.resize(SIZE, PIL_FILTERS[name], reducing_gap=reducing_gap))


def torch_shrink(mode: str, antialias: bool, to_uint8: str) -> Shrink:
    def shrink(im: Image.Image) -> np.ndarray:
        x = torch.from_numpy(np.asarray(im, dtype=np.float32))[None, None]
        kw = {} if mode == "area" else {"antialias": antialias, "align_corners": False}
        y = F.interpolate(x, size=SIZE, mode=mode, **kw)[0, 0]
        y = y.round() if to_uint8 == "round" else y.floor()
        return y.clamp(0, 255).to(torch.uint8).numpy()

    return shrink


def two_step(side: int, keep_aspect: bool, first: str, mid_quality: int | None, second: str) -> Shrink:
    def shrink(im: Image.Image) -> np.ndarray:
        w, h = im.size
        scale = side / min(w, h)
        mid = im.resize((round(w * scale), round(h * scale)) if keep_aspect else (side, side), PIL_FILTERS[first])
        if mid_quality:
            buf = io.BytesIO()
            mid.save(buf, "JPEG", quality=mid_quality)
            mid = Image.open(buf)
        return np.asarray(mid.resize(SIZE, PIL_FILTERS[second]))

    return shrink


def candidates() -> dict[str, Shrink]:
    out: dict[str, Shrink] = {}
    for name in PIL_FILTERS:
        for gap in (None, 2.0, 3.0):
            out[f"pil {name} reducing_gap={gap}"] = pil_shrink(name, gap)
    for mode in ("bilinear", "bicubic"):
        for aa in (True, False):
            for to_uint8 in ("round", "floor"):
                out[f"torch {mode} antialias={aa} {to_uint8}"] = torch_shrink(mode, aa, to_uint8)
    out["torch area round"] = torch_shrink("area", False, "round")
    for side in (256, 320, 448, 512):
        for keep_aspect in (False, True):
            for first in ("bilinear", "bicubic"):
                for q in (None, 95):
                    for second in ("bilinear", "bicubic"):
                        name = f"two-step via {side} {'shorter side' if keep_aspect else 'squashed'} {first}, jpeg {q}, {second}"
                        out[name] = two_step(side, keep_aspect, first, q, second)
    return out


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--limit", type=int, default=40, help="use the first N pairs")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()

    fullres, copies = fullres_pairs(args.shared)
    if not fullres:
        raise SystemExit(f"no full-resolution samples under {args.shared / 'samples' / 'fullres'}")
    pairs = [
        (Image.open(f).convert("L"), np.asarray(Image.open(c).convert("L"), dtype=np.float64))
        for f, c in list(zip(fullres, copies))[: args.limit]
    ]
    rng = np.random.default_rng(0)
    noise, filters = [], []
    for original, _ in pairs:
        bicubic = np.asarray(original.resize(SIZE, Image.BICUBIC))
        stored = store_like_copies(bicubic)
        noisy = np.clip(np.round(bicubic + rng.normal(0, 0.5, bicubic.shape)), 0, 255).astype(np.uint8)
        noise.append(rms(stored, store_like_copies(noisy)))
        filters.append(rms(stored, store_like_copies(np.asarray(original.resize(SIZE, Image.BILINEAR)))))
    print(f"{len(pairs)} pairs; rms distance in grey levels after storing both the copies' way")
    print(f"  reference: 0.5 grey levels of noise before encoding   {np.mean(noise):.3f}")
    print(f"  reference: Pillow bicubic against bilinear shrink      {np.mean(filters):.3f}")

    scores = []
    for name, shrink in candidates().items():
        scores.append((np.mean([rms(store_like_copies(shrink(original)), copy) for original, copy in pairs]), name))
    scores.sort()
    shipped = next(d for d, name in scores if name == "pil bicubic reducing_gap=None")
    print(f"  the shipped rendering (Pillow bicubic)                 {shipped:.3f}")
    print(f"closest of {len(scores)} candidate pipelines to the copies:")
    for d, name in scores[: args.top]:
        print(f"  {d:.3f}  {name}")


if __name__ == "__main__":
    main()
