"""A hostile neighbour of `tcpstate serve`, for figure 9 (issue 15), in a
process of its own so that its work does not slow the timed scraper:

    python -m bench.hostile PORT USER PASSWORD SECONDS [KEEPALIVE WRONG SLOW]

from 127.0.0.1, for SECONDS at most: KEEPALIVE clients scraping in a loop
over kept-alive connections (what `wrk -c 130` does), WRONG clients sending
a new wrong password each request (nothing to cache), SLOW readers that
ask for /metrics and read a byte a second. A closed connection is made
again. Loopback only. Prints one JSON line: requests answered by status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import signal
import socket
import sys
from collections import Counter

HOST = "127.0.0.1"


def _request(user: str, password: str) -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return (f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Basic {token}\r\n\r\n"
            .encode())


async def _read_reply(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _scraper(port: int, user: str, password, answered: Counter) -> None:
    """Scrapes in a loop over one connection; `password` is a string, or a
    function of the request number (a new wrong password each time)."""
    n = 0
    while True:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                while True:
                    n += 1
                    writer.write(_request(user, password(n) if callable(password) else password))
                    answered[await _read_reply(reader)] += 1
            finally:
                writer.close()
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            answered["closed"] += 1
            await asyncio.sleep(0.05)


async def _slow_reader(port: int, user: str, password: str, answered: Counter) -> None:
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # the reply backs up
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (HOST, port))
            await loop.sock_sendall(sock, _request(user, password))
            while await loop.sock_recv(sock, 1):
                await asyncio.sleep(1)
            answered["slow closed"] += 1
        except OSError:
            answered["closed"] += 1
            await asyncio.sleep(0.05)
        finally:
            sock.close()


async def main(port: int, user: str, password: str, seconds: float,
               keepalive: int, wrong: int, slow: int) -> Counter:
    answered: Counter = Counter()
    tasks = [asyncio.create_task(_scraper(port, user, password, answered))
             for _ in range(keepalive)]
    tasks += [asyncio.create_task(_scraper(port, user, lambda n, i=i: f"wrong {i}.{n}", answered))
              for i in range(wrong)]
    tasks += [asyncio.create_task(_slow_reader(port, user, password, answered))
              for _ in range(slow)]
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    try:
        await asyncio.wait_for(done.wait(), seconds)
    except asyncio.TimeoutError:
        pass
    for task in tasks:
        task.cancel()
    return answered


if __name__ == "__main__":
    port, user, password, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    counts = [int(arg) for arg in sys.argv[5:8]] or [130, 140, 500]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 770 sockets
    result = asyncio.run(main(port, user, password, seconds, *counts))
    print(json.dumps({str(key): value for key, value in result.items()}), flush=True)
