"""``checkpoint_last.pt``: what ``xr-train train --resume`` (or ``all --resume``) needs to carry on after
the epoch it was written at, as if the run had never stopped.

Besides the keys every checkpoint has (``model``: the evaluated weights with the prior correction, as
in the best checkpoint; ``meta``), it holds ``epoch``, ``phase`` (``head`` or ``full``), ``config`` (the
recipe), ``optimizer``, ``scheduler`` and ``state``: the trained weights and the EMA's as they are
(without the correction), the best val AUROC so far, the epochs without a gain, every epoch's log row
and the random state of Python, NumPy, torch and the training loader's generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xr.core.config import Recipe
from xr.core.errors import XRError


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state: the classifier bias is shifted in place while a checkpoint is saved."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "loader": generator.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state:
        torch.mps.set_rng_state(state["mps"])


@dataclass
class Saved:
    """A run's state after its last finished epoch, read back from checkpoint_last.pt."""

    epoch: int
    phase: str
    meta: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    state: dict[str, Any]


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [
        f"{section}.{key} {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    ]


def load(path: Path, cfg: Recipe) -> Saved:
    """The state in ``path``; an error naming the cause when it is missing, foreign, or was trained
    with another recipe (a resumed run must end as the interrupted one would have)."""
    if not path.is_file():
        raise XRError(f"nothing to resume: {path} not found (start the run without --resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken or foreign file
        raise XRError(f"{path}: cannot resume from it ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "state" not in ckpt:
        raise XRError(f"{path}: holds no training state to resume from (written by an older xr-train)")
    changed = _differences(ckpt["config"], cfg.to_dict())
    if changed:
        raise XRError(
            f"{path} was trained with another recipe ({'; '.join(changed)}): resume with the run's own "
            "recipe.yaml and flags"
        )
    return Saved(ckpt["epoch"], ckpt["phase"], ckpt["meta"], ckpt["optimizer"], ckpt["scheduler"], ckpt["state"])
