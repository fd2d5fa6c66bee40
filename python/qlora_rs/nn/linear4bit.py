"""`Linear4bit`: a frozen 4-bit (NF4/FP4) linear layer, decoded on the fly in its compute dtype.

Storage, chosen so that the layer shards under FSDP2 and serializes like bitsandbytes':

- ``weight``: an ``nn.Parameter(requires_grad=False)`` holding the packed bytes, uint8
  ``[(n + 1) // 2, 1]`` (or the same bytes viewed as a float ``quant_storage`` dtype, which FSDP
  can flatten and shard like any other float parameter);
- non-persistent buffers ``weight_absmax``, ``weight_quant_map``, ``weight_nested_absmax``,
  ``weight_nested_quant_map`` (small: 1/64 byte per weight at blocksize 64) that follow the
  module across devices but are never cast to another dtype;
- plain attributes for the rest of the quantization state.

``state_dict()`` writes exactly bitsandbytes' keys (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``, ``bias``) and ``load_state_dict`` reads them back,
restoring the quantization state; a float ``[out, in]`` ``weight`` (an ``nn.Linear`` state dict)
is quantized on load. ``torch.distributed.checkpoint.state_dict`` reads and writes the same keys
(see :meth:`Linear4bit._fqn_modifiers`); FSDP2 and DDP are covered in :mod:`qlora_rs.distributed`.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import nn

from .. import _lib
from ..core.autograd import Linear4bitFunction
from ..errors import FormatError, InvalidArgumentError
from ..core.functional import quantize
from ..core.ops import CpuPackedWeight, _needs_graph, _no_modes, cpu_matmul_group, cpu_weight, forget_cpu_weight
from ..core.ops import dequantize_4bit as _dequantize_op
from ..core.quant_state import QUANT_TYPES, QuantState, code_table, dtype_name, nested_code_table, parse_dtype

__all__ = ["Linear4bit"]

_QUANT_BUFFERS = ("weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map")
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


class _CompanionKeys:
    """What ``torch.distributed.checkpoint.state_dict`` finds when it resolves a state-dict key
    through attributes (``layer.weight.absmax`` -> ``getattr(getattr(layer, "weight"), "absmax")``):
    the companions of the packed weight name no attribute, so every public name leads here."""

    def __getattr__(self, name: str) -> "_CompanionKeys":
        if name.startswith("_"):
            raise AttributeError(name)
        return self


def _check_storage(where: str, storage: torch.dtype) -> None:
    if storage not in _STORAGE_DTYPES:
        raise InvalidArgumentError(
            f"{where}: quant_storage {storage} is not supported: expected one of "
            f"{', '.join(dtype_name(d) for d in _STORAGE_DTYPES)}"
        )


def _packed_shape(n: int, storage: torch.dtype) -> tuple[int, int]:
    nbytes = (n + 1) // 2
    size = torch.empty((), dtype=storage).element_size()
    if nbytes % size:
        raise InvalidArgumentError(
            f"Linear4bit: {n} weights pack into {nbytes} bytes, which is not a whole number of "
            f"{dtype_name(storage)} elements; use quant_storage=torch.uint8"
        )
    return nbytes // size, 1


class Linear4bit(nn.Linear):
    """A linear layer with a frozen 4-bit weight: ``y = x @ dequant(W)^T + b``.

    The product runs in ``compute_dtype`` (the input is cast to it and the result back to the
    input's dtype, as bitsandbytes does); the backward gives gradients wrt the input and the bias
    only and keeps no dequantized weight between forward and backward.

    A new layer's weight is zero; fill it with :meth:`from_linear`, :meth:`quantize_weight_` or
    ``load_state_dict``. It subclasses ``nn.Linear`` (like bitsandbytes' Linear4bit), so tools
    that look for linear layers, such as PEFT's ``target_modules="all-linear"``, find it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Any = torch.bfloat16,
        quant_storage: torch.dtype = torch.uint8,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        # nn.Linear.__init__ would allocate (and initialize) a full-precision weight; skip it.
        nn.Module.__init__(self)
        if quant_type not in QUANT_TYPES:
            raise InvalidArgumentError(f"Linear4bit: unsupported quant_type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
        _lib.check_blocksize(int(blocksize))
        _check_storage("Linear4bit", quant_storage)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.compute_dtype = parse_dtype(compute_dtype)
        self.quant_storage = quant_storage
        # The dtype recorded in the quantization state: that of the weight before quantization.
        self.weight_dtype = parse_dtype(dtype) if dtype is not None else self.compute_dtype
        self.weight_offset = 0.0
        # transformers' weight initialisation must not touch the packed bytes.
        self._is_hf_initialized = True
        self._qlora_name: Optional[str] = None
        # The siblings this layer's CPU inference computes with (qlora_rs.nn.cpu_decode.group_projections).
        self._cpu_group: Optional[ProjectionGroup] = None
        n = self.in_features * self.out_features
        blocks = -(-n // self.blocksize)
        self.weight = nn.Parameter(
            torch.zeros(_packed_shape(n, quant_storage), dtype=quant_storage, device=device), requires_grad=False
        )
        self.register_buffer("weight_absmax", torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                          device=device), persistent=False)
        self.register_buffer("weight_quant_map", code_table(quant_type).to(device), persistent=False)
        if double_quant:
            self.register_buffer("weight_nested_absmax", torch.zeros(-(-blocks // 256), device=device), persistent=False)
            self.register_buffer("weight_nested_quant_map", nested_code_table().to(device), persistent=False)
        else:
            self.register_buffer("weight_nested_absmax", None, persistent=False)
            self.register_buffer("weight_nested_quant_map", None, persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype or torch.get_default_dtype()))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction / state

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Any = torch.bfloat16,
        quant_storage: torch.dtype = torch.uint8,
    ) -> "Linear4bit":
        """Quantizes an ``nn.Linear`` (on its device; the bias is kept as it is, trainable or not)."""
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"Linear4bit.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.device.type == "meta":
            raise InvalidArgumentError(
                "Linear4bit.from_linear: the linear layer's weight is on the meta device (no data to quantize); "
                "load the weights first, or build Linear4bit on meta and fill it with load_state_dict"
            )
        layer = cls(
            linear.in_features, linear.out_features, bias=False, quant_type=quant_type, blocksize=blocksize,
            double_quant=double_quant, compute_dtype=compute_dtype, quant_storage=quant_storage, device="meta",
            dtype=w.dtype,
        )
        layer.quantize_weight_(w.detach())
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    @torch.no_grad()
    def quantize_weight_(self, weight: torch.Tensor) -> "Linear4bit":
        """Quantizes a float ``[out_features, in_features]`` tensor into this layer (the layer's
        options decide type, block size and double quantization; the result goes to the layer's
        device, or the tensor's for a layer on the meta device)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise InvalidArgumentError(
                f"{self._describe()}: weight of shape {list(weight.shape)} does not fit: expected "
                f"[{self.out_features}, {self.in_features}]"
            )
        packed, state = quantize(weight, self.quant_type, self.blocksize, self.double_quant)
        self._set_quantized(packed, state)
        return self

    def _set_quantized(self, packed: torch.Tensor, state: QuantState, copy: bool = False) -> None:
        # Onto the layer's device; tensors whose shape and dtype do not change are overwritten in
        # place, so the Parameter (which an optimizer or a sharding wrapper may hold) stays the same.
        # With ``copy`` (tensors from a state dict) the layer never aliases the caller's tensors.
        device = self.weight.device if self.weight.device.type != "meta" else packed.device
        storage = packed.reshape(-1).view(torch.uint8)
        if self.quant_storage != torch.uint8:
            storage = storage.view(self.quant_storage)
        self._put("weight", storage.reshape(_packed_shape(state.numel, self.quant_storage)), device, copy)
        self._set_quant_state(state, device, copy)

    def _set_quant_state(self, state: QuantState, device: torch.device, copy: bool = False) -> None:
        """The quantization buffers and options from ``state``, the packed weight left as it is
        (sharded loading fills each rank's rows of it separately)."""
        self._put("weight_absmax", state.absmax, device, copy)
        self._put("weight_quant_map", state.code.to(torch.float32), device, copy)
        nested = state.nested
        self._put("weight_nested_absmax", state.nested_absmax.to(torch.float32) if nested else None, device, copy)
        self._put("weight_nested_quant_map", state.nested_code.to(torch.float32) if nested else None, device, copy)
        self.weight_offset = float(state.offset) if nested else 0.0
        self.quant_type = state.quant_type
        self.blocksize = int(state.blocksize)
        self.weight_dtype = state.dtype

    @torch.no_grad()
    def _put(self, name: str, value: Optional[torch.Tensor], device: torch.device, copy: bool) -> None:
        self._forget_cpu_weight()  # let the old tensors go now, not at the next forward
        current = getattr(self, name)
        if value is None:
            setattr(self, name, None)
        elif current is not None and current.device == device and current.shape == value.shape and current.dtype == value.dtype:
            current.copy_(value)
        elif name == "weight":
            self.weight = nn.Parameter(value.to(device, copy=copy), requires_grad=False)
        else:
            setattr(self, name, value.to(device, copy=copy))

    @property
    def double_quant(self) -> bool:
        return self.weight_nested_absmax is not None

    @property
    def quant_state(self) -> QuantState:
        """The layer's :class:`QuantState` (sharing its tensors)."""
        state = QuantState(
            absmax=self.weight_absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            code=self.weight_quant_map,
        )
        if self.double_quant:
            state.offset = self.weight_offset
            state.nested_absmax = self.weight_nested_absmax
            state.nested_code = self.weight_nested_quant_map
        return state

    @torch.no_grad()
    def set_quant_storage_(self, storage: torch.dtype) -> "Linear4bit":
        """Views the packed bytes as ``storage`` (no copy; on any device, meta included), e.g. a
        float dtype for an FSDP2 that cannot shard integer parameters. Raises when the bytes are
        not a whole number of ``storage`` elements."""
        _check_storage(self._describe(), storage)
        shape = _packed_shape(self.in_features * self.out_features, storage)
        if storage != self.weight.dtype:
            flat = self.weight.detach().reshape(-1).view(torch.uint8)
            self.weight = nn.Parameter(flat.view(storage).reshape(shape), requires_grad=False)
        self.quant_storage = storage
        return self

    def packed_weight(self) -> torch.Tensor:
        """The packed bytes as uint8 ``[(n + 1) // 2, 1]``, whatever the storage dtype."""
        return self.weight.detach().reshape(-1).view(torch.uint8).reshape(-1, 1)

    @torch.no_grad()
    def dequantize(self, dtype: Any = None) -> torch.Tensor:
        """The weight decoded to a ``[out_features, in_features]`` tensor (default dtype: the one
        it had before quantization)."""
        return _dequantize_op(self.weight.detach(), self.quant_state, parse_dtype(dtype) if dtype is not None else None)

    def reset_parameters(self) -> None:
        """Zeroes the bias; the 4-bit weight is left as it is (it is data, not an initialisation)."""
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)

    def _op_args(self, weight: Optional[torch.Tensor] = None) -> tuple:
        """The ops' arguments after ``x`` for this layer's weight (``weight``: the packed weight when
        the caller has it already, else ``self.weight``)."""
        if weight is None:
            weight = self.weight
        if weight.dtype != self.quant_storage:
            # Only a cast of the whole parameter gets here: an FSDP MixedPrecisionPolicy whose
            # param_dtype differs from a float quant_storage (Module.to(dtype) keeps it).
            raise InvalidArgumentError(
                f"{self._describe()}: the packed 4-bit weight reached the forward as {dtype_name(weight.dtype)} "
                f"but is stored as {dtype_name(self.quant_storage)}: something (an FSDP MixedPrecisionPolicy with "
                f"param_dtype={dtype_name(weight.dtype)}?) converted its bytes to numbers; quantize with "
                "quant_storage=torch.uint8, or shard with qlora_rs.distributed.shard_model, which checks the policy"
            )
        # Buffers from the module's dict: attribute access goes through Module.__getattr__, about a
        # microsecond each, and the CPU inference path asks for these once per forward.
        buffers = self._buffers
        return (
            weight,
            buffers["weight_absmax"],
            buffers["weight_nested_absmax"],
            buffers["weight_nested_quant_map"],
            self.weight_offset,
            self.quant_type,
            self.blocksize,
            (self.out_features, self.in_features),
        )

    # torch.distributed.checkpoint.state_dict maps every key to module attributes; through this
    # hook "weight.<companion>" resolves (to _CompanionKeys) instead of failing on the tensor.
    _state_dict_companions = _CompanionKeys()

    def _fqn_modifiers(self) -> dict[str, str]:
        return {"weight": "_state_dict_companions"}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        quant_keys = [k for k in state_dict if k.startswith(wkey + ".")]
        if wkey not in state_dict:
            missing_keys.append(wkey)
        else:
            try:
                self.load_weight_(state_dict[wkey], {k[len(wkey) + 1:]: state_dict[k] for k in quant_keys}, wkey)
            except FormatError:
                raise  # a malformed stored state is a broken file, not a key mismatch to collect
            except (InvalidArgumentError, ValueError, RuntimeError) as e:
                error_msgs.append(f"While loading {wkey}: {e}")
        bkey = prefix + "bias"
        if self.bias is not None:
            if bkey not in state_dict:
                missing_keys.append(bkey)
            else:
                value = state_dict[bkey]
                if tuple(value.shape) != (self.out_features,):
                    error_msgs.append(f"size mismatch for {bkey}: got {list(value.shape)}, expected [{self.out_features}]")
                elif local_metadata.get("assign_to_params_buffers", False) or self.bias.device.type == "meta":
                    self.bias = nn.Parameter(value.to(self.bias.device if self.bias.device.type != "meta" else value.device),
                                             requires_grad=self.bias.requires_grad)
                else:
                    with torch.no_grad():
                        self.bias.copy_(value)
        elif bkey in state_dict:
            unexpected_keys.append(bkey)
        if strict:
            # As nn.Module does: a key is unexpected when its first component names nothing here.
            unexpected_keys.extend(
                k for k in state_dict
                if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] not in ("weight", "bias")
            )

    def load_weight_(self, weight: torch.Tensor, quant: dict, key: str = "weight") -> None:
        """Fills the layer from a stored weight: packed 4-bit bytes with their quantization tensors in
        ``quant`` (keyed ``absmax``, ``quant_map``, ``quant_state.bitsandbytes__nf4``, ... as in a state
        dict after ``weight.``), or a float weight to quantize when ``quant`` is empty. ``key`` names
        the weight in errors."""
        device = self.weight.device if self.weight.device.type != "meta" else weight.device
        if not quant:
            if not weight.is_floating_point() or tuple(weight.shape) != (self.out_features, self.in_features):
                raise InvalidArgumentError(
                    f"{key} is {dtype_name(weight.dtype)} {list(weight.shape)} without quantization state "
                    f"({key}.absmax, {key}.quant_map, {key}.quant_state.bitsandbytes__<type>); expected either those "
                    f"or a float weight [{self.out_features}, {self.in_features}] to quantize"
                )
            self.quantize_weight_(weight.to(device))
            return
        state = QuantState.from_dict(quant, device=device, name=key)
        if tuple(state.shape) != (self.out_features, self.in_features):
            # A well-formed state of another layer: a size mismatch, collected as torch collects them.
            raise InvalidArgumentError(
                f"{key}: field 'shape' says a quantized [{', '.join(map(str, state.shape))}] weight; this layer is "
                f"[{self.out_features}, {self.in_features}]"
            )
        nbytes = weight.numel() * weight.element_size()
        if nbytes != (state.numel + 1) // 2:
            raise InvalidArgumentError(
                f"{key} has {nbytes} bytes ({dtype_name(weight.dtype)} {list(weight.shape)}); shape "
                f"{list(state.shape)} needs {(state.numel + 1) // 2}"
            )
        self._set_quantized(weight, state, copy=True)

    def _apply(self, fn, recurse=True):
        self._forget_cpu_weight()
        # Module.to(dtype)/half()/float() cast every floating tensor; the packed bytes (which may
        # be viewed as floats) and the quantization scales must only move between devices.
        protected = {id(t): t for t in (self.weight, *(getattr(self, b) for b in _QUANT_BUFFERS)) if t is not None}

        def keep_dtype(t):
            out = fn(t)
            original = protected.get(id(t))
            if original is not None and isinstance(out, torch.Tensor) and out.dtype != original.dtype:
                out = original.detach().to(out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    # ------------------------------------------------------------------ forward

    def _describe(self) -> str:
        name = f" '{self._qlora_name}'" if self._qlora_name else ""
        return f"Linear4bit{name} (in_features={self.in_features}, out_features={self.out_features})"

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"{self._describe()}: input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InvalidArgumentError(
                f"{self._describe()}: input dtype {dtype_name(x.dtype)} is not supported: expected a floating-point "
                "tensor (float32, float16 or bfloat16)"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise InvalidArgumentError(
                f"{self._describe()}: input of shape {list(x.shape)} does not fit: its last dimension must be "
                f"{self.in_features}"
            )
        if x.device != self.weight.device:
            raise InvalidArgumentError(
                f"{self._describe()}: input is on {x.device} but the layer's weight is on {self.weight.device}; "
                "move the input or the model"
            )

    def _cpu_kernel_weight(self) -> Optional[CpuPackedWeight]:
        """The weight checked once for the CPU kernels (:func:`qlora_rs.core.ops.cpu_weight`: kept
        until one of its tensors is replaced or written to, or the state changes); None unless it
        is a plain CPU tensor (not meta, another device or a sharded DTensor)."""
        # This layer's own memo first (called once per layer and token in generation): the same
        # tensors, at the same address and version, as when cpu_weight last answered (the weight
        # then a CPU parameter of quant_storage: a tensor of another device or dtype has another
        # address). The state's other fields change only through this module, which drops the
        # memo (_forget_cpu_weight).
        memo = self.__dict__.get("_cpu_memo")
        weight, buffers = self._parameters["weight"], self._buffers
        absmax, nested = buffers["weight_absmax"], buffers["weight_nested_absmax"]
        if memo is not None and memo[0] is weight and memo[1] is absmax and memo[2] is nested:
            try:
                if memo[3] == (weight.data_ptr(), weight._version, absmax._version,
                               None if nested is None else nested._version):
                    return memo[4]
            except RuntimeError:  # inference tensors keep no version (they are not memoized)
                pass
        if type(weight) is not nn.Parameter or not weight.is_cpu or weight.dtype != self.quant_storage:
            return None
        try:
            key = (weight.data_ptr(), weight._version, absmax._version, None if nested is None else nested._version)
        except RuntimeError:  # inference tensors keep no version
            key = None
        # unversioned: inference tensors are cached too; this module's own writes (_put) forget them.
        packed = cpu_weight(*self._op_args(weight), self._describe, unversioned=True)
        if key is not None:
            self.__dict__["_cpu_memo"] = (weight, absmax, nested, key, packed)
        return packed

    def __getstate__(self):
        # Copies and pickles of the layer (copy.deepcopy, torch.save) rebuild the memo on their first forward.
        state = super().__getstate__()
        state.pop("_cpu_memo", None)
        return state

    def _forget_cpu_weight(self) -> None:
        """Drops what the CPU kernels kept of this layer's weight (before its tensors or state change)."""
        self.__dict__.pop("_cpu_memo", None)
        forget_cpu_weight(self._parameters.get("weight"))

    def _cpu_inference(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``x @ W^T + bias`` in ``compute_dtype`` by the CPU kernels straight from the weight
        checked once (no per-call argument checks, op dispatch or autograd node; the same kernels
        and results as the op), or None when the op must run: not a plain CPU tensor, something
        records or traces the call, or ``x`` does not fit."""
        bias = self._parameters["bias"]
        if type(x) is not torch.Tensor or not x.is_cpu or not _untraced(x, bias):
            return None
        weight = self._cpu_kernel_weight()
        if weight is None or x.dim() == 0 or x.shape[-1] != self.in_features or not x.is_floating_point():
            return None
        xc = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        group = self.__dict__.get("_cpu_group")
        y = weight.matmul(xc) if group is None else group.product(self, x, xc, weight)
        return y if bias is None else y + bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._cpu_inference(x)
        if y is not None:
            return y if y.dtype == x.dtype else y.to(x.dtype)
        self._check_input(x)
        y = Linear4bitFunction.apply(x.to(self.compute_dtype), self.bias, *self._op_args())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={dtype_name(self.compute_dtype)}"
        )


class ProjectionGroup:
    """Sibling layers that a model calls one after another on the same input: a layer's query, key
    and value projections, or its gate and up projections (:func:`qlora_rs.nn.cpu_decode.group_projections`
    finds them). In CPU inference the first one's call computes all of their products in one kernel
    call (:func:`qlora_rs.core.ops.cpu_matmul_group`: the input converted once, one team of threads
    instead of one per layer) and keeps the others' for their own calls, which take them when they
    come with that same input tensor: at one token a step, each of these products is a few
    microseconds of work and its call costs as much again.

    The products are those each layer computes alone, bit for bit, and a layer called with any
    other input computes its own. A group whose kept products go unused twice (a model that calls
    its layers on different inputs, or in another order) dissolves: its layers go back to one
    call each. The input is recognized by identity: a caller that wrote into it between the calls
    (in inference mode torch keeps no version count to tell) would get the products of what it
    held before."""

    __slots__ = ("members", "_input", "_kept", "_unused")

    def __init__(self, members) -> None:
        self.members = tuple(members)
        self._input: Optional[weakref.ref] = None
        self._kept: dict = {}
        self._unused = 0
        for layer in self.members:
            layer._cpu_group = self

    def dissolve(self) -> None:
        for layer in self.members:
            if layer.__dict__.get("_cpu_group") is self:
                layer._cpu_group = None
        self._kept, self._input = {}, None

    def product(self, layer: "Linear4bit", x: torch.Tensor, xc: torch.Tensor, weight: CpuPackedWeight) -> torch.Tensor:
        """``xc @ W^T`` for ``layer`` (``xc``: ``x`` in the compute dtype)."""
        kept = self._kept.pop(layer, None)
        if kept is not None and self._input is not None and self._input() is x:
            return kept
        if layer is not self.members[0]:
            return weight.matmul(xc)
        if self._kept:
            self._unused += 1
            if self._unused >= 2:
                self.dissolve()
                return weight.matmul(xc)
        weights = [weight]
        for other in self.members[1:]:
            w = other._cpu_kernel_weight() if other.compute_dtype == layer.compute_dtype else None
            if w is None:
                self._kept = {}
                return weight.matmul(xc)
            weights.append(w)
        outs = cpu_matmul_group(weights, xc)
        self._input = weakref.ref(x)
        self._kept = dict(zip(self.members[1:], outs[1:]))
        return outs[0]

    # Pickled and copied with the model (torch.save, copy.deepcopy): the members, not the products.
    def __getstate__(self):
        return self.members

    def __setstate__(self, members) -> None:
        self.members, self._input, self._kept, self._unused = members, None, {}, 0


def _untraced(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether a forward may call the CPU kernels directly: no autograd graph to record, no
    compiler tracing, no dispatch or function mode (FlopCounterMode, fake tensors...) to see the op."""
    if torch.compiler.is_compiling():  # first: the compiler folds it, and traces nothing below
        return False
    if _needs_graph(x, bias):
        return False
    return _no_modes()
