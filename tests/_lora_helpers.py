"""Shared helpers for the training tests: a tiny transformers Llama, and the same model quantized
by bitsandbytes from the very bytes qlora_rs produced (the compatibility oracle)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlora_rs

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Runs a module's tests on one torch thread: on a machine with more busy processes than
    cores, OpenMP's second thread waiting for a core makes every small op ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


HIDDEN = 64
LAYERS = 2
VOCAB = 128


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """A 2-layer Llama with hidden size 64 (about 0.1M parameters), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def train_lm(model: nn.Module, steps: int, lr: float = 2e-2) -> list[float]:
    """``steps`` AdamW steps (train mode) of the causal-LM loss on one fixed batch; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = tokens(batch=2, seq=16)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def randomize_lora(model: nn.Module, seed: int = 3) -> None:
    """Non-zero A and B everywhere, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qlora_rs.surgery.model.lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def to_bnb(model: nn.Module) -> nn.Module:
    """A copy of a qlora_rs-quantized model whose Linear4bit layers are bitsandbytes Linear4bit
    layers holding the same packed bytes and quantization state (loaded as transformers does)."""
    import bitsandbytes as bnb

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, qlora_rs.Linear4bit):
            layer = bnb.nn.Linear4bit(
                m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=m.compute_dtype,
                quant_type=m.quant_type, device="meta",
            )
            sd = m.state_dict()
            layer.weight = bnb.nn.Params4bit.from_prequantized(
                data=sd["weight"], quantized_stats={k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")},
                requires_grad=False, device="cpu", module=layer,
            )
            if m.bias is not None:
                layer.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
            parent_name, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, layer)
    out.is_loaded_in_4bit = True
    return out
