"""CPU per HTTP response, lbha's parser (lbha.http_exchange) against h11 (h11_reader.py).

    .venv/bin/python bench/http/parsers.py [--count 20000]

Each reader parses the same responses from an in-memory stream (no sockets), so the figure
is the parser's own cost per response, in microseconds of CPU; the shapes are what nginx
answers a health check, a chunked body and an interim 100 before the answer.
"""

from __future__ import annotations

import argparse
import time

import h11_reader
import trio

from lbha import http_exchange

SHAPES = {
    "nginx, content-length": (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 18:00:00 GMT\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nOK\n"),
    "chunked, 3 chunks": (
        b"HTTP/1.1 200 OK\r\nServer: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4;ext=1\r\nd OK\r\n2\r\n!!\r\n0\r\n\r\n"),
    "100, then until close": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nServer: old\r\n\r\nread until close, OK"),
}


class Replay(trio.abc.ReceiveStream):
    """One response, then end of stream."""

    def __init__(self, data: bytes) -> None:
        self.parts = [b"", data]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return self.parts.pop() if self.parts else b""

    async def aclose(self) -> None:
        pass


async def cost(read, data: bytes, count: int) -> float:
    """Microseconds of CPU per response."""
    start = time.process_time()
    for _ in range(count):
        response = await read(Replay(data), "bench", "GET", http_exchange.Tally(),
                              head_limit=65536, body_limit=1 << 20)
    assert response.status == 200, response
    return (time.process_time() - start) / count * 1e6


async def main(count: int) -> None:
    print(f"CPU per response, {count} responses each (microseconds)")
    print(f"  {'':24} {'lbha':>8} {'h11':>8}")
    for name, data in SHAPES.items():
        ours = await cost(http_exchange.read_response, data, count)
        theirs = await cost(h11_reader.read_response, data, count)
        print(f"  {name:24} {ours:8.1f} {theirs:8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    trio.run(main, parser.parse_args().count)
