"""
``vfkit-emulator`` / ``python -m virby.emulator``: a vfkit v0.6.3 stand-in for Linux.

    vfkit-emulator [--leases-file F] [--guest-port N] [--boot-delay S] [--fault KIND]
                   [--cpu BRAND] [--macos VERSION] [--rosetta installed|missing]
                   [--guest-keys every-boot|when-absent] VFKIT-FLAGS...

Its own options may also come from the environment (C{VIRBY_EMULATOR_LEASES_FILE},
C{..._GUEST_PORT}, C{..._BOOT_DELAY}, C{..._FAULT}, C{..._CPU}, C{..._MACOS},
C{..._ROSETTA}, C{..._GUEST_KEYS}), so the plain name can stand where the ``vfkit`` command
is expected.  C{--cpu}, C{--macos} and C{--rosetta} describe the Mac it plays (by default an
Apple M4 on macOS 15.5 with Rosetta): an C{Apple M1} refuses C{--nested} and C{--rosetta
missing} refuses the Rosetta share, as vfkit does.  Faults: C{no-lease}, C{duid-lease},
C{no-sshd}, C{crash-after=N}.

What it emulates, in vfkit's order and with vfkit's error texts (see C{docs/vfkit.md}):
its flags, its configuration checks, what the framework refuses, its REST API (state,
Stop, HardStop, Pause, Resume, inspect), the serial console, the pidfile, exit 0 after a
guest power-off (Stop, HardStop, SIGTERM, SIGINT), and a guest that "boots" by taking the
keys from the sshd-keys share (keeping them on its disk) and starting a real OpenSSH sshd on
a fresh loopback address, recorded in a bootpd-format lease.  What it does not: firmware,
networking beyond that loopback address, vsock, anything of the image but a small record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from twisted.web.server import Site

from virby.emulator import api, cmdline, vmconfig, vz
from virby.emulator.cmdline import EmulatorError, UsageError
from virby.emulator.golang import vfkitLog
from virby.emulator.machine import EmulatedMachine
from virby.reactors import hostReactor

VERSION = "v0.6.3"

#: A usage text in cobra's layout, printed after every refusal as vfkit prints its own (the
#: flags are vfkit's; the descriptions are the emulator's).
USAGE = """Usage:
  vfkit [flags]

Flags:
  -b, --bootloader stringSlice   the firmware: efi,variable-store=PATH[,create]
      --cloud-init stringSlice   cloud-init files (not emulated)
  -c, --cpus uint                vCPUs (default 1)
  -d, --device stringArray       a device; repeat for more
      --gui                      a window for the VM (not emulated)
  -h, --help                     this text
      --ignition string          an ignition file (not emulated)
  -i, --initrd string            legacy Linux boot (not emulated)
  -k, --kernel string            legacy Linux boot (not emulated)
  -C, --kernel-cmdline string    legacy Linux boot (not emulated)
      --log-level string         debug, info or error
  -m, --memory uint              MiB of RAM (default 512)
  -n, --nested                   nested virtualization
      --pidfile string           where to write the pid
      --restful-uri string       the REST API (default "none://")
  -t, --timesync string          vsockPort=N
  -v, --version                  the version
"""


def refuse(error: UsageError) -> int:
    """
    How vfkit ends on any error (C{cmd/vfkit/root.go} C{Execute}, under cobra): C{Error:}
    and the error, the usage text, the error again, exit status 1.  The emulator's own
    limits say C{virby emulator:} instead, so nobody mistakes them for vfkit's.
    """
    if isinstance(error, EmulatorError):
        sys.stderr.write(f"{error}\n")
        return 1
    return exitAsCobra(str(error))


def exitAsCobra(error: str) -> int:
    """
    What cobra prints for an error that vfkit's command returns (C{RunE}, no
    C{SilenceErrors}/C{SilenceUsage}), and what C{Execute} adds: the exit status is 1.
    """
    sys.stderr.write(f"Error: {error}\n{USAGE}\n{error}\n")
    sys.stderr.flush()
    return 1


def configure(flags: cmdline.Flags, settings: cmdline.Emulated) -> vmconfig.VM:
    """
    C{newVMConfiguration} (C{cmd/vfkit/main.go}): the log level, the bootloader, C{--nested}
    against what the Mac can do, the time sync, the pidfile, then the devices, in this order
    (so a refused device leaves the pidfile written, as vfkit does).
    """
    if flags["log-level"] and flags["log-level"] not in ("debug", "info", "error"):
        raise UsageError(f"unknown log level: {flags['log-level']}")
    if flags["kernel"] or flags["initrd"] or flags["kernel-cmdline"]:
        raise EmulatorError("the emulator boots only 'efi' bootloaders, not --kernel")
    bootloader = vmconfig.bootloaderFromCmdline(flags["bootloader"])
    if flags["nested"] and not vz.nestedSupported(settings.played):
        raise UsageError("nested virtualization is not supported")
    vm = vmconfig.VM(
        cpus=flags["cpus"],
        memory=flags["memory"],
        bootloader=bootloader,
        nested=flags["nested"],
        restful_uri=flags["restful-uri"],
        pidfile=flags["pidfile"],
    )
    vfkitLog("info", "virtual machine parameters:")
    vfkitLog("info", f"\\tvCPUs: {vm.cpus}")
    vfkitLog("info", f"\\tmemory: {vm.memory} MiB")
    vm.timesync_port = vmconfig.timesyncFromCmdline(flags["timesync"])
    if flags["cloud-init"] or flags["ignition"] or flags["gui"]:
        raise EmulatorError("--cloud-init, --ignition and --gui are not emulated")
    if vm.pidfile:
        vmconfig.writePidfile(vm.pidfile)
    vm.devices = [vmconfig.deviceFromCmdline(text) for text in flags["device"]]
    return vm


def startUp(
    argv: list[str], stdin: int = 0
) -> tuple[cmdline.Emulated, vmconfig.VM, vz.Console, api.Endpoint]:
    """
    Everything vfkit does before its VM starts, in its order: flags, configuration, the
    framework's checks (with their effects on disk), then the REST URI.

    @raise UsageError: for the first refusal, with vfkit's text.
    """
    settings, flags = cmdline.parse(argv)
    if not settings.leases_file:
        raise EmulatorError("no lease file: pass --leases-file or set VIRBY_EMULATOR_LEASES_FILE")
    vm = configure(flags, settings)
    console = vz.realize(vm, settings.played, stdin)
    return settings, vm, console, api.parseRestfulUri(vm.restful_uri)


def main(argv: list[str] | None = None, stdin: int = 0) -> int:
    """Run vfkit's start-up in its order, then the VM until it powers off."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        _, flags = cmdline.parse(argv)
        if flags["help"]:
            sys.stdout.write(f"vfkit is a simple hypervisor using Apple's Virtualization "
                             f"framework\n\n{USAGE}")  # fmt: skip
            return 0
        if flags["version"]:
            sys.stdout.write(f"vfkit version: {VERSION}\n")
            return 0
        settings, vm, console, endpoint = startUp(argv, stdin)
    except UsageError as e:
        return refuse(e)
    from twisted.internet import reactor as globalReactor

    reactor = hostReactor(globalReactor)
    machine = EmulatedMachine(reactor, settings, vm, console)
    if endpoint.scheme != "none":
        try:
            api.listen(reactor, endpoint, Site(api.StateResource(machine)))
        except Exception as e:
            # vfkit's server goroutine ends the process with logrus.Fatal.
            vfkitLog("fatal", str(getattr(e, "socketError", e)))
            return 1

    def onSignal(signum: int, frame: object) -> None:
        # vfkit >= 0.6.2: ask the guest to power off, hard-stop it after 5 s if it does not.
        reactor.callFromThread(machine.requestStop)
        reactor.callFromThread(reactor.callLater, 5, machine.hardStop)

    def install() -> None:
        signal.signal(signal.SIGTERM, onSignal)
        signal.signal(signal.SIGINT, onSignal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    reactor.callWhenRunning(install)
    reactor.callWhenRunning(machine.start)
    played = settings.played
    vfkitLog("info", f"emulating vfkit {VERSION} on Linux, playing a Mac with {played.cpu}, "
                      f"macOS {played.macos}, Rosetta {played.rosetta}")  # fmt: skip
    reactor.run()  # with Twisted's signal handlers, which are the default
    if endpoint.scheme == "unix":
        # An exit handler registered by the REST server (pkg/rest/rest.go Start).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.path)
    if machine.error is not None:
        # runVirtualMachine returns it: cmd/vfkit/main.go, then cmd/vfkit/root.go Execute.
        return exitAsCobra(machine.error)
    return machine.exitCode


if __name__ == "__main__":
    sys.exit(main())
