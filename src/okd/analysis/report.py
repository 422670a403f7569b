"""Reporting :func:`okd.analysis.analyze`'s result: a markdown table and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """A compact markdown table of :func:`analyze`'s result: one row per student, then the teacher.

    Columns: tokens, top-1 agreement, top-k overlap and coverage (first and last k), entropy gap
    ``H_s - H_t`` and its mean absolute value, FKL, RKL, TVD, Spearman, NLL / accuracy / ECE against the
    ground truth, ExAccErr at the largest l, and free-running ROUGE-L.
    """
    settings = result["settings"]
    ks = settings["top_ks"]
    k_lo, k_hi = ks[0], ks[-1]
    rank = f"spearman_top{settings['rank_top']}"
    exposure = settings.get("exposure")
    l_max = exposure["l"][-1] if exposure and exposure["l"] else None
    header = [
        "model", "tokens", "top-1 agree", f"top-{k_lo} overlap", f"top-{k_lo} cover", f"top-{k_hi} cover",
        "H_s-H_t", "abs gap", "FKL", "RKL", "TVD", f"rho@{settings['rank_top']}", "NLL", "acc", "ECE",
        f"ExAccErr@{l_max} %" if l_max else "ExAccErr %", "ROUGE-L",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, entry in result["students"].items():
        m = entry["metrics"]
        ex = entry.get("exposure_bias")
        row = [
            name, str(entry["tokens"]), _fmt(m["top1_agreement"]), _fmt(m[f"top{k_lo}_overlap"]),
            _fmt(m[f"top{k_lo}_coverage"]), _fmt(m[f"top{k_hi}_coverage"]), _fmt(m["entropy_gap"]),
            _fmt(m["abs_entropy_gap"]), _fmt(m["forward_kl"]), _fmt(m["reverse_kl"]), _fmt(m["tvd"]),
            _fmt(m[rank]), _fmt(m["student_nll"]), _fmt(m["student_accuracy"]), _fmt(m["student_ece"]),
            _fmt(ex["ex_acc_err_percent"][-1], 1) if ex else "–", _fmt(ex["rouge_l"], 2) if ex else "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    t = result["teacher"]
    tm = t["metrics"]
    samples = t.get("samples")
    row = ["teacher", str(t["tokens"])] + ["–"] * 10 + [
        _fmt(tm["nll"]), _fmt(tm["accuracy"]), _fmt(tm["ece"]), "–", _fmt(samples["rouge_l"], 2) if samples else "–",
    ]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def make_plots(result: dict, out_dir: str | Path) -> list[Path]:
    """PNG plots of :func:`analyze`'s result (matplotlib, Agg backend); returns the files written.

    * ``entropy_gap_hist.png``: histogram of ``H_s - H_t`` per student (shared bins; 0 = same entropy,
      right = student flatter than the teacher);
    * ``topk_coverage.png``: top-1 agreement, top-k overlap and teacher mass covered per student;
    * ``exposure_bias.png``: ExAccErr(l) per student (only when exposure bias was measured).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    students = result["students"]
    plots = [("entropy_gap_hist.png", _plot_entropy_gap, (6, 4)),
             ("topk_coverage.png", _plot_topk_coverage, (max(6, 1.5 * len(students) + 3), 4))]
    if any("exposure_bias" in entry for entry in students.values()):
        plots.append(("exposure_bias.png", _plot_exposure_bias, (6, 4)))
    written = []
    for file_name, plot, size in plots:
        fig, ax = plt.subplots(figsize=size)
        plot(ax, result)
        fig.tight_layout()
        written.append(out / file_name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def _plot_entropy_gap(ax, result: dict) -> None:
    for name, entry in result["students"].items():
        hist = entry["entropy_gap_histogram"]
        total = max(sum(hist["counts"]), 1)
        ax.stairs([c / total for c in hist["counts"]], hist["edges"], label=name)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("entropy gap H_student - H_teacher (nats)")
    ax.set_ylabel("fraction of response tokens")
    ax.set_title("Entropy gap per token")
    ax.legend()


def _plot_topk_coverage(ax, result: dict) -> None:
    students = result["students"]
    names = list(students)
    ks = result["settings"]["top_ks"]
    series = [("top-1 agreement", "top1_agreement")]
    series += [(f"top-{k} overlap", f"top{k}_overlap") for k in ks]
    series += [(f"top-{k} teacher mass covered", f"top{k}_coverage") for k in ks]
    width = 0.8 / len(series)
    for j, (label, key) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [students[n]["metrics"][key] for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean over response tokens")
    ax.set_title("Does the student cover the teacher's top tokens?")
    ax.legend(fontsize=8)


def _plot_exposure_bias(ax, result: dict) -> None:
    for name, entry in result["students"].items():
        ex = entry.get("exposure_bias")
        if ex:
            points = [(l, v) for l, v in zip(ex["l"], ex["ex_acc_err_percent"]) if v is not None]
            ax.plot([l for l, _ in points], [v for _, v in points], marker="o", label=name)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("generated tokens l")
    ax.set_ylabel("ExAccErr(l) (%)")
    ax.set_title("Excess accumulated error (exposure bias)")
    ax.legend()
