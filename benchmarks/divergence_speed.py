"""Seconds for one divergence's value + gradient: closed-form gradients vs autograd, same code otherwise.

``okd.divergences`` differentiates forward KL, reverse KL and the generalized JSD by their closed forms
(a few tensor passes per chunk) and every other divergence by autograd through its per-token function.
This times ``loss = divergence(teacher, student, mask); loss.backward()`` both ways
(``okd.divergences.USE_CLOSED_FORMS`` on / off), the two alternating within one run, for the student's
gradient only (KD) and for both gradients (OKD's module direction needs the teacher's too), on
loss-position shapes of the toy and real tiers: 512 positions x vocab 8192 (a `gkd` step at lambda 1 with
64 new tokens, batch 8) and 96 x 49,152 (the real tier's ~11-token responses, batch 8).

Usage:
    python benchmarks/divergence_speed.py --threads 1
    python benchmarks/divergence_speed.py --quick

Writes ``benchmarks/results/divergence_speed.json`` and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from okd import divergences
from okd.evaluation import write_json_atomic

ROOT = Path(__file__).resolve().parent
CASES = {  # name: (function, keyword arguments)
    "forward_kl": (divergences.forward_kl, {}),
    "reverse_kl": (divergences.reverse_kl, {}),
    "generalized_jsd (beta 0.5)": (divergences.generalized_jsd, {"beta": 0.5}),
}


def time_once(fn, kwargs, teacher, student, teacher_grad: bool, closed: bool) -> float:
    divergences.USE_CLOSED_FORMS = closed
    t = teacher.detach().requires_grad_(teacher_grad)
    s = student.detach().requires_grad_(True)
    start = time.perf_counter()
    fn(t, s, **kwargs).backward()
    seconds = time.perf_counter() - start
    divergences.USE_CLOSED_FORMS = True
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="512x8192,96x49152", help="positions x vocab, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--note", default="", help="a remark printed under the table (e.g. the machine's load)")
    parser.add_argument("--out", default=str(ROOT / "results" / "divergence_speed.json"))
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 repeats")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.shapes, args.repeats = "64x1024", 2

    rows = []
    for shape in args.shapes.split(","):
        positions, vocab = (int(x) for x in shape.split("x"))
        generator = torch.Generator().manual_seed(0)
        teacher = torch.randn(positions, vocab, generator=generator) * 3
        student = torch.randn(positions, vocab, generator=generator) * 3
        for name, (fn, kwargs) in CASES.items():
            for teacher_grad in (False, True):
                times = {True: [], False: []}
                time_once(fn, kwargs, teacher, student, teacher_grad, True)  # warm-up
                for _ in range(args.repeats):
                    for closed in (True, False):
                        times[closed].append(time_once(fn, kwargs, teacher, student, teacher_grad, closed))
                row = {
                    "positions": positions, "vocab": vocab, "divergence": name, "teacher_grad": teacher_grad,
                    "closed_form_seconds": statistics.median(times[True]), "autograd_seconds": statistics.median(times[False]),
                }
                row["closed_over_autograd"] = row["closed_form_seconds"] / row["autograd_seconds"]
                rows.append(row)
                print(row, flush=True)

    results = {
        "command": " ".join(["python", "benchmarks/divergence_speed.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    write_json_atomic(args.out, results)
    m = results["machine"]
    lines = [
        f"Command: `{results['command']}`; machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads). Median of {args.repeats} alternating runs of value + backward, fp32.",
        "",
        "| positions x vocab | divergence | gradients | closed form ms | autograd ms | closed / autograd |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        grads = "student and teacher" if r["teacher_grad"] else "student"
        lines.append(f"| {r['positions']} x {r['vocab']} | {r['divergence']} | {grads} | {r['closed_form_seconds'] * 1e3:.1f} | "
                     f"{r['autograd_seconds'] * 1e3:.1f} | {r['closed_over_autograd']:.2f} |")
    if args.note:
        lines += ["", args.note]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
