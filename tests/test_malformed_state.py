"""Stored quantization states are untrusted input: every malformed field of a
``.quant_state.bitsandbytes__<type>`` JSON gives a FormatError naming the file, the tensor and the
field, on every loading path (qlora_rs.from_pretrained, Linear4bit.load_state_dict, transformers with
QloraConfig; the sharded path is in test_distributed). Property tests over random field values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import qlora_rs
from _loading_helpers import make_tiny_llama
from qlora_rs.errors import FormatError
from qlora_rs.io.hf_quantizer import QloraConfig

WEIGHT = "model.layers.0.self_attn.q_proj.weight"
META_KEY = WEIGHT + ".quant_state.bitsandbytes__nf4"
FIELDS = ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# A field replaced by a random JSON value, a near miss (right kind, wrong value), or removed.
near_misses = st.sampled_from([0, 1, 63, 65, 64.0, "64", [64], [64, 64, 1], [-64, 64], [64.0, 64], [], "nf5", "fp4",
                               "float64", "bfloat16 ", 255, 257, 2**63, float("nan"), float("inf")])
mutations = st.tuples(st.sampled_from(FIELDS), st.one_of(json_values, near_misses, st.just(KeyError)))


def mutate(meta: dict, field: str, value) -> dict:
    meta = dict(meta)
    if value is KeyError:
        meta.pop(field, None)
    else:
        meta[field] = value
    return meta


def encode(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def decode(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()))


def assert_names(err: FormatError, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("malformed")
    src = make_tiny_llama(work / "float", seed=3)
    dst = work / "nf4"
    qlora_rs.convert_checkpoint(src, dst)
    return dst


class Tensors(dict):
    """The checkpoint's tensors, with a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<{len(self)} checkpoint tensors>"


@pytest.fixture(scope="module")
def tensors(nf4_dir) -> dict:
    return Tensors(load_file(str(nf4_dir / "model.safetensors")))


def write_mutated(nf4_dir: Path, tensors: dict, target: Path, meta: dict) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(nf4_dir, target)
    save_file({**tensors, META_KEY: encode(meta)}, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def acceptable(field: str, value) -> bool:
    """Whether a mutated field still describes this weight (so it must load): the same value where the
    format fixes it, any output dtype, any finite offset, a nested field left to its default."""
    if value is KeyError:
        return field in ("nested_blocksize", "nested_dtype")
    same = {"quant_type": "nf4", "blocksize": 64, "shape": [64, 64], "nested_blocksize": 256, "nested_dtype": "float32"}
    if field in same:
        return type(value) is type(same[field]) and value == same[field] and (
            field != "shape" or all(type(v) is int for v in value))
    if field == "dtype":
        return value in ("float32", "float16", "bfloat16")
    return type(value) in (int, float) and value == value and abs(value) != float("inf")  # nested_offset


@settings(max_examples=25)
@given(mutations)
def test_from_pretrained(nf4_dir, tensors, tmp_path_factory, mutation):
    meta = mutate(decode(tensors[META_KEY]), *mutation)
    field = mutation[0]
    target = write_mutated(nf4_dir, tensors, tmp_path_factory.mktemp("m") / "model", meta)
    try:
        qlora_rs.from_pretrained(target, compute_dtype=torch.float32, dtype=torch.float32)
    except FormatError as e:
        assert not acceptable(*mutation), f"a valid state was refused: {e}"
        assert_names(e, str(target / "model.safetensors"), WEIGHT, field)
    else:
        assert acceptable(*mutation), "a malformed state loaded"


@settings(max_examples=100)
@given(mutations)
def test_linear4bit_load_state_dict(tensors, mutation):
    meta = mutate(decode(tensors[META_KEY]), *mutation)
    field = mutation[0]
    sd = {k[len("model.layers.0.self_attn.q_proj."):]: v for k, v in tensors.items()
          if k.startswith("model.layers.0.self_attn.q_proj.")}
    sd["weight.quant_state.bitsandbytes__nf4"] = encode(meta)
    layer = qlora_rs.Linear4bit(64, 64, bias=False)
    try:
        layer.load_state_dict(sd)
    except FormatError as e:
        assert not acceptable(*mutation), f"a valid state was refused: {e}"
        assert_names(e, "weight", field)
    except RuntimeError as e:
        # The well-formed state of another layer's shape: torch's collected size mismatch, naming the field.
        value = mutation[1]
        assert field == "shape" and isinstance(value, list) and all(type(v) is int for v in value), e
        # torch's message lists one error per line, after its own header line.
        assert "'shape'" in str(e) and "weight" in str(e), e
    else:
        assert acceptable(*mutation), "a malformed state loaded"


@settings(max_examples=12)
@given(mutations)
def test_transformers_with_qlora_config(nf4_dir, tensors, tmp_path_factory, mutation):
    from transformers import AutoModelForCausalLM

    meta = mutate(decode(tensors[META_KEY]), *mutation)
    field = mutation[0]
    target = write_mutated(nf4_dir, tensors, tmp_path_factory.mktemp("m") / "model", meta)
    try:
        AutoModelForCausalLM.from_pretrained(str(target), quantization_config=QloraConfig(compute_dtype=torch.float32),
                                             dtype=torch.float32)
    except FormatError as e:
        assert not acceptable(*mutation), f"a valid state was refused: {e}"
        assert_names(e, str(target), WEIGHT, field)
    else:
        assert acceptable(*mutation), "a malformed state loaded"


@pytest.mark.parametrize("meta", [5, [1, 2], "nf4", None])
def test_metadata_that_is_not_an_object(nf4_dir, tensors, tmp_path, meta):
    target = tmp_path / "model"
    shutil.copytree(nf4_dir, target)
    save_file({**tensors, META_KEY: encode(meta)}, str(target / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"expected an object") as e:
        qlora_rs.from_pretrained(target)
    assert_names(e.value, str(target / "model.safetensors"), WEIGHT)


def test_key_and_field_disagree(tensors):
    meta = dict(decode(tensors[META_KEY]), quant_type="fp4")
    sd = {k[len("model.layers.0.self_attn.q_proj."):]: v for k, v in tensors.items()
          if k.startswith("model.layers.0.self_attn.q_proj.")}
    sd["weight.quant_state.bitsandbytes__nf4"] = encode(meta)
    with pytest.raises(FormatError, match=r"'quant_type' is 'fp4' but the key says 'nf4'"):
        qlora_rs.Linear4bit(64, 64, bias=False).load_state_dict(sd)
