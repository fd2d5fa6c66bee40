"""qlora_rs as a drop-in for bitsandbytes under PEFT, TRL and the transformers Trainer.

The same user code, once with ``BitsAndBytesConfig`` and once with ``qlora_rs.QloraConfig``, must
reach the same state (``prepare_model_for_kbit_training``: checkpointing, input-grad hooks, dtypes,
trainable parameters; TRL's QLoRA cast of the adapters to bf16). Then the journeys on the real
SmolLM2-135M-Instruct, tiny: Trainer + PagedAdamW (train, save, resume exactly), TRL's SFTTrainer
with a PEFT config on a chat JSONL (train, save, reload the adapter, generate), and
``PeftModel.from_pretrained(...).merge_and_unload()`` with its rounding warning."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import qlora_rs

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

from _loading_helpers import make_tiny_llama  # noqa: E402
from qlora_rs.io.hf_quantizer import BNB_4BIT_CHECKS  # noqa: E402
from qlora_rs.surgery.model import MergeRoundingWarning  # noqa: E402
from qlora_rs.io.peft_integration import PeftLoraLinear4bit  # noqa: E402

CHATS = [
    ("What is the capital of France?", "Paris."),
    ("Name a primary colour.", "Red."),
    ("How many legs has a spider?", "Eight."),
    ("What do bees make?", "Honey."),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One torch thread: on a machine with more busy processes than cores a second OpenMP thread
    # waiting for a core makes every small op many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _configs():
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    return {"bitsandbytes": bnb, "qlora_rs": qlora_rs.QloraConfig()}


# ----------------------------------------------------------------------------------------------
# The same user code, the same state (tiny random Llama: this is about flags, not numbers)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    words = sorted({w for q, a in CHATS for w in (q + " " + a).split()})
    template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}<assistant> {% endif %}")
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", words=words, chat_template=template)


def _state(model) -> dict:
    """What prepare_model_for_kbit_training / get_peft_model / TRL decide, read off the model."""
    inner = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    emb = inner.get_input_embeddings()
    out = emb(torch.tensor([[1, 2]]))
    return {
        "is_loaded_in_4bit": getattr(inner, "is_loaded_in_4bit", False),
        # transformers counts a 4-bit weight as the parameters it holds (for bitsandbytes by class).
        "num_parameters": (inner.num_parameters(), inner.num_parameters(only_trainable=True),
                           inner.num_parameters(exclude_embeddings=True)),
        "checkpointing": sorted(n for n, m in inner.named_modules() if getattr(m, "gradient_checkpointing", False)),
        "embedding output requires grad": out.requires_grad,
        "dtypes": {n: p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point()},
        "trainable": {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters() if p.requires_grad},
    }


def test_prepare_model_for_kbit_training_reaches_the_bitsandbytes_state(tiny_dir):
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    states, layers = {}, {}
    for name, config in _configs().items():
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=config)
        model = peft.prepare_model_for_kbit_training(model)
        model = peft.get_peft_model(model, peft.LoraConfig(**lora))
        states[name] = _state(model)
        layers[name] = type(model.base_model.model.model.layers[0].self_attn.q_proj)
    assert states["bitsandbytes"]["is_loaded_in_4bit"] and states["bitsandbytes"]["checkpointing"]
    assert states["qlora_rs"] == states["bitsandbytes"]
    # PEFT picked each backend's own layer, with no help from user code.
    assert layers["bitsandbytes"].__module__ == "peft.tuners.lora.bnb" and layers["qlora_rs"] is PeftLoraLinear4bit


@pytest.mark.parametrize("load", ["from_pretrained", "quantize_model"])
def test_qlora_rs_own_loaders_reach_the_same_state(tiny_dir, load):
    """Models made 4-bit by qlora_rs.from_pretrained or qlora_rs.quantize_model say so too."""
    if load == "from_pretrained":
        model = qlora_rs.from_pretrained(tiny_dir)
    else:
        model = qlora_rs.quantize_model(AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.bfloat16))
    model = peft.prepare_model_for_kbit_training(model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    state = _state(model)
    assert state["is_loaded_in_4bit"] and state["checkpointing"] and state["embedding output requires grad"]
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj) is PeftLoraLinear4bit


def test_sft_trainer_casts_the_adapters_as_for_bitsandbytes(tiny_dir, tmp_path):
    data = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                       for q, a in CHATS])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    states = {}
    for name, config in _configs().items():
        model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=config)
        args = trl.SFTConfig(output_dir=str(tmp_path / name), max_steps=1, report_to=[], use_cpu=True, max_length=32,
                             per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                 peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        states[name] = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(states["bitsandbytes"].values()) == {torch.bfloat16}  # TRL's QLoRA cast
    assert states["qlora_rs"] == states["bitsandbytes"]


def test_the_checks_table_lists_every_reader_of_is_loaded_in_4bit():
    """BNB_4BIT_CHECKS was made by reading the installed sources; a new reader in a newer
    release shows up here."""
    import importlib

    missing = []
    for package in ("transformers", "peft", "trl", "accelerate"):
        root = Path(importlib.import_module(package).__file__).parent
        for f in root.rglob("*.py"):
            rel = f.relative_to(root.parent).as_posix()
            if rel.startswith("transformers/models/") or "is_loaded_in_4bit" not in f.read_text(encoding="utf-8"):
                continue
            writers = ("transformers/quantizers/quantizer_bnb_4bit.py", "accelerate/utils/bnb.py")
            if rel not in BNB_4BIT_CHECKS and rel not in writers:
                missing.append(rel)
    assert not missing, f"readers of is_loaded_in_4bit not in BNB_4BIT_CHECKS: {missing}"


def test_peft_imported_after_loading_still_gets_our_layer(tmp_path, monkeypatch):
    """Loading does not import PEFT (seconds) but hooks its import: shown on a stand-in package."""
    from qlora_rs.io.hf_quantizer import AfterImport

    (tmp_path / "qlora_rs_standin").mkdir()
    (tmp_path / "qlora_rs_standin" / "__init__.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = AfterImport("qlora_rs_standin", lambda: seen.append(__import__("qlora_rs_standin").VALUE + 1))
    monkeypatch.setattr("sys.meta_path", [hook, *__import__("sys").meta_path])
    import qlora_rs_standin  # noqa: F401

    assert seen == [42] and hook not in __import__("sys").meta_path
    del __import__("sys").modules["qlora_rs_standin"]


# ----------------------------------------------------------------------------------------------
# Journeys on the real model


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """SmolLM2-135M-Instruct loaded through QloraConfig (once; tests take deep copies)."""
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), quantization_config=qlora_rs.QloraConfig())
    return model, AutoTokenizer.from_pretrained(str(smollm2_dir))


def _text_batches(tokenizer, n: int, length: int) -> "datasets.Dataset":
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics)[:8])
    ids = tokenizer(text)["input_ids"]
    rows = [ids[i * length:(i + 1) * length] for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})


def _trainer(model, tokenizer, out: Path, data):
    from transformers import Trainer, TrainingArguments

    from qlora_rs.optim import PagedAdamW

    model = peft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(out), max_steps=3, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, lr_scheduler_type="constant")
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))


def _losses(trainer) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}


def test_trainer_with_paged_adamw_trains_saves_and_resumes_exactly(smol, tmp_path):
    base, tokenizer = smol
    data = _text_batches(tokenizer, n=6, length=16)
    first = _trainer(copy.deepcopy(base), tokenizer, tmp_path, data)
    first.train()
    losses = _losses(first)
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()
    final = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}

    again = _trainer(copy.deepcopy(base), tokenizer, tmp_path, data)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # The history before the checkpoint comes back from it; step 3 is computed again, exactly.
    assert _losses(again) == losses
    assert [r["step"] for r in again.state.log_history if "loss" in r][-1] == 3
    for n, p in again.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, final[n]), n


@pytest.fixture(scope="module")
def sft_run(smol, tmp_path_factory):
    """TRL's SFTTrainer with a PEFT config on a chat JSONL, two steps; (trainer, adapter dir)."""
    base, tokenizer = smol
    d = tmp_path_factory.mktemp("sft")
    (d / "chat.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in CHATS))
    data = datasets.load_dataset("json", data_files=str(d / "chat.jsonl"), split="train", cache_dir=str(d / "cache"))
    args = trl.SFTConfig(output_dir=str(d / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                         max_length=40, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                         disable_tqdm=True, seed=0)
    trainer = trl.SFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    trainer.save_model(str(d / "adapter"))
    return trainer, d / "adapter", before


def _prompt(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What do bees make?"}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")["input_ids"]


def test_sft_trainer_trains_saves_and_the_adapter_reloads_and_generates(smol, sft_run):
    base, tokenizer = smol
    trainer, adapter, before = sft_run
    model = trainer.model
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PeftLoraLinear4bit)
    assert model.get_base_model().model.layers[0].gradient_checkpointing
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.bfloat16}
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())  # it trained
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.state.log_history if "loss" in r)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    assert isinstance(reloaded.base_model.model.model.layers[0].self_attn.q_proj, PeftLoraLinear4bit)
    got = {n.replace(".default", ""): p for n, p in reloaded.named_parameters() if "lora_" in n}
    for n, p in trainable.items():
        assert torch.equal(got[n.replace(".default", "")].to(p.dtype), p), n
    ids = _prompt(tokenizer)
    model.eval()
    with torch.no_grad():
        a = reloaded.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        b = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert a.shape[1] > ids.shape[1] and torch.equal(a, b)


def test_reload_then_merge_and_unload_warns_with_the_measured_rounding(smol, sft_run):
    base, tokenizer = smol
    _, adapter, _ = sft_run
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PeftLoraLinear4bit)}
    assert len(layers) == 30 * 7
    with torch.no_grad():
        before = {n: m.get_base_layer().dequantize(torch.float32) for n, m in layers.items()}
        delta = {n: m.get_delta_weight("default").float() for n, m in layers.items()}
        ids = _prompt(tokenizer)
        with_adapter = model(input_ids=ids).logits.float()
    with pytest.warns(MergeRoundingWarning) as caught:
        merged = model.merge_and_unload()
    assert len(caught) == 1  # one warning for the whole merge, not one per layer
    message = str(caught[0].message)
    assert caught[0].filename == __file__
    assert "210 4-bit layers" in message and "16-bit base" in message and "qlora-rs merge" in message
    # The figures in the message are what merging did to the weights.
    after = {n: merged.get_submodule(n.removeprefix("base_model.model.")).dequantize(torch.float32) for n in layers}
    err = sum(float((after[n] - before[n] - delta[n]).double().pow(2).sum()) for n in layers)
    size = sum(float(delta[n].double().pow(2).sum()) for n in layers)
    weight = sum(float(before[n].double().pow(2).sum()) for n in layers)
    unchanged = sum(torch.equal(after[n], before[n]) for n in layers)
    assert f"change those weights by {100 * (size / weight) ** 0.5:.3g}% (RMS)" in message
    assert f"leaves them {100 * (err / weight) ** 0.5:.3g}% (RMS) away from base + adapter" in message
    lost = (err / size) ** 0.5
    assert (f"{lost:.3g} times the adapters' own change" if lost >= 1 else f"{100 * lost:.3g}% of the adapters'") in message
    assert (f"in {unchanged} of the layers" in message) == (unchanged > 0)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, qlora_rs.Linear4bit)
    with torch.no_grad():
        logits = merged(input_ids=ids).logits.float()
    assert torch.isfinite(logits).all() and logits.shape == with_adapter.shape
