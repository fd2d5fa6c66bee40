"""Training data: JSONL files, one example per line, in one of three shapes:

- ``{"prompt": ..., "response": ...}``: the loss is on the response tokens only;
- ``{"text": ...}``: the loss is on every token;
- ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}``: rendered with
  the tokenizer's chat template when it has one (otherwise as ``role: content`` lines); the loss is
  on the assistant turns only.

Other keys on a line are ignored (ids, sources). A line that is not one of these (bad JSON,
missing or non-string fields, an empty response) raises :class:`~qlora_rs.FormatError` naming
the file and line, or with ``skip_bad_lines=True`` is skipped and counted. Blank lines are ignored.

Token sequences are ``[bos] + tokens + [eos]`` when the tokenizer has those tokens; sequences
longer than ``max_seq_len`` are cut at the end, and examples with no loss token left are dropped
(and counted).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from ..errors import FormatError, InvalidArgumentError

__all__ = [
    "IGNORE_INDEX", "Example", "DataReport", "Dataset", "read_records", "record_kind", "tokenize_record",
    "load_dataset", "load_pairs", "collate",
]

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
_BAD_SHOWN = 5


@dataclass
class Example:
    """One tokenized example; ``labels`` is ``IGNORE_INDEX`` where there is no loss."""

    input_ids: list[int]
    labels: list[int]
    line: int

    @property
    def loss_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class DataReport:
    """What reading a file found: lines read, examples kept, bad lines skipped (with why),
    examples cut to ``max_seq_len`` and examples dropped for having no loss token left."""

    path: str
    lines: int = 0
    examples: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0
    empty: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{self.examples} examples from {self.lines} lines of {self.path}"]
        if self.kinds:
            parts.append("(" + ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items())) + ")")
        if self.bad:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.bad[:_BAD_SHOWN])
            more = f"; ... {len(self.bad) - _BAD_SHOWN} more" if len(self.bad) > _BAD_SHOWN else ""
            parts.append(f"skipped {len(self.bad)} bad lines ({shown}{more})")
        if self.truncated:
            parts.append(f"{self.truncated} cut to max_seq_len")
        if self.empty:
            parts.append(f"{self.empty} dropped with no loss token left")
        return ", ".join(parts)


@dataclass
class Dataset:
    """Tokenized examples and the report of how they were read."""

    examples: list[Example]
    report: DataReport

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class _BadRecord(Exception):
    pass


def record_kind(record: Any) -> str:
    """``"prompt_response"``, ``"text"`` or ``"messages"``; raises ``_BadRecord`` saying what is wrong."""
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _BadRecord("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _BadRecord(f"messages[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise _BadRecord(f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise _BadRecord("'messages' has no non-empty assistant turn to learn from")
        return "messages"
    if "prompt" in record or "response" in record:
        if "text" in record:
            raise _BadRecord("has both 'text' and 'prompt'/'response'; use one shape per line")
        for key in ("prompt", "response"):
            if key not in record:
                raise _BadRecord(f"has {'prompt' if key == 'response' else 'response'!r} but no {key!r}")
            if not isinstance(record[key], str):
                raise _BadRecord(f"{key!r} must be a string, got {type(record[key]).__name__}")
        if not record["response"]:
            raise _BadRecord("'response' is empty")
        return "prompt_response"
    if "text" in record:
        if not isinstance(record["text"], str):
            raise _BadRecord(f"'text' must be a string, got {type(record['text']).__name__}")
        if not record["text"].strip():
            raise _BadRecord("'text' is empty")
        return "text"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise _BadRecord(f'expected {{"prompt", "response"}}, {{"text"}} or {{"messages"}}; found keys: {keys}')


def read_records(
    path: Union[str, os.PathLike], *, skip_bad_lines: bool = False, report: Optional[DataReport] = None
) -> list[tuple[int, dict, str]]:
    """The valid records of a JSONL file as ``(line number, record, kind)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    report = report if report is not None else DataReport(str(path))
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            report.lines = n
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad(path, n, f"not UTF-8 ({e.reason} at byte {e.start})", skip_bad_lines, report)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                kind = record_kind(record)
            except json.JSONDecodeError as e:
                _bad(path, n, f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})", skip_bad_lines, report)
                continue
            except _BadRecord as e:
                _bad(path, n, str(e), skip_bad_lines, report)
                continue
            out.append((n, record, kind))
    return out


def _bad(path: Path, line: int, why: str, skip: bool, report: DataReport) -> None:
    if not skip:
        raise FormatError(f"{path}:{line}: {why} (pass --skip-bad-lines / skip_bad_lines=True to skip such lines)")
    report.bad.append((line, why))


# --------------------------------------------------------------------------------------------
# Tokenization


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if eos is not None else []


def _plain_chat(messages: Sequence[dict], eos: str, add_generation_prompt: bool) -> str:
    # Used only when the tokenizer has no chat template.
    text = "".join(f"{m['role']}: {m['content']}\n" + (eos if m["role"] == "assistant" else "") for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _render(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return _plain_chat(messages, tokenizer.eos_token or "", add_generation_prompt)


def _tokenize_messages(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Renders the conversation once; marks as labels the tokens that lie inside an assistant
    turn (the text a turn adds after the prompt for it). Uses character offsets, so the split
    does not depend on how the tokenizer would cut the pieces on their own."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise _BadRecord(
                "the chat template does not render the conversation as a growing prefix, so the assistant "
                "turns cannot be located; use prompt/response records"
            )
        spans.append((len(before), len(upto)))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        labels = [
            t if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE_INDEX
            for t, (a, b) in zip(ids, offsets)
        ]
    else:
        ids, labels, pos = [], [], 0
        for s, e in spans:
            head, body = _encode(tokenizer, full[pos:s]), _encode(tokenizer, full[s:e])
            ids += head + body
            labels += [IGNORE_INDEX] * len(head) + body
            pos = e
        tail = _encode(tokenizer, full[pos:])
        ids += tail
        labels += [IGNORE_INDEX] * len(tail)
    if not (getattr(tokenizer, "chat_template", None) and _starts_with_bos(tokenizer, ids)):
        bos = _bos(tokenizer)
        ids, labels = bos + ids, [IGNORE_INDEX] * len(bos) + labels
    return ids, labels


def _starts_with_bos(tokenizer: Any, ids: list[int]) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is None or (bool(ids) and ids[0] == bos)


def tokenize_record(record: dict, kind: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record (not yet cut to a maximum length)."""
    if kind == "prompt_response":
        prompt = _bos(tokenizer) + _encode(tokenizer, record["prompt"])
        response = _encode(tokenizer, record["response"]) + _eos(tokenizer)
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response
    if kind == "text":
        ids = _bos(tokenizer) + _encode(tokenizer, record["text"]) + _eos(tokenizer)
        return ids, list(ids)
    if kind == "messages":
        return _tokenize_messages(tokenizer, record["messages"])
    raise InvalidArgumentError(f"unknown record kind {kind!r}")


def load_dataset(
    path: Union[str, os.PathLike],
    tokenizer: Any,
    max_seq_len: int = 512,
    *,
    skip_bad_lines: bool = False,
) -> Dataset:
    """Reads and tokenizes a JSONL file (see the module docstring)."""
    if int(max_seq_len) < 2:
        raise InvalidArgumentError(f"max_seq_len must be at least 2, got {max_seq_len}")
    report = DataReport(str(path))
    examples = []
    for line, record, kind in read_records(path, skip_bad_lines=skip_bad_lines, report=report):
        try:
            ids, labels = tokenize_record(record, kind, tokenizer)
        except _BadRecord as e:
            _bad(Path(path), line, str(e), skip_bad_lines, report)
            continue
        except Exception as e:  # a chat template may raise anything (jinja2 TemplateError, ...)
            if kind != "messages":
                raise
            _bad(Path(path), line, f"the chat template failed: {type(e).__name__}: {e}", skip_bad_lines, report)
            continue
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            report.truncated += 1
        example = Example(ids, labels, line)
        if example.loss_tokens == 0:
            report.empty += 1
            continue
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        examples.append(example)
    report.examples = len(examples)
    if not examples:
        why = f" ({report})" if report.bad or report.empty else ""
        raise FormatError(f"{path}: no usable examples{why}")
    return Dataset(examples, report)


def load_pairs(path: Union[str, os.PathLike], *, skip_bad_lines: bool = False) -> tuple[list[tuple[str, str]], DataReport]:
    """``(prompt, response)`` text pairs for a contrastive objective: prompt/response records, and
    conversations (their first user turn with the assistant turn after it)."""
    report = DataReport(str(path))
    pairs = []
    for line, record, kind in read_records(path, skip_bad_lines=skip_bad_lines, report=report):
        if kind == "prompt_response":
            pairs.append((record["prompt"], record["response"]))
        elif kind == "messages":
            msgs = record["messages"]
            user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
            reply = next((m for m in msgs[(user or 0) + 1:] if m["role"] == "assistant"), None) if user is not None else None
            if reply is None:
                _bad(Path(path), line, "a pair needs a user turn followed by an assistant turn", skip_bad_lines, report)
                continue
            pairs.append((msgs[user]["content"], reply["content"]))
        else:
            _bad(Path(path), line, "a pair needs prompt/response (or messages), not text", skip_bad_lines, report)
            continue
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
    report.examples = len(pairs)
    if not pairs:
        raise FormatError(f"{path}: no usable prompt/response pairs ({report})")
    return pairs, report


def collate(examples: Iterable[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` on padding)."""
    examples = list(examples)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
