"""The documentation: the mkdocs site builds in strict mode, and README's links point at files that exist.

`mkdocs build --strict` fails on a nav entry without its page, a relative link or anchor that does not
resolve, and an API-reference entry (mkdocstrings) that names no object. It needs the `docs` extra,
which `make install` installs; the test fails rather than skips without it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_builds_in_strict_mode(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "api" / "index.html").is_file()


def test_readme_links_point_at_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert targets, "README has no links"
    missing = []
    for target in targets:
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if path and not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README links to missing files: {missing}"


def test_readme_gives_the_commands_ci_and_a_new_user_run():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_user_pages_speak_of_the_product_not_of_its_development():
    """README, CHANGELOG and docs/ describe okd and its results; tracker items ("issue" and a number)
    and wording dated by the work that produced it belong to commit messages."""
    dated = ["today" + "'s", "sess" + "ion"]  # split so that this file does not match itself
    pattern = re.compile(r"\bissue [0-9]|" + "|".join(rf"\b{word}\b" for word in dated), re.IGNORECASE)
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
    hits = [
        f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
        for page in pages
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
