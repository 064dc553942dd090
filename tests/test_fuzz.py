"""A short fuzz test of the digests (docs/engine.md, "Integrity"): random byte flips and
truncations in every kind of file a run or an index writes and later reads back. Each damage ends
either in one line ``prog: error: ...`` naming the damaged file (exit status 2), or in a result
identical to the undamaged one; never in a traceback, never in a silently different result.
Damages that cannot change a result by design (metrics.jsonl, log.txt, an older checkpoint) must
give the identical result.

One tiny reference run (2 epochs, its flat index built) is shared; every trial damages one file of
a fresh copy and runs, in-process, the readers of that file:

- resume to 3 epochs (checkpoint files, checkpoints/latest, config.yaml, metrics.jsonl, log.txt):
  the summary's final and best evaluations and the latest checkpoint's model and tables, exactly;
- ``search RUN --id 3 --json`` (codes.npz, index files, config.yaml): its output;
- ``index check RUN`` (codes.npz, index files, summary.json, config.yaml): exit status 0 and its
  table, timing columns aside;
- ``report RUNS_DIR`` (summary.json, config.yaml): report.md and report.csv, the run and an
  undamaged copy of it averaged as two runs of one seed (repeats, not seeds);
- ``index build RUN`` (codes.npz), then search and check on the rebuilt index.

The trials are drawn from one seeded generator per file; offsets are fractions of the file's size
(sizes differ by a few bytes between runs: timings), so each trial damages about the same place
every time. A test collects every failing trial and reports them together: file, damage, reader,
what happened.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import read_checkpoint, tiny_args
from scbch_dist import cli

pytestmark = pytest.mark.slow

SEED = 20240611
PROG = "prog"
RUN = "ref"  # the run folder's name, inside its runs folder (report reads a runs folder)
TWIN = "twin"  # a copy of it beside it: report averages the two as runs of one seed
CHECKPOINT = "checkpoints/epoch-0002"  # the latest of the reference run
OLDER = "checkpoints/epoch-0001"
INDEX = "index/database-flat"


# ----------------------------------------------------------------------------------------------
# damages


@dataclass(frozen=True)
class Damage:
    """One damage to one file. ``flip``: XOR one byte with ``value`` (nonzero); ``flip64``: XOR 64
    consecutive bytes (all of a shorter file) with nonzero bytes drawn from the seed ``value``;
    ``truncate``: cut the file to a length. Where: ``at``, a fraction of the file's size, or
    ``edge``, a byte offset (negative: from the end; for ``truncate``, the bytes cut off the end)."""

    op: str
    at: float = 0.0
    value: int = 0
    edge: int | None = None

    def apply(self, path: Path) -> str:
        data = bytearray(path.read_bytes())
        size = len(data)
        if self.op == "truncate":
            length = int(self.at * size) if self.edge is None else max(size + self.edge, 0)
            path.write_bytes(bytes(data[:length]))
            return f"truncated to {length} of {size} bytes"
        if self.edge is None:
            offset = int(self.at * size)
        else:
            offset = self.edge if self.edge >= 0 else size + self.edge
        offset = min(max(offset, 0), size - 1)
        if self.op == "flip":
            data[offset] ^= self.value
            path.write_bytes(bytes(data))
            return f"byte {offset} of {size} XOR {self.value:#04x}"
        assert self.op == "flip64", self.op
        count = min(64, size)
        start = min(max(offset - count // 2, 0), size - count)
        xors = np.random.default_rng([SEED, self.value]).integers(1, 256, size=count)
        for i, x in enumerate(xors.tolist()):
            data[start + i] ^= x
        path.write_bytes(bytes(data))
        return f"bytes {start}..{start + count - 1} of {size} XORed"


def damages(rel: str, flips: int, truncations: int, edges: int = 0) -> list[Damage]:
    """Seeded by the file's name: ``flips`` one-byte flips at random offsets and ``edges`` within
    the first or last 256 bytes (headers, a zip's directory, a digest line), 64 bytes flipped in
    the middle, truncation to 0, by the last byte (a final newline) and to ``truncations`` random
    lengths."""
    rng = np.random.default_rng([SEED, zlib.crc32(rel.encode())])
    out = [Damage("flip", float(rng.random()), int(rng.integers(1, 256))) for _ in range(flips)]
    out += [Damage("flip", value=int(rng.integers(1, 256)), edge=int(rng.integers(-256, 256)))
            for _ in range(edges)]
    out.append(Damage("flip64", 0.5, int(rng.integers(1 << 30))))
    out += [Damage("truncate", 0.0), Damage("truncate", edge=-1)]
    out += [Damage("truncate", float(rng.random())) for _ in range(truncations)]
    return out


# ----------------------------------------------------------------------------------------------
# running an entry point as its command line does


@dataclass
class Outcome:
    code: int | None  # SystemExit's status; None: it returned
    out: str
    err: str
    value: object = None  # what the entry point returned
    crash: str | None = None  # the traceback of any other exception


@contextlib.contextmanager
def working_dir(path: Path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def invoke(entry: Callable[[list[str]], object], argv: list[str], cwd: Path) -> Outcome:
    """``cli.run(lambda: entry(argv), "prog")`` with stdout and stderr captured, run in ``cwd`` (a
    damaged config may name a relative default path: whatever it writes stays in the trial's folder)."""
    out, err, box = io.StringIO(), io.StringIO(), {}
    code, crash = None, None
    with working_dir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run(lambda: box.update(value=entry(argv)), PROG)
        except SystemExit as e:
            code = e.code
        except BaseException:  # noqa: BLE001 - a traceback is what the fuzzing looks for
            crash = traceback.format_exc()
    return Outcome(code, out.getvalue(), err.getvalue(), box.get("value"), crash)


def judge(outcome: Outcome, rel: str, same: Callable[[Outcome], str | None],
          must_be_same: bool) -> tuple[str, str | None]:
    """("refused" | "same" | "wrong", what was wrong or None) for a reader's ``outcome`` after a
    damage to ``rel``. ``same(outcome)``: None when the result equals the undamaged one, else how
    it differs. ``must_be_same``: the damage cannot change the result, so a refusal is wrong too."""
    if outcome.crash is not None:
        return "wrong", f"traceback:\n{outcome.crash.rstrip()[-3000:]}"
    if outcome.code == cli.EXIT_ERROR:
        lines = outcome.err.strip().splitlines()
        error_lines = [line for line in lines if line.startswith(f"{PROG}: error: ")]
        if not lines or not lines[-1].startswith(f"{PROG}: error: ") or len(error_lines) != 1:
            return "wrong", (f"exit 2 without exactly one last line '{PROG}: error: ...'; stderr ends:\n"
                             f"{outcome.err[-1500:]}")
        if rel not in lines[-1]:
            return "wrong", f"the error line does not name {rel}: {lines[-1]}"
        if must_be_same:
            return "wrong", f"refused a damage that cannot change the result: {lines[-1]}"
        return "refused", None
    if outcome.code is not None:
        return "wrong", f"exit status {outcome.code!r}; stderr ends:\n{outcome.err[-1500:]}"
    differs = same(outcome)
    return ("same", None) if differs is None else ("wrong", f"a silently different result: {differs}")


@dataclass
class Reference:
    runs: Path  # the runs folder holding the reference run, RUN, and its copy, TWIN
    resume: dict  # final, best, model, tables after a resume to 3 epochs
    search: str
    check: str
    report: tuple[str, str]  # report.md (stdout), report.csv


def fresh_copy(ref: Reference, tmp_path_factory) -> Path:
    """A copy of the reference runs folder; returns the run folder in it."""
    runs = tmp_path_factory.mktemp("trial") / "runs"
    shutil.copytree(ref.runs, runs)
    return runs / RUN


# ---- the readers


def resume(run: Path) -> Outcome:
    from scbch_dist.train import main

    return invoke(main, ["--resume", str(run), "--set", "train.epochs=3"], run.parent.parent)


def resume_result(run: Path, outcome: Outcome) -> dict:
    model, tables, _ = read_checkpoint(run)
    summary = outcome.value
    return {"final": summary["final"], "best": summary["best"], "model": model, "tables": tables}


def tensors_differ(a: dict, b: dict) -> str | None:
    if sorted(a) != sorted(b):
        return f"tensor names {sorted(a)} vs {sorted(b)}"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    return f"tensors differ: {bad}" if bad else None


def same_resume(ref: Reference, run: Path) -> Callable[[Outcome], str | None]:
    def same(outcome: Outcome) -> str | None:
        got = resume_result(run, outcome)
        for key in ("final", "best"):
            if got[key] != ref.resume[key]:
                return f"summary '{key}': {got[key].get('avg_map')} vs {ref.resume[key].get('avg_map')} (avg mAP)"
        return tensors_differ(got["model"], ref.resume["model"]) or tensors_differ(got["tables"], ref.resume["tables"])
    return same


def search(run: Path) -> Outcome:
    from scbch_dist.retrieval.search import main

    return invoke(main, [str(run), "--id", "3", "--json"], run.parent.parent)


def check(run: Path) -> Outcome:
    from scbch_dist.retrieval.index import main

    return invoke(main, ["check", str(run)], run.parent.parent)


def check_table(stdout: str) -> str:
    """The check table without its two timing columns (index and numpy ms/query)."""
    return "\n".join("|".join(line.split("|")[:-3]) for line in stdout.strip().splitlines())


def build(run: Path) -> Outcome:
    from scbch_dist.retrieval.index import main

    return invoke(main, ["build", str(run)], run.parent.parent)


def report(run: Path) -> Outcome:
    from scbch_dist.experiments.report import main

    return invoke(main, [str(run.parent)], run.parent.parent)


def same_text(expected: str, what: str, transform=lambda s: s) -> Callable[[Outcome], str | None]:
    def same(outcome: Outcome) -> str | None:
        got = transform(outcome.out)
        return None if got == expected else f"{what} differs:\n{got[:800]}\n--- expected ---\n{expected[:800]}"
    return same


def same_report(ref: Reference, run: Path) -> Callable[[Outcome], str | None]:
    def same(outcome: Outcome) -> str | None:
        table = (run.parent / "report.csv").read_text()
        if (outcome.out, table) != ref.report:
            return (f"report differs (stderr: {outcome.err.strip()[:300]}):\n{outcome.out[:1200]}{table}\n"
                    f"--- expected ---\n{ref.report[0]}{ref.report[1]}")
        return None
    return same


# ----------------------------------------------------------------------------------------------
# the reference run


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> Reference:
    from scbch_dist.retrieval import index
    from scbch_dist.train import main

    runs = tmp_path_factory.mktemp("fuzz") / "runs"
    main(tiny_args(tiny_dataset, runs / RUN, "train.epochs=2", "eval.every=1", "run.tensorboard=false",
                   "run.progress=false"))
    index.build(runs / RUN, log=lambda *a: None)
    shutil.copytree(runs / RUN, runs / TWIN)
    for rel in (f"{CHECKPOINT}/manifest.json", f"{OLDER}/manifest.json", "checkpoints/latest", "config.yaml",
                "summary.json", "codes.npz", f"{INDEX}/index.json", "metrics.jsonl", "log.txt"):
        assert (runs / RUN / rel).is_file(), rel
    assert not (runs / RUN / "run.lock").exists()
    ref = Reference(runs, {}, "", "", ("", ""))

    # the undamaged result of each reader, from copies, as the trials run them
    run = fresh_copy(ref, tmp_path_factory)
    outcome = resume(run)
    assert outcome.code is None and outcome.crash is None, outcome.crash or outcome.err[-2000:]
    ref.resume = resume_result(run, outcome)
    assert ref.resume["final"]["epoch"] == 3

    run = fresh_copy(ref, tmp_path_factory)
    outcome = search(run)
    assert outcome.code is None and outcome.crash is None, outcome.crash or outcome.err
    assert outcome.out.lstrip().startswith("[") and '"rank": 10' in outcome.out
    ref.search = outcome.out

    outcome = check(run)
    assert outcome.code is None and outcome.crash is None, outcome.crash or outcome.err
    ref.check = check_table(outcome.out)
    assert ref.check.count("| yes |") == 2, ref.check  # both directions rank as metrics does

    outcome = report(run)
    assert outcome.code is None and outcome.crash is None, outcome.crash or outcome.err
    ref.report = (outcome.out, (run.parent / "report.csv").read_text())
    rows = list(csv.DictReader(io.StringIO(ref.report[1])))
    # one row: two runs of one seed (a copy repeats the seed; it is not a second one)
    assert [(r["method"], r["variant"], r["seeds"], r["runs"]) for r in rows] == [("SCBCH", "", "1", "2")], rows
    return ref


def fuzz(ref: Reference, tmp_path_factory, plan: dict[str, list[Damage]], trial) -> dict[str, Counter]:
    """For every file and damage of ``plan``: a fresh copy, the damage, then ``trial(run, rel)``,
    which yields (reader, judge(...)) for each reader it runs. Fails listing every wrong outcome;
    returns how the trials ended, per file ("refused", "same")."""
    failures, tally = [], {rel: Counter() for rel in plan}
    for rel, plan_damages in plan.items():
        for damage in plan_damages:
            run = fresh_copy(ref, tmp_path_factory)
            what = damage.apply(run / rel)
            for reader, (verdict, failure) in trial(run, rel):
                tally[rel][verdict] += 1
                if failure is not None:
                    failures.append(f"{rel}, {what} ({damage}), {reader}: {failure}")
            shutil.rmtree(run.parent.parent, ignore_errors=True)
    trials = sum(sum(c.values()) for c in tally.values())
    assert not failures, f"{len(failures)} of {trials} trials failed:\n\n" + "\n\n".join(failures)
    for rel, plan_damages in plan.items():
        assert sum(tally[rel].values()) >= len(plan_damages), (rel, tally[rel])  # every damage met a reader
    return tally


# ----------------------------------------------------------------------------------------------
# the trials, one test per reader


CHECKPOINT_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "tables.safetensors",
                    "run_state.json", "manifest.json")
HARMLESS = ("metrics.jsonl", "log.txt", f"{OLDER}/model.safetensors")  # a resume must give the same result
INDEX_FILES = ("index.json", "img.faissindex", "txt.faissindex", "ids.npy")
# files listed with their size or sha256 in manifest.json or index.json: any change is refused, never read
BYTE_DIGESTS = (*(f"{CHECKPOINT}/{n}" for n in CHECKPOINT_FILES if n != "manifest.json"),
                *(f"{INDEX}/{n}" for n in INDEX_FILES if n != "index.json"))


def test_resume_refuses_or_ends_as_the_undamaged_run(reference, tmp_path_factory):
    plan = {f"{CHECKPOINT}/{name}": damages(f"{CHECKPOINT}/{name}", 4, 1, edges=3) for name in CHECKPOINT_FILES}
    # latest names the checkpoint: one character changed names the older one (resumed from there,
    # the run ends the same) or one that is not there
    plan["checkpoints/latest"] = damages("checkpoints/latest", 6, 2) + [Damage("flip", value=0x03, edge=-2),
                                                                         Damage("flip", value=0x01, edge=-2)]
    plan["config.yaml"] = damages("config.yaml", 4, 2, edges=3) + [Damage("truncate", edge=-40)]  # into its digest
    plan["metrics.jsonl"] = damages("metrics.jsonl", 2, 1, edges=1)
    plan["log.txt"] = damages("log.txt", 1, 1)
    plan[f"{OLDER}/model.safetensors"] = damages(f"{OLDER}/model.safetensors", 1, 0)[:2]

    def trial(run: Path, rel: str):
        yield "resume", judge(resume(run), rel, same_resume(reference, run), must_be_same=rel in HARMLESS)

    tally = fuzz(reference, tmp_path_factory, plan, trial)
    for rel in plan:
        if rel in BYTE_DIGESTS:
            assert tally[rel]["same"] == 0, (rel, tally[rel])
        if rel not in HARMLESS:
            assert tally[rel]["refused"] > 0, (rel, tally[rel])
    assert tally["checkpoints/latest"]["same"] >= 1  # "epoch-0001": resumed from the older checkpoint


def test_search_and_check_refuse_a_damaged_index(reference, tmp_path_factory):
    plan = {f"{INDEX}/{name}": damages(f"{INDEX}/{name}", 12, 3, edges=8) for name in INDEX_FILES}

    def trial(run: Path, rel: str):
        yield "search", judge(search(run), rel, same_text(reference.search, "search output"), False)
        yield "index check", judge(check(run), rel, same_text(reference.check, "check table", check_table), False)

    tally = fuzz(reference, tmp_path_factory, plan, trial)
    for rel in plan:
        assert tally[rel]["refused"] > 0 and (rel not in BYTE_DIGESTS or tally[rel]["same"] == 0), (rel, tally[rel])


def test_codes_readers_refuse_damaged_codes(reference, tmp_path_factory):
    plan = {"codes.npz": damages("codes.npz", 30, 5, edges=30)}

    def trial(run: Path, rel: str):
        # the index built from the undamaged codes: refused unless the codes read back identical
        yield "search (old index)", judge(search(run), rel, same_text(reference.search, "search output"), False)
        outcome = build(run)
        yield "index build", judge(outcome, rel, lambda o: None, False)
        if outcome.code is None and outcome.crash is None:
            yield "search", judge(search(run), rel, same_text(reference.search, "search output"), False)
            yield "index check", judge(check(run), rel, same_text(reference.check, "check table", check_table), False)

    tally = fuzz(reference, tmp_path_factory, plan, trial)["codes.npz"]
    assert tally["refused"] >= len(plan["codes.npz"]), tally  # the old index refuses any change at least


def test_summary_and_config_readers_refuse_a_damaged_file(reference, tmp_path_factory):
    plan = {"summary.json": damages("summary.json", 12, 3, edges=8),
            "config.yaml": damages("config.yaml", 12, 3, edges=8)}

    def trial(run: Path, rel: str):
        yield "report", judge(report(run), rel, same_report(reference, run), False)
        yield "index check", judge(check(run), rel, same_text(reference.check, "check table", check_table), False)
        if rel == "config.yaml":
            yield "search", judge(search(run), rel, same_text(reference.search, "search output"), False)

    tally = fuzz(reference, tmp_path_factory, plan, trial)
    assert all(tally[rel]["refused"] > 0 for rel in plan), tally
