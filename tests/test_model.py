"""Model factory, offline ImageNet weights and the checkpoint format (core/model.py)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import xr.core.model as xr_model
from xr.core.config import load_recipe
from xr.core.errors import CheckpointError
from xr.core.model import (
    CLASS_NAMES,
    IMAGENET_STATS,
    build_model,
    checkpoint_meta,
    create_model,
    lite0_imagenet_state_dict,
    load_checkpoint,
    load_imagenet_weights,
    save_checkpoint,
)
from xr.core.preprocessing import Preset

ARCH = "efficientnet_lite0"


# -- ImageNet weights ------------------------------------------------------------------------------
def test_lite0_imagenet_weights_map_every_tensor():
    model = build_model(ARCH, num_classes=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = [k for k in model.state_dict() if not k.startswith("classifier.")]
    report = load_imagenet_weights(model, ARCH)
    assert report["mapped"] == len(backbone) == 294
    assert report["missing"] == [] and report["unexpected"] == []
    # The weights really changed (a no-op load would leave the random init).
    assert not torch.equal(model.conv_stem.weight, before["conv_stem.weight"])
    assert not torch.equal(model.blocks[3][1].conv_dw.weight, before["blocks.3.1.conv_dw.weight"])
    # The classifier stays new (single logit).
    assert model.classifier.weight.shape == (1, 1280)
    # The packaged file: all 296 tensors (backbone + 1000-class head) map onto the model exactly.
    full = lite0_imagenet_state_dict()
    assert len(full) == 296
    target = build_model(ARCH, num_classes=1000).state_dict()
    assert set(full) == set(target)
    assert all(full[k].shape == target[k].shape for k in full)


@pytest.fixture(scope="module")
def imagenet_lite0():
    model = build_model(ARCH, num_classes=1000)
    model.load_state_dict(lite0_imagenet_state_dict(), strict=True)
    return model.eval()


@pytest.mark.parametrize(("photo", "expected"), [("china.jpg", {"palace", "bell cote"}), ("flower.jpg", {"daisy"})])
def test_lite0_recognises_real_photos(imagenet_lite0, photo, expected):
    """Proof the key mapping (and TF 'SAME' padding) is right: a real photo gets a sensible class."""
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo

    path = next(f for f in load_sample_images().filenames if f.endswith(photo))
    mean, std = IMAGENET_STATS[ARCH]
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    with Image.open(path) as im:
        x = tf(im.convert("RGB"))[None]
    with torch.no_grad():
        probs = imagenet_lite0(x).softmax(-1)[0]
    info = ImageNetInfo()
    top3 = [info.index_to_description(int(i)).split(",")[0].strip() for i in probs.topk(3).indices]
    assert expected & set(top3), f"{photo}: top-3 {top3}"
    assert probs.max() > 0.15  # a confident answer, not a flat distribution


def test_efficientnet_b0_without_offline_weights_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.raises(CheckpointError) as info:
        create_model("efficientnet_b0", pretrained=True)
    msg = str(info.value)
    assert "efficientnet_b0" in msg and "weights_path" in msg and "efficientnet_lite0" in msg
    # pretrained=False needs no file.
    assert create_model("efficientnet_b0", pretrained=False).classifier.out_features == 1


def _torchvision_b0_state():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.efficientnet_b0(weights=None).state_dict()


def test_efficientnet_b0_from_torchvision_file(tmp_path, monkeypatch):
    """config.yaml's model.weights_path takes torchvision's layout; so does torch's hub cache."""
    state = _torchvision_b0_state()
    path = tmp_path / "b0.pth"
    torch.save(state, path)
    model = create_model("efficientnet_b0", pretrained=True, weights_path=str(path))
    assert torch.equal(model.conv_stem.weight, state["features.0.0.weight"])
    assert torch.equal(model.conv_head.weight, state["features.8.0.weight"])
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(state, hub / "checkpoints" / "efficientnet_b0_rwightman-7f5810bc.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    cached = create_model("efficientnet_b0", pretrained=True)
    assert torch.equal(cached.conv_stem.weight, state["features.0.0.weight"])


def test_unknown_arch_is_rejected():
    with pytest.raises(CheckpointError, match="resnet50"):
        build_model("resnet50")


# -- checkpoint ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random-init Lite0 (no ImageNet load needed) saved with full metadata and training state."""
    torch.manual_seed(1)
    model = build_model(ARCH, num_classes=1).eval()
    cfg = load_recipe()
    preset = Preset.from_config(cfg.preprocess)
    meta = checkpoint_meta(ARCH, preset, cfg.to_dict(), {"train": {"images": 27}})
    path = tmp_path_factory.mktemp("ckpt") / "sub" / "model.pt"
    save_checkpoint(path, model, meta, epoch=3, optimizer={"lr": 0.1})
    return path, model, meta, cfg, preset


def test_checkpoint_round_trip_preserves_outputs_and_meta(saved):
    path, model, meta, cfg, preset = saved
    loaded, got = load_checkpoint(path)
    assert not loaded.training
    torch.manual_seed(2)
    x = torch.randn(2, 3, 96, 96)  # small: same weights path, faster on a shared CPU
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert got["arch"] == ARCH
    assert got["img_size"] == 224
    assert got["normalize"] == {"mean": list(preset.mean), "std": list(preset.std)}
    assert got["class_names"] == list(CLASS_NAMES) == ["NORMAL", "PNEUMONIA"]
    assert Preset.from_dict(got["preprocess"]) == preset
    prov = got["provenance"]
    assert prov["config"] == cfg.to_dict()
    assert prov["data"] == {"train": {"images": 27}}
    # the commit of the code that trained it, where that code is a checkout (none from a wheel, and no error)
    assert prov["git_commit"] == xr_model.git_commit()
    if (Path(xr_model.__file__).resolve().parents[1] / ".git").exists():  # an editable install: tests run here
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"] or ""), prov["git_commit"]
    created = dt.datetime.fromisoformat(prov["created"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 24 * 3600
    assert isinstance(prov["torch"], str) and prov["torch"] == str(torch.__version__)
    # Training state travels in the file too (resume), and no temp file is left behind.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 3 and raw["optimizer"] == {"lr": 0.1}
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def _tampered(saved_path: Path, tmp_path: Path, name: str, mutate) -> Path:
    """A copy of a saved checkpoint with ``mutate(raw_dict)`` applied, written as ``tmp_path / name``."""
    raw = torch.load(saved_path, map_location="cpu", weights_only=True)
    mutate(raw)
    out = tmp_path / name
    torch.save(raw, out)
    return out


def test_checkpoint_whose_weights_do_not_fit_its_arch(saved, tmp_path):
    bad = _tampered(saved[0], tmp_path, "mislabelled.pt", lambda raw: raw["meta"].update(arch="efficientnet_b0"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    msg = str(info.value)
    assert "mislabelled.pt" in msg and "efficientnet_b0" in msg and "do not match" in msg
    assert "missing" in msg and "unexpected" in msg


def test_checkpoint_with_a_missing_tensor(saved, tmp_path):
    bad = _tampered(saved[0], tmp_path, "partial.pt", lambda raw: raw["model"].pop("conv_head.weight"))
    with pytest.raises(CheckpointError, match="conv_head.weight"):
        load_checkpoint(bad)


def test_garbage_and_foreign_files_raise_checkpoint_error(saved, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match=r"garbage.pt: not an xr-triage checkpoint \(not a PyTorch file\)"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    bare = tmp_path / "bare_state_dict.pt"
    torch.save({"conv_stem.weight": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match="not an xr-triage checkpoint"):
        load_checkpoint(bare)
    no_preset = _tampered(saved[0], tmp_path, "no_preset.pt", lambda raw: raw["meta"].pop("preprocess"))
    with pytest.raises(CheckpointError, match="preprocess"):
        load_checkpoint(no_preset)


def test_foreign_file_error_is_one_short_line_without_weights_only_advice(tmp_path):
    """torch's weights_only failure is a page that advises weights_only=False (which runs code from the
    file): the user sees the file, "not an xr-triage checkpoint" and a short reason instead."""
    import pickle

    import numpy as np

    png = tmp_path / "scan.png"
    Image.new("L", (4, 4)).save(png)
    foreign_pickle = tmp_path / "foreign_pickle.pt"
    foreign_pickle.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    numpy_inside = tmp_path / "numpy_inside.pt"
    torch.save({"model": np.zeros(3), "meta": {}}, numpy_inside)
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {}, "meta": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = [
        (png, "it is a PNG image"),
        (foreign_pickle, "unreadable content"),
        (numpy_inside, "numpy"),
        (truncated, "unreadable content"),
        (empty, "empty file"),
    ]
    for path, reason in cases:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: not an xr-triage checkpoint (") and reason in msg, msg
        assert "weights_only" not in msg and "\n" not in msg and len(msg) < 300 + len(str(path)), msg


def test_training_model_is_single_logit_on_imagenet_backbone():
    torch.manual_seed(0)
    model = create_model(ARCH, pretrained=True).eval()
    ref = lite0_imagenet_state_dict()
    assert torch.equal(model.state_dict()["conv_stem.weight"], ref["conv_stem.weight"])
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1)
    assert out.item() == 0.0  # the new head starts at zero: p = 0.5 before any training
