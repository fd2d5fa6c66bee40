"""The command line's mistakes, each with its message and nothing written: a mistyped MODEL_DIR
(fails before anything loads or reaches the network, names the closest directory), a missing data
file, an OUT_DIR that holds something else (refused unless --force), a start that fails (bad JSON:
no output directory left behind); and every subcommand's --help says each default once."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from _loading_helpers import make_tiny_llama
from qlora_rs.cli import build_parser, main

WORDS = "the cat sat on mat".split()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_tiny_llama(d / "smol-nf4", words=WORDS, seed=0)
    (d / "data.jsonl").write_text("".join(json.dumps({"text": "the cat sat on the mat"}) + "\n" for _ in range(4)))
    return d


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the model hub fails the test (the hub is not reachable here anyway;
    this makes the attempt itself visible)."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args} {kwargs}")

    for name in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
        monkeypatch.setattr(f"huggingface_hub.file_download.{name}", refuse, raising=False)
        monkeypatch.setattr(f"transformers.utils.hub.{name}", refuse, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _entries(d):
    return sorted(p.name for p in d.iterdir())


def test_mistyped_model_dir_is_named_with_the_closest_one(work, offline, capsys, monkeypatch):
    monkeypatch.chdir(work)
    before = _entries(work)
    assert main(["train", "smol-nf5", "data.jsonl", "-o", "run"]) == 1
    err = capsys.readouterr().err
    assert "MODEL_DIR smol-nf5: no such directory; did you mean smol-nf4?" in err
    assert _entries(work) == before  # no "run"
    # A missing parent: the nearest existing directory is named instead.
    assert main(["train", str(work / "models" / "smol"), "data.jsonl", "-o", "run"]) == 1
    assert f"the nearest existing directory is {work}" in capsys.readouterr().err
    assert main(["train", "data.jsonl", "data.jsonl", "-o", "run"]) == 1
    assert "MODEL_DIR data.jsonl is a file" in capsys.readouterr().err
    assert main(["train", ".", "data.jsonl", "-o", "run"]) == 1
    assert "MODEL_DIR . has no config.json" in capsys.readouterr().err
    assert _entries(work) == before


def test_missing_data_file(work, offline, capsys, monkeypatch):
    monkeypatch.chdir(work)
    before = _entries(work)
    assert main(["train", "smol-nf4", "dta.jsonl", "-o", "run"]) == 1
    assert "DATA.jsonl dta.jsonl: no such file; did you mean data.jsonl?" in capsys.readouterr().err
    assert main(["train", "smol-nf4", "data.jsonl", "--eval-file", "nothing.jsonl", "-o", "run"]) == 1
    assert "--eval-file nothing.jsonl: no such file" in capsys.readouterr().err
    assert _entries(work) == before


def test_non_empty_out_dir_is_refused_unless_force(work, offline, capsys, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8")
    run = ["train", str(work / "smol-nf4"), str(work / "data.jsonl"), "-o", str(out)]
    opts = ["-r", "2", "--batch-size", "2", "--grad-accum", "1", "--no-plot", "--no-progress"]
    assert main(run + opts + ["--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert f"OUT_DIR {out} is not empty (cat.jpg, ...) and holds no qlora-rs run" in err and "--force" in err
    assert _entries(out) == ["cat.jpg"]
    assert main(run + opts + ["--max-steps", "1", "--force"]) == 0
    capsys.readouterr()
    assert (out / "cat.jpg").read_bytes() == b"\xff\xd8"
    assert (out / "adapter_model.safetensors").is_file() and (out / "train_config.json").is_file()
    # Now it holds a run of ours: continuing it needs --resume, not --force.
    assert main(run + opts + ["--max-steps", "2", "--resume"]) == 0
    assert "resume     from" in capsys.readouterr().out


def test_failed_start_leaves_no_directory(work, offline, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"text": "the mat\n')
    out = tmp_path / "new" / "run"
    assert main(["train", str(work / "smol-nf4"), str(bad), "-o", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"bad\.jsonl:2: not valid JSON \(Invalid control character at column 18\)", err), err
    assert " at at " not in err
    assert not (tmp_path / "new").exists()
    # An existing empty OUT_DIR is kept as it was.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(work / "smol-nf4"), str(bad), "-o", str(empty), "--no-progress"]) == 1
    capsys.readouterr()
    assert empty.is_dir() and _entries(empty) == []


def test_run_that_fails_before_its_first_checkpoint_leaves_no_directory(work, tmp_path):
    import io

    from qlora_rs.training.train import TrainConfig, train

    def fail(step, record):
        raise RuntimeError(f"stopped at step {step}")

    out = tmp_path / "a" / "run"
    config = TrainConfig(model=str(work / "smol-nf4"), data=str(work / "data.jsonl"), output_dir=str(out), r=2,
                         batch_size=2, grad_accum=1, max_steps=2, progress=False, plot=False)
    with pytest.raises(RuntimeError, match="stopped at step 1"):
        train(config, callbacks=[fail], out=io.StringIO())
    assert not (tmp_path / "a").exists()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_help_says_each_default_once():
    parser = build_parser("train")  # all subcommands, plug-ins included
    commands = _subparsers(parser)
    assert {"convert", "inspect", "train", "merge"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "at at" not in text
        for bogus in ("(default: None)", "(default: True)", "(default: False)", "(default: [])"):
            assert bogus not in text, f"qlora-rs {name} --help shows {bogus}"
        for action in sub._actions:
            if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
                continue
            shown = sub._get_formatter()._expand_help(action)
            flag = f"qlora-rs {name} {'/'.join(action.option_strings) or action.dest}"
            assert len(re.findall(r"\bdefault\b", shown)) <= 1, f"{flag}: default said twice: {shown!r}"
            if isinstance(action, argparse._StoreFalseAction):
                # A --no-X switch says what happens without it (or its --X partner says it is the default).
                said = [sub._get_formatter()._expand_help(a) for a in sub._actions
                        if a.dest == action.dest and a.help not in (None, argparse.SUPPRESS)]
                assert any(re.search(r"without it|instead of|\bdefault\b", h) for h in said), f"{flag}: {shown!r}"
            elif action.option_strings and not action.required and action.default not in (None, False, [], True) \
                    and not isinstance(action, argparse._StoreTrueAction):
                # An option with a value that applies when it is left out says which.
                assert "default" in shown, f"{flag} has default {action.default!r} but its help does not say so"
