"""``qlora_rs.from_pretrained``: one process (:func:`qlora_rs.io.loading.load_local`) or N ranks
(:func:`qlora_rs.distributed.load_sharded`)."""

from __future__ import annotations

import os
from typing import Any, Union

import torch
from torch import nn

from ..distributed.sharded_loading import load_sharded
from ..errors import InvalidArgumentError
from ..io.loading import load_local

__all__ = ["from_pretrained"]


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
        model_class: the class to build (see :func:`qlora_rs.io.skeleton.auto_class`); default from
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
    (``"4bit"`` or ``"float"``) and which layers are 4-bit. A model loaded on the CPU generates
    through :func:`qlora_rs.nn.cpu_decode.prepare` (grouped q/k/v and gate/up products, the RMS
    norms and one-token attention in Rust; ``model.qlora_rs_cpu_decode`` says what it changed,
    :func:`qlora_rs.nn.cpu_decode.restore` undoes it); training and other devices run as before.
    """
    if device_mesh is not None:
        return load_sharded(path, device_mesh, quantization=quantization, compute_dtype=compute_dtype, dtype=dtype,
                            model_class=model_class, strict=strict, config=config, prepare=prepare, mp_policy=mp_policy)
    if prepare is not None or mp_policy is not None:
        raise InvalidArgumentError("from_pretrained: prepare and mp_policy apply to sharded loading (device_mesh=...)")
    return load_local(path, quantization, compute_dtype, device, dtype=dtype, model_class=model_class, strict=strict,
                      config=config)
