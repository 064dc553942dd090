"""Every collective of the project lives here: rank helpers, gathers (with and without gradient),
the gather of rows by sample id.

All helpers work unchanged in a single process (no process group): they return the input.
Gathers accept a different row count on every rank (the last batch of an epoch, the last part
of a pass) by exchanging the counts first and padding to the largest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_counts(n: int, device: torch.device) -> list[int]:
    """Every rank's ``n``, in rank order."""
    if not is_distributed():
        return [n]
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def _gather_padded(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    biggest = max(counts)
    if x.shape[0] < biggest:
        pad = x.new_zeros((biggest - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in counts]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenation of every rank's rows. Backward: the gradient of the *sum over ranks*
    of each rank's loss with respect to this rank's rows (all-reduce, then our slice), which is
    what makes local shares of a global-batch loss exact."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]):
        ctx.counts = counts
        ctx.rank = rank()
        return _gather_padded(x, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks; works on gloo (no reduce_scatter needed)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None


def gather_rows(x: torch.Tensor, *, with_grad: bool = False, counts: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` (n_r, ...) over ranks in rank order.

    Returns ``(gathered, offset)`` where ``offset`` is the first row of this rank's part.
    ``with_grad=True`` makes the gather differentiable as described in _GatherWithGrad.
    """
    if not is_distributed():
        return x, 0
    counts = counts if counts is not None else all_counts(x.shape[0], x.device)
    offset = sum(counts[: rank()])
    if with_grad:
        return _GatherWithGrad.apply(x, counts), offset
    with torch.no_grad():
        return _gather_padded(x, counts), offset


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; no gradient)."""
    if not is_distributed():
        return x.detach().clone()
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


_cpu_group = None  # a gloo group for small host-side agreements when the default group is NCCL


def _host_group():
    global _cpu_group
    if dist.get_backend() == "gloo":
        return None  # the default group already reduces CPU tensors
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo")  # collective: every rank reaches here at the same step
    return _cpu_group


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer). A CPU reduction, so
    asking after every step never waits for the GPU."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return bool(t.item())


def raise_together(error: Exception | None, elsewhere: str) -> None:
    """Collective: when any rank holds an error, raise it there and, on the other ranks, a
    RuntimeError saying ``elsewhere``, so that no rank waits forever in its next collective."""
    if any_rank(error is not None):
        raise error if error is not None else RuntimeError(elsewhere)


def sum_host(x: "np.ndarray") -> "np.ndarray":
    """Elementwise sum over ranks of a host (numpy) integer array, e.g. per-id counts."""
    if not is_distributed():
        return x
    t = torch.from_numpy(x.astype("int64", copy=True))
    dist.all_reduce(t, group=_host_group())
    return t.numpy()


def gather_by_id(part: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Every rank's rows, ordered by ``part["id"]`` (0..count-1, each exactly once), on every rank.

    ``part`` holds ``id`` (n,) int64 and any tensors with n rows; the order in which parts arrive
    never matters (dinov2's id-indexed gather)."""
    counts = all_counts(part["id"].shape[0], part["id"].device)
    gathered = {k: gather_rows(v, counts=counts)[0] for k, v in part.items()}
    order = torch.full((count,), -1, dtype=torch.int64, device=part["id"].device)
    order[gathered["id"]] = torch.arange(gathered["id"].shape[0], device=order.device)
    if gathered["id"].shape[0] != count or (order < 0).any():
        raise RuntimeError(f"a pass returned {gathered['id'].shape[0]} rows for {count} ids")
    return {k: v[order] for k, v in gathered.items() if k != "id"}
