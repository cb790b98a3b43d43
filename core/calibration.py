"""The calibration file, ``calibration_threshold.json``: how a model's logit becomes a calibrated
probability and a decision, and which model it belongs to.

    p = sigmoid(logit / T + shift),  flagged = p >= threshold

``xr-train calibrate`` writes one beside each checkpoint (``kind: validation``: temperature only,
fitted on the carved validation split); ``xr-train site-calibrate`` writes one for a site (``kind:
site``: logistic recalibration, a scale and a shift, fitted on the site's own films). A file that names
its model (``model_sha256``) refuses any other. ``reference`` is the distribution of calibrated scores the
calibration was fitted on: what a stream scored with it should look like (the drift watch compares them).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xr.core.errors import CheckpointError

CALIBRATION_FILE = "calibration_threshold.json"
REFERENCE_BINS = 10  # equal-width bins of calibrated probability in a reference histogram


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    threshold: float = 0.5
    shift: float = 0.0
    kind: str = "validation"  # validation | site | none (no file: T = 1, threshold 0.5)
    model_sha256: str | None = None  # the checkpoint it was fitted for; None: any (files made before it was recorded)
    reference: dict[str, Any] | None = None
    extra: dict[str, Any] | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)  # the file it was read from

    @property
    def calibrated(self) -> bool:
        return self.kind != "none"

    @property
    def id(self) -> str:
        """``<kind>-<12 hex>`` from the numbers that decide a score, so the same calibration has one id."""
        key = json.dumps(
            [self.kind, round(self.temperature, 9), round(self.shift, 9), round(self.threshold, 9), self.model_sha256],
            separators=(",", ":"),
        )
        return f"{self.kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def probability(self, logits):
        """Calibrated P(PNEUMONIA) of a number, numpy array or torch tensor of logits."""
        z = logits / self.temperature + self.shift
        if hasattr(z, "sigmoid"):
            return z.sigmoid()
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))

    def check_model(self, model_sha256: str, path: str | Path | None = None) -> None:
        if self.model_sha256 is not None and self.model_sha256 != model_sha256:
            raise CheckpointError(
                f"{path or 'calibration'} was fitted for model {self.model_sha256[:12]}, not this one "
                f"({model_sha256[:12]}): fit one for it with `xr-train site-calibrate --model CKPT`"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra or {})
        d.update(
            {
                "kind": self.kind,
                "T": self.temperature,
                "shift": self.shift,
                "threshold": self.threshold,
                "model_sha256": self.model_sha256,
                "reference": self.reference,
            }
        )
        return d

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, path: str | Path, model_sha256: str | None = None) -> Calibration:
        """Load ``path``; with ``model_sha256``, refuse a file fitted for another checkpoint."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"calibration file not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        try:
            t, thr, shift = float(data["T"]), float(data["threshold"]), float(data.get("shift", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{path}: needs numeric 'T' and 'threshold'") from None
        if not (math.isfinite(t) and t > 0):
            raise CheckpointError(f"{path}: T must be a positive number, got {data['T']!r}")
        if not 0.0 < thr < 1.0:
            raise CheckpointError(f"{path}: threshold must be between 0 and 1, got {data['threshold']!r}")
        if not math.isfinite(shift):
            raise CheckpointError(f"{path}: shift must be a finite number, got {data['shift']!r}")
        kind = data.get("kind", "validation")
        if kind not in ("validation", "site"):
            raise CheckpointError(f"{path}: kind must be 'validation' or 'site', got {kind!r}")
        cal = cls(
            temperature=t,
            threshold=thr,
            shift=shift,
            kind=kind,
            model_sha256=data.get("model_sha256"),
            reference=data.get("reference"),
            extra=data,
            source=str(path.resolve()),
        )
        if model_sha256 is not None:
            cal.check_model(model_sha256, path)
        return cal


UNCALIBRATED = Calibration(kind="none", extra={"calibrated": False})


def reference(probs, threshold: float, bins: int = REFERENCE_BINS) -> dict[str, Any]:
    """What a stream scored with this calibration should look like: its flagged rate and the histogram
    of calibrated probabilities over ``bins`` equal-width bins, from the films it was fitted on."""
    p = np.asarray(probs, dtype=np.float64)
    counts, _ = np.histogram(p, bins=bins, range=(0.0, 1.0))
    return {
        "n": int(p.size),
        "flagged_rate": float((p >= threshold).mean()) if p.size else None,
        "bins": bins,
        "fractions": [float(c) / max(1, p.size) for c in counts],
    }
