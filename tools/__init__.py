"""xllm's model maker: random-weight checkpoints in the real Hugging Face layout.

`make_model(preset, out_dir)` writes one; `ensure_model(preset)` keeps one per preset in
a cache; `PRESETS` lists the shapes. Command line: `python -m xllm_tools --list`.
"""

from .cache import default_model_dir, ensure_model
from .make_model import build_model, make_model
from .presets import PRESETS

__all__ = ["PRESETS", "build_model", "default_model_dir", "ensure_model", "make_model"]
