"""Calibrated NF4/FP4 (``qlora-rs convert --calibrate``, ``quantize_model(calibration=...)``): the
format is bitsandbytes' unchanged (bitsandbytes decodes it exactly as we do, transformers loads it,
negative block scales included), the output error is below round-to-nearest's, results repeat,
and bad calibration data is a clear error that writes nothing. The sweep's own properties (every
block size, against round-to-nearest on random H and W) are cargo tests in rust/calibrate/tests.rs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import qlora_rs
from qlora_rs.io import calibrate as cal
from qlora_rs.cli import main
from qlora_rs.io.convert import calibration_record, convert_checkpoint, inspect_checkpoint
from qlora_rs.errors import FormatError, InvalidArgumentError

from _convert_helpers import bnb_portable_path, load_all
from _loading_helpers import make_tiny_llama

WORDS = ("the cat sat on a mat and dog ran to park while birds sang in old trees near water under blue sky "
         "every morning children walk slowly toward school carrying books").split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (hidden 64, 2 blocks) with a word-level tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("calib") / "tiny", words=WORDS, seed=3)


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib-data") / "calib.txt"
    path.write_text(_text(2000, 1))
    return path


@pytest.fixture(scope="module")
def calibrated(tiny, data, tmp_path_factory):
    dst = tmp_path_factory.mktemp("calib-out") / "tiny-nf4"
    summary = convert_checkpoint(tiny, dst, calibrate=data, calib_samples=16, calib_seq=48)
    return dst, summary


def _bnb_state(tensors: dict, name: str):
    from bitsandbytes.functional import QuantState

    parts = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    return QuantState.from_dict(parts, device=torch.device("cpu"))


def test_same_format_and_size_as_plain_convert(tiny, calibrated, tmp_path):
    dst, summary = calibrated
    plain = convert_checkpoint(tiny, tmp_path / "plain")
    ours, theirs = load_all(dst), load_all(tmp_path / "plain")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        if ".quant_state." in k:
            # The same JSON state; only the double-quantization offset (a float) differs.
            a, b = (json.loads(bytes(t.tolist())) for t in (ours[k], theirs[k]))
            assert list(a) == list(b) and {**a, "nested_offset": 0} == {**b, "nested_offset": 0}, k
        else:
            assert (ours[k].dtype, ours[k].shape) == (theirs[k].dtype, theirs[k].shape), k
    # Equal but for the digits of the offsets written in the JSON states.
    assert abs(summary.bytes_out_quantized - plain.bytes_out_quantized) <= 14 * 4
    assert summary.bits_per_param == pytest.approx(plain.bits_per_param, rel=1e-3)
    # Everything but the calibrated weights' codes and scales is byte for byte the plain output.
    record = summary.calibration
    assert record == calibration_record(dst)
    linear = [r.name for r in inspect_checkpoint(dst) if r.quant_type]
    assert sorted(record["tensors"]) == sorted(linear) and len(linear) == 14
    differ = {k for k in ours if not torch.equal(ours[k], theirs[k])}
    assert differ and all(k.split(".weight")[0] + ".weight" in record["tensors"] for k in differ)
    assert all(t["error_ratio"] < 1 for t in record["tensors"].values()), record["tensors"]
    assert record["sequences"] == 16 and record["seq_len"] == 48 and record["data"] == "calib.txt"


def test_bitsandbytes_decodes_it_exactly_as_we_do_negative_scales_included(calibrated):
    from bitsandbytes.functional import dequantize_4bit

    dst, summary = calibrated
    tensors = load_all(dst)
    negative = 0
    for name in summary.calibration["tensors"]:
        state = _bnb_state(tensors, name)
        theirs = dequantize_4bit(tensors[name], state)
        ours = qlora_rs.dequantize(tensors[name], qlora_rs.QuantState.from_dict(
            {k: v for k, v in tensors.items() if k.startswith(name + ".")}, name=name), state.dtype)
        assert torch.equal(ours, theirs), name
        scales = qlora_rs.functional.absmax_float(qlora_rs.QuantState.from_dict(
            {k: v for k, v in tensors.items() if k.startswith(name + ".")}, name=name))
        negative += int((scales < 0).sum())
    assert negative > 0
    assert negative == sum(t["negative_scales"] for t in summary.calibration["tensors"].values())


def test_transformers_with_bitsandbytes_loads_it(calibrated):
    from transformers import AutoModelForCausalLM

    dst, _ = calibrated
    ids = torch.tensor([[2, 9, 14, 20, 31, 7, 12, 40]])
    ours = qlora_rs.from_pretrained(dst, compute_dtype=torch.bfloat16)
    bnb = AutoModelForCausalLM.from_pretrained(dst, device_map="cpu")
    assert getattr(bnb.config, cal.CONFIG_KEY)["sequences"] == 16
    with torch.no_grad():
        want = ours(ids).logits.float()
        # bitsandbytes' own CPU kernel (AVX512-BF16 machines) rounds the scales to bfloat16 first.
        fast = bnb(ids).logits.float()
        exact = bnb_portable_path(bnb)(ids).logits.float()
    assert torch.allclose(exact, want, atol=2e-2, rtol=0), (exact - want).abs().max()
    assert torch.allclose(fast, want, atol=0.1, rtol=0), (fast - want).abs().max()


def test_results_repeat_and_quantize_model_gives_the_same_codes(tiny, data, calibrated, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst, summary = calibrated
    again = tmp_path / "again"
    convert_checkpoint(tiny, again, calibrate=data, calib_samples=16, calib_seq=48)
    first, second = load_all(dst), load_all(again)
    assert all(torch.equal(first[k], second[k]) for k in first)

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    tokens = cal.calibration_tokens(data, AutoTokenizer.from_pretrained(tiny), samples=16, seq_len=48)
    qlora_rs.quantize_model(model, calibration=tokens)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, qlora_rs.Linear4bit)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(layer.packed_weight().reshape(-1), first[name].reshape(-1))
    assert torch.equal(layer.weight_absmax, first[name + ".absmax"])
    assert getattr(model.config, cal.CONFIG_KEY)["tensors"].keys() == summary.calibration["tensors"].keys()
    assert isinstance(model.lm_head, torch.nn.Linear)  # skipped, as without calibration


def test_cli_convert_calibrate_and_inspect_fp4_and_blocks_across_rows(tiny, data, tmp_path, capsys):
    # Block size 128 over rows of 64: every block spans two rows, so scales are fixed beforehand.
    dst = tmp_path / "fp4"
    assert main(["convert", str(tiny), "-o", str(dst), "--quant-type", "fp4", "--blocksize", "128",
                 "--calibrate", str(data), "--calib-samples", "8", "--calib-seq", "32"]) == 0
    out = capsys.readouterr().out
    assert "calibrated 14 weights on 8 x 32 tokens of calib.txt" in out and "round-to-nearest" in out
    record = calibration_record(dst)
    assert {t["scales"] for t in record["tensors"].values()} == {"fixed", "sweep"}  # 128-wide MLP rows: whole blocks
    assert all(t["negative_scales"] == 0 for t in record["tensors"].values())  # FP4 is symmetric
    assert all(t["error_ratio"] < 1 for t in record["tensors"].values())
    assert main(["inspect", str(dst)]) == 0
    table = capsys.readouterr().out
    assert "calibrated" in table and "yes (" in table and table.count("yes (") == 14
    from bitsandbytes.functional import dequantize_4bit

    tensors = load_all(dst)
    name = "model.layers.0.self_attn.q_proj.weight"
    state = _bnb_state(tensors, name)
    assert state.quant_type == "fp4" and state.blocksize == 128
    ours = qlora_rs.dequantize(tensors[name], qlora_rs.QuantState.from_dict(
        {k: v for k, v in tensors.items() if k.startswith(name + ".")}, name=name), state.dtype)
    # Decoded as one row: bitsandbytes 0.50's native CPU kernel indexes blocks per row, which
    # differs from its own reference (and CUDA) decode when blocks run across rows, for any file.
    shape, state.shape = state.shape, torch.Size([state.shape.numel()])
    assert torch.equal(ours, dequantize_4bit(tensors[name], state).reshape(shape))


def _bad_data(kind: str, directory: Path) -> Path:
    if kind == "empty":
        p = directory / "empty.txt"
        p.write_text("")
    elif kind == "short":
        p = directory / "short.txt"
        p.write_text("the cat sat on a mat")
    elif kind == "bad-jsonl":
        p = directory / "bad.jsonl"
        p.write_text(json.dumps({"text": _text(100, 2)}) + "\n" + json.dumps({"question": "?"}) + "\n")
    else:
        p = directory / "binary.txt"
        p.write_bytes(bytes(range(256)) * 4)
    return p


@pytest.mark.parametrize("kind, message", [
    ("empty", "empty"), ("short", "shorter than one sequence of 48"), ("bad-jsonl", "bad.jsonl:2"),
    ("binary", "not UTF-8"),
])
def test_bad_calibration_data_is_a_clear_error_and_writes_nothing(tiny, tmp_path, kind, message, capsys):
    bad = _bad_data(kind, tmp_path)
    dst = tmp_path / "out" / "model"
    dst.parent.mkdir()
    with pytest.raises(FormatError, match=message) as e:
        convert_checkpoint(tiny, dst, calibrate=bad, calib_samples=4, calib_seq=48)
    assert bad.name in str(e.value)
    assert main(["convert", str(tiny), "-o", str(dst), "--calibrate", str(bad), "--calib-seq", "48"]) == 1
    err = capsys.readouterr().err
    assert bad.name in err and message in err and len(err.strip().splitlines()) == 1
    assert list(dst.parent.iterdir()) == []


def test_options_that_cannot_apply_are_refused_before_any_work(tiny, data, tmp_path):
    with pytest.raises(InvalidArgumentError, match="dequantize-only"):
        convert_checkpoint(tiny, tmp_path / "a", calibrate=data, dequantize_only=True)
    with pytest.raises(InvalidArgumentError, match="directory"):
        convert_checkpoint(tiny, tmp_path / "a.safetensors", calibrate=data)
    with pytest.raises(InvalidArgumentError, match="config.json"):
        convert_checkpoint(tiny / "model.safetensors", tmp_path / "b", calibrate=data)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        convert_checkpoint(tiny, tmp_path / "exists", calibrate=data)
    with pytest.raises(InvalidArgumentError, match="integer tensor"):
        cal.calibrate_model(torch.nn.Linear(2, 2), torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_the_defaults_agree_everywhere():
    import inspect

    from qlora_rs.cli import build_parser

    args = build_parser("convert").parse_args(["convert", "x", "--calibrate", "d"])
    params = inspect.signature(convert_checkpoint).parameters
    cal_params = inspect.signature(cal.convert_calibrated).parameters
    assert args.calib_samples == params["calib_samples"].default == cal_params["samples"].default == cal.DEFAULT_SAMPLES
    assert args.calib_seq == params["calib_seq"].default == cal_params["seq_len"].default == cal.DEFAULT_SEQ_LEN
    assert cal.Calibration(torch.zeros(1, 2, dtype=torch.long)).samples == cal.DEFAULT_SAMPLES
