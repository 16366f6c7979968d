"""The IPVS backend where the kernel has no IPVS (this host): clear errors, retries, no harm.

Everything that needs a real IPVS runs in the qemu guest (tests/vm/).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from lbha.desired import DesiredDestination, DesiredService, DesiredTable
from lbha.model import Forwarding, IpvsConfig
from lbha.plugins.ipvs import IpvsBackend, IpvsUnavailable, KernelIpvs


def _host_has_ipvs() -> bool:
    kernel = KernelIpvs()
    try:
        kernel.read()
    except IpvsUnavailable:
        return False
    finally:
        kernel.close()
    return True


pytestmark = pytest.mark.skipif(_host_has_ipvs(), reason="this host's kernel has IPVS; the "
                                "no-IPVS failure path needs a kernel without it")

TABLE = DesiredTable(1, (DesiredService(
    virtual="web", layer=4, protocol="tcp", address=ipaddress.ip_address("198.18.0.1"), port=80,
    mark=None, scheduler="wlc", persistence=None, persistence_netmask=None, one_packet=False,
    haproxy_backend=None, haproxy_socket=None, destinations=(DesiredDestination(
        "r1", ipaddress.ip_address("198.18.1.1"), 80, 1, Forwarding.DR),)),))


async def test_missing_ip_vs_is_reported_once_and_retried_without_stopping(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    backend = IpvsBackend(IpvsConfig(cleanstop=True, reconcile_interval=3600), tmp_path)
    reads = 0
    real_read = backend.kernel.read

    def counting_read(*args):
        nonlocal reads
        reads += 1
        return real_read(*args)

    backend.kernel.read = counting_read  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="lbha.ipvs"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.run)
            await trio.sleep(0.3)
            assert reads == 0  # nothing is read or touched before the first desired table
            backend.apply(TABLE)
            await trio.sleep(0.2)
            backend.apply(TABLE)  # a new table while broken waits for the backoff
            await trio.sleep(0.2)
            assert reads == 1
            for _ in range(100):  # the retry comes after RETRY_FIRST (1 s)
                if reads == 2:
                    break
                await trio.sleep(0.05)
            assert reads == 2
            status = backend.status()  # what `lbha status` shows meanwhile
            assert status["in_sync"] is False
            assert status["problems"][0].startswith("netlink unavailable: ")
            assert "modprobe ip_vs" in status["problems"][0]
            assert status["last_full_reconcile"] == "never"
            nursery.cancel_scope.cancel()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "IPVS netlink socket" in errors[0]
    assert "modprobe ip_vs" in errors[0]
    # Nothing was created, so nothing was recorded as lbha's.
    assert not (tmp_path / "ipvs-services.json").exists()


async def test_reconcile_raises_a_typed_error(tmp_path: Path):
    backend = IpvsBackend(IpvsConfig(), tmp_path)
    backend.apply(TABLE)
    try:
        with pytest.raises(IpvsUnavailable, match="ip_vs"):
            await backend.reconcile()
    finally:
        backend.close()


async def test_a_broken_ownership_file_is_reported_and_treated_as_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    (tmp_path / "ipvs-services.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="lbha.ipvs"):
        backend = IpvsBackend(IpvsConfig(), tmp_path)
    backend.close()
    assert backend.owned == set()
    assert "ipvsadm -D" in caplog.text


async def test_a_pair_without_layer_4_services_never_touches_netlink(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    # A HAProxy-only pair on a kernel without ip_vs: no error, nothing in `lbha status`.
    backend = IpvsBackend(IpvsConfig(cleanstop=True, reconcile_interval=0.1), tmp_path)
    calls = []
    backend.kernel.read = lambda *args: calls.append(args)  # type: ignore[method-assign]
    layer7 = DesiredTable(1, (replace(TABLE.services[0], layer=7, haproxy_backend="web",
                                      haproxy_socket="/run/haproxy.sock"),))
    with caplog.at_level(logging.INFO, logger="lbha.ipvs"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.run)
            backend.apply(layer7)
            await backend.wait_synced(1)
            await trio.sleep(0.5)  # several periodic passes
            nursery.cancel_scope.cancel()
    assert calls == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert backend.status() is None
