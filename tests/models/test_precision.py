"""Hardware-aware precision: ``sae.selection_dtype=auto`` is bf16 exactly where bf16 GEMMs are native.

The capability checks are mocked: CUDA compute capability (8.0+ native), the CPU's AVX512-BF16
and AMX probes. An explicit setting always wins, ``SAE_AUTO_DTYPE`` pins ``auto``, the decision is
announced once per device, and ``train.deterministic=true`` turns ``auto`` into float32.
"""

from __future__ import annotations

import logging

import pytest
import torch
from sae_kernels import dispatch

from sae.models import SAEConfig, build_sae, precision

CPU = torch.device("cpu")


@pytest.fixture
def hardware(monkeypatch):
    """Unpin ``auto`` (tests/conftest.py pins it) and return a setter for native bf16 support."""
    monkeypatch.delenv(precision.AUTO_ENV_VAR, raising=False)
    precision._announce.cache_clear()

    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "native_bf16_matmul", lambda device: native)

    return set_native


@pytest.mark.parametrize("capability,native", [((9, 0), True), ((8, 0), True), ((7, 5), False), ((6, 1), False)])
def test_cuda_capability_decides(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert dispatch.native_bf16_matmul(torch.device("cuda", 0)) is native


@pytest.mark.parametrize("avx512_bf16,amx,native", [(False, False, False), (True, False, True), (False, True, True),
                                                    (True, True, True)])
def test_cpu_bf16_units_decide(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert dispatch.native_bf16_matmul(CPU) is native


def test_cpu_flags_are_read_when_torch_has_no_probes(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    for flags, native in (("fpu avx2 fma", False), ("fpu avx2 avx512f avx512_bf16 fma", True),
                          ("fpu avx2 amx_bf16 amx_tile", True)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(dispatch, "CPUINFO", str(cpuinfo))
        assert dispatch._cpu_has_bf16_units() is native, flags


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_hardware_and_explicit_settings_win(hardware, native):
    hardware(native)
    assert precision.resolve_selection_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)
    assert precision.resolve_selection_dtype("float32", CPU) == torch.float32
    assert precision.resolve_selection_dtype("bfloat16", CPU) == torch.bfloat16
    sae = build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0)
    x_in = sae.encoder_input(torch.randn(8, 16))
    assert sae.selection_scores(x_in).dtype == (torch.bfloat16 if native else torch.float32)
    exact = build_sae(SAEConfig(num_latents=64, k=4, selection_dtype="float32"), 16, seed=0)
    assert exact.selection_scores(x_in).dtype == torch.float32


def test_env_pins_auto(hardware, monkeypatch):
    hardware(True)
    monkeypatch.setenv(precision.AUTO_ENV_VAR, "float32")
    assert precision.resolve_selection_dtype("auto", CPU) == torch.float32
    monkeypatch.setenv(precision.AUTO_ENV_VAR, "fp8")
    with pytest.raises(ValueError, match="SAE_AUTO_DTYPE='fp8'"):
        precision.resolve_selection_dtype("auto", CPU)


def test_decision_is_announced_once(hardware, caplog):
    hardware(True)
    with caplog.at_level(logging.INFO, logger="sae.models.precision"):
        for _ in range(3):
            precision.resolve_selection_dtype("auto", CPU)
    lines = [r.getMessage() for r in caplog.records if r.name == "sae.models.precision"]
    assert len(lines) == 1 and "bf16" in lines[0] and "train.deterministic=true" in lines[0]


def test_unknown_setting_names_the_choices():
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        build_sae(SAEConfig(num_latents=64, k=4, selection_dtype="fp16"), 16)


@pytest.mark.parametrize("setting,expected", [("auto", "float32"), ("bfloat16", "bfloat16")])
def test_deterministic_makes_auto_exact_but_keeps_explicit(hardware, tmp_path, setting, expected):
    from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
    from sae.train.config import TrainConfig
    from sae.train.trainer import Trainer

    hardware(True)
    sae = build_sae(SAEConfig(num_latents=64, k=4, selection_dtype=setting), 16, seed=0)
    cfg = TrainConfig(batch_size=32, steps=1, device="cpu", out_dir=str(tmp_path), deterministic=True,
                      progress=False, eval_every=0, final_report=False)
    trainer = Trainer(cfg, {"topk": sae}, SyntheticSource(SyntheticConfig(d=16), 32))
    assert trainer.saes["topk"].cfg.selection_dtype == expected


def test_a_run_with_auto_meaning_bf16_trains_and_evaluates(hardware, tmp_path, monkeypatch, tiny_gpt2):
    """The default path of a machine with bf16 units, end to end (the rest of the suite pins auto to
    fp32): live training on a tiny GPT-2, held-out scoring, and the full sae-eval report (spliced
    model, top contexts) that runs the SAE under torch.inference_mode."""
    from sae.runners.config import compose_train_config
    from sae.runners.train import run_training

    monkeypatch.setenv(precision.AUTO_ENV_VAR, "bfloat16")
    result = run_training(compose_train_config([
        "data=live", f"data.live.model.name={tiny_gpt2}", "data.live.text.context_length=32",
        "data.hookpoint=layers.0", "data.live.heldout_contexts=16", "train=smoke", "train.steps=8",
        "train.batch_size=128", "train.progress=false", "sae.k=4", "sae.expansion_factor=2",
        "train.final_report=true", f"train.out_dir={tmp_path / 'run'}"]))
    (report,) = result.reports.values()
    assert 0 < report.report["metrics"]["fvu"] < 1.5 and "ce_loss_sae" in report.report["splice"]["metrics"]
