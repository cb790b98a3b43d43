"""Issue 34's measurement: a site's first 200 films scored with ``review.audit_rate: 0.5``, every queued case
read in xr-review, then what the reviews tell.

1. The 200 labelled films of ``--data`` (NORMAL/, PNEUMONIA/) are scored by the shipped model (its own
   calibration) and committed through results/journal.py ``commit_batch`` with audit_rate 0.5 (the daemon's
   draw), into a fresh results database.
2. A reader signs in to xr-review (FastAPI's TestClient, the real app) and decides every case on the reading
   list with the film's true label.
3. ``xr-results performance --format json`` on that database; the true sensitivity and specificity of the flag
   on the 200 films are checked against its intervals.
4. The calibration from the reviews against the calibration from the fully labelled films, on films neither
   saw: repeated 2-fold splits by patient; on each fitting half ``site-calibrate`` (every film labelled) and
   ``--from-db`` (that half's flagged films and a fresh 0.5 audit sample of its unflagged ones, weighted);
   both evaluated on the other half (accuracy, recalls, ECE), with the model's own calibration beside them.

    .venv/bin/python scripts/site_audit_study.py --data ../shared/data/site_sample --out runs/site_audit
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import random
import re
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from xr.core.config import SHIPPED_MODEL
from xr.core.predict import Predictor
from xr.results import journal
from xr.results.engine import make_engine, session_factory
from xr.results.schema import Result, Status
from xr.train import calibrate as cal
from xr.train.analysis import score_items
from xr.train.site import _site_items, fit_site

READER, PASSWORD = "reader1", "a long study password"


class _Score:
    def __init__(self, logit: float, probability: float, threshold: float):
        self.logit, self.probability = logit, probability
        self.flagged = probability >= threshold
        self.label = "PNEUMONIA" if self.flagged else "NORMAL"


def build_db(db: Path, items, logits, predictor, audit_rate: float, seed: int) -> None:
    base = predictor.calibration
    sessions = session_factory(eng := make_engine(db))
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    lease = journal.Lease("study", 60, exclusive=True)
    files = [journal.FileClaim(it.path, 1, i, now, {"sha256": f"study-{i}"}) for i, it in enumerate(items)]
    with sessions.begin() as s:
        claims = journal.claim_files(s, files, lease, now)
        outcomes = [
            journal.Outcome(
                c.row_id, c.token, Status.OK, now, score=_Score(float(z), float(base.probability(z)), base.threshold)
            )
            for c, z in zip(claims, logits)
        ]
        journal.commit_batch(
            s,
            outcomes,
            worker="study",
            model=predictor,
            wait_ms=0,
            model_ms=0,
            place=lambda o: None,
            now=now,
            audit_rate=audit_rate,
            draw=random.Random(seed).random,
        )
    eng.dispose()


def read_every_case(db: Path, out: Path, truth: dict[str, int]) -> int:
    """Sign in to xr-review as a reader and decide every case on the list with its film's true label."""
    from argon2 import PasswordHasher
    from fastapi.testclient import TestClient

    from xr.review import users
    from xr.review.app import create_app

    users.HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)  # one study account
    eng = make_engine(db)
    with session_factory(eng).begin() as s:
        users.add(s, READER, "reader", PASSWORD, by="study")
    client = TestClient(create_app(eng, out), base_url="http://localhost")
    nonce = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    client.post("/login", data={"username": READER, "password": PASSWORD, "csrf": nonce, "next": "/"})
    queued = [int(i) for i in dict.fromkeys(re.findall(r'href="/cases/(\d+)"', client.get("/").text))]
    with session_factory(eng)() as s:
        paths = {r.id: r.path for r in s.query(Result).filter(Result.id.in_(queued))}
    for case_id in queued:
        page = client.get(f"/cases/{case_id}").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        decision = "pneumonia" if truth[paths[case_id]] == 1 else "normal"
        r = client.post(f"/cases/{case_id}/review", data={"decision": decision, "csrf": csrf}, follow_redirects=False)
        assert r.status_code == 303, r.text
    assert 'href="/cases/' not in client.get("/").text  # the list is empty
    eng.dispose()
    return len(queued)


def metrics(y, probs, threshold: float) -> dict[str, float]:
    pred = probs >= threshold
    yy = y == 1
    return {
        "accuracy": float((pred == yy).mean()),
        "sensitivity": float(pred[yy].mean()),
        "specificity": float((~pred[~yy]).mean()),
        "ece": cal.ece(probs, y),
    }


def compare_calibrations(logits, labels, groups, flagged, base, repeats: int, audit_rate: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    differ = {"films": 0, "decisions_differ": 0, "threshold_gap": [], "audit_reviews": []}
    runs: dict[str, list[dict]] = {
        "model's own calibration": [],
        "site-calibrate (all labelled)": [],
        "site-calibrate --from-db (reviews)": [],
    }
    for r in range(repeats):
        for fit_idx, ev_idx in StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed + r).split(
            logits, labels, groups
        ):
            z, y, ze, ye = logits[fit_idx], labels[fit_idx], logits[ev_idx], labels[ev_idx]
            runs["model's own calibration"].append(metrics(ye, base.probability(ze), base.threshold))
            a, b, thr = fit_site(z, y, base, "f1")
            runs["site-calibrate (all labelled)"].append(metrics(ye, cal.sigmoid(a * ze + b), thr))
            pred_all = cal.sigmoid(a * ze + b) >= thr
            # the reviews this half would have had: every flagged film, an audit sample of the unflagged
            f = flagged[fit_idx]
            audit = ~f & (rng.random(len(f)) < audit_rate)
            read = f | audit
            w = np.where(f, 1.0, (~f).sum() / max(1, audit.sum()))[read]
            a2, b2, thr2 = fit_site(z[read], y[read], base, "f1", weights=w)
            runs["site-calibrate --from-db (reviews)"].append(metrics(ye, cal.sigmoid(a2 * ze + b2), thr2))
            # how far apart the two calibrations are, beyond their metrics
            differ["films"] += len(ye)
            differ["decisions_differ"] += int(((cal.sigmoid(a2 * ze + b2) >= thr2) != pred_all).sum())
            differ["threshold_gap"].append(abs(thr2 - thr))
            differ["audit_reviews"].append(int(audit.sum()))
    summary = {
        name: {
            k: {
                "mean": float(np.mean([m[k] for m in ms])),
                "p05": float(np.percentile([m[k] for m in ms], 5)),
                "p95": float(np.percentile([m[k] for m in ms], 95)),
            }
            for k in ms[0]
        }
        for name, ms in runs.items()
    }
    summary["agreement"] = {
        "held_out_decisions_that_differ": differ["decisions_differ"] / differ["films"],
        "mean_threshold_gap": float(np.mean(differ["threshold_gap"])),
        "mean_audit_reviews_per_half": float(np.mean(differ["audit_reviews"])),
    }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--audit-rate", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=34)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    db = args.out / "results.sqlite"
    if db.exists():
        db.unlink()
    items = _site_items(args.data)
    predictor = Predictor.from_checkpoint(args.model, device="cpu")
    logits = score_items(predictor, items, 16, 0)
    labels = np.array([it.label for it in items])
    groups = np.array([it.patient for it in items])
    base = predictor.calibration
    flagged = base.probability(logits) >= base.threshold
    build_db(db, items, logits, predictor, args.audit_rate, args.seed)
    n_read = read_every_case(db, args.out, {it.path: it.label for it in items})

    from xr.results.cli import main as xr_results

    buf = io.StringIO()
    xr_results(["--db", str(db), "performance", "--format", "json"], out=buf)
    perf = json.loads(buf.getvalue())
    yy = labels == 1
    truth = {
        "sensitivity": float(flagged[yy].mean()),
        "specificity": float((~flagged[~yy]).mean()),
        "ppv": float(yy[flagged].mean()),
        "npv": float((~yy[~flagged]).mean()),
    }
    result = {
        "films": len(items),
        "flagged": int(flagged.sum()),
        "cases_read": n_read,
        "performance": {m: perf[m] for m in truth},
        "reviews": perf["reviews"],
        "truth": truth,
        "covered": {m: perf[m]["low"] <= truth[m] <= perf[m]["high"] for m in truth},
        "calibration_cv": compare_calibrations(
            logits, labels, groups, flagged, base, args.repeats, args.audit_rate, args.seed
        ),
    }
    (args.out / "study.json").write_text(json.dumps(result, indent=2))
    print(f"{result['films']} films, {result['flagged']} flagged, {n_read} cases read ({perf['reviews']})")
    for m, t in truth.items():
        e = perf[m]
        print(
            f"{m:<12} estimate {e['estimate']:.3f} ({e['low']:.3f}-{e['high']:.3f})  true {t:.3f}  covered {result['covered'][m]}"
        )
    print(f"calibration, repeated 2-fold by patient ({args.repeats} repeats), on the held-out half:")
    for name, ms in result["calibration_cv"].items():
        if name == "agreement":
            print("  " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in ms.items()))
            continue
        cells = "  ".join(f"{k} {v['mean']:.3f} ({v['p05']:.3f}-{v['p95']:.3f})" for k, v in ms.items())
        print(f"  {name:<36} {cells}")


if __name__ == "__main__":
    main()
