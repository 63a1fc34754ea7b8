"""Task generation: deterministic, balanced, disjoint splits, shifted split really shifted."""
import subprocess
import sys

import pytest

from weightops.zoo import tasks as T
from weightops.zoo import words as W


@pytest.mark.parametrize("task", T.TASKS)
def test_splits_have_sizes_and_balanced_labels(task):
    data = T.load_task(task)
    assert list(data) == list(T.SPLITS)
    for split, rows in data.items():
        assert len(rows) == T.default_sizes(task)[split]
        assert sum(y for _, y in rows) == len(rows) // 2, split
        assert all(isinstance(x, str) and y in (0, 1) for x, y in rows)


@pytest.mark.parametrize("task", T.TASKS)
def test_no_sentence_in_two_splits(task):
    data = T.load_task(task)
    seen = {}
    for split, rows in data.items():
        texts = [x for x, _ in rows]
        assert len(set(texts)) == len(texts), f"duplicate inside {split}"
        for x in texts:
            assert x not in seen, f"{x!r} in {seen.get(x)} and {split}"
            seen[x] = split


def _digest_in_subprocess(task):
    code = ("import hashlib, json; from weightops.zoo.tasks import load_task; "
            f"print(hashlib.sha256(json.dumps(load_task({task!r})).encode()).hexdigest())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("task", T.TASKS)
def test_generation_is_deterministic_across_processes(task):
    # A fresh interpreter each time: no lru_cache, a different hash seed for str/set iteration.
    assert _digest_in_subprocess(task) == _digest_in_subprocess(task)


def test_shifted_split_uses_held_out_vocabulary():
    train = " ".join(x for x, _ in T.load_task("sentiment")["train"])
    shifted = " ".join(x for x, _ in T.load_task("sentiment")["test_shifted"])
    for word in W.POS_ADJ_SHIFT + W.NEG_ADJ_SHIFT:
        assert f" {word}" not in train
    assert any(f" {w}" in shifted for w in W.POS_ADJ_SHIFT)
    topic_train = " ".join(x for x, _ in T.load_task("topic")["train"])
    assert not any(p in topic_train for p in W.SPORT_SUBJ_SHIFT + W.SCI_SUBJ_SHIFT)


def test_labels_follow_the_templates():
    rows = dict(T.load_task("sentiment")["train"])
    negated = [y for x, y in rows.items() if " was not " in x and " but " not in x]
    # "the X was not <adj>" always carries the adjective's opposite label.
    for x, y in rows.items():
        if x.startswith("the ") and " was not " in x:
            adj = x.rstrip(".").split(" was not ")[1]
            assert y == (0 if adj in W.POS_ADJ else 1), x
    assert negated
    topic = dict(T.load_task("topic")["train"])
    for x, y in topic.items():
        if " was praised by " in x:
            agent = x.split(" was praised by ")[1]
            assert y == int(any(agent.startswith(p) for p in W.SCI_SUBJ)), x


def test_aspects_label_is_the_weighted_vote():
    for split in ("train", "test_shifted"):
        for x, y in T.load_task("aspects")[split]:
            vote = 0
            for clause in x.rstrip(".").replace("; ", ", ").replace(" and ", ", ").split(", "):
                noun, rest = clause.removeprefix("the ").split(" was ")
                negated = rest.startswith("not ")
                adj = rest.removeprefix("not ")
                positive = adj in W.POS_ADJ + W.POS_ADJ_SHIFT
                assert positive or adj in W.NEG_ADJ + W.NEG_ADJ_SHIFT, x
                vote += W.ASPECT_WEIGHT[noun] * (1 if positive != negated else -1)
            assert y == int(vote > 0), x


def test_sizes_override_and_validation():
    small = T.load_task("topic", {"train": 10, "test": 4})
    assert len(small["train"]) == 10 and len(small["test"]) == 4
    with pytest.raises(ValueError):
        T.load_task("topic", {"train": 3})


def test_unknown_task_is_a_one_line_error():
    from weightops.zoo.errors import ZooError

    with pytest.raises(ZooError, match="unknown task"):
        T.load_task("poetry")
