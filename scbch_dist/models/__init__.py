from scbch_dist.models.heads import HashHead, SCBCHModel, binary_codes

__all__ = ["HashHead", "SCBCHModel", "binary_codes"]
