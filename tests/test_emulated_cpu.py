"""The emulated CPU the tests run the AVX-512 kernels on where this CPU lacks them
(tests/emulated_cpu.py): that it emulates (runs AVX-512 code, refuses what its model lacks), that
kernel calls reach it only while it is installed and only for levels this CPU lacks, and that the
emulated code's system calls are made for it or refused by name."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import emulated_cpu
import qlora_rs
from qlora_rs.core import ops
from qlora_rs.errors import InvalidArgumentError

EMULATOR = emulated_cpu.emulator()
pytestmark = pytest.mark.skipif(isinstance(EMULATOR, str), reason=f"no CPU emulator: {EMULATOR}")

# vmovups zmm0, [rdi]; vmovdqu32 zmm1, [rsi]; vpermps zmm2, zmm1, zmm0; vmovups [rdx], zmm2;
# vzeroupper; ret
PERMUTE_16 = bytes.fromhex("62f17c481007" "62f17e486f0e" "62f27548 16d0" "62f17c481112" "c5f877" "c3".replace(" ", ""))
# vcvtne2ps2bf16 zmm0, zmm1, zmm2 (AVX512-BF16); ret
TO_BF16 = bytes.fromhex("62f2774872c2" "c3")
# mov eax, 39 (getpid); syscall; ret
GETPID = bytes.fromhex("b827000000" "0f05" "c3")
# mov eax, 12 (brk); xor edi, edi; syscall; ret
BRK_QUERY = bytes.fromhex("b80c000000" "31ff" "0f05" "c3")


def test_it_runs_avx512_code_over_this_process_memory():
    values = np.arange(16, dtype=np.float32) * 1.5
    index = np.random.default_rng(0).permutation(16).astype(np.int32)
    out = np.full(16, np.nan, dtype=np.float32)
    EMULATOR.run_code(PERMUTE_16, values.ctypes.data, index.ctypes.data, out.ctypes.data)
    assert np.array_equal(out, values[index])


def test_it_refuses_instructions_its_model_lacks():
    if "avx512bf16" in EMULATOR.levels:
        pytest.skip("the emulated CPU has AVX512-BF16")
    with pytest.raises(emulated_cpu.EmulationError, match="exception 6"):
        EMULATOR.run_code(TO_BF16)


def test_system_calls_are_made_for_it_when_they_allocate_and_refused_otherwise():
    libc = ctypes.CDLL(None)
    libc.syscall.restype = ctypes.c_long
    assert EMULATOR.run_code(BRK_QUERY) == libc.syscall(12, 0)
    with pytest.raises(emulated_cpu.EmulationError, match="system call 39"):
        EMULATOR.run_code(GETPID)


def test_kernels_reach_it_only_while_installed_and_only_for_levels_this_cpu_lacks():
    missing = [isa for isa in EMULATOR.levels if isa not in ops.cpu_isas()]
    if not missing:
        pytest.skip("this CPU runs every level the emulated one does")
    packed, state = qlora_rs.quantize(torch.randn(24, 128), "nf4", 64, True)
    args = ops.quant_args(packed, state)
    x = torch.randn(2, 128)
    want = ops.gemm_4bit_cpu(x, *args, isa="portable")
    before = EMULATOR.kernel_calls
    with EMULATOR.installed():
        got = ops.gemm_4bit_cpu(x, *args, isa=missing[0])
        ops.gemm_4bit_cpu(x, *args, isa="portable")  # this CPU runs it: not emulated
        if "avx512bf16" not in EMULATOR.levels:
            with pytest.raises(emulated_cpu.EmulationError, match="does not run 'avx512bf16'"):
                ops.gemm_4bit_cpu(x, *args, isa="avx512bf16")
    assert EMULATOR.kernel_calls == before + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match=f'cannot run the "{missing[0]}" kernels'):
        ops.gemm_4bit_cpu(x, *args, isa=missing[0])


def test_a_failing_emulated_call_is_an_error_not_a_result():
    # A job address the emulated CPU cannot read: the kernel call fails and says so.
    with EMULATOR.installed() as cpu:
        with pytest.raises(emulated_cpu.EmulationError, match="no page of this process backs|exception 14"):
            cpu("avx512", 0x10, 0)
