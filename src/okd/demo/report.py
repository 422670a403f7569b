"""The real-tier demo's report and plots, from its results dict alone (so they are testable on
hand-made results, and can be rewritten from a saved ``results.json``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from okd.demo.paired import paired_table
from okd.io import write_text

BEFORE = "student (before)"


def _order(results: dict) -> list[str]:
    """teacher, the student before distillation, then the methods in the order they ran."""
    names = [n for n in ("teacher", BEFORE) if n in results["models"]]
    return names + [n for n in results.get("methods_run", []) if n in results["models"]]


def _methods(results: dict) -> list[str]:
    return [n for n in _order(results) if n not in ("teacher", BEFORE)]


def _fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{seconds:.0f} s ({minutes} min {secs:02d} s)" if minutes else f"{seconds:.0f} s"


def results_table(results: dict) -> list[str]:
    """The markdown table: one row per model."""
    lines = [
        "| model | parameters | ROUGE-L (sampled, mean +- std over seeds) | per seed | greedy ROUGE-L | steps | train seconds |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name in _order(results):
        r = results["models"][name]
        per_seed = ", ".join(f"{v:.1f}" for v in r["rouge_l_per_seed"].values())
        label = {"teacher": "teacher (SmolLM2-135M-Instruct + sft)", BEFORE: "student before distillation"}.get(name, f"`{name}` student")
        lines.append(
            f"| {label} | {r['parameters']:,} | {r['rouge_l_mean']:.2f} +- {r['rouge_l_std']:.2f} | {per_seed} | "
            f"{r['greedy_rouge_l']:.2f} | {r['steps']} | {r['train_seconds']:.0f} |"
        )
    return lines


def checks(results: dict) -> list[str]:
    """The demo's sanity checks, stated as measured (they are reported, not enforced)."""
    models = results["models"]
    lines = []
    if "teacher" in models and "sft" in models:
        gap = models["teacher"]["rouge_l_mean"] - models["sft"]["rouge_l_mean"]
        lines.append(
            f"- Teacher minus `sft` student: {gap:+.2f} ROUGE-L (sampled), "
            f"{models['teacher']['greedy_rouge_l'] - models['sft']['greedy_rouge_l']:+.2f} (greedy): "
            + ("there is something to distil." if gap > 0 else "the teacher does NOT beat the sft student here.")
        )
    if BEFORE in models:
        b = models[BEFORE]
        gains = ", ".join(f"`{n}` {models[n]['rouge_l_mean'] - b['rouge_l_mean']:+.2f}" for n in _methods(results))
        lines.append(f"- Gain over the student before distillation ({b['rouge_l_mean']:.2f} sampled, {b['greedy_rouge_l']:.2f} greedy): {gains}.")
    return lines


def _section(lines: list[str]) -> list[str]:
    """A report section followed by a blank line, or nothing."""
    return [*lines, ""] if lines else []


def write_real_report(results: dict, out: Path) -> Path:
    s = results["settings"]
    out = Path(out)
    models = results["models"]
    teacher = models.get("teacher", {})
    load = results.get("load_average", {})
    m = results.get("machine", {})
    timing_rows = [f"| {stage} | {seconds:.0f} |" for stage, seconds in results.get("timings", {}).items()]
    lines = [
        "# okd demo report (real tier)",
        "",
        f"Teacher: SmolLM2-135M-Instruct (`okd model convert {s['source']}`) fine-tuned with `sft` for "
        f"{s['teacher_steps']} steps (batch {s['batch_size']}, lr {s['teacher_learning_rate']:g}, max length {s['max_length']})"
        + (" (cached from an earlier run)." if teacher.get("cached") else "."),
        f"Students: `okd model shrink --layers {s['student_layers']}` of the fine-tuned teacher "
        f"(kept layers {results.get('student_layers_kept')}), then {s['student_steps']} steps of each method "
        f"(batch {s['batch_size']}, lr {s['student_learning_rate']:g}, cosine, training seed {s['seed']}).",
        f"Test: first {s['eval_examples']} examples of the built-in test split, prompts in the chat template; "
        f"sampling at temperature 1 with seeds {s['eval_seeds']}, and greedy; up to {s['max_new_tokens']} new tokens.",
        "",
        *results_table(results),
        "",
        *checks(results),
        "",
        *_section(paired_table(results.get("paired"), results.get("eval_files"))),
        "## What varies between runs",
        "",
        f"The +- is the standard deviation over the {len(s['eval_seeds'])} sampling seeds of one trained model per row: "
        "it measures the evaluation's sampling noise only. Every model here is trained once, with training seed "
        f"{s['seed']}. The spread over training seeds (data order, OKD's online-module initialisation, the "
        "sampling methods' draws) is measured by `benchmarks/compare_methods.py --tier real`, with this demo's "
        "teacher, student and training settings and more test examples: see docs/results/real/README.md. "
        "The greedy column has no sampling noise, so it changes between runs only through the trained "
        "weights: another CPU or another torch thread count (the demo picks 1 thread on a busy machine) sums in "
        "another order, which can flip a few tokens of a student trained for a few dozen steps. With "
        f"{s['eval_examples']} test examples, differences between methods of a few ROUGE-L points can be within "
        "the noise of the examples alone: the paired intervals above measure that noise, not the training seed's.",
        "",
        "## What the budget cut",
        "",
        f"The demo must finish within 30 minutes on a 2-core CPU from an empty run directory, which leaves "
        f"{s['teacher_steps']} sft steps for the teacher, {s['student_steps']} steps per student, "
        f"{s['eval_examples']} test examples and one training seed. Left out: `seqkd`, `imitkd` and `minillm` (the comparison has them), more "
        "than one training seed, a CE warm-up (\"heal\") of the pruned student before distillation, and other "
        "layer choices than evenly spaced (the `sft` row is the CE-only baseline a warm-up would start from). "
        "With so few steps the students are far from converged: the table shows which methods move a pruned "
        "student fastest, not where they end.",
        "",
        "## Time",
        "",
        f"Total wall-clock: {_fmt_seconds(results['total_seconds'])} on {m.get('machine', '?')} "
        f"({m.get('cpu_count', '?')} CPUs, {m.get('torch_threads', '?')} torch threads, "
        f"{'a GPU' if m.get('cuda') else 'no GPU'}); load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in load.get('start', []))} at the start and "
        f"{', '.join(f'{x:.1f}' for x in load.get('end', []))} at the end (other jobs shared the CPU when above its core count).",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *timing_rows,
        "",
        "![ROUGE-L](rouge_l.png) ![loss curves](loss_curves.png) ![time](train_time.png)",
        "",
        "## Sample generations (greedy, first test examples)",
        "",
    ]
    for name in _order(results):
        lines.append(f"**{name}**")
        lines.append("")
        for sample in models[name]["greedy_samples"]:
            lines.append(f"- prediction: {sample['prediction']!r}  ")
            lines.append(f"  reference: {sample['reference']!r}")
        lines.append("")
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def plot_real(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    models = results["models"]
    methods = _methods(results)

    plot_training_curves(
        {name: models[name]["ce_curve"] for name in methods if models[name].get("ce_curve")}, out / "loss_curves.png"
    )

    names = _order(results)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x, [models[n]["rouge_l_mean"] for n in names], yerr=[models[n]["rouge_l_std"] for n in names], capsize=4,
           color=["grey" if n in ("teacher", BEFORE) else "C0" for n in names], label="sampled (mean +- std over seeds)")
    ax.scatter(x, [models[n]["greedy_rouge_l"] for n in names], color="C3", zorder=3, label="greedy")
    ax.set_xticks(list(x), ["before" if n == BEFORE else n for n in names])
    ax.set_ylabel("ROUGE-L")
    ax.set_title("Built-in test set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rouge_l.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(methods, [models[n]["train_seconds"] for n in methods])
    ax.set_ylabel("training wall-clock seconds")
    ax.set_title("Training time per method (same steps)")
    fig.tight_layout()
    fig.savefig(out / "train_time.png", dpi=120)
    plt.close(fig)


def rewrite(out: str | Path) -> Path:
    """Rewrite ``report.md`` and the plots of a finished run from its ``results.json``."""
    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    plot_real(results, out)
    return write_real_report(results, out)


if __name__ == "__main__":  # python -m okd.demo.report RUN_DIR
    print(rewrite(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))


def plot_training_curves(curves: dict[str, list], path: Path) -> None:
    """One line per method: the student's CE on its training batches, ``curves[name] = [(step, ce), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[1] for c in curve], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("student cross-entropy on training batches")
    ax.set_title("Training curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
