"""Every collective of the project lives here: rank helpers, gathers (with and without gradient),
the gather of rows by sample id, the ring exchange of the sharded search (docs/distributed.md,
"Sharded search").

All helpers work unchanged in a single process (no process group): they return the input.
Gathers accept a different row count on every rank (the last batch of an epoch, the last part
of a pass) by exchanging the counts first and padding to the largest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from scbch_dist.errors import ScbchError


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


def share(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (shares in rank order cover 0..n-1 once; they
    differ in size by at most one)."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


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


def ring_shift(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One step around the ring: send each tensor to rank (r + 1) % W, receive rank (r - 1) % W's.

    Args:
        tensors: this rank's blocks, e.g. [(m_r, d), (m_r, k), (m_r, k)]; the row count (dim 0) may
            differ between ranks, the list length, trailing dims and dtypes must not. All on one
            device: CPU tensors on gloo, CUDA tensors on NCCL.
    Returns:
        rank (r - 1) % W's blocks, [(m_{r-1}, d), (m_{r-1}, k), (m_{r-1}, k)], new tensors on the same
        device. In a single process (or W = 1) the input itself.
    """
    if not is_distributed() or world_size() == 1:
        return list(tensors)
    send_to, recv_from = (rank() + 1) % world_size(), (rank() - 1) % world_size()
    # the row counts travel first (a few int64), so the receiver can allocate exactly
    counts = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64, device=tensors[0].device)
    incoming = torch.empty_like(counts)
    _send_recv([counts], [incoming], send_to, recv_from)
    received = [t.new_empty((n,) + tuple(t.shape[1:])) for t, n in zip(tensors, incoming.tolist())]
    # empty blocks are skipped on both sides (each side knows the count): no zero-byte messages
    _send_recv([t.contiguous() for t in tensors if t.numel()], [t for t in received if t.numel()], send_to, recv_from)
    return received


def _send_recv(send: list[torch.Tensor], recv: list[torch.Tensor], send_to: int, recv_from: int) -> None:
    """Post every send and receive together and wait for all: with each rank sending to its right
    neighbour while receiving from its left one, blocking calls in a fixed order could deadlock."""
    ops = [dist.P2POp(dist.isend, t, send_to) for t in send] + [dist.P2POp(dist.irecv, t, recv_from) for t in recv]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


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


class ReportedElsewhere(ScbchError):
    """What raise_together raises on a rank that held no error: a known error, so the entry point
    exits with status 2 and no traceback (scbch_dist.cli prints it on rank 0 only)."""


def raise_together(error: Exception | None, elsewhere: str) -> None:
    """Collective: when any rank holds an error, raise it there and, on the other ranks,
    ReportedElsewhere, so that no rank waits forever in its next collective.

    Only rank 0 prints a known error (scbch_dist.cli), so rank 0 learns the message: when it
    holds no error itself, its ReportedElsewhere carries the known error of the lowest rank that
    holds one (a bug keeps its traceback on its own rank; rank 0 then says ``elsewhere``). The
    other ranks' ReportedElsewhere says ``elsewhere``, for the launcher's failure report."""
    if not any_rank(error is not None):
        return
    if not is_distributed():
        raise error
    known = str(error) if isinstance(error, ScbchError) else None
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, known, group=_host_group())  # the failure path only: the rest pays one flag
    if error is not None:
        raise error
    if is_main():
        raise ReportedElsewhere(next((m for m in messages if m is not None), elsewhere))
    raise ReportedElsewhere(elsewhere)


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
