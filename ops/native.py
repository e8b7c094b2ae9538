"""C++ kernels for the CPU, compiled on first use and cached (``torch.utils.cpp_extension``).

``kernels()`` returns the compiled module, or None when it cannot be built here (no
compiler, no ninja, a non-CPU device); callers then use the plain-torch path. Set
``XLLM_NO_NATIVE=1`` to force the torch path.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("module.cpp", "paged_decode.cpp", "packed_linear.cpp", "gemv.cpp", "gemv_f32.cpp",
                        "q8_linear.cpp")]


@functools.cache
def kernels():
    if os.environ.get("XLLM_NO_NATIVE"):
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="xllm_native_cpu", sources=[str(s) for s in SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                                  "-fassociative-math", "-fno-signed-zeros"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("native CPU kernels unavailable, using the torch path: %s", exc)
        return None
