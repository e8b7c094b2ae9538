"""The model maker (`xllm_tools`): tiny presets only, offline, through the public API.

What a made directory must give: a checkpoint transformers reloads with the same logits,
a tokenizer whose ids cover the model's vocab exactly, chat templates, sharding, and
bytes that depend only on (preset, seed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from xllm_tools import PRESETS, build_model, ensure_model, make_model
from xllm_tools.__main__ import main as cli_main
from xllm_tools.corpus import corpus_lines

TINY = [name for name in PRESETS if name.startswith("tiny-")]
# One preset per tokenizer family.
FAMILY_PRESETS = {"tiny-llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                  "tiny-qwen2": "<|im_start|>assistant\n"}
TEXTS = [
    "Hello, world! The year 1987 had 365 days.",
    "naïve café über Straße — señor €5",
    "中文 日本語 한국어 🙂🚀 👍🎉",
    "  leading spaces\n\nand\ttabs  ",
]
PROMPT_IDS = torch.tensor([[5, 17, 300, 42, 999, 7, 128, 64]])


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Every tiny preset, made once with seed 0."""
    root = tmp_path_factory.mktemp("models")
    return {name: make_model(name, root / name) for name in TINY}


def test_corpus_is_pinned():
    # NOTE: if this changes on purpose, bump MAKER_VERSION: cached tokenizers would differ.
    text = "\n".join(corpus_lines(num_words=1000, seed=0))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "d5cc1fd81f03f0af"
    assert all(ch in text for ch in "é中🙂0")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("preset", TINY)
def test_saved_model_reloads_with_the_same_logits(made, preset):
    in_memory, _ = build_model(preset, seed=0)
    reloaded = AutoModelForCausalLM.from_pretrained(made[preset])
    assert reloaded.config.vocab_size == PRESETS[preset].config["vocab_size"]
    assert reloaded.config.tie_word_embeddings == PRESETS[preset].config["tie_word_embeddings"]
    torch.testing.assert_close(_logits(reloaded, PROMPT_IDS), _logits(in_memory, PROMPT_IDS))


def test_rope_scaling_survives_the_round_trip(made):
    for preset, rope_type in [("tiny-llama-rope-llama3", "llama3"), ("tiny-llama-rope-linear", "linear"),
                              ("tiny-qwen2-rope-yarn", "yarn")]:
        config = json.loads((made[preset] / "config.json").read_text())
        assert config["rope_parameters"]["rope_type"] == rope_type
        assert config["rope_parameters"]["factor"] == PRESETS[preset].config["rope_parameters"]["factor"]


def test_same_seed_gives_identical_bytes_and_another_seed_other_weights(made, tmp_path):
    again = make_model("tiny-llama", tmp_path / "again", seed=0)
    for name in ["model.safetensors", "tokenizer.json", "config.json", "generation_config.json"]:
        assert (again / name).read_bytes() == (made["tiny-llama"] / name).read_bytes(), name
    other = load_file(make_model("tiny-llama", tmp_path / "other", seed=1) / "model.safetensors")
    base = load_file(made["tiny-llama"] / "model.safetensors")
    assert base.keys() == other.keys()
    for key in base:
        assert not torch.equal(base[key], other[key]), key


@pytest.mark.parametrize("preset", list(FAMILY_PRESETS))
def test_tokenizer_covers_the_vocab_and_round_trips(made, preset):
    tokenizer = AutoTokenizer.from_pretrained(made[preset])
    vocab_size = json.loads((made[preset] / "config.json").read_text())["vocab_size"]
    assert len(tokenizer) == vocab_size
    raw = Tokenizer.from_file(str(made[preset] / "tokenizer.json"))
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert raw.encode(text, add_special_tokens=False).ids == ids
        # With special tokens the two agree too (Llama 3 prepends BOS, Qwen adds nothing).
        assert raw.encode(text).ids == tokenizer.encode(text)
    for token_id in range(vocab_size):
        assert isinstance(tokenizer.decode([token_id]), str)


@pytest.mark.parametrize("preset", list(FAMILY_PRESETS))
def test_special_ids_agree_across_files(made, preset):
    directory = made[preset]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    generation = json.loads((directory / "generation_config.json").read_text())
    vocab_size = config["vocab_size"]
    assert generation["do_sample"] is False
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert isinstance(generation["eos_token_id"], list) and len(generation["eos_token_id"]) == 2
    assert tokenizer.eos_token_id in generation["eos_token_id"]
    assert all(vocab_size - 8 <= i < vocab_size for i in generation["eos_token_id"])  # specials sit at the end
    assert config["pad_token_id"] == tokenizer.pad_token_id
    assert generation["bos_token_id"] == config["bos_token_id"]
    if tokenizer.bos_token is not None:
        assert tokenizer.bos_token_id == config["bos_token_id"]
        assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("preset", list(FAMILY_PRESETS))
def test_chat_template_ends_with_the_assistant_header(made, preset):
    tokenizer = AutoTokenizer.from_pretrained(made[preset])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(FAMILY_PRESETS[preset])
    assert "Be brief." in text and "Hi there!" in text
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == text  # specials are single ids, nothing is lost


def test_sharded_checkpoint_has_an_index_and_reloads(made, tmp_path):
    directory = make_model("tiny-qwen2", tmp_path / "sharded", shards=3)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3
    assert sorted(p.name for p in directory.glob("*.safetensors")) == files
    assert not (directory / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    single = AutoModelForCausalLM.from_pretrained(made["tiny-qwen2"])
    torch.testing.assert_close(_logits(reloaded, PROMPT_IDS), _logits(single, PROMPT_IDS))


@pytest.mark.parametrize("preset", TINY)
def test_greedy_generation_has_clear_margins(made, preset):
    model = AutoModelForCausalLM.from_pretrained(made[preset])
    out = model.generate(PROMPT_IDS, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, PROMPT_IDS.shape[1] + 20)
    top2 = torch.stack([scores[0].topk(2).values for scores in out.scores])  # (20, 2)
    gaps = top2[:, 0] - top2[:, 1]
    assert (gaps > 1e-3).float().mean() >= 0.8, gaps


def test_dtype_override_is_saved(tmp_path):
    directory = make_model("tiny-qwen3", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(directory / "model.safetensors").values())


def test_make_model_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        make_model("tiny-llama", tmp_path / "taken")


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        make_model("tiny-llama", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_ensure_model_makes_once_and_reuses(tmp_path):
    first = ensure_model("tiny-llama", root=tmp_path)
    assert first == tmp_path / "tiny-llama-v1"
    stamp = json.loads((first / "xllm_model_maker.json").read_text())
    assert stamp["preset"] == "tiny-llama" and stamp["seed"] == 0
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("tiny-llama", root=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tiny-llama-v1"]


def test_ensure_model_uses_the_environment_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XLLM_MODEL_CACHE", str(tmp_path / "cache"))
    assert ensure_model("tiny-qwen3") == tmp_path / "cache" / "tiny-qwen3-v1"


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(KeyError, match="tiny-llama"):
        make_model("no-such-model", tmp_path / "x")


def test_cli_lists_and_makes(tmp_path, capsys):
    assert cli_main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PRESETS)
    assert cli_main(["tiny-qwen2-rope-yarn", str(tmp_path / "cli"), "--seed", "3", "--shards", "2"]) == 0
    assert (tmp_path / "cli" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "cli" / "xllm_model_maker.json").read_text())["seed"] == 3
