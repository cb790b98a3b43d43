"""train/data.py: patient ids, discovery, and patient-grouped splits that never leak a patient."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xr.core.config import DataConfig
from xr.core.errors import XRError
from xr.train.data import Splits, XRDataset, discover, make_splits, patient_id


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "im-0115"),
        ("IM-0505-0001-0001.jpeg", "im-0505"),
        ("NORMAL2-IM-1183-0001.jpeg", "normal2-im-1183"),
        ("scan_42.png", "scan_42"),
    ],
)
def test_patient_id(name, patient):
    assert patient_id(name) == patient


def _synthetic_dataset(root: Path, fixtures: list[Path], n_copies: int = 3) -> None:
    """A Kaggle-layout train folder with many patients, several images each, made from fixtures."""
    for i in range(n_copies):
        for src in fixtures:
            cls = src.parent.name
            dst = root / "train" / cls
            dst.mkdir(parents=True, exist_ok=True)
            name = src.name
            if name.startswith("person"):
                pid, rest = name.split("_", 1)
                name = f"{pid}{i}_{rest}"  # new patient per copy; copies of one patient stay together
            else:
                name = name.replace("IM-", f"IM-{i}", 1)
            # Distinct bytes per copy: the splitter also groups byte-identical files.
            (dst / name).write_bytes(src.read_bytes() + bytes([i]))


def test_split_groups_patients_and_is_seeded(tmp_path, xray_paths):
    _synthetic_dataset(tmp_path, xray_paths)
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.2, min_val_images=50, seed=3)
    s = make_splits(tmp_path, cfg)
    parts = {"train": s.train, "val": s.val, "test": s.test}
    patients = {k: {it.patient for it in v} for k, v in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(v) for v in parts.values()) == 3 * len(xray_paths)
    for k in ("val", "test"):  # stratified: both classes present
        assert {it.label for it in parts[k]} == {0, 1}
    again = make_splits(tmp_path, cfg)
    assert [it.path for it in again.test] == [it.path for it in s.test]
    other = make_splits(tmp_path, DataConfig(val_fraction=0.2, test_fraction=0.2, min_val_images=50, seed=4))
    assert [it.path for it in other.test] != [it.path for it in s.test]


def test_patients_of_a_check_folder_are_pinned_to_test(tmp_path, xray_paths):
    """Full-resolution samples of training patients: their patients (and every image of them) go to test."""
    _synthetic_dataset(tmp_path / "data", xray_paths)
    checks = tmp_path / "fullres" / "PNEUMONIA"
    checks.mkdir(parents=True)
    train_files = sorted((tmp_path / "data" / "train").rglob("*.jpeg"))
    picked = [p for p in train_files if p.name.startswith("person")][:2] + [
        p for p in train_files if p.name.startswith("IM-")
    ][:1]
    for p in picked:
        shutil.copy(p, checks / p.name)
    pinned = {patient_id(p.name) for p in picked}
    for seed in range(4):  # whatever the draw
        cfg = DataConfig(
            val_fraction=0.2,
            test_fraction=0.2,
            min_val_images=50,
            seed=seed,
            test_patients_from=str(tmp_path / "fullres"),
        )
        s = make_splits(tmp_path / "data", cfg)
        assert pinned <= {it.patient for it in s.test}
        assert not pinned & {it.patient for it in s.train + s.val}
        assert sum(len(x) for x in (s.train, s.val, s.test)) == len(train_files)
        assert any("pinned to test" in n for n in s.notes)
    with pytest.raises(XRError, match="not found"):
        make_splits(tmp_path / "data", DataConfig(test_patients_from=str(tmp_path / "nowhere")))


def test_byte_identical_images_never_cross_splits(tmp_path, xray_paths):
    _synthetic_dataset(tmp_path, xray_paths)
    # The same bytes under two different patients' names.
    src = tmp_path / "train" / "PNEUMONIA" / sorted((tmp_path / "train" / "PNEUMONIA").iterdir())[0].name
    for k in range(8):
        shutil.copy(src, src.parent / f"person99{k}_bacteria_1.jpeg")
    s = make_splits(tmp_path, DataConfig(val_fraction=0.2, test_fraction=0.2, min_val_images=50, seed=0))
    where = {
        name
        for name, part in (("train", s.train), ("val", s.val), ("test", s.test))
        for it in part
        if Path(it.path).read_bytes() == src.read_bytes()
    }
    assert len(where) == 1


def test_given_splits_are_kept_and_small_val_is_merged(tmp_path, xray_paths):
    _synthetic_dataset(tmp_path, xray_paths)
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "test" / cls).mkdir(parents=True)
        (tmp_path / "val" / cls).mkdir(parents=True)
    shutil.copy(xray_paths[0], tmp_path / "test" / "NORMAL" / "IM-9999-0001.jpeg")
    shutil.copy(xray_paths[-1], tmp_path / "test" / "PNEUMONIA" / "person9999_virus_1.jpeg")
    shutil.copy(xray_paths[1], tmp_path / "val" / "NORMAL" / "IM-9998-0001.jpeg")
    s = make_splits(tmp_path, DataConfig(val_fraction=0.2, test_fraction=0.2, min_val_images=50))
    assert sorted(Path(it.path).name for it in s.test) == ["IM-9999-0001.jpeg", "person9999_virus_1.jpeg"]
    assert any("merged into train" in n for n in s.notes)
    assert any("IM-9998" in it.path for it in s.train + s.val)  # the 1-image val joined the pool


def test_splits_save_and_load(tmp_path, xray_paths):
    _synthetic_dataset(tmp_path / "data", xray_paths)
    s = make_splits(tmp_path / "data", DataConfig(val_fraction=0.2, test_fraction=0.2, min_val_images=50))
    s.save(tmp_path / "splits")
    loaded = Splits.load(tmp_path / "splits")
    assert loaded.train == s.train and loaded.val == s.val and loaded.test == s.test
    assert (tmp_path / "splits" / "summary.json").exists()


def test_discover_errors_name_the_folder(tmp_path):
    with pytest.raises(XRError, match="not found"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(XRError, match="no images"):
        discover(tmp_path / "empty")


def test_discover_bare_class_folder(fixtures_dir):
    found = discover(fixtures_dir / "chest_xray" / "train")
    assert set(found) == {"test"} and {it.label for it in found["test"]} == {0, 1}


def test_dataset_returns_tensor_and_label(xray_paths):
    from xr.core.preprocessing import Preset
    from xr.train.data import Item

    preset = Preset()
    ds = XRDataset([Item(str(xray_paths[0]), 0, "p")], preset, preset.eval_transform())
    x, y = ds[0]
    assert tuple(x.shape) == (3, 224, 224) and y == 0


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(path.as_posix().encode())  # distinct bytes per file: no byte-identical groups


def _kaggle_tree(root: Path, n: int = 60) -> None:
    """train/ with n PNEUMONIA (personI_*) and n NORMAL (IM-I-*) patients, one image each."""
    for i in range(1, n + 1):
        _touch(root / "train" / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg")
        _touch(root / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg")


def _patients(items) -> set[str]:
    return {it.patient for it in items}


def test_small_val_of_train_patients_never_leaks_into_test(tmp_path):
    """The given val is merged before test is carved, so its patients move as whole patients."""
    _kaggle_tree(tmp_path)
    for i in range(1, 9):  # val images of patients who also have train images
        _touch(tmp_path / "val" / "PNEUMONIA" / f"person{i}_bacteria_{i + 100}.jpeg")
        _touch(tmp_path / "val" / "NORMAL" / f"IM-{i:04d}-0002.jpeg")
    for seed in range(4):
        s = make_splits(tmp_path, DataConfig(seed=seed))
        assert any("merged into train" in n for n in s.notes)
        assert not _patients(s.train) & _patients(s.test)
        assert not _patients(s.train) & _patients(s.val)
        assert not _patients(s.val) & _patients(s.test)
        assert sum(len(x) for x in (s.train, s.val, s.test)) == 120 + 16


def test_kept_splits_share_no_patient_with_train(tmp_path):
    """Given val and test stay as they are; their patients' images leave train (and test's leave val)."""
    _kaggle_tree(tmp_path)
    for i in range(1, 6):
        _touch(tmp_path / "val" / "PNEUMONIA" / f"person{i}_virus_{i}.jpeg")  # persons 1-5: also in train
        _touch(tmp_path / "val" / "NORMAL" / f"IM-{i + 70:04d}-0001.jpeg")
    _touch(tmp_path / "val" / "NORMAL" / f"IM-{80:04d}-0001.jpeg")  # IM-0080: also in test
    _touch(tmp_path / "test" / "PNEUMONIA" / "person6_virus_6.jpeg")  # person6: also in train
    _touch(tmp_path / "test" / "NORMAL" / "IM-0080-0002.jpeg")
    found = discover(tmp_path)
    s = make_splits(tmp_path, DataConfig(min_val_images=5))
    assert s.test == found["test"]
    assert s.val == [it for it in found["val"] if it.patient != "im-0080"]
    assert not _patients(s.train) & (_patients(s.val) | _patients(s.test))
    assert len(s.train) == 120 - 6
    assert "1 patients (1 images) of the given val also in the given test: dropped from val" in s.notes
    assert "6 patients (6 images) of train also in the given val/test: dropped from train" in s.notes
    s.save(tmp_path / "splits")
    assert "6 patients (6 images)" in (tmp_path / "splits" / "summary.json").read_text()


def test_val_without_both_classes_is_merged_and_carved(tmp_path):
    """A one-class val has no AUROC, so no epoch could ever be selected on it."""
    _kaggle_tree(tmp_path)
    for i in range(100, 110):
        _touch(tmp_path / "val" / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg")
    s = make_splits(tmp_path, DataConfig(min_val_images=5))
    assert "given val has only one class: merged into train" in s.notes
    assert {it.label for it in s.val} == {0, 1}
    assert sum(len(x) for x in (s.train, s.val, s.test)) == 130


def test_split_files_name_images_from_any_working_directory(tmp_path, monkeypatch):
    _kaggle_tree(tmp_path / "data", n=20)
    monkeypatch.chdir(tmp_path)
    s = make_splits("data", DataConfig())  # a relative --data
    s.save(tmp_path / "run" / "splits")
    monkeypatch.chdir(tmp_path / "run")
    loaded = Splits.load("splits")
    for it in loaded.train + loaded.val + loaded.test:
        assert Path(it.path).is_absolute() and Path(it.path).is_file()
