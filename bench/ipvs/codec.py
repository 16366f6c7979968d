"""IPVS netlink codec cost: lbha's own codec against pyroute2's IPVS message classes.

    .venv/bin/python bench/ipvs/codec.py [--dests 1000] [--repeat 7]

No kernel and no socket: only the encoding and decoding a reconcile does, the part where the
two codecs differ (both would send the same bytes over a socket).

* dump: N GET_DEST replies, laid out as the kernel's ip_vs_genl_fill_dest writes them
  (statistics included), concatenated as one recv returns them, decoded into the
  (DestKey, DestSettings) the diff compares;
* apply: N destination "set" requests (every field, as lbha sends them) encoded into the
  bytes of one sendmsg.

Both decoders must agree on every destination and both encoders must produce requests that
pyroute2 reads back the same, or the run stops. The median of `--repeat` runs is printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2.netlink.generic.ipvs import ipvsmsg

from lbha.plugins import ipvs_netlink as nl
from lbha.plugins.ipvs_table import FWD_MASQ, DestKey, DestSettings, EditDest, ServiceKey

# The kernel's reply layout has one home, shared with the codec tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "plugins"))
from ipvs_replies import kernel_dest

FAMILY = 0x23  # a generic netlink family id, as the controller would hand out
NLM_F_MULTI = 0x2
SERVICE = ServiceKey(4, "tcp", "198.18.0.1", 80)


def dump_reply(seq: int, payload: bytes) -> bytes:
    """A genl payload behind the netlink header of one part of a dump (NLM_F_MULTI)."""
    return struct.pack("=IHHII", 16 + len(payload), FAMILY, NLM_F_MULTI, seq, 0) + payload


def table(n: int) -> list[tuple[DestKey, DestSettings]]:
    base = ipaddress.IPv4Address("198.18.1.0")
    return [(DestKey(str(base + i), 8080), DestSettings(FWD_MASQ, i % 7, 100, 1))
            for i in range(n)]


# ------------------------------------------------------------------ decoding a dump


def decode_ours(buf: bytes) -> list[tuple[DestKey, DestSettings]]:
    decoder = nl.DestDecoder()
    out = [decoder.decode(buf, start, end, 4)
           for _kind, _flags, _seq, start, end in nl.messages(buf, len(buf))]
    assert decoder.slow == 0, "the kernel layout must take the one-unpack path"
    return out


def decode_pyroute2(buf: bytes) -> list[tuple[DestKey, DestSettings]]:
    """As pyroute2's Marshal does per message (parse_one_message), then the diff's values."""
    out = []
    for _kind, _flags, _seq, start, _end in nl.messages(buf, len(buf)):
        msg = ipvsmsg(buf, offset=start - 16)
        msg.decode()
        d = msg.get_attr("IPVS_CMD_ATTR_DEST")
        out.append((DestKey(d.get_attr("IPVS_DEST_ATTR_ADDR"), d.get_attr("IPVS_DEST_ATTR_PORT")),
                    DestSettings(d.get_attr("IPVS_DEST_ATTR_FWD_METHOD") & nl.FWD_MASK,
                                 d.get_attr("IPVS_DEST_ATTR_WEIGHT"),
                                 d.get_attr("IPVS_DEST_ATTR_U_THRESH"),
                                 d.get_attr("IPVS_DEST_ATTR_L_THRESH"))))
    return out


# ------------------------------------------------------------------ encoding an apply


def encode_ours(ops: list[EditDest]) -> bytes:
    parts = []
    for seq, op in enumerate(ops, start=1):
        req = nl.request(op)
        parts.append(nl.message(FAMILY, nl.NLM_F_REQUEST, seq, req.command, req.attrs))
    return b"".join(parts)


def encode_pyroute2(ops: list[EditDest]) -> bytes:
    parts = []
    for seq, op in enumerate(ops, start=1):
        key, dest, s = op.service, op.dest, op.settings
        msg = ipvsmsg()
        msg["header"] = {"type": FAMILY, "flags": nl.NLM_F_REQUEST, "sequence_number": seq}
        msg["cmd"] = nl.IPVS_CMD_SET_DEST
        msg["version"] = nl.IPVS_GENL_VERSION
        msg["attrs"] = [
            ("IPVS_CMD_ATTR_SERVICE", {"attrs": [
                ("IPVS_SVC_ATTR_AF", socket.AF_INET),
                ("IPVS_SVC_ATTR_PROTOCOL", socket.IPPROTO_TCP),
                ("IPVS_SVC_ATTR_ADDR", key.address),
                ("IPVS_SVC_ATTR_PORT", key.port)]}),
            ("IPVS_CMD_ATTR_DEST", {"attrs": [
                ("IPVS_DEST_ATTR_ADDR", dest.address),
                ("IPVS_DEST_ATTR_PORT", dest.port),
                ("IPVS_DEST_ATTR_ADDR_FAMILY", socket.AF_INET),
                ("IPVS_DEST_ATTR_FWD_METHOD", s.forwarding),
                ("IPVS_DEST_ATTR_WEIGHT", s.weight),
                ("IPVS_DEST_ATTR_U_THRESH", s.upper),
                ("IPVS_DEST_ATTR_L_THRESH", s.lower),
                ("IPVS_DEST_ATTR_TUN_TYPE", 0),
                ("IPVS_DEST_ATTR_TUN_PORT", 0),
                ("IPVS_DEST_ATTR_TUN_FLAGS", 0)]}),
        ]
        msg.encode()
        parts.append(bytes(msg.data))
    return b"".join(parts)


def read_back(data: bytes) -> list[tuple[int, dict[str, object], dict[str, object]]]:
    """Requests as pyroute2 reads them (an independent reading of both encoders' output)."""
    out = []
    for _kind, _flags, _seq, start, _end in nl.messages(data, len(data)):
        msg = ipvsmsg(data, offset=start - 16)
        msg.decode()
        out.append((msg["cmd"], dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"]),
                    dict(msg.get_attr("IPVS_CMD_ATTR_DEST")["attrs"])))
    return out


def timed(fn: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dests", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    dests = table(args.dests)
    dump = b"".join(dump_reply(i + 1, kernel_dest(d, s)) for i, (d, s) in enumerate(dests))
    ops = [EditDest(SERVICE, d, DestSettings(FWD_MASQ, 0), s) for d, s in dests]

    assert decode_ours(dump) == decode_pyroute2(dump) == dests, "the decoders disagree"
    assert read_back(encode_ours(ops)) == read_back(encode_pyroute2(ops)), \
        "the encoders disagree"

    rows = [
        ("decode a dump", timed(lambda: decode_ours(dump), args.repeat),
         timed(lambda: decode_pyroute2(dump), args.repeat)),
        ("encode an apply", timed(lambda: encode_ours(ops), args.repeat),
         timed(lambda: encode_pyroute2(ops), args.repeat)),
    ]
    print(f"{args.dests} destinations, median of {args.repeat} runs")
    print(f"{'':18} {'lbha':>10} {'pyroute2':>10} {'ratio':>7}")
    for name, ours, theirs in rows:
        print(f"{name:18} {ours * 1e3:8.2f}ms {theirs * 1e3:8.2f}ms {theirs / ours:6.1f}x")


if __name__ == "__main__":
    main()
