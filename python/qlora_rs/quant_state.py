"""`QuantState`: everything besides the packed bytes needed to decode a 4-bit tensor, with the
exact serialized form bitsandbytes uses (so state dicts and safetensors files interchange)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import _lib
from .errors import FormatError, InvalidArgumentError

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
    def from_dict(cls, d: dict[str, Any], device: Any = "cpu") -> "QuantState":
        """Rebuilds a state from :meth:`as_dict` output, packed or not, or from the matching
        entries of a bitsandbytes state dict (prefixes such as ``weight.`` are stripped)."""
        d = dict(d)
        packed_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in {k.split(".")[-1] for k in d}:
            if len(packed_keys) != 1:
                raise FormatError(
                    f"expected exactly one packed '{_PACKED_PREFIX}<nf4|fp4|int4>' entry or unpacked fields, "
                    f"found {sorted(d)}"
                )
        for k in packed_keys:
            raw = d.pop(k)
            try:
                meta = json.loads(bytes(raw.to("cpu", torch.uint8).flatten().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FormatError(f"{k}: not UTF-8 JSON quantization metadata ({e})") from None
            d.update(meta)
        d = {k.split(".")[-1]: v for k, v in d.items()}
        missing = [k for k in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape") if k not in d]
        if missing:
            raise FormatError(f"quantization state lacks {missing}; it has {sorted(d)}")
        quant_type = str(d["quant_type"])
        if quant_type not in QUANT_TYPES:
            raise FormatError(f"unsupported quant_type {quant_type!r}: expected one of {QUANT_TYPES}")
        code = d["quant_map"].to(device=device, dtype=torch.float32)
        if not torch.equal(code.cpu(), code_table(quant_type)):
            raise FormatError(f"quant_map does not match the {quant_type} code table; custom maps are not supported")
        nested = "nested_absmax" in d
        absmax = d["absmax"].to(device)
        blocksize = int(d["blocksize"])
        _lib.check_blocksize(blocksize)
        state = cls(
            absmax=absmax,
            shape=torch.Size(d["shape"]),
            dtype=parse_dtype(d["dtype"]),
            blocksize=blocksize,
            quant_type=quant_type,
            code=code,
        )
        if nested:
            state.offset = float(d["nested_offset"])
            state.nested_absmax = d["nested_absmax"].to(device=device, dtype=torch.float32)
            state.nested_code = d["nested_quant_map"].to(device=device, dtype=torch.float32)
            state.nested_blocksize = int(d.get("nested_blocksize", 256))
            state.nested_dtype = parse_dtype(d.get("nested_dtype", "float32"))
            if state.nested_blocksize != 256:
                raise FormatError(f"nested_blocksize {state.nested_blocksize} is not supported: expected 256")
        state.validate()
        return state

    def validate(self) -> None:
        """Checks that the sizes agree with each other; raises FormatError naming the mismatch."""
        blocks = self.blocks
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != blocks:
            raise FormatError(
                f"absmax is {dtype_name(self.absmax.dtype)} with {self.absmax.numel()} entries; shape "
                f"{list(self.shape)} in blocks of {self.blocksize} needs {dtype_name(want)} with {blocks}"
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
