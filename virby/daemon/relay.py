"""
The data path of a splice: once the client's and the guest's sockets are both connected, the
bytes between them move here, on the reactor's thread, without a Python object per chunk.

Why here, and why this way (2-core Linux, 1 GiB through a splice to a counting sink, the
contenders interleaved; docs/benchmarks.md): Twisted's transports read each chunk into a new
C{bytes} and write it out again, which costs the daemon 1.4 to 2.7 CPU seconds per GiB and
caps every stream together at 0.3 to 0.6 times Go's C{io.Copy}.  Moved with C{splice(2)} by
this module on the same one reactor thread, a GiB costs 0.2 to 0.6 CPU seconds, about half
of what Go's C{io.Copy} spends (it splices too, from as many threads as it likes), on one
stream as on 64, at about its speed: across four runs on a shared machine the medians of the
ratio went from 0.83 to 1.39.  At that cost one thread moves 2 to 5 GiB a second, more than
the machine can feed it, so the data path does not leave the reactor: no thread, no lock,
and the control plane (accounting, aborts, shutdown) stays plain Twisted.  The portable path
costs 0.5 to 1.0 CPU seconds per GiB, less than Go's 32 KiB copy loop (its shape on macOS)
in every run, at about its speed.

The reactor's readiness events drive this module's own descriptors on the two raw sockets
(C{IReactorFDSet.addReader}/C{addWriter}).  The caller owns the sockets: the client's stays
with its Twisted transport, paused meanwhile, which closes it afterwards as it always does;
the guest's is connected by L{connect} here, without a transport at all.

  - On Linux, C{splice(2)} moves pages from the source socket into a pipe and from the pipe
    to the destination socket.  Pipes come from a L{PipePool} and go back to it as soon as
    they are empty, so an idle pair holds no pipe: 200 pairs cost 400 descriptors, not 1200.
  - Elsewhere (macOS has no splice), and for a chunk that finds no pipe (the process is out of
    descriptors), C{recv_into} a reused buffer and C{send} from a view of it.  A flow reads
    only when its destination took everything it was given.

Backpressure: a flow stops reading its source while its bytes wait for the destination, so a
slow reader makes the daemon hold at most L{PIPE_SIZE} (or L{CHUNK}) bytes per direction,
and the rest waits in the kernel's socket buffers, where TCP's window throttles the sender.
Half-close: a source's EOF becomes C{shutdown(SHUT_WR)} on the destination once every byte
before it has been delivered; the relay ends when both directions have, or at the first
error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import NamedTuple
from typing import Protocol as TypingProtocol

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from virby.daemon.capacity import MAX_PIPES, MIN_PIPES, pipesWithin
from virby.reactors import IRelayReactor, IStreamTransport

try:
    import fcntl
except ImportError:  # not a POSIX system: no splice either
    fcntl = None  # type: ignore[assignment]  # None stands for the missing module

#: The size asked for each pipe (Linux's default unprivileged maximum, pipe-max-size): one
#: C{splice} pair then moves up to this much, so the per-call cost vanishes beside the copy.
PIPE_SIZE = 1024 * 1024

#: The portable path's buffer, shared by every flow that keeps up (they run one at a time).
#: Both copies cost the same per byte at any size; what a bigger chunk saves is the reactor
#: turns: measured on the machine of docs/benchmarks.md, 1 MiB beat 256 KiB by a fifth in
#: CPU per GiB.  It is also the most a slow sink makes one direction hold.
CHUNK = 1024 * 1024

#: Chunks a flow moves in one reactor event while the source fills whole chunks and the
#: sink takes them all: the rest waits for the next turn, fair to other pairs.
COPY_ROUNDS = 2

#: Empty pipes kept for the next chunk; more are closed when returned.
SPARE_PIPES = 8

#: How long the spare pipes outlive the last relay.
IDLE_PIPE_SECONDS = 5.0

#: fcntl(2)'s F_SETPIPE_SZ (Linux only; Python names it from 3.10).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031) if fcntl is not None else 1031

_SPLICE: Callable[..., int] | None = getattr(os, "splice", None)

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

#: Errors that mean the process (or the system) has no descriptor left for a pipe.
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def spliceAvailable() -> bool:
    """C{splice(2)} exists here (Linux, Python 3.10+)."""
    return _SPLICE is not None and sys.platform.startswith("linux")


class _Pipe(NamedTuple):
    read: int
    write: int


class PipePool:
    """
    Pipes for C{splice(2)}, lent to a flow while it has bytes in flight.

    Most chunks go in and out of a pipe within one reactor event, so a few pipes serve any
    number of pairs; only a flow whose destination is slow keeps one.  Up to C{spare} empty
    pipes are kept for the next chunk (making one costs four system calls), and closed
    C{linger} seconds after the last relay ended: an idle daemon holds none.
    """

    def __init__(
        self,
        clock: IReactorTime,
        size: int = PIPE_SIZE,
        spare: int = SPARE_PIPES,
        linger: float = IDLE_PIPE_SECONDS,
        limit: int | None = None,
    ) -> None:
        self._clock = clock
        self._size = size
        self._spare = spare
        self._linger = linger
        self._limit = limit
        self._free: list[_Pipe] = []
        self._users = 0
        self._closing: IDelayedCall | None = None
        self.opened = 0

    def hold(self) -> None:
        """A relay starts using the pool."""
        self._users += 1
        if self._closing is not None:
            if self._closing.active():
                self._closing.cancel()
            self._closing = None

    def release(self) -> None:
        """A relay is done with the pool; after the last one, the idle pipes go too."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._free and self._closing is None:
            self._closing = self._clock.callLater(self._linger, self.closeIdle)

    def closeIdle(self) -> None:
        """Close the pipes no flow holds."""
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None
        free, self._free = self._free, []
        for pipe in free:
            self._close(pipe)

    def take(self) -> _Pipe | None:
        """An empty pipe, or C{None} when none may be opened now (the flow copies instead)."""
        if self._free:
            return self._free.pop()
        if self._limit is None:
            self._limit = pipeLimit()
        if self.opened >= self._limit:
            return None
        try:
            read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in _OUT_OF_DESCRIPTORS:
                return None
            raise
        with contextlib.suppress(OSError):
            # Beyond fs.pipe-user-pages-soft the kernel refuses a bigger pipe: the default
            # 64 KiB still works, only with more system calls per byte.
            fcntl.fcntl(write, _F_SETPIPE_SZ, self._size)
        self.opened += 1
        return _Pipe(read, write)

    def give(self, pipe: _Pipe) -> None:
        """Take back an empty pipe."""
        if len(self._free) < self._spare:
            self._free.append(pipe)
        else:
            self._close(pipe)

    def discard(self, pipe: _Pipe) -> None:
        """Close a pipe whose bytes will never be delivered."""
        self._close(pipe)

    def _close(self, pipe: _Pipe) -> None:
        self.opened -= 1
        for fd in pipe:
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def idle(self) -> int:
        return len(self._free)


def pipeLimit() -> int:
    """
    How many pipes a pool may hold when its maker gives no limit: the pipes' share of the
    open-file limit now (L{virby.daemon.capacity.pipesWithin}), the share the daemon's budget keeps
    for them beside its connections.  Pipes are lent only to chunks in flight, and a chunk
    that finds none is copied instead.
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MIN_PIPES
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0:
        return MAX_PIPES
    return pipesWithin(soft)


class BufferPool:
    """
    The portable path's buffers, as L{PipePool} holds the pipes.  One serves every flow whose
    sink keeps up (they run one at a time on the reactor); a flow whose sink is slow keeps
    the one it read into until the sink has taken it, so no byte is copied twice.  One spare
    is kept, allocated at its first use: an idle pool holds one C{CHUNK}, a fresh one none.
    """

    def __init__(self, size: int = CHUNK) -> None:
        self._size = size
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self._size)

    def give(self, buffer: bytearray) -> None:
        if not self._free and len(buffer) == self._size:
            self._free.append(buffer)

    @property
    def idle(self) -> int:
        return len(self._free)


@implementer(IReadDescriptor, IWriteDescriptor)
class _End:
    """
    One socket of the pair, as the reactor sees it: reading it feeds the flow that leaves
    it, writing it drains the flow that arrives at it.  The reactor keeps one descriptor
    object per file descriptor, so both directions share this one.
    """

    def __init__(self, relay: Relay, sock: socket.socket) -> None:
        self._relay = relay
        self.socket = sock
        self.fd = sock.fileno()
        self.outgoing: _Flow
        self.incoming: _Flow
        self._reading = False
        self._writing = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "virby.daemon.relay"

    def doRead(self) -> None:
        self.outgoing.readable()

    def doWrite(self) -> None:
        self.incoming.writable()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gave up on this descriptor (an error, or the reactor stopping)."""
        self._reading = self._writing = False
        self._relay._fail(reason)

    def startReading(self) -> None:
        if not self._reading and self._relay.running:
            self._reading = True
            self._relay.reactor.addReader(self)

    def stopReading(self) -> None:
        if self._reading:
            self._reading = False
            self._relay.reactor.removeReader(self)

    def startWriting(self) -> None:
        if not self._writing and self._relay.running:
            self._writing = True
            self._relay.reactor.addWriter(self)

    def stopWriting(self) -> None:
        if self._writing:
            self._writing = False
            self._relay.reactor.removeWriter(self)


class _Flow:
    """
    One direction: bytes from C{source} to C{sink}, in two states.  Reading: the source is
    watched; each chunk it has is moved into a pipe with C{splice(2)} (or into a buffer) and
    on to the sink at once.  Owing: the sink did not take a whole chunk; the source is left
    alone and the sink watched until it has taken the rest.  Then the flow reads on at once,
    in the same event, since a source that outran its sink most likely has more: while the
    sink stays the slower, each of its events moves a chunk, with no registration to change.

    C{pending} goes first: bytes read before the relay began.
    """

    def __init__(
        self,
        relay: Relay,
        source: _End,
        sink: _End,
        pending: bytes,
        pipes: PipePool | None,
        buffers: BufferPool,
        count: Callable[[int], None],
    ) -> None:
        self._relay = relay
        self._buffers = buffers
        self.source = source
        self.sink = sink
        self._pending: memoryview | None = memoryview(pending) if pending else None
        self._buffer: bytearray | None = None
        self._pipes = pipes
        self._pipe: _Pipe | None = None
        self._inPipe = 0
        self._count = count
        self.finished = False

    def start(self) -> None:
        if self._flush():
            self._waitForSource()
        elif self._relay.running:
            self._waitForSink()

    # -- events

    def readable(self) -> None:
        if self.finished or self._owed():
            return
        self._move(COPY_ROUNDS)

    def writable(self) -> None:
        if self.finished:
            return
        if not self._flush():
            return
        # The sink has taken everything: read on now (one chunk), not a turn later.
        self._move(1)

    def _move(self, rounds: int) -> None:
        """Read chunks and deliver them, while the source has them and the sink takes them."""
        for _ in range(rounds):
            got = self._fill()
            if not self._relay.running:
                return
            if got is None:
                self._sourceEnded()
                return
            if got == 0:
                break
            if not self._flush():
                if self._relay.running:
                    self._waitForSink()
                return
            if got < CHUNK:
                break
        self._waitForSource()

    def _waitForSource(self) -> None:
        self.sink.stopWriting()
        self.source.startReading()

    def _waitForSink(self) -> None:
        self.source.stopReading()
        self.sink.startWriting()

    def _owed(self) -> bool:
        return self._pending is not None or self._inPipe > 0

    # -- reading: into a pipe, else into a buffer

    def _fill(self) -> int | None:
        """Read one chunk: its size, 0 when the source has nothing now, C{None} at its EOF."""
        if self._pipes is not None and (self._pipe is not None or self._takePipe()):
            return self._spliceIn()
        return self._copyIn()

    def _takePipe(self) -> bool:
        assert self._pipes is not None
        self._pipe = self._pipes.take()
        return self._pipe is not None

    def _spliceIn(self) -> int | None:
        pipe = self._pipe
        assert pipe is not None and _SPLICE is not None
        try:
            # Counted in bytes, not in the pipe's pages: one page of a pipe can hold a
            # socket buffer's whole fragment (32 KiB on loopback), so a full pipe can hold
            # many megabytes.  The bound is ours.
            n = _SPLICE(self.source.fd, pipe.write, PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            self._returnPipe()
            return 0
        except OSError as e:
            self._relay._fail(Failure(e))
            return 0
        if n == 0:
            self._returnPipe()
            return None
        self._inPipe = n
        return n

    def _copyIn(self) -> int | None:
        buffer = self._buffers.take()
        try:
            n = self.source.socket.recv_into(buffer)
        except BlockingIOError:
            self._buffers.give(buffer)
            return 0
        except OSError as e:
            self._buffers.give(buffer)
            self._relay._fail(Failure(e))
            return 0
        if n == 0:
            self._buffers.give(buffer)
            return None
        self._buffer = buffer
        self._pending = memoryview(buffer)[:n]
        return n

    # -- delivering: what a flow owes its sink

    def _flush(self) -> bool:
        """Deliver what is owed; C{True} once nothing is (C{False} too if the relay failed)."""
        if self._pending is not None:
            try:
                sent = self.sink.socket.send(self._pending)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self._relay._fail(Failure(e))
                return False
            if sent:
                self._count(sent)
            if sent < len(self._pending):
                self._pending = self._pending[sent:]
                return False
            self._dropPending()
        if self._inPipe:
            pipe = self._pipe
            assert pipe is not None and _SPLICE is not None
            try:
                n = _SPLICE(pipe.read, self.sink.fd, self._inPipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._relay._fail(Failure(e))
                return False
            if n:
                self._inPipe -= n
                self._count(n)
            if self._inPipe:
                return False
            self._returnPipe()
        return True

    def _returnPipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None and self._pipes is not None:
            self._pipes.give(pipe)

    def _dropPending(self) -> None:
        """The pending bytes are delivered (or never will be): give their buffer back."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.release()
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            self._buffers.give(buffer)

    # -- the end

    def _sourceEnded(self) -> None:
        """The source's EOF, read when nothing was owed: pass it on."""
        self.source.stopReading()
        self.sink.stopWriting()
        with contextlib.suppress(OSError):
            # A sink that is already gone says so on its own events.
            self.sink.socket.shutdown(socket.SHUT_WR)
        self.finished = True
        self._relay._flowFinished()

    @property
    def held(self) -> int:
        """Bytes read from the source and not yet delivered."""
        return self._inPipe + (len(self._pending) if self._pending is not None else 0)

    def release(self) -> None:
        """The relay is over: give back (or close) the pipe this flow holds."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None and self._pipes is not None:
            if self._inPipe:
                self._pipes.discard(pipe)
            else:
                self._pipes.give(pipe)
        self._inPipe = 0
        self._dropPending()


class Splice(TypingProtocol):
    """
    What moves a spliced connection's bytes, as its owner (L{virby.daemon.proxy}) drives it:
    L{Relay} on plain TCP sockets, L{TransportSplice} on Twisted's transports otherwise.

    Each is built with both sides connected, the bytes each side sent before (the client's
    held bytes, the guest's banner) and a C{done} callable, called once with C{None} when
    both directions ended with an EOF, or a L{Failure} when either side was lost; never after
    L{close}.  The client's side stays its owner's to close; the guest's is the splice's.
    """

    bytesToGuest: int
    bytesToClient: int

    def start(self) -> None:
        """Move bytes: the held ones first."""

    def close(self, abort: bool = False) -> None:
        """Stop moving bytes and close the guest's side: in order, or (C{abort}) at once."""

    def clientData(self, data: bytes) -> None:
        """Bytes the client's transport delivered while spliced."""

    def clientFinishedSending(self) -> None:
        """The client's transport read its EOF while spliced."""


class Relay:
    """
    Moves bytes both ways between two connected, non-blocking stream sockets: a L{Splice}.

    The caller owns the sockets before, during and after: it must not read, write or close
    them (nor let a transport do so) until C{done} has fired or it has called L{stop}; or it
    hands the guest's over with L{close}, which closes it.

    @param toGuest: bytes the client sent before the relay began, delivered first.
    @param toClient: bytes the guest sent before the relay began (the banner a readiness
        probe read), delivered first.
    @param pipes: where pipes for C{splice(2)} come from; C{None} copies through the
        buffers of C{buffers} instead (the path for systems without splice).
    @param buffers: where the copy's buffers come from; by default, the relay's own.
    @param done: called once, from a later reactor turn, with C{None} when both directions
        ended with an EOF, or a L{Failure} when either side failed.  Not called after
        L{stop}.
    """

    def __init__(
        self,
        reactor: IRelayReactor,
        client: socket.socket,
        guest: socket.socket,
        *,
        done: Callable[[Failure | None], None],
        toGuest: bytes = b"",
        toClient: bytes = b"",
        pipes: PipePool | None = None,
        buffers: BufferPool | None = None,
    ) -> None:
        self.reactor = reactor
        self.bytesToGuest = 0
        self.bytesToClient = 0
        self.running = False
        self._done = done
        self._pipes = pipes
        self._finished = False
        self._closed = False
        self._report: IDelayedCall | None = None
        self._client = _End(self, client)
        self._guest = _End(self, guest)
        buffers = buffers if buffers is not None else BufferPool()
        self._up = _Flow(self, self._client, self._guest, toGuest, pipes, buffers, self._countUp)
        self._down = _Flow(
            self, self._guest, self._client, toClient, pipes, buffers, self._countDown
        )
        self._client.outgoing = self._guest.incoming = self._up
        self._guest.outgoing = self._client.incoming = self._down

    @property
    def held(self) -> int:
        """Bytes this relay has read and not yet delivered, both ways: its whole buffer."""
        return self._up.held + self._down.held

    def _countUp(self, n: int) -> None:
        self.bytesToGuest += n

    def _countDown(self, n: int) -> None:
        self.bytesToClient += n

    def start(self) -> None:
        self.running = True
        if self._pipes is not None:
            self._pipes.hold()
        self._down.start()
        self._up.start()

    def stop(self) -> None:
        """Stop moving bytes now and hand the sockets back; C{done} is not called."""
        self._end()
        if self._report is not None and self._report.active():
            self._report.cancel()
        self._report = None

    def close(self, abort: bool = False) -> None:
        """Stop, and close the guest's socket (once): in order, or at once with a reset."""
        self.stop()
        if not self._closed:
            self._closed = True
            closeSocket(self._guest.socket, abort)

    def clientData(self, data: bytes) -> None:
        """
        Never called rightly: the relay reads the client's socket itself, and its owner
        paused the client's transport before starting it.  Bytes here would be lost.
        """
        raise RuntimeError("the relay reads the client's socket: pause its transport first")

    def clientFinishedSending(self) -> None:
        raise RuntimeError("the relay reads the client's socket: pause its transport first")

    def _flowFinished(self) -> None:
        if self._up.finished and self._down.finished:
            self._finish(None)

    def _fail(self, reason: Failure) -> None:
        self._finish(reason)

    def _finish(self, reason: Failure | None) -> None:
        if self._finished:
            return
        self._end()
        # Later, not now: the reactor may still hold events for these descriptors from the
        # poll it is dispatching, and they must not reach the transports we hand back.
        self._report = self.reactor.callLater(0, self._reportDone, reason)

    def _reportDone(self, reason: Failure | None) -> None:
        self._report = None
        self._done(reason)

    def _end(self) -> None:
        if self._finished:
            return
        self._finished = True
        for end in (self._client, self._guest):
            end.stopReading()
            end.stopWriting()
        self.running = False
        self._up.release()
        self._down.release()
        if self._pipes is not None:
            self._pipes.release()


class TransportSplice:
    """
    The same L{Splice} on Twisted's transports, in the shape of Twisted's C{portforward}: the
    path for a side that is not a plain TCP socket (TLS, or the memory reactors of the unit
    tests).  Each transport is the other's producer, so a slow reader pauses the fast
    writer; an EOF either way is passed on as a half-close; the pair is done when both
    directions have ended, or either side is lost.

    The guest's protocol hands its events on: L{guestData}, L{guestFinishedSending},
    L{guestLost}.
    """

    def __init__(
        self,
        client: IStreamTransport,
        guest: IStreamTransport,
        *,
        done: Callable[[Failure | None], None],
        toGuest: bytes = b"",
        toClient: bytes = b"",
    ) -> None:
        self.bytesToGuest = 0
        self.bytesToClient = 0
        self._client = client
        self._guest = guest
        self._done = done
        self._toGuest = toGuest
        self._toClient = toClient
        self._clientDone = False
        self._guestDone = False
        self._ended = False
        self._closed = False

    def start(self) -> None:
        self._guest.registerProducer(self._client, True)
        self._client.registerProducer(self._guest, True)
        toGuest, toClient, self._toGuest, self._toClient = self._toGuest, self._toClient, b"", b""
        if toClient:
            self.guestData(toClient)
        if toGuest:
            self.clientData(toGuest)
        self._client.resumeProducing()
        self._guest.resumeProducing()

    def clientData(self, data: bytes) -> None:
        self.bytesToGuest += len(data)
        self._guest.write(data)

    def clientFinishedSending(self) -> None:
        self._clientDone = True
        self._guest.loseWriteConnection()
        self._finishIfBothDone()

    def guestData(self, data: bytes) -> None:
        self.bytesToClient += len(data)
        self._client.write(data)

    def guestFinishedSending(self) -> None:
        self._guestDone = True
        self._client.loseWriteConnection()
        self._finishIfBothDone()

    def guestLost(self, reason: Failure) -> None:
        self._end(reason)

    def _finishIfBothDone(self) -> None:
        if self._clientDone and self._guestDone:
            self._end(None)

    def _end(self, reason: Failure | None) -> None:
        if not self._ended:
            self._ended = True
            self._done(reason)

    def close(self, abort: bool = False) -> None:
        """Close the guest's transport (once); C{done} is not called after this."""
        if self._closed:
            return
        self._ended = self._closed = True
        if abort:
            self._guest.abortConnection()
        else:
            self._guest.loseConnection()


def closeSocket(sock: socket.socket, abort: bool = False) -> None:
    """
    Close a socket the relay ran on: in order (whatever was delivered stays delivered, and
    an EOF follows), or at once with a reset when the other end's session is dead anyway.
    """
    if abort:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@implementer(IWriteDescriptor)
class _Connecting:
    """Waits, as a reactor writer, for a non-blocking connect to finish."""

    def __init__(
        self, reactor: IRelayReactor, sock: socket.socket, result: Deferred[socket.socket]
    ) -> None:
        self._reactor = reactor
        self._socket = sock
        self._fd = sock.fileno()
        self._result = result
        self._timeout: IDelayedCall | None = None
        self._waiting = True

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "virby.daemon.relay"

    def doWrite(self) -> None:
        if not self._waiting:
            return
        code = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(error.getConnectError((code, os.strerror(code))))
        else:
            self._end()
            self._result.callback(self._socket)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw an error (a refusal comes as one): report the socket's own."""
        code = 0
        with contextlib.suppress(OSError):
            code = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(error.getConnectError((code, os.strerror(code))))
        else:
            self._fail(error.ConnectError(string=reason.getErrorMessage()))

    def timedOut(self) -> None:
        self._timeout = None
        self._fail(error.TimeoutError())

    def cancel(self) -> None:
        if self._waiting:
            self._end()
            self._socket.close()

    def _fail(self, reason: Exception) -> None:
        self.cancel()
        if not self._result.called:
            self._result.errback(Failure(reason))

    def _end(self) -> None:
        """Stop waiting; only once: the descriptor's number may belong to another soon."""
        self._waiting = False
        self._reactor.removeWriter(self)
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


@implementer(IReadDescriptor)
class _AwaitingSpeech:
    """Waits, as a reactor reader, for the first bytes a connected socket receives."""

    def __init__(self, reactor: IRelayReactor, sock: socket.socket, result: Deferred[bytes]):
        self._reactor = reactor
        self._socket = sock
        self._fd = sock.fileno()
        self._result = result
        self._waiting = True

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "virby.daemon.relay"

    def doRead(self) -> None:
        if not self._waiting:
            return
        try:
            data = self._socket.recv(FIRST_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(error.ConnectionLost(str(e)))
            return
        if not data:
            self._fail(error.ConnectionDone("closed before it sent anything"))
            return
        self._end()
        self._result.callback(data)

    def connectionLost(self, reason: Failure) -> None:
        self._fail(error.ConnectionLost(reason.getErrorMessage()))

    def cancel(self) -> None:
        """Give up: the socket is closed at once, with a reset (nothing was said on it)."""
        if self._waiting:
            self._end()
            closeSocket(self._socket, abort=True)

    def _fail(self, reason: Exception) -> None:
        self.cancel()
        if not self._result.called:
            self._result.errback(Failure(reason))

    def _end(self) -> None:
        self._waiting = False
        self._reactor.removeReader(self)


#: The most of a peer's first bytes L{firstBytes} reads at once (a banner is far less).
FIRST_BYTES = 64 * 1024


def firstBytes(reactor: IRelayReactor, sock: socket.socket) -> Deferred[bytes]:
    """
    The first bytes the peer of a connected, non-blocking C{sock} sends.

    @return: a Deferred firing with them, or failing with
        L{twisted.internet.error.ConnectionDone} (an EOF first) or
        L{twisted.internet.error.ConnectionLost}; cancelling it resets and closes C{sock},
        as does any failure.
    """
    waiting: list[_AwaitingSpeech] = []

    def cancel(_: Deferred[bytes]) -> None:
        if waiting:
            waiting[0].cancel()

    result: Deferred[bytes] = Deferred(cancel)
    awaiting = _AwaitingSpeech(reactor, sock, result)
    waiting.append(awaiting)
    reactor.addReader(awaiting)
    return result


@functools.lru_cache(maxsize=64)
def addressFamily(host: str) -> socket.AddressFamily | None:
    """The family of an IP address; C{None} for a name (cached: the guest has one address)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def connect(
    reactor: IRelayReactor, host: str, port: int, timeout: float
) -> Deferred[socket.socket]:
    """
    Connect to C{host} (an IP address) and C{port} without Twisted's transports: the socket,
    once connected, is the relay's to drive.  This spares each connection the transport's
    objects and reactor turns it would not use (about 0.1 ms a connection on the machine of
    docs/benchmarks.md, a third of what the daemon adds to it).

    @return: a cancellable Deferred firing with the connected, non-blocking socket, or
        failing with the L{twisted.internet.error.ConnectError} a transport would give.
    """
    family = addressFamily(host)
    if family is None:
        raise ValueError(f"not an IP address: {host!r}")
    waiting: list[_Connecting] = []

    def cancel(_: Deferred[socket.socket]) -> None:
        if waiting:
            waiting[0].cancel()

    result: Deferred[socket.socket] = Deferred(cancel)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        # Out of descriptors, most likely: a refusal like any other, not a traceback.
        result.errback(Failure(error.getConnectError((e.errno, e.strerror))))
        return result
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    code = sock.connect_ex((host, port))
    if code == 0:
        result.callback(sock)
    elif code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
        connecting = _Connecting(reactor, sock, result)
        waiting.append(connecting)
        reactor.addWriter(connecting)
        connecting._timeout = reactor.callLater(timeout, connecting.timedOut)
    else:
        sock.close()
        result.errback(Failure(error.getConnectError((code, os.strerror(code)))))
    return result
