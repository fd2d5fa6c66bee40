"""JSONL training data: the three record shapes, loss masks, bad lines, truncation, batching."""

from __future__ import annotations

import json

import pytest
import torch

from _loading_helpers import CHAT_TEMPLATE, save_tokenizer
from qlora_rs.io.data import IGNORE_INDEX, collate, load_dataset, load_pairs
from qlora_rs.errors import FormatError

WORDS = "what is two plus three five write ten in words hello world the end yes no".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d, WORDS, 64)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat")
    save_tokenizer(d, WORDS, 64, chat_template=CHAT_TEMPLATE)
    return AutoTokenizer.from_pretrained(str(d))


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_response_loss_only_on_response(tmp_path, tokenizer):
    f = write(tmp_path / "d.jsonl", [{"prompt": "what is two plus three", "response": "five", "id": 7}])
    ex = load_dataset(f, tokenizer).examples[0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ex.input_ids == [bos] + ids(tokenizer, "what is two plus three") + ids(tokenizer, "five") + [eos]
    assert ex.labels == [IGNORE_INDEX] * 6 + ids(tokenizer, "five") + [eos]
    assert ex.line == 1 and ex.loss_tokens == 2


def test_text_records_learn_every_token(tmp_path, tokenizer):
    f = write(tmp_path / "d.jsonl", [{"text": "hello world"}, "", "   ", {"text": "the end"}])
    ds = load_dataset(f, tokenizer)
    assert [e.line for e in ds.examples] == [1, 4]
    assert ds.examples[0].labels == ds.examples[0].input_ids
    assert ds.report.kinds == {"text": 2} and ds.report.examples == 2


def test_messages_use_the_chat_template_and_mask_all_but_assistant(tmp_path, chat_tokenizer):
    msgs = [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "five"},
            {"role": "user", "content": "write ten in words"}, {"role": "assistant", "content": "ten"}]
    ex = load_dataset(write(tmp_path / "d.jsonl", [{"messages": msgs}]), chat_tokenizer).examples[0]
    rendered = chat_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert ex.input_ids[1:] == ids(chat_tokenizer, rendered)
    learned = [t for t in ex.labels if t != IGNORE_INDEX]
    eos = chat_tokenizer.eos_token_id
    # Each assistant turn: its content and the end token the template puts after it.
    assert learned == ids(chat_tokenizer, "five") + [eos] + ids(chat_tokenizer, "ten") + [eos]


def test_messages_without_a_template_render_plainly(tmp_path, tokenizer):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    ex = load_dataset(write(tmp_path / "d.jsonl", [{"messages": msgs}]), tokenizer).examples[0]
    learned = [t for t in ex.labels if t != IGNORE_INDEX]
    assert ids(tokenizer, "world")[0] in learned and ids(tokenizer, "hello")[0] not in learned


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "hello"}', "has 'prompt' but no 'response'"),
        ('{"prompt": "hello", "response": 3}', "'response' must be a string, got int"),
        ('{"prompt": "hello", "response": ""}', "'response' is empty"),
        ('{"question": "hello"}', 'expected {"prompt", "response"}, {"text"} or {"messages"}; found keys: question'),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "'messages' has no non-empty assistant turn"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0] has role 'robot'"),
        ('{"text": "a", "prompt": "b", "response": "c"}', "has both 'text' and 'prompt'/'response'"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, tokenizer, line, message):
    f = write(tmp_path / "bad.jsonl", [{"text": "hello"}, line, {"text": "world"}])
    with pytest.raises(FormatError) as e:
        load_dataset(f, tokenizer)
    assert str(e.value).startswith(f"{f}:2: {message}") and "--skip-bad-lines" in str(e.value)


def test_skip_bad_lines_counts_them(tmp_path, tokenizer):
    f = write(tmp_path / "bad.jsonl", [{"text": "hello"}, "{oops", {"prompt": 1}, {"text": "world"}])
    ds = load_dataset(f, tokenizer, skip_bad_lines=True)
    assert [e.line for e in ds.examples] == [1, 4]
    assert [n for n, _ in ds.report.bad] == [2, 3]
    assert "skipped 2 bad lines (line 2: not valid JSON" in str(ds.report)


def test_invalid_utf8_is_a_bad_line(tmp_path, tokenizer):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b'{"text": "hello"}\n{"text": "\xff"}\n')
    with pytest.raises(FormatError, match=r"bin.jsonl:2: not UTF-8"):
        load_dataset(f, tokenizer)


def test_truncation_and_examples_without_loss_tokens(tmp_path, tokenizer):
    long_prompt = " ".join(["hello"] * 10)
    f = write(tmp_path / "d.jsonl", [{"prompt": long_prompt, "response": "world"}, {"text": "hello world the end"}])
    ds = load_dataset(f, tokenizer, max_seq_len=5)
    assert len(ds) == 1 and ds.report.empty == 1 and ds.report.truncated == 2
    assert len(ds.examples[0].input_ids) == 5
    with pytest.raises(FormatError, match="no usable examples"):
        load_dataset(write(tmp_path / "e.jsonl", [{"prompt": long_prompt, "response": "world"}]), tokenizer, max_seq_len=5)


def test_collate_pads_right_and_masks_padding(tmp_path, tokenizer):
    f = write(tmp_path / "d.jsonl", [{"text": "hello"}, {"text": "hello world the end"}])
    batch = collate(load_dataset(f, tokenizer).examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 6)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert (batch["labels"][0, 3:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, 3:] == tokenizer.pad_token_id).all()
    assert batch["input_ids"].dtype == torch.long


def test_pairs_for_the_contrastive_task(tmp_path):
    f = write(tmp_path / "p.jsonl", [
        {"prompt": "a", "response": "b"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "r"}]},
    ])
    pairs, report = load_pairs(f)
    assert pairs == [("a", "b"), ("q", "r")] and report.examples == 2
    with pytest.raises(FormatError, match=r"t.jsonl:1: a pair needs prompt/response"):
        load_pairs(write(tmp_path / "t.jsonl", [{"text": "x"}]))


def test_builtin_dataset_matches_its_generator():
    from qlora_rs.training import datasets

    lines = datasets.path().read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert records == datasets.generate()
    assert 300 <= len(records) <= 500
    assert {r["task"] for r in records} == {"arithmetic", "units", "capitals", "number_words", "spelling", "opposites"}
    for r in records:
        if r["task"] == "arithmetic":
            a, op, b = r["prompt"].removeprefix("What is ").removesuffix("?").split()
            assert int(r["response"]) == {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
    assert datasets.number_words(347) == "three hundred forty-seven" and datasets.number_words(40) == "forty"
    train, held = datasets.split(records)
    assert len(held) == pytest.approx(0.2 * len(records), abs=6) and not {id(r) for r in train} & {id(r) for r in held}
