"""Process entry point of every actor: ``python -m xllm.deploy.entry PLAN_FILE ACTOR_NAME``.

The supervisor starts each actor of a plan this way; the process reads the plan, finds
its own ``ActorSpec`` by name and runs the class of its kind (``kinds.KINDS``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
from pathlib import Path

from ..bus.actor import configure_logging
from .kinds import actor_class
from .plan import DeploymentPlan


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
    plan_file, name = argv[0], argv[1]
    plan = DeploymentPlan.from_json(Path(plan_file).read_text())

    def orphaned(_signum=None, _frame=None) -> None:  # until the actor takes over (bus.actor)
        shutil.rmtree(plan.run_dir, ignore_errors=True)
        os._exit(128 + signal.SIGHUP)

    signal.signal(signal.SIGHUP, orphaned)
    die_with_parent(signal.SIGHUP)  # SIGHUP: the launcher is gone
    if os.environ.get("XLLM_LAUNCHER_PID", str(os.getppid())) != str(os.getppid()):
        orphaned()  # it died before this process asked to follow it
    spec = plan.actor(name)
    actor = actor_class(spec.kind)(plan, spec)
    configure_logging(actor.name)
    return actor.serve()


if __name__ == "__main__":
    sys.exit(main())
