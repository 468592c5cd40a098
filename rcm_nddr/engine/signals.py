"""Stopping training cleanly on SIGTERM or SIGINT (a preempted job, Ctrl-C): the signal is recorded, the
loop finishes its iteration, writes a checkpoint and raises ``TrainingInterrupted``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

#: signals that stop training cleanly (a checkpoint, then exit); a second one stops at once
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training; a checkpoint of the last finished iteration was written, and
    ``--resume`` continues from it. ``exit_code`` is 128 + the signal number, as for a killed process."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path) -> None:
        self.signum = signum
        self.iteration = iteration
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} received: stopped after iteration {iteration}, checkpoint {checkpoint}; "
            "continue with --resume"
        )


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which finishes the step, writes a
    checkpoint and then shuts them down (a Ctrl-C reaches the whole process group)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopSignals:
    """While entered, the first SIGTERM/SIGINT is recorded in ``received`` (the loop polls it); a second
    one raises ``KeyboardInterrupt`` at once. The previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from there
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.received = signum
