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
    # a launcher's bf16 is taken, its fp16 only where CUDA runs it; its "no" is what accelerate launch
    # says when nothing names a precision, so it does not stop auto
    assert setup.precision("auto", "bf16") == "bf16" and setup.precision("auto", "no") == ("bf16" if native else "no")
    assert setup.precision("auto", "fp16") == ("bf16" if native else "no")  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setup.precision("auto", "fp16") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup.precision("", "fp16") is None and setup.precision("no", "bf16") == "no"
    assert setup.precision("fp16") == "fp16"
    # a new run's config records what auto picked, so that a resume elsewhere goes on at it
    cfg, why = setup.resolve_precision(load_config(None, []), None)
    assert cfg.train.mixed_precision == ("bf16" if native else "no")
    assert why == f" (train.mixed_precision=auto: {'native' if native else 'no native'} bf16 here)"
    cfg, why = setup.resolve_precision(load_config(None, []), "bf16")
    assert cfg.train.mixed_precision == "bf16" and why == " (train.mixed_precision=auto: the launcher's bf16)"
    same = load_config(None, ["train.mixed_precision=no"])
    assert setup.resolve_precision(same, "bf16") == (same, "")
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


@pytest.mark.parametrize("supported", [True, False])
def test_cuda_bf16_counts_as_native_only_without_emulation(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return supported if not including_emulation else True  # a V100 or T4 emulates it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert setup.has_native_bf16() is supported and asked == {"including_emulation": False}


def test_fp16_on_a_machine_without_cuda_is_refused_before_the_run(tmp_path, monkeypatch):
    """Accelerate would take fp16 on a CPU, run float32 and report fp16 (codes.npz would record it)."""
    from scbch_dist.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16: fp16 autocast runs on CUDA GPUs only"):
        setup.make_accelerator(load_config(None, ["train.mixed_precision=fp16"]), tmp_path)
    monkeypatch.setenv(setup.LAUNCHER_PRECISION, "fp16")
    with pytest.raises(ConfigError, match=r"the launcher's --mixed_precision fp16 \(train.mixed_precision=\"\"\)"):
        setup.make_accelerator(load_config(None, ["train.mixed_precision="]), tmp_path)
