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
