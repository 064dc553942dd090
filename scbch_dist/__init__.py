"""scbch_dist: a distributed trainer for cross-modal hashing under noisy multi-label supervision."""

import os as _os

# torch's OpenMP threads (libgomp) spin about 300,000 times before they sleep when they wait for
# work; where other jobs share the cores, the spinning takes the cores from the work. The default
# run on 2 cores: 184 s at load 4 spinning, 65 s with 1,000 spins (the count libgomp itself takes
# when it sees more threads than cores); 18.5 and 19.3 s at load 0 (docs/engine.md, "Threads").
# OpenMP reads it when torch is first imported, so it is set here, before that; a user's
# GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "1000"
