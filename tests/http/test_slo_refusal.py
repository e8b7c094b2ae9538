"""``--router-policy slo_aware --slo-reject``: a request no instance is predicted to serve
within the targets gets 429 with the predictions, and is counted; targets the instances
meet let it through."""

from __future__ import annotations

import pytest

from tests.http.shim import serve_http

BODY = {"prompt": "hello there", "max_tokens": 4, "ignore_eos": True}


@pytest.mark.parametrize("ttft_ms,served", [("0.001", False), ("60000", True)])
def test_slo_aware_refuses_what_it_predicts_to_miss(make_tiny, tmp_path, ttft_ms, served):
    with serve_http(make_tiny("tiny-llama"), tmp_path, "--instances", "2", "--router-policy", "slo_aware",
                    "--slo-ttft-ms", ttft_ms, "--slo-tpot-ms", "60000", "--slo-reject") as shim:
        reply = shim.post("/v1/completions", {"model": shim.model, **BODY})
        router = shim.stats()["router"]
    if served:
        assert reply.status == 200, reply.body
        assert reply.json()["usage"]["completion_tokens"] == 4 and router["rejected_slo"] == 0
    else:
        assert reply.status == 429, reply.body
        error = reply.json()["error"]
        assert error["code"] == "queue_full"
        assert "no instance is predicted to meet the SLOs (TTFT 0 ms, TPOT 60000 ms)" in error["message"]
        assert "the best predicts TTFT" in error["message"]
        assert router["rejected_slo"] == 1 and router["routed"] == 0
