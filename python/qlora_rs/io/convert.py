"""Convert float safetensors checkpoints and GGUF models to bitsandbytes 4-bit (NF4/FP4) and
inspect the result.

The conversion runs in Rust with the GIL released: inputs are memory-mapped, linear weights are
quantized tensor by tensor (in parallel within and across tensors) and written as they are
produced, so memory stays at about the largest tensor whatever the model size. The output loads
with ``transformers.AutoModelForCausalLM.from_pretrained(dst)`` when bitsandbytes is installed.

Which tensors are quantized by default: rank-2 float ``*.weight`` tensors of linear layers;
embeddings, the ``lm_head`` output head, norms, biases and buffers are kept as they are, as
transformers + bitsandbytes do. ``include``/``exclude`` take glob patterns (``*``, ``?``,
``[...]``) matched against full tensor names, e.g. ``"*.mlp.*"`` or ``"lm_head.weight"``.

A GGUF source (llama, qwen2, qwen3 architectures) is decoded in Rust to exactly the float tensors
transformers' GGUF loader produces (its names, llama's q/k un-permuted, rounded to ``dtype``) and
then converted like a safetensors checkpoint; config.json, generation_config.json and the
tokenizer come from transformers (``pip install 'qlora-rs[gguf]'``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from .. import _lib
from .conversion import (  # noqa: F401  (re-exported: this module is the conversion API)
    FLOAT_DTYPES, QUANT_TYPES, ConversionPlan, ConvertSummary, PathLike, ProgressCallback, TensorPlan, _float_dtype,
    _options, default_destination, is_gguf, plan_conversion,
)

@dataclass(frozen=True)
class TensorRecord:
    """One logical tensor of a checkpoint; a 4-bit weight counts its quantization state too."""

    name: str
    shard: str
    shape: tuple[int, ...]
    stored_dtype: str
    dtype: str
    numel: int
    bytes: int
    quant_type: Optional[str]
    blocksize: Optional[int]
    double_quant: bool

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.numel if self.numel else math.nan


@dataclass(frozen=True)
class TensorFidelity:
    """How close a converted tensor is to its source."""

    name: str
    shape: tuple[int, ...]
    quant_type: Optional[str]
    numel: int
    #: Sums over elements: source^2, (decoded - source)^2, decoded^2, decoded * source.
    signal: float
    noise: float
    decoded: float
    dot: float
    max_abs: float
    #: "quantized", "identical", "changed", "missing from source", "missing from output", ...
    status: str

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio in dB (inf when exact)."""
        return _sqnr_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        return _cosine(self.dot, self.signal, self.decoded)


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _cosine(dot: float, a: float, b: float) -> float:
    if a == 0 and b == 0:
        return 1.0
    if a == 0 or b == 0:
        return 0.0
    return dot / math.sqrt(a * b)


@dataclass(frozen=True)
class FidelityTotals:
    """Fidelity over all quantized tensors of a comparison."""

    tensors: int
    numel: int
    #: SQNR of all quantized elements together, and of the worst tensor.
    sqnr_db: float
    min_sqnr_db: float
    min_sqnr_tensor: Optional[str]
    cosine: float
    max_abs: float


def fidelity_totals(rows: Iterable[TensorFidelity]) -> FidelityTotals:
    """Aggregates :func:`compare_checkpoints` rows over the quantized tensors."""
    q = [r for r in rows if r.status == "quantized"]
    signal = sum(r.signal for r in q)
    noise = sum(r.noise for r in q)
    worst = min(q, key=lambda r: r.sqnr_db, default=None)
    return FidelityTotals(
        tensors=len(q),
        numel=sum(r.numel for r in q),
        sqnr_db=_sqnr_db(signal, noise) if q else math.nan,
        min_sqnr_db=worst.sqnr_db if worst else math.nan,
        min_sqnr_tensor=worst.name if worst else None,
        cosine=_cosine(sum(r.dot for r in q), signal, sum(r.decoded for r in q)) if q else math.nan,
        max_abs=max((r.max_abs for r in q), default=math.nan),
    )


def convert_checkpoint(
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
    progress: Optional[ProgressCallback] = None,
    calibrate: Any = None,
    calib_samples: int = 32,
    calib_seq: int = 512,
) -> ConvertSummary:
    """Converts a safetensors checkpoint or a GGUF model to a bitsandbytes 4-bit checkpoint.

    ``src`` is a ``.safetensors`` file or a model directory holding ``model.safetensors`` or a
    sharded ``model.safetensors.index.json`` (plus ``config.json``, tokenizer files, ...).
    ``dst`` defaults to a sibling directory ``<name>-nf4``; a ``dst`` ending in ``.safetensors``
    (for a single-file source) writes just that file. The output directory gets the quantized
    shards (named as in the source, index rewritten), ``config.json`` with the
    ``quantization_config`` transformers writes for bitsandbytes, and the other files of the
    source directory (weights in other formats are left out).

    ``compute_dtype`` only goes into ``quantization_config``. ``threads`` sizes a pool for this
    call (default: ``QLORA_RS_NUM_THREADS`` or all cores). An existing ``dst`` is replaced only
    with ``force=True``. NaN/inf in a weight raise :class:`~qlora_rs.NonFiniteError` naming the
    tensor unless ``allow_nonfinite``. ``sync=False`` skips the fsync before the final rename.

    ``src`` may be a GGUF file (llama, qwen2, qwen3): its tensors are decoded to ``dtype``
    (default bfloat16) exactly as transformers' GGUF loader does, and the output directory is what
    transformers + bitsandbytes write for that model: the same tensors byte for byte, config.json,
    generation_config.json and the tokenizer (these need ``pip install 'qlora-rs[gguf]'``).
    ``dequantize_only=True`` writes the float model instead (no quantization_config), for 16-bit
    fine-tuning; ``dst`` then defaults to ``<stem>-<dtype>``. A ``dst`` ending in ``.safetensors``
    gets the tensors alone (no config or tokenizer, so no extra needed).

    The output appears atomically: it is written to a hidden sibling (``.<name>.tmp-<pid>``) and
    renamed into place; on any error or interruption nothing is left behind. The GIL is released
    while converting; ``progress`` (and Ctrl-C) are checked after every tensor.

    ``calibrate`` (a JSONL or text file, or a ``LongTensor`` of token ids) quantizes the linear
    weights of the decoder blocks to minimise their output error on ``calib_samples`` sequences
    of ``calib_seq`` tokens of it instead of rounding to nearest (see :mod:`qlora_rs.io.calibrate`;
    needs transformers): same format and size, recorded in config.json.
    """
    opts, gguf_opts = _options(quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force,
                               allow_nonfinite, sync, dtype, dequantize_only)
    src, dst = os.fspath(src), None if dst is None else os.fspath(dst)
    if calibrate is not None:
        if dequantize_only:
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError("--calibrate quantizes; it does not combine with --dequantize-only")
        from .calibrate import convert_calibrated

        return convert_calibrated(
            src, dst, calibrate, samples=calib_samples, seq_len=calib_seq, quant_type=quant_type, blocksize=blocksize,
            double_quant=double_quant, compute_dtype=compute_dtype, include=include, exclude=exclude, threads=threads,
            force=force, allow_nonfinite=allow_nonfinite, sync=sync, dtype=dtype, progress=progress,
        )
    if not (is_gguf(src) and not (dst or "").endswith(".safetensors")):
        return ConvertSummary(**_lib.convert_checkpoint(src, dst, *opts, progress, **gguf_opts))
    from . import gguf_metadata

    _lib.gguf_header(src)  # a broken file fails here, before a child process starts
    # Config and tokenizer are written by a child process while the tensors convert; a missing
    # extra fails here, before anything is written.
    job = gguf_metadata.MetadataJob(src, gguf_opts["dtype"] or "bfloat16")
    try:
        d = _lib.convert_checkpoint(src, dst, *opts, progress, add_files=job.finish, **gguf_opts)
    finally:
        job.close()
    return ConvertSummary(**d)


def calibration_record(path: PathLike) -> Optional[dict]:
    """The calibration record of a checkpoint converted with ``calibrate=`` (config.json's
    ``qlora_rs_calibration``, next to ``path``), or None when it was not calibrated."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        cfg = json.loads(((p if p.is_dir() else p.parent) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rec = cfg.get("qlora_rs_calibration") if isinstance(cfg, dict) else None
    return rec if isinstance(rec, dict) else None


def inspect_checkpoint(path: PathLike) -> list[TensorRecord]:
    """Per-tensor records of a checkpoint (file or directory, sharded or not); a 4-bit weight is
    one record with its original shape and dtype and the bytes of all its quantization state."""
    return [TensorRecord(**{**r, "shape": tuple(r["shape"])}) for r in _lib.inspect_checkpoint(os.fspath(path))]


@dataclass(frozen=True)
class GgufTensorRecord:
    """One tensor of a GGUF file."""

    name: str
    #: The transformers parameter it becomes, or None when transformers does not load it.
    hf_name: Optional[str]
    #: Torch order (slowest-moving dimension first).
    shape: tuple[int, ...]
    ggml_type: str
    numel: int
    bytes: int
    #: Where its data starts in the file.
    offset: int
    #: Whether qlora-rs decodes this ggml type.
    decodable: bool

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.numel if self.numel else math.nan


@dataclass(frozen=True)
class GgufInfo:
    """The header of a GGUF file (:func:`inspect_gguf`)."""

    version: int
    alignment: int
    architecture: Optional[str]
    #: Metadata key -> value in file order (long arrays such as the vocabulary included).
    metadata: dict
    tensors: list[GgufTensorRecord]


def inspect_gguf(path: PathLike) -> GgufInfo:
    """The header of a GGUF file, validated whole; reads no tensor data."""
    d = _lib.gguf_header(os.fspath(path))
    d["tensors"] = [GgufTensorRecord(**{**t, "shape": tuple(t["shape"])}) for t in d["tensors"]]
    return GgufInfo(**d)


def read_gguf_tensor(path: PathLike, name: str, dtype: Any = "float32") -> Any:
    """One tensor of a GGUF model as transformers' GGUF loader produces it: ``name`` is the
    transformers name (``model.layers.0.self_attn.q_proj.weight``), the values are decoded,
    un-permuted where transformers does so, and rounded to ``dtype``. Returns a torch tensor."""
    import torch

    dtype = _float_dtype(dtype) or "float32"
    data, shape = _lib.gguf_tensor(os.fspath(path), name, dtype)
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


def compare_checkpoints(
    dst: PathLike, src: PathLike, *, progress: Optional[ProgressCallback] = None
) -> list[TensorFidelity]:
    """Decodes every 4-bit weight of ``dst`` and compares it with the tensor of the same name in
    ``src`` (SQNR, cosine, max abs error); kept tensors are compared byte for byte. ``src`` may be
    a GGUF file, decoded to bfloat16 as transformers loads it."""
    rows = _lib.compare_checkpoints(os.fspath(dst), os.fspath(src), progress)
    return [TensorFidelity(**{**r, "shape": tuple(r["shape"])}) for r in rows]


__all__ = [
    "convert_checkpoint",
    "plan_conversion",
    "default_destination",
    "inspect_checkpoint",
    "calibration_record",
    "inspect_gguf",
    "is_gguf",
    "read_gguf_tensor",
    "compare_checkpoints",
    "fidelity_totals",
    "ConvertSummary",
    "ConversionPlan",
    "TensorPlan",
    "TensorRecord",
    "TensorFidelity",
    "FidelityTotals",
    "GgufInfo",
    "GgufTensorRecord",
]
