"""One checkpoint reader for safetensors model directories (``model.safetensors`` or a sharded
``model.safetensors.index.json``) and single files: headers parsed once, tensors read on demand
with positioned reads into fresh memory, 4-bit states in bitsandbytes' layout found and checked.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .. import _lib
from ..core.quant_state import QuantState
from ..errors import FormatError
from ..nn.linear4bit import Linear4bit

__all__ = ["Checkpoint", "TensorEntry", "SINGLE_FILE", "INDEX_FILE", "CONFIG_FILE"]

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
            # The one safetensors header parser is the Rust core's: it validates the JSON, every
            # entry's dtype, shape and offsets, and the layout of the data section.
            header = _lib.safetensors_header(file)
            self.metadata.update(header["metadata"])
            for info in header["tensors"]:
                entry = self._entry(file, info, header["data_start"])
                name = entry.name
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
    def _entry(file: Path, info: dict, base: int) -> TensorEntry:
        name, dtype = info["name"], info["dtype"]
        if dtype not in _ST_DTYPES:
            raise FormatError(f"{file}: tensor {name!r} has dtype {dtype}, which qlora_rs cannot read")
        return TensorEntry(name, file, dtype, tuple(info["shape"]), base + info["begin"], base + info["end"])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a new CPU tensor (its own memory, not a view of the file)."""
        entry = self.entries[name]
        return self._read_bytes(entry, entry.start, entry.nbytes).view(_ST_DTYPES[entry.dtype]).reshape(entry.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along dim 0, clamped as a slice is) of the tensor ``name`` as a new CPU
        tensor: only those bytes are read."""
        entry = self.entries[name]
        rows = entry.shape[0] if entry.shape else 1
        start, stop = min(max(start, 0), rows), min(max(stop, 0), rows)
        stop = max(stop, start)
        row_bytes = entry.nbytes // rows if rows else 0
        buf = self._read_bytes(entry, entry.start + start * row_bytes, (stop - start) * row_bytes)
        return buf.view(_ST_DTYPES[entry.dtype]).reshape(stop - start, *entry.shape[1:])

    def _read_bytes(self, entry: TensorEntry, offset: int, nbytes: int) -> torch.Tensor:
        if nbytes >= _OWN_MAPPING_BYTES:
            # Its own anonymous mapping, unmapped when the tensor dies: freed heap memory would
            # stay in the process (glibc raises its mmap threshold as large blocks are freed).
            region = mmap.mmap(-1, nbytes)
            buf = torch.frombuffer(region, dtype=torch.uint8, count=nbytes)
            view = memoryview(region)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            view = memoryview(buf.numpy())
        if nbytes:
            handle = self._handles.get(entry.file)
            if handle is None:
                handle = self._handles[entry.file] = open(entry.file, "rb", buffering=0)
            done = 0
            while done < nbytes:
                n = os.preadv(handle.fileno(), [view[done:]], offset + done)
                if n <= 0:
                    raise FormatError(f"{entry.file}: unexpected end of file reading {entry.name!r}")
                done += n
        view.release()
        return buf

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
