"""Re-score a finished run's codes under any protocol, on one process or many (docs/evaluation.md).

    python -m scbch_dist.evaluate RUN_DIR [--topk 50 100 5000] [--out FILE] [--encode [--data-root DIR]]
    torchrun --nproc_per_node 2 -m scbch_dist.evaluate RUN_DIR --out FILE
    accelerate launch -m scbch_dist.evaluate RUN_DIR --out FILE

Reads RUN_DIR/codes.npz (its digest and its config checked against the run's), or with --encode
encodes the query and database splits again with the run's latest checkpoint (the model that wrote
codes.npz, checked by its fingerprint; every rank encodes its share) and reports whether the codes
come out the same ("encoded": equal, bits_differing). It ranks the database
for every query in both directions and writes one JSON: every metric of both directions (mAP@all
with index ties and tie-aware, and per K of --topk mAP@K, precision@K, recall@K, NDCG@K; the
precision-recall curves), the protocol card that says what each number means, the chance mAP,
and the sha256 of the codes and of the model that wrote them. Under a launcher every process
scores its share of the queries; the numbers are those of one process, to the last bit. Without
--out the JSON goes to stdout. A run without codes, or with damaged ones, is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from scbch_dist import cli, dist
from scbch_dist.atomic import atomic_write_json
from scbch_dist.engine.scoring import SELECTION, protocol, score_codes
from scbch_dist.engine.runlog import json_safe
from scbch_dist.metrics import chance_map
from scbch_dist.engine.scoring import RunCodes
from scbch_dist.run import RunFolder


def score_run(run: RunCodes, topk: list[int], device: torch.device, *, encode: bool = False,
              data_root: Path | None = None) -> dict:
    """Collective: the evaluation record of a run's codes, or with ``encode`` of its checkpoint's
    codes encoded again (the main process's; {} on the others)."""
    t0 = time.perf_counter()
    codes, q_lab, d_lab = run.codes, run.labels["query"], run.labels["database"]
    encoded = None
    if encode:
        fresh, encoded = encode_run(run, data_root, device)
        codes = {k: fresh[k] for k in run.codes}
    result = score_codes(codes, q_lab, d_lab, topk=topk, device=device)
    if not dist.is_main():
        return {}
    card = protocol(len(q_lab), len(d_lab), topk)
    card["selection"] = {"codes": ("codes encoded again from the run's latest checkpoint" if encode else
                                   f"the run's final codes ({RunFolder.CODES})") + ": " + SELECTION["final"]}
    return json_safe({
        "run": str(run.run_dir), "codes_sha256": run.sha256, "model_sha256": run.model_sha256, "bits": run.bits,
        "protocol": card,
        **result,
        "chance_map": chance_map(q_lab, d_lab),
        **({"encoded": encoded} if encoded is not None else {}),
        "world_size": dist.world_size(),
        "seconds": time.perf_counter() - t0,
    })


def encode_run(run: RunCodes, data_root: Path | None, device: torch.device) -> tuple[dict, dict]:
    """Collective: the query and database codes of the run's latest checkpoint, encoded again by
    every rank's share of an exactly-once pass over its dataset (as the run evaluates). Returns the
    codes (engine.scoring.encode_codes', by id) and whether they equal the stored ones, as
    ``{"equal": bool, "bits_differing": int}``."""
    from scbch_dist.config import load_run_config
    from scbch_dist.data.format import read_meta
    from scbch_dist.data.transforms import make_transforms
    from scbch_dist.engine.encode import autocast_of
    from scbch_dist.engine.scoring import encode_codes
    from scbch_dist.models.tokenizers import make_tokenizer
    from scbch_dist.retrieval.query import QueryEncoder
    folder = RunFolder(run.run_dir)
    cfg = load_run_config(folder.config)
    root = folder.dataset(cfg.data, data_root, served_ok=True)
    meta = read_meta(root)
    tokenizer = make_tokenizer(cfg.model, root) if meta.kind("txt") == "text" else None
    _, transform = make_transforms(cfg.model.image, meta, tokenizer)
    model = QueryEncoder(cfg, root, meta, run.run_dir, run.model_sha256).model.to(device)  # fingerprint checked
    codes = encode_codes(model, root, meta, batch_size=cfg.eval.batch_size, device=device, transform=transform,
                         autocast=autocast_of(run.precision, device))
    differing = sum(int((codes[k] != run.codes[k]).sum()) for k in run.codes)
    return codes, {"equal": differing == 0, "bits_differing": differing}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help=f"a finished run's folder (it holds {RunFolder.CODES})")
    p.add_argument("--topk", type=int, nargs="*", default=None, metavar="K",
                   help="the cut-offs K of mAP@K, precision@K, recall@K and NDCG@K (default: the run's eval.topk)")
    p.add_argument("--out", type=Path, help="write the JSON here (atomically) instead of to stdout")
    p.add_argument("--encode", action="store_true",
                   help="score codes encoded again from the run's latest checkpoint and its dataset (every rank "
                        f"encodes its share), and report whether they equal {RunFolder.CODES}")
    p.add_argument("--data-root", type=Path, help="with --encode: the dataset folder, when not the run's data.root")
    args = p.parse_args(argv)
    if args.topk is not None and any(k < 1 for k in args.topk):
        p.error(f"--topk takes positive integers, got {args.topk}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from accelerate import PartialState

    state = PartialState()  # the process group under torchrun / accelerate launch; one process otherwise
    try:
        run = RunCodes.load(args.run_dir)
        topk = args.topk if args.topk is not None else list(run.config.get("eval", {}).get("topk") or [])
        record = score_run(run, sorted(set(topk)), state.device, encode=args.encode, data_root=args.data_root)
        if dist.is_main():
            if args.out:
                atomic_write_json(args.out, record)
                print(f"avg mAP {record['avg_map']:.4f} (I2T {record['i2t']['map']:.4f}, T2I {record['t2i']['map']:.4f}); "
                      f"{record['world_size']} process(es), {record['seconds']:.1f} s. Wrote {args.out}", file=sys.stderr)
            else:
                json.dump(record, sys.stdout, indent=1)
                sys.stdout.write("\n")
        dist.barrier()  # every rank leaves together (train.py says why)
        return record
    finally:
        state.destroy_process_group()


def console() -> None:
    """The ``scbch-evaluate`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-evaluate")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.evaluate")
