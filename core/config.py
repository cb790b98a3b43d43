"""config.yaml -> one frozen dataclass per section.

Loaded once with ``yaml.safe_load``; unknown keys and wrong types are rejected with the key named,
so a typo never silently falls back to a default. Command-line flags only override
(``load_config(path, overrides={"train.epochs": 3})``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from xr.core.errors import ConfigError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"


@dataclass(frozen=True)
class PreprocessConfig:
    img_size: int = 224
    resize_ratio: float = 1.15
    resize_mode: Literal["squash", "shorter_side"] = "squash"
    render_size: int | None = 224
    render_quality: int = 75
    render_filter: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"] = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_pixels: int = 80_000_000


@dataclass(frozen=True)
class AugmentConfig:
    rrc_scale: tuple[float, float] = (0.9, 1.0)
    hflip_p: float = 0.5
    rotation_deg: float = 5.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    jpeg_p: float = 0.0
    jpeg_quality: tuple[int, int] = (50, 95)
    downscale_p: float = 0.0
    downscale_range: tuple[float, float] = (0.5, 1.0)
    sharpen_p: float = 0.0
    sharpen_range: tuple[float, float] = (1.0, 2.5)


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["efficientnet_lite0", "efficientnet_lite0_aa", "efficientnet_b0"] = "efficientnet_lite0"
    pretrained: bool = True
    weights_path: str | None = None
    drop_rate: float = 0.2


@dataclass(frozen=True)
class DataConfig:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    min_val_images: int = 200
    seed: int = 42
    num_workers: int = 1
    test_patients_from: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    head_epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-4
    backbone_lr_mult: float = 1.0
    weight_decay: float = 1e-4
    pos_weight: bool = False
    weighted_sampler: bool = True
    freeze_stages: int = 2
    ema_decay: float = 0.995
    label_smoothing: float = 0.0
    consistency_weight: float = 0.0
    consistency_jpeg_quality: tuple[int, int] = (50, 75)
    consistency_view: Literal["jpeg", "rerender", "both"] = "jpeg"
    consistency_space: Literal["logit", "probability"] = "logit"
    plateau_patience: int = 1
    plateau_factor: float = 0.3
    early_stopping_patience: int = 5
    max_steps_per_epoch: int | None = None
    channels_last: bool = True
    amp: Literal["auto", "bf16", "off"] = "auto"
    seed: int = 42


@dataclass(frozen=True)
class CalibrationConfig:
    objective: Literal["f1", "youden", "cost"] = "f1"
    fn_cost: float = 5.0
    fp_cost: float = 1.0
    threshold_grid: int = 999
    ece_bins: int = 15


@dataclass(frozen=True)
class DaemonConfig:
    watch: str = "inbox"
    output: str = "output"
    db: str | None = None
    model: str = "models/xr_mvp_best.pt"
    device: str = "auto"
    batch_size: int = 0
    max_wait_ms: int = 50
    stable_ms: int = 500
    rescan_s: float = 5.0
    poll: bool = False
    decode_workers: int = 0
    torch_threads: int = 0
    cuda_graphs: bool = True
    cpu_trace: bool = True
    on_success: Literal["move", "leave"] = "move"
    on_error: Literal["move", "leave"] = "move"
    dedupe: bool = True
    max_file_mb: float = 512.0
    log_format: Literal["json", "console"] = "json"


@dataclass(frozen=True)
class OutputConfig:
    csv_rotation: Literal["daily", "rows"] = "daily"
    csv_max_rows: int = 10_000


@dataclass(frozen=True)
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, overrides: dict[str, Any]) -> "Config":
        """A copy with dotted keys overridden (``{"train.epochs": 2}``), each value type-checked."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            if section not in data or key not in data[section]:
                raise ConfigError(f"unknown config key {dotted!r}")
            data[section][key] = value
        return config_from_dict(data, source="overrides")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it in the dataclass's own type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: None is not allowed")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module, not user input


def _section_from_dict(cls: type, data: Any, name: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {name}.{unknown[0]!s}; known keys: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None, source: str = "config") -> Config:
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{source}: unknown config section {unknown[0]!r}; known: {', '.join(hints)}")
    sections = {name: _section_from_dict(hints[name], data.get(name), name) for name in hints}
    cfg = Config(**sections)
    _validate(cfg)
    return cfg


# Allowed ranges of numeric keys in interval notation: "[" and "]" include the bound, "(" and ")" exclude it.
# A pair must also hold low <= high. null (off) is always allowed. Checks that need a hint stay in _validate.
_RANGES = {
    "preprocess.max_pixels": "[1, inf)",
    "augment.rotation_deg": "[0, 180]",
    "augment.blur_sigma": "(0, inf)",
    "augment.jpeg_quality": "[1, 100]",
    "model.drop_rate": "[0, 1)",
    "data.min_val_images": "[0, inf)",
    "data.num_workers": "[0, inf)",
    "train.epochs": "[1, inf)",
    "train.head_epochs": "[0, inf)",
    "train.lr": "(0, inf)",
    "train.backbone_lr_mult": "[0, inf)",
    "train.weight_decay": "[0, inf)",
    "train.freeze_stages": "[0, inf)",
    "train.ema_decay": "[0, 1)",
    "train.label_smoothing": "[0, 1)",
    "train.plateau_patience": "[0, inf)",
    "train.plateau_factor": "(0, 1)",
    "train.early_stopping_patience": "[1, inf)",
    "train.max_steps_per_epoch": "[1, inf)",
    "calibration.fn_cost": "(0, inf)",
    "calibration.fp_cost": "(0, inf)",
    "calibration.threshold_grid": "[1, inf)",
    "calibration.ece_bins": "[1, inf)",
    "daemon.max_wait_ms": "[0, inf)",
    "daemon.stable_ms": "[0, inf)",
    "daemon.rescan_s": "(0, inf]",
    "daemon.max_file_mb": "(0, inf)",
    "output.csv_max_rows": "[1, inf)",
}


def _in_range(value: float, interval: str) -> bool:
    """``value`` in ``interval`` ("[0, 1)"); False for NaN."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _check_ranges(cfg: Config) -> None:
    for dotted, interval in _RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        values = list(value) if isinstance(value, tuple) else [value]
        if not all(_in_range(v, interval) for v in values) or values != sorted(values):
            pair = "low <= high, each " if isinstance(value, tuple) else ""
            raise ConfigError(f"{dotted}: {_plain(value)} is out of range; must be {pair}in {interval}")


def _validate(cfg: Config) -> None:
    _check_ranges(cfg)
    p = cfg.preprocess
    if p.img_size < 16:
        raise ConfigError(f"preprocess.img_size: {p.img_size} is too small (minimum 16)")
    if p.resize_ratio < 1.0:
        raise ConfigError(f"preprocess.resize_ratio: {p.resize_ratio} must be >= 1.0")
    if p.render_size is not None and p.render_size < 16:
        raise ConfigError(f"preprocess.render_size: {p.render_size} is too small (minimum 16, or null for off)")
    if not 1 <= p.render_quality <= 100:
        raise ConfigError(f"preprocess.render_quality: {p.render_quality} must be a JPEG quality from 1 to 100")
    lo, hi = cfg.augment.rrc_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"augment.rrc_scale: {[lo, hi]} must satisfy 0 < low <= high <= 1")
    for name in ("hflip_p", "blur_p", "jpeg_p", "downscale_p", "sharpen_p"):
        v = getattr(cfg.augment, name)
        if not 0 <= v <= 1:
            raise ConfigError(f"augment.{name}: {v} is a probability, must be between 0 and 1")
    lo, hi = cfg.augment.downscale_range
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"augment.downscale_range: {[lo, hi]} must satisfy 0 < low <= high <= 1")
    lo, hi = cfg.augment.sharpen_range
    if not 0 <= lo <= hi:
        raise ConfigError(f"augment.sharpen_range: {[lo, hi]} must satisfy 0 <= low <= high")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(cfg.data, name)
        if not 0 < v < 0.5:
            raise ConfigError(f"data.{name}: {v} must be between 0 and 0.5")
    for name in ("decode_workers", "torch_threads"):
        if getattr(cfg.daemon, name) < 0:
            raise ConfigError(f"daemon.{name}: {getattr(cfg.daemon, name)} must be >= 0 (0 = choose by cores)")
    if cfg.daemon.batch_size < 0:
        raise ConfigError(f"daemon.batch_size: {cfg.daemon.batch_size} must be >= 0 (0 = choose by device)")
    if cfg.train.consistency_weight < 0:
        raise ConfigError(f"train.consistency_weight: {cfg.train.consistency_weight} must be >= 0 (0 = off)")
    lo, hi = cfg.train.consistency_jpeg_quality
    if not 1 <= lo <= hi <= 100:
        raise ConfigError(f"train.consistency_jpeg_quality: {[lo, hi]} must satisfy 1 <= low <= high <= 100")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} must be >= 2")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load ``path`` (default: the project's config.yaml; built-in defaults if that is absent)."""
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if not path.exists():
            return Config().replace(overrides or {})
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    cfg = config_from_dict(data, source=str(path))
    return cfg.replace(overrides or {})


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
