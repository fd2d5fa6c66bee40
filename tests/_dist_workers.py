"""Multi-process workers for tests/test_distributed.py: a tiny Llama-shaped QLoRA model trained
and checkpointed under DDP and FSDP2 on the gloo backend (CPU), and the launcher that runs them.

One launch runs every scenario in the same two processes (importing torch and transformers
costs more than all the scenarios together); rank 0 writes what the tests compare into the
output directory, every rank writes ``rank<r>.json`` with its own observations.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import time as _time

_T0 = _time.perf_counter()
VOCAB = 128
HIDDEN = 64
LAYERS = 2
STEPS = 3
GLOBAL_BATCH = 4
SEQ = 10
LR = 0.5
LORA = dict(r=4, alpha=8, dropout=0.0, init="none")
_PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "transformers",
            "transformers.models.llama.modeling_llama", "safetensors.torch"]


# --------------------------------------------------------------------------------------------
# The model and the training loop, the same in one process and in N.


def llama_config(tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie,
        architectures=["LlamaForCausalLM"],
    )


def build(seed: int = 0, quant_storage: torch.dtype = torch.uint8, lora_seed: int = 1):
    """The tiny Llama (float32), 4-bit linears (float32 compute, so that runs compare exactly),
    LoRA r=4 on every linear."""
    import qlora_rs
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config()).float()
    qlora_rs.quantize_model(model, compute_dtype=torch.float32, quant_storage=quant_storage)
    torch.manual_seed(lora_seed)
    qlora_rs.add_lora(model, **LORA)
    return model


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def eval_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def train(model, optimizer, steps: range, rank: int = 0, world: int = 1) -> list[float]:
    """SGD on the global batch of each step, this rank's rows of it; the summed token loss is
    divided by the global token count and multiplied by the world size (DDP and FSDP2 average
    gradients), so every rank count gives the single-process gradient."""
    losses = []
    model.train()
    for step in steps:
        ids = batch(step)
        local = ids[rank::world]
        count = ids[:, 1:].numel()
        logits = model(input_ids=local).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), local[:, 1:].reshape(-1), reduction="sum") / count * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def lora_weights(model) -> dict[str, torch.Tensor]:
    """The LoRA matrices by module name (full tensors; gathered from DTensor shards)."""
    import qlora_rs
    from qlora_rs.distributed import unwrap

    out = {}
    for name, layer in qlora_rs.surgery.model.lora_layers(unwrap(model)).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(layer, part).weight.detach()
            out[f"{name}.{part}"] = (w.full_tensor() if hasattr(w, "full_tensor") else w).clone()
    return out


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    out = model(input_ids=eval_ids()).logits.float().clone()
    model.train()
    return out


def reference(steps: int = STEPS) -> dict[str, torch.Tensor]:
    """LoRA weights after ``steps`` steps in one process (the runs under DDP/FSDP2 must match)."""
    model = build()
    train(model, make_optimizer(model), range(steps))
    return lora_weights(model)


# --------------------------------------------------------------------------------------------
# Launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: str, out_dir: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    # A rank that fails leaves the other waiting in a collective: the timeout ends it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        globals()[target](rank, world, Path(out_dir), *args)
    except BaseException:
        Path(out_dir, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def launch(target: str, out_dir: Path, *args: Any, world: int = 2, timeout: float = 240.0) -> None:
    """Runs ``target(rank, world, out_dir, *args)`` in ``world`` new processes joined by a gloo
    process group on 127.0.0.1; raises with the failing rank's traceback."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    # A fork server imports torch and transformers once for all ranks (and launches); it must
    # not load qlora_rs: a rayon pool does not survive fork.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    ctx = mp.start_processes(_entry, args=(world, free_port(), target, str(out_dir), args), nprocs=world, join=False,
                             start_method=method)
    import time

    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not finish in {timeout:.0f} s")
    except ProcessException as e:
        errors = sorted(Path(out_dir).glob("error*.txt"))
        detail = "\n".join(p.read_text() for p in errors) or str(e)
        raise AssertionError(f"{target} failed:\n{detail}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# --------------------------------------------------------------------------------------------
# Scenarios (every rank runs them in the same order: they are full of collectives)


def _save(out: Path, name: str, value: Any, rank: int) -> None:
    if rank == 0:
        torch.save(value, out / f"{name}.pt")


def _fsdp_model(seed: int = 0, quant_storage: torch.dtype = torch.uint8, mp_policy: Any = None, lora_seed: int = 1):
    from qlora_rs.distributed import shard_model

    return shard_model(build(seed, quant_storage, lora_seed), mp_policy=mp_policy)


def all_scenarios(rank: int, world: int, out: Path, ckpt_dirs: dict) -> None:
    import time

    info: dict[str, Any] = {"rank": rank, "world": world, "seconds": {"start": round(time.perf_counter() - _T0, 2)}}
    for fn in (fsdp_training, fsdp_float_storage, ddp_training, state_dicts, resume, mixed_precision, sharded_loading, train_runs):
        t0 = time.perf_counter()
        fn(rank, world, out, info, ckpt_dirs)
        info["seconds"][fn.__name__] = round(time.perf_counter() - t0, 2)
    (out / f"rank{rank}.json").write_text(json.dumps(info, indent=1))


def fsdp_training(rank: int, world: int, out: Path, info: dict, ckpt_dirs: dict) -> None:
    from qlora_rs.distributed import packed_bytes, save_adapter

    model = _fsdp_model()
    sizes = packed_bytes(model)
    info["fsdp_packed_bytes"] = {"local": sum(v[0] for v in sizes.values()), "total": sum(v[1] for v in sizes.values()),
                                 "layers": len(sizes)}
    info["fsdp_losses"] = train(model, make_optimizer(model), range(STEPS), rank, world)
    _save(out, "fsdp_lora", lora_weights(model), rank)
    save_adapter(model, out / "adapter_fsdp")
    # The top-level function, as PyTorch's FSDP2 examples would call it: on every rank.
    import qlora_rs

    info["toplevel_save_returned"] = str(qlora_rs.save_adapter(model, out / "adapter_fsdp_toplevel"))


def fsdp_float_storage(rank: int, world: int, out: Path, info: dict, ckpt_dirs: dict) -> None:
    """The path an FSDP2 without integer parameters (torch 2.11) takes on every torch: shard_model
    views the packed bytes as bfloat16; training must not notice."""
    import qlora_rs.distributed.fsdp as D
    from qlora_rs import Linear4bit

    saved = D._fsdp_integer_params
    D._fsdp_integer_params = False
    try:
        model = _fsdp_model()
    finally:
        D._fsdp_integer_params = saved
    info["float_storage_dtypes"] = sorted({str(m.weight.dtype) for m in model.modules() if isinstance(m, Linear4bit)})
    info["float_storage_losses"] = train(model, make_optimizer(model), range(STEPS), rank, world)
    _save(out, "fsdp_float_storage_lora", lora_weights(model), rank)


def ddp_training(rank: int, world: int, out: Path, info: dict, ckpt_dirs: dict) -> None:
    import qlora_rs
    from qlora_rs.distributed import ddp, save_adapter

    inner = build()
    before = {n: m.packed_weight().clone() for n, m in inner.named_modules() if isinstance(m, qlora_rs.Linear4bit)}
    model = ddp(inner)
    info["ddp_losses"] = train(model, make_optimizer(model), range(STEPS), rank, world)
    info["ddp_4bit_untouched"] = all(torch.equal(m.packed_weight(), before[n])
                                     for n, m in inner.named_modules() if isinstance(m, qlora_rs.Linear4bit))
    _save(out, "ddp_lora", lora_weights(model), rank)
    save_adapter(model, out / "adapter_ddp")
    if rank == 0:  # the usual DDP pattern: the top-level function on rank 0 alone, on the wrapper
        qlora_rs.save_adapter(model, out / "adapter_ddp_toplevel")


def state_dicts(rank: int, world: int, out: Path, info: dict, ckpt_dirs: dict) -> None:
    """Full (every rank, and broadcast from rank 0), sharded, and through DCP files: each into a
    model built from other weights; the outputs must be identical afterwards."""
    import torch.distributed.checkpoint as dcp

    from qlora_rs.distributed import get_state_dict, packed_bytes, set_state_dict

    model = _fsdp_model()
    train(model, make_optimizer(model), range(1), rank, world)
    want = logits(model)
    diffs = {}
    full = get_state_dict(model, full=True, cpu_offload=False)
    info["full_keys_4bit"] = sorted(k for k in full if k.startswith("model.layers.0.self_attn.q_proj."))
    other = _fsdp_model(seed=11)
    diffs["before"] = (logits(other) - want).abs().max().item()
    set_state_dict(other, full, full=True)
    diffs["full"] = (logits(other) - want).abs().max().item()

    on_rank0 = get_state_dict(model, full=True, cpu_offload=True)
    info["cpu_offload_keys_on_rank"] = len(on_rank0)
    other = _fsdp_model(seed=12)
    set_state_dict(other, on_rank0, full=True, broadcast_from_rank0=True)
    diffs["broadcast"] = (logits(other) - want).abs().max().item()

    sharded = get_state_dict(model, full=False)
    other = _fsdp_model(seed=13)
    set_state_dict(other, sharded, full=False)
    diffs["sharded"] = (logits(other) - want).abs().max().item()
    # The packed 4-bit weights' shards (uint8, or a float view where FSDP2 cannot shard integers).
    layers = set(packed_bytes(model))
    sizes = {k: v.to_local().numel() * v.element_size() for k, v in sharded.items()
             if k.endswith(".weight") and k[: -len(".weight")] in layers and hasattr(v, "to_local")}
    info["sharded_packed_local_bytes"] = sum(sizes.values())

    dcp.save(sharded, checkpoint_id=str(out / "dcp"))
    # DCP files restore a run of the same base model (the quantization metadata must have the
    # same length); its LoRA and its packed shards here are wiped so they must come from the files.
    other = _fsdp_model(lora_seed=14)
    with torch.no_grad():
        for p in other.parameters():
            p.to_local().zero_()
    target = get_state_dict(other, full=False)
    dcp.load(target, checkpoint_id=str(out / "dcp"))
    set_state_dict(other, target, full=False)
    diffs["dcp_files"] = (logits(other) - want).abs().max().item()
    info["state_dict_diffs"] = diffs


def resume(rank: int, world: int, out: Path, info: dict, ckpt_dirs: dict) -> None:
    """Two steps, adapter + optimizer state saved, a new process state resumed for the third:
    the LoRA weights equal those of three uninterrupted steps."""
    from qlora_rs.distributed import get_optimizer_state, load_adapter, save_adapter, set_optimizer_state

    model = _fsdp_model()
    opt = make_optimizer(model)
    train(model, opt, range(2), rank, world)
    save_adapter(model, out / "resume_adapter")
    state = get_optimizer_state(model, opt)
    if rank == 0:
        torch.save(state, out / "resume_optim.pt")
    del model, opt, state

    model = _fsdp_model(lora_seed=99)  # other adapter values: they must come from the files
    load_adapter(model, out / "resume_adapter")
    opt = make_optimizer(model)
    state = torch.load(out / "resume_optim.pt", weights_only=False) if rank == 0 else {}
    set_optimizer_state(model, opt, state)
    train(model, opt, range(2, STEPS), rank, world)
    _save(out, "resume_lora", lora_weights(model), rank)


def mixed_precision(rank: int, world: int, out: Path, info: dict, ckpt_dirs: dict) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import qlora_rs

    result = {}
    try:
        _fsdp_model(quant_storage=torch.float32, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        result["refused"] = None
    except qlora_rs.InvalidArgumentError as e:
        result["refused"] = str(e)
    # uint8 storage and a bf16 view under a bf16 policy: the packed bytes arrive intact.
    for storage in (torch.uint8, torch.bfloat16):
        model = _fsdp_model(quant_storage=storage, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                                   reduce_dtype=torch.float32))
        losses = train(model, make_optimizer(model), range(2), rank, world)
        result[str(storage)] = {"losses": losses}
    info["mixed_precision"] = result


def sharded_loading(rank: int, world: int, out: Path, info: dict, ckpt_dirs: dict) -> None:
    """load_sharded from a 4-bit and from a float checkpoint: bytes read by this rank, its
    packed shard sizes, and the logits (with LoRA initialized from seed 5)."""
    import qlora_rs
    import qlora_rs.distributed as D
    from qlora_rs.io.checkpoint import Checkpoint

    counted = {"rows": 0, "whole": 0}
    rows, read = D.sharded_loading._RowReader.rows, Checkpoint.read

    def count_rows(self, key, start, stop):
        t = rows(self, key, start, stop)
        counted["rows"] += t.numel() * t.element_size()
        return t

    def count_read(self, name):
        t = read(self, name)
        counted["whole"] += t.numel() * t.element_size()
        return t

    D.sharded_loading._RowReader.rows, Checkpoint.read = count_rows, count_read
    try:
        results = {}
        for kind in ("q4", "float", "tied"):
            path = ckpt_dirs[kind]
            counted.update(rows=0, whole=0)

            def prepare(m):
                torch.manual_seed(5)
                qlora_rs.add_lora(m, **LORA)

            model = D.load_sharded(path, compute_dtype=torch.float32, dtype=torch.float32, prepare=prepare)
            sizes = D.packed_bytes(model)
            results[kind] = {"read_rows": counted["rows"], "read_whole": counted["whole"],
                             "packed_local": sum(v[0] for v in sizes.values()),
                             "packed_total": sum(v[1] for v in sizes.values())}
            _save(out, f"loaded_{kind}_logits", logits(model), rank)
    finally:
        D.sharded_loading._RowReader.rows, Checkpoint.read = rows, read
    info["sharded_loading"] = results
    if "q4_malformed" in ckpt_dirs:  # a stored state whose 'shape' field is an object
        try:
            D.load_sharded(ckpt_dirs["q4_malformed"], compute_dtype=torch.float32, dtype=torch.float32)
            info["malformed_error"] = None
        except Exception as e:  # the test checks the type and the message
            info["malformed_error"] = [type(e).__name__, str(e)]



def train_config(output_dir: Path, dirs: dict, **kw: Any):
    """``qlora-rs train`` options shared by the one- and two-process runs (batch_size is per
    process: the two-process runs use half of the single process's)."""
    from qlora_rs.training.train import TrainConfig

    base = dict(model=dirs["train_model"], data=dirs["train_data"], output_dir=str(output_dir), r=4, alpha=8,
                dropout=0.0, lr=1e-2, batch_size=2, grad_accum=2, max_steps=3, save_every=2, progress=False,
                plot=False, device="cpu", compute_dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def train_runs(rank: int, world: int, out: Path, info: dict, dirs: dict) -> None:
    """The training loop of ``qlora-rs train`` as torchrun runs it (RANK/WORLD_SIZE set, one
    process per rank): under DDP, under FSDP2, and under FSDP2 stopped after two steps and
    resumed for the third."""
    import io

    from qlora_rs.training.train import train

    if "train_model" not in dirs:
        return
    results = {}
    for strategy in ("ddp", "fsdp"):
        r = train(train_config(out / f"train_{strategy}", dirs, distributed=strategy), out=io.StringIO())
        results[strategy] = [h["loss"] for h in r.history]
    train(train_config(out / "train_resumed", dirs, distributed="fsdp", max_steps=2), out=io.StringIO())
    r = train(train_config(out / "train_resumed", dirs, distributed="fsdp", resume=True), out=io.StringIO())
    results["resumed"] = {"from": r.resumed_from, "losses": [h["loss"] for h in r.history]}
    info["train"] = results
