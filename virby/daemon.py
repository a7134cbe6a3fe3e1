"""
The daemon's service tree: the builder port, the control socket, and the lifecycle that
ties vfkit, the lease file and the splice together.

C{makeDaemonService} is all that C{twistd virby} calls.  It checks what can be checked before
the reactor runs (the working directory, the vfkit command, the endpoint string) so that a
wrong setup ends in one line and a non-zero exit, where launchd's log shows it, instead of a
daemon that accepts connections it can never serve.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import asdict
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure

from virby import __version__
from virby.config import Config
from virby.control import CONTROL_SOCKET, ControlFactory, controlEndpoint
from virby.errors import VirbyError
from virby.freshdisk import makeFreshDisk
from virby.leases import LeaseFile
from virby.lifecycle import Lifecycle, VirtualMachine
from virby.logs import Logger, setVerbose
from virby.mac import stable_mac
from virby.orphans import stop_orphan
from virby.proxy import ProxyFactory
from virby.readiness import wait_for_guest
from virby.vfkit import HostPlan, VfkitProcess, find_vfkit, plan_host

log = Logger()

#: How often a booting VM is checked (a stat of the lease file, then one connection attempt
#: to a local address): each check is cheap, and every interval is time a waiting build
#: may lose after sshd is up.
READINESS_INTERVAL = 0.05


class StartupError(VirbyError):
    """The daemon cannot start serving; the message says why and what to do."""


class VfkitHypervisor:
    """
    Starts vfkit and finds out when its guest answers SSH: the lifecycle's view of the VM.

    A vfkit left behind by a crashed daemon is stopped before the first boot: two VMs on
    one disk image would corrupt it.  With C{ephemeral}, every boot starts from a fresh
    C{diff.img} (L{virby.freshdisk}), made in a child process so the reactor never waits on
    a copy; it is bounded by C{start-timeout} of its own, and its failure fails the boot.
    """

    def __init__(
        self, reactor: Any, config: Config, executable: str, plan: HostPlan | None = None
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._executable = executable
        self.plan = plan or HostPlan(nested=config.nested_virtualization)
        self._leases = LeaseFile(config.leases_file)
        self._orphanCheck: Deferred[Any] | None = None
        self._mac: str | None = None

    def stopOrphan(self) -> Deferred[Any]:
        """Stop a leftover vfkit once per daemon; every spawn waits for this."""
        if self._orphanCheck is None:
            self._orphanCheck = Deferred.fromCoroutine(
                stop_orphan(self._reactor, self._config.path("vfkit.pid"), self._executable)
            )
            self._orphanCheck.addErrback(
                lambda f: log.error("checking for a leftover vfkit failed: {why}", why=f.value)
            )
        return self._orphanCheck

    def spawn(self) -> Deferred[VirtualMachine]:
        return Deferred.fromCoroutine(self._spawn())

    async def _spawn(self) -> VirtualMachine:
        if self.plan.refusal is not None:
            raise StartupError(self.plan.refusal)
        await self.stopOrphan()
        if self._config.ephemeral:
            # After the orphan is gone: it may still have had the old disk open.
            done = await makeFreshDisk(
                self._reactor,
                self._config.working_directory,
                self._config.disk_size,
                float(self._config.start_timeout),
            )
            log.info("{done}", done=done)
        try:
            self._mac = stable_mac(self._config.path("mac"))
        except OSError as e:
            raise StartupError(
                f"cannot keep the VM's MAC in {self._config.path('mac')}: {e.strerror or e}; "
                "run `virby prepare` to repair the working directory"
            ) from None
        return VfkitProcess.start(
            self._reactor, self._config, self._executable, self._mac, plan=self.plan
        )

    def waitReady(self, vm: VirtualMachine) -> Deferred[tuple[str, int]]:
        mac = self._mac
        assert mac is not None
        port = self._config.guest_ssh_port
        waiting = wait_for_guest(
            self._reactor,
            lambda: self._leases.lookup(mac),
            port,
            float(self._config.start_timeout),
            interval=READINESS_INTERVAL,
            what=f"MAC {mac} in {self._config.leases_file}",
        )
        return waiting.addCallback(lambda ip: (ip, port))


class DaemonService(MultiService):
    """
    Listens on the builder endpoint and the control socket, and runs the lifecycle.

    Stopping (SIGTERM from launchd, or ^C) stops accepting first, then powers the guest off
    within launchd's 20 s, then closes the control socket, so C{virby status} can watch the
    shutdown.
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        endpoint: IStreamServerEndpoint,
        hypervisor: VfkitHypervisor,
        lifecycle: Lifecycle,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._config = config
        self._endpoint = endpoint
        self._hypervisor = hypervisor
        self.lifecycle = lifecycle
        self._ports: list[IListeningPort] = []
        self._control: IListeningPort | None = None
        self._startedAt: float | None = None

    def startService(self) -> None:
        """
        Listen synchronously: twistd calls this before the reactor runs, so a port in use or
        a missing launchd socket fails the start here, with one line, instead of later.
        """
        super().startService()
        self._startedAt = self._reactor.seconds()
        self._control = _listenNow(
            controlEndpoint(self._reactor, self._config.path(CONTROL_SOCKET)),
            ControlFactory(self.describe),
            "the control socket",
        )
        self._ports = _listenAll(
            self._endpoint, ProxyFactory(self._reactor, self.lifecycle), self._config.listen
        )
        for port in self._ports:
            log.info("serving the builder on {address}", address=_address(port))
        self._hypervisor.stopOrphan()
        self.lifecycle.start()

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
        log.info("stopped")

    def describe(self) -> dict[str, Any]:
        """The status document C{virby status} shows."""
        document = asdict(self.lifecycle.snapshot())
        now = self._reactor.seconds()
        document.update(
            daemon_pid=os.getpid(),
            daemon_uptime=now - self._startedAt if self._startedAt is not None else None,
            listening=[_address(port) for port in self._ports],
            ttl=self._config.ttl,
            warnings=list(getattr(self._hypervisor, "plan", HostPlan()).warnings),
            version=__version__,
        )
        return document


def _listenNow(endpoint: IStreamServerEndpoint, factory: Any, what: str) -> IListeningPort:
    """Listen and return the port at once, or raise L{StartupError} naming C{what}."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise StartupError(f"listening on {what} did not complete at startup")
    if isinstance(outcome[0], Failure):
        raise StartupError(f"cannot listen on {what}: {_oneLine(outcome[0])}")
    return outcome[0]


def _listenAll(endpoint: IStreamServerEndpoint, factory: Any, what: str) -> list[IListeningPort]:
    """The builder endpoint may be several sockets (launchd hands IPv4 and IPv6)."""
    port = _listenNow(endpoint, factory, what)
    return list(getattr(port, "ports", None) or [port])


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}" if ":" not in host.host else f"[{host.host}]:{host.port}"
    return str(getattr(host, "name", host))


def _oneLine(reason: Failure) -> str:
    return " ".join((str(reason.value) or reason.type.__name__).split())


def checkWorkingDirectory(config: Config) -> None:
    """The daemon writes its runtime files here; prepare makes it."""
    path = config.working_directory
    fix = "run `virby prepare --config FILE` (the nix-darwin activation runs it)"
    if not os.path.isdir(path):
        raise StartupError(f"working directory {path} is missing: {fix}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(
            f"working directory {path} is not writable by uid {os.getuid()}: {fix} "
            "with --owner set to the daemon's user"
        )


def installSignalHandlers(reactor: Any) -> None:
    """
    SIGTERM and SIGINT shut down cleanly and exit 0.  twistd's own handlers would re-raise
    the signal at exit, which launchd logs as a crash.
    """

    def shutdown(signum: int, frame: object) -> None:
        log.info("received {signal}: shutting down", signal=signal.Signals(signum).name)
        reactor.callFromThread(reactor.stop)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, shutdown)


def makeDaemonService(config: Config, reactor: Any) -> DaemonService:
    """Check the setup, then build the service tree; any problem is one line and exit 1."""
    try:
        checkWorkingDirectory(config)
        executable = find_vfkit(config.vfkit)
        endpoint = _endpoint(reactor, config.listen)
    except VirbyError as e:
        sys.stderr.write(f"twistd virby: error: {e}\n")
        raise SystemExit(1) from None
    setVerbose(config.debug)
    # vfkit creates its REST socket with our umask: owner-only, even when allow-user-ssh
    # opens the working directory for traversal.
    os.umask(0o077)
    # What the Mac can do, asked once, before the reactor runs (see plan_host).
    plan = plan_host(config)
    for warning in plan.warnings:
        log.warn("{warning}", warning=warning)
    hypervisor = VfkitHypervisor(reactor, config, executable, plan)
    lifecycle = Lifecycle(reactor, hypervisor, onDemand=config.on_demand, ttl=config.ttl)
    service = _ExitOnStartupError(reactor, config, endpoint, hypervisor, lifecycle)
    reactor.callWhenRunning(installSignalHandlers, reactor)
    return service


def _endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    try:
        return serverFromString(reactor, description)
    except VirbyError:
        raise
    except Exception as e:
        raise StartupError(f"listen endpoint {description!r} is not valid: {e}") from None


class _ExitOnStartupError(DaemonService):
    """Under twistd, a start that cannot serve ends the process with one line and status 1."""

    def startService(self) -> None:
        try:
            super().startService()
        except VirbyError as e:
            sys.stderr.write(f"twistd virby: error: {e}\n")
            log.critical("cannot start: {why}", why=str(e))
            raise SystemExit(1) from None
