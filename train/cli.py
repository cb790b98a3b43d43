"""``xr-train``: split, train, calibrate, evaluate, or all of them in order; site-calibrate for a new site.

Each stage starts from the files the previous one wrote in the run folder, so one stage can be re-run:

    RUN/recipe.yaml                 resolved recipe (flags applied)
    RUN/splits/{train,val,test}.csv file lists, grouped by patient; RUN/splits/summary.json
    RUN/xr_mvp_best.pt              best-val-AUROC checkpoint
    RUN/checkpoint_last.pt          the last epoch's, with what --resume carries on from
    RUN/epochs.csv, RUN/val_logits.csv
    RUN/calibration_threshold.json  T, threshold, objective, val metrics, NLL/ECE before and after
    RUN/eval/                       predictions.csv, metrics.json, plots (test split)
    RUN/model_card.json, RUN/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from xr.core.calibration import CALIBRATION_FILE, Calibration, reference
from xr.core.config import RECIPE_PATH, SHIPPED_MODEL, Recipe, load_recipe, save_config
from xr.core.errors import XRError
from xr.core.model import file_sha256
from xr.core.predict import Predictor, resolve_device, tune_malloc
from xr.train import calibrate as cal
from xr.train import resume
from xr.train.analysis import compute_metrics, evaluate_items
from xr.train.card import write_model_card
from xr.train.data import Splits, discover, make_splits
from xr.train.engine import BEST_CHECKPOINT, LAST_CHECKPOINT, VAL_LOGITS, fit

RECIPE_FILE = "recipe.yaml"
SITE_OBJECTIVE = "f1"  # cross-validated on a 200-film site sample it kept both recalls highest (docs/training.md)
DEVICE_HELP = "auto (cuda, mps, cpu) | cuda | mps | cpu"


def _recipe_overrides(args: argparse.Namespace) -> dict:
    """Recipe overrides from the flags given; an unset flag overrides nothing."""
    flags = {
        "train.epochs": getattr(args, "epochs", None),
        "train.head_epochs": getattr(args, "head_epochs", None),
        "train.batch_size": getattr(args, "batch_size", None),
        "train.max_steps_per_epoch": getattr(args, "max_steps", None),
        "train.seed": getattr(args, "seed", None),
        "data.num_workers": getattr(args, "num_workers", None),
        "data.test_patients_from": str(args.test_patients_from) if getattr(args, "test_patients_from", None) else None,
        "calibration.objective": getattr(args, "objective", None),
    }
    return {k: v for k, v in flags.items() if v is not None}


def run_recipe(args: argparse.Namespace, out: Path) -> Recipe:
    """--recipe, else the run folder's saved recipe, else the packaged train/recipe.yaml; then flags."""
    saved = out / RECIPE_FILE
    path = args.recipe or (saved if saved.exists() else RECIPE_PATH)
    if path == saved and not args.recipe:
        # a re-run keeps its run's recipe, which later edits of the default recipe do not reach
        print(f"recipe: {path} (saved by an earlier run in this folder; --recipe FILE to use another)", file=sys.stderr)
    cfg = load_recipe(path, _recipe_overrides(args))
    # A stage that is going to fail on its inputs must leave no run folder or recipe behind: a later
    # run in that folder would take the saved recipe instead of the default.
    check_stage_inputs(args, out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    return cfg


def check_stage_inputs(args: argparse.Namespace, out: Path, cfg: Recipe) -> None:
    """Raise the stage's own error if the files it starts from are missing; writes nothing."""
    command = args.command
    if getattr(args, "resume", False):
        Splits.load(out / "splits")  # a resumed run trains on the splits it started with
        resume.load(out / LAST_CHECKPOINT, cfg)  # missing, foreign, or another recipe
    elif command in ("split", "all"):
        discover(args.data)  # data folder not found / no images found
    elif command == "train":
        Splits.load(out / "splits")  # split file missing: ... (run `xr-train split` first)
    elif command == "calibrate":
        val_logits_path(out)


def val_logits_path(out: Path) -> Path:
    path = out / VAL_LOGITS
    if not path.exists():
        raise XRError(f"{path} not found: run `xr-train train --out {out}` first")
    return path


# -- stages -------------------------------------------------------------------------------------------
def stage_split(cfg: Recipe, data: Path, out: Path) -> Splits:
    splits = make_splits(data, cfg.data)
    splits.save(out / "splits")
    summary = splits.summary()
    print(
        "split: "
        + ", ".join(
            f"{k} {summary[k]['images']} images / {summary[k]['patients']} patients" for k in ("train", "val", "test")
        )
        + (f" ({'; '.join(summary['notes'])})" if summary["notes"] else "")
    )
    return splits


def stage_train(cfg: Recipe, out: Path, device: str, resume_run: bool = False) -> dict:
    splits = Splits.load(out / "splits")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    result = fit(cfg, splits, out, dev, resume_run=resume_run)
    result["seconds"] = time.perf_counter() - t0
    print(
        f"train: best val AUROC {result['best_val_auroc']:.4f} at epoch {result['best_epoch']} ({result['seconds']:.0f} s on {dev})"
    )
    return result


def stage_calibrate(cfg: Recipe, out: Path) -> dict:
    path = val_logits_path(out)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    logits = np.array([float(r["logit"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    calib_cfg = cfg.calibration
    temperature = cal.fit_temperature(logits, labels)
    probs = cal.sigmoid(logits / temperature)
    threshold, score = cal.choose_threshold(
        probs,
        labels,
        calib_cfg.objective,
        calib_cfg.fn_cost,
        calib_cfg.fp_cost,
        calib_cfg.threshold_grid,
        calib_cfg.target_sensitivity,
    )
    report = cal.calibration_report(logits, labels, temperature, calib_cfg.ece_bins)
    checkpoint = out / BEST_CHECKPOINT
    calibration = Calibration(
        temperature=temperature,
        threshold=threshold,
        kind="validation",
        model_sha256=file_sha256(checkpoint) if checkpoint.exists() else None,
        reference=reference(probs, threshold),
        extra={
            "objective": calib_cfg.objective,
            "objective_score": score,
            **({"fn_cost": calib_cfg.fn_cost, "fp_cost": calib_cfg.fp_cost} if calib_cfg.objective == "cost" else {}),
            **({"target_sensitivity": calib_cfg.target_sensitivity} if calib_cfg.objective == "sensitivity" else {}),
            "n_val": int(len(labels)),
            "calibration": report,
            "val_metrics": compute_metrics(labels, probs, threshold, calib_cfg.ece_bins),
        },
    )
    calibration.write(out / CALIBRATION_FILE)
    result = calibration.to_dict()
    print(
        f"calibrate: T {temperature:.3f}, threshold {threshold:.3f} ({calib_cfg.objective}); val NLL {report['nll_before']:.4f} -> "
        f"{report['nll_after']:.4f}, ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}"
    )
    return result


def stage_evaluate(
    cfg: Recipe, model: Path, items, out: Path, device: str, title: str, calibration: Path | None = None
) -> dict:
    predictor = Predictor.from_checkpoint(model, calibration, device=device, amp=cfg.train.amp)
    if not predictor.calibration.calibrated:
        print(f"warning: no {CALIBRATION_FILE} beside {model}; using T=1 and threshold 0.5", file=sys.stderr)
    metrics = evaluate_items(
        predictor,
        items,
        out,
        batch_size=cfg.train.batch_size,
        num_workers=cfg.data.num_workers,
        title=title,
        n_bins=cfg.calibration.ece_bins,
    )
    per_class = metrics["per_class"]
    print(
        f"evaluate ({metrics['n']} images): AUROC {metrics['auroc'] or float('nan'):.4f}, accuracy {metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f}, "
        f"recall NORMAL {per_class['NORMAL']['recall']:.4f} PNEUMONIA {per_class['PNEUMONIA']['recall']:.4f}, ECE {metrics['ece']:.4f} -> {out}"
    )
    return metrics


def _items_to_evaluate(data: Path):
    found = discover(data)
    if found.get("test"):
        return found["test"]
    raise XRError(f"{data}: no test split or NORMAL/PNEUMONIA folders to evaluate")


# -- command line -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xr-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, data=False, data_required=False, device=True):
        p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run folder (default runs/latest)")
        p.add_argument(
            "--recipe",
            type=Path,
            default=None,
            help="recipe file (default: the run folder's saved recipe.yaml, else the packaged train/recipe.yaml)",
        )
        if device:  # split and calibrate run no model
            p.add_argument("--device", default="auto", help=DEVICE_HELP)
        if data:
            p.add_argument("--data", type=Path, required=data_required, help="dataset root in the Kaggle layout")

    def training_flags(p):
        p.add_argument("--epochs", type=int, help="override train.epochs")
        p.add_argument("--head-epochs", type=int, help="override train.head_epochs")
        p.add_argument("--batch-size", type=int, help="override train.batch_size")
        p.add_argument("--max-steps", type=int, help="cap steps per epoch (smoke runs)")
        p.add_argument("--seed", type=int, help="override train.seed")
        p.add_argument("--num-workers", type=int, help="override data.num_workers")
        p.add_argument(
            "--resume",
            action="store_true",
            help="carry on an interrupted run from RUN/checkpoint_last.pt, with the splits and recipe it started "
            "with, to the end it would have reached",
        )

    def split_flags(p):
        p.add_argument(
            "--test-patients-from",
            type=Path,
            metavar="DIR",
            help="override data.test_patients_from: patients of the images under DIR go to the test split",
        )

    p = sub.add_parser("split", help="carve val/test out of train by patient and save the file lists")
    common(p, data=True, data_required=True, device=False)
    split_flags(p)
    p = sub.add_parser("train", help="train from the saved splits")
    common(p)
    training_flags(p)
    p = sub.add_parser("calibrate", help="fit T and the threshold on the saved validation logits")
    common(p, device=False)
    p.add_argument("--objective", choices=cal.OBJECTIVES, help="override calibration.objective")
    p = sub.add_parser("evaluate", help="metrics and plots of a model on a labelled folder")
    # Not common(): --out is only where evaluate writes, and it never reads a run folder's saved config.
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/latest"),
        help="output folder for predictions.csv, metrics.json and the plots (default runs/latest)",
    )
    p.add_argument(
        "--recipe",
        type=Path,
        default=None,
        help="recipe file for calibration.ece_bins and batch sizes (default: the packaged train/recipe.yaml)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--data", type=Path, help="labelled folder (NORMAL/ and PNEUMONIA/), or a Kaggle-layout root: its test split"
    )
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="a calibration file, e.g. a site's from site-calibrate (default: the one beside the checkpoint)",
    )
    p = sub.add_parser("site-calibrate", help="fit the model's calibration and threshold to a site's labelled films")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="the site's labelled films: NORMAL/ and PNEUMONIA/")
    src.add_argument(
        "--from-db",
        nargs="?",
        const="",
        metavar="DB",
        help="fit from the readers' reviews in the results database (a path or URL; without one, the "
        "results.sqlite of --output), flagged and audit cases weighted by the films they stand for",
    )
    p.add_argument("--output", type=Path, help="with --from-db: the daemon's output folder holding results.sqlite")
    p.add_argument("--since", help="with --from-db: only films scored since (ISO UTC time, or 30m / 12h / 30d)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--out", type=Path, required=True, help="folder for calibration_threshold.json and the report")
    p.add_argument(
        "--objective",
        choices=cal.OBJECTIVES,
        default=SITE_OBJECTIVE,
        help=f"how the threshold is chosen on the site's films (default {SITE_OBJECTIVE})",
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.97,
        help="objective sensitivity: the PNEUMONIA recall to keep (default 0.97)",
    )
    p.add_argument("--fn-cost", type=float, default=5.0, help="objective cost: cost of a missed pneumonia (default 5)")
    p.add_argument("--fp-cost", type=float, default=1.0, help="objective cost: cost of a false alarm (default 1)")
    p.add_argument(
        "--prior-strength",
        type=float,
        default=1.0,
        help="weight of the model's own calibration against the site's films, in films (default 1)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p = sub.add_parser("all", help="split, train, calibrate and evaluate on the test split")
    common(p, data=True, data_required=True)
    split_flags(p)
    training_flags(p)
    p.add_argument("--objective", choices=cal.OBJECTIVES, help="override calibration.objective")
    return parser


def _site_calibrate(args: argparse.Namespace) -> int:
    from xr.train.site import site_calibrate

    if not 0 < args.target_sensitivity < 1:
        raise XRError(f"--target-sensitivity: {args.target_sensitivity} must be between 0 and 1")
    if args.prior_strength < 0:
        raise XRError(f"--prior-strength: {args.prior_strength} must be >= 0")
    fit_kw = {
        "objective": args.objective,
        "target_sensitivity": args.target_sensitivity,
        "strength": args.prior_strength,
        "fn_cost": args.fn_cost,
        "fp_cost": args.fp_cost,
        "device": args.device,
    }
    if args.from_db is not None:
        report = _from_db(args, fit_kw)
    else:
        if args.since or args.output:
            raise XRError("--since and --output go with --from-db")
        report = site_calibrate(args.model or SHIPPED_MODEL, args.data, args.out, **fit_kw)
    after, cv = report["after"], report["cross_validated"]
    print(
        f"site-calibrate ({report['n']} films): p = sigmoid({report['scale']:.3f} z {report['shift']:+.3f}), threshold "
        f"{report['threshold']:.3f} ({report['objective']}); on these films accuracy {after['accuracy']['value']:.3f}, "
        f"recall PNEUMONIA {after['sensitivity']['value']:.3f} NORMAL {after['specificity']['value']:.3f}; "
        f"cross-validated accuracy {cv['accuracy']['mean']:.3f} ({cv['accuracy']['p05']:.3f}-{cv['accuracy']['p95']:.3f}) "
        f"-> {args.out / CALIBRATION_FILE}"
    )
    if report.get("warning"):
        print(f"xr-train: warning: {report['warning']}", file=sys.stderr)
    return 0


def _from_db(args: argparse.Namespace, fit_kw: dict) -> dict:
    from xr.results.cli import parse_since
    from xr.train.site_db import site_calibrate_from_db

    db = args.from_db or (args.output / "results.sqlite" if args.output else None)
    if not db:
        raise XRError("--from-db needs a database (--from-db DB) or the daemon's --output folder")
    try:
        since = parse_since(args.since) if args.since else None
    except argparse.ArgumentTypeError as exc:
        raise XRError(str(exc)) from None
    return site_calibrate_from_db(args.model or SHIPPED_MODEL, db, args.out, since=since, **fit_kw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    tune_malloc()
    try:
        if args.command == "site-calibrate":
            return _site_calibrate(args)
        cfg = run_recipe(args, out) if args.command != "evaluate" else load_recipe(args.recipe, {})
        if args.command == "split":
            stage_split(cfg, args.data, out)
        elif args.command == "train":
            stage_train(cfg, out, args.device, args.resume)
        elif args.command == "calibrate":
            stage_calibrate(cfg, out)
        elif args.command == "evaluate":
            model = args.model or SHIPPED_MODEL
            if args.data is None:
                raise XRError(
                    "evaluate needs --data: a labelled folder (NORMAL/ and PNEUMONIA/) or a Kaggle-layout root"
                )
            stage_evaluate(
                cfg,
                model,
                _items_to_evaluate(args.data),
                out,
                args.device,
                title=args.data.name,
                calibration=args.calibration,
            )
        elif args.command == "all":
            t0 = time.perf_counter()
            splits = Splits.load(out / "splits") if args.resume else stage_split(cfg, args.data, out)
            train_result = stage_train(cfg, out, args.device, args.resume)
            calibration = stage_calibrate(cfg, out)
            metrics = stage_evaluate(cfg, out / BEST_CHECKPOINT, splits.test, out / "eval", args.device, title="test")
            seconds = time.perf_counter() - t0
            command = "xr-train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
            write_model_card(out, cfg, splits, train_result, calibration, metrics, command, seconds)
            print(f"all: done in {seconds / 60:.1f} min -> {out}")
    except XRError as exc:
        print(f"xr-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
