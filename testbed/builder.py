"""
A whole Virby on this machine for end-to-end tests: a prepared working directory, the
daemon under twistd, the vfkit emulator as its hypervisor (a real sshd as the guest), and
ssh pointed at the daemon the way the nix-darwin module points it.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from testbed.nixenv import nix_environment
from testbed.processes import ProcessUnderTest, free_port, pids_of
from testbed.supervisor import THROTTLE, Supervisor

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A command installed beside this Python (the venv's twistd, virby, vfkit-emulator)."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


class Builder:
    """One Virby: config, working directory, daemon, and clients."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.root = root
        self.wd = root / "wd"
        self.port = free_port()
        self.leases = root / "dhcpd_leases"
        self.image = root / "nixos.img"
        with open(self.image, "wb") as f:
            f.truncate(64 * 1024 * 1024)
        self.settings: dict[str, Any] = {
            "working-directory": str(self.wd),
            "image": str(self.image),
            "disk-size": "1GiB",
            "cores": 1,
            "memory": 1024,
            "vfkit": tool("vfkit-emulator"),
            "leases-file": str(self.leases),
            "guest-ssh-port": 2222,
            "listen": f"tcp:{self.port}:interface=127.0.0.1",
            "port": self.port,
            "on-demand": True,
            "ttl": 600,
            "start-timeout": 30,
        }
        self.settings.update(settings)
        self.config = root / "virby.json"
        self.config.write_text(json.dumps(self.settings))
        self.env = {
            **os.environ,
            **nix_environment(root),
            "VIRBY_EMULATOR_LEASES_FILE": str(self.leases),
            "VIRBY_EMULATOR_GUEST_PORT": str(self.settings["guest-ssh-port"]),
            "VIRBY_EMULATOR_BOOT_DELAY": "0.2",
        }
        self.daemons: list[ProcessUnderTest] = []
        self._prepare()

    def _prepare(self) -> None:
        run = [tool("virby"), "prepare", "--config", str(self.config)]
        subprocess.run(run, check=True, capture_output=True, timeout=120)
        self.writeSshConfig()

    def writeSshConfig(self) -> None:
        """
        The C{Host virby-vm} block as the module installs it, for this machine's ssh; again
        after a switch, as the module installs the block of the new config.
        """
        block = subprocess.run(
            [tool("virby"), "prepare", "--config", str(self.config), "--print-ssh-config"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        # The emulated guest logs in whoever runs it; the real VM's user is `builder`.
        block = re.sub(r"(?m)^(\s*)User .*$", rf"\1User {getpass.getuser()}", block)
        self.ssh_config = self.root / "ssh_config"
        self.ssh_config.write_text(block + "  BatchMode yes\n  LogLevel ERROR\n")

    def start(
        self,
        *flags: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        program: str | None = None,
    ) -> ProcessUnderTest:
        """Start the daemon in the foreground, as launchd would: C{virbyd --config FILE}."""
        daemon = ProcessUnderTest(
            [program or tool("virbyd"), "--config", str(self.config), *flags],
            env={**self.env, **(env or {})},
            cwd=str(self.root),
        )
        self.daemons.append(daemon)
        if wait:
            daemon.wait_for_line(r"serving the builder on", timeout=60)
        return daemon

    def socket_activated(self) -> ProcessUnderTest:
        """
        The daemon as launchd runs an on-demand job: C{systemd-socket-activate} binds the
        builder's port now and starts the daemon, handing it the socket, at the first
        connection.  Returns once the port is bound, with no daemon running yet.
        """
        activator = ProcessUnderTest(
            [shutil.which("systemd-socket-activate") or "systemd-socket-activate",
             "-l", f"127.0.0.1:{self.port}", "--fdname=builder",
             "-E", "VIRBY_EMULATOR_LEASES_FILE", "-E", "VIRBY_EMULATOR_GUEST_PORT",
             "-E", "VIRBY_EMULATOR_BOOT_DELAY", "-E", "PATH",
             tool("twistd"), "--nodaemon", "--pidfile=", "virby", "--config", str(self.config),
             "--listen", "systemd:domain=INET:index=0"],
            env=self.env,
        )  # fmt: skip
        self.daemons.append(activator)
        activator.wait_for_line(r"Listening on", timeout=30)
        return activator

    def supervised(self, throttle: float = THROTTLE) -> Supervisor:
        """
        The daemon as launchd runs the module's job, restarts included: L{Supervisor} holds
        the builder's port and starts the daemon with it, always on (C{KeepAlive}) unless
        the config says on-demand, as C{nix/module.nix} sets the job.  Returns once the port
        is bound: an always-on daemon is starting, an on-demand one waits for a connection.
        """
        supervisor = Supervisor(
            [tool("virbyd"), "--config", str(self.config),
             "--listen", "systemd:domain=INET:index=0"],
            keepAlive=not self.settings["on-demand"], throttle=throttle, port=self.port,
            env=self.env, cwd=str(self.root),
        )  # fmt: skip
        self.daemons.append(supervisor.process)
        return supervisor

    def ssh(self, *command: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "virby-vm", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def ssh_background(self, *command: str) -> ProcessUnderTest:
        return ProcessUnderTest(["ssh", "-F", str(self.ssh_config), "virby-vm", *command])

    def status(self) -> dict[str, Any]:
        result = subprocess.run(
            [tool("virby"), "status", "--json", "--config", str(self.config)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def prepare(self) -> str:
        """Run `virby prepare` again, as an activation would; its report."""
        result = subprocess.run(
            [tool("virby"), "prepare", "--config", str(self.config)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return result.stdout

    def orphan(self) -> int:
        """Boot the VM, then kill the daemon with SIGKILL: the pid of the VM left running."""
        daemon = self.start()
        assert self.ssh("true").returncode == 0, daemon.text()
        (orphan,) = self.emulators()
        daemon.signal(signal.SIGKILL)
        daemon.wait_exit(10)
        return orphan

    def emulators(self) -> list[int]:
        """Live vfkit emulators of this working directory."""
        return pids_of(r"(vfkit-emulator|virby\.emulator).*" + re.escape(str(self.wd)))

    def guests(self) -> list[int]:
        """Live sshd guests of this test (their state lives under the working directory
        only through the emulator, so match on the emulator's generated config)."""
        return [pid for pid in pids_of(r"sshd") if _environ_has(pid, str(self.leases))]

    def banner(self, timeout: float = 60) -> bytes:
        """Connect to the builder port and read the guest's SSH banner."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            return read_line(s)

    def cleanup(self) -> None:
        for daemon in self.daemons:
            daemon.kill_all()
        for pid in self.emulators():
            _kill(pid)


def read_line(s: socket.socket) -> bytes:
    """Bytes up to the first newline, or all there was before EOF."""
    data = b""
    while b"\n" not in data:
        chunk = s.recv(256)
        if not chunk:
            break
        data += chunk
    return data


def _environ_has(pid: int, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
