"""
The hypervisor adapter: how the lifecycle (L{virby.daemon.lifecycle.Hypervisor}) starts a VM with
vfkit and learns that its guest is ready.

A boot is: stop a VM left by a crashed daemon, if any (L{virby.daemon.orphans}); take the working
directory's VM lock, which the vfkit about to start inherits; with C{ephemeral}, make a fresh
disk under it (L{virby.daemon.freshdisk}); keep the VM's stable MAC (L{virby.mac}); start vfkit
(L{virby.daemon.vfkit}).  Ready is the guest's sshd answering at the address bootpd leased to that
MAC (L{virby.leases}, L{virby.daemon.readiness}).  Each VM carries its own MAC, so the adapter holds
no state of a boot: the lifecycle may start the next while the last one's wait ends.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from virby.config import Config
from virby.daemon.freshdisk import makeFreshDisk
from virby.daemon.lifecycle import VirtualMachine
from virby.daemon.orphans import stopOrphan
from virby.daemon.readiness import BootTimeout, ReadyGuest, waitForGuest
from virby.daemon.vfkit import VfkitProcess
from virby.errors import PermanentError, VirbyError
from virby.layout import MAC, PREPARE_FIX, VM_LOCK, noImageYet
from virby.leases import LeaseFile
from virby.locks import FileLock, takeLock
from virby.logs import Logger
from virby.mac import stableMac
from virby.reactors import IVMReactor
from virby.vfkitflags import HostPlan

log = Logger()

#: How often a booting VM's lease is looked up (a stat of the lease file) until it has one;
#: from then on the guest's sshd is probed every few milliseconds (L{virby.daemon.readiness}).
READINESS_INTERVAL = 0.05


class BootError(VirbyError):
    """No VM can be booted now; the message says why and what to do."""


class HostRefusal(BootError, PermanentError):
    """
    This Mac cannot run what the config asks (L{virby.daemon.vfkit.HostPlan.refusal}): no boot can
    succeed until the config or the Mac changes, so an always-on daemon does not retry it.
    """


class NoImage(BootError, PermanentError):
    """
    No image has been prepared yet (L{virby.layout.noImageYet}): no retry can boot until
    C{virby prepare} has one, and the next connection, or C{virby start}, tries again.
    """


class VfkitHypervisor:
    """
    Starts vfkit and finds out when its guest answers SSH: the lifecycle's view of the VM.

    A VM left behind by a crashed daemon is stopped before the first boot, and no VM is
    ever booted while a process still holds the working directory's VM lock: two VMs on
    one disk image would corrupt it (L{virby.daemon.orphans}).  With C{ephemeral}, every boot
    starts from a fresh C{diff.img} (L{virby.daemon.freshdisk}), made under that lock in a child
    process, so the reactor never waits on a copy; it is bounded by C{start-timeout} of its
    own, and its failure fails the boot.
    """

    def __init__(
        self, reactor: IVMReactor, config: Config, executable: str, plan: HostPlan | None = None
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._executable = executable
        self.plan = plan or HostPlan(nested=config.nested_virtualization)
        self._leases = LeaseFile(config.leases_file)
        self._orphanCheck: Deferred[Exception | None] | None = None

    def stopOrphan(self) -> Deferred[None]:
        """
        Stop a VM left by a previous daemon; every spawn waits for this.  It runs once per
        daemon when it succeeds, and again at the next spawn when it could not.
        """
        check = self._orphanCheck
        if check is None:
            check = self._orphanCheck = Deferred.fromCoroutine(self._checkOrphan())
            check.addCallback(self._forgetFailedCheck, check)
        waiting: Deferred[None] = Deferred()

        def relay(outcome: Exception | None) -> Exception | None:
            if outcome is None:
                waiting.callback(None)
            else:
                waiting.errback(outcome)
            return outcome

        check.addCallback(relay)
        return waiting

    async def _checkOrphan(self) -> Exception | None:
        """The outcome, never a failure: each caller gets its own copy of an error."""
        try:
            await stopOrphan(self._reactor, self._config.working_directory)
        except VirbyError as e:
            log.error("{why}", why=str(e))
            return e
        except Exception:
            log.failure("checking for a VM left by a previous daemon failed")
            return BootError("checking for a VM left by a previous daemon failed: see the log")
        return None

    def _forgetFailedCheck(
        self, outcome: Exception | None, check: Deferred[Exception | None]
    ) -> Exception | None:
        if outcome is not None and self._orphanCheck is check:
            self._orphanCheck = None
        return outcome

    def spawn(self) -> Deferred[VirtualMachine]:
        return Deferred.fromCoroutine(self._spawn())

    async def _spawn(self) -> VirtualMachine:
        if self.plan.refusal is not None:
            raise HostRefusal(self.plan.refusal)
        missing = noImageYet(self._config.working_directory)
        if missing is not None:
            raise NoImage(missing)
        await self.stopOrphan()
        lock = self._lockVM()
        if self._config.ephemeral:
            # Under the VM lock: no VM, not even one a previous daemon left, has the disk open.
            try:
                done = await makeFreshDisk(
                    self._reactor,
                    self._config.working_directory,
                    self._config.disk_size,
                    float(self._config.start_timeout),
                )
            except BaseException:
                lock.release()
                raise
            log.info("{done}", done=done)
        try:
            mac = stableMac(self._config.path(MAC))
        except OSError as e:
            lock.release()
            raise BootError(
                f"cannot keep the VM's MAC in {self._config.path(MAC)}: {e.strerror or e}; "
                f"{PREPARE_FIX}"
            ) from None
        try:
            return VfkitProcess.start(
                self._reactor, self._config, self._executable, mac, vmLock=lock, plan=self.plan
            )
        except BaseException:
            lock.release()
            raise

    def _lockVM(self) -> FileLock:
        """The VM lock, which the vfkit about to start inherits and holds for its life."""
        return takeLock(self._config.path(VM_LOCK), BootError, self._anotherVM)

    def _anotherVM(self, lock: FileLock) -> str:
        return (
            f"a VM of {self._config.working_directory} is still running: a process "
            f"holds {lock.path} (find it with `lsof {lock.path}`); stop it and connect again"
        )

    def waitReady(self, vm: VirtualMachine) -> Deferred[ReadyGuest]:
        """The guest of C{vm}, which this adapter spawned, once its sshd answers."""
        if not isinstance(vm, VfkitProcess):
            raise TypeError(f"{vm!r} was not started by this hypervisor")
        mac = vm.mac
        waiting = waitForGuest(
            self._reactor,
            lambda: self._leases.lookup(mac),
            self._config.guest_ssh_port,
            float(self._config.start_timeout),
            interval=READINESS_INTERVAL,
            what=f"MAC {mac} in {self._config.leases_file}",
        )
        return waiting.addErrback(self._explainNoLease, mac)

    def _explainNoLease(self, reason: Failure, mac: str) -> Failure:
        """
        A wait that ends without a lease says why when the lease file knows: a lease named
        for the VM under a DUID client id is a guest misconfiguration no wait can outlast.
        """
        timeout = reason.value
        if not isinstance(timeout, BootTimeout) or timeout.reason != "no-lease":
            return reason
        explanation = self._leases.explainMissing(mac)
        if explanation is None:
            return reason
        return Failure(
            BootTimeout(
                timeout.reason,
                f"no DHCP lease for MAC {mac} within {self._config.start_timeout}s: {explanation}",
                timeout.ip,
                timeout.last_error,
            )
        )
