"""Spectral analysis of fine-tunes: intruder dimensions (issue #5) and their mitigation.

`analyse(base, targets, ...)` -> report dict; `write_report(report, dir)`;
`write_model` / `write_adapter` scale the intruders' singular values by λ.
The CLI is `weightops intruders` (weightops/cli/intruders.py); docs/intruders.md.
"""
from weightops.spectral.intruders import DEFAULT_EPS, DEFAULT_EPS_GRID, DEFAULT_MODULES, DEFAULT_TOP_K, Options, analyse  # noqa: F401
from weightops.spectral.mitigate import write_adapter, write_model  # noqa: F401
from weightops.spectral.report import write_report  # noqa: F401
