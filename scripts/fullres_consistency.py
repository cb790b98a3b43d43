"""Score the full-resolution samples and their 224x224 dataset copies with one checkpoint and compare.

    python scripts/fullres_consistency.py [--model CKPT] [--set render_size=null] [--draft 257]

Prints the logit gap (full-resolution minus copy: mean and sd), the largest calibrated-probability
difference, how many pairs differ by more than 0.05, decision flips, and the worst pairs. ``--set`` changes a
field of the checkpoint's preprocessing preset for this run only (to see what a pipeline change does to the
same weights); ``--draft`` overrides the JPEG draft size. Not a test: tests/test_shipped_model.py is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from xr.core.imaging import load_image
from xr.core.intake import DEFAULT_LIMITS
from xr.core.model import load_checkpoint
from xr.core.predict import CALIBRATION_FILE, Calibration, Predictor
from xr.core.preprocessing import Preset
from xr.train.analysis import fullres_pairs, pair_agreement

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "xr_mvp_best.pt")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a preset field")
    ap.add_argument("--draft", type=int, default=None, help="JPEG draft size (default: the preset's)")
    ap.add_argument("--threshold", type=float, default=0.05)
    args = ap.parse_args()

    fullres, copies = fullres_pairs(args.shared)
    if not fullres:
        raise SystemExit(f"no full-resolution samples under {args.shared / 'samples' / 'fullres'}")

    model, meta = load_checkpoint(args.model)
    fields = sorted(f.name for f in dataclasses.fields(Preset))  # also those an older checkpoint predates
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {kv}: unknown preset field {key!r}; fields: {fields}")
        meta["preprocess"][key] = json.loads(value)
    cal_path = args.model.parent / CALIBRATION_FILE
    cal = Calibration.read(cal_path) if cal_path.exists() else Calibration()
    predictor = Predictor(model, meta, cal, device="cpu")
    if args.draft:
        preset = predictor.preset

        def load(source, limits=DEFAULT_LIMITS, *, name=None):
            return load_image(source, limits, draft_size=(args.draft, args.draft), name=name)

        object.__setattr__(preset, "load", load)  # this run only; Preset is frozen
    print(f"model {args.model} (T {predictor.temperature:.3f}, threshold {predictor.threshold:.3f})")
    print(f"preset {Preset.to_dict(predictor.preset)}" + (f", draft {args.draft}" if args.draft else ""))

    agree = pair_agreement(predictor, fullres, copies)
    gap, diff = agree["logit_gap"], agree["prob_diff"]
    flips = [fullres[i].name for i in agree["flips"]]
    print(
        f"logit gap mean {gap.mean():+.2f} sd {gap.std():.2f} | probability difference max {diff.max():.3f}, "
        f"mean {diff.mean():.4f}, over {args.threshold}: {(diff > args.threshold).sum()} of {len(diff)} | "
        f"decision flips {len(flips)} {flips if flips else ''}"
    )
    for i in np.argsort(-diff)[:5]:
        print(
            f"  {fullres[i].name:32s} copy logit {agree['second_logit'][i]:+.2f}  "
            f"full {agree['first_logit'][i]:+.2f}  |diff| {diff[i]:.3f}"
        )


if __name__ == "__main__":
    main()
