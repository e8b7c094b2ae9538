"""Process entry point for one actor: ``python -m xllm.actors ROLE CONFIG_FILE [RANK]``.

The launcher starts every actor this way; the config file is the deployment's
``EngineConfig`` as JSON (written by the launcher, read once at start).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
from pathlib import Path

from .bus.actor import configure_logging
from .config import EngineConfig


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` here when the parent dies, even by SIGKILL.

    NOTE: Linux ties this to the parent *thread*; every process here is started from
    its parent's main thread."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    role, config_file = argv[0], argv[1]
    rank = int(argv[2]) if len(argv) > 2 else 0
    cfg = EngineConfig.from_json(Path(config_file).read_text())
    run_dir = cfg.addresses.run_dir

    def orphaned(_signum=None, _frame=None) -> None:  # until the actor takes over (bus.actor)
        shutil.rmtree(run_dir, ignore_errors=True)
        os._exit(128 + signal.SIGHUP)

    signal.signal(signal.SIGHUP, orphaned)
    die_with_parent(signal.SIGHUP)  # SIGHUP: the launcher is gone
    if os.environ.get("XLLM_LAUNCHER_PID", str(os.getppid())) != str(os.getppid()):
        orphaned()  # it died before this process asked to follow it
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
