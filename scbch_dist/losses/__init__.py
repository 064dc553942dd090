"""SCBCH's objective as pure functions of tensors (see DESIGN.md, "SCBCH: the exact objective")."""

from scbch_dist.losses.scbch import (
    bsch_loss,
    cscc_bank_rows,
    cscc_loss,
    cscc_weights,
    jaccard_similarity,
    quantization_loss,
    scbch_loss,
    weights_from_neighbors,
)

__all__ = ["bsch_loss", "cscc_bank_rows", "cscc_loss", "cscc_weights", "jaccard_similarity", "quantization_loss", "scbch_loss",
           "weights_from_neighbors"]
