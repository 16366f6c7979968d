"""The engine under trio's MockClock: scheduling, deadlines, sharing, cycles, admin, reload."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pytest
import trio
import trio.testing

from lbha.admin_state import AdminStore, StateFileError
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult
from lbha.config import load_config_text
from lbha.desired import DesiredTable
from lbha.engine import TICK, Engine, EngineError
from lbha.events import Event, RealServerEvent, Severity
from lbha.model import Config
from lbha.table import Admin


@dataclass
class FakeCheck:
    """A check whose verdict and duration the test controls per real server address."""

    name: str
    negotiate: bool = False
    description: str = "fake"
    options: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    verdicts: dict[str, bool] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[float, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    crash: bool = False

    async def check(self, request: CheckRequest) -> CheckResult:
        rip = str(request.target.rip)
        self.calls.append((trio.current_time(), rip))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(self.delays.get(rip, 0.01))
            if self.crash:
                raise RuntimeError("boom")
            ok = self.verdicts.get(rip, True)
            return CheckResult(ok, f"{self.name} {'ok' if ok else 'says no'} on {rip}")
        finally:
            self.in_flight -= 1


class Harness:
    def __init__(self, text: str, *checks: FakeCheck, store: AdminStore | None = None) -> None:
        self.registry = CheckRegistry()
        for check in checks:
            self.registry.add(check)
        self.tables: list[DesiredTable] = []
        self.events: list[Event] = []
        self.config = self.load(text)
        self.engine = Engine(self.config, self.registry, apply=self.tables.append,
                             event=self.events.append, admin_store=store)

    def load(self, text: str) -> Config:
        return load_config_text(text, checks=self.registry)

    def weights(self, virtual: str | None = None) -> dict[str, int]:
        table = self.tables[-1]
        return {d.name: d.weight for s in table.services
                if virtual is None or s.virtual == virtual for d in s.destinations}

    def transitions(self) -> list[tuple[str, str, str]]:
        return [(e.real, e.old_state, e.new_state) for e in self.events
                if isinstance(e, RealServerEvent)]


def config(reals: int = 3, check: str = 'type = "fake"', extra: str = "",
           checks: str = "") -> str:
    text = f"[checks]\n{checks}\n[[virtual]]\nname = \"web\"\naddress = \"198.18.0.100\"\n" \
           f"ports = 80\n{extra}\n[virtual.check]\n{check}\n"
    for i in range(reals):
        text += f'[[virtual.real]]\nname = "r{i}"\naddress = "198.18.{(20 + i) // 256}.' \
                f'{(20 + i) % 256}"\n'
    return text


async def run_for(h: Harness, seconds: float, during: Callable[[], None] | None = None) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(h.engine.run)
        await trio.sleep(seconds)
        if during is not None:
            during()
        nursery.cancel_scope.cancel()


async def test_every_server_checked_every_interval_with_spread_start(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeCheck("fake")
    h = Harness(config(reals=10), fake)
    await run_for(h, 19.9)
    per_server: dict[str, list[float]] = {}
    for t, rip in fake.calls:
        per_server.setdefault(rip, []).append(t)
    assert len(per_server) == 10
    for times in per_server.values():
        assert len(times) == 4
        assert all(abs((b - a) - 5.0) < 1e-6 for a, b in itertools.pairwise(times))
    first = sorted(times[0] for times in per_server.values())
    assert first == pytest.approx([i * 0.5 for i in range(10)])  # spread over the interval
    assert h.weights() == {f"r{i}": 1 for i in range(10)}


async def test_hung_server_times_out_and_delays_no_one(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeCheck("fake", delays={"198.18.0.20": 1000.0})
    h = Harness(config(reals=3, checks='timeout = "3s"\nfailure_count = 1'), fake)
    await run_for(h, 16.0)
    r0 = h.engine.status()["virtuals"][0]["reals"][0]
    assert r0["state"] == "down"
    assert r0["reason"] == "timeout after 3.0 s"
    r1 = [t for t, rip in fake.calls if rip == "198.18.0.21"]
    # On schedule (to the scheduler tick), undisturbed by the hung server.
    assert r1 == pytest.approx([5 / 3, 5 / 3 + 5, 5 / 3 + 10], abs=TICK)
    assert h.weights() == {"r1": 1, "r2": 1}


async def test_concurrency_bounds_checks_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeCheck("fake", delays={f"198.18.0.{20 + i}": 2.0 for i in range(8)})
    h = Harness(config(reals=8, checks="concurrency = 2"), fake)
    await run_for(h, 30.0)
    assert fake.max_in_flight == 2
    assert len(fake.calls) > 8


async def test_shared_server_is_checked_once_per_interval(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeCheck("fake", verdicts={"198.18.0.20": False})
    text = config(reals=1) + config(reals=1).replace('name = "web"', 'name = "web2"').replace(
        "198.18.0.100", "198.18.0.101").split("[checks]\n\n", 1)[1]
    h = Harness(text, fake)
    await run_for(h, 10.5)
    assert len(fake.calls) == 3  # not 6: one job for both VIPs
    assert sorted(h.transitions()) == [("r0", "unchecked", "down")] * 2


async def test_crashing_check_is_a_failure_with_reason(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(config(reals=1), FakeCheck("fake", crash=True))
    await run_for(h, 1.0)
    reason = h.engine.status()["virtuals"][0]["reals"][0]["reason"]
    assert reason == "check 'fake' failed: RuntimeError: boom"


async def test_n_connects_then_one_negotiate(autojump_clock: trio.testing.MockClock) -> None:
    connect, http = FakeCheck("connect"), FakeCheck("httpx", negotiate=True)
    h = Harness(config(reals=1, check='service = "httpx"\nconnects_per_negotiate = 2'),
                connect, http)
    await run_for(h, 29.0)
    order = sorted([(t, "c") for t, _ in connect.calls] + [(t, "n") for t, _ in http.calls])
    assert "".join(kind for _, kind in order) == "ccnccn"


async def test_missing_plugin_is_a_clear_failure(autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(config(reals=1, check='type = "negotiate"\nservice = "https"'))
    await run_for(h, 1.0)
    reason = h.engine.status()["virtuals"][0]["reals"][0]["reason"]
    assert reason == "no installed plugin provides check 'https'"


async def test_on_and_off(autojump_clock: trio.testing.MockClock) -> None:
    text = config(reals=1, check='type = "on"') + config(reals=1, check='type = "off"').replace(
        'name = "web"', 'name = "off"').replace("ports = 80", "ports = 81").split(
        "[checks]\n\n", 1)[1]
    h = Harness(text)
    await run_for(h, 1.0)
    assert h.weights("web") == {"r0": 1}
    assert h.weights("off") == {}


async def test_fallback_enters_and_leaves(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeCheck("fake", verdicts={"198.18.0.20": False, "198.18.0.21": False})
    extra = '[virtual.fallback]\naddress = "198.18.0.99"'
    h = Harness(config(reals=2, extra=extra, checks="failure_count = 1"), fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.engine.run)
        await trio.sleep(6)
        assert h.weights() == {"fallback": 1}
        fake.verdicts["198.18.0.21"] = True
        await trio.sleep(5)
        assert h.weights() == {"r1": 1}
        nursery.cancel_scope.cancel()
    assert [e.message for e in h.events if e.kind == "fallback"] == [
        "web: fallback server in use", "web: fallback server no longer in use"]


async def test_drain_halt_online_persist(tmp_path: Path,
                                         autojump_clock: trio.testing.MockClock) -> None:
    store = AdminStore(tmp_path / "state.json")
    h = Harness(config(reals=3), FakeCheck("fake"), store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.engine.run)
        await trio.sleep(6)
        h.engine.set_admin(Admin.DRAIN, "web", "r0")
        h.engine.set_admin(Admin.HALT, "198.18.0.100", "198.18.0.21")
        await trio.sleep(0.1)
        assert h.weights() == {"r0": 0, "r2": 1}
        with pytest.raises(EngineError, match="no real server 'r9' in virtual service 'web'"):
            h.engine.set_admin(Admin.DRAIN, "web", "r9")
        with pytest.raises(EngineError, match="no virtual service named or addressed 'nope'"):
            h.engine.set_admin(Admin.DRAIN, "nope", "r0")
        nursery.cancel_scope.cancel()
    # A restarted daemon starts with the operator's actions in force.
    again = Harness(config(reals=3), FakeCheck("fake"), store=store)
    await run_for(again, 6.0)
    assert again.weights() == {"r0": 0, "r2": 1}
    again.engine.set_admin(Admin.ONLINE, None, "198.18.0.20")
    assert store.load() == {("web", "r1"): Admin.HALT}


async def test_reload_keeps_unchanged_servers(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeCheck("fake")
    h = Harness(config(reals=3), fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.engine.run)
        await trio.sleep(6)
        before = {r["name"]: r for r in h.engine.status()["virtuals"][0]["reals"]}
        events = len(h.events)
        # r1 changes address (re-checked from scratch), r2 is removed, r3 is new.
        new = config(reals=2).replace('address = "198.18.0.21"', 'address = "198.18.0.31"')
        new += '[[virtual.real]]\nname = "r3"\naddress = "198.18.0.23"\n'
        h.engine.reload(h.load(new))
        await trio.sleep(0.01)
        after = {r["name"]: r for r in h.engine.status()["virtuals"][0]["reals"]}
        assert after["r0"]["since"] == pytest.approx(before["r0"]["since"], abs=0.5)
        assert after["r0"]["state"] == "up"
        assert after["r1"]["state"] == "down (unchecked)"
        assert "r2" not in after
        assert after["r3"]["state"] == "down (unchecked)"
        await trio.sleep(6)
        assert h.engine.status()["virtuals"][0]["reals"][1]["state"] == "up"
        assert ("r0", "unchecked", "up") not in h.transitions()[events:]
        nursery.cancel_scope.cancel()


async def test_tables_have_increasing_generations(autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(config(reals=2), FakeCheck("fake"))
    await run_for(h, 11.0)
    generations = [t.generation for t in h.tables]
    assert generations == sorted(set(generations))


@dataclass
class FakeBatch(FakeCheck):
    """A check type with check_batch: records batch sizes; can crash, hang or miscount."""

    batches: list[int] = field(default_factory=list)
    mode: str = "ok"

    async def check_batch(self, requests: list[CheckRequest]) -> list[CheckResult]:
        self.batches.append(len(requests))
        if self.mode == "crash":
            raise RuntimeError("batch boom")
        if self.mode == "hang":
            await trio.sleep_forever()
        results = [await self.check(r) for r in requests]
        return results[:-1] if self.mode == "short" else results


async def test_checks_due_in_one_tick_go_as_one_batch(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeBatch("fake")
    h = Harness(config(reals=1000), fake)
    await run_for(h, 5.5)
    assert len({rip for _, rip in fake.calls}) == 1000
    # Every check went through a batch (the last few may be cut by the end of the run).
    assert len(fake.calls) <= sum(fake.batches) <= len(fake.calls) + sum(fake.batches[-3:])
    assert max(fake.batches) > 1
    assert len(fake.batches) <= 5.5 / TICK + 1  # at most one per tick
    assert h.weights() == {f"r{i}": 1 for i in range(1000)}


@pytest.mark.parametrize(("mode", "reason"), [
    ("crash", "check 'fake' failed: RuntimeError: batch boom"),
    ("hang", "timeout after 3.0 s"),
    ("short", "check 'fake' returned a malformed batch"),
])
async def test_a_bad_batch_check_fails_its_servers_with_a_reason(
        mode: str, reason: str, autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(config(reals=4), FakeBatch("fake", mode=mode))
    await run_for(h, 10.0)
    reasons = {r["reason"] for r in h.engine.status()["virtuals"][0]["reals"]}
    assert reasons == {reason}


async def test_more_batchable_jobs_due_than_slots_do_not_deadlock(
        autojump_clock: trio.testing.MockClock) -> None:
    # Regression: jobs held for a batch own slots; waiting for a slot before starting the
    # batch waited forever when more were due at once than `concurrency` allows.
    fake = FakeBatch("fake")
    h = Harness(config(reals=50, checks='concurrency = 2\ninterval = "10ms"'), fake)
    await run_for(h, 1.0)
    assert len({rip for _, rip in fake.calls}) == 50
    assert max(fake.batches) <= 2


# ------------------------------------------------------------ operator actions, state file


def admins(h: Harness) -> dict[str, str]:
    return {r["name"]: r["admin"] for v in h.engine.status()["virtuals"] for r in v["reals"]}


async def test_drain_and_halt_survive_a_reload_to_a_config_without_the_server_and_back(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store = AdminStore(tmp_path / "state.json")
    h = Harness(config(reals=3), FakeCheck("fake"), store=store)
    other = config(reals=1).replace('name = "web"', 'name = "api"')
    async with trio.open_nursery() as nursery:
        await nursery.start(h.engine.run)
        await trio.sleep(6)
        h.engine.set_admin(Admin.DRAIN, "web", "r0")
        h.engine.set_admin(Admin.HALT, "web", "r1")
        h.engine.reload(h.load(other))
        await trio.sleep(1)
        assert admins(h) == {"r0": "online"}  # api/r0 is another server
        # Kept, not dropped, while the servers are out of the config.
        assert store.load() == {("web", "r0"): Admin.DRAIN, ("web", "r1"): Admin.HALT}
        h.engine.set_admin(Admin.HALT, "api", "r0")  # a save meanwhile keeps them too
        h.engine.reload(h.load(config(reals=3)))
        await trio.sleep(6)
        assert admins(h) == {"r0": "drain", "r1": "halt", "r2": "online"}
        assert h.weights() == {"r0": 0, "r2": 1}
        nursery.cancel_scope.cancel()
    assert store.load() == {("web", "r0"): Admin.DRAIN, ("web", "r1"): Admin.HALT,
                            ("api", "r0"): Admin.HALT}


async def test_an_action_that_cannot_be_saved_is_not_applied(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    state_dir = tmp_path / "state"
    store = AdminStore(state_dir / "healthd-state.json")
    h = Harness(config(reals=3), FakeCheck("fake"), store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.engine.run)
        await trio.sleep(6)
        h.engine.set_admin(Admin.DRAIN, "web", "r0")
        await trio.sleep(1)
        tables, events = len(h.tables), len(h.events)
        # The state dir becomes unusable (even for root: a file where the directory was).
        state_dir.rename(tmp_path / "state.moved")
        state_dir.write_text("not a directory")
        with pytest.raises(StateFileError, match="cannot save operator actions"):
            h.engine.set_admin(Admin.HALT, "web", "r1")
        with pytest.raises(StateFileError):
            h.engine.set_admin(Admin.ONLINE, "web", "r0")
        await trio.sleep(1)
        assert admins(h) == {"r0": "drain", "r1": "online", "r2": "online"}
        assert h.weights() == {"r0": 0, "r1": 1, "r2": 1}
        assert len(h.events) == events
        assert all(t.services == h.tables[tables - 1].services for t in h.tables[tables:])
        # Once it can be saved again, the same action goes through.
        state_dir.unlink()
        (tmp_path / "state.moved").rename(state_dir)
        h.engine.set_admin(Admin.HALT, "web", "r1")
        await trio.sleep(1)
        assert h.weights() == {"r0": 0, "r2": 1}
        nursery.cancel_scope.cancel()
    assert store.load() == {("web", "r0"): Admin.DRAIN, ("web", "r1"): Admin.HALT}


DAMAGED = {
    "empty": "",
    "truncated": '{"version": 1, "admin": [{"virtual": "web", "real": "r0", "act',
    "garbage": "\x00\x17 not json at all",
    "unknown version": '{"version": 7, "admin": []}',
    "bad action": '{"version": 1, "admin": [{"virtual": "web", "real": "r0", "action": "x"}]}',
    "not an object": "[1, 2, 3]",
}


@pytest.mark.parametrize("kind", list(DAMAGED))
@pytest.mark.parametrize("policy", ["online", "halt"])
async def test_a_damaged_state_file_is_kept_aside_logged_and_the_policy_applied(
        kind: str, policy: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "healthd-state.json"
    path.write_text(DAMAGED[kind])
    text = f'[paths]\ndamaged_state = "{policy}"\n' + config(reals=2)
    with caplog.at_level(logging.ERROR):
        h = Harness(text, FakeCheck("fake"), store=AdminStore(path))
    kept = list(tmp_path.glob("healthd-state.json.damaged-*"))
    assert len(kept) == 1
    assert kept[0].read_text() == DAMAGED[kind]
    assert time.strftime("%Y%m%d", time.gmtime()) in kept[0].name
    problem = h.engine.status()["state_problem"]
    assert f"damaged state file {path}" in problem
    assert f"kept as {kept[0]}" in problem
    assert f"every real server starts {policy} (paths.damaged_state)" in problem
    if kind == "unknown version":
        assert "unknown version 7 (this lbha reads version 1)" in problem
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [problem]
    await run_for(h, 6)
    assert [e.severity for e in h.events if e.message == problem] == [Severity.CRITICAL]
    assert admins(h) == {"r0": policy, "r1": policy}
    if policy == "halt":
        assert h.weights() == {}
        # Saved: a restart keeps failing closed rather than finding no file.
        assert AdminStore(path).load() == {("web", "r0"): Admin.HALT,
                                           ("web", "r1"): Admin.HALT}
    else:
        assert h.weights() == {"r0": 1, "r1": 1}
        assert not path.exists()


async def test_an_unreadable_state_file_is_reported_with_the_policy(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "healthd-state.json"
    path.mkdir()  # unreadable as a file, for root too
    text = '[paths]\ndamaged_state = "drain"\n' + config(reals=1)
    h = Harness(text, FakeCheck("fake"), store=AdminStore(path))
    problem = h.engine.status()["state_problem"]
    assert problem.startswith(f"cannot read {path}: ")
    assert problem.endswith("every real server starts drain (paths.damaged_state)")
    assert admins(h) == {"r0": "drain"}


async def test_a_sound_state_file_is_no_problem(tmp_path: Path) -> None:
    path = tmp_path / "healthd-state.json"
    path.write_text(json.dumps({"version": 1, "admin": [
        {"virtual": "web", "real": "r1", "action": "halt"}]}))
    h = Harness(config(reals=2), FakeCheck("fake"), store=AdminStore(path))
    assert h.engine.status()["state_problem"] is None
    assert admins(h) == {"r0": "online", "r1": "halt"}


async def test_since_is_the_daemon_start_until_a_server_changes(
        autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeCheck("fake")
    h = Harness('[checks]\ninitial_state = "up"\n' + config(reals=2).replace("[checks]\n", ""),
                fake)
    autojump_clock.jump(100_000)  # trio's clock has an arbitrary origin, far from 0
    async with trio.open_nursery() as nursery:
        wall_start = time.time()
        await nursery.start(h.engine.run)
        await trio.sleep(6)
        fake.verdicts["198.18.0.21"] = False
        await trio.sleep(20)
        status = h.engine.status()
        nursery.cancel_scope.cancel()
    r0, r1 = status["virtuals"][0]["reals"]
    # r0 was up from the start and never changed: its since is the start, not a day ago.
    assert r0["since"] == pytest.approx(status["started"], abs=0.01)
    assert abs(r0["since"] - (wall_start - 26)) < 5
    assert r0["changed"] is False
    assert r1["state"] == "down"
    assert r1["changed"] is True
    assert r1["since"] > r0["since"] + 5
