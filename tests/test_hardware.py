"""The precision default and the per-device training paths, decided from (mocked) CPU flags, probes and CUDA."""

from __future__ import annotations

import pytest

from medtrain.errors import ConfigError
from medtrain.hardware import (FAST_BF16_SPEEDUP, Precision, choose_precision, cpu_bf16_fast, cpu_flags,
                               cpu_paths_enabled, precision_flags_given)

AMX = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_BF16 = {"avx512f", "avx512_bf16"}
NO_BF16 = {"avx2", "avx512f"}


def never_probe() -> float:
    raise AssertionError("the probe must not run when the flags decide")


def test_amx_is_fast_without_a_probe_and_no_bf16_instructions_is_slow():
    assert cpu_bf16_fast(AMX, probe=never_probe) == (True, "the CPU has AMX-BF16")
    fast, why = cpu_bf16_fast(NO_BF16, probe=never_probe)
    assert not fast and "emulated" in why


@pytest.mark.parametrize("speedup,fast", [(2.5, True), (FAST_BF16_SPEEDUP, True), (1.1, False), (0.4, False)])
def test_avx512_bf16_is_decided_by_the_measured_probe(speedup, fast):
    ok, why = cpu_bf16_fast(AVX512_BF16, probe=lambda: speedup)
    assert ok is fast
    assert f"{speedup:.1f}x fp32" in why


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f amx_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx512f", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_cpu_default_is_bf16_where_fast_and_fp32_elsewhere():
    fast = choose_precision("auto", False, False, flags_given=False, cuda=False,
                            fast=lambda: cpu_bf16_fast(AMX, probe=never_probe))
    assert (fast.torch_dtype, fast.bf16, fast.automatic) == ("bfloat16", True, True)
    assert "bf16 frozen weights + bf16 autocast" in fast.describe() and "AMX-BF16" in fast.describe()
    assert "--torch_dtype float32 --bf16 False" in fast.describe()
    slow = choose_precision("auto", False, False, flags_given=False, cuda=False,
                            fast=lambda: cpu_bf16_fast(NO_BF16, probe=never_probe))
    assert (slow.torch_dtype, slow.bf16, slow.automatic) == ("float32", False, True)
    measured_slow = choose_precision("auto", False, False, flags_given=False, cuda=False,
                                     fast=lambda: cpu_bf16_fast(AVX512_BF16, probe=lambda: 1.05))
    assert (measured_slow.torch_dtype, measured_slow.bf16) == ("float32", False)


def never_decide():
    raise AssertionError("explicit flags and GPU runs must not be decided from the CPU")


@pytest.mark.parametrize("dtype,bf16,fp16", [("float32", False, False), ("auto", True, False),
                                             ("bfloat16", False, False), ("auto", False, True)])
def test_explicit_precision_flags_are_used_as_given(dtype, bf16, fp16):
    choice = choose_precision(dtype, bf16, fp16, flags_given=True, cuda=False, fast=never_decide)
    assert choice == Precision(dtype, bf16, False, "precision flags given")


def test_gpu_runs_keep_the_transformers_defaults():
    choice = choose_precision("auto", True, False, flags_given=False, cuda=True, fast=never_decide)
    assert (choice.torch_dtype, choice.bf16, choice.automatic) == ("auto", True, False)


def test_precision_flags_given_from_flags_or_file():
    assert not precision_flags_given(["--model_name_or_path", "m", "--output_dir", "o"])
    assert precision_flags_given(["--bf16", "False"])
    assert precision_flags_given(["--torch_dtype=float32"])
    assert precision_flags_given(["--torch-dtype", "float32"])
    assert precision_flags_given(["--fp16"])
    assert not precision_flags_given(["--bf16_full_eval"])
    assert precision_flags_given([], {"bf16": False})


def test_cpu_paths_are_on_for_cpu_off_for_cuda_unless_asked():
    assert cpu_paths_enabled("auto", cuda=False)
    assert not cpu_paths_enabled("auto", cuda=True)
    assert cpu_paths_enabled("on", cuda=True)
    assert not cpu_paths_enabled("off", cuda=False)
    with pytest.raises(ConfigError, match="--cpu_paths 'maybe'"):
        cpu_paths_enabled("maybe", cuda=False)
