"""
The emulated VM: states as vfkit reports them, a "boot" that starts a real sshd on a fresh
loopback address, and power-off semantics as vfkit has them.
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
from typing import IO, Any

from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from virby.emulator import lease
from virby.emulator.cmdline import VM, Emulated

SSHD = "/usr/sbin/sshd"
STATE_PREFIX = "VirtualMachineState"
#: How long the guest takes to power off after an ACPI request.
ACPI_POWEROFF = 0.3


class Console:
    """The serial console: stdout for ``virtio-serial,stdio``, else the log file."""

    def __init__(self, vm: VM) -> None:
        serial = vm.serial
        self._out: IO[str] | None
        if serial is None:
            self._out = None
        elif serial.options.get("logFilePath"):
            self._out = open(str(serial.options["logFilePath"]), "w")  # noqa: SIM115
        else:
            self._out = sys.stdout
        self._start = time.monotonic()

    def line(self, text: str) -> None:
        if self._out is not None:
            self._out.write(f"[{time.monotonic() - self._start:10.6f}] {text}\n")
            self._out.flush()


def vfkit_log(level: str, message: str) -> None:
    """vfkit's own log lines, on stderr, in logrus's text format."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sys.stderr.write(f'time="{stamp}" level={level} msg="{message}"\n')
    sys.stderr.flush()


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
    def __init__(self, reactor: Any, settings: Emulated, vm: VM) -> None:
        self.reactor = reactor
        self.settings = settings
        self.vm = vm
        self.console = Console(vm)
        self.state = "Starting"
        self.address: str | None = None
        self._guardian: Any = None
        self._stateDir: str | None = None
        self._exitCode = 0
        self._poweringOff = False
        self._bootCall: Any = None
        self._paused = False

    # -- boot

    def start(self) -> None:
        self.console.line("EFI stub: Booting Linux Kernel...")
        self.console.line("Linux version 6.6.0 (virby-emulator) #1 SMP")
        self._bootCall = self.reactor.callLater(self.settings.boot_delay, self._boot)
        self.reactor.callLater(0, self._running)

    def _running(self) -> None:
        if self.state == "Starting":
            self.state = "Running"
            vfkit_log("info", "virtual machine is running")

    def _boot(self) -> None:
        self._bootCall = None
        if self._poweringOff:
            return
        self.console.line("systemd[1]: Reached target Network.")
        self.address = self._pickAddress()
        if self.settings.fault != "no-lease":
            duid = self.settings.fault == "duid-lease"
            expiry = int(time.time()) + 86400
            lease.write(self.settings.leases_file, self.address, self.vm.mac, expiry, duid)
            self.console.line(f"virby-emulator: lease written for {self.vm.mac} -> {self.address}")
        if self.settings.fault == "no-sshd":
            self.console.line("systemd[1]: sshd.service: Failed with result 'exit-code'.")
            return
        self._startSshd()

    def _pickAddress(self) -> str:
        previous = lease.previous_address(self.settings.leases_file, self.vm.mac)
        candidates = [previous] if previous else []
        candidates += [
            f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}" for _ in range(50)
        ]
        for address in candidates:
            if _bindable(address, self.settings.guest_port):
                return address
        raise SystemExit("virby emulator: no free loopback address for the guest")

    def _startSshd(self) -> None:
        keys = self.vm.shared_dir("sshd-keys")
        state = self._stateDir = tempfile.mkdtemp(prefix="virby-guest-")
        try:
            assert keys is not None
            shutil.copyfile(os.path.join(keys, "ssh_host_ed25519_key"),
                            os.path.join(state, "ssh_host_ed25519_key"))  # fmt: skip
            shutil.copyfile(os.path.join(keys, "ssh_user_ed25519_key.pub"),
                            os.path.join(state, "authorized_keys"))  # fmt: skip
        except (AssertionError, OSError) as e:
            self.console.line(f"virby-install-keys[301]: cannot read the sshd-keys share: {e}")
            return
        os.chmod(os.path.join(state, "ssh_host_ed25519_key"), 0o600)
        config = os.path.join(state, "sshd_config")
        with open(config, "w") as f:
            f.write(_sshd_config(state, self.address or "", self.settings.guest_port))
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
        vfkit_log("error", "virtualization error: hypervisor virtualization error")
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
        if self._paused:
            self._signalGuest(18)
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
        devices = []
        for device in self.vm.devices:
            o = device.options
            if device.kind == "virtio-blk":
                devices.append({"kind": "virtioblk", "devName": "virtio-blk",
                                "imagePath": o["path"]})  # fmt: skip
            elif device.kind == "virtio-net":
                devices.append({"kind": "virtionet", "nat": bool(o.get("nat")),
                                "macAddress": o.get("mac", "")})  # fmt: skip
            elif device.kind == "virtio-serial":
                entry: dict[str, Any] = {"kind": "virtioserial"}
                if o.get("logFilePath"):
                    entry["logFile"] = o["logFilePath"]
                else:
                    entry["usesStdio"] = True
                devices.append(entry)
            elif device.kind == "virtio-fs":
                devices.append({"kind": "virtiofs", "mountTag": o["mountTag"],
                                "sharedDir": o["sharedDir"]})  # fmt: skip
            elif device.kind == "rosetta":
                devices.append({"kind": "rosetta", "mountTag": o["mountTag"]})
            else:
                devices.append({"kind": device.kind.replace("-", "")})
        store = self.vm.bootloader.get("variable-store")
        return {
            "vcpus": self.vm.cpus,
            "memoryBytes": self.vm.memory * 1024 * 1024,
            "bootloader": {"kind": "efiBootloader", "efiVariableStorePath": store,
                           "createVariableStore": bool(self.vm.bootloader.get("create"))},
            "devices": devices,
            "nested": self.vm.nested,
        }  # fmt: skip


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _sshd_config(state: str, address: str, port: int) -> str:
    return "\n".join(
        [
            f"ListenAddress {address}:{port}",
            f"HostKey {state}/ssh_host_ed25519_key",
            f"AuthorizedKeysFile {state}/authorized_keys",
            "PidFile none",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "MaxStartups 300:30:400",
            "MaxSessions 100",
            "LogLevel INFO",
            "",
        ]
    )
