"""Which frontends skip the router: only where no second instance can ever join."""

from __future__ import annotations

import pytest

from xllm.config import EngineConfig, ModelConfig
from xllm.deploy.plan import host_plan

ENGINE = EngineConfig(ModelConfig(path="model"))


def frontends(plan):
    return plan.of_kind("frontend")


def test_one_instance_on_its_own_store_goes_straight_to_it(tmp_path):
    plan = host_plan(ENGINE, str(tmp_path), "ipc://x", num_frontends=2)
    assert plan.alone
    assert [f.direct for f in frontends(plan)] == ["i0", "i0"]
    assert plan.of_kind("router")  # it still answers control calls and keeps the registry


@pytest.mark.parametrize("kw", [{"num_instances": 2},
                                {"metastore": "etcd://127.0.0.1:2379"},
                                {"role": "router", "metastore": "etcd://127.0.0.1:2379"}])
def test_where_instances_can_join_every_request_goes_through_the_router(tmp_path, kw):
    plan = host_plan(ENGINE, str(tmp_path), "ipc://x", **kw)
    assert not plan.alone
    assert [f.direct for f in frontends(plan)] == [""]


def test_an_instance_has_a_kv_agent_for_pd_or_for_kv_tiers(tmp_path):
    """A mixed instance gets a KV agent (and a shared pool) only when it has KV tiers."""
    from xllm.config import CacheConfig

    plain = host_plan(ENGINE, str(tmp_path), "ipc://x", num_instances=2)
    assert not plain.of_kind("kv_agent") and not plain.has_kv_agent("i0")
    pd = host_plan(ENGINE, str(tmp_path), "ipc://x", num_instances=2, instance_roles=("prefill", "decode"))
    assert [a.instance for a in pd.of_kind("kv_agent")] == ["i0", "i1"]
    tiered = EngineConfig(ModelConfig(path="model"), cache=CacheConfig(host_blocks=64))
    plan = host_plan(tiered, str(tmp_path), "ipc://x", num_instances=2)
    assert [a.name for a in plan.of_kind("kv_agent")] == ["i0.kv-agent", "i1.kv-agent"]
    assert plan.has_kv_agent("i0") and plan.has_kv_agent("i1")


@pytest.mark.parametrize("kw, message", [
    ({"host_blocks": 8, "enable_prefix_caching": False}, "prefix caching"),
    ({"disk_dir": "/tmp/kv", "disk_blocks": 8}, "host tier"),
    ({"host_blocks": 8, "disk_dir": "/tmp/kv"}, "both a directory"),
    ({"host_blocks": 8, "disk_blocks": 8}, "both a directory"),
    ({"host_blocks": -1}, ">= 0"),
])
def test_kv_tier_settings_are_checked_where_they_are_made(kw, message):
    from xllm.config import CacheConfig

    with pytest.raises(ValueError, match=message):
        CacheConfig(**kw)
