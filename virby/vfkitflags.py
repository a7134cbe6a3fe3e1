"""
vfkit's command line as the daemon builds it, what this Mac lets it hold, and which vfkit
release takes it: pure facts, shared by the daemon (L{virby.daemon.service.vfkit}, which runs vfkit)
and C{virby doctor} (which checks the vfkit found against them).  No reactor here.

The command line is C{docs/vfkit.md}'s.  The console is a file (C{virtio-serial,
logFilePath=...}), never vfkit's stdio, which vfkit puts into raw mode with C{tcgetattr}
(vfkit C{pkg/vf/virtio.go}, C{setRawMode}), failing on the pipe a supervised vfkit gets.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from virby import layout
from virby.config import Config
from virby.errors import VirbyError
from virby.hostfacts import HostFacts, gather

#: The vsock port of the guest's qemu-guest-agent, which C{nix/image.nix} makes listen on
#: it.  With C{--timesync vsockPort=N}, vfkit watches the Mac's sleep notifications and, at
#: every wake, connects to that port and sends C{guest-set-time} with the Mac's clock
#: (vfkit C{cmd/vfkit/timesync.go}); it adds the vsock device itself (C{pkg/vf/vm.go}).
#: Without it the guest's clock stays behind by however long the Mac slept, and TLS fetches
#: inside builds fail on certificate dates.  1234 is the port crc and podman's machine
#: images give their agents for the same flag; nothing else in the guest listens on vsock.
TIMESYNC_VSOCK_PORT = 1234


class VfkitNotFound(VirbyError):
    """The hypervisor command is not there."""


def findVfkit(name: str, path: str | None = None) -> str:
    """The absolute path of the vfkit command: a name is looked up on C{PATH}."""
    if "/" in name:
        found = name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    else:
        found = shutil.which(name, path=path)
    if found is None:
        raise VfkitNotFound(
            f"vfkit: {name!r} was not found{'' if '/' in name else ' on PATH'}; install vfkit "
            '(nixpkgs#vfkit) or set the "vfkit" key to its path'
        )
    return os.path.abspath(found)


def vfkitArguments(
    config: Config,
    executable: str,
    mac: str,
    createVariableStore: bool,
    nested: bool | None = None,
) -> list[str]:
    """
    The command line of docs/vfkit.md.  C{create} is passed only when the firmware variable
    store does not exist yet: vfkit's C{create} re-creates it blank on every start.
    C{nested} says whether to pass C{--nested} (by default, as configured); the daemon
    decides it from what the Mac can do (L{HostPlan}).
    """
    store = f"efi,variable-store={config.path(layout.EFI_STORE)}"
    keys = f"sharedDir={config.path(layout.SSHD_KEYS)},mountTag={layout.SSHD_KEYS_TAG}"
    args = [
        executable,
        "--cpus", str(config.cores),
        "--memory", str(config.memory),
        "--bootloader", store + (",create" if createVariableStore else ""),
        "--device", f"virtio-blk,path={config.path(layout.DIFF_IMAGE)}",
        "--device", f"virtio-fs,{keys}",
        "--device", f"virtio-net,nat,mac={mac}",
        "--device", f"virtio-serial,logFilePath={config.path(layout.SERIAL_LOG)}",
        "--device", "virtio-rng",
        "--device", "virtio-balloon",
        "--timesync", f"vsockPort={TIMESYNC_VSOCK_PORT}",
        "--restful-uri", f"unix://{config.path(layout.REST_SOCKET)}",
    ]  # fmt: skip
    if config.rosetta:
        args += ["--device", f"rosetta,mountTag={layout.ROSETTA_TAG}"]
    if config.nested_virtualization if nested is None else nested:
        args += ["--nested"]
    for tag, directory in sorted(config.shared_dirs.items()):
        args += ["--device", f"virtio-fs,sharedDir={directory},mountTag={tag}"]
    return args


@dataclass(frozen=True)
class HostPlan:
    """
    What this Mac lets the VM have, decided once before the reactor runs.

    @ivar nested: pass C{--nested}.
    @ivar refusal: why no VM may boot on this Mac (one line with the fix), or C{None}.
    @ivar warnings: one line each, for the log at start and for C{virby status}.
    """

    nested: bool = False
    refusal: str | None = None
    warnings: tuple[str, ...] = field(default=())


def planHost(config: Config, facts: Callable[[], HostFacts] = gather) -> HostPlan:
    """
    Decide C{--nested} and the Rosetta share from what the Mac can do, asking it only when
    an option depends on it.

    Nested virtualization that the Mac cannot run is dropped with a warning: vfkit would
    refuse C{--nested} and every boot would fail, while the VM is useful without it.

    Rosetta that is not installed refuses every boot with the fix, and the daemon still
    starts and serves.  Booting without the share is no way out: the image made with
    C{rosetta} mounts the share at boot (NixOS' C{virtualisation.rosetta} has no
    C{nofail}), so the guest would stop in emergency mode and never answer SSH.  Exiting
    instead would not help either: launchd starts the daemon again every 10 s (always-on)
    or at every queued connection (on demand), each time with the same line.  A daemon that
    stays up drains the connections, refuses each boot at once without starting vfkit, and
    shows why in C{virby status}.
    """
    if not (config.nested_virtualization or config.rosetta):
        return HostPlan()
    found = facts()
    nested = config.nested_virtualization
    warnings: list[str] = []
    refusal = None
    if nested:
        verdict = found.nestedVirtualization()
        if verdict.refused:
            nested = False
            warnings.append(
                f"nested-virtualization is on, but this Mac cannot run it: {verdict.why}; "
                "booting the VM without --nested"
            )
        elif verdict.ok is None:
            warnings.append(
                f"nested-virtualization is on, but {verdict.why}; passing --nested "
                "(vfkit refuses it where the Mac cannot run it)"
            )
    if config.rosetta:
        verdict = found.rosetta()
        if verdict.refused:
            refusal = (
                f"rosetta is on, but {verdict.why}: {verdict.fix}, then restart virbyd; "
                "until then no VM boots"
            )
            warnings.append(refusal)
        elif verdict.ok is None:
            warnings.append(f"rosetta is on, but {verdict.why}; passing the Rosetta share")
    return HostPlan(nested=nested, refusal=refusal, warnings=tuple(warnings))


#: The vfkit release that first took each flag and device kind the daemon passes, read in
#: vfkit's git history (C{pkg/cmdline/cmdline.go}, C{cmd/vfkit/root.go},
#: C{pkg/config/virtio.go}, C{pkg/config/bootloader.go}, C{pkg/rest/rest.go}).  A flag the
#: daemon starts passing must be added here (a test checks every one is).
VFKIT_SINCE: dict[str, tuple[int, int, int]] = {
    "--cpus": (0, 0, 1),
    "--memory": (0, 0, 1),
    "--device": (0, 0, 1),
    "virtio-blk": (0, 0, 1),
    "virtio-net": (0, 0, 1),
    "virtio-serial": (0, 0, 1),  # with logFilePath
    "virtio-rng": (0, 0, 1),
    "virtio-fs": (0, 0, 2),
    "--timesync": (0, 0, 3),
    "--bootloader": (0, 1, 0),  # efi,variable-store=...[,create]
    "--restful-uri": (0, 1, 0),  # unix://
    "rosetta": (0, 5, 0),
    "virtio-balloon": (0, 6, 1),
    "--nested": (0, 6, 2),
}


def parseVfkitVersion(text: str) -> tuple[int, int, int] | None:
    """C{vfkit version: v0.6.3} (or C{0.6.3}, or C{v0.6.3-4-gabc}) -> C{(0, 6, 3)}."""
    match = re.search(r"version:?\s*v?(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        return None
    return (int(match.group(1)), int(match.group(2)), int(match.group(3)))


def vfkitNeeds(config: Config) -> dict[str, tuple[int, int, int]]:
    """
    Every flag and device kind of the command line the daemon builds for C{config} (with
    C{--nested} as configured), and the vfkit release that first took it.

    @raise KeyError: for one L{VFKIT_SINCE} does not know (a test keeps them in step).
    """
    args = vfkitArguments(config, "vfkit", "02:00:00:00:00:01", False, config.nested_virtualization)
    needed = {}
    for index, arg in enumerate(args[1:], start=1):
        if arg.startswith("--"):
            needed[arg] = VFKIT_SINCE[arg]
            if arg == "--device":
                kind = args[index + 1].split(",", 1)[0]
                needed[kind] = VFKIT_SINCE[kind]
    return needed
