"""The zoo's text-classification tasks, generated offline and deterministically.

Every task is binary (label 0/1) so that all zoo models share one classifier
shape and any two of them can be merged against the common `base`.

Each task mixes easy sentences with ones a bag-of-words reading gets wrong
(negation and contrast for sentiment; for topic, a person from the other field
and passive or relative clauses): a linear probe on the frozen pretrained model
then stays well below 100%, leaving room for fine-tunes and merges to differ.

`aspects` is the hard one: a review of three aspects, each clause positive or
negative (a "not" flips it), labelled by a weighted vote in which some aspects
count more than others (`words.ASPECT_WEIGHT`). Fine-tunes reach ~0.95 on it, not
1.0, so model soups can be compared with their ingredients in distribution; it
has larger validation and test splits (`TASK_SIZES`) so that a point of
accuracy is more than sampling noise.

The `test_shifted` split uses other templates and held-out vocabulary.
Splits are disjoint (test is drawn first, then validation, then train, each
rejecting sentences already used) and exactly balanced.
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import Callable

from weightops.zoo import words as W

TASKS = ("sentiment", "topic", "aspects")
SPLITS = ("train", "validation", "test", "test_shifted")
SIZES = {"train": 2000, "validation": 400, "test": 500, "test_shifted": 500}
TASK_SIZES = {"aspects": {"validation": 1000, "test": 1000}}
LABEL_NAMES = {
    "sentiment": ("negative", "positive"),
    "topic": ("sports", "science"),
    "aspects": ("negative", "positive"),
}
# Part of every split's seed: bump it and every task (and the zoo cache) changes.
TASK_SEED = 9

Gen = Callable[[random.Random, int], str]


# --- sentiment ---------------------------------------------------------------
def _adj(rng: random.Random, label: int, shifted: bool) -> str:
    if shifted:
        return rng.choice(W.POS_ADJ_SHIFT if label else W.NEG_ADJ_SHIFT)
    return rng.choice(W.POS_ADJ if label else W.NEG_ADJ)


def _sentiment(rng: random.Random, y: int) -> str:
    n, n2 = rng.sample(W.REVIEW_NOUNS, 2)
    kind = rng.random()
    if kind < 0.2:
        return rng.choice([
            f"the {n} was {_adj(rng, y, False)}.",
            f"the {n} was {rng.choice(W.ADVERBS)} {_adj(rng, y, False)}.",
            f"i thought the {n} was {_adj(rng, y, False)}.",
        ])
    if kind < 0.6:  # the adjective says the opposite of the label
        a = _adj(rng, 1 - y, False)
        return rng.choice([
            f"the {n} was not {a}.",
            f"the {n} was never {a}.",
            f"i would not call the {n} {a}.",
            f"i did not think the {n} was {rng.choice(W.ADVERBS)} {a}.",
        ])
    a, other = _adj(rng, y, False), _adj(rng, 1 - y, False)
    return rng.choice([  # both polarities present; the clause that counts varies in position
        f"the {n} was {other}, but the {n2} was {a}.",
        f"the {n2} was {a} even though the {n} was {other}.",
        f"although the {n} was {other}, the {n2} was {a}.",
    ])


def _sentiment_shifted(rng: random.Random, y: int) -> str:
    n = rng.choice(W.REVIEW_NOUNS_SHIFT)
    kind = rng.random()
    if kind < 0.3:
        return rng.choice([f"this {n} is {_adj(rng, y, True)}.", f"my new {n} is {_adj(rng, y, True)}."])
    if kind < 0.65:
        a = _adj(rng, 1 - y, True)
        return rng.choice([
            f"this {n} is anything but {a}.",
            f"it is hard to call this {n} {a}.",
            f"no one would say this {n} is {a}.",
        ])
    a, other = _adj(rng, y, True), _adj(rng, 1 - y, True)
    return f"i expected the {n} to be {other}, yet it was {a}."


# --- topic -----------------------------------------------------------------
def _role(rng: random.Random, y: int, people, verbs) -> str:
    agent = rng.choice(people[y])
    patient = rng.choice(people[1 - y])
    active, passive = rng.choice(verbs)
    when = rng.choice(W.WHEN)
    return rng.choice([
        f"{agent} {active} {patient}{when}.",
        f"{patient} {passive} {agent}{when}.",
        f"it was {agent} who {active} {patient}{when}.",
        f"{patient} is the one {agent} {active}{when}.",  # agent second, in an object relative
    ])


def _topic(rng: random.Random, y: int) -> str:
    if rng.random() < 0.1:  # plain one-field sentences anchor which words belong to which field
        return f"{rng.choice((W.SPORT_SUBJ, W.SCI_SUBJ)[y])} {rng.choice((W.SPORT_PRED, W.SCI_PRED)[y])}."
    return _role(rng, y, (W.SPORT_SUBJ, W.SCI_SUBJ), W.ROLE_VERBS)


def _topic_shifted(rng: random.Random, y: int) -> str:
    return _role(rng, y, (W.SPORT_SUBJ_SHIFT, W.SCI_SUBJ_SHIFT), W.ROLE_VERBS_SHIFT)


# --- aspects ----------------------------------------------------------------
def _aspects_review(rng: random.Random, y: int, shifted: bool) -> str:
    while True:  # rejection: draw reviews until the weighted vote gives label y
        clauses, vote = [], 0
        for n in rng.sample(W.REVIEW_NOUNS, 3):
            positive, negated = rng.random() < 0.5, rng.random() < 0.3
            vote += W.ASPECT_WEIGHT[n] * (1 if positive != negated else -1)
            clauses.append(f"the {n} was {'not ' if negated else ''}{_adj(rng, int(positive), shifted)}")
        if (vote > 0) == bool(y):
            if shifted:
                return "; ".join(clauses) + "."
            return f"{clauses[0]}, {clauses[1]} and {clauses[2]}."


def _aspects(rng: random.Random, y: int) -> str:
    return _aspects_review(rng, y, False)


def _aspects_shifted(rng: random.Random, y: int) -> str:
    return _aspects_review(rng, y, True)


GENERATORS: dict[str, tuple[Gen, Gen]] = {
    "sentiment": (_sentiment, _sentiment_shifted),
    "topic": (_topic, _topic_shifted),
    "aspects": (_aspects, _aspects_shifted),
}


def _draw(gen: Gen, rng: random.Random, n: int, seen: set[str]) -> list[tuple[str, int]]:
    out = []
    for y in (0, 1):
        got, tries = 0, 0
        while got < n // 2:
            tries += 1
            if tries > 200 * n:
                raise RuntimeError(f"template space too small for {n} unique sentences")
            text = gen(rng, y)
            if text in seen:
                continue
            seen.add(text)
            out.append((text, y))
            got += 1
    rng.shuffle(out)
    return out


@lru_cache(maxsize=16)
def _make(task: str, sizes: tuple[tuple[str, int], ...]) -> dict[str, tuple[tuple[str, int], ...]]:
    if task not in GENERATORS:
        from weightops.zoo.errors import ZooError

        raise ZooError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    gen, gen_shifted = GENERATORS[task]
    size = dict(sizes)
    seen: set[str] = set()
    splits = {}
    for i, split in enumerate(("test", "validation", "train")):
        rng = random.Random(f"{task}/{split}/{TASK_SEED}/{i}")
        splits[split] = tuple(_draw(gen, rng, size[split], seen))
    rng = random.Random(f"{task}/test_shifted/{TASK_SEED}")
    splits["test_shifted"] = tuple(_draw(gen_shifted, rng, size["test_shifted"], seen))
    return {s: splits[s] for s in SPLITS}


def default_sizes(task: str | None) -> dict[str, int]:
    """Split sizes of `task` (SIZES, with the task's own TASK_SIZES over them)."""
    return dict(SIZES, **TASK_SIZES.get(task, {}))


def load_task(task: str, sizes: dict[str, int] | None = None) -> dict[str, list[tuple[str, int]]]:
    """Splits of `task`: {"train", "validation", "test", "test_shifted"} -> [(text, label)].

    `sizes` overrides the split sizes (the tiny test build uses small ones);
    sizes must be even, since labels are exactly balanced.
    """
    size = dict(default_sizes(task), **(sizes or {}))
    if any(v % 2 or v <= 0 for v in size.values()):
        raise ValueError(f"split sizes must be positive and even: {size}")
    made = _make(task, tuple(sorted(size.items())))
    return {s: list(made[s]) for s in SPLITS}
