"""The thread plan: how many decode threads and torch threads the daemon runs, and its batch size, for the
device and the cores it has (docs/design.md, "Thread plan")."""

from __future__ import annotations

import dataclasses
import os

from xr.core.config import DaemonConfig


@dataclasses.dataclass(frozen=True)
class RunPlan:
    decode_workers: int
    torch_threads: int
    batch_size: int


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


GRAPH_DECODERS_MAX = 14  # the largest host measured had 16 cores (docs/benchmarks.md)


def plan_run(
    d: DaemonConfig, device_type: str, cpus: int | None = None, bf16: bool = False, cuda_graph: bool | None = None
) -> RunPlan:
    """Decode threads, torch threads and batch size; 0 in config means "choose" (docs/design.md, "Thread plan").

    CPU model: one decoder per 4 cores; in fp32 the model also gets every core, in bf16 (``bf16``: a CPU
    with native bf16) only the cores the decoders do not have. Batches of 4 in fp32 and 8 in bf16 keep the
    forward's working set near 110 MB. GPU: the CPU is the decoders'; up to 8 beside an eager forward (each
    kernel launch must win the GIL back from them), all but 2 cores (at most 14) and batches of 32 where a
    CUDA graph replays the forward in one call (``cuda_graph``: it was captured; default ``d.cuda_graphs``).
    """
    cpus = cpus or usable_cpus()
    if device_type != "cpu":
        graph = device_type == "cuda" and (d.cuda_graphs if cuda_graph is None else cuda_graph)
        workers = d.decode_workers or (max(1, min(cpus - 2, GRAPH_DECODERS_MAX)) if graph else min(cpus, 8))
        return RunPlan(workers, d.torch_threads or cpus, d.batch_size or (32 if graph else 8))
    workers = d.decode_workers or max(1, cpus // 4)
    torch_threads = d.torch_threads or (max(1, cpus - workers) if bf16 else cpus)
    return RunPlan(workers, torch_threads, d.batch_size or (8 if bf16 else 4))
