"""``xr-train site-calibrate --from-db``: the site calibration fitted from the readers' reviews in the
results database instead of a labelled folder (train/site.py has the fit, the report and the binding).

The reviewed flagged films and audit cases of a window are the labelled sample: each film's stored logit
(scored by the model being calibrated: rows of other models are left out), the reader's decision as its
label, and its weight, the films of the stream it stands for (results/reviewed.py). With every film of the
window reviewed each weight is 1 and the fit is the folder form's on the same films.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from xr.core.errors import XRError
from xr.core.predict import Predictor
from xr.results.engine import open_existing, session_factory, shown_url
from xr.results.reviewed import films, weighted_cases
from xr.train.data import patient_id
from xr.train.site import REPORT_MD, Sample, fit_and_report

MIN_PER_CLASS = 20  # reviews of each class below which the report says not to trust the fit
MIN_TO_FIT = 4  # the cross-validation's floor: fewer refuse to fit at all


def site_calibrate_from_db(
    model: Path,
    db: str | Path,
    out: Path,
    *,
    since: dt.datetime | None = None,
    device: str = "auto",
    **fit_kw: Any,
) -> dict[str, Any]:
    """Fit from the window's reviews, write ``out/calibration_threshold.json`` and the report (``warning``
    set where too few reviews of a class make it untrustworthy); return the report."""
    predictor = Predictor.from_checkpoint(model, device=device)  # its calibration and identity; nothing is scored
    engine = open_existing(db, immediate=False)
    try:
        with session_factory(engine)() as s:
            window = films(s, since)
    finally:
        engine.dispose()
    # the Kaggle-style file name names the patient where a PNG/JPEG has no DICOM PatientID
    cases = weighted_cases(window, predictor.model_id, group=lambda f: f.patient_id or patient_id(f.filename))
    n_pos = int(cases.labels.sum())
    n_neg = int(len(cases.labels) - n_pos)
    since_text = since.isoformat(timespec="seconds") + "Z" if since else None
    where = shown_url(db) + (f" since {since_text}" if since_text else "")
    c = cases.counts
    if c.audit_reviewed == 0 and c.unflagged:
        raise XRError(
            f"{where}: no audit case reviewed among {c.unflagged} unflagged films: the reviews say nothing about "
            "them (set review.audit_rate and read the audit cases in xr-review)"
        )
    if min(n_pos, n_neg) < MIN_TO_FIT:
        raise XRError(
            f"{where}: {n_pos} pneumonia and {n_neg} normal reviews of films scored by model {predictor.model_id}: "
            f"at least {MIN_TO_FIT} of each are needed to fit"
        )
    warning = None
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        warning = (
            f"only {n_pos} pneumonia and {n_neg} normal reviews (fewer than {MIN_PER_CLASS} of a class): "
            "too few to trust this calibration; keep the current one until more are read"
        )
    extra = {
        "from_db": {
            "database": shown_url(db),
            "since": since_text,
            "films": c.flagged + c.unflagged,
            "flagged": c.flagged,
            "unflagged": c.unflagged,
            "flagged_reviewed": c.flagged_reviewed,
            "audit_reviewed": c.audit_reviewed,
            "reviews_pneumonia": n_pos,
            "reviews_normal": n_neg,
            "weight_flagged": float(c.flagged / c.flagged_reviewed) if c.flagged_reviewed else None,
            "weight_audit": float(c.unflagged / c.audit_reviewed) if c.audit_reviewed else None,
        },
        "warning": warning,
    }
    sample = Sample(
        [f"result:{i}" for i in cases.ids],
        cases.logits,
        cases.labels,
        cases.groups,
        cases.weights,
        f"reviews in {where}",
        extra,
    )
    report = fit_and_report(predictor, model, sample, out, **fit_kw)
    if warning:
        md = out / REPORT_MD
        md.write_text(md.read_text().replace("\n\n", f"\n\n**Warning: {warning}.**\n\n", 1))
    return report
