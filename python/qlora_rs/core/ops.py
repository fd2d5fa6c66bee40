"""The torch operators of qlora_rs: ``torch.ops.qlora_rs.dequantize_4bit`` and
``torch.ops.qlora_rs.gemm_4bit``.

Each has a schema, a fake (meta) implementation, so that ``torch.compile`` and meta-device models
see through it, and per-device kernels behind it:

- CPU: the Rust core (GIL released; threads from torch's own OpenMP team, ``torch.get_num_threads()``
  of them; kernels chosen at run time for the CPU's instruction set). ``gemm_4bit`` with few rows
  (``M <= CPU_FUSED_GEMM_MAX_M``) runs a fused kernel that reads the packed weight directly; with
  more, the core decodes and the matmul is torch's (MKL/oneDNN). Each packed weight is checked, and
  its double-quantized scales decoded, once while it lives and stays unchanged (:func:`cpu_weight`).
  Decoded weights go into memory already in use (:mod:`~qlora_rs.core.memory`).
- CUDA: kernels registered for the ``CUDA`` dispatch key by ``qlora_rs.core.cuda_ops`` when compiled in.
  Without them every other device (CUDA included) runs a pure-torch decode registered as the
  ``CompositeExplicitAutograd`` default; it is exact but slow and says so once in the log.

Arguments common to both ops describe one packed 4-bit tensor exactly as :class:`QuantState`
holds it: ``packed`` (uint8, or any dtype viewed as its bytes: the float "quant storage" that
FSDP shards), ``absmax`` (float32 per block, or uint8 with double quantization, then decoded as
``nested_code[absmax] * nested_absmax + offset``), ``quant_type``, ``blocksize`` and the
original ``shape``. :func:`quant_args` builds them from a ``(packed, QuantState)`` pair.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.dlpack import to_dlpack

from .. import _lib
from ..errors import InvalidArgumentError
from .op_args import (  # noqa: F401  (check_*, packed_bytes, quant_args: part of this module's API)
    _NESTED_BLOCKSIZE, _numel, check_gemm_input, check_out_dtype, check_quant_args, packed_bytes, quant_args,
)
from .memory import _decode_buffers, _kept_from, decode_buffer, free_decode_buffers, new_output  # noqa: F401
from .quant_state import QuantState, code_table, dtype_name

_log = logging.getLogger("qlora_rs")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

torch.library.define(
    "qlora_rs::dequantize_4bit",
    "(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, str quant_type, "
    "int blocksize, SymInt[] shape, ScalarType dtype) -> Tensor",
)
torch.library.define(
    "qlora_rs::gemm_4bit",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
    "str quant_type, int blocksize, SymInt[] shape) -> Tensor",
)


def _cpu_has_fast_matmul(dtype: torch.dtype) -> bool:
    # These probes are private torch API; a torch without them gets the always-correct float32 path.
    probe = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }.get(dtype, ())
    for name in probe:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return False


# bf16/fp16 GEMMs on CPUs without native support (AVX2, plain AVX-512) run an order of magnitude
# slower than float32; the float32 product of the same bf16 values, rounded once at the end, is
# what a native kernel (fp32 accumulation) computes anyway.
_CPU_NATIVE = {dt: _cpu_has_fast_matmul(dt) for dt in (torch.bfloat16, torch.float16)}


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype in which a product with inputs in ``dtype`` is computed on ``device``: ``dtype``
    itself, except float32 for bf16/fp16 on CPUs without native half-precision matrix units."""
    if device.type == "cpu" and dtype in _CPU_NATIVE and not _CPU_NATIVE[dtype]:
        return torch.float32
    return dtype


_DEQUANTIZE = "qlora_rs::dequantize_4bit"
_GEMM = "qlora_rs::gemm_4bit"


# ---------------------------------------------------------------------------------------------
# CPU: the Rust core.


def _env_choice(choice: Callable[[], Any], invalid: Any) -> Any:
    """``choice()`` (a setting read from the environment once), or ``invalid`` while the variable
    holds a bad value: the first kernel call reports it, importing does not fail."""
    try:
        return choice()
    except Exception:
        return invalid


#: Largest number of activation rows M (the product of x's leading dimensions) for which the CPU
#: ``gemm_4bit`` runs the fused kernel (the packed weight read directly, never decoded to memory);
#: larger M decodes the weight and runs torch's GEMM, which wins once the decode is shared by
#: enough rows. Measured with ``benches/cpu_matmul_bench.py --crossover`` (fused vs dequantize +
#: F.linear, bf16 activations, NF4 + double quant, 2 threads). With bf16 matrix units (a 2-core
#: Xeon with AVX-512 + AMX, two runs) the fused kernel is 1.5-2.0x faster at M = 16, 1.0-1.4x at 24
#: and 0.8-1.1x at 32: 16, the end of the range the kernel is built for, keeps a margin. Without
#: them the products run in float32 (:func:`matmul_dtype`) and the crossover is higher (a 2-core
#: AMD EPYC with AVX2, one run: 1.2-2.3x at M = 32 on 576x1536 to 4096x14336, 0.8-1.5x at 64): 32.
#: Where the fused kernel multiplies bf16 activations with ``vdpbf16ps`` (:func:`cpu_bf16_products`;
#: a 2-core AMD Zen 5 with AVX512-BF16 and no AMX, two runs: 2.3-4.3x at M = 32 and 1.25-2.55x at
#: 64 on 4096x4096, 4096x14336 and 14336x4096, the decode paying page faults for its new tensor;
#: one run with the decode into the reused buffer, :func:`decode_buffer`: 1.43-1.90x at 32,
#: 0.94-1.20x at 64): 64. Either side gives the same result up to float32 rounding. The AVX2 and AMX
#: figures predate the reused buffer, which makes the decode side faster for weights of 32 MiB and
#: more: their crossover may be lower now (not measured).
_CPU_LEVEL: Optional[str] = _env_choice(_lib.cpu_isa, None)
_BF16_DOT: bool = _CPU_LEVEL == "avx512bf16" and _env_choice(_lib.cpu_bf16_products, False)  # bf16 x: vdpbf16ps
CPU_FUSED_GEMM_MAX_M: int = 64 if _BF16_DOT else 16 if _CPU_NATIVE[torch.bfloat16] else 32

#: Whether the kept weights (:func:`cpu_weight`) let the fused products read the double-quantized
#: scales as they are stored (1 byte a block, decoded in the kernel, a tile's at a time) instead of
#: float32 (4): on the AVX-512 levels, where those products are bound by memory, not by the
#: instructions. On a 2-core AMD Zen 5 with the weights cycled from memory, since the kernel looks
#: the codes up by permutes instead of gathers (one run each, turns of calls interleaved): with the
#: bf16 products (``vdpbf16ps``) 1.17-1.23x faster at M = 1, 2 and 4 on 4096x4096 and 14336x4096,
#: 1.05-1.09x at 8 and 16, 1.04x at 32, 0.99x at 64; with the float32 kernel (the AVX-512 level
#: without bf16, or float32 activations) 1.07-1.15x at M = 1, 1.00-1.01x at 4, 0.94-0.98x at 16 and
#: 32, so there only up to :data:`_CODES_MAX_M` rows (with the gathers M = 1 had gained 1.02-1.13x
#: and M = 4 and 16 lost). Only for weights of :data:`_CODES_MIN_BYTES` packed bytes and more:
#: on SmolLM2-135M's layers (576x576, 1536x576, 576x1536) they gave 0.93-1.06x, and with the gathers
#: its generation ran 10% slower with them (60.9 against 67.6 tokens/s). On AVX2 the kernel is
#: bound by its shuffles and the in-kernel scale decode cost 8-11% of it.
_CODES_WHERE_MEMORY_BOUND: bool = _CPU_LEVEL in ("avx512", "avx512bf16")
_CODES_MIN_BYTES = 8 << 20  # the smallest weight measured faster with them (4096x4096)
_CODES_MAX_M = 4  # rows up to which the float32 kernel reads the codes (every M with _BF16_DOT)


def _check_cpu(where: str, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise InvalidArgumentError(f"{where}: {name} is on {t.device}; the CPU kernels need every tensor on the CPU")


# The C entry point of torch's DLPack export: a capsule in ~0.3 us, against ~4.5 us for the
# Python-level ``Tensor.__dlpack__`` (whose checks the callers below have already made). It does
# not refuse tensors that require grad; the kernels only read inputs and write fresh outputs.
_capsule = to_dlpack


class CpuPackedWeight:
    """A packed 4-bit weight on the CPU, checked once, holding what the CPU kernels read.

    Built from the ops' arguments after ``x`` (see :func:`quant_args`): the tensors (or contiguous
    copies) go to a ``_lib.PackedWeight4``, which checks their dtypes and lengths and keeps them
    alive for its lifetime. Double-quantized scales are decoded by the kernels block by block, or,
    with ``float_scales``, once here into float32 (4 bytes a block instead of 1: the kernels'
    inner loop then only loads each scale). On the AVX-512 levels one-row products still read the
    1-byte codes (:data:`_CODES_WHERE_MEMORY_BOUND`).

    The CPU ops and :class:`qlora_rs.nn.Linear4bit` keep one per packed tensor (:func:`cpu_weight`,
    rebuilt when a tensor or the state changes), so that a call pays for no argument check, no
    contiguity copy and no scale conversion: per call only ``x`` and the output cross to Rust."""

    __slots__ = ("shape", "_weight", "_codes")

    def __init__(self, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape,
                 where: str = _GEMM + " (CPU)", *, float_scales: bool = False):
        _check_cpu(where, packed=packed, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code)
        check_quant_args(where, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
        # Capsules, not __dlpack__: cheap (inference tensors given to the ops build one per call).
        # The bytes are held through a tensor of their own over the same storage: a view would keep
        # `packed` itself alive (its _base), and with it the weakly keyed cache entry (cpu_weight).
        data = packed_bytes(packed)
        own = torch.empty(0, dtype=torch.uint8).set_(data.untyped_storage(), data.storage_offset(), data.shape)
        data = _capsule(own)
        absmax = absmax.contiguous()
        self.shape = tuple(int(s) for s in shape)
        rows, cols = (self.shape[0], math.prod(self.shape[1:])) if self.shape else (1, 1)
        self._codes = None
        if nested_absmax is not None:
            nested_absmax = nested_absmax.contiguous()
            nested_code = nested_code.to(torch.float32).contiguous()
            if float_scales and _CODES_WHERE_MEMORY_BOUND and own.numel() >= _CODES_MIN_BYTES:
                self._codes = _lib.PackedWeight4(
                    _capsule(own), _capsule(absmax), _capsule(nested_absmax), _capsule(nested_code), float(offset), quant_type,
                    int(blocksize), rows, cols,
                )
            if float_scales:
                q = absmax
                absmax = torch.empty(q.numel(), dtype=torch.float32)
                _lib.double_dequantize(_capsule(q), _capsule(nested_absmax), float(offset), nested_code.tolist(),
                                       _capsule(absmax))
                nested_absmax = nested_code = None
        self._weight = _lib.PackedWeight4(
            data, _capsule(absmax), None if nested_absmax is None else _capsule(nested_absmax),
            None if nested_code is None else _capsule(nested_code), float(offset), quant_type, int(blocksize), rows, cols,
        )

    def dequantize(self, dtype: torch.dtype, *, isa: Optional[str] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight decoded to ``dtype`` (into ``out``, a contiguous CPU tensor of its size, if given)."""
        n = math.prod(self.shape)
        fresh = out is None
        if fresh:
            out, fresh = new_output(self.shape, dtype)
        elif out.device.type != "cpu" or out.dtype != dtype or out.numel() != n or not out.is_contiguous():
            raise InvalidArgumentError(
                f"{_DEQUANTIZE} (CPU): out is {dtype_name(out.dtype)} {list(out.shape)} on {out.device} (contiguous: "
                f"{out.is_contiguous()}); expected a contiguous CPU {dtype_name(dtype)} tensor of {n} elements"
            )
        _lib.cpu_dequantize_4bit(self._weight, _capsule(out.detach()), isa, fresh)
        return out

    def fused_matmul(self, x: torch.Tensor, *, isa: Optional[str] = None) -> torch.Tensor:
        """``x @ W^T`` in ``x.dtype`` by the fused kernel, for any number of rows. ``x``: a CPU
        float32/float16/bfloat16 tensor ``[..., in_features]`` (checked by the caller)."""
        n_out, k = self.shape
        x = x.contiguous()
        out = x.new_empty((*x.shape[:-1], n_out))  # 2 us less than torch.empty of a torch.Size + tuple
        _lib.cpu_gemm_4bit(self._packed_for(_rows(x, k), x.dtype), _capsule(x), _capsule(out), isa)
        return out

    def decoded_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` in ``x.dtype`` by decoding the weight (into this thread's reused buffer,
        :func:`decode_buffer`) and torch's GEMM in :func:`matmul_dtype`, for any number of rows."""
        mm = matmul_dtype(x.dtype, x.device)
        return _kept_from(F.linear(x.to(mm), self._decoded(mm))).to(x.dtype)

    def _decoded(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight decoded into this thread's buffer (valid until its next decode; a product
        of it goes through :func:`_kept_from`)."""
        return self.dequantize(dtype, out=decode_buffer(math.prod(self.shape), dtype).view(self.shape))

    def _packed_for(self, m: int, dtype: torch.dtype):
        """What the fused kernels read for a product of ``m`` rows of ``dtype``: the 1-byte scale
        codes where they are kept (:data:`_CODES_WHERE_MEMORY_BOUND`) and pay (:data:`_CODES_MAX_M`),
        else the float32 scales."""
        if self._codes is None or (m > _CODES_MAX_M and not (dtype is torch.bfloat16 and _BF16_DOT)):
            return self._weight
        return self._codes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` in ``x.dtype``: the fused kernel up to :data:`CPU_FUSED_GEMM_MAX_M` rows,
        else the decode and torch's GEMM (``x`` as in :meth:`fused_matmul`)."""
        n_out, k = self.shape
        m = _rows(x, k)
        if m > CPU_FUSED_GEMM_MAX_M:
            return self.decoded_matmul(x)
        # fused_matmul, inlined: this runs once per linear layer and generated token.
        x = x.contiguous()
        out = x.new_empty((*x.shape[:-1], n_out))  # 2 us less than torch.empty of a torch.Size + tuple
        _lib.cpu_gemm_4bit(self._packed_for(m, x.dtype), _capsule(x), _capsule(out), None)
        return out


# Private torch API (present since 2.0); without it the CPU kernels are never called directly.
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_function_modes = getattr(torch._C, "_is_torch_function_mode_enabled", None)


def _no_modes() -> bool:
    """Whether no dispatch or function mode (FlopCounterMode, fake tensors...) would see the ops."""
    return not (_dispatch_modes is None or _function_modes is None or _dispatch_modes() or _function_modes())


def _rows(x: torch.Tensor, k: int) -> int:
    """Rows of activations ``x [..., k]`` (the product of its leading dimensions)."""
    return x.numel() // k if k else math.prod(x.shape[:-1])


def cpu_matmul_group(weights: Sequence[CpuPackedWeight], x: torch.Tensor) -> list:
    """``[x @ W^T for W in weights]`` (weights of the same in_features; ``x`` as in
    :meth:`CpuPackedWeight.fused_matmul`), each exactly what ``W.matmul(x)`` gives. Up to
    :data:`CPU_FUSED_GEMM_MAX_M` rows one kernel call computes them all (``x`` converted once,
    the rows of every weight shared among the threads); above, each runs on its own."""
    m = _rows(x, weights[0].shape[1])
    if m > CPU_FUSED_GEMM_MAX_M or len(weights) == 1:
        return [w.matmul(x) for w in weights]
    x = x.contiguous()
    lead = x.shape[:-1]
    outs = [x.new_empty((*lead, w.shape[0])) for w in weights]
    _lib.cpu_gemm_4bit_group([w._packed_for(m, x.dtype) for w in weights], _capsule(x), [_capsule(o) for o in outs], None)
    return outs


# One CpuPackedWeight per packed tensor given to the CPU ops, kept while that tensor lives and
# used again while nothing of the description has changed: training reaches the op with the same
# tensors every step, and Linear4bit's inference calls the kernels through it. Keyed by id(packed)
# with a weak reference to it (cheaper to look up than torch's WeakIdKeyDictionary): the entry
# goes when the tensor does.
_cpu_weights: dict = {}


def _same(ref, t) -> bool:
    return ref is None if t is None else ref is not None and ref() is t


def cpu_weight(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape,
               where: Union[str, Callable[[], str]] = _GEMM, *, unversioned: bool = False) -> CpuPackedWeight:
    """The :class:`CpuPackedWeight` of the ops' arguments after ``x``, checked and built once per
    description (block scales decoded to float32: +1/16 byte a weight while cached, no
    double-quant decode in any call) and kept while ``packed`` lives. It is built again when any of
    the tensors is another object, has another address or was written to (version counter).

    Inference tensors count no versions, so a write to one in inference mode would go unseen:
    they are not cached unless ``unversioned`` (for an owner that calls :func:`forget_cpu_weight`
    after each of its own writes, as :class:`qlora_rs.nn.Linear4bit` does). ``where`` names the
    caller in errors; a callable is called only when the weight is built."""
    # Runs once per layer and token in generation: a flat tuple. Arguments that are not tensors
    # as expected leave it None: the build below then names what is wrong.
    key, versioned = None, False
    nested = nested_absmax is not None and nested_code is not None
    try:
        key = (packed.data_ptr(), packed.shape, absmax.data_ptr(), nested_absmax is None, nested_code is None, offset,
               quant_type, blocksize, tuple(shape))
        if nested:
            key += (nested_absmax.data_ptr(), nested_code.data_ptr())
        key += (packed._version, absmax._version) + ((nested_absmax._version, nested_code._version) if nested else ())
        versioned = True
    except RuntimeError:  # an inference tensor (no version counter), or one without storage
        pass
    except (AttributeError, TypeError):
        key = None
    entry = _cpu_weights.get(id(packed))
    if (entry is not None and entry[0] == key and entry[1]() is packed and _same(entry[2], absmax)
            and _same(entry[3], nested_absmax) and _same(entry[4], nested_code)):
        return entry[5]
    weight = CpuPackedWeight(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape,
                             where if isinstance(where, str) else where(), float_scales=True)
    if key is not None and (versioned or unversioned):
        ident = id(packed)

        def drop(ref, ident=ident):
            if _cpu_weights.get(ident, (None, None))[1] is ref:
                del _cpu_weights[ident]

        refs = tuple(None if t is None else weakref.ref(t) for t in (absmax, nested_absmax, nested_code))
        _cpu_weights[ident] = (key, weakref.ref(packed, drop), *refs, weight)
    return weight


def forget_cpu_weight(packed: Optional[torch.Tensor]) -> None:
    """Drops what :func:`cpu_weight` keeps for ``packed`` (its scales and its hold on the tensors)."""
    entry = _cpu_weights.get(id(packed))
    if entry is not None and entry[1]() is packed:
        del _cpu_weights[id(packed)]


def dequantize_4bit_cpu(
    packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype,
    *, isa: Optional[str] = None, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The CPU decode behind ``torch.ops.qlora_rs.dequantize_4bit`` (same arguments), with two
    more: ``isa``, an instruction-set level from :func:`cpu_isas` (default: :func:`cpu_isa`), and
    ``out``, a contiguous CPU tensor of ``shape``'s size and ``dtype`` to decode into. Every level
    gives the same bits."""
    where = _DEQUANTIZE + " (CPU)"
    check_out_dtype(where, dtype)
    weight = cpu_weight(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, where)
    return weight.dequantize(dtype, isa=isa, out=out).view([int(s) for s in shape])


def gemm_4bit_cpu(
    x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, *, isa: Optional[str] = None
) -> torch.Tensor:
    """``x @ dequant(W)^T`` in ``x.dtype`` by the fused CPU kernel, for any number of rows
    (arguments as ``torch.ops.qlora_rs.gemm_4bit``; ``isa`` as in :func:`dequantize_4bit_cpu`).
    The op uses it up to :data:`CPU_FUSED_GEMM_MAX_M` rows."""
    where = _GEMM + " (CPU)"
    _check_cpu(where, x=x)
    check_gemm_input(where, x, shape)
    weight = cpu_weight(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, where)
    return weight.fused_matmul(x, isa=isa)


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels use in this process: the widest this CPU runs
    (``"avx512bf16"``, ``"avx512"``, ``"avx2"`` or ``"portable"``), capped by the environment
    variable ``QLORA_RS_CPU_ISA`` (read once, at the first use)."""
    return _lib.cpu_isa()


def cpu_isas() -> list:
    """The instruction-set levels this CPU runs, widest first."""
    return _lib.cpu_isas()


def cpu_bf16_products() -> bool:
    """Whether the fused kernel multiplies bfloat16 activations at the ``"avx512bf16"`` level by
    the weight rounded to bfloat16 (``vdpbf16ps``; the weight the decode + GEMM above
    :data:`CPU_FUSED_GEMM_MAX_M` multiplies too) rather than by the float32 weight. By default on
    CPUs without AMX (measured faster on AMD Zen 5; slower on an AVX-512 + AMX Xeon);
    ``QLORA_RS_BF16_PRODUCTS=1`` or ``0`` decides instead (read once, at the first use)."""
    return _lib.cpu_bf16_products()


def _dequantize_cpu(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    return dequantize_4bit_cpu(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype)


def _gemm_cpu(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
    check_gemm_input(_GEMM, x, shape)
    return cpu_weight(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape).matmul(x)


# ---------------------------------------------------------------------------------------------
# Any other device until a kernel is registered for it: decode with torch ops (exact, slow).

_slow_path_logged: set = set()
_code_cache: dict = {}


def _log_slow_path(device: torch.device) -> None:
    if device.type not in _slow_path_logged:
        _slow_path_logged.add(device.type)
        _log.warning(
            "qlora_rs: no %s kernel is registered for the 4-bit ops (qlora_rs.build_info()['cuda_kernels'] is False "
            "or the device is not CUDA); using the pure-torch decode, which is correct but slow",
            device.type,
        )


def _code_on(quant_type: str, device: torch.device) -> torch.Tensor:
    key = (quant_type, str(device))
    if key not in _code_cache:
        _code_cache[key] = code_table(quant_type).to(device)
    return _code_cache[key]


def _dequantize_torch(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    """The decode in torch ops, bit-exact with the Rust core: the scale is ``nested_code[q] *
    nested_absmax + offset`` (two float32 roundings, kept apart as separate ops so nothing fuses
    them into an fma) and each value ``code[nibble] * scale`` in float32, rounded once to ``dtype``."""
    check_quant_args(_DEQUANTIZE, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
    check_out_dtype(_DEQUANTIZE, dtype)
    device = packed.device
    n = _numel(shape)
    blocks = absmax.numel()
    if nested_absmax is None:
        scales = absmax
    else:
        nested = nested_absmax.repeat_interleave(_NESTED_BLOCKSIZE)[:blocks]
        scales = nested_code[absmax.long()] * nested
        scales = scales + torch.tensor(offset, dtype=torch.float32, device=device)
    data = packed_bytes(packed)
    nibbles = torch.stack((data >> 4, data & 0x0F), dim=-1).reshape(-1)[:n]
    values = _code_on(quant_type, device)[nibbles.long()]
    values = values * scales.repeat_interleave(blocksize)[:n]
    return values.to(dtype).reshape([int(s) for s in shape])


def _dequantize_fallback(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    _log_slow_path(packed.device)
    return _dequantize_torch(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype)


def _gemm_fallback(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
    _log_slow_path(x.device)
    check_gemm_input(_GEMM, x, shape)
    w = _dequantize_torch(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, x.dtype)
    return F.linear(x, w)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only.


def _dequantize_fake(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, dtype):
    torch._check(
        packed.numel() * packed.element_size() == (math.prod(shape) + 1) // 2,
        lambda: f"qlora_rs::dequantize_4bit: packed weight size does not match shape {list(shape)}",
    )
    return packed.new_empty(shape, dtype=dtype)


def _gemm_fake(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
    torch._check(len(shape) == 2, lambda: f"qlora_rs::gemm_4bit: weight shape must be [out, in], got {list(shape)}")
    torch._check(
        x.shape[-1] == shape[1],
        lambda: f"qlora_rs::gemm_4bit: x has shape {list(x.shape)}; the weight needs its last dimension {shape[1]}",
    )
    return x.new_empty((*x.shape[:-1], shape[0]))


torch.library.impl("qlora_rs::dequantize_4bit", "CPU", _dequantize_cpu)
torch.library.impl("qlora_rs::gemm_4bit", "CPU", _gemm_cpu)
torch.library.impl("qlora_rs::dequantize_4bit", "CompositeExplicitAutograd", _dequantize_fallback)
torch.library.impl("qlora_rs::gemm_4bit", "CompositeExplicitAutograd", _gemm_fallback)
torch.library.register_fake("qlora_rs::dequantize_4bit", _dequantize_fake)
torch.library.register_fake("qlora_rs::gemm_4bit", _gemm_fake)


# ---------------------------------------------------------------------------------------------
# Autograd of gemm_4bit: the gradient wrt x only (the 4-bit weight is frozen); the backward saves
# nothing but the packed weight and its scales, and dequantizes once.


def grad_input_4bit(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: float,
    quant_type: str,
    blocksize: int,
    shape: Sequence[int],
) -> torch.Tensor:
    """``grad @ dequant(W)`` in ``grad.dtype``: the input gradient of ``x @ W^T``. Plain CPU
    tensors, seen by no compiler or mode, decode into this thread's buffer (as the larger
    products do) through the weight kept for the CPU ops; anything else through the op."""
    mm = matmul_dtype(grad.dtype, grad.device)
    if (type(grad) is torch.Tensor and type(packed) is torch.Tensor and grad.is_cpu and packed.is_cpu
            and not torch.compiler.is_compiling() and _no_modes()):
        w = cpu_weight(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
        return _kept_from(torch.matmul(grad.to(mm), w._decoded(mm))).to(grad.dtype)
    w = torch.ops.qlora_rs.dequantize_4bit(
        packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape, mm
    )
    return torch.matmul(grad.to(mm), w).to(grad.dtype)


def _gemm_setup_context(ctx, inputs, output) -> None:
    _, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code)
    ctx.meta = (offset, quant_type, blocksize, shape)


def _gemm_backward(ctx, grad):
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_input_4bit(grad, *ctx.saved_tensors, *ctx.meta)
    return grad_x, None, None, None, None, None, None, None, None


# The op's Autograd kernel. torch.library.register_autograd installs one that every call passes,
# with or without grad: a Python wrapper that, without grad, redispatches below autograd, crossing
# from C++ to Python a second time for the CPU kernel (3 us of an op call's 12 back to back on a
# 64x64 weight, 2-core Zen 5; 0-30 us after a 4096x4096 product has filled the caches). Where the
# result needs no graph and the CPU kernel is next in line (no mode, subclass, functorch or
# functionalization key), ours calls it at once; everything else goes through the wrapper torch
# generates, so autograd, compile and export behave as with register_autograd. That wrapper is
# private torch API (present in 2.11 and 2.15, the versions tested): without it, register_autograd as before.
_after_autograd = getattr(torch._C, "_after_autograd_keyset", None)
try:
    from torch._library.autograd import Info as _AutogradInfo, make_autograd_impl as _make_autograd_impl
except ImportError:
    _make_autograd_impl = None


def _needs_graph(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record an op on these tensors (None: no tensor)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _make_gemm_autograd(generated: Callable) -> Callable:
    in_place_or_view, cpu = torch._C.DispatchKey.ADInplaceOrView, torch._C.DispatchKey.CPU

    def gemm_autograd(keyset, x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape):
        if ((keyset & _after_autograd).remove(in_place_or_view).highestPriorityTypeId() == cpu
                and not _needs_graph(x, absmax, nested_absmax, nested_code)):
            return _gemm_cpu(x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)
        return generated(keyset, x, packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize, shape)

    return gemm_autograd


if _make_autograd_impl is None or _after_autograd is None:
    torch.library.register_autograd(_GEMM, _gemm_backward, setup_context=_gemm_setup_context)
else:
    _AUTOGRAD_LIB = torch.library.Library("qlora_rs", "IMPL")
    _AUTOGRAD_LIB.impl("gemm_4bit", _make_gemm_autograd(_make_autograd_impl(
        torch.ops.qlora_rs.gemm_4bit.default, _AutogradInfo(_gemm_backward, _gemm_setup_context))),
        "Autograd", with_keyset=True)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.ops.qlora_rs.dequantize_4bit`` on a ``(packed, QuantState)`` pair, on the tensors'
    device (default dtype: the state's)."""
    return torch.ops.qlora_rs.dequantize_4bit(*quant_args(packed, state), dtype or state.dtype)


def gemm_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``x @ dequant(W)^T`` in ``x.dtype`` through ``torch.ops.qlora_rs.gemm_4bit`` (differentiable wrt x)."""
    return torch.ops.qlora_rs.gemm_4bit(x, *quant_args(packed, state))


# CUDA kernels for both ops, registered when the library was built with them (see cuda_ops).
from . import cuda_ops  # noqa: E402,F401
