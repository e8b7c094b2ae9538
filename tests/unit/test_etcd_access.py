"""How xllm reaches etcd comes from XLLM_ETCD_* variables; a bad one is refused by name
when the store is opened, before any connection is tried."""

from __future__ import annotations

import pytest

from xllm.metastore import open_store
from xllm.metastore.base import ETCD_VARIABLES

URL = "etcd://127.0.0.1:1"  # nothing listens: a store that got this far would only time out


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for variable in ETCD_VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def pem(tmp_path):
    path = tmp_path / "x.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n")
    return str(path)


@pytest.mark.parametrize("given, named", [
    ({"XLLM_ETCD_CERT": "PEM"}, "XLLM_ETCD_KEY"),
    ({"XLLM_ETCD_KEY": "PEM"}, "XLLM_ETCD_CERT"),
    ({"XLLM_ETCD_USER": "root"}, "XLLM_ETCD_PASSWORD"),
    ({"XLLM_ETCD_CA": "/no/such/ca.pem"}, "XLLM_ETCD_CA"),
    ({"XLLM_ETCD_CA": "PEM", "XLLM_ETCD_CERT": "PEM", "XLLM_ETCD_KEY": "/no/such/key.pem"}, "XLLM_ETCD_KEY"),
    ({"XLLM_ETCD_CA": "NOT_PEM"}, "XLLM_ETCD_CA"),
])
def test_a_bad_setting_is_refused_by_its_variable(given, named, pem, tmp_path, monkeypatch):
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("a certificate authority\n")
    for variable, value in given.items():
        monkeypatch.setenv(variable, {"PEM": pem, "NOT_PEM": str(not_pem)}.get(value, value))
    with pytest.raises(ValueError, match=named):
        open_store(URL)

