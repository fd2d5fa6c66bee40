"""GGUF input to `qlora-rs convert`: the decoders equal the gguf package's `dequantize` for every
supported type; the output equals what transformers + bitsandbytes write for the model transformers
loads from the GGUF (tensors, config, generation config, tokenizer) and gives its logits; hostile
files fail with one line and write nothing."""

from __future__ import annotations

import filecmp
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_rs.cli import main
from qlora_rs.io.convert import convert_checkpoint, inspect_gguf, plan_conversion, read_gguf_tensor

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'qlora-rs[gguf]')")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from _convert_helpers import bnb_portable_path, load_all, tensor_mismatches  # noqa: E402

QUANTIZABLE = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16]
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte offsets of the float16 scales in each K-quant block, kept finite so that values are numbers.
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------
# Synthetic files


def stored_tensor(qtype, rows: int, cols: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(bytes as GGUF stores them, shape [rows, bytes per row]; the gguf package's float32 decoding)."""
    if qtype in (Q.F32, Q.F16):
        x = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32 if qtype == Q.F32 else np.float16)
        return x, gguf.quants.dequantize(x.view(np.uint8), qtype).reshape(rows, cols)
    if qtype in QUANTIZABLE:
        # Heavy tails and a zero row, so that scales span magnitudes and all-zero blocks occur.
        x = (rng.standard_t(3, (rows, cols)) * 0.05).astype(np.float32)
        x[0] = 0
        data = gguf.quants.quantize(x, qtype)
    else:
        block_len, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (rows * cols // block_len, block_bytes), dtype=np.uint8)
        for at in K_SCALE_OFFSETS[qtype]:
            scale = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16)
            blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
        data = blocks.reshape(rows, -1)
    return data, gguf.quants.dequantize(data, qtype).reshape(rows, cols)


def write_gguf(path: Path, architecture: str, tensors: dict, *, heads: tuple[int, int] | None = None,
               tokenizer: bool = False, layers: int | None = None) -> Path:
    """A GGUF file written with the gguf package's writer. ``tensors``: name -> (array, ggml type)."""
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(layers if layers is not None else 64)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if heads:
        w.add_head_count(heads[0])
        w.add_head_count_kv(heads[1])
    if tokenizer:
        add_tokenizer(w)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_tokenizer(w) -> None:
    """A tiny byte-level BPE vocabulary (the 256 byte symbols, two merges, an end token)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + ["th", "the", "<|endoftext|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["t h", "th e"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    """A qwen2 GGUF (no row permutation) with one tensor of each supported type: odd row counts,
    several blocks per row. Returns (path, {transformers name: gguf's float32 decoding})."""
    rng = np.random.default_rng(0)
    tensors, expected = {}, {}
    for i, qtype in enumerate([Q.F32, Q.F16, *QUANTIZABLE, *K_QUANTS]):
        rows, cols = (5, 512) if qtype in K_QUANTS else (7, 96)
        data, ref = stored_tensor(qtype, rows, cols, rng)
        tensors[f"blk.{i}.ffn_up.weight"] = (data, qtype)
        expected[f"model.layers.{i}.mlp.up_proj.weight"] = (qtype.name, ref)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "every-type.gguf", "qwen2", tensors, layers=len(tensors))
    return path, expected


def test_decode_equals_gguf_dequantize_for_every_type(every_type):
    path, expected = every_type
    types = {t.hf_name: t.ggml_type for t in inspect_gguf(path).tensors}
    for name, (qtype, ref) in expected.items():
        assert types[name] == qtype
        ours = read_gguf_tensor(path, name, "float32").numpy()
        # Bit for bit: view as integers so that -0.0 and NaN payloads count too.
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32), err_msg=qtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rounding_to_dtype_is_torchs(every_type, dtype):
    path, expected = every_type
    for name, (qtype, ref) in expected.items():
        want = torch.from_numpy(ref).to(getattr(torch, dtype))
        got = read_gguf_tensor(path, name, dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), qtype


def test_llama_q_and_k_are_unpermuted_as_transformers_does(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(1)
    heads, kv_heads, head_dim = 4, 2, 8
    tensors, refs = {}, {}
    for gname, rows, qtype in [("attn_q", heads * head_dim, Q.Q4_K), ("attn_k", kv_heads * head_dim, Q.Q8_0),
                               ("attn_v", kv_heads * head_dim, Q.Q5_1)]:
        data, ref = stored_tensor(qtype, rows, 256, rng)
        tensors[f"blk.0.{gname}.weight"] = (data, qtype)
        processor = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv_heads})
        refs[gname] = processor.process(ref, f"blk.0.{gname}.weight").weights
    path = write_gguf(tmp_path / "llama.gguf", "llama", tensors, heads=(heads, kv_heads), layers=1)
    for gname, hf in [("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")]:
        ours = read_gguf_tensor(path, f"model.layers.0.self_attn.{hf}.weight").numpy()
        np.testing.assert_array_equal(ours, refs[gname], err_msg=gname)
    assert not np.array_equal(refs["attn_q"], gguf.quants.dequantize(tensors["blk.0.attn_q.weight"][0], Q.Q4_K))


# ----------------------------------------------------------------------------------------------
# Config and tokenizer


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_config_and_tokenizer_equal_transformers_gguf_utilities(tmp_path, architecture):
    """The fast route (config from the Rust reader's metadata, tokenizer class chosen as
    AutoTokenizer does) writes what AutoConfig/AutoTokenizer with gguf_file write."""
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from qlora_rs import _lib
    from qlora_rs.io import gguf_metadata

    rng = np.random.default_rng(2)
    tensors = {"token_embd.weight": stored_tensor(Q.F32, 259, 64, rng)[0]}
    tensors = {k: (v, Q.F32) for k, v in tensors.items()}
    path = write_gguf(tmp_path / f"{architecture}.gguf", architecture, tensors, heads=(4, 2), tokenizer=True, layers=2)
    header = _lib.gguf_header(str(path))
    assert gguf_metadata.config_dict(header) == load_gguf_checkpoint(str(path), return_tensors=False)["config"]

    ours, ref = tmp_path / "ours", tmp_path / "ref"
    gguf_metadata.write_metadata(str(path), str(ours), "bfloat16", header)
    AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name).save_pretrained(str(ref))
    written = sorted(p.name for p in ref.iterdir())
    assert "tokenizer.json" in written
    for name in written:
        assert filecmp.cmp(ours / name, ref / name, shallow=False), name


# ----------------------------------------------------------------------------------------------
# Hostile files


def raw_gguf(*, version=3, kv: bytes | None = None, kv_count=None, infos: bytes | None = None, tensor_count=None,
             data: bytes = b"", alignment=32) -> bytes:
    """A GGUF file assembled from raw parts, so that any field can lie. By default: llama, one layer,
    one F32 norm of 4 elements at offset 0."""
    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    if kv is None:
        kv = (string(b"general.architecture") + struct.pack("<I", 8) + string(b"llama")
              + string(b"llama.block_count") + struct.pack("<II", 4, 1))
        kv_count = 2 if kv_count is None else kv_count
    if infos is None:
        infos = string(b"blk.0.attn_norm.weight") + struct.pack("<IQIQ", 1, 4, 0, 0)
        tensor_count = 1 if tensor_count is None else tensor_count
        data = data or np.arange(4, dtype=np.float32).tobytes()
    head = b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count) + kv + infos
    head += b"\0" * (-len(head) % alignment)
    return head + data


def _info(name: bytes, dims, type_id: int, offset: int) -> bytes:
    return (struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset))


HOSTILE = {
    "truncated": (raw_gguf()[:-3], "truncated"),
    "truncated header": (raw_gguf()[:30], "truncated"),
    "lying tensor count": (raw_gguf(tensor_count=1 << 40), "more than the remaining"),
    "lying metadata count": (raw_gguf(kv_count=1 << 40), "more than the remaining"),
    "metadata count off by one": (raw_gguf(kv_count=3), "dimensions"),
    "huge string length": (raw_gguf(kv=struct.pack("<Q", 1 << 62) + b"general.architecture", kv_count=1),
                           "has length 4611686018427387904"),
    "huge array length": (raw_gguf(kv=struct.pack("<Q", 5) + b"a.b.c" + struct.pack("<IIQ", 9, 8, 1 << 59), kv_count=1),
                          "declares 576460752303423488 array elements"),
    "offset beyond the file": (raw_gguf(infos=_info(b"blk.0.attn_norm.weight", [4], 0, 1 << 20), tensor_count=1,
                                        data=b"\0" * 16), "goes beyond the end"),
    "unknown tensor type": (raw_gguf(infos=_info(b"blk.0.attn_norm.weight", [4], 77, 0), tensor_count=1,
                                     data=b"\0" * 16), "unknown ggml type 77"),
    "misaligned data": (raw_gguf(infos=_info(b"blk.0.attn_norm.weight", [4], 0, 4), tensor_count=1,
                                 data=b"\0" * 32), "not a multiple of the alignment 32"),
    "undecodable type": (raw_gguf(infos=_info(b"blk.0.attn_norm.weight", [256], 16, 0), tensor_count=1,
                                  data=b"\0" * 66), "cannot decode"),
    "version 1": (raw_gguf(version=1), "unsupported GGUF version 1"),
}


def test_valid_raw_file_converts(tmp_path):
    src = tmp_path / "ok.gguf"
    src.write_bytes(raw_gguf())
    convert_checkpoint(src, tmp_path / "ok.safetensors", dequantize_only=True, dtype="float32")
    assert load_all(tmp_path / "ok.safetensors")["model.layers.0.input_layernorm.weight"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_gives_one_line_and_writes_nothing(tmp_path, capsys, case):
    data, needle = HOSTILE[case]
    src = tmp_path / "bad.gguf"
    src.write_bytes(data)
    for argv in (["convert", src, "-o", tmp_path / "out"], ["convert", src, "-o", tmp_path / "out", "--dry-run"],
                 ["inspect", src]):
        rc, out, err = run(capsys, *argv)
        if case == "undecodable type" and argv[0] == "inspect":
            assert rc == 0 and "(no decoder)" in out  # listing is fine; decoding is what fails
            continue
        assert rc == 1, (argv, out, err)
        assert err.count("\n") == 1 and "error: " in err and "Traceback" not in err, err
        assert needle in err and "bad.gguf" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_without_the_extra_convert_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    src = tmp_path / "m.gguf"
    src.write_bytes(raw_gguf())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    rc, _, err = run(capsys, "convert", src, "-o", tmp_path / "out")
    assert rc == 1 and "pip install 'qlora-rs[gguf]'" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    # Reading the file needs no extra.
    assert run(capsys, "inspect", src)[0] == 0
    assert run(capsys, "convert", src, "--dry-run", "-o", tmp_path / "out")[0] == 0


def test_failing_metadata_leaves_no_output(tmp_path, capsys):
    """The config/tokenizer child fails (a tokenizer type transformers does not know) after the
    tensors are written: one line naming the file and the cause, and no output."""
    rng = np.random.default_rng(3)
    tensors = {"blk.0.attn_norm.weight": (stored_tensor(Q.F32, 1, 64, rng)[0][0], Q.F32)}
    src = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(src), "qwen2")
    w.add_block_count(1)
    w.add_tokenizer_model("bogus")
    w.add_token_list(["a", "b"])
    for name, (data, _) in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rc, _, err = run(capsys, "convert", src, "-o", tmp_path / "out")
    assert rc == 1 and err.count("\n") == 1, err
    head = "m.gguf: writing config.json and the tokenizer failed: "
    assert head in err, err
    # The cause is transformers' own words, which differ between its releases ("bogus" is named by
    # newer ones); it is the child's error, not a traceback or the child's command line.
    cause = err.split(head, 1)[1].strip()
    assert re.match(r"^\w+(Error|Exception): \S", cause) and "__main__" not in cause, cause
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.slow
def test_metadata_with_and_without_torch_are_the_same(tmp_path, monkeypatch):
    """The child writes the same files whether transformers runs with torch or without it."""
    from qlora_rs.io import gguf_metadata

    rng = np.random.default_rng(4)
    path = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": (stored_tensor(Q.F32, 259, 64, rng)[0], Q.F32)},
                      heads=(4, 2), tokenizer=True, layers=1)
    outputs = []
    for with_torch in ("0", "1"):
        monkeypatch.setenv("QLORA_RS_GGUF_METADATA_WITH_TORCH", with_torch)
        out = tmp_path / f"torch{with_torch}"
        out.mkdir()
        job = gguf_metadata.MetadataJob(str(path), "float16")
        try:
            job.finish(str(out))
        finally:
            job.close()
        outputs.append(out)
    names = sorted(p.name for p in outputs[0].iterdir())
    assert names == sorted(p.name for p in outputs[1].iterdir()) and "tokenizer.json" in names
    for name in names:
        assert filecmp.cmp(outputs[0] / name, outputs[1] / name, shallow=False), name
    assert json.loads((outputs[0] / "config.json").read_text())["dtype"] == "float16"


def test_options_that_need_a_gguf_source(tmp_path, capsys):
    from _convert_helpers import write_f32_safetensors

    st = write_f32_safetensors(tmp_path / "m.safetensors", {"l.weight": np.zeros((4, 64), np.float32)})
    rc, _, err = run(capsys, "convert", st, "--dequantize-only", "-o", tmp_path / "out")
    assert rc == 1 and "apply to GGUF sources" in err
    src = tmp_path / "m.gguf"
    src.write_bytes(raw_gguf())
    rc, _, err = run(capsys, "convert", src, "--dequantize-only", "--exclude", "*", "-o", tmp_path / "out")
    assert rc == 1 and "--include/--exclude do not apply" in err


# ----------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct, Q4_1 + Q8_0 + F32


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "nf4"
    convert_checkpoint(smollm2_gguf, out)
    return out


@pytest.fixture(scope="module")
def smollm2_bnb_dir(smollm2_dir):
    """What transformers + bitsandbytes write for the model transformers loads from the GGUF:
    from_pretrained(bf16 directory, BitsAndBytesConfig nf4 + double quant) + save_pretrained. Made
    once (a minute of bitsandbytes' CPU quantization) and kept next to smollm2_dir."""
    import shutil

    bnb = pytest.importorskip("bitsandbytes")
    import transformers

    from _convert_helpers import bnb_reference

    cache = smollm2_dir.with_name(f"smollm2-135m-instruct-bnb-nf4-{bnb.__version__}-{transformers.__version__}")
    if not (cache / "model.safetensors").is_file():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        bnb_reference(smollm2_dir, tmp)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    return cache


def test_real_file_decodes_as_gguf_dequantize(smollm2_gguf):
    """One tensor of each stored type, in float32, against the gguf package (q/k un-permuted)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor({"num_attention_heads": 9, "num_key_value_heads": 3})
    picks = ["token_embd.weight", "blk.3.attn_k.weight", "blk.7.ffn_down.weight", "output_norm.weight"]
    # The stored bytes, located by the header; gguf's dequantize is the oracle of their values.
    blob = np.memmap(smollm2_gguf, mode="r", dtype=np.uint8)
    for t in (t for t in inspect_gguf(smollm2_gguf).tensors if t.name in picks):
        qtype = Q[t.ggml_type]
        raw = np.asarray(blob[t.offset:t.offset + t.bytes])
        raw = raw.view(np.float32) if qtype == Q.F32 else raw.reshape(t.shape[0], -1)
        ref = processor.process(gguf.quants.dequantize(raw, qtype).reshape(t.shape), t.name).weights
        ours = read_gguf_tensor(smollm2_gguf, t.hf_name).numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=t.name)


def test_real_file_dequantizes_to_transformers_bf16_model(smollm2_gguf, smollm2_dir, tmp_path):
    out = tmp_path / "bf16"
    s = convert_checkpoint(smollm2_gguf, out, dequantize_only=True)
    assert s.tensors_quantized == 0
    assert tensor_mismatches(load_all(out), load_all(smollm2_dir)) == []
    # The float model's files are transformers' own, byte for byte.
    for name in sorted(p.name for p in smollm2_dir.iterdir() if p.suffix != ".safetensors"):
        assert filecmp.cmp(out / name, smollm2_dir / name, shallow=False), name


def test_real_file_output_equals_transformers_bitsandbytes(converted, smollm2_bnb_dir, smollm2_dir, smollm2_gguf):
    assert tensor_mismatches(load_all(converted), load_all(smollm2_bnb_dir)) == []
    for name in ("config.json", "generation_config.json"):
        assert filecmp.cmp(converted / name, smollm2_bnb_dir / name, shallow=False), name
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert filecmp.cmp(converted / name, smollm2_dir / name, shallow=False), name
    # `inspect --compare` measures the output against the GGUF itself.
    from qlora_rs.io.convert import compare_checkpoints, fidelity_totals

    rows = compare_checkpoints(converted, smollm2_gguf)
    assert len(rows) == 272 and {r.status for r in rows} == {"quantized", "identical"}
    assert 15 < fidelity_totals(rows).sqnr_db < 30


@pytest.mark.slow
def test_real_file_output_gives_the_logits_of_bitsandbytes(converted, monkeypatch):
    """The output loads in transformers + bitsandbytes, and in qlora_rs.from_pretrained with the same
    logits (both computing in the checkpoint's bfloat16). Its files are bitsandbytes' own quantization
    of transformers' GGUF load byte for byte (the test above), so these are that model's logits.

    More tokens than the fused CPU kernel takes (ops.CPU_FUSED_GEMM_MAX_M rows), so our layers
    decode and multiply as bitsandbytes does, bit for bit, when both multiply in bfloat16. That is our
    default only on CPUs with native bf16 matrix units (AVX512-BF16, AMX); elsewhere our products run
    in float32 (ops.matmul_dtype: bf16 GEMMs are slow there), so the bit-for-bit comparison sets
    bfloat16 products, and our default is checked as at least as close to the float32 model. With 12
    tokens the fused kernel runs, whose float32 sums add in another order: bfloat16 activations then
    drift apart over 30 layers (up to ~1.3 in logits of spread ~4), so there too the claim is that
    both are as close to the same model computed in float32."""
    from transformers import AutoModelForCausalLM

    import qlora_rs
    from qlora_rs.core import ops
    from qlora_rs.core.ops import CPU_FUSED_GEMM_MAX_M

    tokens = torch.randint(0, 49152, (1, CPU_FUSED_GEMM_MAX_M + 8), generator=torch.Generator().manual_seed(0))
    assert tokens.shape[1] > CPU_FUSED_GEMM_MAX_M

    def logits(model, t):
        with torch.no_grad():
            return model.eval()(t).logits

    bnb = bnb_portable_path(AutoModelForCausalLM.from_pretrained(str(converted), device_map="cpu"))
    ours = qlora_rs.from_pretrained(converted)
    exact = qlora_rs.from_pretrained(converted, compute_dtype=torch.float32)
    native = ops.matmul_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    want = logits(bnb, tokens)
    if not native:
        exact_long = logits(exact, tokens).float()
        default_err = (logits(ours, tokens).float() - exact_long).norm()
        assert default_err <= (want.float() - exact_long).norm(), default_err
        monkeypatch.setitem(ops._CPU_NATIVE, torch.bfloat16, True)
    assert ops.matmul_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert torch.equal(logits(ours, tokens), want)
    monkeypatch.undo()
    short = tokens[:, :12]
    exact_short = logits(exact, short).float()
    ours_err = (logits(ours, short).float() - exact_short).norm()
    bnb_err = (logits(bnb, short).float() - exact_short).norm()
    assert ours_err < 1.25 * bnb_err, (ours_err, bnb_err)


def test_real_file_dry_run_and_inspect(smollm2_gguf, capsys, tmp_path):
    plan = plan_conversion(smollm2_gguf, tmp_path / "out")
    assert plan.architecture == "llama" and plan.dropped == []
    q = {t.name for t in plan.tensors if t.quantize}
    assert len(q) == 210 and "model.embed_tokens.weight" not in q
    assert {t.stored for t in plan.tensors} == {"Q4_1", "Q8_0", "F32"}
    rc, out, _ = run(capsys, "inspect", smollm2_gguf)
    assert rc == 0 and "blk.0.attn_q.weight" in out and "model.layers.0.self_attn.q_proj.weight" in out
    assert "272 (61 F32, 210 Q4_1, 1 Q8_0)" in out
    rc, out, _ = run(capsys, "inspect", "--json", smollm2_gguf)
    rows = json.loads(out)
    assert rows[0]["ggml_type"] == "Q8_0" and rows[0]["bits_per_param"] == 8.5
    assert not (tmp_path / "out").exists()
