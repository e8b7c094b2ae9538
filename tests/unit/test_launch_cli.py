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
