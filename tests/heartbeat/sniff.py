"""A sniffer for gratuitous ARPs and unsolicited neighbour advertisements (tests and bench).

Run in a lab namespace: `Sniffer(lab, host, log)` starts it, `announcements()` stops it and
returns (CLOCK_MONOTONIC time, address) for every GARP / NA it saw, oldest first; monotonic
time is the same in every namespace, so the times compare with the caller's.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from cli_process import PYTHON

from .netns import Lab, wait_for

SCRIPT = r"""
import ipaddress, json, signal, socket, struct, sys, time
seen = []
stop = False
def done(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, done)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sock.bind(("eth0", 0))
sock.settimeout(0.05)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while not stop and time.monotonic() < end:
    try:
        frame = sock.recv(2048)
    except (TimeoutError, InterruptedError):
        continue
    at = time.monotonic()
    kind = struct.unpack("!H", frame[12:14])[0]
    if kind == 0x0806 and len(frame) >= 42 and frame[20:22] == b"\0\1" \
            and frame[28:32] == frame[38:42]:
        seen.append((at, str(ipaddress.IPv4Address(frame[28:32]))))
    elif kind == 0x86DD and len(frame) >= 78 and frame[20] == 58 and frame[54] == 136 \
            and frame[58] & 0x20:
        seen.append((at, str(ipaddress.IPv6Address(frame[62:78]))))
print(json.dumps(seen), flush=True)
"""


class Sniffer:
    def __init__(self, lab: Lab, host: str, log: Path, seconds: float = 60) -> None:
        self.log = log
        self.proc = lab.start(host, [PYTHON, "-c", SCRIPT, str(seconds)], log)
        if not wait_for(lambda: "ready" in log.read_text(), 10, 0.02):
            raise RuntimeError(f"sniffer did not start: {log.read_text()}")

    def announcements(self) -> list[tuple[float, str]]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        last = self.log.read_text().strip().splitlines()[-1]
        return [(float(t), str(a)) for t, a in json.loads(last)]
