"""The one preprocessing Preset (core/preprocessing.py): eval/train tensors, the squash geometry that makes
a full-resolution input look like its 224x224 training copy, and -- the key property -- training-eval
and daemon preprocessing producing bit-identical tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from xr.core.config import AugmentConfig, PreprocessConfig, load_recipe
from xr.core.preprocessing import Preset


@pytest.fixture(scope="module")
def preset() -> Preset:
    return Preset.from_config(load_recipe().preprocess)


def test_from_config_geometry(preset):
    assert preset.img_size == 224
    assert preset.resize_size == int(224 * 1.15) == 257
    assert preset.resize_mode == "squash"
    other = Preset.from_config(PreprocessConfig(img_size=128, resize_ratio=1.25, resize_mode="shorter_side"))
    assert (other.img_size, other.resize_size, other.resize_mode) == (128, 160, "shorter_side")


def test_eval_output_shape_dtype_and_normalisation(preset):
    # A uniform grey landscape image: after resize/crop every pixel is (v/255 - mean[c]) / std[c].
    v = 128
    t = preset.eval_transform()(Image.new("L", (300, 200), v))
    assert t.shape == (3, 224, 224) and t.dtype == torch.float32
    for c in range(3):
        expected = (v / 255 - preset.mean[c]) / preset.std[c]
        assert torch.allclose(t[c], torch.full_like(t[c], expected), atol=1e-5), c
    # ImageNet statistics: black is strongly negative, white strongly positive.
    black = preset.eval_transform()(Image.new("L", (224, 224), 0))
    white = preset.eval_transform()(Image.new("L", (224, 224), 255))
    assert black.max() < -1.7 and white.min() > 1.9


def test_grayscale_copied_to_three_identical_channels(preset, xray_paths):
    t = preset(xray_paths[0])
    assert t.shape == (3, 224, 224)
    # Same grey value in each channel before normalisation (the channels differ only by mean/std).
    raw = [t[c] * preset.std[c] + preset.mean[c] for c in range(3)]
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[0], raw[2], atol=1e-6)
    assert raw[0].std() > 0.05  # an actual picture, not a constant


def test_eval_center_crop_of_non_square_image_in_both_modes():
    img = Image.new("L", (400, 200), 0)
    img.paste(255, (0, 0, 100, 200))  # white left quarter
    squash = Preset(resize_mode="squash").eval_transform()(img)
    shorter = Preset(resize_mode="shorter_side").eval_transform()(img)
    assert squash.shape == shorter.shape == (3, 224, 224)
    # squash keeps the whole width: the white quarter is still at the left edge.
    assert squash[0, :, :5].mean() > 1.5
    # shorter_side keeps the aspect ratio and crops the middle: the white quarter is cut away.
    assert shorter[0, :, :5].mean() < -1.5


def test_squash_makes_fullres_and_its_training_copy_look_alike(fullres_paths):
    """The training images were squashed to 224x224; the default squash mode makes the full-resolution
    original give nearly the same eval tensor as that copy, shorter_side clearly does not."""
    assert len(fullres_paths) == 2
    for path in fullres_paths:
        with Image.open(path) as im:
            w, h = im.size
            assert w / h > 1.1  # really not square
            small = im.convert("L").resize((224, 224), Image.BILINEAR)  # what the dataset holds
        diffs = {}
        for mode in ("squash", "shorter_side"):
            p = Preset(resize_mode=mode)
            full_t = p(path)
            small_t = p.eval_transform()(small)
            diffs[mode] = (full_t - small_t).abs().mean().item()
        assert diffs["squash"] < 0.06, (path.name, diffs)
        assert diffs["shorter_side"] > 0.25, (path.name, diffs)
        assert diffs["shorter_side"] > 5 * diffs["squash"], (path.name, diffs)


def _copy_of(path):
    """The 224x224 dataset copy of a full-resolution fixture (tests/fixtures/copies224)."""
    return path.parents[2] / "copies224" / path.parent.name / path.name


def test_rendering_brings_fullres_closer_to_its_real_dataset_copy(fullres_paths):
    """With the rendering step (squash to 224 bicubic, JPEG q75, as the dataset was made) the network's
    pixels from a full-resolution export are clearly closer to those of its own dataset copy."""
    for path in fullres_paths:
        diffs = {}
        for render in (None, 224):
            p = Preset(render_size=render)
            pixels = p.pixel_transform()
            full = pixels(p.load(path)).float()
            copy = pixels(p.load(_copy_of(path))).float()
            diffs[render] = (full - copy).abs().mean().item()  # grey levels
        assert diffs[224] < 0.8 * diffs[None], (path.name, diffs)
        assert diffs[224] < 2.5, (path.name, diffs)


def test_rendering_leaves_a_training_copy_practically_unchanged(fullres_paths):
    """Training images are already such renderings: re-rendering them is near-identity, so the rendering
    step costs training nothing in fidelity."""
    from xr.core.preprocessing import RenderAsDataset

    for path in fullres_paths:
        with Image.open(_copy_of(path)) as im:
            copy = im.convert("L")
        again = RenderAsDataset(224, 75)(copy)
        assert again.size == (224, 224) and again.mode == "L"
        assert np.abs(np.asarray(again, dtype=np.float32) - np.asarray(copy, dtype=np.float32)).mean() < 0.05


def test_rendering_squashes_any_size_and_is_deterministic():
    from xr.core.preprocessing import RenderAsDataset

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 500), dtype=np.uint8), mode="L")
    r = RenderAsDataset(128, 60)
    a, b = r(img), r(img)
    assert a.size == (128, 128) and np.array_equal(np.asarray(a), np.asarray(b))


def test_presets_saved_before_rendering_existed_keep_their_pipeline(preset):
    old = preset.to_dict()
    del old["render_size"], old["render_quality"]
    restored = Preset.from_dict(old)
    assert restored.render_size is None  # an old checkpoint scores exactly as it was calibrated
    assert preset.render_size == 224 and preset.render_quality == 75  # the recipe turns it on for new ones


def test_a_preset_field_this_version_cannot_apply_is_refused(preset):
    """Silently dropping it would score films through another pipeline than the one calibrated."""
    from xr.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="preprocessing has fields this version does not know: render_filter"):
        Preset.from_dict(preset.to_dict() | {"render_filter": "bilinear"})


def test_large_jpeg_decodes_at_reduced_scale_never_below_resize(preset, fullres_paths):
    path = fullres_paths[0]
    with Image.open(path) as im:
        full_size = im.size
    img = preset.load(path)
    assert img.mode == "L"
    assert min(img.size) >= preset.resize_size
    assert min(img.size) >= 2 * preset.render_size  # the bicubic shrink, not the DCT, makes the rendering
    assert img.size[0] < full_size[0]  # the DCT draft actually took effect
    # Aspect ratio kept by the draft (within rounding).
    assert abs(img.size[0] / img.size[1] - full_size[0] / full_size[1]) < 0.02


# every augmentation off: each test turns on what it looks at
OFF = dict(
    rrc_scale=(1.0, 1.0),
    hflip_p=0.0,
    rotation_deg=0.0,
    affine_scale=(1.0, 1.0),
    translate=0.0,
    brightness=0.0,
    contrast=0.0,
    gamma=(1.0, 1.0),
    autocontrast_p=0.0,
    equalize_p=0.0,
)


def test_train_transform_is_seeded_same_shape_and_differs_from_eval(preset, xray_paths):
    aug = AugmentConfig(**OFF | dict(rrc_scale=(0.9, 1.0), hflip_p=0.5, rotation_deg=5.0))
    tf = preset.train_transform(aug)
    img = preset.load(xray_paths[3])
    torch.manual_seed(123)
    a = tf(img)
    torch.manual_seed(123)
    b = tf(img)
    torch.manual_seed(7)
    c = tf(img)
    ev = preset.eval_transform()(img)
    assert a.shape == ev.shape == (3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b)  # reproducible under a seed
    assert not torch.equal(a, c)  # but actually random
    assert not torch.allclose(a, ev, atol=1e-3)  # augmented, unlike eval
    # Horizontal flip p=0.5 happens for some seeds and not others; otherwise the picture stays close.
    flipped = []
    for seed in range(8):
        torch.manual_seed(seed)
        t = tf(img)
        straight, mirrored = (t - ev).abs().mean().item(), (t - ev.flip(-1)).abs().mean().item()
        assert min(straight, mirrored) < 0.5, seed
        flipped.append(mirrored < straight)
    assert any(flipped) and not all(flipped)


def test_train_transform_without_augmentation_equals_eval(preset, xray_paths):
    aug = AugmentConfig(**OFF)
    img = preset.load(xray_paths[0])
    torch.manual_seed(0)
    t = preset.train_transform(aug)(img)
    e = preset.eval_transform()(img)
    # RandomResizedCrop with scale 1 and ratio draws may still pick a near-full crop; geometry matches.
    assert t.shape == e.shape
    assert (t - e).abs().mean() < 0.05


def test_preset_dict_round_trip(preset):
    d = preset.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON-able data, as stored in a checkpoint
    assert Preset.from_dict(d) == preset
    custom = Preset(img_size=160, resize_size=184, resize_mode="shorter_side", mean=(0.5,) * 3, std=(0.25,) * 3)
    assert Preset.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


def test_a_preset_holds_only_what_defines_the_model(preset):
    """The operator's decode limits are not the model's: older checkpoints stored two of them in their
    preset; they load, and the limits come from DecodeLimits (config.yaml) instead."""
    assert not {"max_pixels", "dicom_window"} & set(preset.to_dict())
    old = preset.to_dict() | {"max_pixels": 123, "dicom_window": 1}
    assert Preset.from_dict(old) == preset


def test_the_pixel_limit_and_window_come_from_the_limits_passed(preset, xray_paths):
    from xr.core.errors import ImageError
    from xr.core.intake import DecodeLimits

    with pytest.raises(ImageError, match="over the limit of 1,000"):
        preset.load(xray_paths[0], DecodeLimits(max_pixels=1000))
    with pytest.raises(ImageError, match="over the limit of 1,000"):
        preset(xray_paths[0], DecodeLimits(max_pixels=1000))
    assert preset.load(xray_paths[0]).size == (224, 224)  # DecodeLimits() by default


# -- the key property: training evaluation and the daemon see identical tensors -------------------
def _training_eval_tensors(preset: Preset, paths) -> tuple[list[torch.Tensor], str]:
    """Eval tensors the way training builds them: train/data.py's dataset when present."""
    try:
        from xr.train.data import Item, XRDataset
    except ImportError:  # training code not there yet: the Preset itself is what it will use
        return [preset.eval_transform()(preset.load(p)) for p in paths], "Preset"
    items = [Item(str(p), 0, p.stem) for p in paths]
    ds = XRDataset(items, preset, preset.eval_transform())
    return [ds[i][0] for i in range(len(ds))], "XRDataset"


def test_training_eval_and_daemon_preprocessing_are_identical(tiny_checkpoint, xray_paths, fullres_paths):
    from xr.core.predict import Predictor

    cfg = load_recipe()
    preset = Preset.from_config(cfg.preprocess)  # what the training engine builds from the recipe
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", amp="off", channels_last=False)
    assert predictor.preset == preset  # the checkpoint carries the same preset
    paths = [xray_paths[0], xray_paths[-1], *fullres_paths]
    train_side, via = _training_eval_tensors(preset, paths)
    # The daemon decodes bytes to uint8 pixels in its decode threads and normalises whole batches.
    pixels = torch.stack([predictor.pixels(p.read_bytes(), name=p.name) for p in paths])
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(paths), 1, 224, 224)
    daemon_batch = predictor._normalize(pixels)
    for p, t, daemon_side in zip(paths, train_side, daemon_batch):
        assert t.shape == daemon_side.shape == (3, 224, 224)
        assert torch.equal(t, daemon_side), f"{p.name}: training ({via}) and daemon tensors differ"
        assert torch.equal(predictor.preprocess(p), daemon_side)  # path and bytes agree too
    # and the model gets the same logits from either form
    floats = torch.stack(train_side)
    assert torch.equal(predictor.logits(pixels), predictor.logits(floats))
    # Also the plain Preset call (used by tools) is the same definition.
    assert torch.equal(preset(paths[0]), train_side[0])


def test_preprocess_differs_when_preset_differs(xray_paths):
    """Guard against the identity test passing vacuously: a different preset gives different tensors."""
    a = Preset()(xray_paths[0])
    b = Preset(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(xray_paths[0])
    assert not torch.equal(a, b)
    c = Preset(resize_size=300)(xray_paths[0])
    assert not torch.equal(a, c)
    assert np.isfinite(a.numpy()).all()


def test_photometric_augmentation_changes_grey_levels_not_geometry(preset, xray_paths):
    """Brightness, contrast, gamma, autocontrast: the same film under another exposure or scanner."""
    img = preset.load(xray_paths[0])
    still = OFF
    plain = preset.train_transform(AugmentConfig(**still))
    photo = preset.train_transform(
        AugmentConfig(**still | dict(brightness=0.3, contrast=0.3, gamma=(0.7, 1.4), autocontrast_p=0.5))
    )
    torch.manual_seed(0)
    a = plain(img)
    diffs, corrs = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        b = photo(img)
        diffs.append((a - b).abs().mean().item())
        corrs.append(np.corrcoef(a[0].flatten().numpy(), b[0].flatten().numpy())[0, 1])
    assert min(diffs) > 0.02 and len({round(d, 4) for d in diffs}) == 6  # grey levels move, differently per draw
    assert min(corrs) > 0.9  # the same picture: structure in the same place
    torch.manual_seed(3)
    first = photo(img)
    torch.manual_seed(3)
    assert torch.equal(first, photo(img))  # seeded by torch, as the data loader seeds it


def test_affine_zoom_and_shift_move_the_picture(preset, xray_paths):
    img = preset.load(xray_paths[0])
    still = OFF
    torch.manual_seed(0)
    a = preset.train_transform(AugmentConfig(**still))(img)
    torch.manual_seed(0)
    b = preset.train_transform(AugmentConfig(**still | dict(affine_scale=(0.7, 0.8), translate=0.1)))(img)
    assert a.shape == b.shape and (a - b).abs().mean() > 0.1
