"""Calibrated NF4/FP4: 4-bit codes and block scales chosen to minimise each linear layer's output
error on real activations, in the unchanged bitsandbytes format (same tensors, same size; every
reader decodes them as before).

Round-to-nearest stores, for each weight, the code nearest to it at the block's largest magnitude.
Here the model runs one decoder block at a time over calibration text; for every distinct input of
the block's linear layers (q/k/v share one, gate/up share one) ``H = XᵀX`` is summed over the
calibration tokens, and the Rust core (:mod:`qlora_rs._lib`, ``rust/calibrate``) chooses the codes
with GPTQ's error-compensating column sweep, each block's scale (sign included) as the sweep
reaches it, double quantization made exact. The block is then run again with its quantized weights
so that the next block sees what the quantized model will feed it; only one block's activations are
held at a time.

Entry points: :func:`calibrate_model` (in place, on a transformers model), ``quantize_model(model,
calibration=...)`` (4-bit layers from it), ``convert_checkpoint(src, dst, calibrate=DATA)`` and
``qlora-rs convert SRC --calibrate DATA`` (a checkpoint; config.json records the calibration under
``qlora_rs_calibration``, which transformers and bitsandbytes ignore).

Calibration data: a JSONL file in one of the training formats (:mod:`qlora_rs.data`; records are
rendered and tokenized as for training and concatenated) or any other file as plain text. The
token stream is cut into ``samples`` windows of ``seq_len`` tokens spread evenly over it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from .. import _lib
from ..errors import FormatError, InvalidArgumentError

__all__ = [
    "Calibration", "CalibratedWeight", "CalibrationResult", "CONFIG_KEY", "DEFAULT_SAMPLES", "DEFAULT_SEQ_LEN",
    "DEFAULT_DAMP", "calibration_tokens", "calibrate_model", "convert_calibrated", "decoder_layers",
]

_log = logging.getLogger("qlora_rs.calibrate")

#: The config.json key of the calibration record (unknown to transformers and bitsandbytes).
CONFIG_KEY = "qlora_rs_calibration"
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
#: Damping of ``H`` relative to the mean of its diagonal (GPTQ's ``percdamp``).
DEFAULT_DAMP = 0.01
#: Calibration sequences per forward pass.
DEFAULT_BATCH = 8
_JSONL_SUFFIXES = (".jsonl", ".json")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Calibration:
    """What to calibrate on: ``data`` is a JSONL / text file (then ``tokenizer`` is required) or a
    ``LongTensor [sequences, seq_len]`` of token ids."""

    data: Union[PathLike, torch.Tensor]
    tokenizer: Any = None
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    damp: float = DEFAULT_DAMP
    batch_size: int = DEFAULT_BATCH

    def tokens(self) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return _check_tokens(self.data)
        if self.tokenizer is None:
            raise InvalidArgumentError(f"calibration data {os.fspath(self.data)!r} is a file: pass its tokenizer too")
        return calibration_tokens(self.data, self.tokenizer, samples=self.samples, seq_len=self.seq_len)


@dataclass
class CalibratedWeight:
    """One linear weight quantized by the sweep, in bitsandbytes' layout ([out, in])."""

    name: str
    shape: tuple[int, int]
    quant_type: str
    blocksize: int
    packed: torch.Tensor  # uint8 [(n + 1) // 2]
    absmax: torch.Tensor  # uint8 [blocks] with double quant, else float32
    nested_absmax: Optional[torch.Tensor]
    offset: Optional[float]
    #: tr(ΔW H ΔWᵀ) over the calibration tokens: calibrated, and round-to-nearest for comparison.
    error: float
    rtn_error: float
    #: Scales chosen during the sweep (True) or beforehand (blocks that run across row ends).
    sweep_scales: bool
    negative_scales: int

    @property
    def error_ratio(self) -> float:
        """Output error relative to round-to-nearest (below 1: better)."""
        return self.error / self.rtn_error if self.rtn_error > 0 else (1.0 if self.error == 0 else math.inf)

    def quant_state(self, dtype: torch.dtype) -> Any:
        """The :class:`~qlora_rs.core.quant_state.QuantState` that decodes it (``dtype``: the weight's)."""
        from ..core.quant_state import QuantState, code_table, nested_code_table

        return QuantState(
            absmax=self.absmax, shape=torch.Size(self.shape), dtype=dtype, blocksize=self.blocksize,
            quant_type=self.quant_type, code=code_table(self.quant_type), offset=self.offset,
            nested_absmax=self.nested_absmax, nested_code=nested_code_table() if self.offset is not None else None,
        )

    def linear4bit(self, linear: nn.Linear, *, compute_dtype: Any = torch.bfloat16,
                   quant_storage: torch.dtype = torch.uint8) -> Any:
        """A :class:`~qlora_rs.Linear4bit` holding this weight in place of ``linear`` (its bias kept)."""
        from ..nn.linear4bit import Linear4bit

        if (linear.out_features, linear.in_features) != self.shape:
            raise InvalidArgumentError(f"{self.name} {list(self.shape)} does not fit {linear}")
        dtype = linear.weight.dtype
        layer = Linear4bit(
            linear.in_features, linear.out_features, bias=False, quant_type=self.quant_type, blocksize=self.blocksize,
            double_quant=self.offset is not None, compute_dtype=compute_dtype, quant_storage=quant_storage,
            device="meta", dtype=dtype,
        )
        device = linear.weight.device
        layer._set_quantized(self.packed.view(-1, 1).to(device), self.quant_state(dtype).to(device))
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer


@dataclass
class CalibrationResult:
    """What :func:`calibrate_model` did."""

    weights: dict[str, CalibratedWeight]
    #: Linear weights inside the decoder blocks left to round-to-nearest, with why.
    skipped: dict[str, str]
    sequences: int
    seq_len: int
    damp: float
    #: Wall time, and CPU time of this process (all threads) during the calibration.
    seconds: float
    cpu_seconds: float = math.nan
    data: Optional[str] = None
    data_sha256: Optional[str] = None
    timings: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        """The calibration record written to config.json under :data:`CONFIG_KEY`."""
        any_w = next(iter(self.weights.values()), None)
        return {
            "method": "error-compensating column sweep (GPTQ) on the 4-bit grid; each block's scale, sign included, "
                      "chosen to minimise the output error; double quantization exact",
            "version": _lib.__version__,
            "data": self.data,
            "data_sha256": self.data_sha256,
            "sequences": self.sequences,
            "seq_len": self.seq_len,
            "tokens": self.sequences * self.seq_len,
            "damp": self.damp,
            "quant_type": any_w.quant_type if any_w else None,
            "blocksize": any_w.blocksize if any_w else None,
            "seconds": round(self.seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "tensors": {
                n: {"error_ratio": round(w.error_ratio, 4), "scales": "sweep" if w.sweep_scales else "fixed",
                    "negative_scales": w.negative_scales}
                for n, w in self.weights.items()
            },
            "round_to_nearest": dict(self.skipped),
        }


# ----------------------------------------------------------------------------------------------
# Data


def _check_tokens(t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32) or t.shape[0] < 1 or t.shape[1] < 2:
        raise InvalidArgumentError(
            f"calibration tokens must be an integer tensor [sequences >= 1, seq_len >= 2]; got {t.dtype} {list(t.shape)}"
        )
    return t.to(torch.long)


def _token_stream(path: Path, tokenizer: Any) -> list[int]:
    if path.suffix.lower() in _JSONL_SUFFIXES:
        from .data import read_records, tokenize_record

        ids: list[int] = []
        for _, record, kind in read_records(path):
            ids += tokenize_record(record, kind, tokenizer)[0]
        return ids
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e}); calibration data is a JSONL file or plain text") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def calibration_tokens(
    path: PathLike, tokenizer: Any, *, samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN
) -> torch.Tensor:
    """``LongTensor [n, seq_len]``: up to ``samples`` windows of ``seq_len`` tokens, spread evenly
    over the token stream of ``path`` (JSONL in a training format, or plain text). Fewer windows
    than asked for are used (with a log message) when the data is short; data shorter than one
    window, empty or malformed raises :class:`~qlora_rs.FormatError` naming the file."""
    if int(samples) < 1 or int(seq_len) < 2:
        raise InvalidArgumentError(f"calibration needs samples >= 1 and seq_len >= 2; got {samples}, {seq_len}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such calibration data file")
    if p.stat().st_size == 0:
        raise FormatError(f"{p}: the calibration data is empty; it needs at least {seq_len} tokens (one sequence)")
    ids = _token_stream(p, tokenizer)
    available = len(ids) // seq_len
    if available == 0:
        raise FormatError(
            f"{p}: the calibration data holds {len(ids)} tokens, shorter than one sequence of {seq_len} "
            f"(--calib-seq); give more text or a shorter --calib-seq"
        )
    count = min(int(samples), available)
    if count < samples:
        _log.warning("%s holds %d tokens: calibrating on %d sequences of %d tokens instead of %d",
                     p, len(ids), count, seq_len, samples)
    starts = [(i * available // count) * seq_len for i in range(count)]
    return torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.long)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The block-by-block driver


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and list of a transformers model's decoder blocks: the ``nn.ModuleList`` whose
    modules are of the classes the model lists in ``_no_split_modules`` (else the longest list of
    same-class modules holding linear layers)."""
    declared = set(getattr(model, "_no_split_modules", None) or [])
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for n, m in lists:
        if declared and all(type(x).__name__ in declared for x in m):
            return n, m
    candidates = [
        (n, m) for n, m in lists
        if len({type(x) for x in m}) == 1 and any(isinstance(s, nn.Linear) for s in m[0].modules())
    ]
    if not candidates:
        raise InvalidArgumentError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of blocks holding linear layers"
        )
    return max(candidates, key=lambda c: len(c[1]))


def _linear_kind(module: nn.Module) -> Optional[str]:
    if type(module) is nn.Linear:
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return "conv1d" if isinstance(module, Conv1D) else None


def _weight_out_in(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as [out, in] float32 (a GPT-2 Conv1D stores [in, out])."""
    w = module.weight.detach()
    w = w.t() if kind == "conv1d" else w
    return w.to("cpu", torch.float32).contiguous()


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def _capture_first_block(model: nn.Module, first: nn.Module, tokens: torch.Tensor, batch_size: int, device) -> list:
    """(hidden_states, other args, kwargs) of the first decoder block for each batch of tokens."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append([hidden.detach(), rest, kwargs])
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, tokens.shape[0], batch_size):
            ids = tokens[i:i + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != -(-tokens.shape[0] // batch_size):
        raise InvalidArgumentError(f"{type(model).__name__} did not call its first decoder block on every batch")
    return captured


def _run_block(block: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _output_errors(w: torch.Tensor, qs: list[torch.Tensor], h: torch.Tensor) -> list[float]:
    """tr((w - q) H (w - q)ᵀ) for each q, with w, q [out, in] float32 and H [in, in] float32."""
    d = torch.cat([w - q for q in qs])
    per_row = ((d @ h) * d).sum(dim=1, dtype=torch.float64)
    return [float(e.sum()) for e in per_row.split(w.shape[0])]


def _quantize_one(name: str, w: torch.Tensor, u: torch.Tensor, h32: torch.Tensor, quant_type: str, blocksize: int,
                  double_quant: bool) -> tuple[CalibratedWeight, torch.Tensor]:
    from ..core.functional import dequantize, quantize

    rows, cols = w.shape
    n = rows * cols
    blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32)
    nested = torch.empty(-(-blocks // 256), dtype=torch.float32) if double_quant else torch.empty(0)
    r = _lib.calibrate_4bit(w.detach(), rows, cols, u.detach(), quant_type, blocksize, double_quant, False,
                            packed, absmax, nested)
    cw = CalibratedWeight(
        name=name, shape=(rows, cols), quant_type=quant_type, blocksize=blocksize, packed=packed, absmax=absmax,
        nested_absmax=nested if double_quant else None, offset=r["offset"], error=math.nan, rtn_error=math.nan,
        sweep_scales=r["sweep_scales"], negative_scales=r["negative_scales"],
    )
    decoded = dequantize(packed.view(-1, 1), cw.quant_state(torch.float32), torch.float32)
    rp, rs = quantize(w, quant_type, blocksize, double_quant)
    cw.error, cw.rtn_error = _output_errors(w, [decoded, dequantize(rp, rs, torch.float32)], h32)
    return cw, decoded


@torch.no_grad()
def calibrate_model(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    damp: float = DEFAULT_DAMP,
    targets: Optional[Iterable[str]] = None,
    skip: Iterable[str] = (),
    batch_size: int = DEFAULT_BATCH,
    progress: Optional[Callable[[int, int, str], Any]] = None,
) -> CalibrationResult:
    """Quantizes the linear layers of ``model``'s decoder blocks with the column sweep on the
    activations of ``tokens`` (``LongTensor [sequences, seq_len]``), one block at a time.

    In place: each calibrated weight is replaced by its decoded 4-bit value (so later blocks see
    the quantized model's activations); the 4-bit data is in the returned
    :class:`CalibrationResult`. ``targets`` (weight names, ``"model.layers.0.mlp.up_proj.weight"``)
    limits which layers are calibrated; layers whose module name ends with one of ``skip`` are
    left alone. ``progress(block, blocks, message)`` is called after each block.
    """
    from ..core.functional import _check_quant_args

    _check_quant_args(quant_type, blocksize)
    if not (damp > 0 and math.isfinite(damp)):
        raise InvalidArgumentError(f"damp must be a positive number, got {damp}")
    tokens = _check_tokens(tokens)
    start, cpu_start = time.perf_counter(), time.process_time()
    timings = {"forward": 0.0, "hessian": 0.0, "factor": 0.0, "sweep": 0.0}
    prefix, layers = decoder_layers(model)
    wanted = None if targets is None else set(targets)
    skip = tuple(skip)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    weights: dict[str, CalibratedWeight] = {}
    skipped: dict[str, str] = {}
    try:
        t0 = time.perf_counter()
        batches = _capture_first_block(model, layers[0], tokens, max(1, int(batch_size)), device)
        timings["forward"] += time.perf_counter() - t0
        for li, block in enumerate(layers):
            chosen = []
            for sub, m in block.named_modules():
                kind = _linear_kind(m)
                if kind is None:
                    continue
                full = f"{prefix}.{li}.{sub}"
                name = full + ".weight"
                if any(full == s or full.endswith("." + s) for s in skip):
                    continue
                if wanted is not None and name not in wanted:
                    skipped[name] = "not selected for quantization"
                    continue
                chosen.append((full, name, m, kind))
            if chosen:
                _calibrate_block(block, chosen, batches, weights, quant_type, blocksize, double_quant, damp, timings)
            t0 = time.perf_counter()
            for b in batches:
                b[0] = _run_block(block, b[0], b[1], b[2])
            timings["forward"] += time.perf_counter() - t0
            if progress is not None:
                progress(li + 1, len(layers), f"block {li + 1}/{len(layers)}: {len(chosen)} layers")
    finally:
        model.train(was_training)
    return CalibrationResult(
        weights=weights, skipped=skipped, sequences=int(tokens.shape[0]), seq_len=int(tokens.shape[1]), damp=damp,
        seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start, timings=timings,
    )


def _calibrate_block(block, chosen, batches, weights, quant_type, blocksize, double_quant, damp, timings) -> None:
    """Sums H over every batch for each distinct input of the chosen layers, then sweeps them."""
    hessians: list[torch.Tensor] = []
    group_of: dict[str, int] = {}
    leaders: set[str] = set()
    order: list[str] = []
    # Layers called with the very same tensor share an input (q/k/v; gate/up). The first batch's
    # inputs are held until it ends, so no later tensor can reuse their memory and look shared.
    state: dict[str, Any] = {"first": True, "seen": []}

    def hook_for(full: str, kind: str):
        def hook(module, args):
            x = args[0]
            if state["first"]:
                order.append(full)
                shared = next((g for t, g in state["seen"] if t is x), None)
                if shared is not None:
                    group_of[full] = shared
                    return
                group_of[full] = len(hessians)
                state["seen"].append((x, len(hessians)))
                leaders.add(full)
                # float32 sums on the activations' device: each batch adds a few thousand tokens.
                hessians.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device))
            elif full not in leaders:
                if full == order[-1]:
                    raise _Stop
                return
            t0 = time.perf_counter()
            xf = x.reshape(-1, x.shape[-1]).float()
            hessians[group_of[full]].addmm_(xf.t(), xf)
            timings["hessian"] += time.perf_counter() - t0
            if not state["first"] and full == order[-1]:
                # Nothing after the last layer's input matters here: skip the rest of the block.
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(hook_for(full, kind)) for full, _, m, kind in chosen]
    try:
        for i, (hidden, rest, kwargs) in enumerate(batches):
            t0 = time.perf_counter()
            try:
                _run_block(block, hidden, rest, kwargs)
            except _Stop:
                pass
            timings["forward"] += time.perf_counter() - t0
            if i == 0:
                state["first"] = False
                state["seen"] = []
    finally:
        for h in handles:
            h.remove()
    missing = [name for full, name, _, _ in chosen if full not in group_of]
    if missing:
        raise InvalidArgumentError(f"layers {missing} were not called by their decoder block; cannot calibrate them")
    factors: dict[int, torch.Tensor] = {}
    hessians = [h.to("cpu", torch.float64) for h in hessians]
    for full, name, m, kind in chosen:
        g = group_of[full]
        h = hessians[g]
        if g not in factors:
            t0 = time.perf_counter()
            u = torch.empty(h.shape, dtype=torch.float32)
            _lib.hessian_factor(h, h.shape[0], float(damp), u)
            factors[g] = u
            timings["factor"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        w = _weight_out_in(m, kind)
        cw, decoded = _quantize_one(name, w, factors[g], h.float(), quant_type, blocksize, double_quant)
        weights[name] = cw
        decoded = decoded.t() if kind == "conv1d" else decoded
        m.weight.data.copy_(decoded.to(m.weight.dtype))
        timings["sweep"] += time.perf_counter() - t0


def calibrate_quantize_targets(model: nn.Module, calibration: Any, names: Iterable[str], quant_type: str,
                               blocksize: int, double_quant: bool) -> dict[str, CalibratedWeight]:
    """``quantize_model(calibration=...)``: calibrates the linear layers ``names`` (module names)
    that lie in the decoder blocks; records the calibration in ``model.config``."""
    cal = calibration if isinstance(calibration, Calibration) else Calibration(calibration)
    result = calibrate_model(
        model, cal.tokens(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, damp=cal.damp,
        targets={n + ".weight" for n in names}, batch_size=cal.batch_size,
    )
    if not isinstance(cal.data, torch.Tensor):
        result.data, result.data_sha256 = Path(cal.data).name, _file_sha256(Path(cal.data))
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, result.record())
    return result.weights


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _source(src: str) -> tuple[str, dict]:
    """Where transformers finds the model of ``src`` (a model directory or a GGUF file), and the
    keyword arguments that say so."""
    from .conversion import is_gguf

    p = Path(src)
    if is_gguf(p):
        return str(p.parent), {"gguf_file": p.name}
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise InvalidArgumentError(
            f"{p}: calibration runs the model, so SRC must be a model directory with config.json (or a GGUF file), "
            "not a bare .safetensors file"
        )
    return str(p), {}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise InvalidArgumentError("--calibrate runs the model: it needs transformers (pip install 'qlora-rs[train]')") from None
    return transformers


def _load_float_model(src: str, dtype: Optional[str]) -> nn.Module:
    """The float transformers model of a model directory (in its own dtype) or a GGUF file
    (decoded to ``dtype``, default bfloat16, as ``qlora-rs convert`` decodes it)."""
    transformers = _transformers()
    where, kw = _source(src)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if kw else "auto")
    transformers.utils.logging.disable_progress_bar()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kw)
    finally:
        transformers.utils.logging.enable_progress_bar()


def convert_calibrated(
    src: PathLike,
    dst: Optional[PathLike],
    data: Union[PathLike, torch.Tensor],
    *,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    damp: float = DEFAULT_DAMP,
    batch_size: int = DEFAULT_BATCH,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Any = "bfloat16",
    include: Any = None,
    exclude: Any = None,
    threads: Optional[int] = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    sync: bool = True,
    dtype: Any = None,
    progress: Any = None,
    calibration_progress: Optional[Callable[[int, int, str], Any]] = None,
) -> Any:
    """:func:`qlora_rs.convert_checkpoint` with calibration (its ``calibrate=`` argument): the
    same output, with the linear weights of the decoder blocks quantized by the sweep and the
    calibration recorded in config.json. Everything is checked and computed before anything is
    written; the output appears atomically like a plain conversion's."""
    from .conversion import ConvertSummary, _options, is_gguf, plan_conversion

    start = time.perf_counter()
    opts, gguf_opts = _options(quant_type, blocksize, double_quant, compute_dtype, include, exclude, threads, force,
                               allow_nonfinite, sync, dtype, False)
    src = os.fspath(src)
    dst = None if dst is None else os.fspath(dst)
    if (dst or "").endswith(".safetensors"):
        raise InvalidArgumentError(
            f"{dst}: a calibrated conversion writes a model directory (config.json records the calibration); "
            "give a directory as the output"
        )
    plan = plan_conversion(src, dst, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                           compute_dtype=compute_dtype, include=include, exclude=exclude, threads=threads, force=force,
                           allow_nonfinite=allow_nonfinite, sync=sync, dtype=dtype)
    if plan.dst_exists and not force:
        raise FileExistsError(f"{plan.dst}: already exists; pass --force (force=True) to replace it")
    quantized = {t.name: t for t in plan.tensors if t.quantize}
    where, kw = _source(src)
    # The data first: bad data fails before the model is loaded.
    if isinstance(data, torch.Tensor):
        tokens, data_name, data_hash = _check_tokens(data), None, None
    else:
        tokenizer = _transformers().AutoTokenizer.from_pretrained(where, **kw)
        tokens = calibration_tokens(data, tokenizer, samples=samples, seq_len=seq_len)
        data_name, data_hash = Path(data).name, _file_sha256(Path(data))
    model = _load_float_model(src, gguf_opts["dtype"])
    result = calibrate_model(
        model, tokens, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, damp=damp,
        targets=set(quantized), batch_size=batch_size, progress=calibration_progress,
    )
    del model
    result.data, result.data_sha256 = data_name, data_hash
    for name in sorted(set(quantized) - set(result.weights)):
        result.skipped.setdefault(name, "outside the decoder blocks")
    weights = {}
    for name, w in result.weights.items():
        t = quantized.get(name)
        # A GPT-2 Conv1D source stores [in, out]; the calibrated weight is [out, in].
        if t is None or tuple(w.shape) not in (tuple(t.shape), tuple(reversed(t.shape))):
            raise FormatError(f"{src}: the model's {name} {list(w.shape)} is not a tensor of that shape in the checkpoint")
        nested = w.nested_absmax if w.nested_absmax is not None else torch.empty(0, dtype=torch.float32)
        weights[name] = (w.packed, w.absmax, nested, w.offset)
    extra = json.dumps({CONFIG_KEY: result.record()})
    d = _lib.convert_calibrated(src, dst, *opts, weights, extra, progress, dtype=gguf_opts["dtype"],
                                add_files=_gguf_metadata(src, gguf_opts["dtype"]) if is_gguf(src) else None)
    d["seconds"] = time.perf_counter() - start  # the whole conversion, calibration included
    return ConvertSummary(**d, calibration=result.record())


def _gguf_metadata(src: str, dtype: Optional[str]):
    from . import gguf_metadata

    gguf_metadata.check_dependencies()
    header = _lib.gguf_header(src)

    def add_files(directory: str) -> None:
        gguf_metadata.write_metadata(src, directory, dtype or "bfloat16", header)

    return add_files
