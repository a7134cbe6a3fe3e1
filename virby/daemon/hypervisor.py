"""
The hypervisor adapter: how the lifecycle (L{virby.daemon.lifecycle.Hypervisor}) starts a VM with
vfkit and learns that its guest is ready.

A boot is: stop a VM left by a crashed daemon, if any (L{virby.daemon.orphans}); take the working
directory's VM lock, which the vfkit about to start inherits; retire the SSH keys of the set
before the current one, on which no VM runs now (L{virby.rotation}); with C{ephemeral}, make a
fresh disk under it (L{virby.daemon.freshdisk}); keep the VM's stable MAC (L{virby.mac}); start
vfkit (L{virby.daemon.vfkit}).  Ready is the guest's sshd answering at the address bootpd leased
to that MAC (L{virby.leases}, L{virby.daemon.readiness}).  Each VM carries its own MAC, so the
adapter holds no state of a boot: the lifecycle may start the next while the last one's wait
ends.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from virby.config import Config
from virby.daemon.freshdisk import makeFreshDisk
from virby.daemon.lifecycle import BootPhase, BootReport, VirtualMachine
from virby.daemon.observers import OneShot
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
from virby.rotation import retirePrevious
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
        self._orphanCheck: OneShot[None] | None = None

    def stopOrphan(self) -> Deferred[None]:
        """
        Stop a VM left by a previous daemon; every spawn waits for this.  It runs once per
        daemon when it succeeds, and again at the next spawn when it could not.
        """
        check = self._orphanCheck
        if check is None:
            self._orphanCheck = check = OneShot()
            checking = Deferred.fromCoroutine(self._checkOrphan())
            checking.addErrback(self._forgetFailedCheck, check).addBoth(check.fire)
        return check.observe()

    async def _checkOrphan(self) -> None:
        try:
            await stopOrphan(self._reactor, self._config.working_directory)
        except VirbyError as e:
            log.error("{why}", why=str(e))
            raise
        except Exception:
            log.failure("checking for a VM left by a previous daemon failed")
            raise BootError(
                "checking for a VM left by a previous daemon failed: see the log"
            ) from None

    def _forgetFailedCheck(self, reason: Failure, check: OneShot[None]) -> Failure:
        """A check that failed is made again at the next spawn."""
        if self._orphanCheck is check:
            self._orphanCheck = None
        return reason

    def spawn(self, report: BootReport) -> Deferred[VirtualMachine]:
        return Deferred.fromCoroutine(self._spawn(report))

    async def _spawn(self, report: BootReport) -> VirtualMachine:
        if self.plan.refusal is not None:
            raise HostRefusal(self.plan.refusal)
        missing = noImageYet(self._config.working_directory)
        if missing is not None:
            raise NoImage(missing)
        await self.stopOrphan()
        lock = self._lockVM()
        try:
            self._retirePreviousKeys()
        except BaseException:
            lock.release()
            raise
        if self._config.ephemeral:
            # Under the VM lock: no VM, not even one a previous daemon left, has the disk open.
            report(BootPhase.FRESH_DISK, "no VM left behind, the VM lock taken")
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
            vm = VfkitProcess.start(
                self._reactor, self._config, self._executable, mac, vmLock=lock, plan=self.plan
            )
        except BaseException:
            lock.release()
            raise
        report(BootPhase.LEASE, f"vfkit started (pid {vm.pid})")
        return vm

    def _retirePreviousKeys(self) -> None:
        """
        Under the VM lock no VM runs, and the one about to boot copies the current keys: the
        previous set, kept by C{virby prepare} for a VM of the image before, can go.  A few
        tiny files, fine on the reactor; a failure only delays it to the next boot.
        """
        workingDirectory = self._config.working_directory
        try:
            retired = retirePrevious(workingDirectory)
        except OSError as e:
            log.warn(
                "could not retire the previous SSH keys in {workingDirectory}: {why}; "
                "the next boot tries again",
                workingDirectory=workingDirectory,
                why=e.strerror or str(e),
            )
            return
        if retired:
            log.info("retired the previous SSH keys: no VM runs on them now")

    def _lockVM(self) -> FileLock:
        """The VM lock, which the vfkit about to start inherits and holds for its life."""
        return takeLock(self._config.path(VM_LOCK), BootError, self._anotherVM)

    def _anotherVM(self, lock: FileLock) -> str:
        return (
            f"a VM of {self._config.working_directory} is still running: a process "
            f"holds {lock.path} (find it with `lsof {lock.path}`); stop it and connect again"
        )

    def waitReady(self, vm: VirtualMachine, report: BootReport) -> Deferred[ReadyGuest]:
        """
        The guest of C{vm}, which this adapter spawned, once its sshd answers; the first
        lease found for its MAC is reported (the guest has an address: its sshd comes next).
        """
        if not isinstance(vm, VfkitProcess):
            raise TypeError(f"{vm!r} was not started by this hypervisor")
        mac = vm.mac
        leased: list[str] = []

        def lookup() -> str | None:
            ip = self._leases.lookup(mac)
            if ip is not None and not leased:
                leased.append(ip)
                report(BootPhase.SSHD, f"the guest leased {ip}")
            return ip

        waiting = waitForGuest(
            self._reactor,
            lookup,
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
