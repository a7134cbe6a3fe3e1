"""
The processes the splice benchmark runs: a counting sink, a banner server, a sender of one or
many streams, a latency client, the asyncio splice anchor, and Virby's own splice.  Each is one
role of this file, run as ``python bench/peers.py ROLE ...`` so every measurement crosses real
process boundaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import sys
import time

CHUNK = 1024 * 1024


def sink(port: int) -> None:
    """
    Count the bytes of each connection, any number at once; at EOF answer with the count
    (which proves the half-close came through) and close.
    """
    server = socket.create_server(("127.0.0.1", port), backlog=1024)
    server.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    buffer = bytearray(CHUNK)
    counts: dict[socket.socket, int] = {}
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                try:
                    connection, _ = server.accept()
                except BlockingIOError:
                    continue
                connection.setblocking(False)
                counts[connection] = 0
                selector.register(connection, selectors.EVENT_READ)
                continue
            connection = key.fileobj  # type: ignore[assignment]
            try:
                n = connection.recv_into(buffer)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n:
                counts[connection] += n
                continue
            selector.unregister(connection)
            connection.setblocking(True)
            with contextlib.suppress(OSError):
                connection.sendall(b"%d\n" % counts.pop(connection))
            connection.close()


def banner(port: int) -> None:
    """Send an SSH banner to each connection at once, like sshd."""
    server = socket.create_server(("127.0.0.1", port), backlog=1024)
    while True:
        connection, _ = server.accept()
        connection.sendall(b"SSH-2.0-bench\r\n")
        connection.close()


def send(port: int, size: int, streams: int = 1) -> None:
    """
    Send C{size} bytes in all, split over C{streams} connections at once; each shuts down its
    write side and reads the sink's count.  Prints the seconds from the first connect to the
    last answer.
    """
    payload = memoryview(b"x" * CHUNK)
    each = size // streams
    selector = selectors.DefaultSelector()
    start = time.perf_counter()
    left: dict[socket.socket, int] = {}
    answers: dict[socket.socket, bytes] = {}
    for _ in range(streams):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        left[s] = each
        answers[s] = b""
        selector.register(s, selectors.EVENT_WRITE)
    done = 0
    while done < streams:
        for key, events in selector.select():
            s = key.fileobj  # type: ignore[assignment]
            if events & selectors.EVENT_WRITE:
                try:
                    n = s.send(payload[: min(left[s], CHUNK)])
                except BlockingIOError:
                    continue
                left[s] -= n
                if left[s] == 0:
                    s.shutdown(socket.SHUT_WR)
                    selector.modify(s, selectors.EVENT_READ)
                continue
            chunk = s.recv(64)
            if chunk:
                answers[s] += chunk
                continue
            selector.unregister(s)
            s.close()
            done += 1
    elapsed = time.perf_counter() - start
    for answer in answers.values():
        if int(answer or b"-1") != each:
            raise SystemExit(f"the sink counted {answer!r}, expected {each}")
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
    """A plain asyncio splice: read 64 KiB, write, drain, repeat; EOF passed on."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=1024)
    async with server:
        await server.serve_forever()


def virby_splice(listen: int, target: int, path: str = "fast") -> None:
    """
    Virby's own splice (L{virby.daemon.proxy}) in front of C{target}, as the daemon runs it.
    C{path} picks the data path: C{fast} (the daemon's: splice(2) on Linux), C{portable} (the
    recv_into path macOS runs), or C{transports} (the Twisted protocol path, the fallback).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import succeed

    from virby.daemon.proxy import ProxyFactory
    from virby.daemon.readiness import ReadyGuest

    class Ready:
        def connectionOpened(self, connection: object) -> None:
            pass

        def connectionClosed(self, connection: object) -> None:
            pass

        def whenReady(self):  # type: ignore[no-untyped-def]
            return succeed(ReadyGuest("127.0.0.1", target))

    factory = ProxyFactory(reactor, Ready(), dataPath=path, bannerTimeout=None)
    reactor.listenTCP(listen, factory, backlog=1024, interface="127.0.0.1")
    reactor.run()


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "asyncio-splice":
        asyncio.run(_asyncio_splice(int(args[0]), int(args[1])))
    elif role == "virby-splice":
        virby_splice(int(args[0]), int(args[1]), *args[2:])
    else:
        numbers = [int(a) for a in args]
        {"sink": sink, "banner": banner, "send": send, "latency": latency}[role](*numbers)


if __name__ == "__main__":
    main(sys.argv[1:])
