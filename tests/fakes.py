"""
Stand-ins for the parts several test modules drive: a VM and its guest, the hypervisor, the
control commands, a child process's transport, and a reactor that is all the reactors Virby
asks for.  Each is written once, here, and typed against the protocol or zope interface of
the part it stands for (L{virby.daemon.lifecycle.VirtualMachine} and
L{virby.daemon.lifecycle.Hypervisor}, L{virby.daemon.service.DaemonHypervisor},
L{virby.daemon.control.Commands}, Twisted's C{IProcessTransport},
L{virby.reactors.IHostReactor}), so mypy tells us when a fake no longer keeps up with the
real part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AnyStr, Generic, NamedTuple, TypeVar, cast, overload

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from virby.daemon.lifecycle import BootReport, ExitInfo, Guest, VirtualMachine
from virby.daemon.readiness import ReadyGuest
from virby.errors import PermanentError
from virby.reactors import IHostReactor
from virby.vfkitflags import HostPlan

G = TypeVar("G", bound=Guest)


@dataclass
class Status:
    """How a fake VM ended, as L{virby.daemon.lifecycle.ExitInfo} describes it."""

    text: str = "exited with status 0"

    def describe(self) -> str:
        return self.text


@dataclass
class FakeVM:
    """
    One VM process.  Its stop waits until L{die} ends it, as the real one's waits for vfkit
    to exit; with C{quickStop} the stop answers at once and the VM stays "alive", for
    tests that only need the lifecycle to move on.
    """

    pid: int
    ended: Deferred[Any] = field(default_factory=Deferred)
    stopRequests: int = 0
    #: What L{consoleTail} shows; by default a line naming the pid.
    console: list[str] | None = None
    quickStop: bool = False
    _stops: list[Deferred[ExitInfo | None]] = field(default_factory=list)

    def consoleTail(self, n: int = 20) -> list[str]:
        if self.console is not None:
            return self.console[-n:]
        return [f"console of {self.pid}"]

    def stop(self) -> Deferred[ExitInfo | None]:
        self.stopRequests += 1
        if self.quickStop:
            return succeed(None)
        d: Deferred[ExitInfo | None] = Deferred()
        if self.ended.called:
            d.callback(Status())
        else:
            self._stops.append(d)
        return d

    def die(self, text: str = "exited with status 1") -> None:
        """The process ends; pending stops complete, as the real one's do."""
        self.ended.callback(Status(text))
        stops, self._stops = self._stops, []
        for d in stops:
            d.callback(Status(text))

    @property
    def alive(self) -> bool:
        return not self.ended.called


@dataclass
class FakeGuest:
    """What waitReady fires with: an address, and a spare connection until released."""

    host: str = "192.168.64.2"
    port: int = 22
    released: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def release(self) -> None:
        self.released = True


class FakeHypervisor(Generic[G]):
    """
    Spawns L{FakeVM}s and reports them ready when the test says so (L{becomeReady}), or at
    once when C{readyAtOnce} holds a guest.  Spawns may fail or be slow (L{finishSpawn});
    the daemon's start asks it to stop an orphan, which it counts.  Its guests are
    L{FakeGuest}s unless C{guest} makes them from a host (the proxy wants L{ReadyGuest}s).
    """

    @overload
    def __init__(
        self: FakeHypervisor[FakeGuest],
        guest: None = None,
        *,
        slowSpawn: bool = False,
        readyAtOnce: FakeGuest | None = None,
        quickStop: bool = False,
        console: list[str] | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        guest: Callable[[str], G],
        *,
        slowSpawn: bool = False,
        readyAtOnce: G | None = None,
        quickStop: bool = False,
        console: list[str] | None = None,
    ) -> None: ...

    def __init__(
        self,
        guest: Callable[[str], Any] | None = None,
        *,
        slowSpawn: bool = False,
        readyAtOnce: Any = None,
        quickStop: bool = False,
        console: list[str] | None = None,
    ) -> None:
        # The overloads tie G to what guest makes; FakeGuest is G when no guest is given.
        self._guest = cast("Callable[[str], G]", guest if guest is not None else FakeGuest)
        self.vms: list[FakeVM] = []
        #: What the Mac lets the VM have: nothing refused, no warning.
        self.plan = HostPlan()
        self.ready: dict[int, Deferred[G]] = {}
        self.cancelledReady: list[int] = []
        self.spawnError: Exception | None = None
        self.slowSpawn = slowSpawn
        self.spawning: Deferred[VirtualMachine] | None = None
        self.cancelledSpawns = 0
        self.spawns = 0
        #: A VM that a cancelled slow spawn hands over anyway.
        self.onCancelSpawn: FakeVM | None = None
        #: A guest that a cancelled readiness wait hands over anyway.
        self.readyOnCancel: G | None = None
        #: A guest every readiness wait reports at once.
        self.readyAtOnce: G | None = readyAtOnce
        #: Whether the last boot failure was one no retry can cure.
        self.permanentFailure = False
        #: For the next spawn only: how it fails, or that it is slow.
        self.nextSpawnError: Exception | None = None
        self.nextSpawnSlow = False
        #: How each spawn and each wait were told to report the boot's phases.
        self.reports: list[BootReport] = []
        #: How the VMs it spawns stop and what their consoles show (see L{FakeVM}).
        self.quickStop = quickStop
        self.console = console
        self.orphanChecks = 0

    def stopOrphan(self) -> Deferred[None]:
        self.orphanChecks += 1
        return succeed(None)

    def spawn(self, report: BootReport) -> Deferred[VirtualMachine]:
        self.spawns += 1
        self.reports.append(report)
        error, self.nextSpawnError = self.nextSpawnError or self.spawnError, None
        if error is not None:
            self.permanentFailure = isinstance(error, PermanentError)
            return fail(error)
        slow, self.nextSpawnSlow = self.slowSpawn or self.nextSpawnSlow, False
        if slow:
            stray = self.onCancelSpawn
            spawning: Deferred[VirtualMachine]
            if stray is not None:
                spawning = Deferred(lambda d: d.callback(stray))
            else:
                spawning = Deferred(lambda _: self._spawnCancelled())
            self.spawning = spawning
            return spawning
        return succeed(self._newVM())

    def _newVM(self) -> FakeVM:
        vm = FakeVM(pid=1000 + len(self.vms), console=self.console, quickStop=self.quickStop)
        self.vms.append(vm)
        return vm

    def _spawnCancelled(self) -> None:
        self.cancelledSpawns += 1
        self.spawning = None

    def finishSpawn(self) -> FakeVM:
        """A slow spawn (e.g. ephemeral mode's fresh disk) is done: vfkit runs."""
        spawning, self.spawning = self.spawning, None
        assert spawning is not None
        vm = self._newVM()
        spawning.callback(vm)
        return vm

    def waitReady(self, vm: VirtualMachine, report: BootReport) -> Deferred[G]:
        self.reports.append(report)
        if self.readyAtOnce is not None:
            return succeed(self.readyAtOnce)
        guest = self.readyOnCancel
        d: Deferred[G]
        if guest is not None:
            d = Deferred(lambda d: d.callback(guest))
        else:
            d = Deferred(lambda _: self.cancelledReady.append(vm.pid))
        self.ready[vm.pid] = d
        return d

    @property
    def last(self) -> FakeVM:
        return self.vms[-1]

    def becomeReady(
        self, vm: FakeVM | None = None, host: str = "192.168.64.2", guest: G | None = None
    ) -> None:
        vm = vm or self.last
        self.ready[vm.pid].callback(guest if guest is not None else self._guest(host))

    def alive(self) -> list[FakeVM]:
        return [vm for vm in self.vms if vm.alive]


class FakeCommands:
    """
    What the control socket runs: a fixed status document, and starts and stops that wait
    until the test fires them (and count their cancellations).
    """

    def __init__(self, document: dict[str, Any] | None = None) -> None:
        self.document = (
            document if document is not None else {"state": "running", "vm_ip": "192.168.64.7"}
        )
        self.starts: list[Deferred[dict[str, Any]]] = []
        self.stops: list[tuple[bool, Deferred[dict[str, Any]]]] = []
        self.renewals: list[Deferred[dict[str, Any]]] = []
        self.renewedFrom: list[str | None] = []
        self.cancelled = 0

    def status(self) -> dict[str, Any]:
        return self.document

    def start(self) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred(lambda _: self._cancel())
        self.starts.append(d)
        return d

    def stop(self, force: bool) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred(lambda _: self._cancel())
        self.stops.append((force, d))
        return d

    def renew(self, package: str | None) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred(lambda _: self._cancel())
        self.renewals.append(d)
        self.renewedFrom.append(package)
        return d

    def _cancel(self) -> None:
        self.cancelled += 1


@implementer(IProcessTransport)
class FakeProcessTransport:
    """
    A child process's transport that records the signals sent and whether stdin was
    closed.  Given its C{protocol}, the process ends (killed by the signal) on any signal
    in C{diesOn}.
    """

    def __init__(
        self,
        pid: int = 4321,
        protocol: IProcessProtocol | None = None,
        diesOn: Iterable[str] = (),
    ) -> None:
        self.pid = pid
        #: The concrete protocol: tests reach into it (its status, its output).
        self.protocol: Any = protocol
        self.diesOn = set(diesOn)
        self.signals: list[str] = []
        self.stdinClosed = False
        self.written: list[bytes] = []
        self.lost = False

    def signalProcess(self, signalID: str | int) -> None:
        self.signals.append(str(signalID))
        if self.protocol is not None and signalID in self.diesOn:
            self.protocol.processEnded(Failure(ProcessTerminated(None, signal=15)))

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        self.written.append(data)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.written.extend(data)

    def loseConnection(self) -> None:
        self.lost = True

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)


class Spawned(NamedTuple):
    """One process a fake reactor was asked to start, as C{spawnProcess} was called."""

    # As the code under test passed them, for the test to look into: the concrete
    # protocol (its transport, its status), the arguments as given.
    protocol: Any
    executable: Any
    args: Any
    env: Any
    path: Any
    childFDs: Any


class _Spawning:
    """
    Starting a process, in memory: each is recorded in C{spawned} and given a
    L{FakeProcessTransport} with the reactor's C{pid} that ends on a signal in C{diesOn};
    with C{refuse} set, spawning raises it, as a missing executable makes the real one.
    """

    def _startSpawning(self, pid: int, diesOn: Iterable[str], refuse: OSError | None) -> None:
        self.pid = pid
        self.diesOn = set(diesOn)
        self.refuse = refuse
        self.spawned: list[Spawned] = []
        self._transports: list[FakeProcessTransport] = []

    @property
    def transport(self) -> FakeProcessTransport:
        """The transport of the last process started."""
        assert self._transports, "no process was started"
        return self._transports[-1]

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, object] | None = None,
    ) -> IProcessTransport:
        if self.refuse is not None:
            raise self.refuse
        transport = FakeProcessTransport(self.pid, processProtocol, self.diesOn)
        self.spawned.append(Spawned(processProtocol, executable, args, env, path, childFDs))
        self._transports.append(transport)
        processProtocol.makeConnection(transport)
        return transport


@implementer(IHostReactor)
class FakeReactor(_Spawning, MemoryReactorClock):
    """
    Twisted's memory reactor and clock, declared as everything a Virby program asks of its
    reactor (L{virby.reactors.IHostReactor}), so code typed against a narrower composition
    takes it.  What the memory reactor lacks it does in memory too: processes start as
    L{_Spawning} says; a call from another thread runs on the clock's next turn.
    """

    def __init__(
        self, pid: int = 4321, diesOn: Iterable[str] = (), refuse: OSError | None = None
    ) -> None:
        super().__init__()
        self._startSpawning(pid, diesOn, refuse)

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.callLater(0, callable, *args, **kwargs)


def logObserver(observe: Callable[[LogEvent], object]) -> ILogObserver:
    """
    C{observe} as the L{ILogObserver} Twisted's publishers are typed to take.  Any callable
    of one event is one (Twisted's own observers are plain callables), but a bound method or
    a lambda cannot declare it, so the type checker is told here, once.
    """
    return cast(ILogObserver, observe)


def readyGuest(host: str) -> ReadyGuest:
    """The guest the real hypervisor reports, for fakes of it the proxy and daemon take."""
    return ReadyGuest(host, 22)


if TYPE_CHECKING:
    from virby.daemon.control import Commands
    from virby.daemon.lifecycle import Hypervisor
    from virby.daemon.service import DaemonHypervisor

    # Each fake is what the part it stands for promises, whether or not a test happens to
    # pass it where the real part goes: mypy checks these once, here.
    _vm: VirtualMachine = FakeVM(pid=1)
    _hypervisor: Hypervisor[FakeGuest] = FakeHypervisor()
    _daemonHypervisor: DaemonHypervisor = FakeHypervisor(readyGuest)
    _commands: Commands = FakeCommands()
    _transport: IProcessTransport = FakeProcessTransport()
