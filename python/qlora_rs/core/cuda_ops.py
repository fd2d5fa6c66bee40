"""CUDA implementations of ``torch.ops.qlora_rs.dequantize_4bit`` and ``torch.ops.qlora_rs.gemm_4bit``.

The kernels (``cuda/*.cu``) are compiled into the extension by the build script and launched from
Rust through the CUDA driver API on PyTorch's current stream of the tensors' device, with
pointers from ``data_ptr()``. This module checks devices, dtypes and sizes, allocates outputs and
picks the kernel:

- ``dequantize_4bit``: one kernel, bit-exact with the Rust core's CPU decode.
- ``gemm_4bit`` (``y = x @ dequant(W).T``): for small batches (``M <= FUSED_GEMM_MAX_M`` rows of
  bf16/fp16 activations, ``K % 32 == 0``) a fused kernel that reads the packed weight directly (the
  tensor-core GEMV up to ``GEMV_MAX_M`` rows, the tensor-core GEMM above); otherwise dequantize +
  ``torch.matmul`` (cuBLAS). The backward (grad wrt x) is the op's
  registered autograd formula: dequantize + matmul.

Without compiled kernels (``qlora_rs.build_info()["cuda_kernels"]`` is False) nothing is
registered: the ops keep their pure-torch decode on CUDA tensors (correct, slow, logged once), and
the direct entry points :func:`dequantize_4bit_cuda` / :func:`gemm_4bit_cuda` raise
:class:`CudaUnavailableError` saying how to build with kernels.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch

from .. import _lib
from ..errors import CudaUnavailableError, InvalidArgumentError
from .op_args import check_gemm_input, check_out_dtype, check_quant_args, packed_bytes

_log = logging.getLogger("qlora_rs")

#: Whether the extension was built with its CUDA kernels.
KERNELS_COMPILED: bool = bool(_lib.CUDA_KERNELS_COMPILED)

#: Largest number of activation rows (M) sent to the fused GEMM; larger M goes through dequantize +
#: torch.matmul. The kernel supports up to 16. The crossover is measured by benches/gpu_check.py
#: (it prints "crossover"); set this from its table.
FUSED_GEMM_MAX_M: int = 16

#: M up to which the tensor-core GEMV (W as the mma's A operand; the kernel supports up to 8) is
#: used; above it the tensor-core GEMM. On an H200 (2026-12-04) the GEMV was the fastest fused
#: kernel at every M from 1 to 8 on 4096x4096, 4096x14336 and 14336x4096 (benches/gpu_check.py's
#: crossover table and benches/gpu_variants.py).
GEMV_MAX_M: int = 8

#: Warps per block of the GEMV (they split K): 8, 16 or 32, or 0 to choose by size: more warps where
#: the N / 16 blocks are few against the multiprocessors (32 up to one block per multiprocessor, 16
#: up to three, else 8). On an H200 (132 multiprocessors, 2026-12-04, benches/gpu_variants.py, M = 1):
#: N = 1024 32 warps 5.6 us, 16 warps 6.7, 8 warps 8.2; N = 4096 16 warps 8.8 us, 8 warps 10.0 (22.7
#: against 26.7 at K = 14336); N = 8192 8 warps 14.3-14.6 us, 16 warps 15.4; N = 14336 8 warps 21.8 us,
#: 16 warps 22.3. The same order held at M = 4 and 8.
GEMV_WARPS: int = 0

#: M up to which the SIMT (plain FMA) kernel is used ahead of the tensor-core kernels; 0 (the
#: default) never: it was slower than the GEMV at every M on an H200. Kept as a cross-check.
SIMT_GEMM_MAX_M: int = 0

#: Warps per block of the tensor-core kernel (they split K): 1, 2, 4, 8 or 16, or 0 to choose by
#: size (16 when the N / 32 blocks would not fill every multiprocessor twice, else 4: on an H200,
#: 2026-12-04, 16 warps were fastest at N = 4096 and 4 at N = 14336, for every M up to 16).
#: gpu_check.py times 4, 8 and 16 (columns mma4/mma8/mma16 of its crossover table).
MMA_WARPS: int = 0

_GEMM_KERNELS = ("auto", "gemv", "mma", "simt", "dequant")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kernels_available() -> bool:
    """True when the extension was built with its CUDA kernels (a GPU may still be missing)."""
    return KERNELS_COMPILED


def require_kernels() -> None:
    """Raises :class:`CudaUnavailableError`, with instructions to build them, when the kernels
    were not compiled in."""
    if not KERNELS_COMPILED:
        raise CudaUnavailableError(_lib.CUDA_HOW_TO_BUILD)


def check_device(device: torch.device | int | str = 0) -> None:
    """Raises :class:`CudaUnavailableError` / :class:`CudaError` unless the kernels can run on
    ``device``: compiled in, driver present, device visible, module loadable."""
    require_kernels()
    _lib.cuda_check_device(_ordinal(torch.device(device) if not isinstance(device, int) else device))


def _ordinal(device: torch.device | int) -> int:
    if isinstance(device, int):
        return device
    if device.type != "cuda":
        raise InvalidArgumentError(f"expected a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


# ---------------------------------------------------------------------------------------------
# Device check (pure: no CUDA call, so it runs and is tested on any machine); the argument checks
# are the ops' own (qlora_rs.core.op_args.check_quant_args and friends).


def _same_cuda_device(where: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise InvalidArgumentError(f"{where}: {name} is on {t.device}; the CUDA kernels need every tensor on a CUDA device")
        if device is None:
            device = t.device
        elif t.device != device:
            raise InvalidArgumentError(f"{where}: {name} is on {t.device} but the other tensors are on {device}")
    assert device is not None
    return device


def _scale_ptrs(absmax, nested_absmax, nested_code):
    """Contiguous scale tensors (kept alive by the caller) and their addresses."""
    absmax = absmax.contiguous()
    if nested_absmax is None:
        return (absmax,), (absmax.data_ptr(), None, None)
    nested_absmax = nested_absmax.contiguous()
    nested_code = nested_code.contiguous()
    return (absmax, nested_absmax, nested_code), (absmax.data_ptr(), nested_absmax.data_ptr(), nested_code.data_ptr())


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


_sm_count: dict = {}


def _sms(device: torch.device) -> int:
    if device.index not in _sm_count:
        _sm_count[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_count[device.index]


def _mma_warps(n_out: int, device: torch.device) -> int:
    if MMA_WARPS:
        return MMA_WARPS
    # Few column blocks: more warps per block split K finer, keeping more loads in flight.
    return 16 if -(-n_out // 32) < 2 * _sms(device) else 4


def gemv_warps(n_out: int, sms: int) -> int:
    """Warps per block of the GEMV for a weight of ``n_out`` rows on a GPU of ``sms``
    multiprocessors (:data:`GEMV_WARPS` when set)."""
    if GEMV_WARPS:
        return GEMV_WARPS
    groups = -(-n_out // 16)
    return 32 if groups <= sms else 16 if groups <= 3 * sms else 8


# ---------------------------------------------------------------------------------------------
# Direct entry points.


def dequantize_4bit_cuda(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    quant_type: str,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decodes a packed 4-bit tensor on its CUDA device into a new ``dtype`` tensor of ``shape``
    (arguments as ``torch.ops.qlora_rs.dequantize_4bit``). Bit-exact with the CPU decode."""
    where = "qlora_rs::dequantize_4bit (CUDA)"
    require_kernels()
    device = _same_cuda_device(where, packed=packed, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code)
    n = check_quant_args(where, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
    check_out_dtype(where, dtype)
    out = torch.empty([int(s) for s in shape], dtype=dtype, device=device)
    if n == 0:
        return out
    data = packed_bytes(packed)
    keep, (a, na, nc) = _scale_ptrs(absmax, nested_absmax, nested_code)
    _lib.cuda_dequantize_4bit(
        _ordinal(device), _stream(device), data.data_ptr(), a, na, nc, float(offset), n, quant_type, int(blocksize),
        out.data_ptr(), _DTYPE_NAMES[dtype],
    )
    del keep  # the stream has the kernel; PyTorch's caching allocator orders later reuse after it
    return out


def choose_gemm_kernel(m: int, k: int, dtype: torch.dtype) -> str:
    """The kernel ``gemm_4bit_cuda(kernel="auto")`` uses for ``m`` rows of ``dtype`` activations
    and reduction size ``k``: ``"gemv"``, ``"mma"``, ``"simt"`` or ``"dequant"`` (dequantize +
    torch.matmul)."""
    if dtype not in (torch.bfloat16, torch.float16) or k % 32 != 0 or not 1 <= m <= FUSED_GEMM_MAX_M:
        return "dequant"
    if m <= min(SIMT_GEMM_MAX_M, _lib.CUDA_SIMT_GEMM_MAX_M):
        return "simt"
    return "gemv" if m <= min(GEMV_MAX_M, _lib.CUDA_GEMV_MAX_M) else "mma"


def gemm_4bit_cuda(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    quant_type: str,
    blocksize: int,
    shape: Sequence[int],
    *,
    kernel: str = "auto",
    warps: Optional[int] = None,
) -> torch.Tensor:
    """``x @ dequant(W).T`` in ``x.dtype`` on the CUDA device, W of ``shape`` [out, in] (arguments
    as ``torch.ops.qlora_rs.gemm_4bit``). ``kernel``: ``"auto"`` (by :func:`choose_gemm_kernel`),
    ``"gemv"``, ``"mma"``, ``"simt"`` or ``"dequant"``; ``warps`` overrides the choice of warps per
    block for ``"gemv"`` (:func:`gemv_warps`) and ``"mma"`` (:data:`MMA_WARPS`)."""
    where = "qlora_rs::gemm_4bit (CUDA)"
    require_kernels()
    if kernel not in _GEMM_KERNELS:
        raise InvalidArgumentError(f"{where}: kernel must be one of {', '.join(_GEMM_KERNELS)}, got {kernel!r}")
    device = _same_cuda_device(
        where, x=x, packed=packed, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code
    )
    check_quant_args(where, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
    check_gemm_input(where, x, shape)
    n_out, k = int(shape[0]), int(shape[1])
    lead = x.shape[:-1]
    m = math.prod(lead)
    if m == 0 or n_out == 0 or k == 0:
        return torch.zeros((*lead, n_out), dtype=x.dtype, device=device)

    chosen = choose_gemm_kernel(m, k, x.dtype) if kernel == "auto" else kernel
    data = packed_bytes(packed)
    if chosen != "dequant" and data.data_ptr() % 16 != 0:
        chosen = "dequant" if kernel == "auto" else chosen  # an explicit kernel reports the alignment error
    if chosen == "dequant":
        w = dequantize_4bit_cuda(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, x.dtype)
        return torch.matmul(x, w.t())

    x2 = x.reshape(m, k)
    if not x2.is_contiguous() or x2.data_ptr() % 16 != 0:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    out = torch.empty((m, n_out), dtype=x.dtype, device=device)
    keep, (a, na, nc) = _scale_ptrs(absmax, nested_absmax, nested_code)
    _lib.cuda_gemm_4bit(
        _ordinal(device), _stream(device), x2.data_ptr(), m, n_out, k, _DTYPE_NAMES[x.dtype], data.data_ptr(),
        a, na, nc, float(offset), quant_type, int(blocksize), out.data_ptr(), chosen,
        int(warps or (gemv_warps(n_out, _sms(device)) if chosen == "gemv" else _mma_warps(n_out, device))),
    )
    del keep
    return out.reshape(*lead, n_out)


# ---------------------------------------------------------------------------------------------
# Registration behind the torch ops.


def _dequantize_kernel(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    return dequantize_4bit_cuda(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype)


def _gemm_kernel(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
    return gemm_4bit_cuda(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)


_registered: set = set()


def _op_defined(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register(namespace: str = "qlora_rs") -> bool:
    """Registers the CUDA kernels for ``<namespace>::dequantize_4bit`` and ``<namespace>::gemm_4bit``
    (defined by ``qlora_rs.core.ops``). Returns True when registered (now or before); False when the ops
    are not defined or the kernels were not compiled in (then the ops' pure-torch path stays and
    a CUDA machine gets one log line saying how to build the kernels)."""
    if namespace in _registered:
        return True
    if not (_op_defined(namespace, "dequantize_4bit") and _op_defined(namespace, "gemm_4bit")):
        return False
    if not KERNELS_COMPILED:
        if torch.cuda.is_available():
            _log.info("qlora_rs: CUDA 4-bit ops use the slow pure-torch path. %s", _lib.CUDA_HOW_TO_BUILD)
        return False
    torch.library.register_kernel(f"{namespace}::dequantize_4bit", "cuda", _dequantize_kernel)
    torch.library.register_kernel(f"{namespace}::gemm_4bit", "cuda", _gemm_kernel)
    _registered.add(namespace)
    return True


register()

__all__ = [
    "KERNELS_COMPILED",
    "FUSED_GEMM_MAX_M",
    "GEMV_MAX_M",
    "GEMV_WARPS",
    "SIMT_GEMM_MAX_M",
    "MMA_WARPS",
    "gemv_warps",
    "kernels_available",
    "require_kernels",
    "check_device",
    "choose_gemm_kernel",
    "dequantize_4bit_cuda",
    "gemm_4bit_cuda",
    "register",
]
