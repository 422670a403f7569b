"""Peak extra memory and time of one loss + gradient call: fused linear distillation vs the dense path.

What is measured
    One call of the student's distillation loss computed from final hidden states and head weights,
    followed by ``backward()``, at batch x seq tokens (every token counts: the caller has gathered the
    loss positions), fp32 on the CPU:

    * fused: ``okd.fused.fused_linear_distillation`` (logits chunk by chunk, gradients in forward).
    * dense: what the loop does today: ``logits = h @ W.T`` for the student (with a graph) and the
      teacher (without one), then the chunked ``okd.divergences`` function and ``F.cross_entropy`` on
      the full logits, ``backward()`` through the student's head.

    Cases: ``kd`` = forward KL with kd_ratio 1 (the ``kd`` preset; CE only logged); ``mix`` = forward
    KL with kd_ratio 0.5 (CE with gradient too); ``okd`` = ``kd`` plus the OKD module loss
    (1.0 CE(teacher) + 1.0 D(student.detach() -> teacher)) whose gradient flows into the teacher's
    hidden states.

    Inputs (created before the measurement, not counted): student and teacher hidden states
    ``[B*T, 576]`` (SmolLM2's hidden size for both), head weights ``[V, 576]`` (the student's requires
    grad, the teacher's is frozen), targets. Peak extra memory = peak resident memory (RSS) during the
    call (forward + backward) minus RSS just before it. It includes the gradients the call produces
    (``W_s.grad`` ``[V, 576]``, ``h_s.grad``, and ``h_t.grad`` for ``okd``), which every implementation
    has to produce. Peak RSS: the kernel's high-water mark is reset just before the call (write "5" to
    /proc/self/clear_refs) and read back from VmHWM in /proc/self/status (fallback: getrusage's
    ru_maxrss). Each (implementation, vocab, case) runs in a fresh Python process, so memory kept by
    the allocator from one variant cannot hide or inflate another's peak; a tiny warm-up call runs
    first so lazy initialisation is not counted. The ratio divides by one dense fp32 logits tensor
    ``[B*T, V]`` at the batch the row was run with. Time = wall time of the same single call.

    A dense run that would not fit in the memory available (MemAvailable, checked before starting)
    is run at a smaller batch instead, and its row says so (the ratio is then to one logits tensor at
    that batch; every dense term scales with the number of tokens).

Usage
    python benchmarks/fused_memory.py                 # B=8, T=1024, V=49152 and 151936, cases kd,okd
    python benchmarks/fused_memory.py --quick         # B=2, T=128, V=4096 and 8192, a few seconds
    python benchmarks/fused_memory.py --cases kd,mix,okd --vocabs 49152 --chunk-tokens 32

Writes benchmarks/results/fused_memory.json and .md (fused_memory_quick.* with --quick) atomically.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from divergence_memory import current_rss_bytes, machine_info, peak_rss_bytes, reset_peak_rss, write_json_atomic  # noqa: E402

MIB = 1024 * 1024
HIDDEN = 576  # SmolLM2-135M's hidden size, used for both models
CASES = {
    "kd": {"kd_ratio": 1.0, "module": False},
    "mix": {"kd_ratio": 0.5, "module": False},
    "okd": {"kd_ratio": 1.0, "module": True},
}
TARGET_RATIO = 0.15


def dense_loss(h_s, w_s, h_t, w_t, targets, kd_ratio, module, chunk_tokens):
    """The dense path as the loop computes it (okd.training.DistillationLoss on full logits)."""
    import torch
    import torch.nn.functional as F

    from okd.divergences import forward_kl

    student_logits = F.linear(h_s, w_s)
    with torch.set_grad_enabled(module):
        teacher_logits = F.linear(h_t, w_t)
    with torch.set_grad_enabled(kd_ratio < 1):
        ce = F.cross_entropy(student_logits, targets)
    kd = forward_kl(teacher_logits.detach(), student_logits, chunk_tokens=chunk_tokens)
    loss = kd if kd_ratio == 1 else (1 - kd_ratio) * ce + kd_ratio * kd
    if module:
        module_loss = F.cross_entropy(teacher_logits, targets) + forward_kl(
            student_logits.detach(), teacher_logits, chunk_tokens=chunk_tokens
        )
        loss = loss + module_loss
    return loss


def fused_loss(h_s, w_s, h_t, w_t, targets, kd_ratio, module, chunk_tokens):
    from okd.fused import fused_linear_distillation

    out = fused_linear_distillation(
        h_s, w_s, h_t, w_t, targets, kd_ratio=kd_ratio, chunk_tokens=chunk_tokens,
        module_ce_weight=1.0 if module else None, module_student_weight=1.0 if module else None,
    )
    return out.loss if out.module_loss is None else out.loss + out.module_loss


def run_worker(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE.parent / "src"))
    if args.threads:
        torch.set_num_threads(args.threads)
    case = CASES[args.case]
    fn = fused_loss if args.impl == "fused" else dense_loss
    chunk = args.chunk_tokens if args.impl == "fused" else args.dense_chunk_tokens

    def inputs(n, vocab):
        g = torch.Generator().manual_seed(0)
        h_s = torch.randn(n, HIDDEN, generator=g).requires_grad_(True)
        h_t = torch.randn(n, HIDDEN, generator=g).requires_grad_(case["module"])
        w_s = torch.randn(vocab, HIDDEN, generator=g)
        w_s.mul_(0.05)  # logits of a few units, like a trained LM's
        w_t = torch.randn(vocab, HIDDEN, generator=g)
        w_t.mul_(0.05)
        w_s.requires_grad_(True)
        targets = torch.randint(0, vocab, (n,), generator=g)
        return h_s, w_s, h_t, w_t, targets

    warm = inputs(8, 64)
    fn(*warm, case["kd_ratio"], case["module"], 4).backward()
    del warm
    h_s, w_s, h_t, w_t, targets = inputs(args.batch * args.seq, args.vocab)
    gc.collect()

    baseline = current_rss_bytes()
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    loss = fn(h_s, w_s, h_t, w_t, targets, case["kd_ratio"], case["module"], chunk)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = peak_rss_bytes(reset_ok)
    return {
        "impl": args.impl,
        "case": args.case,
        "vocab": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
        "chunk_tokens": chunk,
        "loss": float(loss.detach()),
        "grad_norm_h_s": float(h_s.grad.double().norm()),
        "grad_norm_w_s": float(w_s.grad.double().norm()),
        "grad_norm_h_t": float(h_t.grad.double().norm()) if h_t.grad is not None else None,
        "peak_extra_mib": (peak - baseline) / MIB,
        "baseline_rss_mib": baseline / MIB,
        "time_s": elapsed,
        "peak_method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss",
        "torch_threads": torch.get_num_threads(),
    }


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def dense_estimate_mib(n: int, vocab: int, case: str) -> float:
    """Rough need of the dense path: inputs + ~4 (okd: ~6) logits-sized tensors + chunk temporaries."""
    logits = n * vocab * 4 / MIB
    return 4 * vocab * HIDDEN * 4 / MIB + logits * (6.0 if CASES[case]["module"] else 4.0) + 1024 * vocab * 4 * 8 / MIB


def markdown(payload: dict) -> str:
    cfg = payload["config"]
    lines = [
        "# Fused linear distillation: peak extra memory and time of one loss + backward call",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: {payload['machine']['processor']}, {payload['machine']['cpu_count']} CPU cores, "
        f"torch {payload['machine']['torch']}, {payload['results'][0]['torch_threads'] if payload['results'] else '?'} "
        f"torch threads, fp32, no GPU; load average at the end {payload['load_average_1_5_15_min_at_end']}.  ",
        f"Tokens: {cfg['batch']} x {cfg['seq']} (all counted), hidden {HIDDEN} (student and teacher), "
        f"fused chunk_tokens {cfg['chunk_tokens']}, dense divergence chunk_tokens {cfg['dense_chunk_tokens']}.",
        "",
        "| case | vocab | impl | tokens | logits tensor MiB | peak extra MiB | ratio to logits | time s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        n = r["batch"] * r["seq"]
        lines.append(
            f"| {r['case']} | {r['vocab']} | {r['impl']} | {n} | {r['logits_mib']:.0f} | {r['peak_extra_mib']:.0f} | "
            f"{r['ratio_to_logits']:.3f} | {r['time_s']:.1f} |"
        )
    lines += [
        "",
        f"Target: ratio <= {TARGET_RATIO} for the fused path.",
        "",
        "Method: each row runs in a fresh Python process. The inputs (hidden states, head weights, targets)",
        "are created first; then the process's RSS high-water mark is reset (`/proc/self/clear_refs` = 5),",
        "the loss is computed and back-propagated once, and VmHWM minus the RSS before the call is the",
        "peak extra memory. It includes the gradients produced (W_s.grad [V, 576], h_s.grad, h_t.grad for",
        "okd). The ratio divides by one fp32 logits tensor [tokens, V]. Time is the wall time of that",
        "single call (one sample on a shared machine: indicative).",
        "",
        "Cases: kd = forward KL, kd_ratio 1; mix = forward KL, kd_ratio 0.5; okd = kd + the OKD module loss",
        "(gradient into the teacher's hidden states).",
    ]
    notes = [r for r in payload["results"] if r.get("note")]
    if notes:
        lines += ["", "Notes:"] + [f"- {r['case']} {r['vocab']} {r['impl']}: {r['note']}" for r in notes]
        lines += ["- A row run at a smaller batch has a higher ratio than it would have at the full batch: the",
                  "  gradient of W_s [V, 576] does not shrink with the batch while the logits tensor does."]
    checks = payload.get("fused_vs_dense", [])
    if checks:
        lines += ["", "Same results (relative difference fused vs dense, same inputs and batch):", ""]
        lines += ["| case | vocab | loss | grad norm h_s | grad norm W_s |", "|---|---:|---:|---:|---:|"]
        for c in checks:
            lines.append(f"| {c['case']} | {c['vocab']} | {c['loss']:.1e} | {c['grad_h_s']:.1e} | {c['grad_w_s']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocabs", default="49152,151936", help="comma-separated vocabulary sizes")
    parser.add_argument("--cases", default="kd,okd", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--impls", default="fused,dense")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="fused chunk size (default: okd.fused's)")
    parser.add_argument("--dense-chunk-tokens", type=int, default=1024, help="chunk size of the dense path's divergence")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="B=2, T=128, V=4096,8192: a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the existing .json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk_tokens is None:
        sys.path.insert(0, str(HERE.parent / "src"))
        from okd.fused import DEFAULT_CHUNK_TOKENS

        args.chunk_tokens = DEFAULT_CHUNK_TOKENS
    if args.quick:
        args.batch, args.seq, args.vocabs = 2, 128, "4096,8192"
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    out = args.out or HERE / "results" / ("fused_memory_quick.json" if args.quick else "fused_memory.json")
    if args.report_only:
        md_tmp = out.with_suffix(".md.tmp")
        md_tmp.write_text(markdown(json.loads(out.read_text())))
        os.replace(md_tmp, out.with_suffix(".md"))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; valid: {', '.join(CASES)}")
    vocabs = [int(v) for v in args.vocabs.split(",")]
    impls = [i.strip() for i in args.impls.split(",")]

    rows = []
    for vocab in vocabs:
        for case in cases:
            for impl in impls:
                batch, note = args.batch, None
                if impl == "dense":
                    while batch > 1 and dense_estimate_mib(batch * args.seq, vocab, case) > 0.7 * mem_available_mib() - 1024:
                        batch //= 2
                    if batch != args.batch:
                        note = (f"run at batch {batch} (not {args.batch}): the dense path needs about "
                                f"{dense_estimate_mib(args.batch * args.seq, vocab, case) / 1024:.0f} GiB at batch {args.batch}, "
                                f"more than this shared machine had available")
                cmd = [
                    sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", impl, "--case", case,
                    "--vocab", str(vocab), "--batch", str(batch), "--seq", str(args.seq),
                    "--chunk-tokens", str(args.chunk_tokens), "--dense-chunk-tokens", str(args.dense_chunk_tokens),
                    "--threads", str(args.threads),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    raise SystemExit(f"worker failed: {' '.join(cmd)}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["logits_mib"] = batch * args.seq * vocab * 4 / MIB
                row["ratio_to_logits"] = row["peak_extra_mib"] / row["logits_mib"]
                if note:
                    row["note"] = note
                rows.append(row)
                print(f"{case:>4s} V={vocab:>6d} {impl:>5s} batch {batch}: peak extra {row['peak_extra_mib']:8.0f} MiB "
                      f"({row['ratio_to_logits']:.3f}x logits), {row['time_s']:.1f} s", flush=True)

    checks = []
    for vocab in vocabs:
        for case in cases:
            pair = {r["impl"]: r for r in rows if r["vocab"] == vocab and r["case"] == case}
            if "fused" in pair and "dense" in pair and pair["fused"]["batch"] == pair["dense"]["batch"]:
                f, d = pair["fused"], pair["dense"]
                rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)  # noqa: E731
                checks.append({
                    "case": case, "vocab": vocab, "loss": rel(f["loss"], d["loss"]),
                    "grad_h_s": rel(f["grad_norm_h_s"], d["grad_norm_h_s"]),
                    "grad_w_s": rel(f["grad_norm_w_s"], d["grad_norm_w_s"]),
                })
    payload = {
        "benchmark": "fused_memory",
        "command": " ".join(["python", "benchmarks/fused_memory.py"] + list(sys.argv[1:] if argv is None else argv)),
        "config": {
            "batch": args.batch, "seq": args.seq, "vocabs": vocabs, "hidden": HIDDEN, "cases": cases,
            "chunk_tokens": args.chunk_tokens, "dense_chunk_tokens": args.dense_chunk_tokens, "dtype": "float32",
            "divergence": "forward_kl", "mask": "all tokens count",
        },
        "definitions": {
            "peak_extra_mib": "peak RSS during loss + backward minus RSS before it (gradients included)",
            "ratio_to_logits": "peak_extra_mib / one fp32 logits tensor [batch*seq, V] at the row's batch",
        },
        "target_ratio_fused": TARGET_RATIO,
        "machine": machine_info(),
        "load_average_1_5_15_min_at_end": list(os.getloadavg()),
        "results": rows,
        "fused_vs_dense": checks,
    }
    write_json_atomic(out, payload)
    md = markdown(payload)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(md)
    os.replace(tmp, out.with_suffix(".md"))
    print()
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
