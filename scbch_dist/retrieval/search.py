"""Search a run's database: a caption finds images, an image finds captions (docs/search.md).

    python -m scbch_dist.retrieval.search RUN_DIR --text "a red circle" [-k 10] [--json]
    python -m scbch_dist.retrieval.search RUN_DIR --image photo.jpg
    python -m scbch_dist.retrieval.search RUN_DIR --id 17 [--modality txt|img] [--from query|database]

The query is encoded with the run's trained model (scbch_dist.retrieval.query) and searched in the other
modality's index of the database (``python -m scbch_dist.retrieval.index build RUN_DIR`` first; --kind
picks among built ones). ``--id`` takes the stored code of a sample of the run's codes (the query
split by default) and needs no model. Prints rank, id, Hamming distance, labels and, for datasets
that hold them, the caption and where the image is stored; ``--json`` prints a JSON list, best
first, of {rank, id, distance, labels, caption, image}. Unknown words, unreadable images and a run
without codes or index are one-line errors (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scbch_dist import cli
from scbch_dist.config import IndexSettings, load_run_config
from scbch_dist.data.format import read_meta
from scbch_dist.retrieval.hamming import HammingIndexError
from scbch_dist.retrieval.index import CODE_SPLITS, RunCodes, RunIndex
from scbch_dist.retrieval.query import MAX_PIXELS, DatasetItems, QueryEncoder, QueryError, read_image
from scbch_dist.run import RunFolder

OTHER = {"img": "txt", "txt": "img"}


@dataclass
class Hit:
    rank: int  # 1-based
    id: int  # database sample id
    distance: int  # Hamming distance to the query code
    labels: list[str]  # class names of the item's clean labels
    caption: str | None  # the item's text, where the dataset holds texts
    image: str | None  # where its image is stored (shard.tar:member), where the dataset holds images


@dataclass
class Result:
    query: str  # what was asked, for the record
    modality: str  # of the query: "txt" or "img"; the hits are of the other modality
    hits: list[Hit]
    encode_ms: float  # encoding the query (0 for a stored code)
    search_ms: float  # the index search

    def to_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """A run opened for searching: codes, the database index of each modality, the query
    encoder (its model loads on the first encoded query) and the dataset's items."""

    def __init__(self, run_dir: str | Path, *, kind: str = IndexSettings.kind, data_root: str | Path | None = None,
                 overrides: dict | None = None, max_pixels: int = MAX_PIXELS):
        self.run_dir = Path(run_dir)
        self.codes = RunCodes.load(self.run_dir)
        self.index = RunIndex.open(self.run_dir, self.codes, split="database", kind=kind, overrides=overrides)
        self.cfg = load_run_config(self.run_dir / "config.yaml")
        self.root = RunFolder(self.run_dir).dataset(self.cfg.data, data_root)
        self.meta = read_meta(self.root)
        if self.meta.num_classes != self.codes.labels["database"].shape[1]:
            raise HammingIndexError(f"{self.root}: {self.meta.num_classes} classes, but {RunFolder(self.run_dir).codes} has "
                                    f"{self.codes.labels['database'].shape[1]}: not the run's dataset")
        self.items = DatasetItems(self.root, self.meta)
        self.encoder = QueryEncoder(self.cfg, self.root, self.meta, self.run_dir, self.codes.model_sha256,
                                    max_pixels=max_pixels, precision=self.codes.precision)

    def describe(self) -> dict:
        """What the page and the command line show about the run."""
        enc = self.encoder
        return {"run": str(self.run_dir), "dataset": self.meta.name, "method": self.cfg.method.name,
                "bits": self.codes.bits, "database": len(self.index.ids), "queries": len(self.codes.labels["query"]),
                "kind": self.index.record["kind"], "classes": list(self.meta.classes),
                "text_queries": enc.text_recipe() is None, "image_queries": enc.image_recipe() is None,
                "captions": self.items.has_captions, "images": self.items.has_images}

    def _hits(self, code: np.ndarray, modality: str, k: int) -> tuple[list[Hit], float]:
        target = OTHER[modality]
        t0 = time.perf_counter()
        distances, ids = self.index.search(target, code, k)
        ms = 1000 * (time.perf_counter() - t0)
        labels = self.codes.labels["database"]
        hits = []
        for rank, (d, i) in enumerate(zip(distances[0].tolist(), ids[0].tolist()), 1):
            if i < 0:
                break
            names = [self.meta.classes[c] for c in np.flatnonzero(labels[i])]
            hits.append(Hit(rank, i, d, names, self.items.caption("database", i),
                            self.items.image_path("database", i)))
        return hits, ms

    def search_text(self, text: str, k: int = 10) -> Result:
        t0 = time.perf_counter()
        code = self.encoder.encode_text(text)
        encode_ms = 1000 * (time.perf_counter() - t0)
        hits, ms = self._hits(code, "txt", k)
        return Result(text, "txt", hits, encode_ms, ms)

    def search_image(self, data: bytes, k: int = 10, name: str = "the image") -> Result:
        t0 = time.perf_counter()
        code = self.encoder.encode_image(data, name)
        encode_ms = 1000 * (time.perf_counter() - t0)
        hits, ms = self._hits(code, "img", k)
        return Result(name, "img", hits, encode_ms, ms)

    def search_id(self, sample: int, k: int = 10, *, modality: str = "txt", split: str = "query") -> Result:
        """The stored code of ``split`` sample ``sample``'s ``modality`` as the query."""
        if split not in CODE_SPLITS:
            raise QueryError(f"--from {split!r}: the run's codes hold {' and '.join(CODE_SPLITS)}")
        codes = self.codes.codes[f"{split}_{modality}"]
        if not 0 <= sample < len(codes):
            raise QueryError(f"--id {sample}: the {split} split has ids 0..{len(codes) - 1}")
        hits, ms = self._hits(codes[sample: sample + 1], modality, k)
        what = self.items.caption(split, sample) if modality == "txt" else self.items.image_path(split, sample)
        labels = ", ".join(self.meta.classes[c] for c in np.flatnonzero(self.codes.labels[split][sample]))
        return Result(f"{split} sample {sample} ({'text' if modality == 'txt' else 'image'}"
                      + (f": {what}" if what else "") + f"; labels {labels})", modality, hits, 0.0, ms)


def format_table(result: Result) -> str:
    """Rank, id, distance, labels, and the caption and image where the dataset holds them."""
    lines = [f"query: {result.query}  ({'text -> images' if result.modality == 'txt' else 'image -> texts'}; "
             f"encode {result.encode_ms:.1f} ms, search {result.search_ms:.2f} ms)"]
    width = max([len(", ".join(h.labels)) for h in result.hits] + [6])
    lines.append(f"{'rank':>4}  {'id':>8}  {'dist':>4}  {'labels':<{width}}  item")
    for h in result.hits:
        item = "  ".join(x for x in (h.image, f'"{h.caption}"' if h.caption is not None else None) if x)
        lines.append(f"{h.rank:>4}  {h.id:>8}  {h.distance:>4}  {', '.join(h.labels):<{width}}  {item}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.retrieval.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption or tags: finds images")
    query.add_argument("--image", type=Path, help="an image file: finds texts")
    query.add_argument("--id", type=int, help="a stored sample's code (of --from, default the query split)")
    p.add_argument("--modality", choices=("txt", "img"), default="txt",
                   help="with --id: the sample's text code (finds images, the default) or image code")
    p.add_argument("--from", dest="split", choices=CODE_SPLITS, default="query", help="with --id: its split")
    p.add_argument("-k", type=int, default=10, help="results (default 10)")
    p.add_argument("--kind", default=IndexSettings.kind, help="which built index (default flat)")
    p.add_argument("--nprobe", type=int, help="ivf: lists scanned (default: as built)")
    p.add_argument("--ef-search", dest="ef_search", type=int, help="hnsw: search beam (default: as built)")
    p.add_argument("--hash-flips", dest="hash_flips", type=int, help="hash: bit flips per table (default: as built)")
    p.add_argument("--data-root", help="the run's dataset folder, if not at its data.root from here")
    p.add_argument("--json", action="store_true", help="print the hits as a JSON list, best first")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, default=MAX_PIXELS,
                   help=f"--image: refuse images of more pixels, width x height (default {MAX_PIXELS:,})")
    args = p.parse_args(argv)
    if args.max_pixels < 1:
        p.error("--max-pixels must be at least 1")
    searcher = Searcher(args.run_dir, kind=args.kind, data_root=args.data_root, overrides=vars(args),
                        max_pixels=args.max_pixels)
    if args.text is not None:
        result = searcher.search_text(args.text, args.k)
    elif args.image is not None:
        result = searcher.search_image(read_image(args.image, args.max_pixels), args.k, str(args.image))
    else:
        result = searcher.search_id(args.id, args.k, modality=args.modality, split=args.split)
    if args.json:
        json.dump([asdict(h) for h in result.hits], sys.stdout, indent=1)
        print()
    else:
        print(format_table(result))


def console() -> None:
    """The ``scbch-search`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-search")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.retrieval.search")
