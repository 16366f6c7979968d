"""The HAProxy backend plugin: sans-IO parsing and planning, then a real haproxy on loopback.

Real-haproxy tests verify through an independent blocking client (`show servers state`,
`show stat`) and through traffic: requests sent through the frontend, counted per server.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from haproxy_lab import Backend, HaproxyLab, HttpServers, haproxy_missing, running
from hypothesis import given, settings
from hypothesis import strategies as st

from lbha.config import load_config_text
from lbha.desired import DesiredDestination, DesiredService, DesiredTable
from lbha.engine import Engine
from lbha.hookspecs import DaemonContext
from lbha.model import Forwarding
from lbha.plugin_manager import load_plugins
from lbha.plugins import haproxy as plugin_module
from lbha.plugins.haproxy import HaproxyBackendPlugin, plan_backend
from lbha.plugins.haproxy_runtime import (
    PromptFramer,
    RuntimeApiError,
    ServersStateError,
    ServerState,
    TcpAddress,
    UnixAddress,
    parse_address,
    parse_servers_state,
)
from lbha.table import Admin

# `show servers state web` from haproxy 2.6.12 (Debian 12): s1 drained at weight 5, s2 in
# forced MAINT, s3 untouched.
STATE_SAMPLE = (
    "1\n"
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
    "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
    "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr "
    "srv_agent_port\n"
    "3 web 1 s1 127.0.0.1 2 8 5 10 0 1 0 2 0 0 0 0 - 19981 - 0 0 - - 0\n"
    "3 web 2 s2 127.0.0.1 0 1 10 10 0 1 0 0 0 0 0 0 - 19982 - 0 0 - - 0\n"
    "3 web 3 s3 127.0.0.1 2 0 10 10 2 1 0 2 0 0 0 0 - 19983 - 0 0 - - 0\n"
)

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def dest(name: str, state: str = "up", weight: int = 1) -> DesiredDestination:
    return DesiredDestination(name=name, address=LOOPBACK, port=80, weight=weight,
                              forwarding=Forwarding.NAT, state=state)


def table(generation: int, socket_: str, dests: dict[str, tuple[str, int]],
          backend: str = "web", extra: tuple[DesiredService, ...] = ()) -> DesiredTable:
    """A desired table with one layer-7 service: server name -> (state, weight)."""
    return DesiredTable(generation, (service(socket_, backend, dests), *extra))


def service(socket_: str, backend: str, dests: dict[str, tuple[str, int]]) -> DesiredService:
    return DesiredService(
        virtual=f"l7-{backend}", layer=7, protocol="tcp", address=LOOPBACK, port=80, mark=None,
        scheduler="wrr", persistence=None, persistence_netmask=None, one_packet=False,
        haproxy_backend=backend, haproxy_socket=socket_,
        destinations=tuple(dest(n, s, w) for n, (s, w) in dests.items()),
    )


def config_text(socket_: str, names: tuple[str, ...] = ("s1", "s2", "s3"), *,
                backend: str = "web", ports: dict[str, int] | None = None,
                interval: str = "30s", check: str = 'type = "on"') -> str:
    reals = "".join(
        f'[[virtual.real]]\nname = "{n}"\naddress = "127.0.0.1"\nport = '
        f"{(ports or {}).get(n, 8000 + i)}\n" for i, n in enumerate(names))
    return (f'[haproxy]\nreconcile_interval = "{interval}"\n'
            f'[[virtual]]\nname = "web-l7"\nlayer = 7\naddress = "127.0.0.1"\nports = 80\n'
            f"[virtual.check]\n{check}\n"
            f'[virtual.haproxy]\nbackend = "{backend}"\nsocket = "{socket_}"\n{reals}')


def make_plugin(socket_: str, **kwargs: object) -> HaproxyBackendPlugin:
    plugin = HaproxyBackendPlugin()
    plugin.configure(load_config_text(config_text(socket_, **kwargs)))  # type: ignore[arg-type]
    return plugin


# --------------------------------------------------------------------------- sans-IO


def test_servers_state_parses_the_2_6_12_format() -> None:
    states = parse_servers_state(STATE_SAMPLE)["web"]
    assert (states["s1"].admin, states["s1"].weight, states["s1"].initial_weight) == \
        ("drain", 5, 10)
    assert states["s2"].admin == "maint"
    assert states["s3"].admin == "ready"
    assert parse_servers_state("1\n# " + STATE_SAMPLE.split("# ")[1].split("\n")[0]) == {}


@pytest.mark.parametrize("reply", ["Can't find backend.", "", "2\n# be_name", "1\nfoo",
                                   "1\n# be_id be_name\n3 web"])
def test_servers_state_refuses_error_replies_and_other_formats(reply: str) -> None:
    with pytest.raises(ServersStateError):
        parse_servers_state(reply)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_servers_state_fuzz_arbitrary_text_raises_only_its_own_error(text: str) -> None:
    with contextlib.suppress(ServersStateError):
        parse_servers_state(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(STATE_SAMPLE)), st.text(max_size=8)),
                max_size=6))
def test_servers_state_fuzz_mutated_replies_raise_only_its_own_error(
        edits: list[tuple[int, str]]) -> None:
    text = STATE_SAMPLE
    for position, insert in edits:
        text = text[:position] + insert + text[position + 1:]
    try:
        result = parse_servers_state(text)
    except ServersStateError:
        return
    for servers in result.values():
        assert all(isinstance(s.weight, int) for s in servers.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30))
def test_prompt_framer_any_split_gives_the_same_bodies(cuts: list[int]) -> None:
    stream = b"\n> No such server.\n\n> " + STATE_SAMPLE.encode() + b"\n> \n> "
    framer, bodies, position = PromptFramer(), [], 0
    for cut in cuts:
        bodies += framer.feed(stream[position:position + cut])
        position += cut
    bodies += framer.feed(stream[position:])
    assert bodies == ["", "No such server.", STATE_SAMPLE.removesuffix("\n"), ""]


def test_prompt_framer_bounds_a_reply() -> None:
    framer = PromptFramer(max_reply=100)
    with pytest.raises(RuntimeApiError, match="larger than 100 bytes"):
        framer.feed(b"x" * 101)


@pytest.mark.parametrize(("text", "expected"), [
    ("/run/haproxy/admin.sock", UnixAddress("/run/haproxy/admin.sock")),
    ("unix@/tmp/a.sock", UnixAddress("/tmp/a.sock")),
    ("relative.sock", UnixAddress("relative.sock")),
    ("127.0.0.1:9999", TcpAddress("127.0.0.1", 9999)),
    ("ipv4@127.0.0.1:9999", TcpAddress("127.0.0.1", 9999)),
    ("[::1]:9999", TcpAddress("::1", 9999)),
    ("localhost:1", TcpAddress("localhost", 1)),
])
def test_runtime_address_forms(text: str, expected: object) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "127.0.0.1:70000", "[nope]:80"])
def test_runtime_address_errors_are_typed(text: str) -> None:
    with pytest.raises(RuntimeApiError):
        parse_address(text)


def _state(name: str, admin: int = 0, weight: int = 10) -> ServerState:
    return ServerState("web", name, 2, admin, weight, 10)


def test_plan_maps_every_desired_state_and_orders_commands() -> None:
    current = {n: _state(n, admin) for n, admin in
               [("up", 1), ("drain", 0), ("quiet", 0), ("gone", 0), ("fb", 8), ("mine", 0)]}
    desired = {"up": dest("up", "up", 7), "drain": dest("drain", "drain", 0),
               "quiet": dest("quiet", "quiesced", 0), "fb": dest("fb", "fallback", 1)}
    plan = plan_backend("web", ["up", "drain", "quiet", "gone", "fb"], desired, current)
    assert [c for _, c in plan.commands] == [
        "set server web/drain state drain",  # drain keeps the weight
        "set server web/fb weight 1", "set server web/fb state ready",
        "set server web/gone state maint", "shutdown sessions server web/gone",
        "set server web/quiet state drain", "set server web/quiet weight 0",
        # entering service: the weight first, then ready
        "set server web/up weight 7", "set server web/up state ready",
    ]
    assert plan.problems == {}  # and "mine", not owned by lbha, is never touched


def test_plan_is_empty_when_haproxy_already_matches() -> None:
    current = {"a": _state("a", 0, 7), "b": _state("b", 8, 3), "c": _state("c", 1, 4)}
    desired = {"a": dest("a", "up", 7), "b": dest("b", "drain", 0)}
    assert plan_backend("web", ["a", "b", "c"], desired, current).commands == []


def test_plan_reports_unknown_servers_bad_names_and_caps_weights() -> None:
    current = {"a": _state("a")}
    desired = {"a": dest("a", "up", 1000), "x": dest("x"), "bad name": dest("bad name"),
               "odd": dest("odd", "sideways")}
    plan = plan_backend("web", ["a", "x"], desired, {**current, "odd": _state("odd")})
    assert [c for _, c in plan.commands] == ["set server web/a weight 256"]
    assert "no server 'x' (it has: a, odd)" in plan.problems["x"].message
    assert "cannot be a HAProxy server name" in plan.problems["bad name"].message
    assert "'sideways', unknown" in plan.problems["odd"].message
    assert plan.problems["a"].level == logging.WARNING


def test_hooks_start_a_service_only_in_healthd() -> None:
    config = load_config_text(config_text("/nonexistent.sock"))
    assert plugin_module.lbha_start(DaemonContext("heartbeat", config)) is None
    assert plugin_module.lbha_start(DaemonContext("cli", config)) is None
    assert plugin_module.lbha_start(DaemonContext("healthd", config)) == \
        plugin_module.plugin.run


def test_the_entry_point_loads_the_plugin() -> None:
    manager = load_plugins()
    assert manager.plugins["haproxy"].module == "lbha.plugins.haproxy"
    assert not [f for f in manager.failures if f.name == "haproxy"]


# --------------------------------------------------------------------------- real haproxy

NAMES = ("s1", "s2", "s3")


@pytest.fixture
def servers() -> Iterator[HttpServers]:
    group = HttpServers(NAMES)
    yield group
    group.close()


@pytest.fixture
def lab(tmp_path: Path, servers: HttpServers) -> Iterator[HaproxyLab]:
    if (reason := haproxy_missing()) is not None:
        pytest.skip(reason)
    backend = Backend("web", [(n, servers.port(n), 10) for n in NAMES])
    with running(HaproxyLab(tmp_path, [backend, Backend("other", [("o1", 9, 10)])])) as lab:
        yield lab


async def test_weights_and_states_reach_haproxy_and_a_second_pass_sends_nothing(
        lab: HaproxyLab) -> None:
    plugin = make_plugin(str(lab.admin_sock))
    plugin.apply(table(1, str(lab.admin_sock), {"s1": ("up", 5), "s2": ("drain", 0)}))
    await plugin.reconcile()
    assert lab.servers_state("web") == {"s1": (0, 5), "s2": (8, 10), "s3": (1, 10)}
    assert lab.stat("web") == {"s1": ("no check", "5"), "s2": ("DRAIN", "10"),
                               "s3": ("MAINT", "10")}
    assert plugin.problems == []
    sent = plugin.commands_sent
    await plugin.reconcile()
    assert plugin.commands_sent == sent  # reconciliation, not replay
    # Quiesced: drain at weight 0; back up: ready at its weight.
    plugin.apply(table(2, str(lab.admin_sock), {"s1": ("quiesced", 0), "s2": ("up", 3),
                                                 "s3": ("up", 256)}))
    await plugin.reconcile()
    assert lab.servers_state("web") == {"s1": (8, 0), "s2": (0, 3), "s3": (0, 256)}
    assert lab.servers_state("other") == {"o1": (0, 10)}  # not lbha's: never touched


async def test_traffic_goes_only_where_the_table_says(lab: HaproxyLab) -> None:
    plugin = make_plugin(str(lab.admin_sock))
    plugin.apply(table(1, str(lab.admin_sock), {"s1": ("up", 1), "s2": ("up", 3)}))
    await plugin.reconcile()
    hits = await trio.to_thread.run_sync(lab.hits, 80)
    assert hits == Counter({"s1": 20, "s2": 60})  # s3 is in MAINT: nothing
    # Drain s2: no new request reaches it.
    plugin.apply(table(2, str(lab.admin_sock), {"s1": ("up", 1), "s2": ("drain", 0),
                                                 "s3": ("up", 1)}))
    await plugin.reconcile()
    hits = await trio.to_thread.run_sync(lab.hits, 40)
    assert hits == Counter({"s1": 20, "s3": 20})


async def test_halt_puts_the_server_in_maint_and_cuts_its_sessions(
        lab: HaproxyLab, servers: HttpServers) -> None:
    plugin = make_plugin(str(lab.admin_sock))
    plugin.apply(table(1, str(lab.admin_sock), {"s1": ("up", 1)}))
    await plugin.reconcile()
    outcome: list[str] = []
    holder = threading.Thread(target=lambda: outcome.append(_held_request(lab)))
    holder.start()
    assert await trio.to_thread.run_sync(servers.servers["s1"].holding.wait, 5)
    plugin.apply(table(2, str(lab.admin_sock), {"s2": ("up", 1)}))  # s1 halted
    await plugin.reconcile()
    await trio.to_thread.run_sync(holder.join, 5)
    # HAProxy cut the session before s1 answered (it holds for 10 s): no 200 from s1.
    assert outcome, "the held request was not cut"
    assert "s1" not in outcome[0]
    assert lab.stat("web")["s1"][0] == "MAINT"
    assert await trio.to_thread.run_sync(lab.hits, 6) == Counter({"s2": 6})


def _held_request(lab: HaproxyLab) -> str:
    try:
        return lab.get("/hold", timeout=8)
    except OSError as exc:
        return f"error {exc}"


async def test_tcp_stats_socket(lab: HaproxyLab) -> None:
    plugin = make_plugin(lab.tcp_socket)
    plugin.apply(table(1, lab.tcp_socket, {"s1": ("up", 2), "s2": ("up", 4), "s3": ("up", 6)}))
    await plugin.reconcile()
    assert lab.servers_state("web") == {"s1": (0, 2), "s2": (0, 4), "s3": (0, 6)}


async def test_reload_while_running_restores_runtime_state(lab: HaproxyLab) -> None:
    # A long reconcile interval: the restore must come from noticing the reload itself.
    plugin = make_plugin(str(lab.admin_sock), interval="1h")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plugin.run)
        await trio.sleep(0.1)  # the service waits for the engine's first table
        assert plugin.passes == 0
        plugin.apply(table(1, str(lab.admin_sock), {"s1": ("up", 7), "s2": ("drain", 0)}))
        await plugin.wait_reconciled(1)
        want = {"s1": (0, 7), "s2": (8, 10), "s3": (1, 10)}
        assert lab.servers_state("web") == want
        old_pid = lab.worker_pid()
        new_pid = await trio.to_thread.run_sync(lab.reload)
        assert lab.servers_state("web") == {n: (0, 10) for n in NAMES}  # HAProxy forgot
        await state_becomes(lab, want)
        assert lab.worker_pid() == new_pid
        # No CLI session of ours keeps the old worker alive.
        await eventually(lambda: not _alive(int(old_pid)))
        nursery.cancel_scope.cancel()
    assert plugin.problems == []


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `condition` (cheap, synchronous) until true; fail after `within` seconds."""
    for _ in range(int(within / 0.05)):
        if condition():
            return
        await trio.sleep(0.05)
    raise AssertionError(f"not true within {within} s")


async def state_becomes(lab: HaproxyLab, want: dict[str, tuple[int, int]]) -> None:
    """Wait until backend web's `show servers state` is (admin state, weight) per server."""
    await eventually(lambda: lab.servers_state("web") == want)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


async def test_missing_socket_is_logged_once_retried_and_recovers(
        tmp_path: Path, servers: HttpServers, caplog: pytest.LogCaptureFixture) -> None:
    if (reason := haproxy_missing()) is not None:
        pytest.skip(reason)
    caplog.set_level(logging.INFO, "lbha.haproxy")
    sock = tmp_path / "later.sock"
    plugin = make_plugin(str(sock))
    lab = HaproxyLab(tmp_path, [Backend("web", [(n, servers.port(n), 10) for n in NAMES])],
                     admin_sock=sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plugin.run)
        plugin.apply(table(1, str(sock), {"s1": ("up", 9), "s2": ("up", 9), "s3": ("up", 9)}))
        await plugin.wait_reconciled(1)
        passes = plugin.passes
        await trio.sleep(2.6)  # retried every second, never re-logged
        assert plugin.passes >= passes + 2
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert f"cannot connect to HAProxy runtime API {sock}" in errors[0].getMessage()
        status = plugin.status()  # what `lbha status` shows meanwhile
        assert status is not None
        assert status["in_sync"] is False
        assert f"cannot connect to HAProxy runtime API {sock}" in status["problems"][0]
        with running(lab):
            await state_becomes(lab, {n: (0, 9) for n in NAMES})
            for _ in range(50):  # the pass that saw HAProxy back may still be finishing
                if plugin.status()["in_sync"]:  # type: ignore[index]
                    break
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert plugin.problems == []
    assert plugin.status() == {"in_sync": True, "sockets": 1, "backends": 1,
                               "passes": plugin.passes, "commands_sent": plugin.commands_sent,
                               "problems": []}
    assert any(r.getMessage().startswith("resolved: cannot connect") for r in caplog.records)


async def test_stale_socket_file_without_haproxy_is_a_clear_error(tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))  # bound, never listening: connection refused
    plugin = make_plugin(str(sock))
    plugin.apply(table(1, str(sock), {"s1": ("up", 1)}))
    await plugin.reconcile()
    assert len(plugin.problems) == 1
    assert "Connection refused" in plugin.problems[0]


async def test_a_server_that_never_answers_times_out(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin_module, "SESSION_TIMEOUT", 0.3)
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(tmp_path / "mute.sock"))
    listener.listen(4)  # accepts (in the kernel) and never says a word
    plugin = make_plugin(str(tmp_path / "mute.sock"))
    plugin.apply(table(1, str(tmp_path / "mute.sock"), {"s1": ("up", 1)}))
    with trio.fail_after(3):
        await plugin.reconcile()
    assert "did not finish a pass within 0.3 s" in plugin.problems[0]
    listener.close()


@pytest.mark.parametrize("bulk_read", [0, 16], ids=["one-read-for-all", "read-per-backend"])
async def test_unknown_backend_and_server_are_reported_once_and_the_rest_still_applies(
        lab: HaproxyLab, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        bulk_read: int) -> None:
    monkeypatch.setattr(plugin_module, "BULK_READ", bulk_read)
    caplog.set_level(logging.INFO, "lbha.haproxy")
    sock = str(lab.admin_sock)
    plugin = HaproxyBackendPlugin()
    plugin.configure(load_config_text(
        config_text(sock, ("s1", "s2", "s3", "s9"))
        + config_text(sock, ("x1",), backend="nope").split("\n", 2)[2]
        .replace('name = "web-l7"', 'name = "nope-l7"').replace("ports = 80", "ports = 81")))
    bad = service(sock, "nope", {"x1": ("up", 1)})
    plugin.apply(table(1, sock, {"s1": ("up", 4), "s2": ("up", 4), "s9": ("up", 4)},
                       extra=(bad,)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plugin.run)
        await plugin.wait_reconciled(1)
        assert lab.servers_state("web") == {"s1": (0, 4), "s2": (0, 4), "s3": (1, 10)}
        passes = plugin.passes
        await eventually(lambda: plugin.passes >= passes + 2)  # retried each second
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 2, errors
        assert any("has no backend 'nope' (Can't find backend.)" in e for e in errors)
        assert any("no server 's9' (it has: s1, s2, s3)" in e for e in errors)
        # The operator fixes the config: s9 and the bogus backend are gone.
        plugin.configure(load_config_text(config_text(sock)))
        plugin.apply(table(2, sock, {"s1": ("up", 4), "s2": ("up", 4), "s3": ("up", 2)}))
        await plugin.wait_reconciled(2)
        nursery.cancel_scope.cancel()
    assert lab.servers_state("web") == {"s1": (0, 4), "s2": (0, 4), "s3": (0, 2)}
    assert plugin.problems == []
    assert any("resolved:" in r.getMessage() and "s9" in r.getMessage()
               for r in caplog.records)


async def test_end_to_end_engine_checks_and_admin_actions_move_haproxy(
        lab: HaproxyLab, servers: HttpServers) -> None:
    sock = str(lab.admin_sock)
    text = config_text(sock, ports={n: servers.port(n) for n in NAMES},
                       check='type = "connect"\ninterval = "200ms"\nfailure_count = 1')
    manager = load_plugins()
    config = load_config_text(text, checks=manager.checks)
    plugin = HaproxyBackendPlugin()
    plugin.configure(config)
    engine = Engine(config, manager.checks, apply=plugin.apply, event=lambda _: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plugin.run)
        await nursery.start(engine.run)
        await state_becomes(lab, {n: (0, 1) for n in NAMES})
        await trio.to_thread.run_sync(servers.stop, "s2")  # s2 dies: the engine sees it
        engine.set_admin(Admin.DRAIN, None, "s3")  # the operator drains s3
        await state_becomes(lab, {"s1": (0, 1), "s2": (1, 1), "s3": (8, 1)})
        assert await trio.to_thread.run_sync(lab.hits, 5) == Counter({"s1": 5})
        nursery.cancel_scope.cancel()


def test_ownership_comes_from_the_config_with_the_fallback_server() -> None:
    text = config_text("/run/h.sock") + '[virtual.fallback]\naddress = "127.0.0.1"\nport = 9\n'
    owned = plugin_module.owned_servers(load_config_text(text))
    assert owned == {("/run/h.sock", "web"): frozenset({"s1", "s2", "s3", "fallback"})}


def test_desired_view_rebuilds_only_backends_whose_services_changed() -> None:
    view = plugin_module.DesiredView()
    a = service("/s", "a", {"x": ("up", 1)})
    b = service("/s", "b", {"y": ("up", 1)})
    l4 = replace(a, layer=4, haproxy_backend=None, haproxy_socket=None)
    assert view.update(DesiredTable(1, (a, b, l4))) == ({("/s", "a"), ("/s", "b")}, True)
    b2 = service("/s", "b", {"y": ("drain", 0)})
    assert view.update(DesiredTable(2, (a, b2, l4))) == ({("/s", "b")}, False)
    assert view.wanted[("/s", "b")]["y"].state == "drain"
    assert view.update(DesiredTable(3, (a, b2, l4))) == (set(), False)
    assert view.update(DesiredTable(4, (a,))) == ({("/s", "a"), ("/s", "b")}, True)
    assert set(view.wanted) == {("/s", "a")}


async def _hostile_cli(path: Path, behaviour: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A fake stats socket: answers garbage, or closes in the middle of a reply."""
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen(8)
    task_status.started()
    with listener:
        for _ in range(20):
            conn, _ = await listener.accept()
            with conn:
                await conn.recv(4096)
                if behaviour == "garbage":
                    await conn.send(b"\n> \xff\xfegarbage without a pid\n\n> " * 4)
                else:
                    await conn.send(b"\n> Name: HAProxy\nVersion: 2.6")


@pytest.mark.parametrize(("behaviour", "reason"), [
    ("garbage", "`show info` reply without a Pid line"),
    ("close", "closed the connection"),
])
async def test_hostile_stats_sockets_give_clear_errors(tmp_path: Path, behaviour: str,
                                                       reason: str) -> None:
    sock = tmp_path / "hostile.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(_hostile_cli, sock, behaviour)
        plugin = make_plugin(str(sock))
        plugin.apply(table(1, str(sock), {"s1": ("up", 1)}))
        with trio.fail_after(3):
            await plugin.reconcile()
        nursery.cancel_scope.cancel()
    assert len(plugin.problems) == 1
    assert reason in plugin.problems[0]


async def test_a_bug_in_a_pass_is_logged_once_and_the_service_carries_on(
        lab: HaproxyLab, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real_plan = plugin_module.plan_backend

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug in planning")

    monkeypatch.setattr(plugin_module, "plan_backend", broken)
    plugin = make_plugin(str(lab.admin_sock))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plugin.run)
        plugin.apply(table(1, str(lab.admin_sock), {n: ("up", 3) for n in NAMES}))
        await eventually(lambda: bool(plugin.problems))
        assert plugin.problems == ["HAProxy plugin pass failed: RuntimeError: bug in planning"]
        await trio.sleep(1.2)  # retried, not re-logged
        assert len([r for r in caplog.records if "bug in planning" in r.getMessage()]) == 1
        monkeypatch.setattr(plugin_module, "plan_backend", real_plan)
        await state_becomes(lab, {n: (0, 3) for n in NAMES})
        nursery.cancel_scope.cancel()
    assert plugin.problems == []
