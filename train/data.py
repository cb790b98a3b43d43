"""Labelled data: discovery in the Kaggle layout, patient-grouped splits, the torch Dataset and its seeded
loaders."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from xr.core.config import DataConfig
from xr.core.errors import XRError
from xr.core.intake import DEFAULT_LIMITS, DecodeLimits, is_image_name
from xr.core.model import CLASS_NAMES
from xr.core.preprocessing import Preset

SPLITS = ("train", "val", "test")

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.I),  # personNNN_bacteria_MMM
    re.compile(r"^(NORMAL2-IM-\d+)-", re.I),  # NORMAL2-IM-NNNN-MMMM
    re.compile(r"^(IM-\d+)-", re.I),  # IM-NNNN-MMMM
)


def patient_id(filename: str) -> str:
    """The patient a Kaggle chest-xray file belongs to; unknown naming falls back to the file stem."""
    name = Path(filename).name
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(name)
        if m:
            return m.group(1).lower()
    return Path(name).stem.lower()


@dataclass(frozen=True)
class Item:
    path: str
    label: int  # index into CLASS_NAMES: 0 NORMAL, 1 PNEUMONIA
    patient: str


def list_class_folder(root: Path) -> list[Item]:
    """Images under root/NORMAL and root/PNEUMONIA (sorted, so runs are reproducible)."""
    items = []
    for label, cls in enumerate(CLASS_NAMES):
        folder = root / cls
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.is_file() and is_image_name(p.name) and not p.name.startswith("."):
                items.append(Item(str(p), label, patient_id(p.name)))
    return items


def discover(root: str | Path) -> dict[str, list[Item]]:
    """{split: items} for a Kaggle-layout root, or {"test": items} for a bare NORMAL/PNEUMONIA folder.

    Item paths are absolute: the split files must name the same images from any working directory."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise XRError(f"data folder not found: {root}")
    if any((root / cls).is_dir() for cls in CLASS_NAMES):
        found = {"test": list_class_folder(root)}
    else:
        found = {s: list_class_folder(root / s) for s in SPLITS if (root / s).is_dir()}
    if not any(found.values()):
        raise XRError(
            f"{root}: no images found; expected {root}/train/NORMAL, {root}/train/PNEUMONIA, ... "
            f"(Kaggle layout) or {root}/NORMAL and {root}/PNEUMONIA"
        )
    return found


def _content_groups(items: list[Item]) -> list[str]:
    """Patient groups, merged where two files have identical bytes (the dataset has a few exact
    duplicates), so a duplicate can never sit on both sides of a split."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_by_hash: dict[str, str] = {}
    for it in items:
        digest = hashlib.sha256(Path(it.path).read_bytes()).hexdigest()
        find(it.patient)
        if digest in first_by_hash:
            parent[find(it.patient)] = find(first_by_hash[digest])
        else:
            first_by_hash[digest] = it.patient
    return [find(it.patient) for it in items]


def _carve(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split off about ``fraction`` of items, grouped by patient and stratified by label."""
    n_splits = max(2, round(1.0 / fraction))
    groups = _content_groups(items)
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise XRError(f"only {n_groups} patients: too few to carve a {fraction:.0%} split by patient")
    labels = np.array([it.label for it in items])
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep_idx, out_idx = next(sgkf.split(np.zeros(len(items)), labels, groups))
    return [items[i] for i in keep_idx], [items[i] for i in out_idx]


@dataclass
class Splits:
    train: list[Item]
    val: list[Item]
    test: list[Item]
    notes: list[str]

    def summary(self) -> dict:
        def count(items: list[Item]) -> dict:
            labels = [it.label for it in items]
            return {
                "images": len(items),
                "patients": len({it.patient for it in items}),
                **{cls: labels.count(i) for i, cls in enumerate(CLASS_NAMES)},
            }

        return {"train": count(self.train), "val": count(self.val), "test": count(self.test), "notes": self.notes}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in SPLITS:
            with open(folder / f"{name}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label", "class", "patient"])
                for it in getattr(self, name):
                    w.writerow([it.path, it.label, CLASS_NAMES[it.label], it.patient])
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> Splits:
        folder = Path(folder)
        parts = {}
        for name in SPLITS:
            path = folder / f"{name}.csv"
            if not path.exists():
                raise XRError(f"split file missing: {path} (run `xr-train split` first)")
            with open(path, newline="") as f:
                parts[name] = [Item(r["path"], int(r["label"]), r["patient"]) for r in csv.DictReader(f)]
        notes = (
            json.loads((folder / "summary.json").read_text()).get("notes", [])
            if (folder / "summary.json").exists()
            else []
        )
        return cls(parts["train"], parts["val"], parts["test"], notes)


def patients_in(folder: str | Path) -> set[str]:
    """Patients of the image files anywhere under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise XRError(f"data.test_patients_from: folder not found: {folder}")
    found = {patient_id(p.name) for p in folder.rglob("*") if p.is_file() and is_image_name(p.name)}
    if not found:
        raise XRError(f"data.test_patients_from: no images under {folder}")
    return found


def _pin(items: list[Item], patients: set[str]) -> tuple[list[Item], list[Item]]:
    """(rest, pinned): the items of ``patients``, with every file identical to one of theirs."""
    groups = _content_groups(items)
    pinned_groups = {g for it, g in zip(items, groups) if it.patient in patients}
    rest = [it for it, g in zip(items, groups) if g not in pinned_groups]
    pinned = [it for it, g in zip(items, groups) if g in pinned_groups]
    return rest, pinned


def _drop_shared(items: list[Item], kept: list[Item]) -> tuple[list[Item], list[Item]]:
    """(rest, dropped): the items whose patient, or a file byte-identical to one of theirs, is in ``kept``."""
    groups = _content_groups(items + kept)
    kept_groups = set(groups[len(items) :])
    rest = [it for it, g in zip(items, groups[: len(items)]) if g not in kept_groups]
    dropped = [it for it, g in zip(items, groups[: len(items)]) if g in kept_groups]
    return rest, dropped


def _count(items: list[Item]) -> str:
    return f"{len({it.patient for it in items})} patients ({len(items)} images)"


def make_splits(root: str | Path, cfg: DataConfig) -> Splits:
    """Keep the given val/test splits when usable; carve the missing ones out of train by patient.

    A given split is kept as it is (so results compare with others' on it); a patient it shares with a
    split built here is dropped from train (or from val, where val and test share one), never moved.
    ``cfg.test_patients_from`` names a folder of images (the full-resolution samples) whose patients go
    to the carved test split whatever the draw, so checks on those images run on patients the model
    never trained on.
    """
    found = discover(root)
    train = list(found.get("train", []))
    val = list(found.get("val", []))
    test = list(found.get("test", []))
    notes = []
    if not train:
        raise XRError(f"{root}: no training images under {root}/train/NORMAL and {root}/train/PNEUMONIA")
    if val and test:
        val, dropped = _drop_shared(val, test)
        if dropped:
            notes.append(f"{_count(dropped)} of the given val also in the given test: dropped from val")
    # Decided before test is carved, so an unusable val's patients join the pool test is carved from
    # as whole patients: merged after, a patient could sit in both train and test.
    val_classes = len({it.label for it in val})
    if val and (len(val) < cfg.min_val_images or val_classes < 2):
        why = f"{len(val)} images (< {cfg.min_val_images})" if len(val) < cfg.min_val_images else "only one class"
        notes.append(f"given val has {why}: merged into train")
        train, val = train + val, []
    if val or test:
        train, dropped = _drop_shared(train, val + test)
        if dropped:
            notes.append(f"{_count(dropped)} of train also in the given val/test: dropped from train")
    test_carved = not test
    if test_carved:
        pinned: list[Item] = []
        if cfg.test_patients_from:
            train, pinned = _pin(train, patients_in(cfg.test_patients_from))
        train, test = _carve(train, cfg.test_fraction, cfg.seed)
        notes.append(f"test carved from train by patient ({cfg.test_fraction:.0%})")
        if pinned:
            test = test + pinned
            n_pat = len({it.patient for it in pinned})
            notes.append(f"{len(pinned)} images of {n_pat} patients from {cfg.test_patients_from} pinned to test")
    elif cfg.test_patients_from:
        notes.append("data.test_patients_from ignored: the dataset has its own test split")
    if not val:
        # Carve from what is left so val is the same share of the whole as configured.
        share = cfg.val_fraction / (1.0 - (cfg.test_fraction if test_carved else 0.0))
        train, val = _carve(train, min(share, 0.5), cfg.seed + 1)
        notes.append(f"val carved from train by patient ({cfg.val_fraction:.0%})")
    return Splits(train, val, test, notes)


class XRDataset(Dataset):
    """(tensor, label) pairs through the shared :class:`Preset` decode and a transform.

    ``limits``: the decode limits; training has no operator config, so config.yaml's defaults."""

    def __init__(self, items: list[Item], preset: Preset, transform: Callable, limits: DecodeLimits = DEFAULT_LIMITS):
        self.items = items
        self.preset = preset
        self.transform = transform
        self.limits = limits

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        it = self.items[i]
        return self.transform(self.preset.load(it.path, self.limits)), it.label

    def labels(self) -> list[int]:
        return [it.label for it in self.items]


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    generator: torch.Generator,
    balanced: bool = False,
    shuffle: bool = False,
) -> DataLoader:
    sampler = None
    if balanced:
        labels = torch.as_tensor(dataset.labels() if hasattr(dataset, "labels") else dataset.tensors[1])
        counts = torch.bincount(labels.long(), minlength=2).clamp(min=1).double()
        # Each class drawn equally often: a batch is about half NORMAL, half PNEUMONIA.
        sampler = WeightedRandomSampler(
            (1.0 / counts)[labels.long()], len(labels), replacement=True, generator=generator
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle and sampler is None,
        generator=generator if sampler is None else None,
        num_workers=num_workers,
        worker_init_fn=_seed_worker,
        # A loader that draws (order, augmentations) starts its workers afresh each epoch, seeded from the
        # generator: a resumed run then draws what the uninterrupted one would have.
        persistent_workers=num_workers > 0 and not (balanced or shuffle),
        pin_memory=False,
    )
