"""`okd demo`: the main job end to end on the built-in data, on a CPU, in two tiers.

- ``real`` (the default; what ``make demo`` runs): SmolLM2-135M-Instruct converted from the installed
  package, fine-tuned as the teacher, shrunk into pretrained students that each method distils
  (``okd.demo.real``).
- ``toy`` (``--quick`` is its smoke-test size): a teacher and students trained from scratch with a
  byte-level BPE tokenizer of the data, in minutes (``okd.demo.toy``).

``okd.demo.report`` writes the real tier's report and plots from its results.
"""

from __future__ import annotations

from typing import Literal

from okd.demo.real import REAL_METHODS, RealDemoSettings, run_real_demo
from okd.demo.toy import DEFAULT_METHODS, QUICK, DemoSettings, run_toy_demo

DEFAULT_DIRS = {"real": "runs/demo", "toy": "runs/demo-toy"}

__all__ = ["run_demo", "run_real_demo", "run_toy_demo", "RealDemoSettings", "DemoSettings", "QUICK", "REAL_METHODS", "DEFAULT_METHODS"]


def run_demo(
    quick: bool = False,
    output_dir: str | None = None,
    methods: list[str] | None = None,
    settings=None,
    tier: Literal["toy", "real"] | None = None,
    workers: int | None = None,
) -> dict:
    """Run the demo; ``tier`` defaults to ``toy`` with ``quick`` and ``real`` without, ``output_dir``
    to ``runs/demo`` (real) or ``runs/demo-toy`` (toy: the directory ``configs/demo.yaml`` and the
    toy-scale benchmarks read its teacher and tokenizer from)."""
    tier = tier or ("toy" if quick else "real")
    output_dir = output_dir or DEFAULT_DIRS.get(tier, "runs/demo")
    if tier == "toy":
        return run_toy_demo(quick=quick, output_dir=output_dir, methods=methods, settings=settings)
    if tier == "real":
        if quick:
            raise ValueError("--quick is the toy tier's smoke test; drop --tier real or --quick")
        if workers:
            import dataclasses

            settings = dataclasses.replace(settings or RealDemoSettings(), workers=workers)
        return run_real_demo(output_dir=output_dir, methods=methods, settings=settings)
    raise ValueError(f"unknown demo tier {tier!r} (valid: toy, real)")
