"""Per-id training state: one row per training id, held whole by every rank (docs/distributed.md,
"Per-id state").

Methods declare their tables (SCBCH's sample weights, NACD's confidences); the engine also keeps
one for ``bank.refresh: memory`` (the latest [u, v] rows of the training batches). The engine calls
``sync`` on every table at the end of every epoch and checkpoints ``state_dict``.

Why whole tables on every rank: when the training shards divide evenly over the ranks, each id is
trained by exactly one rank per epoch, so a rank reads only rows it wrote itself this epoch or rows
every rank agreed on at the last sync; writing locally at once and exchanging at the epoch's end
then gives every rank the table one process would hold. When they do not, a rank that runs short
re-reads shards (data.pipeline), an id may be trained twice in an epoch, possibly on two ranks, and
the later write in rank order wins: the tables still agree on every rank.
"""

from __future__ import annotations

import torch

from scbch_dist import dist


class IdTable:
    """A table of ``count`` rows of shape ``row_shape``.

    ``update`` writes this rank's rows at once and remembers them; ``sync`` (a collective) writes
    every rank's remembered rows into every rank's table, the last write of an id winning, so that
    all ranks hold the same table again. ``assign`` sets the whole table from values already equal
    on every rank. ``seen`` marks ids ever written; ``coverage`` is the fraction of ids the last
    sync or assign wrote (rows of ids nobody wrote since keep their older values).

    ``state_dict`` is the table every rank agrees on (as of the last sync or assign: this rank's
    later writes undone) and ``pending_state`` this rank's writes since, so a checkpoint taken
    inside an epoch restores each rank's own view exactly: another rank may read, in a second pass
    over re-assigned shards, an id this rank wrote, and must still see the agreed row.
    """

    def __init__(self, count: int, row_shape: tuple[int, ...] = (), *, dtype: torch.dtype = torch.float32,
                 fill: float = 0.0, device: torch.device | str = "cpu"):
        self.values = torch.full((count, *row_shape), fill, dtype=dtype, device=device)
        self.seen = torch.zeros(count, dtype=torch.bool, device=device)
        self.coverage = 0.0
        self._ids: list[torch.Tensor] = []
        self._rows: list[torch.Tensor] = []
        self._old: list[torch.Tensor] = []  # the rows each update overwrote (to undo them)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.values[ids]

    @property
    def complete(self) -> bool:
        """Every id has been written at least once."""
        return bool(self.seen.all())

    def update(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """ids (n,) int64, rows (n, *row_shape): this rank's new rows (stored detached); an id given
        twice keeps its later row."""
        rows = rows.detach().to(self.values.dtype)
        self._old.append(self.values[ids])
        updated, last = self._last_writes(ids)
        self.values[updated] = rows[last[updated]]
        self._ids.append(ids.detach())
        self._rows.append(rows)

    def _last_writes(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids written, position of each id's last write): explicit, because index_put with repeated
        ids is unordered on GPUs."""
        position = torch.arange(ids.shape[0], device=ids.device)
        last = torch.full((self.values.shape[0],), -1, dtype=torch.int64, device=ids.device)
        last.scatter_reduce_(0, ids, position, reduce="amax")
        return last >= 0, last

    def assign(self, values: torch.Tensor) -> None:
        """The whole table at once, from values that are the same on every rank."""
        self.values.copy_(values)
        self.seen.fill_(True)
        self.coverage = 1.0
        self._ids, self._rows, self._old = [], [], []

    def sync(self) -> None:
        """Collective: every rank's rows written since the last sync into every rank's table."""
        ids, rows = self._pending()
        counts = dist.all_counts(ids.shape[0], self.values.device)
        ids, _ = dist.gather_rows(ids, counts=counts)
        rows, _ = dist.gather_rows(rows, counts=counts)
        # an id can arrive twice (a rank that re-read shards, or two ranks): the last arrival wins
        updated, last = self._last_writes(ids)
        self.values[updated] = rows[last[updated]]
        self.seen |= updated
        self.coverage = float(updated.float().mean())
        self._ids, self._rows, self._old = [], [], []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The agreed table: ``values`` with this rank's writes since the last sync undone."""
        values = self.values.clone()
        for ids, old in zip(reversed(self._ids), reversed(self._old)):
            values[ids] = old  # an id twice in one update has the same old row twice
        return {"values": values.cpu(), "seen": self.seen.cpu(),
                "coverage": torch.tensor(self.coverage, dtype=torch.float64)}

    def pending_state(self) -> dict[str, torch.Tensor]:
        """This rank's rows written since the last sync: what a checkpoint taken inside an epoch
        keeps per rank, so that the epoch's closing sync sees every write of the epoch."""
        ids, rows = self._pending()
        return {"ids": ids.cpu(), "rows": rows.cpu()}

    def _pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat(self._ids) if self._ids else torch.zeros(0, dtype=torch.int64, device=self.values.device)
        rows = torch.cat(self._rows) if self._rows else self.values.new_zeros((0, *self.values.shape[1:]))
        return ids, rows

    def load_pending(self, state: dict[str, torch.Tensor]) -> None:
        """Replay this rank's writes of a checkpoint taken inside an epoch (after load_state_dict)."""
        if len(state["ids"]):
            self.update(state["ids"].to(self.values.device), state["rows"].to(self.values.device))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["values"].shape != self.values.shape:
            raise ValueError(f"table of shape {tuple(state['values'].shape)}, expected {tuple(self.values.shape)}")
        self.values.copy_(state["values"])
        self.seen.copy_(state["seen"])
        self.coverage = float(state["coverage"])
        self._ids, self._rows, self._old = [], [], []
