"""Bit rows on disk: database codes or labels too large to hold, packed as the metrics pack them
(``metrics.pack_words``: uint64 words, bit l of a row at word l // 64, position l % 64) in a plain
.npy file, read a block of rows at a time (docs/evaluation.md, "Databases that do not fit").

Beside ``NAME.npy`` a sealed ``NAME.npy.json`` records the rows, the bits a row holds and the
sha256 of the words; ``PackedTable.blocks`` hashes what it reads and a pass that read the whole
table raises ``IntegrityError`` naming the file when the words differ from what was written. Each
block is a memory map of its own rows, closed once the next is handed out, so a pass holds a
block's pages (two at the hand-over), not the file's."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from scbch_dist.atomic import atomic_path
from scbch_dist.digests import IntegrityError, read_sealed_json, write_sealed_json

SIDECAR = ".json"  # NAME.npy's record: NAME.npy.json


@dataclass(frozen=True)
class PackedTable:
    """``rows`` rows of ``width`` bits (a code length, or a number of classes) in ``path``: (rows,
    ceil(width / 64)) uint64 words after the .npy header of ``offset`` bytes."""

    path: Path
    rows: int
    width: int
    offset: int
    sha256: str

    @property
    def words(self) -> int:
        return -(-self.width // 64)

    def stray_bits(self, block: np.ndarray) -> bool:
        """Whether a block's last word sets bits past ``width`` (packing pads them with 0; the
        kernels count them, and a distance past the code length would index past their arrays)."""
        return self.width % 64 != 0 and bool((np.asarray(block)[:, -1] >> np.uint64(self.width % 64)).any())

    def __len__(self) -> int:
        return self.rows

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width), as the bit array it packs (what the metrics check lengths against)."""
        return self.rows, self.width

    @classmethod
    def write(cls, path: str | Path, blocks: Iterable[np.ndarray], width: int) -> "PackedTable":
        """Write packed word blocks ((n_i, ceil(width / 64)) uint64 each, e.g. ``pack_words`` of
        bool rows; bits past ``width`` 0) one after another, atomically: the file appears under
        ``path`` only once complete, and its record right after it (a reader between the two finds
        the words and the record disagree: an IntegrityError, never a silent mix). Memory: one block."""
        from numpy.lib import format as npy

        path = Path(path)
        words = -(-width // 64)
        shape = cls(path, 0, width, 0, "")  # for its checks
        digest, rows = hashlib.sha256(), 0
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                header = {"descr": "<u8", "fortran_order": False, "shape": (1 << 62, words)}  # fixed width, set below
                npy.write_array_header_2_0(f, header)
                offset = f.tell()
                for block in blocks:
                    block = np.ascontiguousarray(block, dtype="<u8")
                    if block.ndim != 2 or block.shape[1] != words:
                        raise ValueError(f"{path}: a block of shape {block.shape}; rows of {words} uint64 words "
                                         f"({width} bits) expected")
                    if shape.stray_bits(block):
                        raise ValueError(f"{path}: rows {rows}-{rows + len(block) - 1} set bits past the width of "
                                         f"{width} (pack {width} bits a row, as metrics.pack_words does)")
                    digest.update(block.data)
                    f.write(block.data)
                    rows += len(block)
                f.seek(0)
                header["shape"] = (rows, words)
                npy.write_array_header_2_0(f, header)  # the same length: 2.0 headers pad to a fixed multiple
                if f.tell() != offset:
                    raise AssertionError("the .npy header changed length")
                f.flush()
                os.fsync(f.fileno())
        table = cls(path, rows, width, offset, digest.hexdigest())
        write_sealed_json(str(path) + SIDECAR, {"rows": rows, "width": width, "words": words, "words_sha256": table.sha256})
        return table

    @classmethod
    def open(cls, path: str | Path) -> "PackedTable":
        """The table at ``path``; a missing or truncated file, or one whose header disagrees with its
        record, is an IntegrityError naming it."""
        from numpy.lib import format as npy

        path = Path(path)
        if not path.is_file() or not Path(str(path) + SIDECAR).is_file():
            raise IntegrityError(f"{path}: no packed table here (the .npy and its {SIDECAR} record are both needed)")
        record = read_sealed_json(str(path) + SIDECAR)
        if not all(isinstance(record.get(key), int) for key in ("rows", "width")) or \
                not isinstance(record.get("words_sha256"), str):
            raise IntegrityError(f"{path}{SIDECAR}: not a packed table's record (rows, width, words_sha256)")
        with open(path, "rb") as f:
            try:
                read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}[npy.read_magic(f)]
                shape, fortran_order, dtype = read_header(f)
            except (KeyError, ValueError) as e:
                raise IntegrityError(f"{path}: not a .npy file of this version ({type(e).__name__}: {e})") from None
            offset = f.tell()
        rows, words = record["rows"], -(-record["width"] // 64)
        if shape != (rows, words) or dtype != np.dtype("<u8") or fortran_order:
            raise IntegrityError(f"{path}: holds {shape} {dtype}, its record says ({rows}, {words}) uint64")
        if path.stat().st_size != offset + rows * words * 8:
            raise IntegrityError(f"{path}: {path.stat().st_size} bytes, {offset + rows * words * 8} expected (truncated?)")
        return cls(path, rows, record["width"], offset, record["words_sha256"])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a read-only memory map of just those rows."""
        stop = min(stop, self.rows)
        if stop <= start:
            return np.zeros((0, self.words), np.uint64)
        return np.memmap(self.path, dtype="<u8", mode="r", offset=self.offset + start * self.words * 8,
                         shape=(stop - start, self.words))

    def blocks(self, rows: int) -> Iterator[tuple[slice, np.ndarray]]:
        """(slice, words) of every block of ``rows`` rows in order, each hashed as it is handed out;
        after the last, an IntegrityError if the words differ from those written (a caller that
        stops early has read unchecked words), and before any block that sets bits past the
        width (which no kernel may see)."""
        digest = hashlib.sha256()
        for start in range(0, self.rows, rows):
            block = self.read(start, start + rows)
            if self.stray_bits(block):
                raise IntegrityError(f"{self.path}: rows {start}-{start + len(block) - 1} set bits past the width "
                                     f"of {self.width} (changed or corrupted since written)")
            yield slice(start, start + len(block)), block
            digest.update(block)  # after the caller's work on it: its pages are then in memory
            del block
        if digest.hexdigest() != self.sha256:
            raise IntegrityError(f"{self.path}: its words differ from the sha256 they were written with "
                                 "(changed or corrupted since)")
