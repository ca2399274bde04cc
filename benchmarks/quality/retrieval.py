# SPDX-License-Identifier: Apache-2.0
"""RULER-style retrieval suite built from a corpus: 24 deterministic cases per context, one haystack.

The haystack is the context's own ``N`` corpus tokens with 24 short needle sentences inserted at
sentence ends near their target depths (the text after them shifts right and is cut at ``N``); one
haystack keeps the prefill cost of the suite at about one extra prefill per context:

* **single** (8 cases) — eight *unrelated* needles (eight templates: a passcode, a ticket number, a
  city, a code word, a room number, an agent's name, a safe combination, a colour) at depths
  1/16, 3/16, …, 15/16; each question asks for one of them, so every case is a single-needle
  retrieval at its own depth (the other needles share no wording with it).
* **multikey** (8 cases) — eight needles "The special magic number for KEY is NNNNNNN." with eight
  keys; each question names one key (the other seven are distractors of the same form).
* **multivalue** (8 cases) — two keys with four values each ("One of the special magic numbers for
  KEY is NNNNNNN."); one question per key, teacher-forced answer "v1, v2, v3, v4" in order of
  appearance; each value is one case. Multikey and multivalue needles sit at depths (i + 0.25)/16 in
  a seeded order (between the single needles).

Questions are completion-style ("… The secret passcode is"), which SmolLM2 answers far more often
than with a chat template. A case is a **hit** when every token of its value is the argmax given
the context, the question and the answer's previous tokens (teacher forcing) — exactly the
condition for greedy decoding to emit it (for multivalue: given the earlier values). Values,
keys, template order and depth order come from ``random.Random(seed)``: the same on every run.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = ["Question", "Haystack", "build_suite", "TASKS"]

TASKS = ("single", "multikey", "multivalue")
CITIES = ["Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Dakar", "Lima", "Perth", "Riga"]
NAMES = ["Margaret Holloway", "Victor Lindqvist", "Amara Okafor", "Tomas Brandt", "Ingrid Salo", "Rafael Mendes"]
WORDS = ["marigold", "thunderbolt", "lighthouse", "snowflake", "pinecone", "driftwood", "moonstone", "bluebird"]
COLORS = ["turquoise", "crimson", "amber", "lavender", "indigo", "scarlet", "olive", "magenta"]
KEYS = ["apple", "river", "candle", "falcon", "meadow", "lantern", "harbor", "violin", "glacier", "copper",
        "orchid", "saddle", "pepper", "anchor", "comet", "willow"]


def _digits(r: random.Random, n: int) -> str:
    return str(r.randint(1, 9)) + "".join(str(r.randint(0, 9)) for _ in range(n - 1))


SINGLE = [  # (needle, question, value generator)
    ("The secret passcode is {v}.", "What is the secret passcode mentioned in the text above? The secret passcode is",
     lambda r: "-".join(str(r.randint(1, 9)) for _ in range(5))),
    ("The winning ticket number is {v}.",
     "What is the winning ticket number mentioned in the text above? The winning ticket number is",
     lambda r: _digits(r, 7)),
    ("The hidden city in this story is {v}.",
     "Which hidden city is mentioned in the text above? The hidden city in this story is", lambda r: r.choice(CITIES)),
    ("The code word for the mission is {v}.",
     "What is the code word for the mission mentioned in the text above? The code word for the mission is",
     lambda r: r.choice(WORDS)),
    ("The meeting room number is {v}.",
     "What is the meeting room number mentioned in the text above? The meeting room number is",
     lambda r: _digits(r, 3)),
    ("The name of the secret agent is {v}.",
     "What is the name of the secret agent mentioned in the text above? The name of the secret agent is",
     lambda r: r.choice(NAMES)),
    ("The safe combination is {v}.", "What is the safe combination mentioned in the text above? The safe combination is",
     lambda r: "-".join(_digits(r, 2) for _ in range(3))),
    ("The lucky color of the day is {v}.",
     "What is the lucky color of the day mentioned in the text above? The lucky color of the day is",
     lambda r: r.choice(COLORS)),
]


@dataclass(frozen=True)
class Question:
    """One teacher-forced forward: ``question`` then ``answer`` token ids; ``spans`` ``[(start, end)]``
    of the answer tokens that form each case's value, with its ``task`` and needle ``depths``."""

    task: str
    question: torch.Tensor
    answer: torch.Tensor
    spans: list[tuple[int, int]]
    depths: list[float]


@dataclass(frozen=True)
class Haystack:
    """``ids`` ``[N]``: the context with needles; tokens before ``first`` equal the plain context's."""

    name: str
    ids: torch.Tensor
    first: int
    questions: list[Question]


def _sentence_ends(tok, ids: torch.Tensor) -> list[int]:
    """Positions ``i`` such that token ``i - 1`` ends a sentence (insertion points)."""
    toks = tok.convert_ids_to_tokens(ids.tolist())
    out = []
    for i in range(1, len(toks)):
        t = tok.convert_tokens_to_string([toks[i - 1]]).rstrip()
        if t.endswith((".", "?", "!")):
            out.append(i)
    return out


def _insert(tok, base: torch.Tensor, needles: list[tuple[float, torch.Tensor]], ends: list[int]):
    """Insert ``(depth, ids)`` needles into ``base`` ``[N]``; returns (ids ``[N]``, first position, actual depths)."""
    n = base.numel()
    total = sum(x.numel() for _, x in needles)
    used, placed = set(), []
    for depth, ids in needles:
        target = int(depth * (n - total))
        cands = [e for e in ends if target - 200 <= e <= target and e not in used]
        pos = cands[-1] if cands else max(1, target)
        while pos in used:
            pos += 1
        used.add(pos)
        placed.append((pos, ids))
    placed.sort(key=lambda p: p[0])
    parts, prev, shift, depths = [], 0, 0, []
    for pos, ids in placed:
        parts += [base[prev:pos], ids]
        depths.append((pos + shift) / n)
        shift += ids.numel()
        prev = pos
    parts.append(base[prev:])
    out = torch.cat(parts)[:n]
    return out, placed[0][0], {id(ids): d for (_, ids), d in zip(placed, depths)}


def build_suite(tok, base: torch.Tensor, *, seed: int = 0) -> list[Haystack]:
    """The haystack (single + multikey + multivalue needles) for the context ``base`` ``[N]`` token ids."""
    n = base.numel()
    r = random.Random(1000 * seed + n)
    enc = lambda t: torch.tensor(tok(t, add_special_tokens=False).input_ids, dtype=base.dtype)  # noqa: E731
    ends = _sentence_ends(tok, base)
    # -- single: eight unrelated needles at depths (i + 0.5) / 8 in a seeded order
    order = list(range(len(SINGLE)))
    r.shuffle(order)
    placed, questions = [], []
    for slot, k in enumerate(order):
        text, question, gen = SINGLE[k]
        v = gen(r)
        ids = enc(" " + text.format(v=v))
        placed.append(((slot + 0.5) / len(SINGLE), ids))
        questions.append(("single", question, [v], [ids]))
    # -- multikey (8 keys) + multivalue (2 keys x 4 values) at depths (i + 0.25) / 16 in a seeded order
    keys = r.sample(KEYS, 10)
    mk, mv = keys[:8], keys[8:]
    kv = []
    for key in mk:
        v = _digits(r, 7)
        ids = enc(f" The special magic number for {key} is {v}.")
        kv.append(ids)
        questions.append(("multikey", f"What is the special magic number for {key} mentioned in the text above? "
                          f"The special magic number for {key} is", [v], [ids]))
    mv_needles = []
    for key in mv:
        vals = [_digits(r, 7) for _ in range(4)]
        ids = [enc(f" One of the special magic numbers for {key} is {v}.") for v in vals]
        kv += ids
        mv_needles.append((key, vals, ids))
    slots = list(range(len(kv)))
    r.shuffle(slots)
    placed += [((s + 0.25) / len(kv), ids) for s, ids in zip(slots, kv)]
    hay_ids, first, depth_of = _insert(tok, base, placed, ends)
    qs = [_question(t, q, vals, [depth_of[id(x)] for x in nid], enc) for t, q, vals, nid in questions]
    for key, vals, ids in mv_needles:
        pairs = sorted(zip([depth_of[id(x)] for x in ids], vals))           # answer in order of appearance
        q = (f"What are all the special magic numbers for {key} mentioned in the text above? "
             f"The special magic numbers for {key} are")
        qs.append(_question("multivalue", q, [v for _, v in pairs], [d for d, _ in pairs], enc))
    return [Haystack("needles", hay_ids, first, qs)]


def _question(task: str, question: str, values: list[str], depths: list[float], enc) -> Question:
    qids = enc("\n\n" + question)
    pieces, spans, start = [], [], 0
    for i, v in enumerate(values):
        if i:
            sep = enc(",")
            pieces.append(sep)
            start += sep.numel()
        ids = enc(" " + v)
        pieces.append(ids)
        spans.append((start, start + ids.numel()))
        start += ids.numel()
    return Question(task, qids, torch.cat(pieces), spans, depths)
