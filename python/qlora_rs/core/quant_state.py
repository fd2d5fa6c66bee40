"""`QuantState`: everything besides the packed bytes needed to decode a 4-bit tensor, with the
exact serialized form bitsandbytes uses (so state dicts and safetensors files interchange)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .. import _lib
from ..errors import FormatError, InvalidArgumentError

QUANT_TYPES = ("nf4", "fp4", "int4")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PACKED_PREFIX = "quant_state.bitsandbytes__"


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the form bitsandbytes writes into its JSON)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES and key not in ("float", "half", "bf16", "fp16", "fp32"):
        raise InvalidArgumentError(f"unsupported dtype {name!r}: expected one of {', '.join(map(repr, _DTYPES))}")
    return _DTYPES.get(key) or {"float": torch.float32, "fp32": torch.float32, "half": torch.float16,
                                "fp16": torch.float16, "bf16": torch.bfloat16}[key]


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 float32 decode values of a 4-bit type, index = nibble."""
    return torch.tensor(_lib.code_table(quant_type), dtype=torch.float32)


def nested_code_table() -> torch.Tensor:
    """The signed 8-bit dynamic map used for double quantization (256 float32)."""
    return torch.tensor(_lib.dynamic_map(True), dtype=torch.float32)


@dataclass(eq=False)
class QuantState:
    """Decoding state of one 4-bit tensor.

    ``absmax`` is float32 ``[blocks]`` without double quantization, or uint8 ``[blocks]`` with it
    (then ``nested_absmax``, ``nested_code`` and ``offset`` decode it). ``code`` is the 16-value
    quant map, ``shape``/``dtype`` describe the original tensor.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: Optional[float] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = 256
    nested_dtype: torch.dtype = field(default=torch.float32)

    @property
    def nested(self) -> bool:
        """True with double quantization."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes' ``QuantState.as_dict`` returns it.

        With ``packed=True`` every value is a tensor (ready for a state dict / safetensors): the
        non-tensor fields go, as UTF-8 JSON bytes, under ``quant_state.bitsandbytes__<type>``.
        """
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(int(s) for s in self.shape),
        }
        if self.nested:
            d.update(
                {
                    "nested_absmax": self.nested_absmax,
                    "nested_blocksize": self.nested_blocksize,
                    "nested_quant_map": self.nested_code.clone(),
                    "nested_dtype": dtype_name(self.nested_dtype),
                    "nested_offset": float(self.offset),
                }
            )
        if not packed:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        out[_PACKED_PREFIX + self.quant_type] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: Any = "cpu", *, name: Optional[str] = None) -> "QuantState":
        """Rebuilds a state from :meth:`as_dict` output, packed or not, or from the matching
        entries of a bitsandbytes state dict (prefixes such as ``weight.`` are stripped).

        Every field is checked: a missing or malformed one raises :class:`FormatError` naming
        ``name`` (say ``"model.safetensors: model.layers.0.mlp.up_proj.weight"``) and the field."""
        where = f"{name}: " if name else ""
        d = dict(d)
        packed_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in {k.split(".")[-1] for k in d}:
            if len(packed_keys) != 1:
                raise FormatError(
                    f"{where}expected exactly one packed '{_PACKED_PREFIX}<nf4|fp4|int4>' entry or unpacked fields, "
                    f"found {sorted(d)}"
                )
        for k in packed_keys:
            raw = d.pop(k)
            try:
                meta = json.loads(bytes(raw.to("cpu", torch.uint8).flatten().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FormatError(f"{where}{k}: not UTF-8 JSON quantization metadata ({e})") from None
            if not isinstance(meta, dict):
                raise FormatError(f"{where}{k}: the quantization metadata is a JSON {type(meta).__name__}; expected an object")
            key_type = k.rsplit("__", 1)[-1] if "__" in k else None
            if key_type is not None and meta.get("quant_type", key_type) != key_type:
                raise FormatError(f"{where}{k}: field 'quant_type' is {meta.get('quant_type')!r} but the key says {key_type!r}")
            d.update(meta)
        d = {k.split(".")[-1]: v for k, v in d.items()}
        missing = [k for k in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape") if k not in d]
        if missing:
            raise FormatError(f"{where}quantization state lacks {missing}; it has {sorted(d)}")
        fields = _Fields(d, where)
        quant_type = fields.choice("quant_type", QUANT_TYPES)
        code = fields.tensor("quant_map").to(device=device, dtype=torch.float32)
        if not torch.equal(code.cpu(), code_table(quant_type)):
            raise FormatError(f"{where}quant_map does not match the {quant_type} code table; custom maps are not supported")
        blocksize = fields.choice("blocksize", tuple(_lib.BLOCKSIZES))
        state = cls(
            absmax=fields.tensor("absmax").to(device),
            shape=torch.Size(fields.shape("shape")),
            dtype=_DTYPES[fields.choice("dtype", tuple(_DTYPES))],
            blocksize=blocksize,
            quant_type=quant_type,
            code=code,
        )
        if "nested_absmax" in d:
            state.offset = fields.number("nested_offset")
            state.nested_absmax = fields.tensor("nested_absmax").to(device=device, dtype=torch.float32)
            state.nested_code = fields.tensor("nested_quant_map").to(device=device, dtype=torch.float32)
            state.nested_blocksize = fields.choice("nested_blocksize", (256,), default=256)
            state.nested_dtype = _DTYPES[fields.choice("nested_dtype", ("float32",), default="float32")]
        try:
            state.validate()
        except FormatError as e:
            raise FormatError(f"{where}{e}") from None
        return state

    def validate(self) -> None:
        """Checks that the sizes agree with each other; raises FormatError naming the fields that
        disagree."""
        blocks = self.blocks
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != blocks:
            raise FormatError(
                f"absmax is {dtype_name(self.absmax.dtype)} with {self.absmax.numel()} entries; 'shape' "
                f"{list(self.shape)} in blocks of 'blocksize' {self.blocksize} needs {dtype_name(want)} with {blocks}"
            )
        if self.nested:
            nb = -(-blocks // self.nested_blocksize)
            if self.nested_absmax.numel() != nb:
                raise FormatError(f"nested_absmax has {self.nested_absmax.numel()} entries; {blocks} blocks need {nb}")
            if self.nested_code.numel() != 256:
                raise FormatError(f"nested_quant_map has {self.nested_code.numel()} entries; expected 256")
        if self.code.numel() != 16:
            raise FormatError(f"quant_map has {self.code.numel()} entries; expected 16")

    def to(self, device: Any) -> "QuantState":
        """A copy of the state with its tensors on ``device``."""
        s = QuantState(**{f: getattr(self, f) for f in self.__dataclass_fields__})
        s.absmax = self.absmax.to(device)
        s.code = self.code.to(device)
        if self.nested:
            s.nested_absmax = self.nested_absmax.to(device)
            s.nested_code = self.nested_code.to(device)
        return s

    def __repr__(self) -> str:
        dq = ", double_quant" if self.nested else ""
        return (
            f"QuantState({self.quant_type}, shape={list(self.shape)}, dtype={dtype_name(self.dtype)}, "
            f"blocksize={self.blocksize}{dq})"
        )


class _Fields:
    """Typed reads of a quantization state's fields, each failing with a FormatError that names the
    field, what it holds and what was expected (the JSON of a stored state is untrusted input)."""

    def __init__(self, d: dict[str, Any], where: str) -> None:
        self.d, self.where = d, where

    def _bad(self, key: str, expected: str) -> FormatError:
        value = repr(self.d[key]) if not isinstance(self.d[key], torch.Tensor) else "a tensor"
        if len(value) > 60:
            value = value[:57] + "..."
        return FormatError(f"{self.where}field {key!r} is {value}; expected {expected}")

    def _get(self, key: str, default: Any) -> Any:
        if key not in self.d:
            if default is None:
                raise FormatError(f"{self.where}quantization state lacks field {key!r}")
            return default
        return self.d[key]

    def choice(self, key: str, allowed: tuple[Any, ...], default: Any = None) -> Any:
        value = self._get(key, default)
        # Types compared too: JSON true is not 1, 64.0 is not the block size 64.
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise self._bad(key, "one of " + ", ".join(map(repr, allowed)))
        return value

    def number(self, key: str) -> float:
        value = self._get(key, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, "a finite number")
        return float(value)

    def shape(self, key: str) -> list[int]:
        value = self._get(key, None)
        if (not isinstance(value, (list, tuple))
                or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62 for v in value)):
            raise self._bad(key, "a list of non-negative integers")
        return list(value)

    def tensor(self, key: str) -> torch.Tensor:
        value = self._get(key, None)
        if not isinstance(value, torch.Tensor):
            raise self._bad(key, "a tensor")
        return value
