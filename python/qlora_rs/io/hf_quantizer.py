"""transformers integration: :class:`QloraConfig` and a quantizer plug-in, so that code written for
transformers keeps working with qlora_rs doing the quantization::

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qlora_rs.QloraConfig(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16))

A float checkpoint is quantized while it loads (each linear weight by the Rust core, as soon as it
is read); a 4-bit checkpoint in bitsandbytes' layout (written by ``qlora-rs convert``, by
``save_pretrained`` of such a model, or by transformers + bitsandbytes) is taken as stored.
``save_pretrained`` writes bitsandbytes' layout and a bitsandbytes ``quantization_config``, so the
result loads back through the same call, in qlora_rs' own :func:`~qlora_rs.from_pretrained`, and in
transformers + bitsandbytes. bitsandbytes itself is never imported.

Importing ``qlora_rs`` registers the config (``quant_method`` ``"qlora_rs"``) and the quantizer
with transformers. A bitsandbytes checkpoint carries a bitsandbytes ``quantization_config``, which
transformers would refuse to combine with another config class; the registration therefore also
teaches ``AutoHfQuantizer.merge_quantization_configs`` that a :class:`QloraConfig` passed by the
caller takes over a 4-bit bitsandbytes checkpoint (its stored format is kept; the caller's
``compute_dtype`` applies).

A model loaded this way says it is 4-bit the way one loaded with ``BitsAndBytesConfig`` does, so
that code written for bitsandbytes takes the same paths (see :data:`BNB_4BIT_CHECKS`): it has
``is_loaded_in_4bit = True``, ``is_quantized = True`` and an ``hf_quantizer`` whose
``is_trainable`` is True; its ``quantization_method`` stays ``"qlora_rs"`` (see the table for the
checks that compare it with ``"bitsandbytes"``). When PEFT is installed, loading also makes PEFT
wrap our layers in :class:`qlora_rs.io.peft_integration.PeftLoraLinear4bit` by itself, as it picks its
own layer for bitsandbytes' (``PeftModel.from_pretrained(...).merge_and_unload()`` then works).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import InvalidArgumentError
from ..nn.linear4bit import Linear4bit
from ..core.quant_state import QUANT_TYPES, dtype_name, parse_dtype

__all__ = ["QloraConfig", "QloraHfQuantizer", "QUANT_METHOD", "BNB_4BIT_CHECKS", "mark_loaded_in_4bit"]

QUANT_METHOD = "qlora_rs"
_log = logging.getLogger("qlora_rs")
_QUANT_BUFFERS = ("weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map")
_QUANT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map") + tuple(
    f"quant_state.bitsandbytes__{t}" for t in QUANT_TYPES
)


class QloraConfig(QuantizationConfigMixin):
    """How transformers should quantize a model with qlora_rs (the QLoRA paper's defaults).

    Args:
        quant_type: ``"nf4"`` (default), ``"fp4"`` or ``"int4"``.
        double_quant: quantize the block scales too (default True: 4.127 bits per weight).
        compute_dtype: dtype the 4-bit layers compute in (default ``torch.bfloat16``).
        blocksize: elements per scale (default 64).
        skip_modules: module names (or dotted suffixes) kept unquantized; default: the output
            head and tied modules, as transformers + bitsandbytes do.

    ``to_dict()`` is bitsandbytes' ``quantization_config`` (what ``save_pretrained`` writes into
    config.json), so saved models stay loadable by transformers + bitsandbytes.
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: Any = torch.bfloat16,
        blocksize: int = 64,
        skip_modules: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        if quant_type not in QUANT_TYPES:
            raise InvalidArgumentError(f"QloraConfig: quant_type {quant_type!r} is not supported: expected one of {', '.join(QUANT_TYPES)}")
        from .. import _lib

        _lib.check_blocksize(int(blocksize))
        self.quant_type = quant_type
        self.double_quant = bool(double_quant)
        self.compute_dtype = parse_dtype(compute_dtype)
        self.blocksize = int(blocksize)
        self.skip_modules = list(skip_modules) if skip_modules is not None else None
        unknown = sorted(k for k in kwargs if not k.startswith("_"))
        if unknown:
            raise InvalidArgumentError(
                f"QloraConfig: unknown option(s) {unknown}; expected quant_type, double_quant, compute_dtype, blocksize, skip_modules"
            )

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs: Any):
        """From qlora_rs' option names or from a bitsandbytes ``quantization_config``
        (``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``, ``bnb_4bit_compute_dtype``,
        ``llm_int8_skip_modules``)."""
        d = dict(config_dict)
        method = d.pop("quant_method", QUANT_METHOD)
        if method not in (QUANT_METHOD, "bitsandbytes"):
            raise InvalidArgumentError(f"QloraConfig: quant_method {method!r} is neither {QUANT_METHOD!r} nor 'bitsandbytes'")
        if method == "bitsandbytes" or any(k.startswith(("bnb_4bit_", "llm_int8_", "load_in_")) for k in d):
            if d.get("load_in_8bit") or d.get("_load_in_8bit"):
                raise InvalidArgumentError("QloraConfig: an 8-bit (LLM.int8) bitsandbytes config is not supported: qlora_rs is 4-bit")
            d = {
                "quant_type": d.get("bnb_4bit_quant_type", "fp4"),  # bitsandbytes' own default
                "double_quant": d.get("bnb_4bit_use_double_quant", False),
                "compute_dtype": d.get("bnb_4bit_compute_dtype") or torch.float32,
                "skip_modules": d.get("llm_int8_skip_modules"),
                "blocksize": d.get("blocksize", 64),
            }
        config = cls(**d)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": self.skip_modules,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def options(self) -> dict[str, Any]:
        """The options in qlora_rs' own names."""
        return {"quant_type": self.quant_type, "double_quant": self.double_quant, "compute_dtype": self.compute_dtype,
                "blocksize": self.blocksize, "skip_modules": self.skip_modules}

    def __repr__(self) -> str:
        return (f"QloraConfig(quant_type={self.quant_type!r}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}, blocksize={self.blocksize}, skip_modules={self.skip_modules})")


class _QuantizerOp(ConversionOps):
    """An op bound to the quantizer of this load. transformers deep-copies the converters (and
    their ops) per weight; the copies must still report to the one quantizer."""

    def __init__(self, quantizer: "QloraHfQuantizer") -> None:
        # transformers reads `hf_quantizer` to leave the stored dtypes of our inputs alone.
        self.hf_quantizer = quantizer

    def __deepcopy__(self, memo: dict) -> "_QuantizerOp":
        return type(self)(self.hf_quantizer)

    @property
    def reverse_op(self) -> ConversionOps:
        return _Identity()


class _Quantize(_QuantizerOp):
    """Quantizes one float linear weight into its Linear4bit as soon as it is read."""

    @torch.no_grad()
    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            if getattr(module, "_qlora_transposed", False):
                value = value.t()
            module.quantize_weight_(value.contiguous())
            self.hf_quantizer._remember(module, name, missing_keys)
            out[name] = module.weight
        return out


class _Deserialize(_QuantizerOp):
    """Rebuilds a Linear4bit from the stored packed weight and its quantization tensors."""

    @torch.no_grad()
    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        values = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if isinstance(module, Linear4bit) and len(values) == 1 and values["weight"].is_floating_point():
            # This layer was stored unquantized although the config would quantize it.
            module.quantize_weight_(values["weight"].t().contiguous() if getattr(module, "_qlora_transposed", False)
                                    else values["weight"])
            self.hf_quantizer._remember(module, full_layer_name, missing_keys)
            return {"weight": module.weight}
        if len(values) == 1 or not isinstance(module, Linear4bit):
            # A weight stored unquantized (embedding, norm, output head): transformers skips its
            # dtype cast because this op handles it, so cast to the model's dtype here.
            ref = model.get_parameter(full_layer_name) if "weight" in values else None
            if ref is not None and ref.is_floating_point():
                values = {k: v.to(ref.dtype) if v.is_floating_point() else v for k, v in values.items()}
            return values
        module.load_state_dict(values, strict=False)
        self.hf_quantizer._remember(module, full_layer_name, missing_keys)
        return {"weight": module.weight}


class _Identity(ConversionOps):
    """Saving: the state dict already holds bitsandbytes' keys."""

    def convert(self, input_dict, **kwargs):
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return _Identity()


class QloraHfQuantizer(HfQuantizer):
    """transformers' quantizer plug-in for :class:`QloraConfig` (see the module docstring)."""

    requires_calibration = False
    quantization_config: QloraConfig

    serialized_names = {"weight": ["weight"] + [f"weight.{p}" for p in _QUANT_PARTS]}

    def __init__(self, quantization_config: QloraConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._states: dict[str, dict[str, Any]] = {}

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise InvalidArgumentError("QloraConfig: disk offload (device_map 'disk') is not supported with qlora_rs 4-bit layers")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, Linear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model: nn.Module, dtype: Any = None, **kwargs: Any) -> None:
        from transformers.pytorch_utils import Conv1D

        from .skeleton import QuantOptions, _replace_with_linear4bit

        config = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.skip_modules, getattr(model, "_keep_in_fp32_modules", None)
        )
        opts = QuantOptions(config.quant_type, config.blocksize, config.double_quant, config.compute_dtype)
        weight_dtype = parse_dtype(dtype) if isinstance(dtype, torch.dtype) else config.compute_dtype
        for name, module in list(model.named_modules()):
            if not (type(module) is nn.Linear or isinstance(module, Conv1D)):
                continue
            if not should_convert_module(name, self.modules_to_not_convert):
                continue
            layer = _replace_with_linear4bit(model, name, opts, weight_dtype)
            if not self.pre_quantized:
                # Until its float weight arrives, the layer holds a float placeholder of the
                # weight's shape, as bitsandbytes' layers do: transformers before 5.2x casts each
                # checkpoint tensor to its placeholder's dtype, and a uint8 one would truncate the
                # weights to integers before _Quantize sees them.
                layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=weight_dtype,
                                                        device="meta"), requires_grad=False)
            layer.requires_grad_(False)
        files = kwargs.get("checkpoint_files")
        if self.pre_quantized and files and all(str(f).endswith(".safetensors") for f in files):
            # A malformed stored state must be a FormatError naming the file, the weight and the field,
            # not one line of transformers' conversion report: check every state before loading.
            from .checkpoint import Checkpoint

            # (transformers builds the skeleton under a meta default device; the states are read on the CPU)
            with torch.device("cpu"), Checkpoint(files[0] if len(files) == 1 else Path(files[0]).parent) as ckpt:
                ckpt.check_quant_states(model)

    def _remember(self, module: Linear4bit, weight_name: str, missing_keys: Optional[set]) -> None:
        """Keeps the layer's quantization buffers: transformers resets every non-persistent
        buffer after loading (they are restored in ``_process_model_after_weight_loading``), and
        counts the serialized companions of the weight as missing unless told."""
        prefix = weight_name.rsplit(".", 1)[0]
        self._states[prefix] = {b: getattr(module, b) for b in _QUANT_BUFFERS} | {"weight_offset": module.weight_offset}
        if missing_keys is not None:
            for part in _QUANT_PARTS:
                missing_keys.discard(f"{prefix}.weight.{part}")

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, saved in self._states.items():
            module = model.get_submodule(name)
            for attr, value in saved.items():
                setattr(module, attr, value)
        self._states.clear()
        mark_loaded_in_4bit(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def get_quantize_ops(self) -> ConversionOps:
        return _Quantize(self)

    def get_weight_conversions(self) -> list:
        # Built here rather than by the base class: newer transformers derive it from
        # serialized_names and get_load_operations, transformers 5.1x's base returns none.
        from transformers.core_model_loading import WeightConverter

        if not self.pre_quantized:
            return []
        # Longest first: transformers 5.1x matches the alternatives in order, and "weight" would
        # also match the start of "weight.absmax".
        return [WeightConverter(source_patterns=sorted(names, key=len, reverse=True), target_patterns=param,
                                operations=[_Deserialize(self)])
                for param, names in self.serialized_names.items()]

    def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
        unmark_loaded_in_4bit(model)
        for name, module in list(model.named_modules()):
            if isinstance(module, Linear4bit):
                w = module.dequantize(dtype or module.weight_dtype)
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                   device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    linear.weight.copy_(w)
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
                model.set_submodule(name, linear)
        return model


BNB_4BIT_CHECKS = """
Every place in transformers 5.17-5.24, PEFT 0.21, TRL 1.16 and accelerate 1.15 that tells a
bitsandbytes 4-bit model from others (found by reading their sources for is_loaded_in_4bit,
is_quantized, quantization_method, QuantizationMethod.BITS_AND_BYTES, Linear4bit, Params4bit and
bnb), what it does for bitsandbytes, and how a model loaded through QloraConfig meets it.

reads model.is_loaded_in_4bit (set by mark_loaded_in_4bit: taken exactly as for bitsandbytes)
  peft/utils/other.py  prepare_model_for_kbit_training   gradient checkpointing on + input-grad hook
  peft/peft_model.py, peft/mixed_model.py  _prepare_model_for_gradient_checkpointing   no extra hook
  peft/tuners/lora/model.py, peft/tuners/adalora/model.py, peft/tuners/ia3/model.py,
  peft/tuners/vera/model.py, peft/tuners/pvera/model.py, peft/tuners/randlora/model.py,
  peft/tuners/road/model.py, peft/tuners/hira/model.py  loaded_in_4bit passed to the layer
      dispatchers (for LoRA ours answers first: PeftLoraLinear4bit, see below)
  peft/tuners/ia3/model.py  refuses to merge IA3 into a 4-bit model   same refusal
  trl/trainer/sft_trainer.py, trl/trainer/dpo_trainer.py, trl/trainer/kto_trainer.py,
  trl/trainer/reward_trainer.py, trl/trainer/grpo_trainer.py, trl/trainer/rloo_trainer.py,
  trl/trainer/distillation_trainer.py  _is_quantized_model: the trainable parameters (the LoRA
      adapters) cast to bfloat16 (QLoRA recipe); no ZeRO-3 autocast override
  trl/experimental/utils.py  prepare_model_for_kbit_training / prepare_peft_model (QLoRA
      preparation, bf16 cast); trl/experimental/cpo/cpo_trainer.py,
      trl/experimental/orpo/orpo_trainer.py, trl/experimental/tpo/tpo_trainer.py,
      trl/experimental/iw_opd/iw_opd_trainer.py  the same flags
  transformers/trainer.py  _wrap_model: no nn.DataParallel over several GPUs
  transformers/modeling_utils.py  num_parameters: imports bitsandbytes and counts a Params4bit as
      2 x its packed size. We cannot be a Params4bit; the model gets a num_parameters of its own
      that counts a 4-bit weight as in_features x out_features (the same count, no bitsandbytes
      import; Trainer.floating_point_ops calls it every step)
  accelerate/accelerator.py  prepare_model: a 4-bit model with an hf_device_map must sit on the
      training device; with "cpu" in the map it is refused unless bitsandbytes' multi-backend is
      installed (a bitsandbytes limit that applies to ours only through this flag: load without
      device_map for CPU training)
  accelerate/big_modeling.py  dispatch_model: forces device hooks for bitsandbytes < 0.43.2;
      guarded by quantization_method == "bitsandbytes", so not for ours (ours moves with .to())

reads model.is_quantized / model.hf_quantizer (set by transformers for every quantizer)
  transformers/trainer_utils.py  validate_quantization_for_training: needs adapters and
      hf_quantizer.is_trainable (True for ours, as for bitsandbytes 4-bit)
  transformers/modeling_utils.py  half() / float() refused   same refusal
  peft/peft_model.py, peft/mixed_model.py  as above

compares model.quantization_method with "bitsandbytes" (ours stays "qlora_rs")
  transformers/trainer.py  skips model.to(args.device) because bitsandbytes layers cannot move;
      ours can and are moved (with bitsandbytes the loader already placed the model there)
  transformers/modeling_utils.py  to(dtype) refused for bitsandbytes: ours keeps its 4-bit codes
      and scales through a dtype cast, so it is allowed; cuda() refusal is for 8-bit only
  transformers/distributed/fsdp.py  FSDP mixed precision set to a float quant_storage; ours
      stores uint8, for which bitsandbytes does nothing either
  accelerate/big_modeling.py  as above

inspects the layer or parameter class (cannot match without being bitsandbytes)
  peft/tuners/lora/bnb.py  dispatch_bnb_4bit (isinstance bnb.nn.Linear4bit) -> our own dispatch:
      qlora_rs.io.peft_integration makes LoRA wrap every qlora_rs Linear4bit in PeftLoraLinear4bit
      (fused forward, merge/unmerge by re-quantizing); installed when a model loads through
      QloraConfig: at once if PEFT is imported, else as soon as it is
  peft/tuners/<adalora, ia3, vera, pvera, randlora, road, hira>/bnb.py  not matched: those tuners
      wrap our layer in their generic Linear (forward and training work; merging them does not)
  peft/peft_model.py  get_nb_trainable_parameters counts a Params4bit twice: ours count their
      packed bytes, so "all params" reads lower (trainable params are equal)
  peft/utils/integrations.py dequantize_module_weight, peft/helpers.py, peft/utils/
      quantization_utils.py  not matched: DoRA, PiSSA/OLoRA init and the layer-status backend name
      do not know our layer
  peft/utils/other.py  no fp32 cast for Params4bit: our weight is uint8 and is not cast either
  trl/experimental/utils.py  prepare_peft_model: a Params4bit on cpu/meta means sharded QLoRA;
      never true for ours
  trl/experimental/online_dpo/online_dpo_trainer.py  vLLM quantization for bnb layers: not matched (no vLLM path)
  accelerate/utils/fsdp_utils.py, accelerate/utils/modeling.py  Params4bit special cases for FSDP
      sharding and device moves: ours is a plain uint8 parameter and takes the ordinary path
  transformers/quantizers/base.py  MODULES_TO_PATCH_FOR_QUANTIZATION (Llama 4 experts in
      pre-quantized bitsandbytes checkpoints): not matched
"""


def mark_loaded_in_4bit(model: nn.Module) -> None:
    """Sets the flags that transformers' bitsandbytes 4-bit quantizer sets (``is_loaded_in_4bit``),
    gives the model a ``num_parameters`` that counts 4-bit weights without bitsandbytes (see
    :data:`BNB_4BIT_CHECKS`), and makes PEFT wrap our layers in its merge-capable LoRA layer. Every
    way of getting a 4-bit model calls it: ``QloraConfig``, ``from_pretrained``, ``quantize_model``."""
    _dispatch_peft_layers()
    model.is_loaded_in_4bit = True
    if hasattr(type(model), "num_parameters"):
        # An instance attribute, so that only models holding our layers change.
        model.num_parameters = types.MethodType(_num_parameters, model)


def unmark_loaded_in_4bit(model: nn.Module) -> None:
    for attr in ("is_loaded_in_4bit", "num_parameters"):
        model.__dict__.pop(attr, None)


def _num_parameters(self: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' ``PreTrainedModel.num_parameters`` for a model with qlora_rs 4-bit layers: a
    packed 4-bit weight counts as the ``in_features x out_features`` parameters it holds."""
    embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
    packed = {id(m.weight): m.in_features * m.out_features for m in self.modules() if isinstance(m, Linear4bit)}
    return sum(packed.get(id(p), p.numel()) for p in self.parameters()
               if id(p) not in embeddings and (p.requires_grad or not only_trainable))


_num_parameters.__name__ = "num_parameters"  # pickles as getattr(model, "num_parameters")


def _dispatch_peft_layers() -> None:
    """Makes PEFT pick PeftLoraLinear4bit for our layers: now if PEFT is imported, else right after
    it is (importing PEFT takes seconds; a user who never does should not pay for it)."""
    if "peft" in sys.modules:
        _install_peft_dispatch()
    elif importlib.util.find_spec("peft") is not None and not any(
            isinstance(f, AfterImport) and f.name == "peft" for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport("peft", _install_peft_dispatch))


def _install_peft_dispatch() -> None:
    try:
        from . import peft_integration  # noqa: F401  (importing it installs the dispatch)
    except Exception as e:  # an incompatible PEFT must not break loading or `import peft`
        _log.warning("qlora_rs: PEFT will wrap qlora_rs 4-bit layers in its generic LoRA layer (no merging): %s", e)


class AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: once the top-level module ``name`` has been imported (its code has
    run), calls ``then()``."""

    def __init__(self, name: str, then: Any) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, then = spec.loader.exec_module, self.then

        def exec_then(module: Any) -> None:
            exec_module(module)
            then()

        spec.loader.exec_module = exec_then  # this spec's own loader instance
        return spec


def _is_bnb_4bit(config: Any) -> bool:
    if isinstance(config, dict):
        return bool(config.get("load_in_4bit") or config.get("_load_in_4bit")) and config.get("quant_method", "bitsandbytes") == "bitsandbytes"
    return getattr(config, "quant_method", None) == "bitsandbytes" and bool(getattr(config, "load_in_4bit", False))


def _register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QloraConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QloraHfQuantizer)
    merge = AutoHfQuantizer.__dict__["merge_quantization_configs"]
    if getattr(merge.__func__, "_qlora_rs", False):
        return
    original = merge.__func__

    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        if isinstance(quantization_config_from_args, QloraConfig) and _is_bnb_4bit(quantization_config):
            stored = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
            config = QloraConfig.from_dict(stored)
            config.compute_dtype = quantization_config_from_args.compute_dtype
            return config
        return original(cls, quantization_config, quantization_config_from_args)

    merge_quantization_configs._qlora_rs = True
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge_quantization_configs)


_register()
