"""GPU check of FSDP2 with 4-bit weights (issue 8): one process, world size 1, NCCL.

    python3 benches/gpu_check_fsdp2.py [OUT_DIR]

Entry points: :func:`check_fsdp2_nccl` ``(out_dir) -> dict`` (writes ``fsdp2_check.json``
under ``out_dir`` after every part, so a run cut short keeps what it measured), and ``CHECKS``
for ``benches/gpu_check.py`` (listed there in ``PLUGINS`` as ``gpu_check_fsdp2.py``).

The model: a Llama-shaped stack built from torch alone (no transformers on the GPU machine):
embedding, ``LAYERS`` blocks of RMS-norm + attention-like and MLP projections (q, k, v, o,
gate, up, down: the seven QLoRA targets) quantized to NF4 by qlora_rs, LoRA r=16 on all of
them, 2 x 1024 tokens per step. Parts, each with ``passed``:

- ``plain_vs_fsdp2``: the same two AdamW steps unsharded and under ``fully_shard`` on an NCCL
  process group of one: the losses and LoRA weights agree (a world of one all-gathers and
  reduce-scatters to itself), the packed weights stay uint8 parameters (DTensor shards; a bfloat16
  view of the same bytes where FSDP2 cannot shard integers, as in torch 2.11) and
  the CUDA path runs end to end. Step times (median of the steps after the first) with the
  ratio to the unsharded run.
- ``mixed_precision``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` with uint8
  storage and with a bfloat16 ``quant_storage`` view: identical losses (the packed bytes arrive
  intact either way), close to the fp32-parameter run; a float32 view under that policy is
  refused with an error naming the layer.
- ``state_dict``: a full state dict (bitsandbytes layout) and a sharded one loaded into a model
  with other weights give identical outputs.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, FFN, LAYERS, VOCAB, RANK = 1024, 2816, 4, 4096, 16
BATCH, SEQ, STEPS = 2, 1024, 4
DEVICE = "cuda"  # "cpu" (gloo) only for a smoke test of this file's code on a machine without CUDA


class _RMSNorm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.float()).to(x.dtype)


class _Block(nn.Module):
    """The projections of a Llama decoder layer; the attention is replaced by a gated mix
    (cheap, differentiable, and the same for every run)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = _RMSNorm(HIDDEN), _RMSNorm(HIDDEN)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, FFN, bias=False), nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        mix = torch.sigmoid(self.q_proj(h) * self.k_proj(h)) * self.v_proj(h)
        x = x + self.o_proj(mix)
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(_Block() for _ in range(LAYERS))
        self.norm = _RMSNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def build(seed: int = 0, quant_storage: torch.dtype = torch.uint8, lora_seed: int = 1) -> nn.Module:
    """The decoder in bfloat16, its block projections NF4 (bf16 compute), LoRA r=16 (fp32)."""
    import qlora_rs

    torch.manual_seed(seed)
    model = _Decoder().to(DEVICE, torch.bfloat16)
    qlora_rs.quantize_model(model, skip=("head",), compute_dtype=torch.bfloat16, quant_storage=quant_storage)
    torch.manual_seed(lora_seed)
    qlora_rs.add_lora(model, r=RANK, alpha=16, dropout=0.0, target_modules="all-linear", init="none")
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(7)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), device=DEVICE, generator=g) for _ in range(STEPS)]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _train(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses, times = [], []
    for ids in batches:
        _sync()
        t0 = time.perf_counter()
        logits = model(ids[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"losses": losses, "step_ms": round(1e3 * statistics.median(times[1:] or times), 2)}


def _lora(model: nn.Module) -> dict[str, torch.Tensor]:
    from qlora_rs.surgery.model import lora_layers

    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(layer, part).weight.detach()
            out[f"{name}.{part}"] = (w.full_tensor() if hasattr(w, "full_tensor") else w).float().cpu()
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).float()


def _part_plain_vs_fsdp2() -> dict:
    from torch.distributed.tensor import DTensor

    import qlora_rs
    from qlora_rs import distributed as D
    from qlora_rs.distributed import packed_bytes, shard_model

    batches = _batches()
    plain = build()
    ref = _train(plain, batches)
    ref_lora = _lora(plain)
    del plain
    model = shard_model(build())
    weights = [m.weight for m in model.modules() if isinstance(m, qlora_rs.Linear4bit)]
    # uint8, or the bfloat16 view shard_model takes where FSDP2 cannot shard integers (torch 2.11).
    packed_dtype = torch.uint8 if D.fsdp._fsdp_integer_params else torch.bfloat16
    sharded = all(isinstance(w, DTensor) and w.dtype == packed_dtype for w in weights)
    sizes = packed_bytes(model)
    got = _train(model, batches)
    diff = _max_diff(_lora(model), ref_lora)
    loss_diff = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    return {
        "losses": got["losses"], "loss_max_diff": loss_diff, "lora_max_diff": diff,
        "packed_dtensors": sharded, "packed_dtype": str(packed_dtype), "packed_bytes": sum(v[1] for v in sizes.values()),
        "plain_step_ms": ref["step_ms"], "fsdp2_step_ms": got["step_ms"],
        "fsdp2_vs_plain": round(got["step_ms"] / ref["step_ms"], 3),
        # A world of one reduces to itself: equal up to (at most) AdamW's sign-like first steps.
        "passed": sharded and loss_diff <= 1e-3 * abs(ref["losses"][0]) and diff <= 1e-2,
    }


def _part_mixed_precision() -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import qlora_rs
    from qlora_rs.distributed import shard_model

    batches = _batches()[:2]
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fp32 = _train(shard_model(build()), batches)
    runs = {}
    for storage in (torch.uint8, torch.bfloat16):
        runs[str(storage).replace("torch.", "")] = _train(shard_model(build(quant_storage=storage), mp_policy=policy),
                                                          batches)
    try:
        shard_model(build(quant_storage=torch.float32), mp_policy=policy)
        refused = None
    except qlora_rs.InvalidArgumentError as e:
        refused = str(e)
    a, b = runs["uint8"]["losses"], runs["bfloat16"]["losses"]
    # The same bytes all-gathered as uint8 or as bfloat16: the same losses (corrupted bytes
    # would be far off); bf16 parameters stay close to fp32 ones.
    same = max(abs(x - y) for x, y in zip(a, b)) <= 1e-4 * abs(a[0])
    close = max(abs(x - y) for x, y in zip(a, fp32["losses"])) <= 0.02 * abs(fp32["losses"][0])
    return {"fp32_params_losses": fp32["losses"], "bf16_params": runs, "uint8_equals_bf16_view": same,
            "close_to_fp32": close, "float32_view_refused": refused,
            "passed": same and close and refused is not None and "quant_storage" in refused}


def _part_state_dict() -> dict:
    from qlora_rs.distributed import get_state_dict, set_state_dict, shard_model

    ids = _batches()[0][:, :256]
    model = shard_model(build())
    _train(model, _batches()[:1])
    want = _logits(model, ids)
    out = {}
    full = get_state_dict(model, full=True, cpu_offload=False)
    other = shard_model(build(seed=3, lora_seed=4))
    out["before"] = (_logits(other, ids) - want).abs().max().item()
    set_state_dict(other, full, full=True)
    out["full"] = (_logits(other, ids) - want).abs().max().item()
    sharded = get_state_dict(model, full=False)
    other = shard_model(build(seed=5, lora_seed=6))
    set_state_dict(other, sharded, full=False)
    out["sharded"] = (_logits(other, ids) - want).abs().max().item()
    out["passed"] = out["before"] > 0 and out["full"] == 0.0 and out["sharded"] == 0.0
    return out


def _init_group() -> bool:
    """An NCCL (gloo on the CPU) process group of one; False when one already exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    return True


def check_fsdp2_nccl(out_dir: Any, report: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Runs the parts (see the module docstring); returns and saves their results."""
    import torch.distributed as dist

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"torch": torch.__version__, "device": DEVICE}

    def save() -> None:
        (out_dir / "fsdp2_check.json").write_text(json.dumps(results, indent=1, default=str))

    if DEVICE == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    owned = _init_group()
    results["backend"] = dist.get_backend()
    try:
        for name, fn in (("plain_vs_fsdp2", _part_plain_vs_fsdp2), ("mixed_precision", _part_mixed_precision),
                         ("state_dict", _part_state_dict)):
            t0 = time.perf_counter()
            try:
                results[name] = fn()
            except Exception:  # noqa: BLE001 - one failing part must not hide the others
                results[name] = {"passed": False, "error": traceback.format_exc()[-2000:]}
            results[name]["seconds"] = round(time.perf_counter() - t0, 2)
            save()
            if report is not None:
                report(name, results[name])
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    finally:
        if owned:
            dist.destroy_process_group()
    results["passed"] = all(r.get("passed") is not False for r in results.values() if isinstance(r, dict))
    save()
    return results


def fsdp2_nccl(ctx) -> None:
    """FSDP2 (fully_shard) with NF4 weights and LoRA on an NCCL group of one (issue 8)."""

    def report(part: str, r: dict) -> None:
        details = {k: v for k, v in r.items() if k not in ("passed", "seconds")}
        ctx.row(part=part, passed=r.get("passed"), seconds=r.get("seconds"), details=json.dumps(details, default=str)[:400])

    results = check_fsdp2_nccl(ctx.out_dir, report)
    if results.get("passed") is False:
        failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("passed") is False]
        raise AssertionError(f"FSDP2 check failed in: {', '.join(failed)}")


CHECKS = [fsdp2_nccl]


if __name__ == "__main__":
    res = check_fsdp2_nccl(sys.argv[1] if len(sys.argv) > 1 else "bench-out")
    print(json.dumps(res, indent=1, default=str))
    sys.exit(0 if res.get("passed") else 1)
