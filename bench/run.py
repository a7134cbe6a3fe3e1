"""
Virby's benchmarks, everything measured side by side in one run on this machine.

    .venv/bin/python bench/run.py [--quick]

Prints a markdown table and writes it to docs/benchmarks.md.  These machines are noisy:
every figure is a median (or a percentile) over repeated runs, shown beside its comparison
as a ratio, never alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.builder import Builder  # noqa: E402
from tests.e2e.support import free_port, pids_of  # noqa: E402

PEERS = [sys.executable, str(ROOT / "bench" / "peers.py")]
GIB = 1024**3


# -- process helpers -------------------------------------------------------------------------


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


@contextmanager
def running(argv: list[str], port: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if port is not None:
            wait_port(port)
        yield process
    finally:
        process.kill()
        process.wait()


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- 1. splice throughput ----------------------------------------------------------------------


def go_anchor(workdir: Path) -> list[str] | None:
    go = shutil.which("go")
    if go is None:
        return None
    binary = workdir / "splice-go"
    subprocess.run(
        [go, "build", "-o", str(binary), str(ROOT / "bench" / "splice.go")],
        check=True,
        env={**os.environ, "GOCACHE": str(workdir / "gocache"), "GO111MODULE": "off"},
    )
    return [str(binary)]


def throughput(size: int, rounds: int, workdir: Path) -> list[tuple[str, str, str]]:
    sink = free_port()
    variants: dict[str, Callable[[int], list[str]] | None] = {
        "direct (no splice)": None,
        "virby splice (virby.proxy)": lambda p: [*PEERS, "virby-splice", str(p), str(sink)],
        "socat": lambda p: [
            "socat",
            f"TCP-LISTEN:{p},bind=127.0.0.1,reuseaddr,fork",
            f"TCP:127.0.0.1:{sink}",
        ],
        "asyncio, 4 KiB reads + drain": lambda p: [*PEERS, "asyncio-splice", str(p), str(sink)],
    }
    go = go_anchor(workdir)
    if go is not None:
        variants["Go io.Copy + CloseWrite"] = lambda p: [*go, str(p), str(sink)]
    speeds: dict[str, float] = {}
    with running([*PEERS, "sink", str(sink)], sink):
        for name, command in variants.items():
            if command is None:
                port = sink
                speeds[name] = _measure(port, size, rounds)
                continue
            port = free_port()
            with running(command(port), port):
                speeds[name] = _measure(port, size, rounds)
    rows = []
    anchors = {k: v for k, v in speeds.items() if k.startswith(("Go", "asyncio"))}
    for name, speed in speeds.items():
        ratios = ", ".join(
            f"{speed / a:.2f}× {k.split()[0].rstrip(',')}" for k, a in anchors.items()
        )
        rows.append((f"throughput: {name}", f"{speed:.0f} MiB/s", ratios or "–"))
    if go is None:
        rows.append(("throughput: Go io.Copy + CloseWrite", "not measured",
                     "`go` is not installed (apt-get install golang-go)"))  # fmt: skip
    return rows


def _measure(port: int, size: int, rounds: int) -> float:
    seconds = []
    for _ in range(rounds):
        out = subprocess.run(
            [*PEERS, "send", str(port), str(size)], capture_output=True, text=True, check=True
        )
        seconds.append(float(out.stdout))
    return size / (1024 * 1024) / median(seconds)


# -- 2. added latency --------------------------------------------------------------------------


def added_latency(count: int) -> list[tuple[str, str, str]]:
    server = free_port()
    results: dict[str, list[float]] = {}
    with running([*PEERS, "banner", str(server)], server):
        results["direct"] = _latencies(server, count)
        port = free_port()
        with running([*PEERS, "virby-splice", str(port), str(server)], port):
            results["through virby"] = _latencies(port, count)
    direct, virby = results["direct"], results["through virby"]
    added = median(virby) - median(direct)
    return [
        ("latency to first banner byte, direct", _ms(direct), f"{count} connections"),
        ("latency to first banner byte, through virby", _ms(virby), f"{count} connections"),
        ("added latency p50", f"{added * 1000:.3f} ms", "target ≤ 1 ms"),
    ]


def _latencies(port: int, count: int) -> list[float]:
    out = subprocess.run(
        [*PEERS, "latency", str(port), str(count)], capture_output=True, text=True, check=True
    )
    return [float(line) for line in out.stdout.split()]


def _ms(values: list[float]) -> str:
    return f"p50 {median(values) * 1000:.3f} ms, p99 {percentile(values, 99) * 1000:.3f} ms"


# -- 3-5. the daemon with the emulated VM ------------------------------------------------------

LISTENING = re.compile(rb"sshd listening on \S+ at (\d+\.\d+)")


def _first_byte(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.recv(1)
        return time.time()


def _wait_state(builder: Builder, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if builder.status().get("state") == state:
            return
        time.sleep(0.05)
    raise SystemExit(f"daemon did not reach {state}")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def _daemon_pid(builder: Builder) -> int:
    return builder.status()["daemon_pid"]


def cold_start(root: Path, boots: int) -> list[tuple[str, str, str]]:
    builder = Builder(root, ttl=1, debug=True)
    try:
        builder.start()
        overheads = []
        for _ in range(boots):
            received = _first_byte(builder.port)
            console = (builder.wd / "serial.log").read_bytes()
            listening = float(LISTENING.findall(console)[-1])
            overheads.append(received - listening)
            _wait_state(builder, "stopped")
        return [("cold start: sshd listening → first banner byte at the client",
                 _ms(overheads), f"{boots} boots; target p50 ≤ 50 ms")]  # fmt: skip
    finally:
        builder.cleanup()


def fan_in(root: Path, connections: int) -> list[tuple[str, str, str]]:
    builder = Builder(root)
    try:
        daemon = builder.start()
        start = time.monotonic()
        sockets = [socket.create_connection(("127.0.0.1", builder.port), timeout=60)
                   for _ in range(connections)]  # fmt: skip
        served = 0
        for s in sockets:
            with suppress(OSError):
                served += s.recv(8).startswith(b"SSH-")
        wall = time.monotonic() - start
        for s in sockets:
            s.close()
        spawned = daemon.text().count("booting the VM")
        target = f"target {connections}/{connections} with 1 vfkit"
        return [
            (
                f"cold-start fan-in: {connections} connections at once",
                f"{served}/{connections} served, {spawned} vfkit spawned",
                f"wall {wall:.2f} s; {target}",
            )
        ]
    finally:
        builder.cleanup()


def memory(root: Path, connections: int) -> list[tuple[str, str, str]]:
    builder = Builder(root)
    try:
        builder.start()
        pid = _daemon_pid(builder)
        idle = _rss_kib(pid)
        builder.banner()
        for _ in range(connections):
            builder.banner()
        after = _rss_kib(pid)
        return [
            ("daemon RSS idle after start", f"{idle / 1024:.1f} MiB", "target ≤ 40 MB"),
            (
                "the daemon's modules imported, with / without pyOpenSSL",
                f"{_import_rss(True):.1f} / {_import_rss(False):.1f} MiB",
                "Twisted's TCP transport loads pyOpenSSL and cryptography when installed",
            ),
            (f"daemon RSS after {connections} connections", f"{after / 1024:.1f} MiB",
             f"{(after - idle) / 1024:+.1f} MiB vs idle"),
        ]  # fmt: skip
    finally:
        builder.cleanup()


def _import_rss(with_openssl: bool) -> float:
    """RSS of a Python that imported the reactor and the daemon, nothing running."""
    program = (
        ("" if with_openssl else "import sys; sys.modules['OpenSSL'] = None\n")
        + "import twisted.internet.reactor, virby.daemon\n"
        + "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    return int(out.stdout) / 1024


def nix_build(root: Path, rounds: int) -> list[tuple[str, str, str]]:
    if not shutil.which("nix-build"):
        return [("nix remote build", "not measured", "nix-build is not installed")]
    builder = Builder(root)
    try:
        builder.start()
        builder.ssh("true")
        ip = builder.status()["vm_ip"]
        direct_config = root / "ssh_config_direct"
        direct_config.write_text(
            builder.ssh_config.read_text()
            .replace("HostName 127.0.0.1", f"HostName {ip}")
            .replace(f"Port {builder.port}", f"Port {builder.settings['guest-ssh-port']}")
        )
        times: dict[str, list[float]] = {"through virby": [], "ssh-ng straight to the guest": []}
        for i in range(rounds):
            for name, config in (("through virby", builder.ssh_config),
                                 ("ssh-ng straight to the guest", direct_config)):  # fmt: skip
                times[name].append(_one_build(root, config, f"{name[:3]}{i}{os.getpid()}"))
        via, direct = median(times["through virby"]), median(times["ssh-ng straight to the guest"])
        return [("nix remote build (trivial derivation), through virby", f"{via:.2f} s",
                 f"{via / direct:.2f}× ssh-ng straight to the guest ({direct:.2f} s)")]  # fmt: skip
    finally:
        builder.cleanup()


def _one_build(root: Path, ssh_config: Path, tag: str) -> float:
    expression = root / f"{tag}.nix"
    expression.write_text(
        f'derivation {{ name = "bench-{tag}"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "echo ok > $out" ]; }'
    )
    system = subprocess.run(
        ["nix-instantiate", "--eval", "--expr", "builtins.currentSystem", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().strip('"')  # fmt: skip
    start = time.perf_counter()
    subprocess.run(
        ["nix-build", str(expression), "--no-out-link", "--store", str(root / f"store-{tag}"),
         "--max-jobs", "0", "--builders", f"ssh-ng://virby-vm {system}",
         "--option", "substituters", ""],
        check=True, capture_output=True,
        env={**os.environ, "NIX_SSHOPTS": f"-F {ssh_config}"},
    )  # fmt: skip
    return time.perf_counter() - start


# -- the table ---------------------------------------------------------------------------------


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measurement | result | beside it |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    quick = args.quick
    started = time.monotonic()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="virby-bench-") as scratch:
        work = Path(scratch)
        steps: list[tuple[str, Callable[[], list[tuple[str, str, str]]]]] = [
            ("throughput", lambda: throughput(GIB // (16 if quick else 1), 3, work)),
            ("latency", lambda: added_latency(100 if quick else 500)),
            ("cold start", lambda: cold_start(_fresh(work, "cold"), 5 if quick else 20)),
            ("fan-in", lambda: fan_in(_fresh(work, "fanin"), 50 if quick else 200)),
            ("memory", lambda: memory(_fresh(work, "memory"), 200 if quick else 1000)),
            ("nix", lambda: nix_build(_fresh(work, "nix"), 1 if quick else 3)),
        ]
        for name, step in steps:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows += step()
    leftovers = pids_of(r"vfkit-emulator")
    header = (
        f"Measured on {platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, in {time.monotonic() - started:.0f} s"
        f"{' (--quick)' if quick else ''}; medians over repeated runs.\n"
    )
    text = f"# Benchmarks\n\n{header}\n{table(rows)}\n\n{BOUNDS}"
    if leftovers:
        text += f"\nWarning: emulators left running: {leftovers}\n"
    print(text)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text(text)


BOUNDS = """What bounds the figures that miss their targets:

- Throughput against Go: Go's `io.Copy` between two TCP connections uses `splice(2)` on
  Linux, so bytes move between the sockets inside the kernel; `virby.proxy` reads each chunk
  into Python and writes it out again through Twisted's transports. Closing that gap would
  take a `splice(2)` path outside the reactor's transports.
- Idle RSS: the row "with / without pyOpenSSL" shows the daemon's own imports. Twisted's TCP
  transport imports pyOpenSSL and cryptography whenever they are installed, and the design
  asks for Twisted's TLS extras.
"""


def _fresh(work: Path, name: str) -> Path:
    path = work / name
    path.mkdir()
    return path


if __name__ == "__main__":
    main()
