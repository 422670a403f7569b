"""Rename methods in a `benchmarks/compare_methods.py` grid, for when a name's meaning changed.

Usage:
    python benchmarks/relabel_methods.py runs/compare-real okd=okd_kl okd_jsd=okd --why "the okd preset's default changed"

When a preset's defaults change, the grid's finished runs of that preset were trained with the old
settings: a rerun would reuse them under a name that now means something else. This renames them, in
``<dir>/results.json`` (runs, summaries, the settings' method list) and the run directories
``<dir>/runs/<student>-<method>-<seed>``, all at once (every mapping applies to the old names, so
``okd=okd_kl okd_jsd=okd`` swaps correctly), and records what was renamed and why in the results
(``relabelled``). The runs themselves are not touched. Renaming to a name that stays in use is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def relabel(results: dict, mapping: dict[str, str]) -> dict:
    """``results`` with every method name in ``mapping`` replaced (a new dict; ``results`` is unchanged)."""
    names = {r["method"] for entry in results["sizes"].values() for r in entry["runs"]}
    kept = names - set(mapping)
    clash = sorted(set(mapping.values()) & kept)
    if clash:
        raise ValueError(f"cannot rename to {', '.join(clash)}: runs of that name stay (rename them too)")
    rename = lambda name: mapping.get(name, name)  # noqa: E731
    out = json.loads(json.dumps(results))
    for entry in out["sizes"].values():
        for run in entry["runs"]:
            run["method"] = rename(run["method"])
        for key, value in list(entry.items()):
            if key != "runs" and isinstance(value, dict):
                entry[key] = {rename(k): v for k, v in value.items()}
    methods = out["settings"].get("methods")
    if isinstance(methods, str):
        out["settings"]["methods"] = ",".join(rename(m) for m in methods.split(","))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="a compare_methods --out directory (with results.json)")
    parser.add_argument("renames", nargs="+", help="OLD=NEW pairs")
    parser.add_argument("--why", required=True, help="recorded in results.json with the renames")
    args = parser.parse_args()
    grid = Path(args.grid)
    mapping = dict(pair.split("=", 1) for pair in args.renames)
    results = json.loads((grid / "results.json").read_text())
    try:
        new = relabel(results, mapping)
    except ValueError as error:
        sys.exit(f"relabel_methods: {error}")
    new.setdefault("relabelled", []).append({"renames": mapping, "why": args.why})
    # The run directories: two steps, so that a swap never overwrites a directory still to be moved.
    moves = []
    for size, entry in results["sizes"].items():
        for run in entry["runs"]:
            if run["method"] in mapping:
                old = grid / "runs" / f"{size}-{run['method']}-{run['seed']}"
                if old.exists():
                    moves.append((old, grid / "runs" / f"{size}-{mapping[run['method']]}-{run['seed']}"))
    for old, new_dir in moves:
        old.rename(old.with_name(old.name + ".relabelling"))
    for old, new_dir in moves:
        old.with_name(old.name + ".relabelling").rename(new_dir)
    tmp = grid / "results.json.tmp"
    tmp.write_text(json.dumps(new, indent=2))
    os.replace(tmp, grid / "results.json")
    print(f"{grid}: renamed {', '.join(f'{a} -> {b}' for a, b in mapping.items())} ({len(moves)} run directories)")


if __name__ == "__main__":
    main()
