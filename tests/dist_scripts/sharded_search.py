"""torchrun --standalone --nproc_per_node 2 sharded_search.py OUT: the sharded search of every case of
``cases()`` (a random bank split unevenly over 2 ranks by non-contiguous ids) and one ring_shift of
uneven and empty blocks; each rank saves what it got to OUT/rank<r>.pt for the test to compare with
the unsharded search."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scbch_dist import dist as sdist
from scbch_dist.knn import KnnSettings, faiss_available
from scbch_dist.knn.sharded import knn_sharded

BACKENDS = ["torch"] + (["faiss-cpu"] if faiss_available() else [])


def dyadic(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, d) float32 random multiples of 2^-10 in (-1, 1). Every inner product of two rows (a sum
    of 16 multiples of 2^-20 below 16 in size) is exact in float32 whatever the order of the sum, so
    the search of a shard and of the whole bank (matmuls of other shapes, other BLAS kernels) give
    the same bits; normal random rows differ there by an ulp."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1023, 1024, (n, d), generator=g).float() / 1024


def bank(n: int = 157) -> torch.Tensor:
    return dyadic(n)


def split(n: int, first: int, seed: int = 1) -> list[torch.Tensor]:
    """The ids 0..n-1 in a random order, ``first`` of them to rank 0 and the rest to rank 1."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[:first], perm[first:]]


def cases() -> dict[str, dict]:
    """name -> k, each rank's ids (its shard, and the queries of a self search), extra queries."""
    extra = dyadic(13, seed=2)
    return {
        "uneven": {"k": 10, "ids": split(157, 100)},
        "small_shard": {"k": 10, "ids": split(157, 152)},  # rank 1: 5 rows, fewer than k + 1
        "empty_shard": {"k": 10, "ids": split(157, 157)},  # rank 1: no rows and no queries
        "k_plus_one_rows": {"k": 10, "ids": split(11, 7)},  # every row of the bank is a neighbour or the self
        "k_rows": {"k": 10, "ids": split(10, 7)},  # a search for k rows only: the self entry among them
        "no_self": {"k": 7, "ids": split(157, 60), "queries": [extra[:9], extra[9:]]},
    }


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    for name, case in cases().items():
        ids = case["ids"][rank]
        z = bank(sum(len(i) for i in case["ids"]))
        for backend in BACKENDS:
            settings = KnnSettings(knn=backend)
            if "queries" in case:
                out[name, backend] = knn_sharded(case["queries"][rank], z[ids], ids, case["k"], settings=settings)
            else:
                out[name, backend] = knn_sharded(z[ids], z[ids], ids, case["k"], self_index=ids, settings=settings)
    # a float16 bank (bank.float16_above): rows travel and are searched as float16 (dyadic rows are
    # exact in float16), and the gathered bank is exchanged in float16
    ids = cases()["uneven"]["ids"][rank]
    z16 = bank(157).half()
    out["float16"] = knn_sharded(z16[ids], z16[ids], ids, 10, self_index=ids, settings=KnnSettings(knn="torch"))
    out["gather_float16"] = sdist.gather_by_id({"id": ids, "z": z16[ids]}, 157)["z"]
    # blocks of 3 and 0 rows from rank 0, of 1 and 2 rows from rank 1
    blocks = [torch.arange(6.0).reshape(3, 2) + 10 * rank, torch.arange(2 * rank, dtype=torch.int64)]
    if rank == 1:
        blocks[0] = blocks[0][:1]
    out["ring"] = (blocks, sdist.ring_shift(blocks))
    torch.save(out, Path(sys.argv[1]) / f"rank{rank}.pt")
    dist.destroy_process_group()
