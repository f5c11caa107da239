"""Write the data of PINE's evidence (``docs/pine-evidence.md``) under ``data/pine/``: seeded, offline.

- ``judge.jsonl``: a judge picks the correct one of two responses to a factual question (two-digit
  arithmetic, capitals from the table below). The segments are ``"Response A: ..."`` and
  ``"Response B: ..."``; ``choices`` are ``[" A", " B"]``, each the label *inside* its segment, so
  the label moves with its response when the ``segments`` task reorders them. ``answer`` is the
  correct response's index, drawn at random.
- ``judge_answers.jsonl``: the same items, scored by content instead of by label: the suffix asks
  for the correct answer and ``choices`` are the two responses' answers (``[" 42", " 52"]``,
  ``[" Kyiv", " Amsterdam"]``), so a model that always says "A" cannot look consistent.
- ``kv_k{5,10,20}.jsonl``: key-value retrieval (RULER / lost-in-the-middle style): k records
  ``"Record: <key> = <5-digit number>"`` with distinct keys (common nouns) and numbers; the question
  asks for one key's number; ``answer`` is that record and ``choices`` are the records' numbers.
  The ``segments`` task moves the gold record through the positions (``mode: generate``).

    python scripts/pine_data.py            # data/pine/judge.jsonl, data/pine/kv_k5.jsonl, ...
    python scripts/pine_data.py --out DIR --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Ireland": "Dublin",
    "the United Kingdom": "London", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Czechia": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "India": "New Delhi",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "the Philippines": "Manila", "Australia": "Canberra",
    "New Zealand": "Wellington", "Canada": "Ottawa", "the United States": "Washington", "Mexico": "Mexico City",
    "Cuba": "Havana", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Kenya": "Nairobi", "Ethiopia": "Addis Ababa", "Nigeria": "Abuja",
    "Ghana": "Accra", "Morocco": "Rabat", "Algeria": "Algiers", "Ukraine": "Kyiv", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Iceland": "Reykjavik", "Nepal": "Kathmandu", "Afghanistan": "Kabul",
}  # fmt: skip
"""60 countries and their capitals, written by hand."""

KEYS = """apple anchor badge basket beacon blanket bottle bridge bucket button cabin camera candle canvas carpet
castle cedar chain chimney circle cloud comet copper cotton crystal curtain dagger desert dolphin dragon engine
falcon feather fiddle forest fossil garden garlic glacier goblet granite harbor helmet hammer island jacket jungle
kettle ladder lantern lemon lizard magnet maple marble meadow mirror monkey needle oyster paddle parrot pebble
pepper pillow pirate planet pocket puzzle rabbit ribbon river rocket saddle salmon shadow shovel silver spider
sponge statue stone summer sunset tablet teapot temple ticket tiger tomato tower trumpet tunnel turtle velvet
violin wagon walnut window winter wizard yogurt zipper""".split()
"""Common nouns, the records' keys (written by hand)."""

JUDGE_PREFIX = "Two responses answer the question below. Exactly one of them is correct.\n\nQuestion: {question}\n\n"
JUDGE_SUFFIX = "\nWhich response is correct, A or B?\nAnswer:"
ANSWER_SUFFIX = "\nWhich response is correct?\nThe correct answer is"
KV_PREFIX = "Below is a list of records. Each record pairs a key with a number.\n\n"
KV_SUFFIX = '\nQuestion: What is the number of the record with the key "{key}"?\nAnswer: {key} ='


def arithmetic(rng: random.Random) -> tuple[str, str, str, str, str]:
    """(question, correct response, wrong response, correct answer, wrong answer) for two-digit
    addition or subtraction."""
    a, b = rng.randint(11, 89), rng.randint(11, 89)
    if rng.random() < 0.5:
        op, value = "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        op, value = "-", a - b
    wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}.", f"{a} {op} {b} = {wrong}.", str(value), str(wrong)


def capital(country: str, rng: random.Random) -> tuple[str, str, str, str, str]:
    other = rng.choice([c for k, c in CAPITALS.items() if k != country])
    return (
        f"What is the capital of {country}?",
        f"The capital of {country} is {CAPITALS[country]}.",
        f"The capital of {country} is {other}.",
        CAPITALS[country],
        other,
    )


def judge_items(rng: random.Random, arithmetic_count: int) -> tuple[list[dict], list[dict]]:
    """The judge items scored by label, and the same items scored by the responses' answers."""
    facts = [("capital", *capital(country, rng)) for country in CAPITALS]
    facts += [("arithmetic", *arithmetic(rng)) for _ in range(arithmetic_count)]
    rng.shuffle(facts)
    by_label, by_answer = [], []
    for number, (category, question, right, wrong, right_answer, wrong_answer) in enumerate(facts):
        answer = rng.randrange(2)
        texts = [right, wrong] if answer == 0 else [wrong, right]
        answers = [right_answer, wrong_answer] if answer == 0 else [wrong_answer, right_answer]
        item = {
            "id": f"judge-{number:03d}",
            "category": category,
            "prefix": JUDGE_PREFIX.format(question=question),
            "segments": [f"Response {label}: {text}" for label, text in zip("AB", texts)],
            "suffix": JUDGE_SUFFIX,
            "answer": answer,
            "choices": [" A", " B"],
        }
        by_label.append(item)
        by_answer.append({**item, "suffix": ANSWER_SUFFIX, "choices": [f" {a}" for a in answers]})
    return by_label, by_answer


def kv_items(rng: random.Random, k: int, count: int) -> list[dict]:
    items = []
    for number in range(count):
        keys = rng.sample(KEYS, k)
        values = [str(v) for v in rng.sample(range(10000, 100000), k)]
        gold = rng.randrange(k)
        items.append(
            {
                "id": f"kv{k}-{number:03d}",
                "prefix": KV_PREFIX,
                "segments": [f"Record: {key} = {value}" for key, value in zip(keys, values)],
                "suffix": KV_SUFFIX.format(key=keys[gold]),
                "answer": gold,
                "choices": values,
            }
        )
    return items


def write(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    print(f"{path}: {len(items)} items, {path.stat().st_size // 1024} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/pine"), help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-arithmetic", type=int, default=140, help="arithmetic items (capitals: 60)")
    parser.add_argument("--kv-items", type=int, default=50, help="items per number of records")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    by_label, by_answer = judge_items(random.Random(f"{args.seed}:judge"), args.judge_arithmetic)
    write(args.out / "judge.jsonl", by_label)
    write(args.out / "judge_answers.jsonl", by_answer)
    for k in (5, 10, 20):
        write(args.out / f"kv_k{k}.jsonl", kv_items(random.Random(f"{args.seed}:kv{k}"), k, args.kv_items))


if __name__ == "__main__":
    main()
