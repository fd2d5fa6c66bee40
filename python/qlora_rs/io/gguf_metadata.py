"""The non-tensor files of a model converted from GGUF: ``config.json``, ``generation_config.json``
and the tokenizer, as transformers writes them for the model it loads from that GGUF file
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` then ``save_pretrained``).

They come from transformers' own GGUF utilities (the optional extra ``qlora-rs[gguf]``), but not
through ``AutoConfig``/``AutoTokenizer`` with ``gguf_file``: for the architectures converted here
both parse the whole file with the gguf package's reader to build the config, which takes seconds
for a vocabulary of tens of thousands of tokens, several times the conversion itself. Instead the
config is rebuilt from the metadata the Rust reader returns, through transformers' GGUF key table
and the rules of its GGUF loader, and the tokenizer class ``AutoTokenizer`` would pick for that
config reads its vocabulary from the file directly. Tests compare both with the ``Auto*`` route.

:class:`MetadataJob` runs this in a child process while the tensors convert, with torch hidden:
transformers then runs in its torch-less mode (configs and tokenizers only), which spares the
conversion torch's import, about a second and most of a gigabyte of resident memory. One piece of
transformers' GGUF tokenizer path imports torch although the tokenizer needs none of it: the
metadata reader module, whose tensor-loading half is torch code. The child answers its
``read_gguf_metadata`` from the Rust reader instead (same values, same form). Where this does not
apply (another transformers version), the child runs again with torch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional

from ..errors import QloraError

INSTALL_HINT = "pip install 'qlora-rs[gguf]'"


def check_dependencies() -> None:
    """Raises :class:`QloraError` naming the extra to install when transformers or gguf is missing."""
    missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise QloraError(
            f"converting a GGUF file needs {' and '.join(missing)} for the config and tokenizer: {INSTALL_HINT}"
        )


def _single(value: Any) -> Any:
    # transformers' loader collects every field as a list of values and unwraps a list of one,
    # arrays of one element included.
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def config_dict(header: dict) -> dict:
    """The config dict transformers' GGUF loader derives from this metadata (its
    ``load_gguf_checkpoint(..., return_tensors=False)["config"]``), for the architectures qlora-rs
    converts (llama, qwen2, qwen3)."""
    from transformers.integrations import ggml

    renames = ggml.GGUF_CONFIG_MAPPING  # transformers' GGUF_TO_TRANSFORMERS_MAPPING["config"]
    defaults_by_architecture = getattr(ggml, "GGUF_CONFIG_DEFAULTS_MAPPING", {})  # newer releases only

    metadata = header["metadata"]
    architecture = metadata["general.architecture"]
    # transformers compares with the list of names, so only a name of exactly "mistral" counts.
    updated = "mistral" if "llama" in architecture and [metadata.get("general.name")] == ["mistral"] else architecture
    config: dict = {
        "tie_word_embeddings": all(t["name"] != "output.weight" for t in header["tensors"]),
    }
    defaults = defaults_by_architecture.get(updated, defaults_by_architecture.get(architecture) or {})
    for key, value in defaults.items():
        config.setdefault(key, value)
    for gguf_key, value in metadata.items():
        prefix, _, config_key = gguf_key.replace(architecture, updated).partition(".")
        value = _single(value)
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        name = renames.get(prefix, {}).get(config_key)
        if name not in (None, -1):  # None: read but unused; -1: skipped
            config[name] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return config


def tokenizer(gguf_path: str, config: Any) -> Any:
    """The tokenizer ``AutoTokenizer.from_pretrained(folder, gguf_file=name)`` returns, built
    without its second parse of the file (which only recomputes ``config``)."""
    from transformers import AutoTokenizer, TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    folder, name = os.path.split(os.path.abspath(gguf_path))
    cls = TOKENIZER_MAPPING.get(type(config), TokenizersBackend)
    # AutoTokenizer's choice depends on more only when files beside the GGUF declare a tokenizer
    # class, or for Mistral's own tokenizer format: then let it decide.
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")) or cls.__name__ == "MistralCommonBackend":
        cls = AutoTokenizer
    return cls.from_pretrained(folder, gguf_file=name)


def write_metadata(gguf_path: str, directory: str, dtype: str, header: dict) -> None:
    """Writes ``config.json`` (without ``quantization_config``: the converter adds it),
    ``generation_config.json`` and the tokenizer files into ``directory``."""
    check_dependencies()
    from transformers import GenerationConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    values = config_dict(header)
    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise QloraError(f"{gguf_path}: transformers has no causal language model of type {model_type!r}")
    config = CONFIG_MAPPING[model_type].from_dict(values)
    # What loading the model sets on its config before save_pretrained writes it.
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    config.dtype = dtype
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    tokenizer(gguf_path, config).save_pretrained(directory)


class MetadataJob:
    """Writes the metadata of a GGUF model in a child process (see the module docs), into a private
    temporary directory; :meth:`finish` waits for it and copies the files into the output."""

    def __init__(self, gguf_path: str, dtype: str) -> None:
        check_dependencies()
        self.gguf_path = gguf_path
        self.tmp = tempfile.mkdtemp(prefix="qlora-rs-gguf-")
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(
            [sys.executable, "-m", __name__, gguf_path, self.tmp, dtype],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )

    def finish(self, directory: str) -> None:
        """Waits for the child; copies its files into ``directory`` or raises :class:`QloraError`
        with the child's error (one line)."""
        assert self.proc is not None, "finish() after close()"
        _, err = self.proc.communicate()
        if self.proc.returncode != 0:
            lines = [line for line in err.strip().splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit status {self.proc.returncode}"
            raise QloraError(f"{self.gguf_path}: writing config.json and the tokenizer failed: {why}")
        for name in sorted(os.listdir(self.tmp)):
            shutil.copyfile(os.path.join(self.tmp, name), os.path.join(directory, name))

    def close(self) -> None:
        """Stops the child if it still runs and removes its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)


_WITH_TORCH = "QLORA_RS_GGUF_METADATA_WITH_TORCH"
_READER = "transformers.integrations.gguf.reader"


def _answer_metadata_reader(header: dict) -> None:
    """Stands in for transformers' GGUF metadata reader module (see the module docs): its
    ``read_gguf_metadata(path, string_arrays)`` returns the metadata, with string arrays not asked
    for given as their length, and the tensor names."""
    import types

    def read_gguf_metadata(gguf_path: str, string_arrays: Any = ()) -> tuple[dict, tuple]:
        metadata = {
            k: len(v) if isinstance(v, list) and v and isinstance(v[0], str) and k not in string_arrays else v
            for k, v in header["metadata"].items()
        }
        return metadata, tuple(t["name"] for t in header["tensors"])

    module = types.ModuleType(_READER)
    module.read_gguf_metadata = read_gguf_metadata  # type: ignore[attr-defined]
    sys.modules[_READER] = module


def _main(argv: list[str]) -> int:
    gguf_path, directory, dtype = argv
    from .. import _lib

    header = _lib.gguf_header(gguf_path)
    if os.environ.get(_WITH_TORCH) != "1":
        if importlib.util.find_spec("transformers.integrations.gguf") is None:
            raise ModuleNotFoundError("transformers has no GGUF metadata reader to stand in for", name="torch")
        _answer_metadata_reader(header)
    write_metadata(gguf_path, directory, dtype, header)
    return 0


if __name__ == "__main__":
    if os.environ.get(_WITH_TORCH) != "1":
        # Hidden before transformers is imported: it then finds no torch and runs its configs and
        # tokenizers without it (see the module docs). Only this child process is affected.
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        sys.exit(_main(sys.argv[1:]))
    except ModuleNotFoundError as e:
        if e.name != "torch" or os.environ.get(_WITH_TORCH) == "1":
            raise
        # This transformers needs torch on this path: the same again, with torch.
        for name in os.listdir(sys.argv[2]):
            os.remove(os.path.join(sys.argv[2], name))
        env = {**os.environ, _WITH_TORCH: "1"}
        # Run as a script, __name__ is "__main__"; the spec keeps the module's own name.
        sys.exit(subprocess.call([sys.executable, "-m", __spec__.name, *sys.argv[1:]], env=env))
    except Exception as e:  # the parent reports the last line
        print(f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
