"""The plain conversion's options and plan: what :func:`qlora_rs.io.convert.convert_checkpoint`
checks and would do for a source (safetensors or GGUF), shared with the calibrated conversion
(:mod:`qlora_rs.io.calibrate`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

from .. import _lib
from ..errors import InvalidArgumentError

__all__ = ["ConvertSummary", "ConversionPlan", "TensorPlan", "is_gguf", "plan_conversion", "default_destination"]

PathLike = Union[str, "os.PathLike[str]"]
#: ``progress(bytes_done, bytes_total, tensors_done, tensors_total, tensor_name)``, called after
#: each tensor; raising from it stops the conversion (nothing is written).
ProgressCallback = Callable[[int, int, int, int, str], Any]

QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ConvertSummary:
    """What :func:`convert_checkpoint` did."""

    dst: str
    tensors_quantized: int
    tensors_kept: int
    params_quantized: int
    params_kept: int
    #: Bytes of tensor data read, and bytes of safetensors written (headers included).
    bytes_in: int
    bytes_out: int
    #: Bytes the quantized weights take in the output, with all their quantization state.
    bytes_out_quantized: int
    shards: int
    files_copied: list[str]
    files_skipped: list[str]
    seconds: float
    #: The calibration record (config.json's ``qlora_rs_calibration``) of a calibrated conversion.
    calibration: Optional[dict] = None

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the quantized weights (4.127 for NF4, block 64, double quant)."""
        return 8 * self.bytes_out_quantized / self.params_quantized if self.params_quantized else math.nan

    @property
    def gb_per_s(self) -> float:
        """Input gigabytes (1e9 bytes) converted per second."""
        return self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else math.inf


@dataclass(frozen=True)
class TensorPlan:
    """What a conversion does with one source tensor."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    quantize: bool
    reason: str
    numel: int
    #: Bytes in the source (for a GGUF tensor, its blocks).
    bytes_in: int
    #: Output bytes (the JSON quantization state estimated to within a few bytes).
    bytes_out: int
    #: How the source stores it: the safetensors dtype, or the ggml type (``Q4_K``) of a GGUF tensor.
    stored: str = ""


@dataclass(frozen=True)
class ConversionPlan:
    """The plan of a conversion, from the headers alone (``qlora-rs convert --dry-run``)."""

    dst: str
    single_file: bool
    dst_exists: bool
    tensors: list[TensorPlan]
    copy_files: list[str]
    skipped_files: list[str]
    #: ``llm_int8_skip_modules`` written to config.json (None for the default selection).
    skip_modules: Optional[list[str]]
    #: For a GGUF source: its architecture, and the GGUF tensors transformers does not load.
    architecture: Optional[str] = None
    dropped: list[str] = field(default_factory=list)


def _patterns(p: Union[str, Iterable[str], None], what: str) -> list[str]:
    if p is None:
        return []
    if isinstance(p, str):
        return [p]
    out = list(p)
    if not all(isinstance(x, str) for x in out):
        raise InvalidArgumentError(f"{what} must be a glob pattern or a list of them, got {p!r}")
    return out


def _options(
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    compute_dtype: Any,
    include: Union[str, Iterable[str], None],
    exclude: Union[str, Iterable[str], None],
    threads: Optional[int],
    force: bool,
    allow_nonfinite: bool,
    sync: bool,
    dtype: Any = None,
    dequantize_only: bool = False,
) -> tuple[tuple, dict]:
    """The positional options of the core's conversion functions, and its GGUF keyword options."""
    dtype = _float_dtype(dtype)
    if quant_type not in QUANT_TYPES:
        raise InvalidArgumentError(f"unsupported quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
    if threads is not None and int(threads) < 1:
        raise InvalidArgumentError(f"threads must be at least 1, got {threads}")
    # Accept torch dtypes ("torch.bfloat16") as well as names.
    compute = str(compute_dtype).removeprefix("torch.")
    return (
        quant_type, int(blocksize), bool(double_quant), compute,
        _patterns(include, "include"), _patterns(exclude, "exclude"),
        None if threads is None else int(threads), bool(force), bool(allow_nonfinite), bool(sync),
    ), {"dtype": dtype, "dequantize_only": bool(dequantize_only)}


def _float_dtype(dtype: Any) -> Optional[str]:
    """A float dtype name ("bfloat16") from a name or a torch dtype; None stays None."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"unsupported dtype {dtype!r}: expected one of {', '.join(FLOAT_DTYPES)}")
    return name


def is_gguf(path: PathLike) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def plan_conversion(
    src: PathLike,
    dst: Optional[PathLike] = None,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Any = "bfloat16",
    include: Union[str, Iterable[str], None] = None,
    exclude: Union[str, Iterable[str], None] = None,
    threads: Optional[int] = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    sync: bool = True,
    dtype: Any = None,
    dequantize_only: bool = False,
) -> ConversionPlan:
    """What :func:`convert_checkpoint` with the same arguments would do; validates the input
    headers and options, reads no tensor data and writes nothing."""
    opts, gguf_opts = _options(quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force,
                               allow_nonfinite, sync, dtype, dequantize_only)
    d = _lib.plan_checkpoint(os.fspath(src), None if dst is None else os.fspath(dst), *opts, **gguf_opts)
    d["tensors"] = [TensorPlan(**{**t, "shape": tuple(t["shape"])}) for t in d["tensors"]]
    return ConversionPlan(**d)


def default_destination(src: PathLike, quant_type: str = "nf4") -> str:
    """Where :func:`convert_checkpoint` writes by default: ``<dir>-nf4`` next to a model
    directory, ``<stem>-nf4`` next to a ``.safetensors`` file."""
    return _lib.default_destination(os.fspath(src), quant_type)
