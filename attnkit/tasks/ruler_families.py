"""RULER's synthetic task families (Hsieh et al. 2024, github.com/NVIDIA/RULER), generated offline.

Each family turns a seed and a haystack size (``units``: sentences, essay words, list items or
coded words, as RULER counts them) into a :class:`Sample`: the user message, the answer prefix
RULER puts after the model's own turn marker, and the reference strings a reply must contain.
The same seed always gives the same needles, keys and chains whatever ``units`` is (content and
placement draw from separate seeded generators), so :mod:`attnkit.tasks.ruler` can grow the
haystack until the prompt reaches its token length without changing what is asked.

Templates, needles, key and value types and the family table follow RULER's
``scripts/data/synthetic`` (``niah.py``, ``variable_tracking.py``, ``common_words_extraction.py``,
``freq_words_extraction.py``) and ``synthetic.yaml``. Word keys and the word lists come from the
``wonderwords`` package, as in RULER. The QA families need SQuAD/HotpotQA and are not included.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

from attnkit.tasks.haystack import PASSKEY_FILLER, sentence_boundaries
from attnkit.tasks.result import TaskDataError

__all__ = ["FAMILIES", "Family", "Niah", "Sample", "word_list"]

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)  # "assgined" is RULER's spelling; kept so prompts match RULER's
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"
VT_NOISE = PASSKEY_FILLER + "\n"
#: RULER's depths for needles placed at random: 40 points from 0% to 100%.
DEPTHS = [round(100 * i / 39) for i in range(40)]


@dataclass
class Sample:
    """One generated RULER input before tokenisation."""

    user: str
    """The user message (task template filled in)."""
    answer_prefix: str
    """Text RULER appends after the model's turn marker, so the reply continues it."""
    answers: list[str]
    """Reference strings; RULER's string_match_all scores the share found in the reply."""
    depth: float | None = None
    """Where the one needle sits (fraction of the haystack before it); None for several needles."""


@lru_cache(maxsize=4)
def word_list(name: str) -> tuple[str, ...]:
    """A ``wonderwords`` word list (``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``), as RULER reads it."""
    try:
        text = resources.files("wonderwords").joinpath("assets", name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise TaskDataError(
            "the ruler task needs the `wonderwords` package (RULER's word lists); install it: pip install wonderwords"
        ) from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


# ----------------------------------------------------------------------------- needle families


@dataclass(frozen=True)
class Niah:
    """One needle-in-a-haystack variant: haystack, key and value types, and needle counts."""

    haystack: Literal["noise", "essay", "needle"]
    key: Literal["words", "numbers", "uuids"] = "words"
    value: Literal["numbers", "uuids"] = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1

    @property
    def single(self) -> bool:
        """One needle in the haystack (distractor needles aside): its depth is chosen, not drawn."""
        return self.keys * self.values == 1


def random_item(kind: str, rng: random.Random) -> str:
    """A key or value as RULER draws it: an adjective-noun pair, a 7-digit number or a UUID."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(word_list('adjectivelist.txt'))}-{rng.choice(word_list('nounlist.txt'))}"


def niah_sample(spec: Niah, seed: str, units: int, depth: float | None, essay_words: list[str]) -> Sample:
    """A RULER needle prompt with ``units`` haystack units (sentences, or essay words for ``essay``)."""
    rng = random.Random(seed)
    keys, values, needles = [], [], []
    for _ in range(max(spec.keys, spec.queries)):
        keys.append(random_item(spec.key, rng))
        values.append([random_item(spec.value, rng) for _ in range(spec.values)])
        needles += [NEEDLE.format(type_needle_v=spec.value, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    chosen = rng.sample(range(len(keys)), spec.queries)
    queries, answers = [keys[i] for i in chosen], [v for i in chosen for v in values[i]]
    place = random.Random(f"{seed}/place")
    depth = depth if spec.single else None
    context = (
        essay_context(essay_words, units, needles, depth, place)
        if spec.haystack == "essay"
        else sentence_context(spec, units, needles, depth, place)
    )
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, answer, kind = NIAH_TEMPLATE, NIAH_ANSWER, spec.value
    if spec.queries * spec.values == 1:  # RULER's singular wording
        template, answer, kind = singular(template), singular(answer), kind[:-1]
    return Sample(
        user=template.format(type_needle_v=kind, context=context, query=query),
        answer_prefix=answer.format(type_needle_v=kind, query=query),
        answers=answers,
        depth=depth,
    )


def singular(text: str) -> str:
    """RULER's rewording of the needle template for one expected value."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def essay_context(words: list[str], units: int, needles: list[str], depth: float | None, rng: random.Random) -> str:
    """The first ``units`` essay words (repeated if short), needles between sentences at their depths."""
    if not words:
        raise TaskDataError("the essay haystack is empty; give a text file with some prose (task.haystack)")
    text = " ".join(words[i % len(words)] for i in range(units)).strip()
    cuts = sentence_boundaries(text)
    sentences = [text[a:b].strip() for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]
    fractions = [depth] if depth is not None else [d / 100 for d in rng.sample(DEPTHS, len(needles))]
    positions = [0, *sorted(int(len(sentences) * f) for f in fractions), len(sentences)]
    parts = []
    for i in range(1, len(positions)):
        parts.append(" ".join(sentences[positions[i - 1] : positions[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(p for p in parts if p)


def sentence_context(spec: Niah, units: int, needles: list[str], depth: float | None, rng: random.Random) -> str:
    """``units`` noise sentences (or distractor needles), one per line, the needles inserted among them."""
    if spec.haystack == "noise":
        sentences = [PASSKEY_FILLER] * units
    else:
        sentences = [
            NEEDLE.format(type_needle_v=spec.value, key=random_item(spec.key, rng), value=random_item(spec.value, rng))
            for _ in range(units)
        ]
    if depth is not None:
        indexes = [round(depth * units)]
    else:
        indexes = sorted(rng.sample(range(max(units, len(needles))), len(needles)), reverse=True)
    for index, needle in zip(indexes, needles):
        sentences.insert(index, needle)
    return "\n".join(sentences)


# ----------------------------------------------------------------------------- variable tracking


def vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str]]:
    """(variable names, assignment statements) of one chain: a 5-digit value passed down ``hops`` times."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


def vt_text(rng: random.Random, place: random.Random, units: int, hops: int, letters: int) -> tuple[str, list[str]]:
    """(the task message with its answer prefix, the chain's variables) over ``units`` noise lines."""
    names, chain = vt_chain(rng, hops, letters)
    sentences = [VT_NOISE] * units
    positions = sorted(place.sample(range(max(units, len(chain))), len(chain)))
    for j, at in enumerate(positions):
        sentences.insert(at + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    value = chain[0].split("=")[-1].strip()
    return VT_TEMPLATE.format(context=context, query=value), [value, *names]


VT_ICL_NOISE = 15
"""Noise lines of the one-shot example (RULER sizes it to about 500 tokens with 5-line steps)."""


def vt_sample(seed: str, units: int, hops: int = 4) -> Sample:
    """Variable tracking with RULER's one-shot example (3-letter names) before the question."""
    rng, place = random.Random(seed), random.Random(f"{seed}/place")
    example, (ex_value, *ex_names) = vt_text(rng, place, VT_ICL_NOISE, hops, 3)
    example += VT_ANSWER.format(num_v=hops + 1, query=ex_value) + " ".join(ex_names)
    text, (value, *names) = vt_text(rng, place, units, hops, 5)
    return Sample(example + "\n\n" + text, VT_ANSWER.format(num_v=hops + 1, query=value), names)


# ----------------------------------------------------------------------------- word extraction


def cwe_words() -> list[str]:
    """RULER's vocabulary for common words: wonderwords' nouns, adjectives and verbs, sorted, deduplicated."""
    return sorted(set(word_list("nounlist.txt") + word_list("adjectivelist.txt") + word_list("verblist.txt")))


def cwe_list(rng: random.Random, count: int, common: int, uncommon: int, top: int = 10) -> tuple[str, list[str]]:
    """A numbered word list: ``top`` words ``common`` times each, ``count - top`` others ``uncommon`` times."""
    chosen = rng.sample(cwe_words(), count)
    words = chosen[:top] * common + chosen[top:] * uncommon
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), chosen[:top]


def cwe_sample(seed: str, units: int, length: int) -> Sample:
    """Common words extraction; like RULER, prompts under 4096 tokens use lighter repeats (6/1, else 30/3)."""
    short = length < 4096
    example_rng, rng = random.Random(f"{seed}/example"), random.Random(f"{seed}/list")
    context, answer = cwe_list(example_rng, 20 if short else 40, 3 if short else 10, 1 if short else 3)
    example = (
        CWE_TEMPLATE.format(context=context)
        + CWE_ANSWER
        + " "
        + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
    )
    context, answer = cwe_list(rng, 10 + units, 6 if short else 30, 1 if short else 3)
    return Sample(example + "\n" + CWE_TEMPLATE.format(context=context), CWE_ANSWER, answer)


@lru_cache(maxsize=8)
def zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 (RULER uses scipy's): the sum to 10^5 plus the integral of the tail."""
    return sum(k**-alpha for k in range(1, 100_000)) + 100_000 ** (1 - alpha) / (alpha - 1)


def fwe_sample(seed: str, units: int, alpha: float = 2.0, vocab_size: int = 2000, letters: int = 6) -> Sample:
    """Frequent words extraction: coded words drawn Zipf(``alpha``); the most frequent is '...' (noise)."""
    rng = random.Random(seed)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=letters)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."
    text = [w for k, w in enumerate(words, start=1) for _ in range(int(units * k**-alpha / zeta(alpha)))]
    random.Random(f"{seed}/order").shuffle(text)
    return Sample(FWE_TEMPLATE.format(context=" ".join(text)), FWE_ANSWER, words[1:4])


# ----------------------------------------------------------------------------- the family table


@dataclass(frozen=True)
class Family:
    """A RULER task: how it is built from (seed, units, depth, length) and how long its reply may be."""

    name: str
    tokens_to_generate: int
    """RULER's reply budget for the family."""
    build: Callable[[str, int, float | None, int, list[str]], Sample]
    """``build(seed, units, depth, length, essay_words)``."""
    single_needle: bool = False
    """Depth applies: the prompt holds one needle, at the task's depths."""
    essay: bool = False
    """Needs the essay haystack."""


def _niah(name: str, spec: Niah) -> Family:
    return Family(
        name,
        128,
        lambda seed, units, depth, length, essay: niah_sample(spec, seed, units, depth, essay),
        single_needle=spec.single,
        essay=spec.haystack == "essay",
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        _niah("niah_single_1", Niah("noise")),
        _niah("niah_single_2", Niah("essay")),
        _niah("niah_single_3", Niah("essay", value="uuids")),
        _niah("niah_multikey_1", Niah("essay", keys=4)),
        _niah("niah_multikey_2", Niah("needle")),
        _niah("niah_multikey_3", Niah("needle", key="uuids", value="uuids")),
        _niah("niah_multivalue", Niah("essay", values=4)),
        _niah("niah_multiquery", Niah("essay", keys=4, queries=4)),
        Family("vt", 30, lambda seed, units, depth, length, essay: vt_sample(seed, units)),
        Family("cwe", 120, lambda seed, units, depth, length, essay: cwe_sample(seed, units, length)),
        Family("fwe", 50, lambda seed, units, depth, length, essay: fwe_sample(seed, units)),
    ]
}
"""RULER's 11 synthetic tasks (``synthetic.yaml``), by RULER's names."""


def essay_words(text: str) -> list[str]:
    """The essay haystack as RULER splits it: whitespace runs to one space, then words."""
    return re.sub(r"\s+", " ", text).strip().split(" ")
