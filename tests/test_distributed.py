"""DDP and FSDP2 with 4-bit frozen weights, on the gloo backend (CPU).

One launch of two processes (tests/_dist_workers.py) runs every multi-process scenario; the
tests below compare what it wrote with single-process runs made here.
"""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from torch import nn

import qlora_rs
from qlora_rs import distributed as D

import _dist_workers as W
from _loading_helpers import make_tiny_llama

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# Same float32 math in one process and two: only the order of the gradient sums differs.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Checkpoints for the loading scenario, the two-process launch, and the rank reports."""
    from transformers import LlamaForCausalLM

    from qlora_rs import from_pretrained, save_model

    out = tmp_path_factory.mktemp("dist")
    torch.manual_seed(3)
    LlamaForCausalLM(W.llama_config()).float().save_pretrained(str(out / "float"))
    save_model(from_pretrained(out / "float", compute_dtype=torch.float32, dtype=torch.float32), out / "q4")
    _write_malformed(out / "q4", out / "q4_malformed")
    LlamaForCausalLM(W.llama_config(tie=True)).float().save_pretrained(str(out / "tied"))
    data = out / "data.jsonl"
    rng = random.Random(0)
    data.write_text("".join(json.dumps({"prompt": f"add {NUMBERS[a]} and {NUMBERS[b]} =", "response": NUMBERS[a + b]}) + "\n"
                            for a, b in ((rng.randrange(7), rng.randrange(6)) for _ in range(24))))
    make_tiny_llama(out / "train_model", words=["add", "and", "="] + NUMBERS, seed=1, dtype=torch.float32)
    W.launch("all_scenarios", out, {"q4": str(out / "q4"), "q4_malformed": str(out / "q4_malformed"),
                                    "float": str(out / "float"), "tied": str(out / "tied"),
                                    "train_model": str(out / "train_model"), "train_data": str(data)})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks


MALFORMED_KEY = "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"


def _write_malformed(src, dst):
    """A copy of the 4-bit checkpoint whose stored state for one weight has an object for 'shape'."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    meta = json.loads(bytes(tensors[MALFORMED_KEY].tolist()))
    meta["shape"] = {"rows": 64}
    tensors[MALFORMED_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_sharded_loading_of_a_malformed_state_names_file_tensor_and_field(run):
    out, ranks = run
    for r in ranks:
        kind, message = r["malformed_error"]
        assert kind == "FormatError"
        for part in (str(out / "q4_malformed" / "model.safetensors"), "model.layers.1.mlp.down_proj.weight", "'shape'"):
            assert part in message


@pytest.fixture(scope="module")
def reference():
    return W.reference()


def _assert_same_lora(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"{k}: {m}")


def _untrained() -> dict:
    return W.lora_weights(W.build())


def test_fsdp2_two_ranks_match_one_process(run, reference):
    out, ranks = run
    got = torch.load(out / "fsdp_lora.pt")
    _assert_same_lora(got, reference)
    # The steps moved the adapters far beyond the tolerance, so the agreement means something.
    start = _untrained()
    assert max((reference[k] - start[k]).abs().max().item() for k in start) > 1e-2


def test_fsdp2_with_float_storage_matches_one_process(run, reference):
    # What shard_model does where FSDP2 cannot shard uint8 parameters (torch 2.11): the packed
    # bytes travel as bfloat16; the training must be the same.
    out, ranks = run
    assert all(r["float_storage_dtypes"] == ["torch.bfloat16"] for r in ranks)
    _assert_same_lora(torch.load(out / "fsdp_float_storage_lora.pt"), reference)
    assert [r["float_storage_losses"] for r in ranks] == [r["fsdp_losses"] for r in ranks]


def test_ddp_two_ranks_match_one_process_and_leave_4bit_weights(run, reference):
    out, ranks = run
    _assert_same_lora(torch.load(out / "ddp_lora.pt"), reference)
    assert all(r["ddp_4bit_untouched"] for r in ranks)
    # Each rank saw its own half of the batch.
    assert ranks[0]["ddp_losses"] != ranks[1]["ddp_losses"]


def test_fsdp2_each_rank_holds_half_the_packed_bytes(run):
    _, ranks = run
    sizes = [r["fsdp_packed_bytes"] for r in ranks]
    total = sizes[0]["total"]
    assert sizes[0]["layers"] == 7 * W.LAYERS
    assert sum(s["local"] for s in sizes) == total
    for s in sizes:
        assert abs(s["local"] - total / 2) <= 32 * s["layers"], s
    # The sharded state dict holds the same shards (DTensors of the packed bytes).
    assert [r["sharded_packed_local_bytes"] for r in ranks] == [s["local"] for s in sizes]


def test_state_dict_round_trips_restore_identical_outputs(run):
    _, ranks = run
    for r in ranks:
        diffs = r["state_dict_diffs"]
        assert diffs["before"] > 0.1, diffs
        assert diffs["full"] == diffs["broadcast"] == diffs["sharded"] == diffs["dcp_files"] == 0.0, diffs
    # Full state dicts keep bitsandbytes' layout; with cpu_offload only rank 0 gets them.
    prefix = "model.layers.0.self_attn.q_proj."
    assert ranks[0]["full_keys_4bit"] == sorted(
        prefix + k for k in ("base_layer.weight", "base_layer.weight.absmax", "base_layer.weight.nested_absmax",
                             "base_layer.weight.nested_quant_map", "base_layer.weight.quant_map",
                             "base_layer.weight.quant_state.bitsandbytes__nf4", "lora_A.weight", "lora_B.weight")
    )
    assert ranks[0]["cpu_offload_keys_on_rank"] > 0 and ranks[1]["cpu_offload_keys_on_rank"] == 0


def test_resume_with_the_same_world_size(run):
    out, _ = run
    _assert_same_lora(torch.load(out / "resume_lora.pt"), torch.load(out / "fsdp_lora.pt"))


@pytest.mark.parametrize("kind,saved_by", [("fsdp", ""), ("ddp", ""), ("fsdp", "_toplevel"), ("ddp", "_toplevel")])
def test_adapter_written_once_in_peft_layout(run, kind, saved_by):
    """By qlora_rs.distributed.save_adapter on every rank, and by the top-level qlora_rs.save_adapter
    (FSDP2: on every rank, the shards gathered; DDP: on rank 0, the wrapper unwrapped)."""
    from safetensors.torch import load_file

    out, ranks = run
    if kind == "fsdp" and saved_by:
        assert [r["toplevel_save_returned"] for r in ranks] == [str(out / "adapter_fsdp_toplevel"), "None"]
    directory = out / f"adapter_{kind}{saved_by}"
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(str(directory / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    model = W.build(lora_seed=42)
    qlora_rs.load_adapter(model, directory)
    _assert_same_lora(W.lora_weights(model), torch.load(out / f"{kind}_lora.pt"))
    # load_adapter without a process group (no slicing) reads the same.
    model = W.build(lora_seed=43)
    D.load_adapter(model, directory)
    _assert_same_lora(W.lora_weights(model), torch.load(out / f"{kind}_lora.pt"))


def test_mixed_precision_that_would_cast_packed_bytes_is_refused(run):
    _, ranks = run
    for r in ranks:
        mp = r["mixed_precision"]
        assert mp["refused"] is not None
        for part in ("param_dtype=bfloat16", "model.layers.0.self_attn.q_proj.base_layer", "float32",
                     "quant_storage=torch.uint8"):
            assert part in mp["refused"]
        # uint8 and a bfloat16 view hold the same bytes: the same training under a bf16 policy.
        a, b = mp["torch.uint8"]["losses"], mp["torch.bfloat16"]["losses"]
        assert all(torch.isfinite(torch.tensor(a))) and a == b


def test_float_storage_for_fsdp_follows_the_policy_and_names_a_layer_it_cannot_view():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = W.build(quant_storage=torch.uint8)
    D.fsdp._float_storage_for_fsdp(model, MixedPrecisionPolicy(param_dtype=torch.float32))
    assert {m.weight.dtype for m in model.modules() if isinstance(m, qlora_rs.Linear4bit)} == {torch.float32}
    model = W.build(quant_storage=torch.uint8)
    D.fsdp._float_storage_for_fsdp(model, None)
    assert {m.weight.dtype for m in model.modules() if isinstance(m, qlora_rs.Linear4bit)} == {torch.bfloat16}
    odd = nn.Sequential(qlora_rs.Linear4bit.from_linear(nn.Linear(2, 3)))  # 3 packed bytes
    with pytest.raises(qlora_rs.InvalidArgumentError, match=r"weight of 0 \(3x2\) must be viewed as bfloat16, but its 3 bytes"):
        D.fsdp._float_storage_for_fsdp(odd, None)


def test_check_mixed_precision_without_process_group():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    D.check_mixed_precision(W.build(quant_storage=torch.uint8), bf16)
    D.check_mixed_precision(W.build(quant_storage=torch.bfloat16), bf16)
    D.check_mixed_precision(W.build(quant_storage=torch.float32), MixedPrecisionPolicy())
    with pytest.raises(qlora_rs.InvalidArgumentError, match=r"stored as float32 \(quant_storage\)"):
        D.check_mixed_precision(W.build(quant_storage=torch.float32), bf16)
    with pytest.raises(qlora_rs.InvalidArgumentError, match="float16"):
        D.check_mixed_precision(W.build(quant_storage=torch.float16), bf16)


@pytest.mark.parametrize("kind", ["q4", "float", "tied"])
def test_sharded_loading_reads_only_this_ranks_rows(run, kind):
    from qlora_rs import from_pretrained
    from qlora_rs.io.checkpoint import Checkpoint

    out, ranks = run
    model = from_pretrained(out / kind, compute_dtype=torch.float32, dtype=torch.float32)
    torch.manual_seed(5)
    qlora_rs.add_lora(model, **W.LORA)
    torch.testing.assert_close(torch.load(out / f"loaded_{kind}_logits.pt"), W.logits(model), rtol=0, atol=0)
    with Checkpoint(out / kind) as ckpt:
        quantized = {k for parts in ckpt.quantized_weights().values() for k in parts.values()}
        state_bytes = sum(e.nbytes for k, e in ckpt.entries.items() if k in quantized)
        data_bytes = sum(e.nbytes for k, e in ckpt.entries.items() if k not in quantized)
        linear_bytes = sum(e.nbytes for k, e in ckpt.entries.items() if "layers." in k and "norm" not in k)
    for r in ranks:
        s = r["sharded_loading"][kind]
        assert s["packed_local"] * 2 == s["packed_total"]
        if kind == "q4":
            # Rows of every tensor: half of them; whole reads: only the small quantization state.
            assert s["read_rows"] <= data_bytes * 0.55, s
            assert s["read_whole"] <= state_bytes * 1.05, s
        else:
            # A float linear is read whole (one at a time) to be quantized; the rest by rows
            # (a tied output embedding is the input embedding: read once).
            assert s["read_whole"] == linear_bytes, s
            assert s["read_rows"] <= (data_bytes - linear_bytes) * 0.55 + s["packed_local"], s


def test_helpers_without_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = D.init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert D.is_main_process()
    assert D.global_sum(7) == 7
    assert D.rank_slice(list(range(10)), 1, 3) == [1, 4, 7]
    model = W.build()
    with pytest.raises(qlora_rs.InvalidArgumentError, match="torchrun"):
        D.shard_model(model)
    with pytest.raises(qlora_rs.InvalidArgumentError, match="torchrun"):
        D.ddp(model)
    assert [type(m).__name__ for m in D.decoder_layers(model)] == ["LlamaDecoderLayer"] * W.LAYERS
    sizes = D.packed_bytes(model)
    assert len(sizes) == 7 * W.LAYERS and all(local == total for local, total in sizes.values())
    # The training loop's view of one process: every method the identity.
    run = D.DistributedTraining("fsdp", "cpu")
    assert (run.strategy, run.active, run.world_size, run.mesh) == ("none", False, 1, None)
    assert run.local([5, 6, 7]) == [5, 6, 7] and run.sum(3) == 3 and run.any(True) and run.wrap(model) is model
    assert run.pick({"torch": 1}) == {"torch": 1}
    with pytest.raises(qlora_rs.InvalidArgumentError, match="written by 2 process"):
        run.pick([{}, {}])
    # Rank 1 of 3 on a chunk of 4: padded cyclically to 6, so every rank runs 2 examples.
    run.env, run.strategy = D.DistEnv(1, 3, 1, torch.device("cpu")), "ddp"
    assert run.local([10, 11, 12, 13]) == [11, 10]
    with pytest.raises(qlora_rs.InvalidArgumentError, match="distributed strategy 'zero3'"):
        D.DistributedTraining("zero3")


def test_train_under_torchrun_matches_one_process(run, tmp_path):
    """``qlora-rs train`` in two processes (batch 2 each) under DDP and FSDP2, and an FSDP2 run
    resumed after two steps, end where one process with batch 4 ends."""
    from safetensors.torch import load_file

    from qlora_rs.training.train import train

    out, ranks = run
    dirs = {"train_model": str(out / "train_model"), "train_data": str(out / "data.jsonl")}
    single = train(W.train_config(tmp_path / "single", dirs, batch_size=4), out=io.StringIO())
    want = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    losses = [h["loss"] for h in single.history]
    for name in ("train_ddp", "train_fsdp", "train_resumed"):
        got = load_file(str(out / name / "adapter_model.safetensors"))
        assert got.keys() == want.keys(), name
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")
    for r in ranks:
        t = r["train"]
        assert t["ddp"] == pytest.approx(losses, rel=1e-5) and t["fsdp"] == pytest.approx(losses, rel=1e-5)
        assert t["resumed"]["from"] == 2 and t["resumed"]["losses"] == pytest.approx(losses[2:], rel=1e-5)
    # Rank 0 alone wrote the run's files; metrics hold one record per step.
    metrics = [json.loads(line) for line in (out / "train_fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert sorted(p.name for p in (out / "train_fsdp").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-3"]


def test_linear4bit_refuses_a_packed_weight_cast_by_a_wrapper():
    """What FSDP2 would hand the forward if its policy converted a bfloat16 view to float16:
    the same byte count, other numbers. The layer refuses it instead of decoding noise."""
    model = W.build(quant_storage=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float16), requires_grad=False)
    with pytest.raises(qlora_rs.InvalidArgumentError, match=r"reached the forward as float16 but is stored as bfloat16"):
        model(input_ids=W.eval_ids())


def test_dcp_state_dict_keys_without_process_group():
    """torch.distributed.checkpoint's state-dict functions resolve bitsandbytes' companion keys."""
    model = W.build()
    sd = D.get_state_dict(model, full=True, cpu_offload=False)
    assert sd.keys() == model.state_dict().keys()
    other = W.build(seed=5, lora_seed=6)
    assert (W.logits(other) - W.logits(model)).abs().max() > 0.1
    D.set_state_dict(other, sd, full=True)
    assert torch.equal(W.logits(other), W.logits(model))
    trainable = D.get_state_dict(model, trainable_only=True, cpu_offload=False)
    assert set(trainable) == {k for k in sd if ".lora_" in k}
