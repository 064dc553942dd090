"""What every entry point does with the errors it knows (docs/engine.md, "Errors and exit codes").

    if __name__ == "__main__":
        cli.run(main)

A known error (errors.ScbchError: config, data, noise, checkpoint, run folder) is printed as one
line, ``<prog>: error: <message>``, and the process exits with status 2, argparse's status for a
bad command line. A run stopped for preemption exits with 75 (EX_TEMPFAIL: try again), which the
SLURM launchers turn into a requeue. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from scbch_dist.errors import Preempted, ScbchError

EXIT_ERROR = 2
EXIT_PREEMPTED = 75


def one_line(error: BaseException) -> str:
    """The message on one line (a message that spans lines is joined with ' | ')."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__


def run(main: Callable[[], object], prog: str | None = None) -> None:
    """Call ``main``; a known error becomes one line on stderr and exit status 2."""
    prog = prog or sys.argv[0]
    try:
        main()
    except Preempted as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except ScbchError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
