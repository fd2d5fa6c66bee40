"""Bad input to `qlora-rs convert`: each case gets a one-line message naming the file, the tensor
and what was expected, exit status 1, no traceback, and nothing written."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import qlora_rs
from qlora_rs.cli import main

from _convert_helpers import write_f32_safetensors, write_raw_safetensors


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(capsys, argv, *needles: str) -> str:
    """Runs the CLI, expects exit 1 with one stderr line containing every needle, and checks
    that neither the output nor a temporary was left next to it."""
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 1, (out, err)
    assert err.count("\n") == 1 and err.startswith("qlora-rs convert: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    dst = Path(argv[argv.index("-o") + 1])
    assert not dst.exists()
    assert [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")] == []
    return err


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    return write_f32_safetensors(tmp_path / "good.safetensors", {
        "l.weight": rng.standard_normal((16, 64)).astype(np.float32),
        "l.bias": np.zeros(16, np.float32),
    })


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_truncated_file(tmp_path, capsys, good):
    raw = good.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(raw[:-100])
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"],
                      "truncated.safetensors", '"l.weight"', "go beyond the data section")
    bad.write_bytes(raw[:5])
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"], "5 bytes, too short")


def test_header_length_beyond_file(tmp_path, capsys):
    bad = tmp_path / "h.safetensors"
    bad.write_bytes((1 << 20).to_bytes(8, "little") + b"{}")
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"],
                      "h.safetensors", "header length 1048576", "goes beyond the end of the 10-byte file")


def test_offsets_outside_data_section(tmp_path, capsys):
    bad = write_raw_safetensors(tmp_path / "o.safetensors", {"w.weight": _entry("F32", [4, 4], 0, 64)}, b"\0" * 32)
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"],
                      '"w.weight"', "data_offsets [0, 64] go beyond the data section (32 bytes")


def test_overlapping_tensors(tmp_path, capsys):
    header = {"a.weight": _entry("F32", [2, 4], 0, 32), "b.weight": _entry("F32", [2, 4], 16, 48)}
    bad = write_raw_safetensors(tmp_path / "ov.safetensors", header, b"\0" * 48)
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"], '"a.weight"', '"b.weight"', "overlap")


def test_unknown_dtype(tmp_path, capsys):
    bad = write_raw_safetensors(tmp_path / "d.safetensors", {"w.weight": _entry("F12", [2, 2], 0, 8)}, b"\0" * 8)
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"],
                      '"w.weight"', 'unknown dtype "F12"', "expected one of", "BF16")


def test_invalid_and_non_utf8_header(tmp_path, capsys):
    bad = write_raw_safetensors(tmp_path / "j.safetensors", None, b"", raw_header=b'{"w": {"dtype": ')
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"], "j.safetensors", "header is not valid JSON")
    bad = write_raw_safetensors(tmp_path / "u.safetensors", None, b"", raw_header=b'{"\xff\xfe": 1}')
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"], "u.safetensors", "not valid UTF-8")


def test_element_count_not_matching_byte_length(tmp_path, capsys):
    bad = write_raw_safetensors(tmp_path / "n.safetensors", {"w.weight": _entry("BF16", [3, 5], 0, 32)}, b"\0" * 32)
    assert_user_error(capsys, ["convert", bad, "-o", tmp_path / "out"],
                      '"w.weight"', "shape [3, 5] of BF16 needs 30 bytes but data_offsets [0, 32] hold 32")


def test_missing_shard(tmp_path, capsys, good):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model-00001-of-00002.safetensors").write_bytes(good.read_bytes())
    index = {"metadata": {"total_size": 1}, "weight_map": {
        "l.weight": "model-00001-of-00002.safetensors", "l.bias": "model-00001-of-00002.safetensors",
        "m.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_user_error(capsys, ["convert", model, "-o", tmp_path / "out"],
                      "model.safetensors.index.json", 'shard "model-00002-of-00002.safetensors"', '"m.weight"', "missing")


def test_nonfinite_weight_names_tensor_unless_allowed(tmp_path, capsys):
    w = np.ones((8, 64), np.float32)
    w[3, 5] = np.nan
    src = write_f32_safetensors(tmp_path / "nan.safetensors", {"x.weight": w})
    err = assert_user_error(capsys, ["convert", src, "-o", tmp_path / "out"],
                            "nan.safetensors", 'tensor "x.weight"', "NaN", "flat index 197", "--allow-nonfinite")
    assert "shape [8, 64]" in err
    rc, out, err = run_cli(capsys, "convert", src, "-o", tmp_path / "out", "--allow-nonfinite")
    assert rc == 0 and (tmp_path / "out" / "model.safetensors").exists(), err


def test_existing_destination(tmp_path, capsys, good):
    (tmp_path / "out").mkdir()
    rc, out, err = run_cli(capsys, "convert", good, "-o", tmp_path / "out")
    assert rc == 1 and "already exists; pass --force" in err and err.count("\n") == 1


def test_destination_parent_is_not_a_directory(tmp_path, capsys, good):
    (tmp_path / "file").write_text("x")
    rc, out, err = run_cli(capsys, "convert", good, "-o", tmp_path / "file" / "out")
    assert rc == 1 and err.count("\n") == 1 and "not a directory" in err.lower(), err


def test_bad_options(tmp_path, capsys, good):
    assert_user_error(capsys, ["convert", good, "-o", tmp_path / "out", "--blocksize", "48"],
                      "unsupported blocksize 48", "32, 64, 128")
    assert_user_error(capsys, ["convert", good, "-o", tmp_path / "out", "--exclude", "nope*"],
                      '--exclude "nope*" matches no tensor')
    assert_user_error(capsys, ["convert", tmp_path / "nothing-here", "-o", tmp_path / "out"], "nothing-here")


def test_source_is_already_quantized(tmp_path, capsys, good):
    out = tmp_path / "q"
    assert run_cli(capsys, "convert", good, "-o", out)[0] == 0
    assert_user_error(capsys, ["convert", out, "-o", tmp_path / "out"], "already quantized")


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """Mounts a tmpfs (needs root and mount(8)); skips the test where that is impossible."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = write_f32_safetensors(tmp_path / "big.safetensors", {
        "a.weight": rng.standard_normal((256, 1024)).astype(np.float32),  # 1 MiB in, ~140 kB out
        "emb.embed_tokens.weight": rng.standard_normal((512, 1024)).astype(np.float32),  # 2 MiB kept
    })
    with tmpfs(tmp_path / "small", "size=1m") as small:
        assert_user_error(capsys, ["convert", src, "-o", small / "out"], "No space left on device")
        assert list(small.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_destination_not_writable(tmp_path, capsys, good):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        assert_user_error(capsys, ["convert", good, "-o", ro / "out"], "Read-only file system")


def test_python_api_raises_the_exception_classes(tmp_path):
    bad = write_raw_safetensors(tmp_path / "d.safetensors", {"w.weight": _entry("F12", [2, 2], 0, 8)}, b"\0" * 8)
    with pytest.raises(qlora_rs.FormatError):
        qlora_rs.convert_checkpoint(bad, tmp_path / "out")
    w = np.full((2, 64), np.inf, np.float32)
    with pytest.raises(qlora_rs.NonFiniteError):
        qlora_rs.convert_checkpoint(write_f32_safetensors(tmp_path / "inf.safetensors", {"w.weight": w}), tmp_path / "o")
    with pytest.raises(FileNotFoundError):
        qlora_rs.convert_checkpoint(tmp_path / "missing.safetensors", tmp_path / "o")
    with pytest.raises(qlora_rs.InvalidArgumentError, match="quant_type"):
        qlora_rs.convert_checkpoint(bad, tmp_path / "o", quant_type="int4")


def test_conversion_releases_the_gil(tmp_path):
    """Another Python thread keeps running while a large tensor is quantized."""
    import threading
    import time

    from _convert_helpers import write_synthetic_checkpoint

    src = tmp_path / "one.safetensors"
    # 256 MiB converted by one Rust call: long enough to observe here (one 32 MiB tensor took
    # ~20 ms on a Zen 5 and the test skipped itself).
    write_synthetic_checkpoint(src, [(f"layer{i}.weight", (4096, 4096)) for i in range(8)])
    gaps: list[float] = []
    span: list[float] = []

    def work():
        t = time.perf_counter()
        qlora_rs.convert_checkpoint(src, tmp_path / "out", sync=False)
        span.append(time.perf_counter() - t)

    thread = threading.Thread(target=work)
    last = time.perf_counter()
    thread.start()
    while thread.is_alive():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    thread.join()
    if span[0] < 0.05:
        pytest.skip("conversion too fast to observe")
    # Holding the GIL for the whole quantization would stall this loop for all of it.
    assert max(gaps) < 0.5 * span[0], (max(gaps), span[0])
