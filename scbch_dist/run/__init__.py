"""A run's folder as a type (run/folder.py): the one place that names a run's files."""

from scbch_dist.run.folder import CODES_DIGEST, RunFolder

__all__ = ["CODES_DIGEST", "RunFolder"]
