"""Reading checkpoints: a Hugging Face directory (safetensors, one file or shards with an
index) or a GGUF file (``xllm.models.gguf``). Everything that reads a model's config,
weights or tokenizer goes through here, so a new format is one branch in each verb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


def gguf_path(model: str | Path) -> Path | None:
    """The GGUF file a model path stands for (the file, or the one ``*.gguf`` in a directory
    without a ``config.json``), or None for a Hugging Face directory."""
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{p} holds several GGUF files ({', '.join(f.name for f in found)}); "
                             "name one with --model")
        return found[0] if found else None
    return None


def read_config(model: str | Path) -> dict:
    """The checkpoint's config as a ``config.json``-shaped dict."""
    gguf = gguf_path(model)
    if gguf is not None:
        from .gguf import read_config as read_gguf_config

        return read_gguf_config(gguf)
    path = Path(model) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model} is not a model: no config.json and no *.gguf file")
    return json.loads(path.read_text())


def load_tokenizer(model: str | Path):
    """The checkpoint's transformers (fast) tokenizer, chat template included."""
    from transformers import AutoTokenizer

    gguf = gguf_path(model)
    if gguf is not None:
        from .gguf import load_tokenizer as load_gguf_tokenizer

        return load_gguf_tokenizer(gguf)
    return AutoTokenizer.from_pretrained(str(model))


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order when sharded."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {root}")
    return files


def iter_weights(model: str | Path, dtype: torch.dtype, keep_q8: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, in Hugging Face names, as ``dtype``;
    with ``keep_q8`` a GGUF file's Q8_0 matrices come as their blocks (``xllm_ops.q8.Q8Tensor``)."""
    gguf = gguf_path(model)
    if gguf is not None:
        from .gguf import iter_weights as iter_gguf_weights

        yield from iter_gguf_weights(gguf, dtype, keep_q8)
        return
    for path in checkpoint_files(model):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(dtype)
