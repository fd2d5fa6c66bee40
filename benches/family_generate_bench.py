"""Greedy generation on the CPU for several model families at SmolLM2-135M's sizes (30 layers,
hidden 576, MLP 1536, 9 query and 3 key/value heads of 64, vocabulary 49,152), with random bf16
weights: no hub is reachable here and speed does not depend on the values. For each family,
in one run with the repeats interleaved: ``qlora_rs.from_pretrained`` (the CPU decode path of
``qlora_rs.nn.cpu_decode``), the same model with the path undone (the 4-bit products alone),
transformers + bitsandbytes NF4 (double quant, bf16 compute) and bf16 transformers.

What the families differ in is what the decode path takes: Llama's (SmolLM2's) norms, MLP and
attention; Qwen3's with the query and key head norms; Gemma3's norms of another style
(``1 + weight``, four a layer), its GELU MLP and head norms.

    python benches/family_generate_bench.py [--families llama,qwen3,gemma3] [--tokens 40] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from generate_bench import OURS, load_models

SIZES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=2048,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
#: family -> (config class, causal LM class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 4096}),
}


def save_random_model(family: str, directory: str) -> None:
    import transformers

    config_class, model_class, overrides = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SIZES, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).to(torch.bfloat16)
    with torch.no_grad():  # norms and embeddings of a trained model's order of magnitude
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if "gemma" in family else 1.0, 0.1)
    model.save_pretrained(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (qlora-rs: QLORA_RS_NUM_THREADS)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QLORA_RS_NUM_THREADS", str(args.threads))

    import transformers

    import qlora_rs

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    ids = torch.randint(3, SIZES["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))

    def generate(model) -> None:
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.tokens,
                           eos_token_id=None, pad_token_id=SIZES["pad_token_id"])

    print(f"greedy {args.tokens} new tokens after a {ids.shape[1]}-token prompt, SmolLM2-135M's sizes, random "
          f"weights; torch {torch.__version__} ({torch.get_num_threads()} threads), qlora-rs "
          f"{qlora_rs.__version__} (CPU kernels: {qlora_rs.ops.cpu_isa()}); median of {args.repeat} interleaved runs")
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as directory:
            save_random_model(family, directory)
            models = load_models(directory)
        done = models[OURS].qlora_rs_cpu_decode
        for model in models.values():
            generate(model)  # warm-up
        times: dict = {name: [] for name in models}
        for _ in range(args.repeat):
            for name, model in models.items():
                t0 = time.perf_counter()
                generate(model)
                times[name].append(time.perf_counter() - t0)
        rate = {name: args.tokens / statistics.median(t) for name, t in times.items()}
        print(f"{family}: decode path {done}")
        for name in models:
            print(f"  {name:<36} {rate[name]:7.1f} tokens/s")
        ours = rate[OURS]
        others = ", ".join(f"{ours / rate[name]:.2f}x {name}" for name in models if name != OURS)
        print(f"  qlora-rs: {others}")


if __name__ == "__main__":
    main()
