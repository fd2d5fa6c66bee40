"""The `qlora-rs` command line: `convert` (summary, dry run, progress, interruption) and
`inspect` (tables, --compare, --json), plus the subcommand plug-in mechanism."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

import qlora_rs
from qlora_rs import cli
from qlora_rs.cli import ProgressBar, main

from _convert_helpers import write_f32_safetensors


@pytest.fixture
def model(tmp_path):
    """A model directory: one linear layer, an embedding, a norm, config and a tokenizer file."""
    rng = np.random.default_rng(0)
    d = tmp_path / "model"
    d.mkdir()
    write_f32_safetensors(d / "model.safetensors", {
        "model.embed_tokens.weight": rng.standard_normal((32, 64)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((96, 64)).astype(np.float32),
        "model.layers.10.mlp.up_proj.weight": rng.standard_normal((96, 64)).astype(np.float32),
        "model.layers.2.mlp.up_proj.weight": rng.standard_normal((96, 64)).astype(np.float32),
        "model.norm.weight": np.ones(64, np.float32),
    })
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32", "rms_norm_eps": 1e-06}))
    (d / "tokenizer.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"old weights")
    return d


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def script() -> list[str]:
    """The installed console script, else the same entry point through the interpreter."""
    exe = Path(sys.executable).with_name("qlora-rs")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from qlora_rs.cli import main; sys.exit(main())"]


def test_console_script_converts_and_reports_errors_in_one_line(model, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    r = subprocess.run(script() + ["convert", str(model)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    dst = tmp_path / "model-nf4"
    assert f"-> {dst}" in r.stdout
    assert "3 quantized (nf4, block 64, double quant), 2 kept" in r.stdout
    assert "bits/param" in r.stdout and "GB/s" in r.stdout
    assert "copied     tokenizer.json" in r.stdout and "left out   pytorch_model.bin" in r.stdout
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and cfg["dtype"] == "float32"
    assert '"rms_norm_eps": 1e-06' in (dst / "config.json").read_text()

    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # SRC untouched

    rc, out, err = run(capsys, "convert", model)
    assert rc == 1 and out == ""
    assert err == f"qlora-rs convert: error: {dst}: already exists; pass --force (force=True) to replace it\n"


def test_dry_run_prints_plan_and_writes_nothing(model, capsys):
    rc, out, err = run(capsys, "convert", model, "--dry-run", "--exclude", "*.layers.10.*")
    assert rc == 0, err
    lines = out.splitlines()
    # Natural order: layers.2 before layers.10.
    names = [line.split()[0] for line in lines[2:7]]
    assert names.index("model.layers.2.mlp.up_proj.weight") < names.index("model.layers.10.mlp.up_proj.weight")
    row = next(line for line in lines if line.startswith("model.layers.10."))
    assert "keep" in row and "--exclude *.layers.10.*" in row
    row = next(line for line in lines if line.startswith("model.layers.0."))
    assert "quantize" in row and "linear weight" in row and "24.58 kB" in row
    assert "plan       2 tensors quantized" in out and "(estimate)" in out
    assert "llm_int8_skip_modules" in out
    assert not (model.parent / "model-nf4").exists()


def test_options_reach_the_output(model, tmp_path, capsys):
    dst = tmp_path / "fp4"
    rc, out, err = run(capsys, "convert", model, "-o", dst, "--quant-type", "fp4", "--blocksize", "128",
                       "--no-double-quant", "--compute-dtype", "float16", "--threads", "1", "--no-sync")
    assert rc == 0, err
    records = {r.name: r for r in qlora_rs.io.convert.inspect_checkpoint(dst)}
    r = records["model.layers.0.mlp.up_proj.weight"]
    assert (r.quant_type, r.blocksize, r.double_quant, r.stored_dtype) == ("fp4", 128, False, "U8")
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"], q["bnb_4bit_compute_dtype"]) == (
        "fp4", False, "float16")


def test_inspect_table_and_compare(model, tmp_path, capsys):
    dst = tmp_path / "out"
    assert run(capsys, "convert", model, "-o", dst)[0] == 0
    rc, out, err = run(capsys, "inspect", dst)
    assert rc == 0, err
    lines = out.splitlines()
    header, rule = lines[0], lines[1]
    assert header.split() == ["tensor", "shape", "stored", "dtype", "quant", "block", "bits/param"]
    assert len(rule) == len(header.rstrip()) and set(rule) == {"-", " "}
    # Every row lines up with the header: the bits/param column ends where its title ends.
    end = header.index("bits/param") + len("bits/param")
    rows = lines[2:7]
    assert all(len(r) == end for r in rows)
    q = next(r for r in rows if r.startswith("model.layers.0."))
    assert q.split()[1:] == ["[96,", "64]", "U8", "float32", "nf4+dq", "64", "5.762"]
    assert "tensors    5 (3 4-bit, 2 other)" in out

    rc, out, err = run(capsys, "inspect", dst, "--compare", model)
    assert rc == 0, err
    assert out.splitlines()[0].split()[-3:] == ["dB", "max|err|", "cosine"]
    q = next(r for r in out.splitlines() if r.startswith("model.layers.0."))
    sqnr, max_abs, cosine = (float(x) for x in q.split()[-3:])
    assert 17 < sqnr < 23 and 0 < max_abs < 1 and 0.99 < cosine < 1
    assert "identical" in next(r for r in out.splitlines() if r.startswith("model.norm."))
    assert "fidelity   SQNR" in out and "worst" in out

    rc, out, err = run(capsys, "inspect", dst, "--compare", model, "--summary")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "lowest SQNR:" and lines[1].split()[0] == "tensor"
    shown = [r for r in lines[3:] if r.startswith("model.")]
    assert len(shown) == 3  # the three 4-bit weights (at most five are listed), lowest SQNR first
    sqnrs = [float(r.split()[-3]) for r in shown]
    assert sqnrs == sorted(sqnrs) and "model.norm.weight" not in out and "fidelity   SQNR" in out

    rc, out, err = run(capsys, "inspect", dst, "--compare", model, "--json")
    data = {d["name"]: d for d in json.loads(out)}
    assert data["model.layers.0.mlp.up_proj.weight"]["status"] == "quantized"
    assert 17 < data["model.layers.0.mlp.up_proj.weight"]["sqnr_db"] < 23


def test_inspect_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\0\0\0\0\0\0\0{")
    rc, out, err = run(capsys, "inspect", bad)
    assert rc == 1 and err.count("\n") == 1 and "goes beyond the end" in err


def test_progress_bar_renders_on_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar("converting", stream=stream, enabled=True)
    bar(50_000_000, 100_000_000, 3, 10, "x")
    bar.close()
    text = stream.getvalue()
    assert "converting [" in text and " 50.0% " in text and "B/s" in text and "ETA" in text and "3/10 tensors" in text
    quiet = io.StringIO()
    ProgressBar("converting", stream=quiet)(1, 2, 1, 2, "x")  # a StringIO is not a TTY
    assert quiet.getvalue() == ""


def test_subcommands_from_cli_modules_are_registered(monkeypatch, capsys):
    mod = types.ModuleType("qlora_rs.cli.hello")

    def add_parser(sub):
        p = sub.add_parser("hello", help="say hello")
        p.set_defaults(func=lambda args: 7)

    mod.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "qlora_rs.cli.hello", mod)
    monkeypatch.setattr(cli.app, "_plugin_modules", lambda: ["qlora_rs.cli.hello", "qlora_rs.cli.broken_xyz"])
    assert main(["hello"]) == 7
    # A plug-in that fails to import does not break the others; running it says why.
    assert main(["broken-xyz", "args"]) == 1
    assert "cannot load qlora_rs.cli.broken_xyz: No module named" in capsys.readouterr().err


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import qlora_rs, qlora_rs.cli as cli
    src, interrupted, killed = sys.argv[1:]
    # Ctrl-C during a conversion: the CLI stops, cleans up and exits with 130. Python's handler is
    # installed first, as in a terminal: a test run started as a background job (`... &` in a
    # script) inherits SIGINT ignored, and Ctrl-C would then do nothing (seen: rc 0).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli.ProgressBar.__call__ = lambda self, *a: os.kill(os.getpid(), signal.SIGINT)
    print("rc", cli.main(["convert", src, "-o", interrupted]), flush=True)
    # kill -9 during a conversion: nothing can clean up.
    qlora_rs.convert_checkpoint(src, killed, progress=lambda *a: os.kill(os.getpid(), signal.SIGKILL))
    """
)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_interrupt_and_kill_leave_no_finished_output(model, tmp_path, capsys):
    interrupted, dst = tmp_path / "interrupted", tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(interrupted), str(dst)],
                       capture_output=True, text=True, timeout=300)
    assert "rc 130" in r.stdout, r.stderr
    assert r.stderr == "qlora-rs convert: interrupted; no output was written\n"
    assert not interrupted.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".interrupted.")] == []

    assert r.returncode == -signal.SIGKILL
    assert not dst.exists()
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert left.name.startswith(".out.tmp-")  # hidden, and named as unfinished
    partial = left / "model.safetensors"
    assert not partial.exists() or partial.read_bytes()[:8] == b"\0" * 8  # never a readable file
    # The next conversion removes the leftover of the dead process.
    assert run(capsys, "convert", model, "-o", dst)[0] == 0
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
