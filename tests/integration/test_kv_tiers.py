"""KV tiers through real processes: a conversation's history evicted from the device pool
comes back from host memory or from disk, across a restart too, and the output equals the
run that recomputes it, token for token; a corrupted disk file is detected and recomputed."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.deploy import launch
from tests.reference import assert_greedy_equal, hf_greedy
from xllm.block_hash import block_hashes
from xllm.config import read_hf_config
from xllm.sdk import AsyncClient

BS = 16
HISTORY = [3 + (i * 7) % 900 for i in range(200)]  # 12 full blocks
OTHERS = [[5 + k + (i * 13) % 800 for i in range(200)] for k in range(4)]  # push HISTORY off the device
RETURNING = HISTORY + [11 + i for i in range(20)]  # the conversation's next turn
GREEDY = {"max_tokens": 12, "ignore_eos": True, "temperature": 0.0}
DEVICE = ("--num-kv-blocks", "40", "--block-size", str(BS))  # a device pool of about 3 conversations


def gib(model, blocks: int) -> str:
    """``--kv-host-memory`` / ``--kv-disk-size`` for ``blocks`` blocks of this model (fp32)."""
    cfg = read_hf_config(model)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    block_bytes = 2 * cfg["num_hidden_layers"] * BS * cfg["num_key_value_heads"] * head_dim * 4
    return repr(blocks * block_bytes / 2**30)


async def released(c: AsyncClient) -> dict:
    """The stats once no device block is held (the agent's last copies end a moment after
    the last token; a bound of 30 s, not a measurement)."""
    for _ in range(300):
        integrity = await c.call("check_integrity")
        if integrity["used"] == 0:
            return {**await c.call("stats"), **integrity}
        await asyncio.sleep(0.1)
    raise AssertionError(f"blocks still held: {integrity}")


async def conversation(address: str, first: bool = True, returning: bool = True) -> dict:
    """The history, four other conversations, then the history's next turn."""
    out = {}
    async with AsyncClient(address) as c:
        if first:
            out["first"] = (await c.generate(prompt_token_ids=HISTORY, **GREEDY)).token_ids
            for other in OTHERS:
                await c.generate(prompt_token_ids=other, **GREEDY)
        if returning:
            back = await c.generate(prompt_token_ids=RETURNING, **GREEDY)
            out["back"], out["cached"] = back.token_ids, back.num_cached_tokens
        out["stats"] = await released(c)
    return out


@pytest.fixture(scope="module")
def recomputed(make_tiny, tmp_path_factory):
    """The run without tiers: the returning turn recomputes its history."""
    model = make_tiny("tiny-llama")
    with launch(model, tmp_path_factory.mktemp("no-tiers"), *DEVICE) as dep:
        run = asyncio.run(conversation(dep.address))
    assert run["cached"] == 0  # the device pool had let the history go
    assert_greedy_equal(str(model), RETURNING, run["back"], hf_greedy(str(model), RETURNING, GREEDY["max_tokens"]))
    return model, run


def test_a_history_evicted_to_host_memory_comes_back_with_the_same_output(recomputed, tmp_path):
    model, reference = recomputed
    with launch(model, tmp_path, *DEVICE, "--kv-host-memory", gib(model, 256)) as dep:
        run = asyncio.run(conversation(dep.address))
    assert run["first"] == reference["first"]
    assert run["back"] == reference["back"]  # loaded back, not recomputed: the same tokens
    stats = run["stats"]
    assert run["cached"] == 192 and stats["kv_host_loaded_blocks"] == 12  # the whole history, from host
    assert stats["kv_disk_blocks"] == 0 and stats["agent_held"] == 0 and stats["kv_tier_errors"] == 0


def test_the_forward_waits_for_each_layer_the_agent_loads(recomputed, tmp_path):
    """The agent is paused when the returning turn comes: the step that reads its history
    starts and must wait, layer by layer, until the agent has written it."""
    model, reference = recomputed
    with launch(model, tmp_path, *DEVICE, "--kv-host-memory", gib(model, 256)) as dep:
        asyncio.run(conversation(dep.address, returning=False))

        async def paused_agent() -> tuple[list[int], dict]:
            async with AsyncClient(dep.address) as c:
                os.kill(dep.pids["kv-agent"], signal.SIGSTOP)
                try:
                    back = asyncio.ensure_future(c.generate(prompt_token_ids=RETURNING, **GREEDY))
                    await asyncio.sleep(1.0)  # the step is planned and running by now (or soon)
                finally:
                    os.kill(dep.pids["kv-agent"], signal.SIGCONT)
                return (await back).token_ids, await released(c)

        tokens, stats = asyncio.run(paused_agent())
    assert tokens == reference["back"]
    assert stats["kv_host_loaded_blocks"] == 12 and stats["kv_load_wait_seconds"] > 0  # it did wait


@pytest.mark.slow
def test_a_history_spilled_to_disk_comes_back_with_the_same_output(recomputed, tmp_path):
    model, reference = recomputed
    with launch(model, tmp_path / "run", *DEVICE, "--kv-host-memory", gib(model, 24),
                "--kv-disk-dir", str(tmp_path / "disk"), "--kv-disk-size", gib(model, 256)) as dep:
        run = asyncio.run(conversation(dep.address))
    assert run["back"] == reference["back"]
    stats = run["stats"]
    assert stats["kv_spilled_blocks"] >= 12 and stats["kv_disk_fetched_blocks"] == 12  # up from disk, verified
    assert run["cached"] == 192 and stats["kv_disk_failed_blocks"] == 0


def _restarted(model, tmp_path, damage=None) -> dict:
    """Serve the history, stop (cleanly), optionally damage the disk tier, start again on the
    same directory and serve the returning turn."""
    tiers = ("--kv-host-memory", gib(model, 256), "--kv-disk-dir", str(tmp_path / "disk"),
             "--kv-disk-size", gib(model, 256))
    with launch(model, tmp_path / "before", *DEVICE, *tiers) as dep:
        asyncio.run(conversation(dep.address, returning=False))
    if damage is not None:
        damage(tmp_path / "disk" / "i0")
    with launch(model, tmp_path / "after", *DEVICE, *tiers) as dep:
        return asyncio.run(conversation(dep.address, first=False))


def test_a_restarted_instance_reuses_its_disk_tier_with_the_same_output(recomputed, tmp_path):
    model, reference = recomputed
    run = _restarted(model, tmp_path)
    assert run["back"] == reference["back"]
    stats = run["stats"]
    assert stats["kv_disk_fetched_blocks"] >= 12 and run["cached"] == 192  # found after the restart
    assert stats["kv_disk_failed_blocks"] == 0


@pytest.mark.slow
def test_a_corrupted_disk_block_is_detected_and_recomputed(recomputed, tmp_path):
    model, reference = recomputed
    bad = block_hashes(HISTORY, BS)[5]

    def flip_a_bit(directory):
        path = directory / f"{bad:016x}.kvb"
        raw = bytearray(path.read_bytes())
        raw[len(raw) - 100] ^= 0x10  # in its K/V bytes
        path.write_bytes(bytes(raw))

    run = _restarted(model, tmp_path, flip_a_bit)
    assert run["back"] == reference["back"]  # never served: recomputed
    stats = run["stats"]
    assert stats["kv_disk_failed_blocks"] == 1
    assert run["cached"] == 5 * BS  # the blocks before the bad one came back; the rest was computed
