"""
The ``launchd:name=Listener`` server endpoint: adopt the sockets launchd bound for the job.

launchd owns the builder's listening socket (the plist's C{Sockets} dict), so the port is
there before the daemon starts and stays there while it restarts; connections that arrive
meanwhile wait in the kernel backlog.  The daemon asks for the sockets with
C{launch_activate_socket(3)} (through ctypes, the one seam to macOS here) and adopts each
one: launchd may hand several, for IPv4 and IPv6.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
from collections.abc import Callable

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from virby.errors import VirbyError

LIBSYSTEM = "/usr/lib/libSystem.B.dylib"


class LaunchdError(VirbyError):
    """launchd has no socket for us; the message says why and how to run without it."""


def activateSocket(name: str) -> list[int]:
    """
    The listening fds launchd holds for socket C{name} of this job.

    @raise OSError: with launchd's errno: ESRCH when not started by launchd (also on any
        system without launchd), ENOENT for an unknown name, EALREADY when asked twice.
    """
    try:
        libsystem = ctypes.CDLL(LIBSYSTEM, use_errno=True)
        activate = libsystem.launch_activate_socket
    except (OSError, AttributeError):
        raise OSError(errno.ESRCH, "launchd is not available on this system") from None
    activate.restype = ctypes.c_int
    activate.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    fds = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    err = activate(name.encode(), ctypes.byref(fds), ctypes.byref(count))
    if err != 0:
        raise OSError(err, os.strerror(err))
    try:
        return [fds[i] for i in range(count.value)]
    finally:
        # The array is malloc()ed for us; upstream leaked it.
        libsystem.free(fds)


def _explain(error: OSError, name: str) -> LaunchdError:
    if error.errno == errno.ESRCH:
        return LaunchdError(
            "launchd: this process was not started by launchd (ESRCH); to run by hand use "
            "--listen tcp:31222:interface=127.0.0.1"
        )
    if error.errno == errno.ENOENT:
        return LaunchdError(
            f"launchd: the job has no socket named {name!r} in its plist Sockets (ENOENT)"
        )
    if error.errno == errno.EALREADY:
        return LaunchdError(f"launchd: socket {name!r} was already activated (EALREADY)")
    return LaunchdError(f"launchd: cannot activate socket {name!r}: {error.strerror or error}")


def _family(fd: int) -> socket.AddressFamily:
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return probe.family
    finally:
        probe.close()


@implementer(IListeningPort)
class ListeningPorts:
    """Several adopted sockets that start and stop together."""

    def __init__(self, ports: list[IListeningPort]) -> None:
        self.ports = ports

    def startListening(self) -> None:
        for port in self.ports:
            port.startListening()

    def stopListening(self) -> Deferred[None]:
        return DeferredList([maybeDeferred(p.stopListening) for p in self.ports]).addCallback(
            lambda _: None
        )

    def getHost(self) -> IAddress:
        return self.ports[0].getHost()


@implementer(IStreamServerEndpoint)
class LaunchdServerEndpoint:
    """Listens on every socket launchd bound for C{name}."""

    def __init__(
        self,
        reactor: IReactorSocket,
        name: str,
        activate: Callable[[str], list[int]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._name = name
        self._activate = activate

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        activate = self._activate or activateSocket
        try:
            fds = activate(self._name)
        except OSError as e:
            return fail(_explain(e, self._name))
        if not fds:
            return fail(LaunchdError(f"launchd: socket {self._name!r} came with no descriptors"))
        ports: list[IListeningPort] = []
        for fd in fds:
            outcome: list[IListeningPort | Failure] = []
            AdoptedStreamServerEndpoint(self._reactor, fd, _family(fd)).listen(factory).addBoth(
                outcome.append
            )
            port = outcome[0] if outcome else Failure(LaunchdError("adoption stalled"))
            if isinstance(port, Failure):
                for adopted in ports:
                    adopted.stopListening()
                return fail(port)
            ports.append(port)
        return succeed(ListeningPorts(ports))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class LaunchdParser:
    """
    C{launchd:name=Listener} (the name is the key of the plist's C{Sockets} dict), or
    C{launchd:Listener}.  The parameter is named, as Twisted's own parsers name theirs, so a
    misspelt one (C{launchd:nmae=Listener}) fails with one line at start instead of being
    ignored for the default name.
    """

    prefix = "launchd"

    # Narrower than the interface on purpose: a named parameter, so that a misspelt one fails.
    def parseStreamServer(  # type: ignore[override]
        self, reactor: IReactorSocket, name: str = "Listener"
    ) -> LaunchdServerEndpoint:
        return LaunchdServerEndpoint(reactor, name)
