"""Training objectives as pure functions of tensors (docs/objective.md, docs/methods.md): no training
state, no collectives; batch-coupled terms take the gathered global batch as ``GlobalBatch``."""

from scbch_dist.losses.nacd import (
    class_thresholds,
    confidence_bce,
    confidence_from_neighbors,
    crch_loss,
    ema_confidence,
    ema_weight,
    reconstruct_confidence,
    reliable_labels,
)
from scbch_dist.losses.rshnl import center_terms, chl_loss, gce_mae, self_paced
from scbch_dist.losses.scbch import (
    GlobalBatch,
    bsch_loss,
    cscc_bank_rows,
    cscc_loss,
    cscc_weights,
    jaccard_similarity,
    quantization_loss,
    scbch_loss,
    weights_from_neighbors,
    at_least_float32,
)

__all__ = ["GlobalBatch", "bsch_loss", "center_terms", "chl_loss", "class_thresholds", "confidence_bce",
           "confidence_from_neighbors", "crch_loss", "cscc_bank_rows", "cscc_loss", "cscc_weights", "ema_confidence",
           "ema_weight", "gce_mae", "jaccard_similarity", "quantization_loss", "reconstruct_confidence",
           "reliable_labels", "scbch_loss", "self_paced", "weights_from_neighbors", "at_least_float32"]
