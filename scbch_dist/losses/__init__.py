"""Training objectives as pure functions of tensors (docs/objective.md): no training state, no
collectives; batch-coupled terms take the gathered global batch as ``Columns``."""

from scbch_dist.losses.scbch import (
    Columns,
    bsch_loss,
    cscc_bank_rows,
    cscc_loss,
    cscc_weights,
    jaccard_similarity,
    quantization_loss,
    scbch_loss,
    weights_from_neighbors,
    wide,
)

__all__ = ["Columns", "bsch_loss", "cscc_bank_rows", "cscc_loss", "cscc_weights", "jaccard_similarity",
           "quantization_loss", "scbch_loss", "weights_from_neighbors", "wide"]
