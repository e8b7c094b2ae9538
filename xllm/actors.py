"""Process entry point for one actor: ``python -m xllm.actors ROLE CONFIG_FILE [RANK]``.

The launcher starts every actor this way; the config file is the deployment's
``EngineConfig`` as JSON (written by the launcher, read once at start).
"""

from __future__ import annotations

import ctypes
import signal
import sys
from pathlib import Path

from .bus.actor import configure_logging
from .config import EngineConfig


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM here when the launcher dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    role, config_file = argv[0], argv[1]
    rank = int(argv[2]) if len(argv) > 2 else 0
    _die_with_parent()
    cfg = EngineConfig.from_json(Path(config_file).read_text())
    if role == "worker":
        from .worker.actor import WorkerActor

        actor = WorkerActor(cfg, rank)
    elif role == "scheduler":
        from .scheduler.actor import SchedulerActor

        actor = SchedulerActor(cfg)
    elif role == "frontend":
        from .frontend.actor import FrontendActor

        actor = FrontendActor(cfg)
    elif role == "http":
        from .http.actor import HttpActor

        actor = HttpActor(cfg)
    else:
        raise SystemExit(f"unknown actor role {role!r}")
    configure_logging(actor.name)
    return actor.serve()


if __name__ == "__main__":
    sys.exit(main())
