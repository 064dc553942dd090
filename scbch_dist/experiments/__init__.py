"""Many runs at once (docs/evaluation.md, docs/distributed.md): grids of runs (``sweep``), SLURM array
jobs (``slurm``) and the tables and plots over finished runs (``report``)."""
