"""Calibrated prediction: checkpoint + calibration_threshold.json -> logit, probability, label, flagged.

The calibration (core/calibration.py, fitted by train/calibrate.py) maps the logit to a probability and
holds the threshold; a calibration fitted for another checkpoint is refused.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xr.core.calibration import CALIBRATION_FILE, UNCALIBRATED, Calibration
from xr.core.errors import CheckpointError, ImageError
from xr.core.intake import DEFAULT_LIMITS, DecodeLimits
from xr.core.model import file_sha256, load_checkpoint
from xr.core.preprocessing import Preset

__all__ = ["CALIBRATION_FILE", "Calibration", "Prediction", "Predictor", "normalize_cams"]


# -- device and numeric fast paths --------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' requested but CUDA is not available; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CheckpointError("device 'mps' requested but MPS is not available; use auto or cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise CheckpointError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 math (AVX512-BF16 or AMX); elsewhere bf16 is emulated and
    ~10x slower than fp32 (docs/benchmarks.md), so ``auto`` only turns it on where it pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device, amp: str = "auto", training: bool = False) -> bool:
    """Whether to run bf16 autocast. ``auto`` on a CPU: forward passes only (``training`` False), since
    on CPUs with native bf16 the forward is faster in bf16 but the training step is slower."""
    if amp == "off":
        return False
    if amp == "bf16":
        return True
    if device.type == "cpu":
        return cpu_has_fast_bf16() and not training
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def autocast(device: torch.device, enabled: bool, cache: bool = True):
    if not enabled:
        return contextlib.nullcontext()
    # CUDA graph capture needs the cast cache off: a cached cast would be a tensor outside the graph.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


def _glibc():
    """glibc with its malloc tunables (mallopt, malloc_trim), or None elsewhere (macOS, musl)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def tune_malloc() -> bool:
    """glibc malloc for a torch process on CPU (the daemon, training); call before threads start.

    One arena (one per thread otherwise: RSS grows with the decode pool), and a fixed 256 MiB mmap
    threshold with a 512 MiB trim threshold, so the model's activation buffers are reused from the heap
    instead of being mapped and zero-filled on every forward (docs/benchmarks.md, "Allocator").
    Returns False where it does not apply (not glibc, e.g. macOS).
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(-8, 1)  # M_ARENA_MAX
    # M_MMAP_THRESHOLD. mallopt(3) documents 32 MiB as its upper limit on 64-bit; glibc 2.36 takes
    # more. Where it refuses, 32 MiB, not nothing: the trim setting below fixes the threshold, so a
    # refusal would leave glibc's 128 KiB and map every activation buffer.
    ok &= libc.mallopt(-3, 256 << 20) or libc.mallopt(-3, 32 << 20)
    ok &= libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    return bool(ok)


def trim_malloc() -> bool:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``); False where not glibc.

    :func:`tune_malloc` keeps up to 512 MiB of freed memory mapped; the daemon's start-up checks leave
    more than one forward needs, so it trims once after them (lower peak RSS in a burst).
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


class _CudaGraph:
    """One captured forward over a static uint8 input buffer (torch.cuda.graphs)."""

    def __init__(self, predictor: Predictor, batch_size: int):
        self.batch_size, self.shape = batch_size, predictor.pixel_shape
        self.lock = threading.Lock()
        self.input = torch.zeros((batch_size, *self.shape), dtype=torch.uint8, device=predictor.device)
        side = torch.cuda.Stream(predictor.device)
        side.wait_stream(torch.cuda.current_stream(predictor.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # cuDNN picks its algorithms and the allocator settles before capture
                predictor._forward(self.input, cache=False)
        torch.cuda.current_stream(predictor.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.cams = predictor._forward(self.input, cache=False)

    def __call__(self, batch: torch.Tensor, cams: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = batch.shape[0]
        with self.lock:  # one input and output buffer: a second thread (the heatmap fallback) waits its turn
            self.input[:n].copy_(batch, non_blocking=True)
            self.graph.replay()
            return self.logits[:n].cpu(), self.cams[:n].cpu() if cams else None


class _TracedForward(nn.Module):
    """The CPU forward of uint8 batches as a TorchScript trace (normalise, channels_last, autocast, model).

    Eager, each of the forward's ~250 operators returns to Python and must take the GIL back; beside the
    daemon's decode and bookkeeping threads a batch then waits on them between layers. The trace runs the
    same operators in C++ without the GIL, so its logits are bitwise the eager ones:
    :meth:`Predictor.trace_forward` checks that before using it.
    """

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.model, self.normalize = predictor.model, predictor._normalize  # registered, so traced as weights
        self._forward = predictor._forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(x, cache=False)


@dataclass(frozen=True)
class Prediction:
    logit: float
    probability: float  # calibrated: sigmoid(logit / T + shift)
    label: str
    flagged: bool
    # The class activation map at feature resolution (e.g. 7x7 float32 in [0, 1]) when asked for: where
    # the film raised the logit (:func:`normalize_cams`).
    cam: np.ndarray | None = field(default=None, compare=False, repr=False)


def normalize_cams(raw: torch.Tensor) -> torch.Tensor:
    """Raw class activation maps [B, h, w] -> ReLU, then min-max to [0, 1] per map, as torchcam normalises
    Grad-CAM (same epsilon), so the two agree to float rounding (tests/test_heatmap.py)."""
    cams = raw.float().relu()
    cams = cams - cams.amin(dim=(-2, -1), keepdim=True)
    return cams / (cams.amax(dim=(-2, -1), keepdim=True) + 1e-8)


def load_calibration(checkpoint: Path, model_sha256: str, calibration: str | Path | None = None) -> Calibration:
    """``calibration`` (a site's file), else the file beside ``checkpoint``, else uncalibrated."""
    path = Path(calibration) if calibration else checkpoint.parent / CALIBRATION_FILE
    if calibration is None and not path.exists():
        return UNCALIBRATED
    return Calibration.read(path, model_sha256=model_sha256)


class Predictor:
    """A loaded model with its preset and calibration. Several threads may score at once (the inferer and
    the heatmap fallback): the eager and traced forwards share only read-only weights, the CUDA graph locks."""

    def __init__(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        calibration: Calibration,
        device: str | torch.device = "auto",
        amp: str = "auto",
        channels_last: bool = True,
        model_id: str = "unknown",
        model_sha256: str | None = None,
    ):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.meta = meta
        self.preset = Preset.from_dict(meta["preprocess"])
        self.class_names = tuple(meta["class_names"])
        self.calibration = calibration
        self.bf16 = use_bf16(self.device, amp)
        self.channels_last = channels_last
        self.model_id = model_id
        self.model_sha256 = model_sha256
        model = model.to(self.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._transform = self.preset.eval_transform()
        self._pixels = self.preset.pixel_transform()
        self._normalize = self.preset.normalizer().to(self.device)
        self._graph: _CudaGraph | None = None
        self._traced: torch.jit.ScriptModule | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        calibration: str | Path | None = None,
        device: str = "auto",
        amp: str = "auto",
        channels_last: bool = True,
    ) -> Predictor:
        """Load ``checkpoint``; calibration defaults to ``calibration_threshold.json`` beside it.

        Without that file the model is uncalibrated: T = 1 and threshold 0.5 (``calibration.calibrated``
        is False). A calibration file fitted for another checkpoint is a :class:`CheckpointError`.
        """
        checkpoint = Path(checkpoint)
        model, meta = load_checkpoint(checkpoint)
        digest = file_sha256(checkpoint)
        return cls(
            model,
            meta,
            load_calibration(checkpoint, digest, calibration),
            device=device,
            amp=amp,
            channels_last=channels_last,
            model_id=f"{meta['arch']}-{digest[:12]}",
            model_sha256=digest,
        )

    def with_calibration(self, calibration: Calibration) -> None:
        """Score with ``calibration`` from the next batch on (it must belong to this model)."""
        if self.model_sha256 is not None:
            calibration.check_model(self.model_sha256)
        self.calibration = calibration

    @property
    def calibration_id(self) -> str:
        return self.calibration.id

    @property
    def pixel_shape(self) -> torch.Size:
        """One image of the uint8 pixel batches the daemon feeds :meth:`logits`: [1, S, S]."""
        s = self.preset.img_size
        return torch.Size((1, s, s))

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    # -- preprocessing ---------------------------------------------------------------------------
    def preprocess(
        self, source: str | Path | bytes, limits: DecodeLimits = DEFAULT_LIMITS, *, name: str | Path | None = None
    ) -> torch.Tensor:
        """File -> eval tensor [3, S, S], decoded within ``limits``; raises :class:`ImageError` for bad input."""
        return self._transform(self.preset.load(source, limits, name=name))

    def pixels(
        self, source: str | Path | bytes, limits: DecodeLimits = DEFAULT_LIMITS, *, name: str | Path | None = None
    ) -> torch.Tensor:
        """File -> uint8 [1, S, S], the eval preset before normalisation (4x smaller, no arithmetic).

        ``limits``: the operator's (``DecodeLimits.from_settings(cfg)``); every program scoring for a site
        passes the same, so a film gives the same pixels in each. Batches of these go straight to
        :meth:`logits`, which normalises them on the model's device: the daemon's decode threads run this,
        so they do no tensor math that would compete for the model's threads.
        """
        return self._pixels(self.preset.load(source, limits, name=name))

    # -- inference -------------------------------------------------------------------------------
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw logits of a batch of eval tensors [B, 3, S, S] or uint8 pixels [B, 1, S, S]."""
        return self.scores(batch)[0]

    @torch.inference_mode()
    def scores(self, batch: torch.Tensor, cams: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B] of a batch, and with ``cams`` the raw class activation maps [B, h, w] of the same
        forward (None without): eager, traced or CUDA graph alike."""
        g = self._graph
        if (
            g is not None
            and batch.dtype == torch.uint8
            and batch.shape[0] <= g.batch_size
            and batch.shape[1:] == g.shape
        ):
            return g(batch, cams)
        t = self._traced
        if t is not None and batch.dtype == torch.uint8 and batch.shape[1:] == self.pixel_shape:
            logits, raw = t(batch)
        else:
            logits, raw = self._forward(batch.to(self.device, non_blocking=True))
        return logits.cpu(), raw.cpu() if cams else None

    def _forward(self, x: torch.Tensor, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B] and raw class activation maps [B, h, w] of one forward.

        ``forward_head(forward_features(x))`` is what ``model(x)`` runs (timm), so the logits are the
        plain forward's to the bit. The head pools the feature map A (bn2's output) by its mean and applies
        one linear layer, so ``w . A`` is Grad-CAM at bn2 up to a positive factor (1/(h*w)) that
        normalisation removes: no backward. C*h*w multiply-adds per film: ~0.1% of the forward's CPU time.
        """
        if x.dtype == torch.uint8:
            x = self._normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.bf16, cache):
            features = self.model.forward_features(x)
            out = self.model.forward_head(features)
        weight = self.model.get_classifier().weight[0]  # the one logit's weights over the channels
        raw = torch.einsum("bchw,c->bhw", features.float(), weight.float())
        return out.float().reshape(-1), raw

    @property
    def has_cuda_graph(self) -> bool:
        return self._graph is not None

    @torch.inference_mode()
    def capture_cuda_graph(self, batch_size: int) -> None:
        """Record the forward of uint8 batches of up to ``batch_size`` as one CUDA graph.

        Eager, a forward is ~300 kernel launches, each taking the GIL from Python, so beside the daemon's
        decode threads it waits on them; a replay is one call.
        Smaller batches are padded to ``batch_size`` (the GPU cost is the same); others stay eager.
        """
        if self.device.type != "cuda":
            raise CheckpointError(f"CUDA graphs need a cuda device, not {self.device}")
        self._graph = _CudaGraph(self, batch_size)

    @property
    def has_trace(self) -> bool:
        return self._traced is not None

    def trace_forward(self, batch_size: int) -> None:
        """Run the CPU forward of uint8 batches as a TorchScript trace (:class:`_TracedForward`).

        Raises RuntimeError, and keeps the eager forward, where tracing fails or the trace's logits differ
        from the eager ones in any bit, for a batch of ``batch_size`` or of 1: scores never depend on this
        switch.
        """
        if self.device.type != "cpu":
            raise RuntimeError(f"the traced forward is for the CPU, not {self.device}")
        gen = torch.Generator().manual_seed(0)
        checks = [
            torch.randint(0, 256, (n, *self.pixel_shape), dtype=torch.uint8, generator=gen) for n in (batch_size, 1)
        ]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # torch.jit is deprecated in favour of torch.compile/torch.export, which need a C++ toolchain
                # at start-up (compile) or still run each operator from Python (export); Normalize's input
                # check is a Python branch the trace records as taken, which holds for every pixel batch.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(_TracedForward(self).eval(), checks[0], check_trace=False)
        except Exception as exc:  # any model or torch that cannot trace keeps the eager forward, which works
            raise RuntimeError(f"cannot trace the forward: {type(exc).__name__}: {exc}") from exc
        with torch.inference_mode():
            for x in checks:
                want = self._forward(x, cache=False)
                for _ in range(3):  # the profiling executor optimises the graph after its first runs
                    got = traced(x)
                    for g, w in zip(got, want):  # the logits and the class activation maps
                        if not torch.equal(g, w):
                            diff = (g - w).abs().max().item()
                            raise RuntimeError(
                                f"traced forward differs from eager by up to {diff:.3g} (batch {len(x)})"
                            )
        self._traced = traced

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        return self.calibration.probability(logits)

    def predict_batch(self, batch: torch.Tensor, cams: bool = False) -> list[Prediction]:
        """Calibrated predictions; with ``cams`` each carries its class activation map (``Prediction.cam``)
        from the same forward, for a heatmap without a second pass."""
        logits, raw = self.scores(batch, cams)
        probs = self.calibrate(logits)
        maps = list(normalize_cams(raw).numpy()) if raw is not None else [None] * len(logits)
        return [self._prediction(float(z), float(p), m) for z, p, m in zip(logits, probs, maps)]

    def _prediction(self, logit: float, prob: float, cam: np.ndarray | None = None) -> Prediction:
        flagged = prob >= self.threshold
        label = self.class_names[int(flagged)]
        return Prediction(logit=logit, probability=prob, label=label, flagged=flagged, cam=cam)

    def predict_paths(
        self, paths: Sequence[str | Path], batch_size: int = 32, limits: DecodeLimits = DEFAULT_LIMITS
    ) -> list[Prediction | ImageError]:
        """Score files in order, decoded within ``limits``; a bad file yields its :class:`ImageError` in place
        of a prediction."""
        results: list[Prediction | ImageError] = [None] * len(paths)  # type: ignore[list-item]
        for start in range(0, len(paths), batch_size):
            tensors, idx = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                p = paths[i]
                try:
                    tensors.append(self.preprocess(p, limits))
                    idx.append(i)
                except ImageError as exc:
                    results[i] = exc
            if tensors:
                for i, pred in zip(idx, self.predict_batch(torch.stack(tensors))):
                    results[i] = pred
        return results

    def warmup(self, batch_size: int = 1) -> None:
        s = self.preset.img_size
        self.logits(torch.zeros(batch_size, 3, s, s))
