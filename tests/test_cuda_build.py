"""The CUDA kernels are built into the extension (when nvcc was there) with the promised targets,
and every path without a usable GPU ends in a clear error, never a crash. Runs on any machine."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import qlora_rs
from qlora_rs import _lib
from qlora_rs.core import cuda_ops
from qlora_rs.errors import CudaError, CudaUnavailableError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]


def test_build_info_reports_the_kernels():
    info = qlora_rs.build_info()
    assert isinstance(info["cuda_kernels"], bool)
    assert info["cuda_kernels"] == cuda_ops.KERNELS_COMPILED == _lib.CUDA_KERNELS_COMPILED
    if info["cuda_kernels"]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", info["nvcc"]), info["nvcc"]
        assert info["cuda_archs"].split(",") == _lib.cuda_fatbin_targets()
    else:
        assert info["cuda_archs"] == "" and _lib.cuda_fatbin_targets() == []


@pytest.mark.skipif(not cuda_ops.KERNELS_COMPILED, reason="built without CUDA kernels")
def test_fatbin_holds_machine_code_for_every_target_and_ptx_for_the_newest():
    targets = _lib.cuda_fatbin_targets()
    if os.environ.get("QLORA_RS_CUDA_ARCHS"):
        pytest.skip("QLORA_RS_CUDA_ARCHS narrows the targets of this build")
    assert targets == DEFAULT_TARGETS


def test_the_kernel_variants_file_compiles(tmp_path):
    """benches/gpu_variants.cu (timed on a lent GPU, not in the fatbin) instantiates the shipped
    kernels' templates: a change to cuda/ that breaks it must fail here, where nvcc is."""
    import shutil
    import subprocess

    local = ROOT / ".tools/cuda13/nvidia/cu13/bin/nvcc"
    nvcc = os.environ.get("NVCC") or (str(local) if local.is_file() else shutil.which("nvcc"))
    if not nvcc:
        pytest.skip("no nvcc (scripts/bootstrap.sh installs one)")
    out = tmp_path / "variants.cubin"
    r = subprocess.run([nvcc, "-arch=sm_90", "-O3", "-cubin", "-o", str(out), str(ROOT / "benches/gpu_variants.cu")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    names = out.read_bytes()
    for kernel in (b"qexp_gemv_w16_u2", b"qexp_gemv_w32_m16", b"qlora_gemm_4bit_gemv_w32_bf16",
                   b"qlora_dequantize_4bit_bf16"):
        assert kernel in names


def test_project_nvcc_means_kernels_are_built():
    # CI installs nvcc into .tools/cuda13 (scripts/bootstrap.sh); a build there must include the
    # kernels, so a kernel that does not compile can never land silently.
    nvcc = ROOT / ".tools/cuda13/nvidia/cu13/bin/nvcc"
    if not nvcc.is_file() or os.environ.get("QLORA_RS_NO_CUDA") == "1":
        pytest.skip("no project-local nvcc")
    if not (ROOT / "python/qlora_rs" / Path(_lib.__file__).name).exists():
        pytest.skip("qlora_rs is not the editable build of this checkout")
    assert qlora_rs.build_info()["cuda_kernels"], "nvcc is in .tools/cuda13 but the extension was built without kernels"


def test_without_kernels_the_error_says_how_to_build_them(monkeypatch):
    monkeypatch.setattr(cuda_ops, "KERNELS_COMPILED", False)
    with pytest.raises(CudaUnavailableError) as e:
        cuda_ops.require_kernels()
    msg = str(e.value)
    assert "nvidia-cuda-nvcc" in msg and "NVCC" in msg and "maturin develop" in msg
    with pytest.raises(CudaUnavailableError, match="built without its CUDA kernels"):
        cuda_ops.dequantize_4bit_cuda(
            torch.zeros(1, dtype=torch.uint8), torch.ones(1), None, None, 0.0, "nf4", 64, [2], torch.bfloat16
        )
    with pytest.raises(CudaUnavailableError, match="built without its CUDA kernels"):
        cuda_ops.gemm_4bit_cuda(
            torch.zeros(1, 64), torch.zeros(32, dtype=torch.uint8), torch.ones(1), None, None, 0.0, "nf4", 64, [1, 64]
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is usable here")
def test_no_driver_is_an_error_not_a_crash():
    # No libcuda (CI) or no device: CudaUnavailableError naming the cause; built without kernels:
    # the how-to-build message. Never a panic.
    with pytest.raises(CudaUnavailableError) as e:
        _lib.cuda_check_device(0)
    assert re.search(r"libcuda|cuInit|built without", str(e.value)), str(e.value)
    # Valid arguments reach the driver check; the launch fails the same clean way.
    with pytest.raises(CudaError):
        _lib.cuda_dequantize_4bit(0, 0, 4096, 8192, None, None, 0.0, 64, "nf4", 64, 16384, "bfloat16")


def _load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benches/gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_script_is_ready(tmp_path):
    gc = _load_gpu_check()
    names = [c.__name__ for c in gc.CHECKS]
    for want in ("check_dequant_exact", "check_gemm_accuracy", "check_streams_and_graphs", "check_speed_dequant",
                 "check_speed_gemm", "check_crossover", "check_lora_train_step"):
        assert want in names
    # Plug-ins (benches/gpu_check_*.py) load, or their absence is reported.
    extra, notes = gc.plugin_checks()
    assert all(callable(c) for c in extra)
    assert not [n for n in notes if "failed to load" in n], notes
    # The report: one table per check over the union of the rows' columns.
    md = gc.markdown({"c": {"status": "ok", "seconds": 1.0, "rows": [{"a": 1}, {"a": 2, "b": 3}], "notes": ["n"]}}, [])
    assert "| a | b |" in md and "| 2 | 3 |" in md and "- n" in md
    if not torch.cuda.is_available():
        assert gc.main(["--out", str(tmp_path)]) == 2
        assert (tmp_path / "gpu_check.json").is_file() and "no CUDA device" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_paging_training_loop_runs_on_cpu(monkeypatch):
    """The paging check's QLoRA loop, shrunk and on the CPU (ordinary memory, nothing paged):
    its code runs on this torch, and the paged optimizer's losses equal the unpaged ones."""
    import importlib.util

    from qlora_rs.optim import paging

    spec = importlib.util.spec_from_file_location("gpu_check_paging", ROOT / "benches/gpu_check_paging.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, value in dict(DEVICE="cpu", HIDDEN=64, LAYERS=2, RANK=8, TOKENS=32, STEPS=4).items():
        monkeypatch.setattr(mod, name, value)
    out = mod._part_training(paging, {"concurrent_managed_access": False, "free": 1 << 40, "total": 1 << 40})
    assert out["model"].startswith("qlora_rs.nn.LoraLinear4bit"), out["model"]
    assert out["losses_identical"] and out["passed"], out
    assert set(out["runs"]) == {"unpaged", "paged_resident", "torch_adamw", "paged_8bit"}
    assert out["runs"]["torch_adamw"]["max_loss_diff_vs_unpaged"] < 1e-3


_FSDP2_SMOKE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("gpu_check_fsdp2", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
m.DEVICE = "cpu"
m.HIDDEN, m.FFN, m.LAYERS, m.VOCAB, m.RANK, m.BATCH, m.SEQ, m.STEPS = 64, 128, 2, 128, 4, 2, 16, 3
print(json.dumps(m.check_fsdp2_nccl(sys.argv[2]), default=str))
"""


def test_gpu_check_fsdp2_parts_run_on_cpu_with_gloo(tmp_path):
    """The FSDP2 check's parts, shrunk, on a gloo group of one in a fresh process (a process
    group must not outlive it): its code runs on this torch and every part passes."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FSDP2_SMOKE, str(ROOT / "benches/gpu_check_fsdp2.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for part in ("plain_vs_fsdp2", "mixed_precision", "state_dict"):
        assert result[part]["passed"] is True, result[part]
    assert result["backend"] == "gloo" and result["passed"] is True
