"""The index-tie ranking with torch kernels on the codes' device (a GPU's where the codes are; its
CPU run is what CI tests): distances and shared-label counts as matrix products, a stable sort per
query, and the ranking core's sums (``metrics.sums``) from cumulative sums over the ranking."""

from __future__ import annotations

import torch

from scbch_dist.metrics.codes import check_inputs
from scbch_dist.metrics.sums import QueryScores, RankSums
from scbch_dist.metrics.summary import k_points_of

DB_BLOCK = 1 << 20  # database rows per float32 block of score_queries_torch's products


def score_queries_torch(query_codes: torch.Tensor, db_codes: torch.Tensor, query_labels: torch.Tensor,
                        db_labels: torch.Tensor, *, topk: tuple[int, ...] | list[int] = (), curve_points: int = 16,
                        chunk_entries: int = 1 << 24) -> QueryScores:
    """``score_queries`` with torch kernels on the codes' device. Distances and shared-label counts
    are matrix products of +-1 codes and 0/1 labels, exact in float32 (integers below 2^24); queries
    go in chunks of about ``chunk_entries`` (query, item) pairs, which bounds memory at ~40 bytes a
    pair. Integer fields and NDCG equal ``score_queries``'; the APs agree to rounding (their
    precision sums run in another order)."""
    device = query_codes.device
    check_inputs(query_codes, db_codes, query_labels, db_labels)
    # the database stays in bytes (+-1 int8 codes, 0/1 labels): N x (L + C) bytes; float32 blocks of
    # DB_BLOCK rows are made for each product
    q_sign, d_sign = (query_codes > 0).float() * 2 - 1, (db_codes > 0).to(torch.int8) * 2 - 1
    if q_sign.shape[1] != d_sign.shape[1]:
        raise ValueError(f"code lengths differ: queries {q_sign.shape[1]} bits, database {d_sign.shape[1]} bits")
    q_lab, d_lab = (query_labels > 0).float(), (db_labels > 0).to(torch.uint8)
    bits, num_db, classes = q_sign.shape[1], len(d_sign), q_lab.shape[1]
    cuts: list[int | None] = [None, *(int(k) for k in topk)]
    k_points = k_points_of(num_db, topk, curve_points)
    size = max(1, min(len(q_sign), chunk_entries // num_db))
    parts = []
    with torch.autocast(device.type, enabled=False):
        for s in range(0, len(q_sign), size):
            dist = torch.empty(min(size, len(q_sign) - s), num_db, dtype=torch.long, device=device)  # (c, N)
            gains = torch.empty_like(dist)
            for a in range(0, num_db, DB_BLOCK):
                b = min(a + DB_BLOCK, num_db)
                dist[:, a:b] = ((bits - q_sign[s:s + size] @ d_sign[a:b].float().T) / 2).round().long()
                gains[:, a:b] = (q_lab[s:s + size] @ d_lab[a:b].float().T).round().long()
            rel = gains > 0
            c = len(dist)
            sums = RankSums.zeros(c, num_db, bits, cuts, k_points, bool(topk), classes)
            rows = torch.arange(c, device=device)[:, None]
            both = torch.bincount(((rows * (bits + 1) + dist) * 2 + rel).flatten(),
                                  minlength=c * (bits + 1) * 2).view(c, bits + 1, 2)
            order = torch.sort(dist.to(torch.int16 if bits < 1 << 15 else torch.int32), dim=1, stable=True).indices
            hits = rel.gather(1, order)
            cum = hits.cumsum(1)  # (c, N): relevant items among the first 1..N
            prec_sum, found = [], []
            for k in sums.cuts.tolist():
                kk = min(k, num_db)
                prec_sum.append((torch.where(hits[:, :kk], cum[:, :kk], 0).double()
                                 / torch.arange(1, kk + 1, device=device, dtype=torch.float64)).sum(1))
                found.append(cum[:, kk - 1])
            sums.count[:] = both.sum(2).cpu().numpy()
            sums.relevant[:] = both[:, :, 1].cpu().numpy()
            sums.prec_sum[:] = torch.stack(prec_sum, 1).cpu().numpy()
            sums.found[:] = torch.stack(found, 1).cpu().numpy()
            sums.hits[:] = cum[:, torch.from_numpy(sums.k_ascending).to(device) - 1].cpu().numpy()
            if sums.top_k:
                sums.top_gains[:] = gains.gather(1, order[:, :sums.top_k]).cpu().numpy()
                width = classes + 1
                sums.gain_counts[:] = torch.bincount((rows * width + gains).flatten(),
                                                     minlength=c * width).view(c, width).cpu().numpy()
            parts.append(sums.scores())
    return QueryScores.concatenate(parts)
