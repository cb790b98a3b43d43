"""daemon/stage.py: stages step on their own threads, a failure (in a step or in close) is kept for the
supervisor, and a stop goes upstream first, each stage joined before the next is told."""

from __future__ import annotations

import threading

from xr.daemon.stage import Stage, Supervisor


class Counter(Stage):
    def __init__(self, name, events, fail_at=None, fail_close=False):
        super().__init__()
        self.name, self.events, self.fail_at, self.fail_close = name, events, fail_at, fail_close
        self.steps = 0
        self.stepped = threading.Event()

    def step(self, now):
        self.steps += 1
        self.stepped.set()
        if self.steps == self.fail_at:
            raise RuntimeError(f"{self.name} broke")
        return False

    def close(self):
        self.events.append(f"close {self.name}")
        if self.fail_close:
            raise OSError("disk gone")


def test_stages_run_until_stopped_in_the_order_given():
    events = []
    up, down = Counter("xr-up", events), Counter("xr-down", events)
    sup = Supervisor([down, up])
    sup.start()
    assert up.stepped.wait(10) and down.stepped.wait(10)
    assert sup.dead() is None and sup.failed() == []
    sup.stop([up, down])
    assert events == ["close xr-up", "close xr-down"]  # upstream closed (and joined) first
    assert not up.is_alive() and not down.is_alive()


def test_a_failed_step_or_close_is_kept_and_the_stage_reported_dead():
    events = []
    broken, leaky, fine = (
        Counter("xr-a", events, fail_at=2),
        Counter("xr-b", events, fail_close=True),
        Counter("xr-c", events),
    )
    broken.idle_s = leaky.idle_s = fine.idle_s = 0.0
    sup = Supervisor([broken, leaky, fine])
    sup.start()
    broken._thread.join(10)
    assert sup.dead() == "thread xr-a is not running"
    assert [(name, str(err)) for name, err in sup.failed()] == [("xr-a", "xr-a broke")]
    assert "close xr-a" in events  # closed after its failure too
    sup.stop()
    assert [(name, str(err)) for name, err in sup.failed()] == [("xr-a", "xr-a broke"), ("xr-b", "disk gone")]
