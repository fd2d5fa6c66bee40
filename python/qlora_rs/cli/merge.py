"""``qlora-rs merge MODEL_DIR ADAPTER_DIR -o OUT [--requantize]``: fold a LoRA adapter into its base
model and write a checkpoint that plain transformers loads.

The adapter was trained against the 4-bit base, so it is merged into the 4-bit weights decoded
(``dequant(W) + B @ A * scaling``), not into the original 16-bit ones: the merged model computes
what the trained model computed, up to one rounding to the stored dtype. Without
``--requantize`` the output is a 16-bit (the base checkpoint's float dtype) checkpoint without a
``quantization_config``; with it, the merged weights are quantized again (same type, block size
and double quantization) and stored in bitsandbytes' layout, loadable by transformers +
bitsandbytes, by ``qlora_rs.from_pretrained`` and through ``qlora_rs.QloraConfig``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO, Union

import torch

__all__ = ["add_parser", "run", "merge_checkpoint", "main"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and write a checkpoint transformers loads",
        description=__doc__.split("\n\n", 1)[1].replace("``", "'"),
    )
    p.add_argument("model", metavar="MODEL_DIR", help="the base model directory the adapter was trained on")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("-o", "--output", dest="output", required=True, metavar="OUT", help="the merged model directory")
    p.add_argument("--requantize", action="store_true",
                   help="store the merged linear weights in 4 bits again (rounds the adapter; the output says by how "
                        "much); without it they are stored in the base checkpoint's 16-bit dtype")
    p.add_argument("--force", action="store_true", help="replace an existing OUT; without it an existing OUT is refused")
    p.set_defaults(func=run)
    return p


def _quantization_of_run(adapter_dir: Path) -> Optional[dict]:
    """The quantization a ``qlora-rs train`` run used (its ``train_config.json`` sits in the
    adapter directory, or above a ``checkpoint-<step>``); None if unknown."""
    for d in (adapter_dir, adapter_dir.parent):
        f = d / "train_config.json"
        if f.is_file():
            try:
                c = json.loads(f.read_text(encoding="utf-8"))
                return {"quant_type": c["quant_type"], "blocksize": c["blocksize"], "double_quant": c["double_quant"]}
            except (json.JSONDecodeError, KeyError, TypeError):
                return None
    return None


def _main_float_dtype(model_dir: Path) -> Optional[torch.dtype]:
    from ..io.checkpoint import _ST_DTYPES, Checkpoint

    with Checkpoint(model_dir) as ckpt:
        floats = [e for e in ckpt.entries.values() if e.is_float]
    if not floats:
        return None
    by_bytes: dict[str, int] = {}
    for e in floats:
        by_bytes[e.dtype] = by_bytes.get(e.dtype, 0) + e.nbytes
    return _ST_DTYPES[max(by_bytes, key=by_bytes.get)]


def merge_checkpoint(
    model_dir: Union[str, os.PathLike],
    adapter_dir: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    requantize: bool = False,
    force: bool = False,
    quantization: Any = None,
) -> dict:
    """Loads ``model_dir`` in 4 bits (as training did: ``quantization`` or the options recorded
    by the training run, else the QLoRA defaults), applies the adapter, merges it and writes
    ``output`` (see the module docstring). Returns ``{"output", "layers", "max_abs",
    "relative_rms", "dtype"}`` with the worst merge error over the layers, and with ``requantize`` what
    re-quantizing did to the adapter (``adapter_change``, ``adapter_lost``, ``adapter_rounded_away``:
    see :class:`qlora_rs.nn.merge.RequantizedMerge`)."""
    from ..surgery.adapter import load_adapter
    from ..io.hf_quantizer import QloraConfig
    from ..api.loading import from_pretrained
    from ..io.loading import save_model
    from ..surgery.model import merge_layers

    model_dir, adapter_dir, output = Path(model_dir), Path(adapter_dir), Path(output)
    if output.exists() and not force:
        raise FileExistsError(f"{output} already exists (pass --force to replace it)")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (expected a PEFT LoRA adapter directory)")
    quantization = quantization if quantization is not None else _quantization_of_run(adapter_dir)
    dtype = _main_float_dtype(model_dir) or torch.bfloat16
    model = from_pretrained(model_dir, quantization=quantization, compute_dtype=torch.float32, dtype=dtype)
    opts = model.qlora_rs_checkpoint["quantization"]
    load_adapter(model, adapter_dir)
    report, rounding = merge_layers(model, requantize=requantize)
    if not report:
        raise ValueError(f"{adapter_dir}: the adapter adapts no layer of {model_dir}")
    qconfig = None
    if requantize:
        qconfig = QloraConfig(quant_type=opts["quant_type"], double_quant=opts["double_quant"],
                              blocksize=opts["blocksize"], compute_dtype=dtype).to_dict()
        skipped = sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)
        if skipped:
            qconfig["llm_int8_skip_modules"] = skipped
    save_model(model, output, source_dir=model_dir, quantization_config=qconfig, force=force)
    worst = max(report.values(), key=lambda e: e.relative_rms)
    result = {"output": str(output), "layers": len(report), "max_abs": max(e.max_abs for e in report.values()),
              "relative_rms": worst.relative_rms, "dtype": str(dtype).removeprefix("torch.")}
    if rounding.layers:
        result.update(adapter_change=rounding.adapter_change, adapter_lost=rounding.lost,
                      adapter_rounded_away=rounding.unchanged)
    return result


def run(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = sys.stdout if out is None else out
    r = merge_checkpoint(args.model, args.adapter, args.output, requantize=args.requantize, force=args.force)
    kind = "4-bit (bitsandbytes layout)" if args.requantize else r["dtype"]
    print(f"merged     {r['layers']} LoRA layers of {args.adapter} into {args.model}", file=out)
    print(f"error      max |merged - exact| {r['max_abs']:.3g}, worst relative RMS {r['relative_rms']:.3g} "
          f"(rounding to {kind})", file=out)
    if "adapter_lost" in r:
        away = f"; {r['adapter_rounded_away']} layers came out unchanged" if r["adapter_rounded_away"] else ""
        print(f"rounding   the adapter changes the weights by {100 * r['adapter_change']:.3g}% (RMS); re-quantizing "
              f"misses base + adapter by {100 * r['adapter_lost']:.3g}% of that change{away} (without --requantize "
              "the rounding is bf16's, far smaller)", file=out)
    print(f"wrote      {r['output']} ({kind}); loads with transformers' from_pretrained", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``qlora-rs merge ...`` (the same as ``qlora_rs.cli.main(["merge", ...])``)."""
    from .app import main as cli_main

    return cli_main(["merge", *(argv or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
