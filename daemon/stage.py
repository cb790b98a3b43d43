"""Long-running work as small stages on one supervisor (the shape of rq's worker and huey's consumer).

A :class:`Stage` does one bounded piece of work per :meth:`Stage.step` and says whether it did any; the
:class:`Supervisor` runs each stage on its own thread (named ``xr-...``), waits ``idle_s`` after a step that
found nothing to do, records the exception that ends a stage, and stops and joins them in a given order.
Every blocking call inside a step has a timeout of about :data:`POLL_S`, so a stop is seen within ~0.1 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

POLL_S = 0.1  # every blocking wait inside a step uses this timeout


class Stage:
    """One job of the daemon. Subclasses set ``name`` and implement :meth:`step`."""

    name = "xr-stage"
    idle_s = POLL_S  # wait this long after a step that did nothing

    def __init__(self) -> None:
        self.halt = threading.Event()  # set by the supervisor: finish the step in hand, then stop
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def step(self, now: float) -> bool:
        """Do one bounded piece of work; True if there was work (the next step follows at once)."""
        raise NotImplementedError

    def close(self) -> None:
        """Runs once on the stage's thread after its last step, also after a failure (flush, release)."""

    # -- run by the supervisor --------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.halt.is_set():
                if not self.step(time.monotonic()):
                    self.halt.wait(self.idle_s)
        except BaseException as exc:  # noqa: BLE001 - kept for the supervisor, which stops the daemon
            self.error = exc
        finally:
            try:
                self.close()
            except BaseException as exc:  # noqa: BLE001 - a failed close is reported like a failed step
                self.error = self.error or exc

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class Supervisor:
    """Starts, watches and stops the stages; one place that knows which threads make up the daemon."""

    def __init__(self, stages: Iterable[Stage] = ()) -> None:
        self.stages: list[Stage] = list(stages)

    def add(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        return stage

    def start(self) -> None:
        for st in self.stages:
            st._thread = threading.Thread(target=st.run, name=st.name, daemon=True)
            st._thread.start()

    def failed(self) -> list[tuple[str, BaseException]]:
        """(name, exception) of every stage that ended with an error."""
        return [(st.name, st.error) for st in self.stages if st.error is not None]

    def dead(self) -> str | None:
        """None while every started stage runs; else which one stopped."""
        for st in self.stages:
            if st._thread is not None and not st._thread.is_alive():
                return f"thread {st.name} is not running"
        return None

    def stop(self, order: Iterable[Stage] | None = None, timeout: float | None = None) -> None:
        """Stop the stages one at a time, in ``order`` (default: the order they were added), each joined
        before the next is told: upstream stages first, so downstream ones finish what is in flight."""
        for st in order if order is not None else self.stages:
            st.halt.set()
            if st._thread is not None:
                st._thread.join(timeout)
