"""`from_pretrained`: a transformers model with 4-bit linear layers, loaded from a model directory
without ever holding the 16-bit model in memory.

The model is built from ``config.json`` with its parameters on the meta device (buffers such as
rotary ``inv_freq`` are computed for real by the model's own code), the target linear layers are
replaced by :class:`~qlora_rs.Linear4bit`, and the parameters are then filled one tensor at a
time from the safetensors file(s) (one file, or a sharded ``model.safetensors.index.json``).
Three kinds of checkpoint load the same way:

- converted by ``qlora-rs convert`` and (b) saved by transformers + bitsandbytes: the linear
  weights are stored 4-bit (``<name>.weight`` uint8 plus ``.absmax``, ``.quant_map``,
  ``.quant_state.bitsandbytes__nf4``, ... in bitsandbytes' layout) and are taken as they are;
- float (bf16/fp16/fp32): each linear weight is read, quantized by the Rust core and dropped.

Tensors are read with plain positioned reads into freshly allocated memory rather than through a
memory map, so the resident set really is the 4-bit model plus the one tensor being converted
(mapped file pages would count in the process's RSS until unmapped). bitsandbytes is not used.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .errors import FormatError, InvalidArgumentError
from .nn.linear4bit import Linear4bit
from .quant_state import QUANT_TYPES, QuantState, dtype_name, parse_dtype

__all__ = ["from_pretrained", "save_model", "Checkpoint", "TensorEntry", "QuantOptions", "Footprint", "memory_footprint"]

_log = logging.getLogger("qlora_rs")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_FLOAT_ST = ("F64", "F32", "F16", "BF16")
_OWN_MAPPING_BYTES = 1 << 20
# Companions of a 4-bit weight in bitsandbytes' layout: "<module>.weight.<suffix>".
_QUANT_SUFFIX = re.compile(r"^(?P<weight>.+\.weight)\.(?P<part>absmax|quant_map|nested_absmax|nested_quant_map|"
                           r"quant_state\.bitsandbytes__(?P<qt>\w+))$")
# Checkpoint keys transformers itself ignores when they have no counterpart in the model.
_IGNORED_EXTRA = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids|masked_bias|attn\.bias)$")


# --------------------------------------------------------------------------------------------
# Reading safetensors files


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: file, safetensors dtype name, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_ST


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FormatError(f"{path}: not a safetensors file ({size} bytes, too short for the header length)")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > 100 << 20:
            raise FormatError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


class Checkpoint:
    """The tensors of a model directory (``model.safetensors`` or a sharded index) or of a single
    ``.safetensors`` file, read lazily: only headers are parsed until :meth:`read` is called."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        path = Path(path)
        if path.is_dir():
            self.directory = path
            index, single = path / INDEX_FILE, path / SINGLE_FILE
            if index.is_file():
                files = self._files_from_index(index)
            elif single.is_file():
                files = [single]
            else:
                others = sorted(p.name for p in path.glob("*.safetensors"))
                if len(others) == 1:
                    files = [path / others[0]]
                else:
                    bins = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                    hint = f"; it has {', '.join(bins)} (pickle formats are not read: save as safetensors)" if bins else ""
                    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        elif path.is_file():
            self.directory = path.parent
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        self.files = files
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            header, base = _read_header(file)
            size = file.stat().st_size
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                entry = self._entry(file, name, info, base, size)
                if name in self.entries:
                    raise FormatError(f"{file}: tensor {name!r} is also in {self.entries[name].file}")
                self.entries[name] = entry
        self._handles: dict[Path, Any] = {}
        self._states: dict[str, QuantState] = {}  # parsed 4-bit states (small), by weight

    @staticmethod
    def _files_from_index(index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map': {e})") from None
        files = []
        for name in dict.fromkeys(weight_map.values()):
            file = index.parent / name
            if not file.is_file():
                raise FileNotFoundError(f"{index}: shard {name} is missing from {index.parent}")
            files.append(file)
        return files

    @staticmethod
    def _entry(file: Path, name: str, info: Any, base: int, size: int) -> TensorEntry:
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{file}: malformed header entry for {name!r}: {info!r}") from None
        if dtype not in _ST_DTYPES:
            raise FormatError(f"{file}: tensor {name!r} has dtype {dtype}, which qlora_rs cannot read")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=_ST_DTYPES[dtype]).element_size()
        if not 0 <= begin <= end or base + end > size or end - begin != numel * itemsize:
            raise FormatError(
                f"{file}: tensor {name!r} ({dtype} {list(shape)}, {numel * itemsize} bytes) has data offsets "
                f"[{begin}, {end}] that do not fit the {size - base}-byte data section"
            )
        return TensorEntry(name, file, dtype, shape, base + begin, base + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a new CPU tensor (its own memory, not a view of the file)."""
        entry = self.entries[name]
        if entry.nbytes >= _OWN_MAPPING_BYTES:
            # Its own anonymous mapping, unmapped when the tensor dies: freed heap memory would
            # stay in the process (glibc raises its mmap threshold as large blocks are freed).
            region = mmap.mmap(-1, entry.nbytes)
            buf = torch.frombuffer(region, dtype=torch.uint8, count=entry.nbytes)
            view = memoryview(region)
        else:
            buf = torch.empty(entry.nbytes, dtype=torch.uint8)
            view = memoryview(buf.numpy())
        if entry.nbytes:
            handle = self._handles.get(entry.file)
            if handle is None:
                handle = self._handles[entry.file] = open(entry.file, "rb", buffering=0)
            done = 0
            while done < entry.nbytes:
                n = os.preadv(handle.fileno(), [view[done:]], entry.start + done)
                if n <= 0:
                    raise FormatError(f"{entry.file}: unexpected end of file reading {name!r}")
                done += n
        view.release()
        return buf.view(_ST_DTYPES[entry.dtype]).reshape(entry.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def quantized_weights(self) -> dict[str, dict[str, str]]:
        """4-bit weights in bitsandbytes' layout: ``{"<module>.weight": {part: key}}``."""
        out: dict[str, dict[str, str]] = {}
        for key in self.entries:
            m = _QUANT_SUFFIX.match(key)
            if m:
                out.setdefault(m["weight"], {})[m["part"]] = key
        return out

    def quant_state(self, weight: str, parts: dict[str, str]) -> QuantState:
        """The stored quantization state of the 4-bit ``weight`` (its ``parts`` as
        :meth:`quantized_weights` lists them), every field checked: a FormatError names the file,
        the weight and the field."""
        if weight in self._states:
            return self._states[weight]
        name = f"{self.entries[next(iter(parts.values()))].file}: {weight}"
        if not any(p.startswith("quant_state") for p in parts):
            raise FormatError(f"{name} has quantization tensors but no {weight}.quant_state.bitsandbytes__<type> entry")
        state = QuantState.from_dict({part: self.read(k) for part, k in parts.items()}, name=name)
        if weight in self.entries and self.entries[weight].nbytes != (state.numel + 1) // 2:
            raise FormatError(f"{name}: the packed weight has {self.entries[weight].nbytes} bytes; field 'shape' "
                              f"{list(state.shape)} needs {(state.numel + 1) // 2}")
        self._states[weight] = state
        return state

    def check_quant_states(self, model: nn.Module) -> None:
        """Checks every stored 4-bit state against itself and against ``model``'s 4-bit layers
        before any weight is loaded (transformers' loader would otherwise turn a malformed file into
        a generic conversion report)."""
        for weight, parts in self.quantized_weights().items():
            state = self.quant_state(weight, parts)
            try:
                layer = model.get_submodule(weight.rsplit(".", 1)[0])
            except AttributeError:
                continue  # a checkpoint key the model does not have: reported as unexpected later
            expected = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
            if isinstance(layer, Linear4bit) and tuple(state.shape) != expected:
                raise FormatError(f"{self.entries[weight].file}: {weight}: field 'shape' says a quantized "
                                  f"{list(state.shape)} weight; the model's layer is {list(expected)}")


# --------------------------------------------------------------------------------------------
# Quantization options


@dataclass
class QuantOptions:
    """How linear layers are quantized (for a float checkpoint) or computed (for any)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: Optional[list[str]] = None

    @classmethod
    def parse(cls, quantization: Any, compute_dtype: Any) -> Optional["QuantOptions"]:
        """From ``from_pretrained``'s argument: None or a quant type name (defaults), a dict
        (qlora_rs names or bitsandbytes' ``bnb_4bit_*`` names), a :class:`QloraConfig`, or
        ``False`` (returns None: no quantization)."""
        if quantization is False:
            return None
        if quantization is None or quantization is True:
            opts = cls()
        elif isinstance(quantization, str):
            if quantization not in QUANT_TYPES:
                raise InvalidArgumentError(
                    f"from_pretrained: quantization={quantization!r} is not supported: expected one of "
                    f"{', '.join(QUANT_TYPES)}, a dict, a QloraConfig, None or False"
                )
            opts = cls(quant_type=quantization)
        else:
            from .hf_quantizer import QloraConfig

            config = quantization if isinstance(quantization, QloraConfig) else None
            if config is None:
                if not isinstance(quantization, dict):
                    raise InvalidArgumentError(
                        f"from_pretrained: quantization must be None, False, a quant type name, a dict or a QloraConfig; "
                        f"got {type(quantization).__name__}"
                    )
                config = QloraConfig.from_dict(dict(quantization))
            opts = cls(config.quant_type, config.blocksize, config.double_quant, config.compute_dtype,
                       list(config.skip_modules) if config.skip_modules is not None else None)
        if compute_dtype is not None:
            opts.compute_dtype = parse_dtype(compute_dtype)
        if opts.quant_type not in QUANT_TYPES:
            raise InvalidArgumentError(f"unsupported quant_type {opts.quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
        from . import _lib

        _lib.check_blocksize(int(opts.blocksize))
        return opts


# --------------------------------------------------------------------------------------------
# Building the skeleton


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Within it, new modules get their parameters on the meta device while buffers (computed
    by the modules' own code: rotary frequencies, position ids) are real CPU tensors."""
    original = nn.Module.register_parameter

    def register_parameter(self, name, param):
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def auto_class(config: Any, model_class: Any = None) -> Any:
    """The class to build: ``model_class`` if given (a class, or the name of a transformers
    class such as ``"AutoModelForCausalLM"``/``"BertModel"``), else by ``config.architectures``:
    a causal LM class if it names one, the base model (``AutoModel``) for encoders such as BERT."""
    import transformers

    if model_class is not None:
        if isinstance(model_class, str):
            cls = getattr(transformers, model_class, None)
            if cls is None:
                raise InvalidArgumentError(f"from_pretrained: transformers has no class {model_class!r}")
            return cls
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return transformers.AutoModelForCausalLM
        if arch.endswith("Model"):
            return transformers.AutoModel
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def build_skeleton(config: Any, cls: Any, dtype: torch.dtype) -> nn.Module:
    """The model of ``cls`` for ``config`` with meta parameters, real buffers, in ``dtype``."""
    with empty_parameters():
        if hasattr(cls, "from_config"):
            return cls.from_config(config, dtype=dtype)
        return cls._from_config(config, dtype=dtype)


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """``{tied parameter: its source}`` as transformers ties them."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(keys, dict):
        return dict(keys)
    return {}


def linear_targets(model: nn.Module, skip: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the modules :func:`from_pretrained` quantizes in a float checkpoint: every
    ``nn.Linear`` (and GPT-2 ``Conv1D``) except the output embedding, tied ones and ``skip``
    entries (each a full name or a dotted suffix of one)."""
    from transformers.pytorch_utils import Conv1D

    tied = _tied_keys(model)
    tied_modules = {k.rsplit(".", 1)[0] for pair in tied.items() for k in pair}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    skip = ["lm_head"] if skip is None else list(skip)
    names = []
    for name, m in model.named_modules():
        if not (type(m) is nn.Linear or isinstance(m, Conv1D)):
            continue
        if m is out or name in tied_modules or any(name == s or name.endswith("." + s) for s in skip):
            continue
        names.append(name)
    return names


def _replace_with_linear4bit(model: nn.Module, name: str, opts: QuantOptions, weight_dtype: torch.dtype) -> Linear4bit:
    from transformers.pytorch_utils import Conv1D

    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, Conv1D):
        in_features, out_features = old.weight.shape
    elif isinstance(old, nn.Linear):
        in_features, out_features = old.in_features, old.out_features
    else:
        raise FormatError(f"{name}: the checkpoint stores it 4-bit but the model has a {type(old).__name__} there, not a linear layer")
    layer = Linear4bit(
        in_features, out_features, bias=old.bias is not None, quant_type=opts.quant_type, blocksize=opts.blocksize,
        double_quant=opts.double_quant, compute_dtype=opts.compute_dtype, device="meta", dtype=weight_dtype,
    )
    if old.bias is not None:
        layer.bias = nn.Parameter(torch.empty(out_features, device="meta", dtype=old.bias.dtype))
    layer._qlora_name = name
    layer._qlora_transposed = isinstance(old, Conv1D)
    setattr(parent, attr, layer)
    return layer


# --------------------------------------------------------------------------------------------
# Filling


def _key_resolver(model_keys: set[str], prefix: str):
    """Maps a checkpoint key to a model key: as it is, with the base model's prefix added (a
    base-model checkpoint in a model with a head), or with it removed (the other way round)."""

    def resolve(key: str) -> Optional[str]:
        if key in model_keys:
            return key
        if prefix:
            if prefix + "." + key in model_keys:
                return prefix + "." + key
            if key.startswith(prefix + ".") and key[len(prefix) + 1:] in model_keys:
                return key[len(prefix) + 1:]
        return None

    return resolve


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    parent_name, _, attr = name.rpartition(".")
    module = model.get_submodule(parent_name) if parent_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise FormatError(f"{name}: not a parameter or buffer of the model")


def _move_module(module: nn.Module, device: torch.device) -> None:
    """Moves the module's materialized tensors (not those still on meta) to ``device``."""
    module._apply(lambda t: t if t.device.type == "meta" or t.device == device else t.to(device), recurse=False)


def _file_of(ckpt: Checkpoint, key: str) -> str:
    return str(ckpt.entries[key].file)


def _list(names: Sequence[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def from_pretrained(
    path: Union[str, os.PathLike],
    quantization: Any = None,
    compute_dtype: Any = None,
    device: Union[str, torch.device] = "cpu",
    *,
    dtype: Any = None,
    model_class: Any = None,
    strict: bool = True,
    config: Any = None,
    device_mesh: Any = None,
    prepare: Any = None,
    mp_policy: Any = None,
) -> nn.Module:
    """Loads a transformers model from a model directory with its linear layers in 4 bits.

    Args:
        path: a model directory (``config.json`` plus ``model.safetensors`` or a sharded index).
        quantization: for a float checkpoint, how to quantize: None (the QLoRA defaults: NF4,
            block size 64, double quantization), ``"nf4"``/``"fp4"``/``"int4"``, a dict or a
            :class:`~qlora_rs.QloraConfig`; ``False`` loads without quantizing. A checkpoint
            already in 4 bits keeps its own format (asking for another one is an error).
        compute_dtype: dtype the 4-bit layers compute in (default: the ``QloraConfig``'s, else
            ``torch.bfloat16``).
        device: ``"cpu"`` or ``"cuda"``; each tensor moves there as soon as it is loaded.
        dtype: dtype of the parameters that stay unquantized (embeddings, norms, output head);
            default ``compute_dtype``.
        model_class: the class to build (see :func:`auto_class`); default from
            ``config.architectures``: causal LMs get ``AutoModelForCausalLM``, encoders
            ``AutoModel``.
        strict: raise :class:`~qlora_rs.FormatError` naming the keys when the checkpoint lacks
            some of the model's tensors or has tensors the model lacks; ``False`` initializes
            the missing ones as transformers would and logs both lists.
        config: a transformers config to use instead of ``path/config.json``.
        device_mesh: under torch.distributed, a device mesh to shard the model over with FSDP2
            (:func:`qlora_rs.distributed.load_sharded`): each rank reads only its rows of the
            checkpoint and the model comes back sharded; ``device`` is then the mesh's.
            ``prepare(model)`` runs on the unsharded skeleton first (add LoRA adapters there);
            ``mp_policy`` is FSDP2's ``MixedPrecisionPolicy``.

    Peak memory is the 4-bit model plus one tensor of the checkpoint. The returned model is in
    eval mode; ``model.qlora_rs_checkpoint`` says which kind of checkpoint it came from
    (``"4bit"`` or ``"float"``) and which layers are 4-bit.
    """
    from transformers import AutoConfig

    if device_mesh is not None:
        from .distributed import load_sharded

        return load_sharded(path, device_mesh, quantization=quantization, compute_dtype=compute_dtype, dtype=dtype,
                            model_class=model_class, strict=strict, config=config, prepare=prepare, mp_policy=mp_policy)
    if prepare is not None or mp_policy is not None:
        raise InvalidArgumentError("from_pretrained: prepare and mp_policy apply to sharded loading (device_mesh=...)")
    path = Path(path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import CudaUnavailableError

        raise CudaUnavailableError("from_pretrained: device='cuda' but torch sees no CUDA device")
    if config is None:
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (from_pretrained needs a model directory)")
        config = AutoConfig.from_pretrained(str(path))
    ckpt = Checkpoint(path)
    with ckpt:
        return _load(ckpt, config, quantization, compute_dtype, device, dtype, model_class, strict)


def _checkpoint_options(ckpt: Checkpoint, quantized: dict[str, dict[str, str]]) -> tuple[str, int, bool]:
    """quant type, block size and double quantization of a 4-bit checkpoint (from its first
    weight's stored state; every weight carries its own, so mixed files still load)."""
    weight, parts = next(iter(quantized.items()))
    state = ckpt.quant_state(weight, parts)
    return state.quant_type, state.blocksize, state.nested


def _load(ckpt, config, quantization, compute_dtype, device, dtype, model_class, strict) -> nn.Module:
    quantized = ckpt.quantized_weights()
    opts = QuantOptions.parse(quantization, compute_dtype)
    if quantized:
        qt, bs, dq = _checkpoint_options(ckpt, quantized)
        if opts is None:
            raise InvalidArgumentError(
                f"from_pretrained: {ckpt.directory} is a 4-bit checkpoint ({qt}); quantization=False would need the "
                "float weights: load it quantized and use qlora_rs.merge / dequantize, or load the original checkpoint"
            )
        if quantization is not None and (opts.quant_type, opts.blocksize, opts.double_quant) != (qt, bs, dq):
            raise InvalidArgumentError(
                f"from_pretrained: {ckpt.directory} is already quantized ({qt}, blocksize {bs}, double_quant={dq}) "
                f"but quantization asks for {opts.quant_type}, blocksize {opts.blocksize}, double_quant={opts.double_quant}; "
                "re-quantizing 4-bit weights compounds the error: quantize the float checkpoint instead (or pass "
                "quantization=None to keep the stored format)"
            )
        opts.quant_type, opts.blocksize, opts.double_quant = qt, bs, dq
    compute = opts.compute_dtype if opts is not None else parse_dtype(compute_dtype or torch.bfloat16)
    param_dtype = parse_dtype(dtype) if dtype is not None else compute
    # The config must not send transformers to bitsandbytes: this model is built and filled here.
    if getattr(config, "quantization_config", None) is not None:
        config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    cls = auto_class(config, model_class)
    model = build_skeleton(config, cls, param_dtype)
    prefix = getattr(model, "base_model_prefix", "") or ""
    model_state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    resolve = _key_resolver(set(model_state), prefix)
    tied = _tied_keys(model)

    # Which modules become 4-bit.
    if quantized:
        targets = {}
        for weight in quantized:
            key = resolve(weight)
            if key is None:
                continue  # reported as unexpected below
            targets[key.rsplit(".", 1)[0]] = weight
    elif opts is not None:
        targets = {name: None for name in linear_targets(model, opts.skip_modules)}
    else:
        targets = {}
    layers: dict[str, Linear4bit] = {}
    for name in targets:
        weight_dtype = compute
        key = name + ".weight"
        if not quantized:
            src = next((k for k in ckpt.entries if resolve(k) == key), None)
            if src is not None and ckpt.entries[src].is_float:
                weight_dtype = _ST_DTYPES[ckpt.entries[src].dtype]
        layers[name] = _replace_with_linear4bit(model, name, opts, weight_dtype)

    # One unit per model tensor: plain tensors, or a 4-bit weight with its companions.
    companions = {k for parts in quantized.values() for k in parts.values()}
    units: list[tuple[int, str, str]] = []  # (file order, checkpoint key, model key)
    unexpected: list[str] = []
    file_rank = {f: i for i, f in enumerate(ckpt.files)}
    seen_model_keys: set[str] = set()
    for key, entry in ckpt.entries.items():
        if key in companions:
            continue
        target = resolve(key)
        if target is None:
            if not _IGNORED_EXTRA.search(key):
                unexpected.append(key)
            continue
        if target in tied:
            continue  # tied to its source below; transformers does the same
        if target in seen_model_keys:
            raise FormatError(f"{ckpt.directory}: two checkpoint tensors map to {target} (one is {key})")
        seen_model_keys.add(target)
        units.append((file_rank[entry.file] * (1 << 62) + entry.start, key, target))
    units.sort()
    ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    unexpected = [k for k in unexpected if not any(re.search(p, k) for p in ignore_unexpected)]
    if unexpected and strict:
        raise FormatError(
            f"{ckpt.directory}: the checkpoint has tensors that {type(model).__name__} does not have: {_list(unexpected)} "
            f"(pass model_class= to build another class, or strict=False to ignore them)"
        )

    for _, key, target in units:
        module_name, _, attr = target.rpartition(".")
        layer = layers.get(module_name)
        if layer is not None and attr == "weight":
            _fill_linear4bit(ckpt, layer, key, quantized.get(key), device)
            continue
        value = ckpt.read(key)
        ref = model_state[target]
        if tuple(value.shape) != tuple(ref.shape):
            raise FormatError(
                f"{_file_of(ckpt, key)}: {key} has shape {list(value.shape)}; {type(model).__name__} expects "
                f"{list(ref.shape)} for {target} (does config.json match the weights?)"
            )
        if value.is_floating_point() and ref.is_floating_point():
            value = value.to(ref.dtype)
        _set_tensor(model, target, value.to(device))
        del value

    # Tied parameters share their source; buffers the checkpoint lacks keep the model's values.
    if tied:
        model.tie_weights()
    for name, t in list(model.named_buffers()):
        if t.device != device and t.device.type != "meta":
            _set_tensor(model, name, t.to(device))
    missing = [n for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
               if p.device.type == "meta"]
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    missing = [k for k in missing if not any(re.search(p, k) for p in ignore_missing)]
    if missing:
        if strict:
            raise FormatError(
                f"{ckpt.directory}: the checkpoint lacks tensors of {type(model).__name__}: {_list(missing)} "
                f"(pass model_class= for the class the checkpoint was saved from, or strict=False to initialize them)"
            )
        _initialize_missing(model, missing, device)
        _log.warning("from_pretrained: initialized %d tensors missing from %s: %s", len(missing), ckpt.directory, _list(missing))
    if unexpected:
        _log.warning("from_pretrained: ignored %d checkpoint tensors unknown to %s: %s",
                     len(unexpected), type(model).__name__, _list(unexpected))
    model.eval()
    if layers:
        from .hf_quantizer import mark_loaded_in_4bit

        mark_loaded_in_4bit(model)
    model.qlora_rs_checkpoint = {
        "kind": "4bit" if quantized else "float",
        "path": str(ckpt.directory),
        "quantized_modules": sorted(layers),
        "quantization": None if opts is None else {
            "quant_type": opts.quant_type, "blocksize": opts.blocksize, "double_quant": opts.double_quant,
            "compute_dtype": dtype_name(opts.compute_dtype),
        },
    }
    return model


def _fill_linear4bit(ckpt: Checkpoint, layer: Linear4bit, key: str, parts: Optional[dict[str, str]], device) -> None:
    weight = ckpt.read(key)
    if parts:
        try:
            layer.load_weight_(weight, {part: ckpt.read(k) for part, k in parts.items()}, key)
        except FormatError as e:  # names the tensor and the field already
            raise FormatError(f"{_file_of(ckpt, key)}: {e}") from None
        except (RuntimeError, ValueError) as e:
            raise FormatError(f"{_file_of(ckpt, key)}: {key}: {e}") from None
    else:
        if not weight.is_floating_point():
            raise FormatError(
                f"{_file_of(ckpt, key)}: {key} is {dtype_name(weight.dtype)} {list(weight.shape)} without quantization state; "
                "expected a float weight or a 4-bit one with .absmax/.quant_map/.quant_state entries"
            )
        if getattr(layer, "_qlora_transposed", False):
            weight = weight.t()
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise FormatError(
                f"{_file_of(ckpt, key)}: {key} has shape {list(weight.shape)}; the model expects "
                f"[{layer.out_features}, {layer.in_features}]"
            )
        layer.quantize_weight_(weight.contiguous())
    del weight
    _move_module(layer, device)


def _initialize_missing(model: nn.Module, missing: list[str], device: torch.device) -> None:
    """Gives the missing tensors memory on ``device`` and lets transformers initialize their
    modules as it does for keys absent from a checkpoint."""
    owners = {}
    init = getattr(model, "_init_weights", None)
    for name in missing:
        parent_name, _, attr = name.rpartition(".")
        module = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, Linear4bit):
            if attr == "weight":
                # Initialize in float as transformers would, then quantize.
                linear = nn.Linear(module.in_features, module.out_features, bias=False, dtype=module.weight_dtype)
                if callable(init):
                    with torch.no_grad():
                        init(linear)
                module.quantize_weight_(linear.weight.detach())
                _move_module(module, device)
            continue  # its quantization buffers come with the weight
        t = getattr(module, attr)
        _set_tensor(model, name, torch.empty_like(t, device=device))
        owners[id(module)] = module
    for module in owners.values():
        if callable(init):
            with torch.no_grad():
                init(module)


# --------------------------------------------------------------------------------------------
# Sizes


@dataclass
class Footprint:
    """Parameter count and memory of a model: as it is now, and were every parameter 16-bit."""

    params: int
    bytes_now: int
    bytes_16bit: int
    quantized_params: int
    #: Bytes of the 4-bit layers' weights: packed data plus quantization state.
    quantized_bytes: int = 0

    def __str__(self) -> str:
        return (f"{self.params / 1e6:.2f} M params: {self.bytes_now / 2**20:.1f} MiB as loaded vs "
                f"{self.bytes_16bit / 2**20:.1f} MiB in 16-bit ({self.quantized_params / 1e6:.2f} M params in 4 bits)")


def memory_footprint(model: nn.Module) -> Footprint:
    """Counts every parameter and buffer once (tied ones once); a 4-bit layer's weight counts as
    its logical ``out * in`` parameters and its packed bytes plus quantization state."""
    seen: set[int] = set()
    params = now = b16 = q = qbytes = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            n = module.in_features * module.out_features
            params += n
            q += n
            b16 += 2 * n
            seen.add(id(module.weight))
            now += module.weight.numel() * module.weight.element_size()
            qbytes += module.weight.numel() * module.weight.element_size() + sum(
                b.numel() * b.element_size() for b in module.buffers(recurse=False) if b is not None)
        for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            now += size
            if isinstance(p, nn.Parameter):
                params += p.numel()
                b16 += 2 * p.numel() if p.is_floating_point() else size
            elif not isinstance(module, Linear4bit):
                b16 += size
    return Footprint(params, now, b16, q, qbytes)


# --------------------------------------------------------------------------------------------
# Writing


_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|\.safetensors\.index\.json|"
                           r"\.bin\.index\.json)$")


def save_model(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    source_dir: Optional[Union[str, os.PathLike]] = None,
    quantization_config: Optional[dict] = None,
    force: bool = False,
) -> Path:
    """Writes ``model`` as a transformers model directory: ``model.safetensors`` (tied
    parameters once, as transformers saves them; 4-bit layers in bitsandbytes' layout),
    ``config.json`` (with ``quantization_config`` when given, without one otherwise) and the
    other files of ``source_dir`` (tokenizer, generation config; not its weights or config).

    The directory appears atomically: everything is written into a hidden sibling and renamed
    into place. An existing ``directory`` is replaced only with ``force``.
    """
    from safetensors.torch import save_file

    dst = Path(directory)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists (pass force=True / --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tied = set(_tied_keys(model))
        tensors, seen = {}, {}
        for key, value in model.state_dict().items():
            if key in tied:
                continue
            value = value.detach().to("cpu").contiguous()
            ptr = value.untyped_storage().data_ptr() if value.numel() else None
            if ptr is not None and ptr in seen:
                value = value.clone()  # safetensors refuses two names for one memory
            seen[ptr] = key
            tensors[key] = value
        save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        if floats:
            config["dtype"] = dtype_name(max(set(floats), key=floats.count))
        config.pop("torch_dtype", None)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if source_dir is not None:
            for f in Path(source_dir).iterdir():
                if f.is_file() and f.name != CONFIG_FILE and not _WEIGHT_FILES.search(f.name):
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
