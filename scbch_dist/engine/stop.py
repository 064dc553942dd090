"""Stopping a run cleanly on request: SIGTERM or SIGUSR1 (SLURM's preemption and time-limit
warnings), Ctrl-C (SIGINT), or a file named STOP in the run folder (``touch RUN_DIR/STOP``; the
SLURM launcher writes it when it is signalled). The loop asks after every step; every rank gets the
same answer, finishes that step, and the run writes a checkpoint and exits with status 75
(docs/engine.md, "Preemption"). A second Ctrl-C stops at once, without a checkpoint (status 130,
one line: scbch_dist.cli)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from scbch_dist import cli, dist
from scbch_dist.run import RunFolder

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REQUEUE_SIGNAL = "SIGUSR1"  # the time-limit warning (sbatch --signal): the only stop that asks for a requeue
POLL_SECONDS = 1.0  # the STOP file is looked for at most this often (the run folder may be on NFS)


class StopRequest:
    """Installed for the life of a run (a context manager); ``agreed()`` is a collective."""

    def __init__(self, run_dir: Path, *, is_main: bool):
        self.file = RunFolder(run_dir).stop
        self.is_main = is_main
        self.reason: str | None = None  # what asked this process to stop
        self._previous: dict = {}
        self._polled = -float("inf")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        # a SLURM warning that came before these handlers (cli.WARNING_FILE_VARIABLE)
        if cli.warned_before_start(listening=bool(self._previous)):
            self.reason = REQUEUE_SIGNAL
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if self.reason == "SIGINT":  # the second Ctrl-C: the user will not wait for the step
                raise KeyboardInterrupt
            if self.is_main and self.reason is None:  # os.write: a signal handler must not take logging's lock
                os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint; press it again to stop at once "
                            b"without one\n")
        self.reason = self.reason or signal.Signals(signum).name  # acted on at the next step's end

    def local(self) -> bool:
        """Whether this process was asked to stop: a signal, or (main process) the STOP file."""
        if self.reason is None and self.is_main and time.monotonic() - self._polled >= POLL_SECONDS:
            self._polled = time.monotonic()
            if self.file.exists():
                self.reason = f"{self.file}"
        return self.reason is not None

    def agreed(self) -> bool:
        """Collective: whether any rank was asked to stop."""
        return dist.any_rank(self.local())

    def served(self) -> None:
        """The run stopped with a checkpoint: the STOP file has done its work (a run resumed later
        must not stop again at once)."""
        if self.is_main:
            self.file.unlink(missing_ok=True)

    @property
    def requeue(self) -> bool:
        """Whether this process's stop asks its SLURM job to requeue itself (SIGUSR1 only)."""
        return self.reason == REQUEUE_SIGNAL

    def describe(self) -> str:
        return self.reason or "a stop request on another process"
