"""
The daemon's wiring: the builder port, the control socket, and the lifecycle, which drives
the hypervisor adapter (L{virby.daemon.hypervisor}) and the splice (L{virby.daemon.proxy}).

C{makeDaemonService} is all that C{twistd virby} calls.  It checks what can be checked before
the reactor runs (the working directory, the vfkit command, the endpoint string) so that a
wrong setup ends in one line and a non-zero exit, where launchd's log shows it, instead of a
daemon that accepts connections it can never serve.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure

from virby import __version__
from virby.config import Config
from virby.daemon.capacity import (
    BACKLOG,
    ConnectionLimit,
    DescriptorLimit,
    Pausable,
    adjustDescriptorLimit,
    kernelBacklogCap,
    widenAcceptQueue,
)
from virby.daemon.control import ControlFactory, StaleSocketError, clearStaleSocket, controlEndpoint
from virby.daemon.hypervisor import VfkitHypervisor
from virby.daemon.lifecycle import Hypervisor, Lifecycle
from virby.daemon.logfile import LogFile
from virby.daemon.proxy import ProxyFactory, isLoopback
from virby.daemon.readiness import ReadyGuest
from virby.daemon.relay import spliceAvailable
from virby.daemon.virbyd import exitWithError
from virby.errors import VirbyError, oneLine
from virby.installed import (
    PACKAGE,
    Installed,
    describeChanges,
    packageDirectory,
    readInstalled,
)
from virby.layout import CONTROL_SOCKET, DAEMON_LOCK, DAEMON_UMASK, checkWorkingDirectory
from virby.locks import FileLock, takeLock
from virby.logs import Logger, setVerbose
from virby.reactors import IHostReactor
from virby.runtime import removeQuietly
from virby.vfkitflags import HostPlan, findVfkit, planHost

log = Logger()

#: The endpoints whose socket a supervisor holds (launchd's, or systemd's protocol): when the
#: daemon exits, the supervisor starts it again, and connections wait in the socket's queue.
SUPERVISED = ("launchd:", "systemd:")


class StartupError(VirbyError):
    """The daemon cannot start serving; the message says why and what to do."""


class DaemonHypervisor(Hypervisor[ReadyGuest], Protocol):
    """
    The hypervisor as the daemon holds it: the lifecycle's, and at start it stops a VM an
    earlier daemon left running (L{VfkitHypervisor} is the one the daemon makes), and what
    this Mac lets the VM have, whose warnings the status shows.
    """

    plan: HostPlan

    def stopOrphan(self) -> Deferred[None]: ...


class DaemonService(Service):
    """
    Listens on the builder endpoint and the control socket, and runs the lifecycle: one
    service with ordered steps of its own, not a tree of services.

    Starting locks the working directory, listens on the builder endpoint, then on the
    control socket, then starts the lifecycle (an always-on VM boots); a start that fails
    takes back what it made.  Stopping (SIGTERM from launchd, or ^C) stops accepting first,
    then powers the guest off within launchd's 20 s, then closes the control socket, so
    C{virby status} can watch the shutdown, and last lets go of the working directory's lock.

    Renewing (C{virby prepare} asks it, L{renew}): when what is installed (L{virby.installed})
    differs from what the daemon started with, the lifecycle serves on with the VM that runs
    until no connection is open, then has the daemon retire (L{_retire}): it stops accepting
    in that same turn and stops the reactor, which stops the service as above, and its
    supervisor, which holds the listening socket, starts it anew on what is installed.  A
    daemon that listens itself (C{tcp:}) has no one to start it again, and refuses.

    @param installed: reads what is installed now (L{readInstalled} with the daemon's config
        file); read at start and at each renewal.
    @param exit: ends the daemon's process once it has retired (the reactor's C{stop}).
    @param package: this daemon's Virby package directory (L{packageDirectory}).
    """

    def __init__(
        self,
        reactor: IHostReactor,
        config: Config,
        endpoint: IStreamServerEndpoint,
        hypervisor: DaemonHypervisor,
        lifecycle: Lifecycle[ReadyGuest],
        descriptors: DescriptorLimit | None = None,
        installed: Callable[[], Installed] | None = None,
        exit: Callable[[], object] | None = None,
        package: str | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._config = config
        self._endpoint = endpoint
        self._hypervisor = hypervisor
        self.lifecycle = lifecycle
        self._descriptors = descriptors
        self._ports: list[IListeningPort] = []
        self._limit: ConnectionLimit | None = None
        self._control: IListeningPort | None = None
        self._lock: FileLock | None = None
        self._startedAt: float | None = None
        self._proxy = ProxyFactory(
            reactor, lifecycle, pipeLimit=descriptors.pipes if descriptors else None
        )
        self._installed = installed or (lambda: readInstalled(None, config.working_directory))
        self._startedWith: Installed | None = None
        #: What the last renewal found changed, which the status names.
        self._renewingFor: list[str] = []
        self._package = package or packageDirectory()
        self._exit = exit or reactor.stop
        lifecycle.retire = self._retire

    def startService(self) -> None:
        """
        Lock the working directory, then listen, all synchronously: twistd calls this before
        the reactor runs, so another daemon, a port in use or a missing launchd socket fails
        the start here, with one line, instead of later.  A start that fails takes back what
        it made, so no control socket or lock file is left behind.
        """
        super().startService()
        self._startedAt = self._reactor.seconds()
        self._startedWith = self._installed()
        self._lockWorkingDirectory()
        try:
            self._ports = _listenAll(self._endpoint, self._builderFactory(), self._config.listen)
            self._control = self._listenControl()
        except BaseException:
            self._abandonStart()
            raise
        if self._limit is not None:
            self._limit.attach(self._ports)
        widened = [widenAcceptQueue(port) for port in self._ports]
        for port in self._ports:
            log.info("serving the builder on {address}", address=_address(port))
            _warnIfReachable(port)
        if any(widened):
            _logAcceptQueue()
        self._hypervisor.stopOrphan().addErrback(lambda _: None)  # logged where it failed
        self.lifecycle.start()

    def _builderFactory(self) -> IProtocolFactory:
        """The splice, behind the limit its open files set (L{virby.daemon.capacity})."""
        factory = self._proxy
        if self._descriptors is None:
            return factory
        self._limit = limit = ConnectionLimit(
            factory,
            self._descriptors.connections,
            lambda: factory.openConnections,
            self._reactor,
            self._descriptors.why(),
        )
        factory.onClosed = limit.ended
        return limit

    def _lockWorkingDirectory(self) -> None:
        """One daemon per working directory: the kernel drops the lock when this one dies."""
        self._lock = takeLock(self._config.path(DAEMON_LOCK), StartupError, self._anotherDaemon)

    def _anotherDaemon(self, lock: FileLock) -> str:
        holder = lock.holder()
        return (
            f"another virby daemon ({f'pid {holder}' if holder else 'unknown pid'}) "
            f"is already serving {self._config.working_directory}: stop it first, or "
            "give this daemon its own working-directory"
        )

    def _listenControl(self) -> IListeningPort:
        path = self._config.path(CONTROL_SOCKET)
        try:
            clearStaleSocket(path)
        except StaleSocketError as e:
            raise StartupError(str(e)) from None
        return _listenNow(
            controlEndpoint(self._reactor, path),
            ControlFactory(DaemonCommands(self), self._reactor),
            "the control socket",
        )

    def _abandonStart(self) -> None:
        ports, self._ports = self._ports, []
        for port in ports:
            port.stopListening()
        if self._control is not None:
            control, self._control = self._control, None
            control.stopListening()
        path = self._config.path(CONTROL_SOCKET)
        if os.path.lexists(path) and not os.path.isdir(path):
            removeQuietly(path)  # bound by the failed listen: nothing else can be there
        self._releaseLock()

    def _releaseLock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release(remove=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        ports, self._ports = self._ports, []
        await DeferredList([maybeDeferred(p.stopListening) for p in ports])
        await self.lifecycle.shutdown()
        if self._control is not None:
            control, self._control = self._control, None
            await maybeDeferred(control.stopListening)
        self._releaseLock()
        log.info("stopped")

    def renew(self, package: str | None = None) -> Deferred[dict[str, Any]]:
        """
        Move to what is installed now, without cutting a build (see the class docstring):
        the reply names what changed, and whether the daemon retires now or once its open
        connections have ended.  Nothing changed: nothing to do.

        @param package: the asking command's Virby package directory, compared with this
            daemon's own (L{virby.installed}); C{None}: not compared.
        """
        assert self._startedWith is not None, "renewing a daemon that has not started"
        changes = self._installed().changesSince(self._startedWith)
        if package is not None and package != self._package:
            changes.append(PACKAGE)
        if not changes:
            return succeed({"renewing": False, "changed": []})
        if not self._config.listen.startswith(SUPERVISED):
            return fail(
                VirbyError(
                    f"this daemon listens on {self._config.listen} itself, so nothing would "
                    f"start it again: restart it by hand to move to its {describeChanges(changes)}"
                )
            )
        log.info("renewing for its {changes}", changes=describeChanges(changes))
        self._renewingFor = changes
        return self.lifecycle.renew().addCallback(
            lambda outcome: {
                "renewing": True,
                "changed": changes,
                "now": outcome.now,
                "open_connections": outcome.open,
            }
        )

    def _retire(self) -> None:
        """
        No connection is open after a renewal: accept nothing more (this turn, before the
        next accept), then end, so that the supervisor starts the daemon anew; connections
        made meanwhile wait in the listening socket's queue, which the supervisor holds.
        """
        if self._limit is not None:
            self._limit.detach()
        for port in self._ports:
            if isinstance(port, Pausable):
                port.stopReading()
        log.info("retiring: the daemon stops, and its supervisor starts it on what is installed")
        self._exit()

    def describe(self) -> dict[str, Any]:
        """The status document C{virby status} shows."""
        document = asdict(self.lifecycle.snapshot())
        now = self._reactor.seconds()
        toGuest, fromGuest = self._proxy.traffic()
        document.update(
            bytes_to_guest=toGuest,
            bytes_from_guest=fromGuest,
            daemon_pid=os.getpid(),
            daemon_uptime=now - self._startedAt if self._startedAt is not None else None,
            listening=[_address(port) for port in self._ports],
            ttl=self._config.ttl,
            start_timeout=self._config.start_timeout,
            warnings=list(self._hypervisor.plan.warnings),
            renewing_for=list(self._renewingFor) if document["renewing"] else [],
            version=__version__,
        )
        return document


class DaemonCommands:
    """What the control socket's requests do (L{virby.daemon.control.Commands})."""

    def __init__(self, service: DaemonService) -> None:
        self._service = service

    def status(self) -> dict[str, Any]:
        return self._service.describe()

    def start(self) -> Deferred[dict[str, Any]]:
        started = self._service.lifecycle.startNow()
        return started.addCallback(
            lambda outcome: {
                "booted": outcome.booted,
                "vm_ip": outcome.address[0],
                "vm_port": outcome.address[1],
                "boot_seconds": outcome.boot_seconds,
            }
        )

    def stop(self, force: bool) -> Deferred[dict[str, Any]]:
        stopped = self._service.lifecycle.stopNow(force)
        return stopped.addCallback(
            lambda outcome: {"stopped": outcome.stopped, "closed_connections": outcome.closed}
        )

    def renew(self, package: str | None) -> Deferred[dict[str, Any]]:
        return self._service.renew(package)


def _logAcceptQueue() -> None:
    cap = kernelBacklogCap()
    if cap is not None and cap[0] < BACKLOG:
        log.info(
            "accept queue: {cap} connections, the kernel's cap ({setting}; raise it to "
            "{backlog} to queue more while the daemon is busy)",
            cap=cap[0],
            setting=cap[1],
            backlog=BACKLOG,
        )
    else:
        log.info("accept queue: {backlog} connections", backlog=BACKLOG)


def _listenNow(
    endpoint: IStreamServerEndpoint, factory: IProtocolFactory, what: str
) -> IListeningPort:
    """Listen and return the port at once, or raise L{StartupError} naming C{what}."""
    outcome: list[IListeningPort | Failure] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise StartupError(f"listening on {what} did not complete at startup")
    port = outcome[0]
    if isinstance(port, Failure):
        raise StartupError(f"cannot listen on {what}: {oneLine(port)}")
    return port


def _listenAll(
    endpoint: IStreamServerEndpoint, factory: IProtocolFactory, what: str
) -> list[IListeningPort]:
    """The builder endpoint may be several sockets (launchd hands IPv4 and IPv6)."""
    port = _listenNow(endpoint, factory, what)
    return list(getattr(port, "ports", None) or [port])


def _warnIfReachable(port: IListeningPort) -> None:
    """
    A listening address other hosts can reach is served to loopback peers only: the others
    are refused one by one, in the daemon (L{virby.daemon.proxy.isLoopback}), not by the
    kernel, so say so once, at start, rather than leave it to each refusal.
    """
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address) and not isLoopback(host):
        log.warn(
            "the builder listens on {address}, which other hosts can reach: only loopback "
            "peers are served, the others are refused; listen on 127.0.0.1 or ::1 instead",
            address=_address(port),
        )


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address):
        return f"{host.host}:{host.port}" if ":" not in host.host else f"[{host.host}]:{host.port}"
    return str(getattr(host, "name", host))


def installSignalHandlers(reactor: IHostReactor, logFile: LogFile) -> None:
    """
    SIGTERM and SIGINT shut down cleanly and exit 0.  twistd's own handlers would re-raise
    the signal at exit, which launchd logs as a crash.  Installed before the reactor runs
    too: an always-on VM is spawned while the service starts, and a SIGTERM in that window
    would otherwise kill the daemon outright and leave vfkit behind.  A stop requested
    then runs as soon as the reactor does.

    SIGHUP reopens the log now (L{virby.daemon.logfile}), instead of killing the daemon as it would
    by default.
    """

    def shutdown(signum: int, frame: object) -> None:
        log.info("received {signal}: shutting down", signal=signal.Signals(signum).name)
        reactor.callFromThread(reactor.stop)

    def reopen(signum: int, frame: object) -> None:
        reactor.callFromThread(logFile.reopen, "SIGHUP")

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, shutdown)
    signal.signal(signal.SIGHUP, reopen)


def makeDaemonService(
    config: Config, reactor: IHostReactor, configFile: str | None = None
) -> DaemonService:
    """
    Check the setup, then build the service tree; any problem is one line and exit 1.

    @param configFile: the config file the daemon was given, which a renewal reads again
        (L{virby.installed}).
    """
    try:
        checkWorkingDirectory(config.working_directory)
        executable = findVfkit(config.vfkit)
        endpoint = _endpoint(reactor, config.listen)
    except VirbyError as e:
        exitWithError(str(e))
    setVerbose(config.debug)
    # vfkit creates its REST socket with our umask: owner-only, even when allow-user-ssh
    # opens the working directory for traversal.
    os.umask(DAEMON_UMASK)
    # What the Mac can do, asked once, before the reactor runs (see planHost).
    plan = planHost(config)
    for warning in plan.warnings:
        log.warn("{warning}", warning=warning)
    descriptors = adjustDescriptorLimit(reactor, splicing=spliceAvailable())
    log.info("{limit}", limit=descriptors.describe())
    hypervisor = VfkitHypervisor(reactor, config, executable, plan)
    lifecycle = Lifecycle(reactor, hypervisor, onDemand=config.on_demand, ttl=config.ttl)
    service = _ExitOnStartupError(
        reactor,
        config,
        endpoint,
        hypervisor,
        lifecycle,
        descriptors,
        installed=lambda: readInstalled(configFile, config.working_directory),
    )
    logFile = LogFile.ofStandardStreams()
    installSignalHandlers(reactor, logFile)
    reactor.callWhenRunning(installSignalHandlers, reactor, logFile)
    reactor.callWhenRunning(logFile.watch, reactor)
    return service


def _endpoint(reactor: IHostReactor, description: str) -> IStreamServerEndpoint:
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    except VirbyError:
        raise
    except Exception as e:
        raise StartupError(f"listen endpoint {description!r} is not valid: {e}") from None
    return endpoint


class _ExitOnStartupError(DaemonService):
    """Under twistd, a start that cannot serve ends the process with one line and status 1."""

    def startService(self) -> None:
        try:
            super().startService()
        except VirbyError as e:
            log.critical("cannot start: {why}", why=str(e))
            exitWithError(str(e))
