"""Peak extra memory of forward + backward: chunked okd.divergences vs a plain full-tensor implementation.

What is measured
    For each divergence and each implementation, a fresh Python process creates the fp32 logits
    (teacher without grad, student with grad: the usual KD setting), records its resident memory, runs
    loss = divergence(teacher, student, mask); loss.backward(), and reports the peak resident memory
    (RSS) reached during that call minus the RSS before it: the "peak extra" memory. It includes the
    student's gradient (one input-sized tensor), which every implementation has to produce.

    * chunked: okd.divergences (tokens processed chunk_tokens at a time in forward and backward).
    * plain:   the usual full-tensor code: log_softmax of the whole [B, T, V] tensors, elementwise products,
               sum over the vocab, masked mean; autograd keeps the full-size intermediates for backward.

    Peak RSS: on Linux the process' high-water mark is reset just before the call (write "5" to
    /proc/self/clear_refs) and read back from VmHWM in /proc/self/status. Where that is not available the
    script falls back to getrusage(RUSAGE_SELF).ru_maxrss, which is the peak over the whole process; the
    inputs are then created without temporaries so that the earlier peak is the baseline itself.
    (tracemalloc does not see torch's allocations, hence RSS.) Each variant runs in its own process so
    that freed memory kept by the allocator cannot hide or inflate another variant's peak.

Usage
    python benchmarks/divergence_memory.py                  # B=8, T=1024, V=50257, chunk 1024 (~2 min)
    python benchmarks/divergence_memory.py --quick          # small sizes, a few seconds
    python benchmarks/divergence_memory.py --divergences forward_kl,reverse_kl,jsd --batch 2
    python benchmarks/divergence_memory.py --divergences forward_kl --teacher-grad --threads 1

Writes benchmarks/results/divergence_memory.json (divergence_memory_quick.json with --quick) atomically
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "divergence_memory.json"
QUICK_OUT = HERE / "results" / "divergence_memory_quick.json"  # --quick never overwrites the full-size run
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Memory probes (Linux /proc; getrusage fallback)
# ---------------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark for this process; False if not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------
# Plain (unchunked) implementations, written the way most KD code does it
# ---------------------------------------------------------------------------------------------------


def plain_divergence(name, teacher, student, mask, temperature):
    import torch
    import torch.nn.functional as F

    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    if name == "forward_kl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif name == "reverse_kl":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif name == "jsd":  # beta = 0.5, mixture in log space as in TRL's generalized_jsd_loss
        beta = 0.5
        log_m = torch.logsumexp(torch.stack([log_q + torch.log(torch.tensor(1 - beta)), log_p + torch.log(torch.tensor(beta))]), dim=0)
        kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        per_token = (beta * kl_p + (1 - beta) * kl_q).sum(-1)
    else:
        raise ValueError(name)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------------
# Worker: one (divergence, implementation) in this process
# ---------------------------------------------------------------------------------------------------


def run_worker(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE.parent / "src"))
    from okd.divergences import DIVERGENCES

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Warm up torch's kernels and thread pool on tiny tensors so lazy initialisation is not counted.
    warm_t = torch.randn(2, 3, 17)
    warm_s = torch.randn(2, 3, 17, requires_grad=True)
    DIVERGENCES[args.divergence](warm_t, warm_s).backward()
    plain_divergence(args.divergence, warm_t, warm_s, torch.ones(2, 3), 1.0).backward()
    del warm_t, warm_s

    shape = (args.batch, args.seq, args.vocab)
    teacher = torch.randn(shape) * 2.0  # randn then in-place scale: no input-sized temporary
    student = torch.randn(shape)
    student.mul_(2.0)
    teacher.requires_grad_(args.teacher_grad)
    student.requires_grad_(True)
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool)
    gc.collect()

    baseline = current_rss_bytes()
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    if args.impl == "chunked":
        fn = DIVERGENCES[args.divergence]
        kwargs = {"beta": 0.5} if args.divergence == "jsd" else {}
        loss = fn(teacher, student, mask, chunk_tokens=args.chunk_tokens, **kwargs)
    else:
        loss = plain_divergence(args.divergence, teacher, student, mask, 1.0)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = peak_rss_bytes(reset_ok)
    grad_norm = float(student.grad.double().norm())
    return {
        "divergence": args.divergence,
        "impl": args.impl,
        "loss": float(loss),
        "student_grad_norm": grad_norm,
        "peak_extra_mib": (peak - baseline) / MIB,
        "baseline_rss_mib": baseline / MIB,
        "time_s": elapsed,
        "peak_method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss",
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def markdown_table(rows: list[dict], input_mib: float) -> str:
    lines = [
        "| divergence | implementation | input MiB (one logits tensor) | peak extra MiB | ratio to input | time s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['divergence']} | {r['impl']} | {input_mib:.0f} | {r['peak_extra_mib']:.0f} | "
            f"{r['peak_extra_mib'] / input_mib:.2f} | {r['time_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument(
        "--divergences",
        default="forward_kl,reverse_kl",
        help="comma-separated subset of forward_kl,reverse_kl,jsd (the plain JSD needs ~15x the input size in RAM)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--teacher-grad", action="store_true", help="the teacher requires grad too (OKD module update)")
    parser.add_argument("--quick", action="store_true", help="small sizes (B=2, T=128, V=5000, chunk 64) for a smoke run")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_OUT} ({QUICK_OUT.name} with --quick)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--divergence", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["chunked", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.vocab, args.chunk_tokens = 2, 128, 5000, 64
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT

    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    divergences = [d.strip() for d in args.divergences.split(",") if d.strip()]
    input_mib = args.batch * args.seq * args.vocab * 4 / MIB
    rows = []
    for divergence in divergences:
        for impl in ("chunked", "plain"):
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--worker",
                "--divergence", divergence, "--impl", impl,
                "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
                "--chunk-tokens", str(args.chunk_tokens), "--threads", str(args.threads),
            ] + (["--teacher-grad"] if args.teacher_grad else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"worker failed: {' '.join(cmd)}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["ratio_to_input"] = row["peak_extra_mib"] / input_mib
            rows.append(row)
            print(f"{divergence:>10s} {impl:>7s}: peak extra {row['peak_extra_mib']:8.0f} MiB "
                  f"({row['ratio_to_input']:.2f}x input), {row['time_s']:.2f} s", flush=True)

    # Same loss and gradient from both implementations (sanity check of the comparison).
    for divergence in divergences:
        a, b = (next(r for r in rows if r["divergence"] == divergence and r["impl"] == i) for i in ("chunked", "plain"))
        rel = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
        grad_rel = abs(a["student_grad_norm"] - b["student_grad_norm"]) / max(b["student_grad_norm"], 1e-12)
        a["rel_diff_loss_vs_plain"], a["rel_diff_grad_norm_vs_plain"] = rel, grad_rel

    payload = {
        "benchmark": "divergence_memory",
        "command": " ".join([Path(sys.executable).name, "benchmarks/divergence_memory.py"] + list(sys.argv[1:] if argv is None else argv)),
        "config": {
            "batch": args.batch, "seq": args.seq, "vocab": args.vocab, "chunk_tokens": args.chunk_tokens,
            "dtype": "float32", "teacher_requires_grad": args.teacher_grad, "student_requires_grad": True,
            "mask": "all tokens count", "jsd_beta": 0.5,
        },
        "input_mib_per_tensor": input_mib,
        "definitions": {
            "peak_extra_mib": "peak RSS during forward+backward minus RSS before it (includes the student's gradient)",
            "ratio_to_input": "peak_extra_mib / size of one [B, T, V] float32 logits tensor",
        },
        "machine": machine_info(),
        "load_average_1_5_15_min_at_end": list(os.getloadavg()),
        "results": rows,
    }
    write_json_atomic(args.out, payload)
    print()
    print(markdown_table(rows, input_mib))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
