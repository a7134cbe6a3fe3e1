"""The hypervisor adapter's failures as the lifecycle meets them, on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from virby import keys, layout
from virby.config import fromMapping
from virby.daemon.hypervisor import BootError, HostRefusal, NoImage, VfkitHypervisor
from virby.daemon.lifecycle import BootPhase, Lifecycle, VMUnavailable
from virby.errors import PermanentError
from virby.vfkitflags import HostPlan

REFUSAL = (
    "rosetta is on, but Rosetta is not installed on this Mac: run `softwareupdate "
    "--install-rosetta`, then restart virbyd; until then no VM boots"
)


def refusing(directory) -> VfkitHypervisor:
    config = fromMapping({"working-directory": str(directory), "rosetta": True})
    plan = HostPlan(refusal=REFUSAL)
    # No reactor: the boot is refused before one would be used.
    return VfkitHypervisor(None, config, "/nonexistent/vfkit", plan)  # type: ignore[arg-type]


def test_a_host_refusal_is_a_boot_error_no_retry_can_cure(short_tmp) -> None:
    failures: list = []
    refusing(short_tmp).spawn(lambda phase, what: None).addErrback(failures.append)
    assert failures[0].check(HostRefusal) and str(failures[0].value) == REFUSAL
    assert failures[0].check(BootError) and failures[0].check(PermanentError)


def test_an_always_on_daemon_on_a_refusing_mac_tries_once_and_says_so_once(short_tmp) -> None:
    clock = Clock()
    lifecycle = Lifecycle(clock, refusing(short_tmp), onDemand=False, ttl=60)
    with capturedLogs() as events:
        lifecycle.start()
        clock.advance(24 * 3600)
    said = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    assert said == [
        f"boot failed: {REFUSAL}",
        "the boot stopped in phase preparing (checking for a VM left behind and taking the "
        "VM lock) after 0.0s",
        "not booting the VM again until something changes: the next connection or "
        "`virby start` tries again",
    ]
    snapshot = lifecycle.snapshot()
    assert snapshot.state == "stopped" and snapshot.restart_in is None
    assert snapshot.last_error == f"boot failed: {REFUSAL}" and snapshot.boots == 1
    waiting: list = []
    lifecycle.whenReady().addErrback(waiting.append)
    assert waiting[0].check(VMUnavailable) and lifecycle.snapshot().boots == 2


def test_the_boot_reports_vfkit_started_then_the_lease_once(short_tmp) -> None:
    from tests.fakes import FakeReactor
    from tests.unit.test_daemon import config, outcome, prepared
    from tests.unit.test_leases import MAC, SAMPLE

    leases = short_tmp / "dhcpd_leases"
    prepared(short_tmp)
    (short_tmp / "mac").write_text(f"{MAC}\n")
    reactor = FakeReactor(4242)
    cfg = config(short_tmp, **{"leases-file": str(leases), "start-timeout": 5})
    hypervisor = VfkitHypervisor(reactor, cfg, "/bin/vfkit")
    reports: list = []
    (vm,) = outcome(hypervisor.spawn(lambda phase, what: reports.append((phase, what))))
    assert reports == [(BootPhase.LEASE, f"vfkit started (pid {vm.pid})")]
    waiting = outcome(hypervisor.waitReady(vm, lambda phase, what: reports.append((phase, what))))
    reactor.advance(0.5)
    assert len(reports) == 1, "no lease yet"
    leases.write_text(SAMPLE)
    for _ in range(5):
        reactor.advance(0.05)
    assert reports[1:] == [(BootPhase.SSHD, "the guest leased 192.168.64.9")], "once"
    reactor.advance(5)
    assert waiting[0].value.reason == "no-ssh", "the wait went on to the guest's sshd"


def test_a_full_disk_after_the_spawn_leaves_no_vfkit_and_no_lock(short_tmp, monkeypatch) -> None:
    """The boot fails in one line naming the file and the cause; the next boot can run."""
    import errno
    import os

    from tests.fakes import FakeReactor
    from tests.unit.test_daemon import outcome, prepared
    from virby.locks import FileLock

    def full(path: str, data: bytes, mode: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")

    monkeypatch.setattr("virby.daemon.vfkit.writeAtomically", full)
    reactor = FakeReactor(4242, diesOn={"KILL"})
    hypervisor = VfkitHypervisor(reactor, prepared(short_tmp), "/bin/vfkit")
    reports: list = []
    (failure,) = outcome(hypervisor.spawn(lambda phase, what: reports.append(phase)))
    assert str(failure.value) == (
        "cannot record vfkit's pid: no space left on the device holding "
        f"{short_tmp}/vfkit.pid: free some space there"
    )
    assert reactor.transport.signals == ["KILL"] and reactor.transport.protocol.status
    assert reports == [], "vfkit never counted as started"
    lock = FileLock(str(short_tmp / "vm.lock"))
    assert lock.acquire(), "the daemon's copy of the VM lock is let go"
    lock.release()


def noReport(phase: object, what: str) -> None:
    """A boot's progress, unheard."""


def test_no_image_yet_refuses_a_boot_with_the_recorded_cause(short_tmp) -> None:
    """
    Until prepare has an image (the switch could not realise it), a boot is refused in one
    line that says why and what to do, and no retry is scheduled for it.
    """
    (short_tmp / layout.IMAGE_FAILURE).write_text("no builder for aarch64-linux\n")
    config = fromMapping({"working-directory": str(short_tmp)})
    failures: list = []
    # No reactor: the boot is refused before one would be used.
    hypervisor = VfkitHypervisor(None, config, "/nonexistent/vfkit")  # type: ignore[arg-type]
    hypervisor.spawn(noReport).addErrback(failures.append)
    assert failures[0].check(NoImage) and failures[0].check(PermanentError)
    assert str(failures[0].value) == (
        f"no image yet: no builder for aarch64-linux; {layout.NO_IMAGE_FIX}"
    )


def test_without_a_recorded_cause_no_image_yet_still_says_what_to_do(short_tmp) -> None:
    config = fromMapping({"working-directory": str(short_tmp)})
    failures: list = []
    # No reactor: the boot is refused before one would be used.
    hypervisor = VfkitHypervisor(None, config, "/nonexistent/vfkit")  # type: ignore[arg-type]
    hypervisor.spawn(noReport).addErrback(failures.append)
    assert str(failures[0].value) == (
        f"no image yet: the VM image has not been built; {layout.NO_IMAGE_FIX}"
    )


def test_a_disk_lost_after_an_image_was_made_is_not_no_image_yet(short_tmp) -> None:
    """Prepare made disks once (it recorded the image): their loss is said by the boot itself."""
    assert layout.noImageYet(str(short_tmp)) is not None
    (short_tmp / layout.IMAGE_RECORD).write_text("/nix/store/x-image/nixos.img\n")
    assert layout.noImageYet(str(short_tmp)) is None


# -- the previous SSH keys, retired at every boot (virby.rotation)


def withPreviousKeys(directory) -> None:
    """A working directory as prepare leaves it after a new image: a previous set kept."""
    current, previous = keys.generate("host"), keys.generate("old host")
    (directory / layout.KNOWN_HOSTS).write_text(
        keys.knownHostsLine(current.public) + keys.knownHostsLine(previous.public)
    )
    (directory / layout.PREVIOUS_CLIENT_KEY).write_bytes(keys.generate("old client").private)


def bootLogs(hypervisor: VfkitHypervisor) -> tuple[list, list[tuple[LogLevel, str]]]:
    from tests.unit.test_daemon import outcome

    with capturedLogs() as events:
        result = outcome(hypervisor.spawn(noReport))
    return result, [(e["log_level"], formatEvent(e)) for e in events]


def test_a_boot_retires_the_previous_keys_under_the_vm_lock(short_tmp, monkeypatch) -> None:
    """No VM runs while the VM lock is held: the previous set is of no use any more."""
    from tests.fakes import FakeReactor
    from tests.unit.test_daemon import prepared
    from virby import rotation
    from virby.locks import FileLock

    withPreviousKeys(short_tmp)
    reactor = FakeReactor(4242)
    seen: list[tuple[bool, int]] = []
    real = rotation.retirePrevious

    def retire(workingDirectory: str) -> bool:
        probe = FileLock(str(short_tmp / layout.VM_LOCK))
        seen.append((not probe.acquire(), len(reactor.spawned)))
        return real(workingDirectory)

    monkeypatch.setattr("virby.daemon.hypervisor.retirePrevious", retire)
    hypervisor = VfkitHypervisor(reactor, prepared(short_tmp), "/bin/vfkit")
    (vm,), said = bootLogs(hypervisor)
    assert vm.pid == 4242
    assert seen == [(True, 0)], "with the VM lock held, before vfkit starts"
    assert (LogLevel.info, "retired the previous SSH keys: no VM runs on them now") in said
    assert len((short_tmp / layout.KNOWN_HOSTS).read_text().splitlines()) == 1
    assert not (short_tmp / layout.PREVIOUS_CLIENT_KEY).exists()


def test_a_boot_with_nothing_to_retire_says_nothing_of_keys(short_tmp) -> None:
    from tests.fakes import FakeReactor
    from tests.unit.test_daemon import prepared

    hypervisor = VfkitHypervisor(FakeReactor(4242), prepared(short_tmp), "/bin/vfkit")
    (vm,), said = bootLogs(hypervisor)
    assert vm.pid == 4242
    assert not [text for _, text in said if "SSH keys" in text]


def test_keys_that_cannot_be_retired_are_a_warning_and_the_boot_goes_on(
    short_tmp, monkeypatch
) -> None:
    import errno
    import os

    from tests.fakes import FakeReactor
    from tests.unit.test_daemon import prepared

    def denied(workingDirectory: str) -> bool:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), workingDirectory)

    monkeypatch.setattr("virby.daemon.hypervisor.retirePrevious", denied)
    hypervisor = VfkitHypervisor(FakeReactor(4242), prepared(short_tmp), "/bin/vfkit")
    (vm,), said = bootLogs(hypervisor)
    assert vm.pid == 4242, "the boot went on"
    assert (
        LogLevel.warn,
        f"could not retire the previous SSH keys in {short_tmp}: Permission denied; "
        "the next boot tries again",
    ) in said


def test_while_prepare_holds_the_directory_the_boot_retires_nothing(short_tmp) -> None:
    from tests.fakes import FakeReactor
    from tests.unit.test_daemon import prepared
    from virby.locks import locked

    withPreviousKeys(short_tmp)
    before = (short_tmp / layout.KNOWN_HOSTS).read_bytes()
    hypervisor = VfkitHypervisor(FakeReactor(4242), prepared(short_tmp), "/bin/vfkit")
    with locked(str(short_tmp)):
        (vm,), said = bootLogs(hypervisor)
    assert vm.pid == 4242, "a boot never waits for an activation"
    assert (short_tmp / layout.KNOWN_HOSTS).read_bytes() == before
    assert (short_tmp / layout.PREVIOUS_CLIENT_KEY).exists()
    assert not [text for _, text in said if "SSH keys" in text]
