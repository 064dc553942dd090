"""bf16 where it is safe (docs/engine.md, "Precision"): the products may run in bfloat16, the codes,
the method heads' outputs and so every loss stay float32; train.mixed_precision=auto takes bf16
only where the hardware computes it natively."""

from __future__ import annotations

import pytest
import torch

from scbch_dist.config import load_config
from scbch_dist.engine import setup
from scbch_dist.losses import scbch_loss
from scbch_dist.models import SCBCHModel
from scbch_dist.models.heads import ClassCentres, Classifiers, HashHead


def test_codes_and_head_outputs_leave_bf16_autocast_in_float32():
    g = torch.Generator().manual_seed(0)
    head, classifiers, centres = HashHead(32, 16, 64, 2, True), Classifiers(16, 6), ClassCentres(6, 32, 16)
    x = torch.randn(8, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = head(x)
        assert head.mlp[0](x).dtype == torch.bfloat16  # the products do run in bf16
        out = {"h_img": h, "h_txt": h}
        p, q = classifiers(out)["p_img"], centres(out)["p_img"]
    assert h.dtype == p.dtype == q.dtype == torch.float32
    torch.testing.assert_close(h.norm(dim=1), torch.ones(8), rtol=0, atol=1e-6)  # normalised in float32
    reference = head(x)  # float32 throughout: bf16 products change the codes by bf16's rounding only
    torch.testing.assert_close(h, reference, rtol=0, atol=0.05)


def test_the_scbch_loss_of_a_bf16_forward_is_float32_and_near_the_float32_loss():
    torch.manual_seed(0)
    model = SCBCHModel(48, 40, 16, 64, 5)
    img, txt = torch.randn(12, 48), torch.randn(12, 40)
    labels = (torch.rand(12, 5) < 0.4).to(torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(img, txt)
    full = model(img, txt)
    kw = dict(margin=0.15, shift=0.8, bsch_weight=0.7, quant_weight=0.3, cscc_weight=1.0)
    low_loss = scbch_loss(low, labels, None, **kw)["total"].detach()
    full_loss = scbch_loss(full, labels, None, **kw)["total"].detach()
    assert low_loss.dtype == torch.float32
    assert abs(float(low_loss) - float(full_loss)) < 0.02 * abs(float(full_loss))


@pytest.mark.parametrize("flags,native", [("fpu avx2 avx512f avx512_bf16 amx_tile", True), ("fpu avx2 amx_bf16", True),
                                          ("fpu avx2 avx512f avx512_vnni", False)])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(tmp_path, monkeypatch, flags, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert setup.has_native_bf16(info) is native
    assert not setup.has_native_bf16(tmp_path / "missing")  # no way to tell: not assumed
    monkeypatch.setattr(setup, "has_native_bf16", lambda: native)
    assert setup.precision("auto") == ("bf16" if native else "no")
    assert setup.precision_reason("auto") == f" (train.mixed_precision=auto: {'native' if native else 'no native'} bf16 here)"
    # a launcher's bf16 or fp16 is taken; its "no" is what accelerate launch says when nothing names a
    # precision, so it does not stop auto
    assert setup.precision("auto", "fp16") == "fp16" and setup.precision("auto", "bf16") == "bf16"
    assert setup.precision("auto", "no") == ("bf16" if native else "no")
    assert setup.precision_reason("auto", "fp16") == " (train.mixed_precision=auto: the launcher's fp16)"
    assert setup.precision("", "fp16") is None and setup.precision("no", "bf16") == "no"
    assert setup.precision("fp16") == "fp16" and setup.precision_reason("no") == ""
    assert load_config(None, []).train.mixed_precision == "auto"  # the default


def test_float64_models_stay_float64():
    """The reference tests run whole models in float64: the heads lift only bf16/fp16."""
    torch.manual_seed(0)
    model = SCBCHModel(12, 10, 8, 16, 4).double()
    out = model(torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64))
    assert all(v.dtype == torch.float64 for v in out.values())
    centres = ClassCentres(4, 16, 8).double()
    assert centres({"h_img": out["h_img"], "h_txt": out["h_txt"]})["p_img"].dtype == torch.float64


PAGE_FAULTS = r"""
import resource, sys, torch
from scbch_dist.engine.setup import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):  # what a step does with its large buffers: allocate, fill, free
    buffer = torch.empty(1 << 26).fill_(1.0)  # 256 MB
    del buffer
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_freed_memory_spares_the_page_faults_of_every_new_buffer():
    """train.keep_freed_memory: with glibc's defaults each 256 MB buffer is a fresh mapping whose
    65,536 pages fault in again; kept, the first ones' only."""
    import subprocess
    import sys

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        kept, count = out.stdout.split()
        return kept, int(count)

    kept, with_keeping = faults("keep")
    if kept != "True":
        pytest.skip("not glibc: train.keep_freed_memory is a no-op here")
    _, by_default = faults("default")
    pages = (1 << 26) * 4 // 4096  # of one buffer
    assert by_default > 5 * pages and with_keeping < 3 * pages, (by_default, with_keeping)  # measured 6 and 2


def test_keep_freed_memory_is_the_runs_setting(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(setup, "keep_freed_memory", lambda: calls.append(1) or True)
    for value, expected in (("true", 1), ("false", 0)):
        calls.clear()
        setup.make_accelerator(load_config(None, [f"train.keep_freed_memory={value}"]), tmp_path)
        assert len(calls) == expected
