"""
The processes the splice benchmark runs: a counting sink, a banner server, a blocking
client, and the asyncio splice anchor.  Each is one role of this file, run as
``python bench/peers.py ROLE ...`` so every measurement crosses real process boundaries.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

CHUNK = 1024 * 1024


def sink(port: int) -> None:
    """Count the bytes of each connection; at EOF answer with the count (proves half-close)."""
    server = socket.create_server(("127.0.0.1", port), backlog=512)
    buffer = bytearray(CHUNK)
    while True:
        connection, _ = server.accept()
        with connection:
            count = 0
            while n := connection.recv_into(buffer):
                count += n
            connection.sendall(b"%d\n" % count)


def banner(port: int) -> None:
    """Send an SSH banner to each connection at once, like sshd."""
    server = socket.create_server(("127.0.0.1", port), backlog=1024)
    while True:
        connection, _ = server.accept()
        connection.sendall(b"SSH-2.0-bench\r\n")
        connection.close()


def send(port: int, size: int) -> None:
    """Send C{size} bytes, shut down the write side, read the count; print seconds."""
    payload = b"x" * CHUNK
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        left = size
        while left > 0:
            s.sendall(payload[: min(left, CHUNK)])
            left -= CHUNK
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(64):
            answer += chunk
    elapsed = time.perf_counter() - start
    if int(answer) != size:
        raise SystemExit(f"sink counted {answer!r}, expected {size}")
    print(f"{elapsed:.6f}")


def latency(port: int, count: int) -> None:
    """Connect and read the banner's first byte C{count} times; print each in seconds."""
    for _ in range(count):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            if not s.recv(1):
                raise SystemExit("closed without a banner")
            print(f"{time.perf_counter() - start:.7f}")


async def _asyncio_splice(listen: int, target: int) -> None:
    """The shape of a simple asyncio runner: read 4 KiB, write, drain, repeat."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def virby_splice(listen: int, target: int) -> None:
    """Virby's own splice (virby.proxy) in front of C{target}, as the daemon runs it."""
    from twisted.internet import reactor
    from twisted.internet.defer import succeed

    from virby.proxy import ProxyFactory

    class Ready:
        def connectionOpened(self, connection: object) -> None:
            pass

        def connectionClosed(self, connection: object) -> None:
            pass

        def whenReady(self):  # type: ignore[no-untyped-def]
            return succeed(("127.0.0.1", target))

    reactor.listenTCP(listen, ProxyFactory(reactor, Ready()), backlog=1024, interface="127.0.0.1")
    reactor.run()


def main(argv: list[str]) -> None:
    role, *args = argv
    numbers = [int(a) for a in args]
    if role == "asyncio-splice":
        asyncio.run(_asyncio_splice(*numbers))
    else:
        {"sink": sink, "banner": banner, "send": send, "latency": latency,
         "virby-splice": virby_splice}[role](*numbers)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
