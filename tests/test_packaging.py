"""The package as a user installs it: the wheel `python -m build` makes, installed into a fresh
virtual environment, gives a working `okd` command and `python -m okd`.

Offline and fast: the wheel is built without build isolation (the test environment's setuptools)
from a copy of the source, and installed with `pip install --no-deps --no-index`; the fresh
environment sees the test environment's already-installed dependencies through a folder of links
to them that leaves out okd itself, so that only the wheel can provide `okd`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _dependencies_view(view: Path) -> Path:
    """A folder of links to everything installed in the test environment but okd itself (its
    package, its metadata, its editable-install hooks) and .pth files."""
    view.mkdir()
    for directory in dict.fromkeys(Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")):
        for entry in directory.iterdir():
            name = entry.name.lower()
            if name in ("okd", "__pycache__") or name.startswith(("okd-", "__editable__")) or name.endswith(".pth"):
                continue
            if not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    return view


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", root / "dist", source)
    (built,) = (root / "dist").glob("okd-*.whl")
    return built


def test_the_wheel_holds_every_file_of_the_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    package = ROOT / "src" / "okd"
    files = {
        "okd/" + path.relative_to(package).as_posix()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "okd/py.typed" in files and "okd/__main__.py" in files
    assert not files - names, f"missing from the wheel: {sorted(files - names)}"
    from okd import __version__

    assert f"\nVersion: {__version__}\n" in metadata and "License-Expression: Apache-2.0" in metadata
    assert "Requires-Python: >=3.10" in metadata and "Provides-Extra: gguf" in metadata
    assert "okd = okd.__main__:main" in entry_points


def test_the_installed_wheel_runs_okd(wheel, tmp_path, tiny_setting):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "dependencies.pth").write_text(str(_dependencies_view(tmp_path / "dependencies")) + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet",
         "--disable-pip-version-check", wheel)

    where = _run(python, "-c", "import okd, importlib.metadata as m; print(okd.__file__); print(m.version('okd'))",
                 cwd=tmp_path).stdout.split()
    assert Path(where[0]).is_relative_to(venv), f"okd was imported from {where[0]}, not from the installed wheel"
    okd = bin_dir / "okd"
    assert _run(okd, "--version", cwd=tmp_path).stdout.strip() == f"okd {where[1]}"
    assert _run(python, "-m", "okd", "--version", cwd=tmp_path).stdout.strip() == f"okd {where[1]}"
    help_text = _run(okd, "--help", cwd=tmp_path).stdout
    assert help_text.startswith("usage: okd") and all(name in help_text for name in ("distill", "eval", "model"))

    out = tmp_path / "run"
    _run(okd, "distill", "--model.teacher", tiny_setting["teacher"], "--model.tokenizer", tiny_setting["tokenizer"],
         "--model.student_size", "nano", "--method.name", "okd", "--data.train_file", tiny_setting["train"],
         "--data.validation_file", tiny_setting["validation"], "--data.max_length", "48",
         "--data.max_validation_examples", "8", "--train.max_steps", "2", "--train.batch_size", "4",
         "--output-dir", out, "--no-progress", cwd=tmp_path, timeout=300)
    for name in ("student/model.safetensors", "student/config.json", "student/tokenizer.json", "student/README.md",
                 "online_module", "run_config.yaml", "metrics.jsonl", "train_summary.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
    assert "tags:\n- knowledge-distillation\n- okd\n" in (out / "student" / "README.md").read_text()
