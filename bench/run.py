"""
Virby's benchmarks: every contender measured side by side in one run on this machine, and
the targets Virby is held to.

    dev/bench [--quick]          (or: .venv/bin/python bench/run.py [--quick])

Prints markdown tables and writes them to docs/benchmarks.md.  The machine is shared and
noisy, so the numbers are made to referee fairly: the contenders run round by round,
interleaved (a burst of load hits all of them, not one), every median is shown with its
spread (min-max), ratios are taken within a round, and CPU is read from each contender's
own /proc/PID/stat.  A step that cannot run (a missing tool, the Nix build) says why in its
row and the rest is still measured.
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
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.builder import Builder  # noqa: E402
from testbed.processes import free_port, pids_of  # noqa: E402
from virby.errors import oneLine  # noqa: E402

PEERS = [sys.executable, str(ROOT / "bench" / "peers.py")]
GIB = 1024**3
TICK = os.sysconf("SC_CLK_TCK")


# -- numbers -------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def spread(values: list[float], fmt: str = "{:.0f}", scale: float = 1.0) -> str:
    """C{"median (min–max)"}: a median is never shown without how far the runs strayed."""
    if not values:
        return "–"
    m, lo, hi = (scale * v for v in (median(values), min(values), max(values)))
    return f"{fmt.format(m)} ({fmt.format(lo)}–{fmt.format(hi)})"


@dataclass
class Target:
    what: str
    measured: str
    met: bool | None  # None: could not be measured


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        for row in self.rows:
            cells = row + [""] * (len(self.header) - len(row))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *self.notes] if self.notes else []
        return "\n".join(lines)

    def failed(self, what: str, why: str) -> None:
        self.rows.append([what, f"not measured: {why}"])


# -- processes ------------------------------------------------------------------------------


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f}s")


@contextmanager
def running(argv: list[str], port: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if port is not None:
            try:
                wait_port(port)
            except RuntimeError:
                process.kill()
                _, err = process.communicate()
                last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"{Path(argv[0]).name} did not start: {last[0]}") from None
        yield process
    finally:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User and system CPU of C{pid}, all its threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


# -- 1. throughput -----------------------------------------------------------------------------


GO_COPY = "Go io.Copy + CloseWrite (splice(2) on Linux)"
GO_LOOP = "Go, 32 KiB copy loop (Go's shape on macOS)"
VIRBY_FAST = "virby, splice(2) relay (the daemon's path on Linux)"
VIRBY_PORTABLE = "virby, recv_into relay (the daemon's path on macOS)"
VIRBY_TRANSPORTS = "virby, Twisted transports (the fallback path)"
ASYNCIO = "asyncio, 64 KiB reads + drain"
DIRECT = "direct, no splice (the ceiling)"


def go_build(work: Path) -> list[str]:
    """The Go anchor, built here; raises with the reason when it cannot be."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("`go` is not installed (dev/bench installs golang-go as root)")
    binary = work / "splice-go"
    built = subprocess.run(
        [go, "build", "-o", str(binary), str(ROOT / "bench" / "splice.go")],
        capture_output=True,
        text=True,
        env={**os.environ, "GOCACHE": str(work / "gocache"), "GO111MODULE": "off"},
    )
    if built.returncode != 0:
        raise RuntimeError(f"go build failed: {built.stderr.strip().splitlines()[-1:]}")
    return [str(binary)]


@dataclass
class Contender:
    name: str
    command: Callable[[int], list[str]] | None  # None: the sink itself, no splice
    port: int = 0
    pid: int | None = None
    error: str | None = None


def throughput(
    work: Path, size: int, rounds: int, streams: list[int], targets: list[Target]
) -> Section:
    section = Section(
        f"Throughput: {size / GIB:g} GiB per run through each splice to a counting sink, "
        f"{rounds} rounds interleaved",
        ["path", "streams", "MB/s", "CPU s/GiB", "vs Go io.Copy: MB/s; CPU", "vs Go's loop"],
    )
    sink = free_port()
    contenders = [Contender(DIRECT, None)]
    try:
        go = go_build(work)
        contenders += [
            Contender(GO_COPY, lambda p: [*go, "copy", str(p), str(sink)]),
            Contender(GO_LOOP, lambda p: [*go, "loop32k", str(p), str(sink)]),
        ]
    except RuntimeError as e:
        section.failed(GO_COPY, str(e))
        section.failed(GO_LOOP, str(e))
    contenders += [
        Contender(VIRBY_FAST, lambda p: [*PEERS, "virby-splice", str(p), str(sink), "fast"]),
        Contender(
            VIRBY_PORTABLE, lambda p: [*PEERS, "virby-splice", str(p), str(sink), "portable"]
        ),
        Contender(
            VIRBY_TRANSPORTS,
            lambda p: [*PEERS, "virby-splice", str(p), str(sink), "transports"],
        ),
        Contender(ASYNCIO, lambda p: [*PEERS, "asyncio-splice", str(p), str(sink)]),
    ]
    speeds: dict[tuple[str, int], list[float]] = {}
    costs: dict[tuple[str, int], list[float]] = {}
    with ExitStack() as stack:
        stack.enter_context(running([*PEERS, "sink", str(sink)], sink))
        for c in contenders:
            if c.command is None:
                c.port = sink
                continue
            c.port = free_port()
            try:
                c.pid = stack.enter_context(running(c.command(c.port), c.port)).pid
            except RuntimeError as e:
                c.error = str(e)
        live = [c for c in contenders if c.error is None]
        for n in streams:
            for r in range(rounds):
                # Each round in another order: no contender always runs first, or last.
                order = live[r % len(live) :] + live[: r % len(live)]
                for c in order:
                    before = cpu_seconds(c.pid) if c.pid else 0.0
                    out = subprocess.run(
                        [*PEERS, "send", str(c.port), str(size), str(n)],
                        capture_output=True,
                        text=True,
                    )
                    if out.returncode != 0:
                        c.error = (out.stderr.strip().splitlines() or ["failed"])[-1]
                        continue
                    seconds = float(out.stdout)
                    speeds.setdefault((c.name, n), []).append(size / 1e6 / seconds)
                    if c.pid:
                        used = cpu_seconds(c.pid) - before
                        costs.setdefault((c.name, n), []).append(used / (size / GIB))
    for c in contenders:
        if c.error is not None:
            section.failed(c.name, c.error)
    for n in streams:
        for c in contenders:
            key = (c.name, n)
            if key not in speeds:
                continue
            section.rows.append(
                [
                    c.name,
                    str(n),
                    spread(speeds[key]),
                    spread(costs.get(key, []), "{:.2f}"),
                    _versus(speeds, costs, key, (GO_COPY, n)),
                    _versus(speeds, costs, key, (GO_LOOP, n)) if c.name == VIRBY_PORTABLE else "",
                ]
            )
    for n in streams:
        _targetAgainst(targets, speeds, costs, (VIRBY_FAST, n), (GO_COPY, n), "Go io.Copy")
        _targetAgainst(targets, speeds, costs, (VIRBY_PORTABLE, n), (GO_LOOP, n), "Go's loop")
    section.notes = [
        "MB/s is 10^6 bytes a second, from the sender's first connect to the sink's last "
        "answer (the sink answers with its count after the EOF, which proves the half-close "
        "came through).  CPU is the splice process's own user + system time over the run.  "
        "Ratios are taken round by round and shown as their median (min–max)."
    ]
    return section


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=False) if y]


def _versus(speeds, costs, key, anchor) -> str:
    """Round-by-round ratios to the anchor: throughput, then CPU per GiB."""
    if key[0] == DIRECT or anchor not in speeds:
        return ""
    if key == anchor:
        return "1"
    fast = spread(_ratios(speeds[key], speeds[anchor]), "{:.2f}×")
    cheap = spread(_ratios(costs.get(key, []), costs.get(anchor, [])), "{:.2f}×")
    return f"{fast}; CPU {cheap}"


def _targetAgainst(targets, speeds, costs, key, anchor, anchorName) -> None:
    what, n = key
    label = "splice(2) relay" if what == VIRBY_FAST else "recv_into relay"
    if key not in speeds or anchor not in speeds:
        targets.append(Target(f"{label}, {n} streams: ≥ 1.0× {anchorName}", "–", None))
        return
    fast = _ratios(speeds[key], speeds[anchor])
    targets.append(
        Target(
            f"{label}, {n} stream{'s' * (n > 1)}: MB/s ≥ 1.0× {anchorName}",
            spread(fast, "{:.2f}×"),
            median(fast) >= 1.0,
        )
    )
    mine, theirs = costs.get(key, []), costs.get(anchor, [])
    if mine and theirs:
        targets.append(
            Target(
                f"{label}, {n} stream{'s' * (n > 1)}: CPU s/GiB ≤ {anchorName}'s",
                f"{spread(mine, '{:.2f}')} vs {spread(theirs, '{:.2f}')}",
                median(mine) <= median(theirs),
            )
        )


# -- 2. added latency --------------------------------------------------------------------------


def latency(work: Path, count: int, rounds: int, targets: list[Target]) -> Section:
    section = Section(
        f"Latency to the first banner byte: {count} connections a round, {rounds} rounds "
        "interleaved",
        ["path", "p50 ms", "p99 ms", "added p50 ms (vs direct)"],
    )
    server = free_port()
    contenders: dict[str, Callable[[int], list[str]] | None] = {"direct": None}
    try:
        go = go_build(work)
        contenders[GO_COPY] = lambda p: [*go, "copy", str(p), str(server)]
    except RuntimeError as e:
        section.failed(GO_COPY, str(e))
    contenders[VIRBY_FAST] = lambda p: [*PEERS, "virby-splice", str(p), str(server), "fast"]
    p50s: dict[str, list[float]] = {name: [] for name in contenders}
    every: dict[str, list[float]] = {name: [] for name in contenders}
    with ExitStack() as stack:
        stack.enter_context(running([*PEERS, "banner", str(server)], server))
        ports: dict[str, int] = {}
        for name, command in contenders.items():
            if command is None:
                ports[name] = server
                continue
            ports[name] = free_port()
            try:
                stack.enter_context(running(command(ports[name]), ports[name]))
            except RuntimeError as e:
                section.failed(name, str(e))
                del ports[name]
        names = list(ports)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                out = subprocess.run(
                    [*PEERS, "latency", str(ports[name]), str(count)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                values = [float(line) for line in out.stdout.split()]
                p50s[name].append(median(values))
                every[name] += values
    for name in ports:
        added = [v - d for v, d in zip(p50s[name], p50s["direct"], strict=False)]
        section.rows.append(
            [
                name,
                spread(p50s[name], "{:.3f}", 1000),
                f"{percentile(every[name], 99) * 1000:.3f}",
                spread(added, "{:.3f}", 1000) if name != "direct" else "",
            ]
        )
    if VIRBY_FAST in ports and GO_COPY in ports:
        over = [v - g for v, g in zip(p50s[VIRBY_FAST], p50s[GO_COPY], strict=False)]
        targets.append(
            Target(
                "added latency p50 ≤ Go's + 0.1 ms",
                f"{spread(over, '{:+.3f}', 1000)} ms vs Go",
                median(over) <= 0.0001,
            )
        )
    else:
        targets.append(Target("added latency p50 ≤ Go's + 0.1 ms", "–", None))
    section.notes = [
        "p50 is each round's median, shown as the median of the rounds (min–max); p99 is over "
        "every connection.  A connection is a connect and a read of one byte."
    ]
    return section


# -- 3. the daemon with the emulated VM --------------------------------------------------------

LISTENING = re.compile(rb"sshd listening on (\S+) at (\d+\.\d+)")


def _first_byte(port: int, host: str = "127.0.0.1") -> float:
    with socket.create_connection((host, port), timeout=60) as s:
        s.recv(1)
        return time.time()


def _wait_state(builder: Builder, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = builder.status()
        if status.get("state") == state:
            return
        time.sleep(0.05)
    last = builder.daemons[-1].text().strip().splitlines()[-3:] if builder.daemons else []
    raise RuntimeError(
        f"the daemon did not reach {state} in {timeout:.0f}s: state {status.get('state')}, "
        f"{status.get('active_connections')} connections; its log ends: {' | '.join(last)}"
    )


def cold_start(root: Path, boots: int, targets: list[Target]) -> Section:
    section = Section(
        "Cold start: the guest's sshd listening → the first banner byte at a waiting client",
        ["measurement", "ms median (min–max)", "p90 ms"],
    )
    builder = Builder(root, ttl=1, debug=True)
    overheads, sshd, share = [], [], []
    try:
        daemon = builder.start()
        for _ in range(boots):
            # Read what the daemon logged: a pipe nobody reads fills, and then blocks it.
            daemon.text()
            received = _first_byte(builder.port)
            console = (builder.wd / "serial.log").read_bytes()
            address, stamp = LISTENING.findall(console)[-1]
            overheads.append(received - float(stamp))
            # What sshd alone takes to greet a new connection, right after: the floor.
            host, port = address.decode().rsplit(":", 1)
            start = time.time()
            sshd.append(_first_byte(int(port), host) - start)
            share.append(overheads[-1] - sshd[-1])
            _wait_state(builder, "stopped")
    finally:
        builder.cleanup()
    for name, values in (
        (f"overhead, {boots} boots", overheads),
        ("sshd alone: connect → banner on a new connection, right after each boot", sshd),
        ("the daemon's share (the overhead less sshd's own, boot by boot)", share),
    ):
        section.rows.append(
            [name, spread(values, "{:.1f}", 1000), f"{percentile(values, 90) * 1000:.1f}"]
        )
    section.notes = [
        "The emulator stamps the moment its sshd says it listens.  A connection made then "
        "still waits for OpenSSH to start the session process that sends the banner; the "
        "second row measures that wait on its own, so the third is what the daemon adds: "
        "the wait for its next probe, and the hand-over of the probe's connection."
    ]
    targets.append(
        Target(
            "cold-start overhead p50 ≤ 10 ms",
            f"{spread(overheads, '{:.1f}', 1000)} ms (sshd alone {median(sshd) * 1000:.1f})",
            median(overheads) <= 0.010,
        )
    )
    return section


def fan_in(root: Path, connections: int) -> Section:
    section = Section(
        f"Cold-start fan-in: {connections} connections at once",
        ["served", "vfkit spawned", "wall s"],
    )
    builder = Builder(root)
    try:
        daemon = builder.start()
        start = time.monotonic()
        sockets = [
            socket.create_connection(("127.0.0.1", builder.port), timeout=60)
            for _ in range(connections)
        ]
        served = 0
        for s in sockets:
            with suppress(OSError):
                served += s.recv(8).startswith(b"SSH-")
        wall = time.monotonic() - start
        for s in sockets:
            s.close()
        spawned = daemon.text().count("booting the VM")
    finally:
        builder.cleanup()
    section.rows.append([f"{served}/{connections}", str(spawned), f"{wall:.2f}"])
    return section


def _imports_rss(program: str, samples: int = 3) -> list[float]:
    """RSS of a fresh Python that ran C{program} (imports), nothing else."""
    values = []
    for _ in range(samples):
        out = subprocess.run(
            [sys.executable, "-c", program + "\nprint(open('/proc/self/status').read())"],
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(x for x in out.stdout.splitlines() if x.startswith("VmRSS"))
        values.append(int(line.split()[1]) / 1024)
    return values


def memory(root: Path, connections: int, targets: list[Target]) -> Section:
    section = Section(
        "Memory: the daemon's resident set, beside what Twisted alone costs",
        ["what", "RSS MiB median (min–max)"],
    )
    # An installed Virby runs from compiled bytecode (Nix compiles it into the store); a
    # checkout may not have it, and compiling at import costs a few MiB of its own.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "virby"), str(ROOT / "twisted")],
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
    )
    twisted = "import twisted.internet.reactor, twisted.internet.endpoints, twisted.logger"
    without_tls = "import sys; sys.modules['OpenSSL'] = None\n" + twisted
    baselines = [
        ("Python alone", "pass"),
        ("Python + Twisted's reactor, endpoints, logger (with its TLS imports)", twisted),
        ("the same without pyOpenSSL (Twisted loads it whenever installed)", without_tls),
        ("the same with twisted.web.client (vfkit's REST client, imported at its first "
         "request)", twisted + ", twisted.web.client"),
        ("the same with the splice's modules (virby.daemon.proxy, .relay, .readiness)",
         twisted + ", virby.daemon.proxy"),
        ("the same with all the daemon's modules (not twistd's own)",
         twisted + ", virby.daemon.service"),
    ]  # fmt: skip
    measured = {name: _imports_rss(program) for name, program in baselines}
    builder = Builder(root)
    try:
        builder.start()
        pid = builder.status()["daemon_pid"]
        idle = rss_mib(pid)
        builder.banner()
        for _ in range(connections):
            builder.banner()
        after = rss_mib(pid)
    finally:
        builder.cleanup()
    for name, values in measured.items():
        section.rows.append([name, spread(values, "{:.1f}")])
    section.rows.append(["the daemon (virbyd, which runs twistd), idle after start", f"{idle:.1f}"])
    section.rows.append(
        [f"the daemon after {connections} connections", f"{after:.1f} ({after - idle:+.1f})"]
    )
    twisted_cost = median(measured[baselines[1][0]])
    ours = idle - twisted_cost
    section.notes = [
        f"Over Twisted with its TLS imports, the running daemon holds {ours:.1f} MiB: "
        "twistd's own modules and plugins, the daemon's modules (most of it Twisted's HTTP "
        "client, for vfkit's REST API), and what serving allocates.  The splice's modules add "
        "a few hundred KiB; at idle it holds no pipe (the spares close 5 s after the last "
        "relay) and no buffer."
    ]
    targets.append(
        Target(
            "idle RSS, beside Twisted and its TLS imports",
            f"{idle:.1f} MiB, {ours:+.1f} over Twisted's {twisted_cost:.1f}",
            None,
        )
    )
    return section


def nix_build(root: Path, rounds: int) -> Section:
    section = Section(
        f"A Nix remote build of a trivial derivation, {rounds} rounds interleaved",
        ["path", "seconds median (min–max)"],
    )
    if not shutil.which("nix-build"):
        section.failed("through virby", "nix-build is not installed (Debian's nix-bin)")
        return section
    builder = Builder(root)
    try:
        builder.start()
        if builder.ssh("true").returncode != 0:
            raise RuntimeError("ssh through the daemon failed")
        ip = builder.status()["vm_ip"]
        direct_config = root / "ssh_config_direct"
        direct_config.write_text(
            builder.ssh_config.read_text()
            .replace("HostName 127.0.0.1", f"HostName {ip}")
            .replace(f"Port {builder.port}", f"Port {builder.settings['guest-ssh-port']}")
        )
        paths = {"through virby": builder.ssh_config, "ssh-ng straight to the guest": direct_config}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(rounds):
            for name, config in paths.items():
                tag = f"{name[:3]}{i}{os.getpid()}"
                times[name].append(_one_build(root, config, tag, builder.env))
    finally:
        builder.cleanup()
    for name, values in times.items():
        section.rows.append([name, spread(values, "{:.2f}")])
    return section


def _one_build(root: Path, ssh_config: Path, tag: str, env: dict[str, str]) -> float:
    expression = root / f"{tag}.nix"
    expression.write_text(
        f'derivation {{ name = "bench-{tag}"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "echo ok > $out" ]; }'
    )
    system = subprocess.run(
        ["nix-instantiate", "--eval", "--expr", "builtins.currentSystem", "--json"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.strip().strip('"')  # fmt: skip
    start = time.perf_counter()
    built = subprocess.run(
        ["nix-build", str(expression), "--no-out-link", "--store", str(root / f"store-{tag}"),
         "--max-jobs", "0", "--builders", f"ssh-ng://virby-vm {system}",
         "--option", "substituters", "", "--option", "builders-use-substitutes", "false"],
        capture_output=True, text=True,
        env={**env, "NIX_SSHOPTS": f"-F {ssh_config}"},
    )  # fmt: skip
    if built.returncode != 0:
        errors = [line for line in built.stderr.splitlines() if line.startswith("error:")]
        cause = (errors or ["error: failed"])[0].rsplit("error: ", 1)[-1]
        raise RuntimeError(f"nix-build failed: {cause}")
    return time.perf_counter() - start


# -- the report --------------------------------------------------------------------------------


def targets_section(targets: list[Target]) -> Section:
    section = Section("Targets", ["target", "measured", ""])
    for t in targets:
        verdict = {True: "met", False: "**missed**", None: "–"}[t.met]
        section.rows.append([t.what, t.measured, verdict])
    return section


BOUNDS = """\
What bounds the figures, where a target is missed (or nearly):

- Throughput: every contender shares this machine's two cores with the sender and the sink
  (one Python process each), so the rows compare what each splice costs (CPU s/GiB) more
  truly than how fast it went.  Go's `io.Copy` splices too, from as many threads as it
  likes; the relay splices from the reactor's one thread, at about half Go's CPU per GiB.
- The recv_into relay (macOS's path) copies every byte into user space and out again, as
  Go's 32 KiB loop does: the copies are the cost, the same for both; the relay saves system
  calls with 1 MiB chunks and pays Python's turn of the reactor for each.  On one stream the
  sink is the slowest process, the relay waits for it chunk by chunk, and the two come out
  even within the spread.
- Latency: each connection costs the daemon's one thread a Twisted accept and transport, a
  connect, the relay's set-up and, as the latency client hangs up and reconnects at once,
  the previous pair's teardown: 0.1 to 0.3 ms more than Go in the runs so far, which spends
  less CPU on each connection and overlaps one's teardown with the next one's set-up on its
  second core.
- Cold start: a connection made the moment sshd listens still waits for OpenSSH to start
  its session process (the second row of that table); the daemon's own share is the wait
  for its next probe (at most 2 ms) and the hand-over of the probe's connection.
- Idle RSS: Twisted imports pyOpenSSL and cryptography whenever they are installed (the
  daemon installs Twisted's TLS extras); most of the rest is Twisted's HTTP client, which
  virby.daemon.rest imports at start for vfkit's REST API.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    quick = args.quick
    started = time.monotonic()
    targets: list[Target] = []
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="virby-bench-") as scratch:
        work = Path(scratch)
        steps: list[tuple[str, Callable[[], Section]]] = [
            ("throughput", lambda: throughput(
                work, GIB // (16 if quick else 1), 2 if quick else 5, [1, 16, 64], targets)),
            ("latency", lambda: latency(work, 100 if quick else 200, 3 if quick else 7, targets)),
            ("cold start", lambda: cold_start(_fresh(work, "cold"), 5 if quick else 20, targets)),
            ("fan-in", lambda: fan_in(_fresh(work, "fanin"), 50 if quick else 200)),
            ("memory", lambda: memory(_fresh(work, "memory"), 100 if quick else 1000, targets)),
            ("nix", lambda: nix_build(_fresh(work, "nix"), 1 if quick else 3)),
        ]  # fmt: skip
        for name, step in steps:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            try:
                sections.append(step())
            except Exception as e:
                traceback.print_exc()
                failed = Section(f"{name}: not measured", ["step", "result"])
                failed.failed(name, oneLine(e))
                sections.append(failed)
        leftovers = pids_of(r"vfkit-emulator.*" + re.escape(scratch))
    header = (
        f"Measured on {platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, in {time.monotonic() - started:.0f} s"
        f"{' (--quick)' if quick else ''}; a shared machine, so read the spreads."
    )
    parts = ["# Benchmarks", header, targets_section(targets).markdown()]
    parts += [s.markdown() for s in sections]
    parts.append(BOUNDS)
    text = "\n\n".join(parts)
    if leftovers:
        text += f"\nWarning: emulators left running: {leftovers}\n"
    print(text)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text(text)


def _fresh(work: Path, name: str) -> Path:
    path = work / name
    path.mkdir()
    return path


if __name__ == "__main__":
    main()
