"""The repository itself: installable without warnings, and free of one machine's paths."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACHINE_PATHS = re.compile(r"(?<![\w.])/(work|root|home/\w+)/")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines()]


def test_every_package_directory_is_declared():
    """setuptools warns (and may leave files out) when an importable folder is not listed."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    dirs = {"xllm": ROOT / "xllm", **{name: ROOT / d for name, d in cfg["package-dir"].items()}}
    found = set()
    for top, base in dirs.items():
        for d in [base, *[p for p in base.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
            if any(f.suffix in (".py", ".cpp") for f in d.iterdir() if f.is_file()):
                found.add(".".join([top, *d.relative_to(base).parts]))
    assert found - declared == set(), f"not in pyproject.toml's packages: {sorted(found - declared)}"


def test_no_paths_of_the_machine_that_wrote_it():
    hits = []
    for path in _tracked():
        if path.suffix in (".png",) or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATHS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert hits == []
