"""Build a random-weight checkpoint of a preset and write it in the real HF layout.

`build_model` gives the model and tokenizer in memory; `make_model` also writes them
(config.json, safetensors, tokenizer files, generation_config.json and a stamp) into a
directory, atomically: everything goes into a temporary sibling directory that is
renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers import PreTrainedTokenizerFast

from .presets import Preset, get_preset
from .tokenizer import FAMILIES, build_tokenizer, special_token_ids

# Bump when the bytes written for a (preset, seed) change; names the cache directory.
MAKER_VERSION = 1
STAMP_FILE = "xllm_model_maker.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(
    preset: str, seed: int = 0, dtype: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Return the preset's model (random weights from `seed`, in eval mode) and tokenizer.

    `dtype` overrides the preset's saved dtype ("float32", "bfloat16", "float16"); the
    weights are drawn in float32 and then cast, so dtypes of one seed agree up to rounding.
    """
    spec = get_preset(preset)
    dtype = dtype or spec.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    config_kwargs = spec.config_kwargs()
    tokenizer = build_tokenizer(
        spec.tokenizer_family, config_kwargs["vocab_size"], config_kwargs["max_position_embeddings"]
    )
    ids = special_token_ids(tokenizer, spec.tokenizer_family)
    eos_ids = [ids["end_of_text"], ids["end_of_turn"]]
    # Qwen has no BOS token; its configs name <|endoftext|> as bos_token_id.
    bos_id = ids["bos"] if ids["bos"] is not None else ids["end_of_text"]
    config = AutoConfig.for_model(
        spec.model_type,
        architectures=[spec.architecture],
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        pad_token_id=ids["pad"],
        **config_kwargs,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, spec, seed)
    model.to(_DTYPES[dtype])
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=ids["pad"], do_sample=False
    )
    return model.eval(), tokenizer


@torch.no_grad()
def _init_weights(model: PreTrainedModel, spec: Preset, seed: int) -> None:
    """Overwrite every parameter from a generator seeded with `seed` (in name order).

    Matrices and embeddings: normal(0, init_std). Norm weights: 1 (plus normal(0, 0.05)
    noise when `wide_init`). Biases: 0 (normal(0, 0.1) when `wide_init`).
    NOTE: tied weights appear once in `named_parameters`, so they are drawn once.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            param.normal_(0.0, spec.init_std, generator=gen)
        elif name.endswith("bias") and spec.wide_init:
            param.normal_(0.0, 0.1, generator=gen)
        elif name.endswith("bias"):
            param.zero_()
        elif spec.wide_init:
            param.normal_(1.0, 0.05, generator=gen)
        else:
            param.fill_(1.0)


def make_model(
    preset: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str | None = None, shards: int = 1
) -> Path:
    """Build `preset` and write it to `out_dir` (which must not exist or be empty).

    `shards > 1` splits the weights over about that many safetensors files with a
    `model.safetensors.index.json`. Returns the directory. A crash never leaves a partial
    `out_dir`: files are written to a temporary sibling that is renamed at the end.
    """
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    model, tokenizer = build_model(preset, seed, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=_max_shard_size(model, shards))
        if getattr(model.config, "num_nextn_predict_layers", 0):
            _add_mtp_layers(tmp, model, get_preset(preset), seed)
        _save_tokenizer(tokenizer, get_preset(preset).tokenizer_family, tmp)
        stamp = {"preset": preset, "seed": seed, "dtype": str(model.config.dtype).removeprefix("torch."),
                 "shards": shards, "maker_version": MAKER_VERSION}
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        _make_readable(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def _add_mtp_layers(directory: Path, model: PreTrainedModel, spec: Preset, seed: int) -> None:
    """Write DeepSeek-V3-style multi-token-prediction layers after the decoder's, as
    ``model.layers.{n}...`` with n from ``num_hidden_layers``: ``enorm``, ``hnorm``,
    ``eh_proj`` (hidden, 2 * hidden), ``shared_head.norm`` and a decoder layer shaped like the
    model's own (attention, MLP, their norms). The embedding and the output head are the
    model's (DeepSeek-V3 repeats them in the layer; a reader may take either)."""
    from safetensors.torch import load_file, save_file

    files = sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        raise NotImplementedError("MTP layers are written into a single-file checkpoint only")
    tensors = load_file(files[0])
    cfg = model.config
    dtype = next(iter(tensors.values())).dtype
    gen = torch.Generator().manual_seed(seed + 1)
    template = {k.split(".", 3)[3]: v for k, v in tensors.items() if k.startswith("model.layers.0.")}
    hidden = cfg.hidden_size
    for i in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + i}."
        extra = {name: torch.empty(t.shape) for name, t in template.items()}
        extra.update({"enorm.weight": torch.empty(hidden), "hnorm.weight": torch.empty(hidden),
                      "shared_head.norm.weight": torch.empty(hidden), "eh_proj.weight": torch.empty(hidden, 2 * hidden)})
        for name in sorted(extra):
            t = extra[name]
            if t.ndim >= 2:
                t.normal_(0.0, spec.init_std, generator=gen)
            elif name.endswith("bias"):
                t.normal_(0.0, 0.1, generator=gen) if spec.wide_init else t.zero_()
            elif spec.wide_init:
                t.normal_(1.0, 0.05, generator=gen)
            else:
                t.fill_(1.0)
            tensors[prefix + name] = t.to(dtype).contiguous()
    save_file(tensors, files[0], metadata={"format": "pt"})


def _make_readable(directory: Path) -> None:
    """mkdtemp makes the directory 0700 and safetensors writes files 0600; open them up."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _max_shard_size(model: PreTrainedModel, shards: int) -> int | str:
    """The smallest `max_shard_size` for which the checkpoint splits into at most `shards` files.

    Mirrors the greedy split `save_pretrained` does (huggingface_hub's, in state-dict order).
    """
    if shards <= 1:
        return "100GB"
    state = model.state_dict()

    def count(limit: int) -> int:
        return len(split_torch_state_dict_into_shards(state, max_shard_size=limit).filename_to_tensors)

    lo, hi = 1, sum(t.numel() * t.element_size() for t in state.values())
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) <= shards:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, family_name: str, out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (with chat_template) and special_tokens_map.json.

    NOTE: transformers 5 writes `tokenizer_class: TokenizersBackend` and the template to a
    separate chat_template.jinja; we keep the template inside tokenizer_config.json and name
    the class `PreTrainedTokenizerFast` so that transformers 4 and other tools load it too.
    """
    tokenizer.save_pretrained(out, save_jinja_files=False)
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["add_bos_token"] = FAMILIES[family_name].add_bos
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    special = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": [
            t for t in FAMILIES[family_name].special_tokens
            if t not in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
        ],
    }
    special = {k: v for k, v in special.items() if v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
