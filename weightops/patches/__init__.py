"""Portable model patches (PortLLM): create from a LoRA adapter or a full fine-tune, check against
another model version, apply by streaming addition (or as a PEFT adapter). See docs/patches.md."""
from weightops.patches.apply import apply_patch, write_adapter  # noqa: F401
from weightops.patches.check import CheckReport, check_patch  # noqa: F401
from weightops.patches.create import create_patch  # noqa: F401
from weightops.patches.format import Patch  # noqa: F401
