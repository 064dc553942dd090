"""torchrun ... preempted_train.py STOP_AT RANK --set ...: the trainer, with SIGTERM delivered to
rank RANK only, right after its global step STOP_AT; exits 0 when the run stopped for preemption
(tests/test_preemption.py)."""

import os
import signal
import sys

from scbch_dist import cli
from scbch_dist.engine import loop
from scbch_dist.errors import Preempted
from scbch_dist.train import main

stop_at, stop_rank = int(sys.argv[1]), int(sys.argv[2])
train_step = loop.train_step
steps = 0


def signalled_step(*args, **kwargs):
    global steps
    result = train_step(*args, **kwargs)
    steps += 1
    if steps == stop_at and int(os.environ.get("RANK", 0)) == stop_rank:
        os.kill(os.getpid(), signal.SIGTERM)
    return result


loop.train_step = signalled_step
try:
    main(sys.argv[3:])
except Preempted as e:
    print(f"rank {os.environ.get('RANK')}: {e}", file=sys.stderr)
# leave as the entry points do (cli.leave): without the interpreter's teardown, in which gloo's
# threads aborted a finished run now and then ("terminate called without an active exception")
cli.leave(0)
