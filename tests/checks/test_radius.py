"""`radius` against a real FreeRADIUS started here, scripted hostile UDP servers, and fuzzing."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cli_runs import healthd, lbha, reals, virtual, wait_status, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrad.packet import AccessAccept, AccessChallenge, AccessReject, AccountingResponse, AuthPacket
from resources import free_port, open_fds, settle

from lbha.checkapi import Transcript
from lbha.checks.radius import (
    MAX_DATAGRAMS,
    RadiusCheck,
    access_request,
    judge_reply,
    radius_dictionary,
)
from lbha.plugin_manager import PluginManager
from lbha.testing import run_check_now

#: A skip for want of the real server is a failure in CI (tests/conftest.py).
pytestmark = pytest.mark.real_server

SECRET = "testing-secret"
USER, PASSWORD = "alice", "alice-pw"
#: Accounts whose password is one letter, and a word every transcript and reason carries.
SHORT_USER, SHORT_PASSWORD = "bob", "e"
WORD_USER, WORD_PASSWORD = "carol", "Access"
FREERADIUS = shutil.which("freeradius") or "/usr/sbin/freeradius"
CONFIG = Path("/etc/freeradius/3.0")


@dataclass(frozen=True)
class Freeradius:
    port: int


def _answers(port: int) -> bool:
    """One Access-Request with a short timeout: does the server answer yet?"""
    packet = access_request(USER, PASSWORD, SECRET.encode(), "lbha-test")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.connect(("127.0.0.1", port))
        try:
            sock.send(packet.RequestPacket())
            return judge_reply(packet, sock.recv(4096), USER).result is not None
        except OSError:
            return False


@pytest.fixture(scope="module")
def freeradius(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Freeradius]:
    if not Path(FREERADIUS).exists() or not CONFIG.is_dir():
        pytest.skip("freeradius not installed (scripts/install-system-packages installs it)")
    tmp = tmp_path_factory.mktemp("freeradius")
    raddb = tmp / "raddb"
    shutil.copytree(CONFIG, raddb, symlinks=True)
    # Our own site only, and no EAP: its certificates are made by a package script we
    # do not want to depend on.
    (raddb / "mods-enabled" / "eap").unlink()
    for site in (raddb / "sites-enabled").iterdir():
        site.unlink()
    conf = raddb / "radiusd.conf"
    text = conf.read_text()
    for key, value in (("logdir", tmp), ("run_dir", tmp)):
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} = ") else line
                         for line in text.splitlines())
    # Run as root in a tmp dir the freerad user could not read.
    text = text.replace("\tuser = freerad", "").replace("\tgroup = freerad", "")
    conf.write_text(text + "\n")
    port = free_port(socket.SOCK_DGRAM)
    (raddb / "sites-enabled" / "lbha").write_text(textwrap.dedent(f"""\
        server lbha {{
            listen {{
                type = auth
                ipaddr = 127.0.0.1
                port = {port}
            }}
            listen {{
                type = auth
                ipv6addr = ::1
                port = {port}
            }}
            authorize {{
                files
                pap
            }}
            authenticate {{
                Auth-Type PAP {{
                    pap
                }}
            }}
            post-auth {{
                Post-Auth-Type REJECT {{
                    update reply {{
                        Reply-Message := "wrong password for %{{User-Name}}"
                    }}
                }}
            }}
        }}
        """))
    (raddb / "clients.conf").write_text(textwrap.dedent(f"""\
        client lbha4 {{
            ipaddr = 127.0.0.1
            secret = {SECRET}
        }}
        client lbha6 {{
            ipv6addr = ::1
            secret = {SECRET}
        }}
        """))
    (raddb / "mods-config" / "files" / "authorize").write_text(textwrap.dedent(f"""\
        {USER} Cleartext-Password := "{PASSWORD}"
        \tReply-Message := "Hello, %{{User-Name}}"
        challenged Cleartext-Password := "x", Response-Packet-Type := Access-Challenge
        \tReply-Message := "Enter your token"
        {SHORT_USER} Cleartext-Password := "{SHORT_PASSWORD}"
        {WORD_USER} Cleartext-Password := "{WORD_PASSWORD}"
        """))
    process = subprocess.Popen([FREERADIUS, "-f", "-l", str(tmp / "radius.log"), "-d", str(raddb)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not _answers(port):
            if process.poll() is not None:
                raise RuntimeError(f"freeradius exited with {process.returncode}; see "
                                   f"{tmp / 'radius.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("freeradius did not answer within 20 s")
        yield Freeradius(port)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def timed(**kwargs: object) -> tuple[object, float]:
    start = trio.current_time()
    result = await run_check_now("radius", **kwargs)
    return result, trio.current_time() - start


def creds(port: int, **overrides: object) -> dict[str, object]:
    return {"rport": port, "login": USER, "password": PASSWORD, "secret": SECRET, **overrides}


def test_registered_through_the_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    assert isinstance(manager.register_checks().get("radius"), RadiusCheck)


# --------------------------------------------------------------------------- real FreeRADIUS


async def test_access_accept_is_up(freeradius: Freeradius) -> None:
    transcript = Transcript()
    result = await run_check_now("radius", **creds(freeradius.port), transcript=transcript)
    assert result.up, result.reason
    assert result.reason == f"Access-Accept for {USER}"
    assert transcript.lines[-1] == "< Access-Accept"
    assert transcript.lines[0].startswith("> Access-Request id=")


async def test_ipv6_is_up(freeradius: Freeradius) -> None:
    result = await run_check_now("radius", rip="::1", **creds(freeradius.port))
    assert result.up, result.reason


@pytest.mark.wallclock
async def test_wrong_password_is_down_with_the_reply_message(freeradius: Freeradius) -> None:
    # FreeRADIUS delays every Access-Reject by reject_delay (1 s by default).
    result, elapsed = await timed(**creds(freeradius.port, password="wrong"),
                                  negotiate_timeout=2.5)
    assert not result.up
    assert result.reason == f"Access-Reject for {USER}: wrong password for {USER}"
    assert elapsed < 2.5


async def test_challenge_is_down(freeradius: Freeradius) -> None:
    result = await run_check_now("radius", **creds(freeradius.port, login="challenged",
                                                   password="x"))
    assert not result.up
    assert result.reason == ("Access-Challenge for challenged: the server wants more than a "
                             "password (use a PAP test account): Enter your token")


@pytest.mark.wallclock
async def test_wrong_secret_is_down_within_the_deadline(freeradius: Freeradius) -> None:
    # FreeRADIUS drops a request whose Message-Authenticator does not verify, silently.
    result, elapsed = await timed(**creds(freeradius.port, secret="not-the-secret"),
                                  negotiate_timeout=0.6)
    assert not result.up
    assert result.reason == (
        f"no valid reply from 127.0.0.1:{freeradius.port} within 0.5 s (3 Access-Requests "
        "sent; is this director a client of the server, with the same secret?)")
    assert elapsed < 0.7


@pytest.mark.wallclock
async def test_stopped_server_is_down_at_once() -> None:
    port = free_port(socket.SOCK_DGRAM)
    result, elapsed = await timed(**creds(port))
    assert not result.up
    assert result.reason == f"RADIUS request to 127.0.0.1:{port} refused"
    assert elapsed < 0.5


async def test_missing_secret_or_login_is_down() -> None:
    result = await run_check_now("radius", rport=1812, login=USER)
    assert result.reason == "radius check has no secret: set secret"
    result = await run_check_now("radius", rport=1812, secret=SECRET)
    assert result.reason == "radius check has no login: set login and password"
    result = await run_check_now("radius", rport=1812, login=USER, secret=SECRET,
                                 password="x" * 200)
    assert result.reason.startswith("cannot build the Access-Request:")


# ------------------------------------------------- secrets in the CLI, status and daemon logs


def _credentials(login: str, password: str) -> str:
    return f'login = "{login}"\npassword = "{password}"\nsecret = "{SECRET}"'


@pytest.mark.parametrize(("login", "password"), [(SHORT_USER, SHORT_PASSWORD),
                                                 (WORD_USER, WORD_PASSWORD)],
                         ids=["one-letter", "common-word"])
def test_a_short_or_common_password_leaves_check_output_whole(
    freeradius: Freeradius, tmp_path: Path, login: str, password: str,
) -> None:
    # Searching lines for the password's text (as lbha once did) turned these into
    # "Acc****ss-R****qu****st" and "****-Accept".
    config = write_config(tmp_path, virtual(tmp_path, "radius", 1, "radius", freeradius.port,
                                            _credentials(login, password)))
    out = lbha("check", str(config), "radius", "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (f"radius r (127.0.0.1:{freeradius.port}) radius: UP: "
                        f"Access-Accept for {login}")
    assert re.fullmatch(rf"    > Access-Request id=\d+ User-Name={login} \(attempt 1 of 3\)",
                        lines[1]), lines
    assert lines[2:] == ["    < Access-Accept"]


def test_a_failing_check_shows_no_secret_anywhere(freeradius: Freeradius, tmp_path: Path) -> None:
    long_wrong = "wrong-pw-7f3a9c"
    config = write_config(
        tmp_path,
        virtual(tmp_path, "short", 1, "radius", freeradius.port, _credentials(USER, "e")),
        virtual(tmp_path, "long", 2, "radius", freeradius.port,
                _credentials(USER, long_wrong)),
        checks='interval = "1s"\nfailure_count = 1',
    )
    secrets = (SECRET, long_wrong)
    rejected = f"Access-Reject for {USER}: wrong password for {USER}"
    shown = lbha("config", "show", str(config))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count('password = "****"') == 2
    assert shown.stdout.count('secret = "****"') == 2
    outputs = {"config show": shown.stdout + shown.stderr}
    for name in ("short", "long"):
        out = lbha("check", str(config), name, "-v")
        assert out.returncode == 1
        assert out.stdout.startswith(f"{name} r (127.0.0.1:{freeradius.port}) radius: DOWN: "
                                     f"{rejected}\n"), out.stdout
        assert "    < Access-Reject" in out.stdout.splitlines()
        outputs[f"check {name} -v"] = out.stdout + out.stderr
    log = tmp_path / "healthd.log"
    with healthd(config, log):
        status = wait_status(config, lambda s: all(r["state"] == "down"
                                                   for r in reals(s).values()))
        text = lbha("status", "--config", str(config)).stdout
    assert {r["reason"] for r in reals(status).values()} == {rejected}
    assert f"short: real server r is down: {rejected}" in log.read_text()
    assert f"long: real server r is down: {rejected}" in log.read_text()
    assert text.count(f": {rejected}") == 2, text
    outputs |= {"daemon log": log.read_text(), "status": text, "status --json": str(status)}
    for what, output in outputs.items():
        for secret in secrets:
            assert secret not in output, (what, secret)


# --------------------------------------------------------------------------- scripted servers

def reply_to(data: bytes, code: int = AccessAccept, secret: str = SECRET,
             message: str | None = None, message_authenticator: bool = True) -> bytes:
    """A correctly signed reply to the request in `data`, as a server with `secret` makes it."""
    request = AuthPacket(packet=data, secret=secret.encode(), dict=radius_dictionary())
    reply = request.CreateReply()
    reply.code = code
    if message is not None:
        reply["Reply-Message"] = message
    if not message_authenticator:
        reply.message_authenticator = False
    return reply.ReplyPacket()


@asynccontextmanager
async def udp_server(respond: Callable[[int, bytes], list[bytes]]) -> AsyncIterator[int]:
    """A UDP server on a free port answering the n-th request (from 1) with respond(n, data)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def serve() -> None:
        count = 0
        while True:
            data, peer = await sock.recvfrom(4096)
            count += 1
            for datagram in respond(count, data):
                await sock.sendto(datagram, peer)

    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield sock.getsockname()[1]
            nursery.cancel_scope.cancel()


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


HOSTILE: dict[str, tuple[Callable[[int, bytes], list[bytes]], str]] = {
    "silent": (lambda n, d: [], "is this director a client of the server"),
    "garbage": (lambda n, d: [b"\xde\xad\xbe\xef" * 10], "ignored a reply to another request"),
    "garbage with our id": (lambda n, d: [bytes([2, d[1]]) + b"\xde\xad\xbe\xef" * 10],
                            "ignored a malformed reply (Packet has invalid length)"),
    "truncated": (lambda n, d: [reply_to(d)[:12]], "ignored a 12-byte datagram"),
    "truncated attributes": (lambda n, d: [reply_to(d, message="hello")[:-3]],
                             "ignored a malformed reply"),
    "wrong secret": (lambda n, d: [reply_to(d, secret="other")],
                     "authenticator does not verify (wrong secret?)"),
    "forged authenticator": (lambda n, d: [flip(reply_to(d), 7)],
                             "authenticator does not verify"),
    "tampered attribute": (lambda n, d: [flip(reply_to(d, message="ok"), 40)],
                           "authenticator does not verify"),
    "other id": (lambda n, d: [bytes([2, (d[1] + 1) % 256]) + reply_to(d)[2:]],
                 "ignored a reply to another request"),
    "accounting response": (lambda n, d: [reply_to(d, code=AccountingResponse)],
                            "ignored a reply with code 5"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.wallclock
async def test_hostile_server_is_down_within_the_deadline(name: str) -> None:
    respond, words = HOSTILE[name]
    async with udp_server(respond) as port:
        result, elapsed = await timed(**creds(port), negotiate_timeout=0.6)
    assert not result.up
    assert result.reason.startswith(f"no valid reply from 127.0.0.1:{port} within 0.5 s "
                                    "(3 Access-Requests sent; ")
    assert words in result.reason
    assert elapsed < 0.7, elapsed


@pytest.mark.wallclock
async def test_a_flood_of_junk_ends_the_check() -> None:
    async with udp_server(lambda n, d: [b"junk"] * (MAX_DATAGRAMS + 10)) as port:
        result, elapsed = await timed(**creds(port), negotiate_timeout=3.0)
    assert not result.up
    assert result.reason == (f"127.0.0.1:{port} sent {MAX_DATAGRAMS} datagrams, none a valid "
                             "reply (last: ignored a 4-byte datagram (too short for RADIUS))")
    assert elapsed < 1


async def test_junk_before_the_real_reply_is_ignored() -> None:
    def respond(n: int, data: bytes) -> list[bytes]:
        return [bytes([2, data[1]]) + b"junk" * 10, reply_to(data, secret="other"),
                reply_to(data, message="hi")]
    transcript = Transcript()
    async with udp_server(respond) as port:
        result = await run_check_now("radius", **creds(port), transcript=transcript)
    assert result.up, result.reason
    assert transcript.lines[1:] == [
        "< ignored a malformed reply (Packet has invalid length)",
        "< ignored a reply whose authenticator does not verify (wrong secret?)",
        "< Access-Accept",
    ]


@pytest.mark.wallclock
async def test_a_lost_request_is_sent_again_within_the_deadline() -> None:
    # The first two requests are "lost"; the third one is answered.
    async with udp_server(lambda n, d: [reply_to(d)] if n == 3 else []) as port:
        result, elapsed = await timed(**creds(port), negotiate_timeout=0.9)
    assert result.up, result.reason
    assert 0.5 < elapsed < 0.9


async def test_one_attempt_when_told() -> None:
    transcript = Transcript()
    async with udp_server(lambda n, d: []) as port:
        result = await run_check_now("radius", **creds(port), negotiate_timeout=0.3,
                                     options={"attempts": 1}, transcript=transcript)
    assert "(1 Access-Request sent;" in result.reason
    # One request sent; the kit's deadline runner notes the verdict after it.
    sent = [line for line in transcript.lines if line.startswith(">")]
    assert len(sent) == 1
    assert sent[0].endswith("(attempt 1 of 1)")
    assert transcript.lines[-1] == f"* {result.reason}"


async def test_reply_without_message_authenticator_is_accepted() -> None:
    """Old servers sign only with the Response Authenticator; that still proves the secret."""
    async with udp_server(lambda n, d: [reply_to(d, message_authenticator=False)]) as port:
        result = await run_check_now("radius", **creds(port))
    assert result.up, result.reason


async def test_reject_with_hostile_reply_message_is_quoted_safely() -> None:
    async with udp_server(lambda n, d: [reply_to(d, code=AccessReject,
                                                 message="no\x1b[31m \u00e9t\u00e9")]) as port:
        result = await run_check_now("radius", **creds(port))
    assert result.reason == f"Access-Reject for {USER}: no?[31m \u00e9t\u00e9"


async def test_no_socket_growth_over_ten_thousand_checks(freeradius: Freeradius) -> None:
    fds = open_fds()
    verdicts: list[bool] = []

    async def one() -> None:
        verdicts.append((await run_check_now("radius", **creds(freeradius.port))).up)

    for _ in range(100):
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
    assert verdicts.count(True) == 10_000
    _, now_fds = await settle(10_000, fds)
    assert now_fds <= fds


# --------------------------------------------------------------------------- fuzzing

REQUEST = access_request(USER, PASSWORD, SECRET.encode(), "lbha")
REQUEST.RequestPacket()  # fixes the id and the Request Authenticator


def _valid_reply(code: int, message: str | None) -> bytes:
    return reply_to(REQUEST.RequestPacket(), code=code, message=message)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_any_datagram_gets_a_judgement(data: bytes) -> None:
    judgement = judge_reply(REQUEST, data, USER)
    # Without the secret nothing random can be believed.
    assert judgement.result is None
    assert judgement.note


@settings(max_examples=500)
@given(code=st.sampled_from([AccessAccept, AccessReject, AccessChallenge]),
       message=st.none() | st.text(max_size=60),
       index=st.integers(min_value=0, max_value=200), xor=st.integers(1, 255),
       padding=st.binary(max_size=20))
def test_fuzz_tampered_replies_are_never_believed(code, message, index, xor, padding) -> None:
    genuine = _valid_reply(code, message)
    assert judge_reply(REQUEST, genuine + padding, USER).result is not None  # padding is ok
    if index >= len(genuine):
        return
    tampered = genuine[:index] + bytes([genuine[index] ^ xor]) + genuine[index + 1:]
    judgement = judge_reply(REQUEST, tampered + padding, USER)
    # Every octet up to the Length is signed: any change must be refused.
    assert judgement.result is None, (index, judgement)
    assert judgement.note.startswith("ignored")

