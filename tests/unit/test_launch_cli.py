"""The launcher's command line: honest help, and no accidental exposure."""

from __future__ import annotations

import re

import pytest

from xllm.deploy.launcher import build_parser, check_exposure


def test_help_states_each_default_once():
    text = build_parser().format_help()
    options = re.split(r"\n  (?=-)", text)
    for block in options:
        assert block.count("(default:") <= 1, block
        assert not ("unset:" in block and "(default:" in block), block
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:7100", "tcp://[::1]:7100", "tcp://localhost:7100",
                                     "ipc:///tmp/x.sock"])
def test_local_addresses_are_allowed(address):
    check_exposure(address, allowed=False)


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:7100", "tcp://*:7100", "tcp://198.18.1.1:7100",
                                     "tcp://example.org:7100"])
def test_remote_addresses_need_the_flag(address):
    with pytest.raises(ValueError, match="--allow-remote-clients"):
        check_exposure(address, allowed=False)
    check_exposure(address, allowed=True)


@pytest.mark.parametrize("native_bf16, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_serves_16_bit_checkpoints_in_bf16_only_where_the_cpu_computes_it(
        native_bf16, expected, make_tiny, tmp_path, monkeypatch):
    import json
    import shutil

    from xllm.deploy import launcher
    from xllm.platform import Platform

    model = tmp_path / "bf16-model"
    shutil.copytree(make_tiny("tiny-llama"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    monkeypatch.setattr("xllm.platform.current", lambda: Platform("cpu", "gloo", native_bf16))
    monkeypatch.setattr(launcher, "current", lambda: Platform("cpu", "gloo", native_bf16))
    auto = launcher.resolve_config(launcher.build_parser().parse_args(["--model", str(model)]))
    assert auto.model.dtype == expected
    explicit = launcher.resolve_config(launcher.build_parser().parse_args(
        ["--model", str(model), "--dtype", "bfloat16"]))
    assert explicit.model.dtype == "bfloat16"  # asked for: honoured (with a warning without hardware bf16)


def test_quantization_is_off_by_default_and_named_choices():
    args = build_parser().parse_args(["--model", "x"])
    assert args.quantization == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "x", "--quantization", "int4"])


def test_unsupported_quantization_is_refused_at_launch(make_tiny):
    from xllm.config import read_hf_config
    from xllm.deploy.launcher import check_quantization, resolve_config
    from xllm.models.spec import DecoderSpec

    path = str(make_tiny("tiny-llama"))
    args = build_parser().parse_args(["--model", path, "--quantization", "q8_0", "--tp", "2"])
    with pytest.raises(ValueError, match="--quantization q8_0 runs with --tp 1 only"):
        resolve_config(args)
    odd = DecoderSpec.from_hf({**read_hf_config(path), "intermediate_size": 100})
    with pytest.raises(ValueError, match="--quantization q8_0 needs .* multiples of 32.* intermediate size is 100"):
        check_quantization("q8_0", 1, odd)
    check_quantization("none", 2, odd)


def test_quantization_reaches_the_model_config(make_tiny):
    from xllm.deploy.launcher import resolve_config
    from xllm.offline import engine_flags

    args = build_parser().parse_args(["--model", str(make_tiny("tiny-llama")),
                                      *engine_flags({"quantization": "q8_0"})])
    assert resolve_config(args).model.quantization == "q8_0"
    with pytest.raises(ValueError, match="quantization"):
        engine_flags({"quantization": "q4"})


def test_slo_aware_needs_both_targets(make_tiny):
    from xllm.deploy import launcher

    parse = launcher.build_parser().parse_args
    model = str(make_tiny("tiny-llama"))
    with pytest.raises(ValueError, match="slo_aware needs both --slo-ttft-ms and --slo-tpot-ms"):
        launcher.resolve_config(parse(["--model", model, "--router-policy", "slo_aware", "--slo-ttft-ms", "500"]))
    cfg = launcher.resolve_config(parse(["--model", model, "--router-policy", "slo_aware", "--slo-ttft-ms", "500",
                                         "--slo-tpot-ms", "50", "--slo-reject"]))
    assert (cfg.router.slo.ttft_s, cfg.router.slo.tpot_s, cfg.router.slo.reject) == (0.5, 0.05, True)


def test_kv_tier_flags_become_capacities_in_blocks(tmp_path):
    from xllm.deploy.launcher import tier_blocks

    args = build_parser().parse_args(["--model", "m", "--kv-host-memory", "1", "--kv-disk-dir", str(tmp_path),
                                      "--kv-disk-size", "2"])
    assert tier_blocks(args, 2**20) == (1024, 2048)
    off = build_parser().parse_args(["--model", "m"])
    assert tier_blocks(off, 2**20) == (0, 0)  # tiers are off unless asked for
    tiny = build_parser().parse_args(["--model", "m", "--kv-host-memory", "0.0000001"])
    with pytest.raises(ValueError, match="holds no KV block"):
        tier_blocks(tiny, 2**20)
