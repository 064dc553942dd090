"""The known errors: bad input, a refused setting, a run that cannot go on as asked.

Every such error derives from ``ScbchError`` and carries a one-line message that names the file,
config key or sample at fault; the entry points (scbch_dist.cli) print it as that one line and
exit with status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ScbchError(Exception):
    """A known error whose message says everything the user needs (file, key or sample)."""


class RunDirError(ScbchError):
    """The run folder cannot be used as asked (held by another run, holds a different run, ...)."""


class LaunchError(ScbchError):
    """A launcher's option or its scheduler's environment (SLURM_NNODES, --gpus-per-node) cannot be used."""


class Preempted(ScbchError):
    """The run stopped on request (SIGTERM, SIGUSR1 or a STOP file) after writing a checkpoint;
    it continues with ``--resume``. Entry points exit with status 75 (EX_TEMPFAIL) for it.

    ``requeue``: whether the request asks the job to put itself back in the queue (SIGUSR1, the
    warning SLURM sends before the time limit). SIGTERM does not: it is what ``scancel`` sends, and
    SLURM requeues a preempted job itself (docs/distributed.md, "SLURM events")."""

    def __init__(self, message: str, *, requeue: bool = False):
        super().__init__(message)
        self.requeue = requeue


def first_line(error: BaseException) -> str:
    """The first line of a library exception's message (some append tracebacks or hints below it),
    or its type's name when it has none: what a one-line error quotes of its cause."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ConfigError(ScbchError, ValueError):
    """A setting of the config tree (a key, a value, a config file): the message names the key or file."""


class CodesError(ScbchError):
    """A run's codes (codes.npz) cannot be read as the run's: missing, damaged, or another run's."""
