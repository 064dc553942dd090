"""What every entry point does with the errors it knows (docs/engine.md, "Errors and exit codes").

    if __name__ == "__main__":
        cli.run(main)

A known error (errors.ScbchError: config, data, noise, checkpoint, run folder) is printed as one
line, ``<prog>: error: <message>``, and the process exits with status 2, argparse's status for a
bad command line. So is an OSError in which the file system refuses the run (no space, no
permission, a path that does not exist or is not a folder): it names the file and the reason. A
run stopped for preemption exits with 75 (EX_TEMPFAIL: try again), which the SLURM launchers turn
into a requeue. Anything else is a bug and keeps its traceback.

Under a launcher (torchrun, accelerate launch) only global rank 0 prints the line; every rank
exits with the same status (docs/distributed.md, "Errors under a launcher").
"""

from __future__ import annotations

import errno
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from scbch_dist.errors import Preempted, ScbchError

EXIT_ERROR = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program Ctrl-C ended
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a program whose reader went away
RANK_ZERO_GRACE_S = 10.0  # how long another rank waits, under a launcher, for rank 0 to fail and print (report)
# ``kill -USR2 PID`` prints every thread's stack of that process to stderr and the run goes on: how
# to see where a run that seems stuck waits (a collective, a loader worker). SIGUSR1 asks a run to
# stop (engine/stop.py), so the dump has the other user signal. Loader workers inherit it.
STACKS_SIGNAL = getattr(signal, "SIGUSR2", None)  # absent on Windows
# SLURM may send its time-limit warning (SIGUSR1) in a job's first second. The batch scripts
# (launch/slurm.sbatch, a sweep's array script) start Python with SIGUSR1 ignored, so that an early
# warning cannot kill it, and write this file when warned: whoever then catches the signal itself
# (the SLURM launcher, a run's stop request) reads the file to learn of a warning that came before.
# The script passes a warning on as a signal only once FILE.listening exists: before that, the
# command may still be a shell that has not yet ignored the signal (srun starts it), and dies of it.
WARNING_FILE_VARIABLE = "SCBCH_WARNING_FILE"

# OSErrors in which the file system refuses what the run asked of it, for a reason the user fixes
# outside the program: space (ENOSPC, EDQUOT, EFBIG: a file-size limit), permission (EROFS,
# EACCES, EPERM), or a path that is missing or of the wrong kind (ENOENT, ENOTDIR, EISDIR, and
# EEXIST: pathlib's mkdir reports a file in the way of a folder so). The file and the reason are
# all a traceback would tell the user. The rest (EIO, EBADF, EINVAL, ENOMEM, sockets ...) point
# at hardware or at a bug and keep their traceback. ENOENT hides the traceback of a bug that
# loses its own file, too; the line still names that file, and missing inputs are far commoner.
FILE_SYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST})


def warned_before_start(*, listening: bool = True) -> bool:
    """Whether this job's batch script was warned before this process caught SIGUSR1 (above).
    ``listening``: this process has its handler in place, and first tells the script so
    (FILE.listening), then looks for the warning: a warning is either in the file by now or
    passed on as a signal, never lost."""
    path = os.environ.get(WARNING_FILE_VARIABLE)
    if not path:
        return False
    # the script runs on the job's node 0 and removes the file at its end; on another node, a
    # file in that node's own folder would be litter that nothing reads
    if listening and os.environ.get("SLURM_NODEID", "0") == "0":
        try:
            Path(f"{path}.listening").touch()
        except OSError as e:  # the script could not write its file there either: it passes warnings on at once
            print(f"scbch_dist: cannot tell the batch script that this process listens ({file_system_error(e)})",
                  file=sys.stderr)
    return os.path.exists(path)


def one_line(error: BaseException | str) -> str:
    """The message on one line (a message that spans lines is joined with ' | ')."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__


def file_system_error(error: OSError) -> str:
    """One line for an OSError: the file(s) and the system's reason."""
    reason = error.strerror or one_line(error)
    files = [str(name) for name in (error.filename, error.filename2) if name is not None]
    if error.errno == errno.EEXIST and files and not os.path.isdir(files[0]):
        reason += " and is not a folder"  # "File exists" alone reads as if something else went wrong
    if not files:  # a write to an open file (a full disk, mostly) carries no name
        return f"{reason} ({errno.errorcode.get(error.errno, error.errno)}; the system named no file)"
    return f"{' -> '.join(files)}: {reason}"


def launch_rank() -> int:
    """This process's global rank: torch.distributed's once its process group is up, before that
    the RANK that torchrun and accelerate launch give every worker, else 0 (no launcher)."""
    # torch is not imported here: an entry point that never loaded it has no process group
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _record_for_launcher(line: str) -> bool:
    """Write ``line`` to the error file torchrun's agent gives each worker (TORCHELASTIC_ERROR_FILE),
    so that its failure report shows it for this rank instead of a link to its docs. The format is
    what torch.distributed.elastic's own ErrorHandler writes, without the call stack (the report
    shows the message when there is none). Returns whether it was written."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    record = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        return False  # the launcher's report says less; this rank prints the line itself instead
    return True


def report(line: str, status: int) -> None:
    """Print ``line`` once per run and exit with ``status``. Rank 0 prints; another rank leaves its
    line to the launcher's failure report (the error file), where the user still finds an error
    that rank 0 did not share, and prints it only where no launcher would show it."""
    recorded = _record_for_launcher(line)
    if launch_rank() == 0 or not recorded:
        print(line, file=sys.stderr, flush=True)
    elif status != EXIT_PREEMPTED and RANK_ZERO_GRACE_S > 0:
        # The launcher stops every worker as soon as one has failed; had this rank gone first,
        # rank 0, a little slower to the same error, would be stopped before it printed. So wait
        # for the launcher's SIGTERM (rank 0 has failed too) and leave with the same status then.
        # Not after a preemption: every rank stops at the same step, after the checkpoint they
        # wrote together, and the time left before the scheduler's kill is better not spent here.
        signal.signal(signal.SIGTERM, lambda *_: leave(status))
        time.sleep(RANK_ZERO_GRACE_S)
    leave(status)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered
    does not fail on the closed pipe again (and print "Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind sys.stdout
        pass


def _stacks_on_signal() -> None:
    """``kill -USR2 PID`` prints this process's stacks (``STACKS_SIGNAL``), where stderr is a file
    descriptor: not where a caller has replaced sys.stderr (a captured test, an embedding program)."""
    if STACKS_SIGNAL is None:
        return
    try:
        faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError and a ValueError
        pass


def leave(status: int) -> None:
    """Exit with ``status``. A worker of a multi-process launch (WORLD_SIZE > 1) flushes its output
    and skips the interpreter's teardown (os._exit): gloo's worker threads may still hold the last
    reference to a collective's tensor then, and freeing it needs the GIL, which a finalizing
    interpreter no longer gives, so the process aborted ("terminate called without an active
    exception", SIGABRT) after a run that had finished, in 8 of 270 two-process runs (0 of 180 since).
    Everything the run wrote is closed by then (loader workers, trackers, log files)."""
    if _world_size() <= 1:
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _no_progress_monitor() -> None:
    """No tqdm monitor thread (it only warns about stalled bars): it ends whenever no bar is open,
    and a loader forking its workers as a thread ends can deadlock (data.pipeline._shut_down)."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0


def run(main: Callable[[], object], prog: str | None = None) -> None:
    """Call ``main``; a known error becomes one line on stderr and exit status 2 (75: preempted)."""
    prog = prog or sys.argv[0]
    _stacks_on_signal()
    _no_progress_monitor()
    try:
        main()
        if _world_size() > 1:
            leave(0)
    except Preempted as e:
        report(f"{prog}: {one_line(e)}", EXIT_PREEMPTED)
    except BrokenPipeError:  # the reader of the output went away (`search --json | head`): nothing to tell it
        _stdout_to_devnull()
        leave(EXIT_BROKEN_PIPE)
    except KeyboardInterrupt:  # Ctrl-C outside a run's steps, or a second one inside (engine/stop.py)
        report(f"{prog}: interrupted (Ctrl-C)", EXIT_INTERRUPTED)
    except ScbchError as e:
        report(f"{prog}: error: {one_line(e)}", EXIT_ERROR)
    except OSError as e:
        if e.errno not in FILE_SYSTEM_ERRNOS:
            raise
        report(f"{prog}: error: {file_system_error(e)}", EXIT_ERROR)
