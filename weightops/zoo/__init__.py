"""The real-model zoo: fine-tuned all-MiniLM-L6-v2 checkpoints that examples and tests share.

    from weightops import zoo
    zoo.build(fast=True)                      # the fast subset, ~minutes on 2 cores
    path = zoo.get("sentiment-ft-lr1e-4-s0")  # an HF dir (model.safetensors, config, tokenizer, card.json)
    zoo.evaluate(path, "sentiment", "test_shifted")

Every model shares `base`'s tensor names and shapes (binary head), so any two
can be merged against it. See docs/zoo.md for the catalogue and measured scores.
Importing this package does not import torch.
"""
from weightops.zoo.builder import build, get, list_models
from weightops.zoo.catalogue import FAST_NAMES, NAMES
from weightops.zoo.evaluate import evaluate
from weightops.zoo.runtime import zoo_dir
from weightops.zoo.tasks import SPLITS, TASKS, load_task

__all__ = ["build", "get", "list_models", "evaluate", "load_task", "zoo_dir", "FAST_NAMES", "NAMES", "TASKS", "SPLITS"]
