"""Training speed on this machine (a benchmark, not a test).

Prints train-step images/s for the configured fast path against plain fp32 (same run, same batches),
feature-extraction images/s, and, with --full-cycle DIR, the wall time of a whole `xr-train all`.

    python scripts/bench_train.py                     # step rates
    python scripts/bench_train.py --full-cycle ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from xr.core.config import load_recipe
from xr.core.model import create_model
from xr.core.predict import autocast, cpu_has_fast_bf16, tune_malloc
from xr.train.engine import set_trainable


def step_rate(freeze_stages: int, channels_last: bool, bf16: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained=False)
    frozen = set_trainable(model, head_only=False, freeze_stages=freeze_stages)
    model.train()
    for m in frozen:
        m.eval()
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 2, (batch, 1)).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    dev = torch.device("cpu")
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        with autocast(dev, bf16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


@torch.inference_mode()
def forward_rate(channels_last: bool, batch: int, steps: int) -> float:
    model = create_model("efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--full-cycle", type=Path, default=None, help="dataset root: also time a whole `xr-train all`")
    args = ap.parse_args()
    tuned = tune_malloc()  # as `xr-train` runs
    cfg = load_recipe()
    print(f"malloc settings: {tuned}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_fast_bf16()}")
    print(f"forward (features/eval) fp32 NCHW:          {forward_rate(False, args.batch, args.steps):6.1f} images/s")
    print(f"forward (features/eval) fp32 channels_last: {forward_rate(True, args.batch, args.steps):6.1f} images/s")
    rows = [
        ("full fine-tune, fp32 NCHW", 0, False, False),
        ("full fine-tune, fp32 channels_last", 0, True, False),
        (
            f"stem + {cfg.train.freeze_stages} stages frozen, channels_last (default)",
            cfg.train.freeze_stages,
            True,
            False,
        ),
    ]
    if cpu_has_fast_bf16():
        rows.append(("frozen stages, channels_last, bf16 autocast", cfg.train.freeze_stages, True, True))
    for name, fs, cl, bf in rows:
        print(f"train step {name:55s} {step_rate(fs, cl, bf, args.batch, args.steps):6.1f} images/s")
    if args.full_cycle:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "xr.train.cli", "all", "--data", str(args.full_cycle), "--out", tmp], check=True
            )
            print(f"full `xr-train all` on {args.full_cycle}: {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
