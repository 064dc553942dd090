"""The numeric options of ``python -m scbch_dist.retrieval.index`` (docs/search.md, "The index"):
each is checked against its range before any work, and a value out of it is one line naming the
option, the value and the range, exit status 2, with no file left behind. Before, FAISS took them
as they came: ``--hnsw-m 0`` aborted the process and left a .tmp folder, ``--nprobe -1`` was an
OverflowError, ``check -k 0`` printed recall nan and exited 0, ``-k -1`` printed recall -1499, and a
hash index asked to flip more bits than its tables have never returned."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss")

from scbch_dist.config import IndexSettings  # noqa: E402
from scbch_dist.retrieval import hamming, index  # noqa: E402
from scbch_dist.retrieval.hamming import HammingIndexError  # noqa: E402
from scbch_dist.retrieval.search import main as search_main  # noqa: E402
from conftest import one_line_exit, run_with_codes  # noqa: E402

HUGE = str(10**12)  # what would make FAISS allocate without limit (nlist: a bad_alloc), or overflow its C int


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run's codes (400 database codes of 24 bits) with an index of every kind, so that
    check reaches FAISS with the option it is given. The hash index has tables of 8 bits."""
    path = tmp_path_factory.mktemp("index-options") / "run"
    run_with_codes(path)
    for kind in hamming.KINDS:
        index.build(path, settings=IndexSettings(kind=kind), log=lambda *_: None)
    return path


def files(path: Path) -> list[Path]:
    return sorted(p.relative_to(path) for p in path.rglob("*"))


def assert_refused(capsys, run: Path, argv: list[str], flag: str, value: str) -> None:
    """The command line refuses ``flag value`` in one line with its range, exit 2, and writes nothing."""
    before = files(run)
    line = one_line_exit(capsys, index.main, argv)
    assert re.match(rf"{re.escape(flag)} {re.escape(value)}: must be -?[\d.]+ to [\d.]+\b", line), line
    assert files(run) == before  # neither an index folder nor a lock
    assert not [p for p in files(run) if ".tmp" in p.name]


BUILD = [  # (kind, option, value): each kind's own options, so that the old code reached FAISS with them
    ("ivf", "--nlist", "-1"), ("ivf", "--nlist", HUGE),
    ("ivf", "--nprobe", "0"), ("ivf", "--nprobe", "-1"), ("ivf", "--nprobe", HUGE),
    ("ivf", "--seed", "-1"), ("ivf", "--seed", str(2**31)),
    ("hnsw", "--hnsw-m", "0"), ("hnsw", "--hnsw-m", "1"), ("hnsw", "--hnsw-m", HUGE),
    ("hnsw", "--ef-construction", "0"), ("hnsw", "--ef-construction", HUGE),
    ("hnsw", "--ef-search", "0"), ("hnsw", "--ef-search", "-1"), ("hnsw", "--ef-search", HUGE),
    ("hash", "--hash-bits", "-1"), ("hash", "--hash-bits", "64"),
    ("hash", "--hash-tables", "-1"), ("hash", "--hash-tables", HUGE),
    ("hash", "--hash-flips", "-1"), ("hash", "--hash-flips", "64"),
]


@pytest.mark.parametrize("kind,flag,value", BUILD)
def test_build_refuses_an_option_out_of_range_in_one_line_and_writes_nothing(capsys, run, kind, flag, value):
    assert_refused(capsys, run, ["build", str(run), "--kind", kind, flag, value], flag, value)


CHECK = [  # (kind, option, value)
    ("flat", "-k", "0"), ("flat", "-k", "-1"), ("flat", "-k", HUGE),
    ("flat", "--min-recall", "-0.5"), ("flat", "--min-recall", "1.5"), ("flat", "--min-recall", "nan"),
    ("ivf", "--nprobe", "0"), ("ivf", "--nprobe", "-1"), ("ivf", "--nprobe", HUGE),
    ("hnsw", "--ef-search", "0"), ("hnsw", "--ef-search", "-1"), ("hnsw", "--ef-search", HUGE),
    ("hash", "--hash-flips", "-1"), ("hash", "--hash-flips", "64"),
    ("hash", "--hash-flips", "9"),  # within 0..63, but more than this index's 8-bit tables: FAISS never returned
]


@pytest.mark.parametrize("kind,flag,value", CHECK)
def test_check_refuses_an_option_out_of_range_in_one_line_and_writes_nothing(capsys, run, kind, flag, value):
    assert_refused(capsys, run, ["check", str(run), "--kind", kind, flag, value], flag, value)


def test_build_refuses_more_flips_than_the_resolved_tables_have_before_writing(capsys, run):
    assert_refused(capsys, run, ["build", str(run), "--kind", "hash", "--hash-bits", "8", "--hash-flips", "9"],
                   "--hash-flips", "9")


def test_the_bounds_are_accepted_and_said_in_help(capsys, run):
    """The least and most values a small run can take build and check; each bound is in --help."""
    for argv in (["--kind", "ivf", "--nlist", "1", "--nprobe", "1", "--seed", str(2**31 - 1)],
                 ["--kind", "hnsw", "--hnsw-m", "2", "--ef-construction", "1", "--ef-search", "1"],
                 ["--kind", "hash", "--hash-bits", "8", "--hash-tables", "3", "--hash-flips", "8"]):
        index.main(["build", str(run), *argv])
    index.main(["check", str(run), "-k", "1", "--min-recall", "1.0"])  # flat: recall 1, as exact as metrics
    index.main(["check", str(run), "--kind", "hash", "--hash-flips", "0", "-k", str(index.K.high)])
    assert not [p for p in files(run) if ".tmp" in p.name]
    for command, bounds in (("build", hamming.SETTINGS.values()),
                            ("check", [*(hamming.SETTINGS[n] for n in index.SEARCH_KNOBS), index.K, index.MIN_RECALL])):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            index.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
        for bound in bounds:
            assert re.search(rf"{re.escape(bound.flag)} \S+ .*?; {bound.low} to {bound.high} \(default", text), bound


def test_the_library_refuses_the_same_values():
    with pytest.raises(HammingIndexError, match=r"^--hnsw-m 0: must be 2 to 256"):
        hamming.resolve(IndexSettings(hnsw_m=0), "hnsw", 64, 100)
    with pytest.raises(HammingIndexError, match=r"^--hash-flips 17: must be 0 to 16"):
        hamming.resolve(IndexSettings(hash_bits=16, hash_flips=17), "hash", 64, 100)
    with pytest.raises(HammingIndexError, match=r"^-k 0: must be 1 to"):
        index.check("no-such-run", k=0)


def test_search_refuses_a_search_time_option_out_of_range(capsys, run):
    """search takes the same search-time settings, checked as the index is opened."""
    assert one_line_exit(capsys, search_main, [str(run), "--id", "0", "--kind", "ivf", "--nprobe", "-1"]).startswith(
        "--nprobe -1: must be 1 to 65536")
    assert one_line_exit(capsys, search_main, [str(run), "--id", "0", "--kind", "hash", "--hash-flips", "9"]).startswith(
        "--hash-flips 9: must be 0 to 8")


@pytest.mark.parametrize("argv", [["build", "--kind", "hnsw", "--hnsw-m", "0"], ["check", "-k", "0"]])
def test_the_command_itself_prints_one_line_and_exits_2(run, argv):
    """As typed: the process ends with status 2 (not SIGABRT), its stderr is one line."""
    before = files(run)
    proc = subprocess.run([sys.executable, "-m", "scbch_dist.retrieval.index", argv[0], str(run), *argv[1:]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m scbch_dist.retrieval.index: error: {argv[-2]} {argv[-1]}: "
                                                    f"must be "), proc.stderr
    assert files(run) == before
