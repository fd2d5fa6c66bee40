"""The built-in dataset: a few hundred short prompt/response pairs written for qlora-rs from
templates (arithmetic, unit conversions, capitals, number words, spelling, opposites), so the
README's main job runs without downloading anything.

``qlora_rs_basics.jsonl`` (in this directory) is what :func:`generate` returns, one JSON object
per line with ``prompt``, ``response`` and ``task``; every answer is computed or is a fact that
does not change. Regenerate it with ``python -m qlora_rs.training.datasets``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["BASICS", "path", "generate", "split"]

BASICS = "qlora_rs_basics.jsonl"

_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Argentina", "Buenos Aires"), ("Russia", "Moscow"), ("India", "New Delhi"), ("Kenya", "Nairobi"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
    ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Cuba", "Havana"), ("New Zealand", "Wellington"),
    ("the Philippines", "Manila"), ("Pakistan", "Islamabad"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Iceland", "Reykjavik"),
    ("Venezuela", "Caracas"), ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Mexico", "Mexico City"),
]
_CAPITAL_PROMPTS = ["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"]

_UNITS = [  # (big unit, small unit, factor)
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
    ("weeks", "days", 7), ("liters", "milliliters", 1000), ("years", "months", 12), ("feet", "inches", 12),
    ("dozens", "items", 12),
]

_OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("early", "late"), ("light", "dark"),
    ("open", "closed"), ("full", "empty"), ("happy", "sad"), ("young", "old"), ("wet", "dry"), ("hard", "soft"),
    ("strong", "weak"), ("rich", "poor"), ("loud", "quiet"), ("near", "far"), ("thick", "thin"), ("high", "low"),
    ("clean", "dirty"), ("inside", "outside"), ("win", "lose"), ("buy", "sell"), ("push", "pull"),
    ("begin", "end"), ("day", "night"), ("north", "south"), ("east", "west"), ("left", "right"),
    ("heavy", "light"), ("true", "false"),
]

_WORDS = [
    "planet", "garden", "window", "rocket", "silver", "forest", "castle", "bridge", "number", "yellow", "orange",
    "pencil", "dragon", "market", "winter", "summer", "butter", "candle", "guitar", "jacket", "ladder", "mirror",
    "pepper", "rabbit", "sunset", "tunnel", "violet", "wizard", "anchor", "basket", "cactus", "donkey", "engine",
    "falcon", "harbor", "island", "jungle", "kettle", "lemon", "meadow",
]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English words of 0 <= n < 1000, e.g. 347 -> "three hundred forty-seven"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def generate(seed: int = 2023) -> list[dict]:
    """The dataset's records, in a fixed shuffled order."""
    rng = random.Random(seed)
    out: list[dict] = []

    def add(task: str, prompt: str, response: str) -> None:
        out.append({"prompt": prompt, "response": response, "task": task})

    for _ in range(100):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["plus", "minus", "times"])
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        if op == "minus" and b > a:
            a, b = b, a
        value = a + b if op == "plus" else a - b if op == "minus" else a * b
        add("arithmetic", f"What is {a} {op} {b}?", str(value))
    for big, small, factor in _UNITS:
        for k in rng.sample(range(2, 10), 4):
            add("units", f"How many {small} are in {k} {big}?", f"{k * factor} {small}")
    for country, capital in _CAPITALS:
        add("capitals", rng.choice(_CAPITAL_PROMPTS).format(country), capital)
    for n in rng.sample(range(21, 1000), 80):
        add("number_words", f"Write the number {n} in words.", number_words(n))
    for word in _WORDS:
        kind = rng.choice(["reverse", "upper", "letters"])
        if kind == "reverse":
            add("spelling", f"Spell the word '{word}' backwards.", word[::-1])
        elif kind == "upper":
            add("spelling", f"Write '{word}' in capital letters.", word.upper())
        else:
            add("spelling", f"How many letters are in the word '{word}'?", str(len(word)))
    for a, b in _OPPOSITES:
        add("opposites", f"What is the opposite of '{a}'?", b)
    rng.shuffle(out)
    return out


def path() -> Path:
    """The JSONL file of the built-in dataset."""
    return Path(__file__).with_name(BASICS)


def split(records: list[dict], eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A held-out split that keeps every task's share: ``(train, eval)``."""
    rng = random.Random(seed)
    train, held = [], []
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r.get("task", ""), []).append(r)
    for task in sorted(by_task):
        items = list(by_task[task])
        rng.shuffle(items)
        k = max(1, round(len(items) * eval_fraction))
        held += items[:k]
        train += items[k:]
    return train, held


def write(dst: Path) -> None:
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate()), encoding="utf-8")
