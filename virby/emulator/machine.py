"""
The emulated VM: states as vfkit reports them, a "boot" that starts a real sshd on a fresh
loopback address, and power-off semantics as vfkit has them.  The guest's inside (its disk
record, its key unit, its sshd's files) is L{virby.emulator.guest}.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from virby import layout
from virby.emulator import guest, lease
from virby.emulator.cmdline import Emulated
from virby.emulator.golang import vfkitLog
from virby.emulator.vmconfig import VM
from virby.emulator.vz import Console
from virby.reactors import IMachineReactor

SSHD = "/usr/sbin/sshd"
STATE_PREFIX = "VirtualMachineState"
#: How long the guest takes to power off after an ACPI request.
ACPI_POWEROFF = 0.3
KEY_UNIT = "Install the SSH keys handed to the VM by Virby"


class GuardianProtocol(ProcessProtocol):
    """Watches the guest's guardian: sshd's log tells when it listens."""

    def __init__(self, machine: EmulatedMachine) -> None:
        self.machine = machine
        self._buffer = b""

    def errReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            self.machine.console.line(f"sshd: {text}")
            if "Server listening on" in text:
                self.machine.sshdListening()

    outReceived = errReceived

    def processEnded(self, reason: Failure) -> None:
        self.machine.guardianEnded()


class EmulatedMachine:
    def __init__(
        self, reactor: IMachineReactor, settings: Emulated, vm: VM, console: Console
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.vm = vm
        self.console = console
        self.mac = vm.mac or _randomMac()
        self.state = "Starting"
        self.address: str | None = None
        self._guardian: IProcessTransport | None = None
        self._stateDir: str | None = None
        self._exitCode = 0
        #: The error vfkit's command returns, when the VM failed.
        self.error: str | None = None
        self._poweringOff = False
        self._bootCall: IDelayedCall | None = None
        self.guestState = guest.GuestState()

    # -- boot

    def start(self) -> None:
        self.console.line("EFI stub: Booting Linux Kernel...")
        self.console.line("Linux version 6.6.0 (virby-emulator) #1 SMP")
        self._bootCall = self.reactor.callLater(self.settings.boot_delay, self._boot)
        self.reactor.callLater(0, self._running)

    def _running(self) -> None:
        if self.state == "Starting":
            self.state = "Running"
            vfkitLog("info", "virtual machine is running")

    def _boot(self) -> None:
        self._bootCall = None
        if self._poweringOff:
            return
        self.console.line("systemd[1]: Reached target Network.")
        self.address = self._pickAddress()
        if self.settings.fault != "no-lease":
            duid = self.settings.fault == "duid-lease"
            expiry = int(time.time()) + 86400
            lease.write(self.settings.leases_file, self.address, self.mac, expiry, duid)
            self.console.line(f"virby-emulator: lease written for {self.mac} -> {self.address}")
        if not self._takeKeys():
            self.console.line("systemd[1]: Dependency failed for OpenSSH Daemon.")
            return
        if self.settings.fault == "no-sshd":
            self.console.line("systemd[1]: sshd.service: Failed with result 'exit-code'.")
            return
        self._startSshd()

    def _takeKeys(self) -> bool:
        """Read the disk, run the key unit, keep what it installed on the disk."""
        disk = self.vm.disk
        if disk is None:
            self.console.line("virby-emulator: no disk: nothing to boot from")
            return False
        path, writable = str(disk["path"]), not disk["readonly"]
        try:
            self.guestState = guest.readState(path)
        except guest.DiskError as e:
            self.console.line(f"EXT4-fs error: {e}")
            return False
        self.guestState.boots += 1
        try:
            ran = guest.installKeys(
                self.vm.sharedDir(layout.SSHD_KEYS_TAG), self.guestState, self.settings.guest_keys
            )
        except guest.KeyUnitFailed as e:
            self.console.line(f"virby-install-keys[301]: {e}")
            self.console.line(f"systemd[1]: Failed to start {KEY_UNIT}.")
            return False
        if ran:
            self.console.line(f"systemd[1]: Finished {KEY_UNIT}.")
        else:
            self.console.line(
                f"systemd[1]: {KEY_UNIT} was skipped because of an unmet condition check "
                "(ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key)."
            )
        if not writable:
            self.console.line("EXT4-fs: the root filesystem is read-only; nothing was kept")
            return True
        try:
            guest.writeState(path, self.guestState)
        except guest.DiskError as e:
            self.console.line(f"EXT4-fs error: {e}")
            return False
        return True

    def _pickAddress(self) -> str:
        previous = lease.previousAddress(self.settings.leases_file, self.mac)
        candidates = [previous] if previous else []
        candidates += [
            f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}" for _ in range(50)
        ]
        for address in candidates:
            if _bindable(address, self.settings.guest_port):
                return address
        raise SystemExit("virby emulator: no free loopback address for the guest")

    def _startSshd(self) -> None:
        etc = self._stateDir = tempfile.mkdtemp(prefix="virby-guest-")
        try:
            guest.materialize(self.guestState, etc)
        except (guest.KeyUnitFailed, OSError) as e:
            self.console.line(f"sshd[400]: {e}")
            return
        config = os.path.join(etc, "sshdConfig")
        with open(config, "w") as f:
            f.write(guest.sshdConfig(etc, self.address or "", self.settings.guest_port))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.console.line("systemd[1]: Starting OpenSSH Daemon...")
        self._guardian = self.reactor.spawnProcess(
            GuardianProtocol(self),
            sys.executable,
            [sys.executable, "-m", "virby.emulator.guardian", str(os.getpid()),
             SSHD, "-D", "-e", "-f", config],
            env=dict(os.environ),
        )  # fmt: skip

    def sshdListening(self) -> None:
        self.console.line(
            f"virby-emulator: sshd listening on {self.address}:{self.settings.guest_port} "
            f"at {time.time():.6f}"
        )
        self.console.line(f"virby-vm login: ({getpass.getuser()} may log in with the key)")
        if self.settings.crash_after is not None:
            self.reactor.callLater(self.settings.crash_after, self._crash)

    def _crash(self) -> None:
        # vfkit logs nothing here: waitForVMState's error is returned through cobra, which
        # the emulator's main prints once the machine is off (cmd/vfkit/main.go).
        self.error = "virtualization error: hypervisor virtualization error"
        self.state = "Error"
        self._exitCode = 1
        self._powerOff()

    # -- state changes

    def requestStop(self) -> None:
        """ACPI power button: the guest shuts down shortly after."""
        if self._poweringOff:
            return
        self.state = "Stopping"
        self.console.line("reboot: Power down requested")
        self.reactor.callLater(ACPI_POWEROFF, self._powerOff)

    def hardStop(self) -> None:
        self._powerOff()

    def pause(self) -> None:
        if self.state != "Running":
            raise ValueError("invalid new VMState: Pause")
        self._signalGuest(19)  # SIGSTOP
        self.state = "Paused"

    def resume(self) -> None:
        if self.state != "Paused":
            raise ValueError("invalid new VMState: Resume")
        self._signalGuest(18)  # SIGCONT
        self.state = "Running"

    def _signalGuest(self, signum: int) -> None:
        if self._guardian is None or self._guardian.pid is None:
            return
        from virby.emulator.guardian import descendants

        for pid in descendants(self._guardian.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _powerOff(self) -> None:
        if self._poweringOff:
            return
        self._poweringOff = True
        if self._bootCall is not None and self._bootCall.active():
            self._bootCall.cancel()
        if self._guardian is not None and self._guardian.pid is not None:
            self._signalGuest(18)
            self._guardian.signalProcess("TERM")
            self.reactor.callLater(3, self._forceGuardian)
        else:
            self._finish()

    def _forceGuardian(self) -> None:
        if self._guardian is not None and self._guardian.pid is not None:
            self._guardian.signalProcess("KILL")

    def guardianEnded(self) -> None:
        self._guardian = None
        if self._poweringOff:
            self._finish()
        else:
            self.console.line("systemd[1]: sshd.service: Main process exited.")

    def _finish(self) -> None:
        if self._stateDir is not None:
            shutil.rmtree(self._stateDir, ignore_errors=True)
        if self.state != "Error":
            self.state = "Stopped"
        self.console.line("virby-emulator: powered off")
        self.reactor.stop()

    @property
    def exitCode(self) -> int:
        return self._exitCode

    # -- what the API reports

    def stateDocument(self) -> dict[str, Any]:
        running = self.state == "Running"
        return {
            "canHardStop": self.state in ("Running", "Paused", "Stopping"),
            "canPause": running,
            "canResume": self.state == "Paused",
            "canStart": self.state == "Stopped",
            "canStop": running,
            "state": STATE_PREFIX + self.state,
        }

    def inspectDocument(self) -> dict[str, Any]:
        """C{GET /vm/inspect}: vfkit's C{config.VirtualMachine} as JSON (C{pkg/config/json.go})."""
        document: dict[str, Any] = {
            "vcpus": self.vm.cpus,
            "memoryBytes": self.vm.memory * 1024 * 1024,
            "bootloader": {
                "kind": "efiBootloader",
                "efiVariableStorePath": self.vm.bootloader.variable_store,
                "createVariableStore": self.vm.bootloader.create,
            },
            "devices": [_inspect(device.kind, device.fields) for device in self.vm.devices],
        }
        if self.vm.timesync_port is not None:
            document["timesync"] = {"vsockPort": self.vm.timesync_port}
        if self.vm.nested:
            document["nested"] = True
        return document


def _inspect(kind: str, o: dict[str, Any]) -> dict[str, Any]:
    if kind == "virtio-blk":
        entry = {"kind": "virtioblk", "devName": "virtio-blk", "imagePath": o["path"]}
        if o["readonly"]:
            entry["readOnly"] = True
        if o["deviceId"]:
            entry["deviceIdentifier"] = o["deviceId"]
        return entry
    if kind == "virtio-net":
        return {"kind": "virtionet", "nat": o["nat"], "macAddress": o["mac"] or ""}
    if kind == "virtio-serial":
        return {"kind": "virtioserial", **({"logFile": o["logFilePath"]} if o["logFilePath"]
                                           else {"usesStdio": True})}  # fmt: skip
    if kind == "virtio-fs":
        return {"kind": "virtiofs", "mountTag": o["mountTag"], "sharedDir": o["sharedDir"]}
    if kind == "rosetta":
        return {"kind": "rosetta", "mountTag": o["mountTag"], "installRosetta": o["install"],
                "ignoreIfMissing": o["ignoreIfMissing"]}  # fmt: skip
    if kind == "virtio-vsock":
        entry = {"kind": "virtiosock", "port": o["port"], "socketURL": o["socketURL"]}
        return {**entry, "listen": True} if o["listen"] else entry
    return {"kind": kind.replace("-", "")}


def _randomMac() -> str:
    """vz's random locally administered unicast MAC, for a virtio-net without C{mac}."""
    octets = [random.randint(0, 255) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in octets)


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True
