"""
What each part of Virby asks of its reactor, as Twisted's own interfaces put together, and
what the splice asks of a TCP transport.

A part that needs one thing of the reactor takes that one interface (a clock is an
L{IReactorTime}); a part that needs several takes one of the interfaces below, which only
inherit Twisted's.  They nest as the parts do: the daemon hands its reactor to the splice and
to the hypervisor, the hypervisor to the readiness probe and to vfkit, so each larger one
inherits the smaller ones it passes its reactor on to.

No reactor declares these compositions, so they are for the type checker and for the reader.
Twisted's default reactor on Linux and macOS provides every part of L{IHostReactor}, and
L{hostReactor} checks that where a program takes the global reactor;
L{twisted.internet.testing.MemoryReactorClock} provides the parts of all but the ones that
spawn processes, which the tests add where they need it.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IPushProducer,
    IReactorCore,
    IReactorFDSet,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
    ITCPTransport,
)
from zope.interface.interface import InterfaceClass


class IRelayReactor(IReactorFDSet, IReactorTime):
    """The relay (L{virby.daemon.relay}): it watches raw sockets, and reports on a later turn."""


class IProbeReactor(IReactorTCP, IReactorTime):
    """The readiness probe (L{virby.daemon.readiness}): it connects to the guest, within a time."""


class ISpliceReactor(IProbeReactor, IRelayReactor):
    """The splice (L{virby.daemon.proxy}): it connects to the guest and relays between sockets."""


class IProcessReactor(IReactorProcess, IReactorTime):
    """
    A child process bounded in time (L{virby.daemon.freshdisk}, and vfkit with its stop
    sequence).
    """


class IRestReactor(IReactorUNIX, IReactorTime):
    """vfkit's REST client (L{virby.daemon.rest}): a unix socket, each request bounded in time."""


class IVMReactor(IProcessReactor, IProbeReactor, IRestReactor):
    """
    The hypervisor adapter (L{virby.daemon.hypervisor}, L{virby.daemon.vfkit}): it spawns
    vfkit, talks to its REST socket and probes the guest's sshd.
    """


class IMachineReactor(IProcessReactor, IReactorCore):
    """The emulated VM (L{virby.emulator.machine}): its guest's sshd, its timers, its exit."""


class IListenReactor(IReactorTCP, IReactorUNIX):
    """A server on a TCP port or a unix socket (the emulator's REST API)."""


class IHostReactor(
    IVMReactor,
    IMachineReactor,
    ISpliceReactor,
    IListenReactor,
    IReactorSocket,
    IReactorCore,
    IReactorFromThreads,
):
    """
    Everything a Virby program (the daemon, the vfkit emulator) asks of its reactor: it runs
    and stops it, a signal handler reaches it from outside its loop, and the daemon listens
    on sockets launchd made (L{virby.daemon.launchd}).
    """


def twistedParts(composition: InterfaceClass) -> list[InterfaceClass]:
    """Twisted's interfaces that C{composition} puts together, the ones a reactor declares."""
    return [
        interface
        for interface in composition.__iro__
        if interface.__module__ == "twisted.internet.interfaces"
    ]


def hostReactor(reactor: object) -> IHostReactor:
    """
    C{reactor} as an L{IHostReactor}, once it is checked to provide each part.  Twisted types
    its global reactor by only the parts every reactor has; one that lacks a part Virby needs
    fails here, naming it, instead of at the first call that needs it.
    """
    lacking = [i.getName() for i in twistedParts(IHostReactor) if not i.providedBy(reactor)]
    if lacking:
        raise TypeError(f"{reactor!r} does not provide {', '.join(lacking)}")
    # Checked above, part by part: no reactor declares the composition itself.
    return cast(IHostReactor, reactor)


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    A TCP connection as the splice and the readiness probe drive it: each side of a splice
    throttles the other (it is a consumer) and is throttled by it (a producer).  Twisted's
    TCP transports are all of this.

    @ivar protocol: where its events go; the readiness probe hands its open connection to
        the splice by replacing it.
    """

    protocol: IProtocol
