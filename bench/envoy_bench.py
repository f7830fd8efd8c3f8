#!/usr/bin/env python3
"""Keel's Envoy overhead benchmark: Envoy CPU time per request, as ratios against baselines
measured in the same run.

Each scenario is one Envoy (`--concurrency 1`, pinned to one core) whose only route answers with
`direct_response`, so no upstream process competes for CPU; the HTTP filters under test still run
before the router answers. A load generator (wrk, or h2load) pinned to the other core drives it.
Envoy CPU per request = delta of the process's utime+stime (/proc/<pid>/stat) over the measured
window / delta of Envoy's own `http.ingress.downstream_rq_completed` counter over that window.

All scenarios' Envoys are started first, verified (one traced request shows each expected filter
ran) and warmed up; then every round measures each scenario once, in rotated order, so that
the machine's noise (2 shared cores) falls on all scenarios alike. Per scenario the median over
rounds is reported, and ratios of overheads over bare Envoy: overhead(X) / overhead(empty).

Adding a scenario is one entry in SCENARIOS (and its Envoy config in bench/envoy/).
Results: bench-results/envoy.md and bench-results/envoy.json. See bench/README.md.
Benchmarks are reported, not asserted: the exit status is 0 whatever the ratios (2 when the
benchmark itself cannot run: no Envoy, no load generator, bare Envoy does not start).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "bench" / "envoy"
# Every request carries this header: Keel's limiter keys on it, the others ignore it, so all
# scenarios receive byte-identical requests.
BENCH_HEADER = ("x-api-key", "bench")
ROUTER = "envoy.filters.http.router"
# Features that rustc (1.87+) enables by default for wasm32 and V8 supports; wasm-opt 108 does not
# detect them from a stripped module, so they are named.
WASM_OPT_FEATURES = [
    "--enable-bulk-memory",
    "--enable-sign-ext",
    "--enable-mutable-globals",
    "--enable-nontrapping-float-to-int",
    "--enable-multivalue",
    "--enable-reference-types",
]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One Envoy configuration to measure."""

    name: str
    config: str  # file in bench/envoy/
    description: str
    # The .wasm module the config loads (relative to the repository root), if any: a scenario
    # whose module is missing is skipped, and `wasm_opt` variants replace its path.
    module: Optional[str] = None
    # Names of the HTTP filters (as in the config) that a request must pass before the router:
    # checked once per Envoy on a traced request.
    filters: tuple = ()
    # Counters (matched by name suffix) that must grow by one per request in every window: the
    # proof that the filter did its work (e.g. the limiter's `allowed` counter).
    per_request_counters: tuple = ()
    # Counters (matched by name suffix) that must not grow in a window: the proof that the
    # measured path is the one meant (the fleet limiter's lease, not its store-error fallback).
    quiet_counters: tuple = ()
    # Counters (matched by name suffix) whose growth per window is reported, for information.
    noted_counters: tuple = ()
    # Ratio reported: overhead(this) / overhead(compare_with), overheads taken over `bare`.
    compare_with: Optional[str] = "empty"
    # The most that ratio may be (from the issues), or None for information only.
    target: Optional[float] = None
    # Also measure a copy of the module passed through `wasm-opt -Oz`.
    wasm_opt: bool = False
    # Text replacements applied to the config (e.g. the floor instrument's host calls).
    substitutions: tuple = ()
    # Further modules the config loads (a composition of several modules), taken from --dist too.
    extra_modules: tuple = ()
    # Needs the fleet store: redis-server on 16379 behind webdis on 17379, started by the bench.
    fleet_store: bool = False
    # The floor scenario making the same host calls without logic: --instructions reports
    # overhead(this) / overhead(floor).
    floor: Optional[str] = None


# The five Keel filters on one route, as each composition's config names them.
FIVE = ("keel.rate_limit", "keel.circuit_breaker", "keel.retry", "keel.picker", "keel.discovery")
# What shows each of the five did its work on every request (the picker and discovery have no
# per-request counter: the picker's picks are counted per second, discovery acts on ticks).
FIVE_COUNTERS = ("rate_limit.bench.allowed", "circuit_breaker.orders.calls", "retry.default.requests")

def read_floors() -> list:
    """(name, ops, what) of each floor scenario, from bench/floors.txt (shared with the harness's
    host-call budget test, which checks each floor makes its filter's host calls)."""
    floors = []
    for line in (ROOT / "bench" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            fields = [f.strip() for f in line.split("|")]
            if len(fields) != 3:
                raise SystemExit(f"bench/floors.txt: expected `name | ops | what`, got {line!r}")
            floors.append(tuple(fields))
    return floors


# The table of scenarios. A filter adds a line here and a config in bench/envoy/, e.g.
#   Scenario("keel-circuit-breaker", "keel-circuit-breaker.yaml", "...",
#            module="dist/keel_circuit_breaker.wasm", filters=("keel.circuit_breaker",),
#            target=1.15),
SCENARIOS = [
    Scenario(
        "bare",
        "bare.yaml",
        "no HTTP filter but the router (direct_response)",
        compare_with=None,
    ),
    Scenario(
        "empty",
        "empty.yaml",
        "one empty wasm filter (keel_empty.wasm): the wasm floor",
        module="dist/keel_empty.wasm",
        filters=("keel.empty",),
        compare_with=None,
        wasm_opt=True,
    ),
    Scenario(
        "native-local-ratelimit",
        "native-local-ratelimit.yaml",
        "Envoy's native local_ratelimit, 100 % enabled and enforced, never limiting",
        filters=("envoy.filters.http.local_ratelimit",),
        per_request_counters=("bench.http_local_rate_limit.ok",),
    ),
    Scenario(
        "keel-rate-limit",
        "keel-rate-limit.yaml",
        "Keel's rate limiter (keel_rate_limit.wasm), keyed on x-api-key, never limiting",
        module="dist/keel_rate_limit.wasm",
        filters=("keel.rate_limit",),
        per_request_counters=("rate_limit.bench.allowed",),
        target=1.15,
        wasm_opt=True,
        floor="floor-limiter",
    ),
    Scenario(
        "keel-rate-limit-fleet",
        "keel-rate-limit-fleet.yaml",
        "Keel's rate limiter with a fleet-wide limit (Redis through Webdis), served from the lease, never limiting",
        module="dist/keel_rate_limit.wasm",
        filters=("keel.rate_limit",),
        per_request_counters=("rate_limit.bench.allowed",),
        quiet_counters=("rate_limit.bench.store_fallback", "rate_limit.bench.store_errors"),
        noted_counters=("rate_limit.bench.store_calls",),
        compare_with="keel-rate-limit",
        target=1.10,
        fleet_store=True,
    ),
    Scenario(
        "keel-rate-limit-no-headers",
        "keel-rate-limit-no-headers.yaml",
        "Keel's rate limiter as above with response_headers off: the RateLimit headers' share",
        module="dist/keel_rate_limit.wasm",
        filters=("keel.rate_limit",),
        per_request_counters=("rate_limit.bench.allowed",),
        floor="floor-limiter-no-headers",
    ),
    Scenario(
        "keel-circuit-breaker",
        "keel-circuit-breaker.yaml",
        "Keel's circuit breaker (keel_circuit_breaker.wasm), the minimal config, closed",
        module="dist/keel_circuit_breaker.wasm",
        filters=("keel.circuit_breaker",),
        per_request_counters=("circuit_breaker.orders.calls",),
        target=1.15,
        floor="floor-breaker",
    ),
    Scenario(
        "keel-retry",
        "keel-retry.yaml",
        "Keel's retry filter (keel_retry.wasm), the minimal config, a request that needs no retry",
        module="dist/keel_retry.wasm",
        filters=("keel.retry",),
        per_request_counters=("retry.default.requests",),
        floor="floor-retry",
    ),
    Scenario(
        "keel-picker",
        "keel-picker.yaml",
        "Keel's picker (keel_picker.wasm), the minimal config (ring of 3, keyed on x-api-key)",
        module="dist/keel_picker.wasm",
        filters=("keel.picker",),
        target=1.15,
        floor="floor-picker",
    ),
    Scenario(
        "keel-discovery",
        "keel-discovery.yaml",
        "Keel's discovery (keel_discovery.wasm), a static set of three refreshed every second",
        module="dist/keel_discovery.wasm",
        filters=("keel.discovery",),
        floor="floor-discovery",
    ),
    # The floor instrument: the ABI probe making only the host calls a filter needs, no logic.
    # What each Keel filter must at least cost in Envoy, whatever its code.
    *(
        Scenario(
            f"floor-{name}",
            "floor.yaml",
            f"floor: only the host calls {ops} ({why}), no logic",
            module="dist/keel_abi_probe.wasm",
            filters=("keel.floor",),
            substitutions=(("@FLOOR_OPS@", ops),),
        )
        for name, ops, why in read_floors()
    ),
    # All five filters active on one route, three ways; the target for the composition
    # is 2x one empty filter's overhead.
    Scenario(
        "keel-five-modules",
        "keel-five-modules.yaml",
        "all five Keel filters on one route as five separate modules (keel_<filter>.wasm)",
        module="dist/keel_rate_limit.wasm",
        extra_modules=(
            "dist/keel_circuit_breaker.wasm",
            "dist/keel_retry.wasm",
            "dist/keel_picker.wasm",
            "dist/keel_discovery.wasm",
        ),
        filters=FIVE,
        per_request_counters=FIVE_COUNTERS,
        target=2.0,
    ),
    Scenario(
        "keel-five-root-ids",
        "keel-five-root-ids.yaml",
        "all five on one route as five root_ids of keel.wasm, one vm_id: five filter instances, one VM",
        module="dist/keel.wasm",
        filters=FIVE,
        per_request_counters=FIVE_COUNTERS,
        target=2.0,
    ),
    Scenario(
        "keel-five-pipeline",
        "keel-five-pipeline.yaml",
        "all five on one route as the stages of the pipeline (root_id pipeline of keel.wasm): one filter instance",
        module="dist/keel.wasm",
        filters=("keel.pipeline",),
        per_request_counters=FIVE_COUNTERS,
        target=2.0,
        floor="floor-pipeline",
    ),
]


class BenchError(Exception):
    """The benchmark cannot go on (a tool is missing, an Envoy does not start...)."""


# ---------------------------------------------------------------------------------------------
# Processes: pinned, and killed with us.

_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


# Run Envoy and the load generator under SCHED_FIFO (see --realtime).
REALTIME = False


def _child_setup(cpu: Optional[int]):
    """Runs in the child before exec: pin it to `cpu` (as `taskset -c cpu` does), make it a
    real-time task when asked, and have the kernel kill it if this script dies, even by SIGKILL."""

    def setup():
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if REALTIME:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


def _stop(proc: subprocess.Popen):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def find_envoy() -> str:
    chosen = os.environ.get("KEEL_ENVOY")
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise BenchError(f"KEEL_ENVOY={chosen} is not an executable")
        return chosen
    for candidate in (str(ROOT / ".venv" / "envoy"), shutil.which("envoy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError("no Envoy: set KEEL_ENVOY, or run `make setup` (installs .venv/envoy)")


def clock_ticks(path: str) -> int:
    """utime + stime in clock ticks from a /proc/.../stat file."""
    with open(path) as f:
        text = f.read()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


class Envoy:
    """One Envoy process running a scenario's config on free loopback ports."""

    def __init__(self, binary: str, scenario: Scenario, config_text: str, workdir: Path, cpu: Optional[int],
                 wrapper: tuple = (), ready_timeout: float = 60):
        """`wrapper` is a command Envoy runs under (valgrind for --instructions), which also
        makes start-up slower: hence `ready_timeout`."""
        self.scenario = scenario
        # Admin and probe requests: a few seconds natively, more under valgrind.
        self.timeout = max(5.0, ready_timeout / 5)
        self.dir = workdir / scenario.name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "envoy.yaml"
        config.write_text(config_text)
        self.log = self.dir / "envoy.log"
        admin_path = self.dir / "admin-address"
        self.cmd = [
            *wrapper, binary, "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
            "--admin-address-path", str(admin_path), "-l", "warning",
            "--log-path", str(self.log), "--file-flush-interval-msec", "100",
        ]
        # From the repository root, like a user running the configs by hand.
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, preexec_fn=_child_setup(cpu),
        )
        try:
            self.admin = self._wait_admin(admin_path, ready_timeout)
            self.listener = self._listener()
            self.worker_stat = self._worker_stat()
        except BaseException:
            self.stop()
            raise

    def _fail(self, what: str):
        tail = ""
        if self.log.exists():
            tail = "\n    ".join(self.log.read_text(errors="replace").splitlines()[-8:])
        raise BenchError(f"{self.scenario.name}: {what}\n    {tail}")

    def _wait_admin(self, admin_path: Path, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"Envoy exited with status {self.proc.returncode} at start-up")
            if STOPPING.is_set():
                self._fail("the run is stopping")
            if admin_path.exists() and admin_path.read_text().strip():
                address = admin_path.read_text().strip()
                try:
                    if self._get(f"http://{address}/ready", timeout=2).strip() == "LIVE":
                        return address
                except (OSError, urllib.error.URLError):
                    pass
            time.sleep(0.1)
        self._fail(f"Envoy not ready within {timeout:.0f} s")
        return ""

    @staticmethod
    def _get(url: str, timeout: float = 5, method: str = "GET", headers: Optional[dict] = None) -> str:
        request = urllib.request.Request(url, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()

    def _listener(self) -> str:
        listeners = json.loads(self._get(f"http://{self.admin}/listeners?format=json", timeout=self.timeout))
        for status in listeners.get("listener_statuses", []):
            address = status.get("local_address", {}).get("socket_address", {})
            if address.get("port_value"):
                return f"{address['address']}:{address['port_value']}"
        self._fail("no listener address in /listeners")
        return ""

    def _worker_stat(self) -> Optional[str]:
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                if (task / "comm").read_text().strip() == "wrk:worker_0":
                    return str(task / "stat")
            except OSError:
                continue
        return None

    def url(self) -> str:
        return f"http://{self.listener}/"

    def counters(self) -> dict:
        values = {}
        for line in self._get(f"http://{self.admin}/stats", timeout=self.timeout).splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.isdigit():
                values[name] = int(value)
        return values

    def cpu_ticks(self) -> tuple:
        """(process utime+stime, worker thread utime+stime), in clock ticks."""
        worker = clock_ticks(self.worker_stat) if self.worker_stat else 0
        return clock_ticks(f"/proc/{self.proc.pid}/stat"), worker

    def verify(self) -> list:
        """Sends one request with trace logging on and checks that it was answered by the direct
        response after passing each expected filter (and, for wasm filters, the module's
        on_request_headers). Returns the evidence lines."""
        if self.scenario.fleet_store:
            # A key's first request in a process waits for its lease (one round trip to the
            # store); the measured requests, like the probe, are served from the lease.
            self._get(self.url(), headers={BENCH_HEADER[0]: BENCH_HEADER[1]}, timeout=self.timeout)
        self._get(f"http://{self.admin}/logging?level=trace", timeout=self.timeout, method="POST")
        try:
            body = self._get(self.url(), timeout=self.timeout, headers={BENCH_HEADER[0]: BENCH_HEADER[1]})
        finally:
            self._get(f"http://{self.admin}/logging?level=warning", timeout=self.timeout, method="POST")
        if body != "ok":
            self._fail(f"probe request answered {body!r}, expected 'ok' (direct_response)")
        wanted = [f"decode headers called: filter={name} " for name in (*self.scenario.filters, ROUTER)]
        if self.scenario.module:
            wanted.append("proxy_on_request_headers return: 0")
        deadline = time.monotonic() + self.timeout
        while True:
            log = self.log.read_text(errors="replace")
            missing = [w for w in wanted if w not in log]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if missing:
            self._fail(f"the traced probe request did not show: {missing}")
        return [w.strip() for w in wanted]

    def stop(self):
        _stop(self.proc)


# ---------------------------------------------------------------------------------------------
# Load generators.


class Load:
    """Runs a bounded load against a URL from a pinned core; returns wrk's or h2load's count."""

    def __init__(self, client: str, connections: int, cpu: Optional[int]):
        self.client = client
        self.connections = connections
        self.cpu = cpu
        binary = shutil.which(client)
        if not binary:
            package = "wrk" if client == "wrk" else "nghttp2-client"
            raise BenchError(f"no {client}: `make setup` (or apt-get install {package})")
        self.binary = binary

    def command(self, url: str, seconds: int) -> list:
        header = f"{BENCH_HEADER[0]}: {BENCH_HEADER[1]}"
        if self.client == "wrk":
            return [self.binary, "-t1", f"-c{self.connections}", f"-d{seconds}s", "-H", header, url]
        return [self.binary, "--h1", "-t1", f"-c{self.connections}", "-D", str(seconds), "-H", header, url]

    def run(self, url: str, seconds: int) -> dict:
        cmd = self.command(url, seconds)
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, preexec_fn=_child_setup(self.cpu),
        )
        try:
            out, _ = proc.communicate(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError(f"{self.client} did not finish within {seconds + 20} s")
        finally:
            _stop(proc)
        if proc.returncode != 0:
            raise BenchError(f"{self.client} failed ({proc.returncode}): {out[-500:]}")
        return self.parse(out)

    def parse(self, out: str) -> dict:
        result = {"requests": None, "errors": 0}
        if self.client == "wrk":
            m = re.search(r"(\d+) requests in", out)
            result["requests"] = int(m.group(1)) if m else None
            m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            result["errors"] += int(m.group(1)) if m else 0
            m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
            result["errors"] += sum(int(g) for g in m.groups()) if m else 0
        else:
            m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
            if m:
                result["requests"] = int(m.group(3))
                result["errors"] = int(m.group(5)) + int(m.group(6))
        return result


# ---------------------------------------------------------------------------------------------
# Measurement.

HZ = os.sysconf("SC_CLK_TCK")


def core_ticks(cpu: int) -> tuple:
    """(busy, steal, total) clock ticks of one core from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in line.split()[1:9])
                busy = user + nice + system + irq + softirq
                return busy, steal, busy + idle + iowait + steal
    return 0, 0, 0


def measure(envoy: Envoy, load: Load, seconds: int, envoy_core: int) -> dict:
    """One measured window: admin reads outside the CPU window, so their cost is not counted."""
    before = envoy.counters()
    core0 = core_ticks(envoy_core)
    cpu0, worker0 = envoy.cpu_ticks()
    t0 = time.monotonic()
    client = load.run(envoy.url(), seconds)
    time.sleep(0.1)  # let Envoy finish closing the load's connections inside the window
    cpu1, worker1 = envoy.cpu_ticks()
    core1 = core_ticks(envoy_core)
    wall = time.monotonic() - t0
    after = envoy.counters()

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    completed = delta("http.ingress.downstream_rq_completed")
    ok = delta("http.ingress.downstream_rq_2xx")
    cpu_s = (cpu1 - cpu0) / HZ
    # How much of Envoy's core went to other processes (and to the hypervisor) in the window:
    # the machine's noise, which a reader needs to judge the figures.
    core_total = max(core1[2] - core0[2], 1)
    others_pct = max(core1[0] - core0[0] - (cpu1 - cpu0), 0) / core_total * 100
    steal_pct = (core1[1] - core0[1]) / core_total * 100
    worker_s = (worker1 - worker0) / HZ
    row = {
        "requests": completed,
        "responses_2xx": ok,
        "client_requests": client["requests"],
        "client_errors": client["errors"],
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu_s, 3),
        "worker_cpu_s": round(worker_s, 3),
        "cpu_us_per_req": cpu_s / completed * 1e6 if completed else None,
        "worker_us_per_req": worker_s / completed * 1e6 if completed else None,
        "rps": completed / wall if wall else None,
        "others_on_envoy_core_pct": round(others_pct, 1),
        "steal_on_envoy_core_pct": round(steal_pct, 1),
        "problems": [],
    }
    if completed == 0:
        row["problems"].append("no request completed")
    elif ok != completed:
        row["problems"].append(f"{completed - ok} of {completed} responses not 2xx")
    for suffix in envoy.scenario.per_request_counters:
        names = [n for n in after if n.endswith(suffix)]
        grown = sum(after[n] - before.get(n, 0) for n in names)
        row.setdefault("counters", {})[suffix] = grown
        if not names:
            row["problems"].append(f"counter *{suffix} not found in /stats")
        elif grown < completed:
            row["problems"].append(f"counter *{suffix} grew by {grown}, fewer than the {completed} requests")
    for suffix in envoy.scenario.quiet_counters + envoy.scenario.noted_counters:
        grown = sum(after[n] - before.get(n, 0) for n in after if n.endswith(suffix))
        row.setdefault("counters", {})[suffix] = grown
        if suffix in envoy.scenario.quiet_counters and grown:
            row["problems"].append(f"counter *{suffix} grew by {grown}: the window did not measure the path meant")
    return row


# ---------------------------------------------------------------------------------------------
# Instructions per request (--instructions): Envoy's worker thread under callgrind.
#
# CPU time on a shared 2-core machine moves by tens of percent from run to run; the number of
# instructions Envoy's worker thread executes per request does not. Each scenario's Envoy runs
# under `valgrind --tool=callgrind --separate-threads=yes` (one profile per thread), gets a
# warm-up on one keep-alive connection (V8 compiles the module in tiers, in the background),
# then per measured window: `callgrind_control -z` zeroes every thread's counters, N requests
# are sent one after the other on the same connection, `callgrind_control -d` dumps one file
# per thread, and the worker thread's `totals:` ÷ N is the figure. The worker is the thread
# that executed the most instructions in the window (the main thread only runs admin and stats
# timers, V8's helper threads are idle once tiered up); every thread's total is kept in the JSON.
# A second window after a longer warm-up shows that the figure no longer moves with it.


# Set when the run stops (Ctrl-C, SIGTERM, the bare scenario failed): the threads that drive
# Envoys under callgrind give up at their next request.
STOPPING = __import__("threading").Event()


def callgrind_tools() -> tuple:
    """(valgrind, callgrind_control, the version line), or BenchError naming what is missing."""
    valgrind = shutil.which("valgrind")
    control = shutil.which("callgrind_control")
    if not valgrind or not control:
        raise BenchError("--instructions needs valgrind and callgrind_control: `make setup` (or apt-get install valgrind)")
    version = subprocess.run([valgrind, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30).stdout.strip()
    return valgrind, control, version


class SequentialClient:
    """HTTP/1.1 requests one after the other on one keep-alive connection, each bounded by a
    timeout and the whole by a deadline: exactly the requests asked for, so a callgrind window
    holds exactly N request/response cycles (no connection set-up inside it)."""

    def __init__(self, listener: str, timeout: float):
        import http.client

        host, port = listener.rsplit(":", 1)
        self.http = http.client
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self.sent = 0

    def send(self, n: int, deadline: float, label: str, progress_every: int = 1000) -> int:
        """Sends n requests; returns how many were not answered 200 'ok'. BenchError when the
        connection fails or the deadline passes."""
        bad = 0
        t0 = time.monotonic()
        for i in range(1, n + 1):
            if time.monotonic() > deadline:
                raise BenchError(f"{label}: deadline passed after {i - 1} of {n} requests")
            if STOPPING.is_set():
                raise BenchError(f"{label}: the run is stopping")
            try:
                self.conn.request("GET", "/", headers={BENCH_HEADER[0]: BENCH_HEADER[1]})
                response = self.conn.getresponse()
                body = response.read()
            except (OSError, self.http.HTTPException) as e:
                raise BenchError(f"{label}: request {i} of {n} failed: {e!r}")
            self.sent += 1
            if response.status != 200 or body != b"ok":
                bad += 1
            if progress_every and i % progress_every == 0 and i < n:
                rate = i / max(time.monotonic() - t0, 1e-9)
                print(f"  {label}: {i}/{n} requests ({rate:.0f} req/s)", flush=True)
        return bad

    def close(self):
        self.conn.close()


def callgrind_control(control: str, pid: int, flag: str):
    proc = subprocess.run([control, flag, str(pid)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if proc.returncode != 0 or "OK" not in proc.stdout:
        raise BenchError(f"callgrind_control {flag} {pid} failed: {proc.stdout.strip()[-300:]}")


def read_dump(out_base: Path, part: int, timeout: float = 120) -> dict:
    """Thread number -> totals of dump `part` (files `<out_base>.<part>-<thread>`)."""
    deadline = time.monotonic() + timeout
    while True:
        totals = {}
        files = sorted(out_base.parent.glob(f"{out_base.name}.{part}-*"))
        for f in files:
            thread, total = None, None
            text = f.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("thread: "):
                    thread = int(line.split()[1])
                elif line.startswith("totals: "):
                    total = int(line.split()[1])
            if thread is not None and total is not None:
                totals[thread] = total
        if files and len(totals) == len(files):
            return totals
        if time.monotonic() > deadline:
            raise BenchError(f"no complete callgrind dump {out_base}.{part}-* within {timeout:.0f} s")
        time.sleep(0.5)


def count_instructions(p: "Planned", envoy_binary: str, tools: tuple, workdir: Path, args, live: dict) -> dict:
    """Runs one scenario under callgrind; returns its windows (one per warm-up length)."""
    valgrind, control, _ = tools
    name = p.scenario.name
    t0 = time.monotonic()
    deadline = t0 + args.ins_timeout
    out_base = workdir / "callgrind" / name / "callgrind.out"
    out_base.parent.mkdir(parents=True, exist_ok=True)
    # Instrumentation off until the first window (--instr-atstart=no): start-up and warm-up run
    # several times faster, and what they execute is not counted anyway.
    wrapper = (valgrind, "--tool=callgrind", "--separate-threads=yes", "--instr-atstart=no", f"--callgrind-out-file={out_base}")
    if STOPPING.is_set():
        raise BenchError("the run is stopping")
    print(f"[{name}] start under callgrind: {p.scenario.config}" + (f" with {p.module.name}" if p.module else ""), flush=True)
    envoy = Envoy(envoy_binary, p.scenario, p.config_text, workdir / "callgrind", None, wrapper=wrapper, ready_timeout=600)
    live[name] = envoy
    client = None
    try:
        evidence = envoy.verify()
        print(f"[{name}] ready and verified in {time.monotonic() - t0:.0f} s", flush=True)
        client = SequentialClient(envoy.listener, timeout=60)
        windows = []
        idle = None
        part = 0
        for warmup in args.ins_warmups:
            more = warmup - client.sent
            if more > 0:
                tw = time.monotonic()
                bad = client.send(more, deadline, f"{name} warm-up to {warmup}")
                print(f"[{name}] warm-up: {more} requests in {time.monotonic() - tw:.0f} s" + (f", {bad} not 200 ok" if bad else ""), flush=True)
            if idle is None and args.idle_seconds:
                # The worker also runs timers (Envoy's, and the filters' on_tick): instructions
                # per second of wall time, not per request. Measured once, without traffic, so
                # that each window's figure can be given without them (see bench/README.md).
                callgrind_control(control, envoy.proc.pid, "--instr=on")
                callgrind_control(control, envoy.proc.pid, "-z")
                ti = time.monotonic()
                time.sleep(args.idle_seconds)
                callgrind_control(control, envoy.proc.pid, "-d")
                callgrind_control(control, envoy.proc.pid, "--instr=off")
                idle_wall = time.monotonic() - ti
                part += 1
                idle = {"wall_s": round(idle_wall, 2), "threads": read_dump(out_base, part)}
            before = envoy.counters()
            callgrind_control(control, envoy.proc.pid, "--instr=on")
            callgrind_control(control, envoy.proc.pid, "-z")
            tw = time.monotonic()
            bad = client.send(args.ins_requests, deadline, f"{name} window after {warmup}")
            wall = time.monotonic() - tw
            callgrind_control(control, envoy.proc.pid, "-d")
            callgrind_control(control, envoy.proc.pid, "--instr=off")
            after = envoy.counters()
            part += 1
            threads = read_dump(out_base, part)
            worker = max(threads, key=lambda t: threads[t])
            idle_rate = idle["threads"].get(worker, 0) / idle["wall_s"] if idle else 0.0
            problems = []
            if bad:
                problems.append(f"{bad} of {args.ins_requests} responses not 200 ok")
            completed = after.get("http.ingress.downstream_rq_completed", 0) - before.get("http.ingress.downstream_rq_completed", 0)
            if completed != args.ins_requests:
                problems.append(f"Envoy completed {completed} requests in the window, {args.ins_requests} sent")
            counters = {}
            for suffix in p.scenario.per_request_counters:
                names = [n for n in after if n.endswith(suffix)]
                grown = sum(after[n] - before.get(n, 0) for n in names)
                counters[suffix] = grown
                if not names:
                    problems.append(f"counter *{suffix} not found in /stats")
                elif grown < args.ins_requests:
                    problems.append(f"counter *{suffix} grew by {grown}, fewer than the {args.ins_requests} requests")
            for suffix in p.scenario.quiet_counters:
                names = [n for n in after if n.endswith(suffix)]
                grown = sum(after[n] - before.get(n, 0) for n in names)
                counters[suffix] = grown
                if not names:
                    problems.append(f"counter *{suffix} not found in /stats")
                elif grown:
                    problems.append(f"counter *{suffix} grew by {grown}: the window did not measure the path meant")
            for suffix in p.scenario.noted_counters:
                counters[suffix] = sum(after[n] - before.get(n, 0) for n in after if n.endswith(suffix))
            row = {
                "warmup_requests": warmup,
                "requests": args.ins_requests,
                "wall_s": round(wall, 1),
                "worker_thread": worker,
                "worker_instructions": threads[worker],
                "raw_instructions_per_request": threads[worker] / args.ins_requests,
                "idle_instructions_per_s": round(idle_rate),
                # Without the timers' share over the window's wall time.
                "instructions_per_request": (threads[worker] - idle_rate * wall) / args.ins_requests,
                "threads": {str(t): v for t, v in sorted(threads.items())},
                "counters": counters,
                "problems": problems,
            }
            windows.append(row)
            if args.dumps and len(windows) == 1:
                # The worker thread's profile of the first window, for callgrind_annotate.
                args.dumps.mkdir(parents=True, exist_ok=True)
                shutil.copy(f"{out_base}.{part}-{worker:02d}", args.dumps / f"{name}.callgrind.out")
            print(
                f"[{name}] after {warmup} warm-up requests: {row['instructions_per_request'] / 1000:.2f} k instructions/request"
                f" (raw {row['raw_instructions_per_request'] / 1000:.2f} k; thread {worker}, {args.ins_requests} requests in {wall:.0f} s,"
                f" idle {idle_rate / 1000:.1f} k/s)" + ("  ⚠ " + "; ".join(problems) if problems else ""),
                flush=True,
            )
        return {"windows": windows, "idle": idle, "verified": evidence, "elapsed_s": round(time.monotonic() - t0, 1)}
    finally:
        if client is not None:
            client.close()
        # The figures are in the dumps already: no need to wait for valgrind's exit dump.
        envoy.proc.kill()
        try:
            envoy.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        live.pop(name, None)


def run_instructions(planned: list, envoy_binary: str, workdir: Path, args) -> tuple:
    """Every planned scenario under callgrind, `args.jobs` at a time. Returns (results by
    scenario, notes)."""
    import concurrent.futures

    tools = callgrind_tools()
    per_scenario = 30 + args.idle_seconds + max(args.ins_warmups) * 0.004 + len(args.ins_warmups) * args.ins_requests * 0.004
    budget = len(planned) * per_scenario / args.jobs
    print(
        f"instructions: {len(planned)} scenarios under callgrind, {args.jobs} at a time; windows of {args.ins_requests} requests"
        f" after {' and '.join(str(w) for w in args.ins_warmups)} warm-up requests; budget about {budget / 60:.0f} min"
        f" (~{per_scenario:.0f} s a scenario: ~30 s start, ~4 ms a request), each scenario bounded by {args.ins_timeout} s",
        flush=True,
    )
    results, notes, live = {}, [], {}
    t0 = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = {pool.submit(count_instructions, p, envoy_binary, tools, workdir, args, live): p.scenario.name for p in planned}
        pending, done = set(futures), 0
        while pending:
            # A bounded wait, so that Ctrl-C and SIGTERM are handled within seconds.
            finished, pending = concurrent.futures.wait(pending, timeout=2, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                done += 1
                name = futures[future]
                try:
                    results[name] = future.result()
                except BenchError as e:
                    if name == "bare":
                        raise
                    print(f"[{name}] skipped: {e}", flush=True)
                    notes.append(f"instructions: skipped `{name}`: {str(e).splitlines()[0]}")
                elapsed = time.monotonic() - t0
                left = (len(planned) - done) * elapsed / done
                print(f"instructions: {done}/{len(planned)} scenarios in {elapsed / 60:.1f} min, about {left / 60:.1f} min left", flush=True)
    finally:
        STOPPING.set()
        pool.shutdown(wait=False, cancel_futures=True)
        # Until every worker thread has returned, kill whatever Envoy one of them started.
        while any(t.is_alive() for t in list(pool._threads)):
            for envoy in list(live.values()):
                envoy.proc.kill()
            time.sleep(0.2)
        STOPPING.clear()
    return results, notes, tools[2], time.monotonic() - t0


def summarize_instructions(planned: list, results: dict) -> dict:
    """Per scenario: instructions per request (first window), over bare, ratios."""
    def figure(name):
        r = results.get(name)
        return r["windows"][0]["instructions_per_request"] if r else None

    bare = figure("bare")
    summary = {}
    for p in planned:
        s = p.scenario
        if s.name not in results:
            continue
        windows = results[s.name]["windows"]
        value = figure(s.name)
        over = value - bare if bare is not None else None
        base_name = s.compare_with
        if p.variant_of:
            base_name = next((q.scenario.compare_with for q in planned if q.scenario.name == p.variant_of), None)
        base = figure(base_name) if base_name else None
        floor = figure(s.floor) if s.floor else None
        flat = None
        if len(windows) > 1:
            flat = (windows[-1]["instructions_per_request"] - value) / value * 100
        summary[s.name] = {
            "description": s.description,
            "instructions_per_request": value,
            "over_bare": over,
            "compare_with": base_name,
            "ratio": over / (base - bare) if over is not None and base is not None and base > bare else None,
            "floor": s.floor,
            "floor_over_bare": floor - bare if floor is not None and bare is not None else None,
            "ratio_to_floor": over / (floor - bare) if over is not None and floor is not None and floor > bare else None,
            "windows": [(w["warmup_requests"], w["instructions_per_request"]) for w in windows],
            "flat_pct": flat,
            "raw_instructions_per_request": windows[0]["raw_instructions_per_request"],
            "idle_instructions_per_s": windows[0]["idle_instructions_per_s"],
            "problems": sorted({m for w in windows for m in w["problems"]}),
            "noted": {suffix: windows[0]["counters"].get(suffix, 0) for suffix in s.noted_counters},
            "window_wall_s": windows[0]["wall_s"],
        }
    return summary


def write_instructions(args, meta: dict, planned: list, results: dict, notes: list, seconds: float) -> dict:
    """bench-results/instructions.{md,json}; returns the summary."""
    meta = dict(meta, ins_requests=args.ins_requests, ins_warmups=args.ins_warmups, jobs=args.jobs, ins_elapsed_min=seconds / 60)
    summary = summarize_instructions(planned, results)
    previous = None
    if args.compare_with:
        meta["compare_with"] = display(args.compare_with.resolve())
        previous = json.loads(args.compare_with.read_text()).get("summary", {})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instructions.json").write_text(json.dumps({"meta": meta, "notes": notes, "summary": summary, "scenarios": results}, indent=2, ensure_ascii=False) + "\n")
    report = instructions_markdown(meta, summary, notes, previous)
    (args.out / "instructions.md").write_text(report)
    print()
    print(report)
    print(f"wrote {args.out / 'instructions.md'} and {args.out / 'instructions.json'}", flush=True)
    return summary


def instructions_markdown(meta: dict, summary: dict, notes: list, previous: Optional[dict]) -> str:
    warmups = meta["ins_warmups"]
    lines = [
        "# Envoy instructions per request (callgrind)",
        "",
        "Instructions executed by Envoy's worker thread per request, counted by callgrind: Envoy",
        "`--concurrency 1`, every route answered by `direct_response`, HTTP/1.1 keep-alive, one request",
        f"at a time; counters zeroed (`callgrind_control -z`) after {warmups[0]:,} warm-up requests, {meta['ins_requests']:,}",
        "requests sent, counters dumped (`callgrind_control -d`); figure = (the worker thread's `totals:` − its",
        "timers' instructions/s, measured in an idle window, × the window's seconds) ÷ requests; `raw` keeps the timers.",
        "Deterministic to a small fraction of a percent, whatever the machine's load; see bench/README.md.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; {meta['valgrind']} (`valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no`, instrumented only in the windows); Envoy {meta['machine']['envoy_version']}; tree {meta['machine']['git']}",
        f"- {meta['machine']['nproc']} CPUs ({meta['machine']['cpu_model']}), Linux {meta['machine']['kernel']}; {meta['jobs']} scenario(s) at a time; {meta['ins_elapsed_min']:.1f} min",
        "",
        "`over bare` = instructions(X) − instructions(bare). `ratio` = over bare(X) ÷ over bare(baseline).",
        "`floor` = the ABI probe making only the host calls the filter makes, no logic;",
        "`÷ floor` = over bare(X) ÷ over bare(its floor).",
        "",
    ]
    flat_header = f" | after {warmups[-1]:,} warm-up | change" if len(warmups) > 1 else ""
    prev_header = " | previous run | difference" if previous else ""
    lines.append("| scenario | instructions/request | over bare | ratio | floor | floor over bare | ÷ floor" + flat_header + prev_header + " | raw (with timers) | timers, instructions/s | checks |")
    lines.append("|---|---:|---:|---:|---|---:|---:|" + ("---:|---:|" if len(warmups) > 1 else "") + ("---:|---:|" if previous else "") + "---:|---:|---|")

    def k(v):
        return "n/a" if v is None else f"{v / 1000:.1f} k"

    for name, s in summary.items():
        ratio = f"{s['ratio']:.2f}× {s['compare_with']}" if s["ratio"] is not None else "—"
        over = "—" if name == "bare" else (("+" if s["over_bare"] >= 0 else "") + k(s["over_bare"]) if s["over_bare"] is not None else "n/a")
        row = f"| `{name}` | {s['instructions_per_request']:,.0f} | {over} | {ratio} | {('`' + s['floor'] + '`') if s['floor'] else '—'} | {k(s['floor_over_bare']) if s['floor'] else '—'} | {fmt(s['ratio_to_floor'], 2, '×') if s['floor'] else '—'}"
        if len(warmups) > 1:
            row += f" | {s['windows'][-1][1]:,.0f} | {s['flat_pct']:+.2f} %"
        if previous:
            old = previous.get(name, {}).get("instructions_per_request")
            row += f" | {old:,.0f} | {(s['instructions_per_request'] - old) / old * 100:+.3f} %" if old else " | — | —"
        row += f" | {s['raw_instructions_per_request']:,.0f} | {s['idle_instructions_per_s']:,}"
        wall = s.get("window_wall_s") or 0
        noted = "".join(
            f" ({suffix.rsplit('.', 1)[-1]} +{n:,} in the first window"
            + (f", {n / wall:.1f}/s at {meta['ins_requests'] / wall:.0f} requests/s" if wall else "") + ")"
            for suffix, n in s.get("noted", {}).items()
        )
        row += " | " + ("⚠ " + "; ".join(s["problems"]) if s["problems"] else "ok") + noted + " |"
        lines.append(row)
    if previous:
        diffs = [abs(s["instructions_per_request"] - previous[n]["instructions_per_request"]) / previous[n]["instructions_per_request"] * 100
                 for n, s in summary.items() if previous.get(n, {}).get("instructions_per_request")]
        if diffs:
            lines += ["", f"Against the previous run (`{meta['compare_with']}`): largest difference {max(diffs):.3f} % over {len(diffs)} scenarios."]
    if len(warmups) > 1:
        changes = [abs(s["flat_pct"]) for s in summary.values() if s["flat_pct"] is not None]
        if changes:
            lines += ["", f"Warm-up: between {warmups[0]:,} and {warmups[-1]:,} warm-up requests the figure moved by at most {max(changes):.2f} % (largest over all scenarios)."]
    lines += ["", "## Checks", ""]
    lines.append(f"- Every window: {meta['ins_requests']:,} requests answered 200 `ok` and Envoy's `downstream_rq_completed` grew by exactly that many, unless marked ⚠ above;"
                 " the per-request counters of the scenario (as in the CPU bench) grew by at least one per request.")
    lines.append("- Each Envoy passed the traced probe request of the CPU bench (every filter of the scenario ran before the router).")
    for note in notes:
        lines.append(f"- {note}")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Scenarios as run: the table, minus what is missing, plus the wasm-opt variants.


@dataclasses.dataclass
class Planned:
    scenario: Scenario
    config_text: str
    module: Optional[Path]  # the module file this instance loads
    variant_of: Optional[str] = None  # for a wasm-opt variant: the scenario it copies
    module_bytes: Optional[int] = None
    module_sha256: Optional[str] = None

    def __post_init__(self):
        # Read now: a wasm-opt variant lives in a temporary folder gone by report time.
        if self.module is not None:
            data = self.module.read_bytes()
            self.module_bytes = len(data)
            self.module_sha256 = hashlib.sha256(data).hexdigest()[:16]


FLEET_REDIS, FLEET_WEBDIS = 16379, 17379


def start_fleet_store(workdir: Path) -> list:
    """redis-server and webdis for the fleet-wide scenarios, on the load generator's side."""
    redis, webdis = shutil.which("redis-server"), shutil.which("webdis")
    if not (redis and webdis):
        raise BenchError("redis-server or webdis not installed (`make setup` installs them)")
    (workdir / "webdis.json").write_text(json.dumps({
        "redis_host": "127.0.0.1", "redis_port": FLEET_REDIS, "http_host": "127.0.0.1",
        "http_port": FLEET_WEBDIS, "daemonize": False, "threads": 1,
        "acl": [{"disabled": ["DEBUG", "FLUSHALL", "FLUSHDB", "CONFIG", "SHUTDOWN"]}],
    }))
    children = []
    for args, port in (
        ([redis, "--port", str(FLEET_REDIS), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], FLEET_REDIS),
        ([webdis, str(workdir / "webdis.json")], FLEET_WEBDIS),
    ):
        children.append(subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                for child in children:
                    _stop(child)
                raise BenchError(f"{args[0]} did not listen on {port}")
            time.sleep(0.05)
    return children


def local_ports(text: str, config: str) -> str:
    """The configs listen on 10000 and serve admin on 9901 (handy by hand); the bench asks the
    OS for free ports instead and reads them back from admin."""
    for port in ("9901", "10000"):
        text, count = re.subn(rf"port_value: {port}\b", "port_value: 0", text)
        if count != 1:
            raise BenchError(f"{config}: expected exactly one `port_value: {port}`, found {count}")
    return text


def wasm_opt(module: Path, out: Path) -> Optional[str]:
    """`wasm-opt -Oz` of module into out; None when done, else why not."""
    binary = shutil.which("wasm-opt")
    if not binary:
        return "no wasm-opt (apt-get install binaryen)"
    proc = subprocess.run(
        [binary, "-Oz", *WASM_OPT_FEATURES, str(module), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    if proc.returncode != 0:
        return f"wasm-opt failed: {proc.stdout[-300:]}"
    return None


def with_module(text: str, scenario: Scenario, module: Path, dist: Optional[Path] = None) -> str:
    """The config text loading `module` (an absolute path) where it names `scenario.module`
    (once, or for every plugin of a module loaded several times), and the scenario's other
    modules from `dist`."""
    named = f"filename: {scenario.module}"
    if text.count(named) < 1:
        raise BenchError(f"{scenario.config}: expected `{named}`")
    text = text.replace(named, f"filename: {module}")
    for extra in scenario.extra_modules:
        named = f"filename: {extra}"
        if text.count(named) < 1 or dist is None:
            raise BenchError(f"{scenario.config}: expected `{named}`")
        text = text.replace(named, f"filename: {dist / Path(extra).name}")
    return text


def plan(selected: list, dist: Path, workdir: Path, with_wasm_opt: bool, notes: list) -> list:
    planned = []
    for scenario in selected:
        text = local_ports((CONFIG_DIR / scenario.config).read_text(), scenario.config)
        for placeholder, value in scenario.substitutions:
            text = text.replace(placeholder, value)
        if scenario.module is None:
            planned.append(Planned(scenario, text, None))
            continue
        module = dist / Path(scenario.module).name
        missing = [m for m in (module, *(dist / Path(e).name for e in scenario.extra_modules)) if not m.exists()]
        if missing:
            why = f"{', '.join(display(m) for m in missing)} missing (run `make build`)"
            notes.append(f"skipped `{scenario.name}`: {why}")
            print(f"skip {scenario.name}: {why}", flush=True)
            continue
        planned.append(Planned(scenario, with_module(text, scenario, module, dist), module))
        if scenario.wasm_opt and with_wasm_opt:
            out = workdir / f"{module.stem}.oz.wasm"
            why_not = wasm_opt(module, out)
            if why_not:
                notes.append(f"no -Oz variant of `{scenario.name}`: {why_not}")
                print(f"skip {scenario.name}+oz: {why_not}", flush=True)
                continue
            variant = dataclasses.replace(
                scenario,
                name=f"{scenario.name}+oz",
                description=f"{scenario.name} with its module through `wasm-opt -Oz`",
                target=None,
                wasm_opt=False,
            )
            planned.append(Planned(variant, with_module(text, scenario, out), out, scenario.name))
    return planned


def display(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ---------------------------------------------------------------------------------------------
# Report.


def machine_facts(envoy_binary: str, load: Load) -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = subprocess.run([envoy_binary, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30).stdout
    m = re.search(r"version: \S+/(\d+\.\d+\.\d+)/", version)
    client = subprocess.run([load.binary, "--version" if load.client == "h2load" else "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30).stdout
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "envoy_version": m.group(1) if m else version.strip()[:120],
        "load_client": client.splitlines()[0].split(" Copyright")[0].strip() if client else load.client,
        "git": commit or "unknown",
        "clock_ticks_per_s": HZ,
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def fmt(value, digits=1, suffix="") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def summarize(planned: list, rounds: list) -> dict:
    """Medians, spreads, overheads and ratios per scenario."""
    names = [p.scenario.name for p in planned]
    per = {name: [r[name] for r in rounds if name in r] for name in names}

    def median_of(name, key):
        values = [row[key] for row in per.get(name, []) if row[key] is not None]
        return statistics.median(values) if values else None

    med = {name: median_of(name, "cpu_us_per_req") for name in names}
    bare = med.get("bare")
    summary = {}
    for p in planned:
        s = p.scenario
        values = [row["cpu_us_per_req"] for row in per[s.name] if row["cpu_us_per_req"] is not None]
        overhead = med[s.name] - bare if med[s.name] is not None and bare is not None else None
        base_name = s.compare_with
        if p.variant_of:
            base_name = next((q.scenario.compare_with for q in planned if q.scenario.name == p.variant_of), None)
        base_over = med.get(base_name) - bare if base_name and med.get(base_name) is not None and bare is not None else None
        # A baseline whose overhead is not above bare Envoy's (noise) gives no meaningful ratio.
        ratio = overhead / base_over if overhead is not None and base_over is not None and base_over > 0 else None
        # The same ratio within each round (the scenarios of a round ran seconds apart): its range
        # shows how much the ratio itself moves with the machine's noise.
        round_ratios = []
        for r in rounds:
            if base_name and all(n in r and r[n]["cpu_us_per_req"] for n in (s.name, base_name, "bare")):
                b = r["bare"]["cpu_us_per_req"]
                den = r[base_name]["cpu_us_per_req"] - b
                if den > 0:
                    round_ratios.append((r[s.name]["cpu_us_per_req"] - b) / den)
        verdict = None
        if s.target is not None and ratio is not None:
            verdict = "PASS" if ratio <= s.target else "FAIL"
        summary[s.name] = {
            "description": s.description,
            "module": (display(p.module) if not p.variant_of else p.module.name) if p.module else None,
            "module_bytes": p.module_bytes,
            "module_sha256": p.module_sha256,
            "rounds": len(values),
            "cpu_us_per_req_median": med[s.name],
            "cpu_us_per_req_min": min(values) if values else None,
            "cpu_us_per_req_max": max(values) if values else None,
            "spread_pct": (max(values) - min(values)) / med[s.name] * 100 if values and med[s.name] else None,
            "worker_us_per_req_median": median_of(s.name, "worker_us_per_req"),
            "rps_median": median_of(s.name, "rps"),
            "others_on_envoy_core_pct_median": median_of(s.name, "others_on_envoy_core_pct"),
            "overhead_us": overhead,
            "compare_with": base_name,
            "ratio": ratio,
            "round_ratio_median": statistics.median(round_ratios) if round_ratios else None,
            "round_ratio_min": min(round_ratios) if round_ratios else None,
            "round_ratio_max": max(round_ratios) if round_ratios else None,
            "target": s.target,
            "verdict": verdict,
            "variant_of": p.variant_of,
            "per_request_counters": list(s.per_request_counters),
            "problems": sorted({msg for row in per[s.name] for msg in row["problems"]}),
        }
    return summary


def instruction_cells(s: Optional[dict]) -> str:
    """The instruction columns of the CPU table for one scenario (see --instructions)."""
    if not s:
        return " n/a | n/a | n/a |"
    over = "—" if s["over_bare"] is None or s["compare_with"] is None and s["over_bare"] == 0 else f"{s['over_bare'] / 1000:+.1f} k"
    ratio = f"{s['ratio']:.2f}× {s['compare_with']}" if s["ratio"] is not None else "—"
    return f" {s['instructions_per_request'] / 1000:.1f} k | {over} | {ratio} |"


# Above this share of Envoy's core taken by other processes, the report warns that the figures
# are unreliable (seen here: with compilers running, per-round figures move by 20-80 %).
BUSY_WARN_PCT = 10.0


def markdown(meta: dict, summary: dict, notes: list, instructions: Optional[dict] = None) -> str:
    m = meta["machine"]
    lines = [
        "# Envoy overhead benchmark",
        "",
        "Envoy CPU time per request (utime+stime of the Envoy process / requests it completed),",
        "`--concurrency 1` pinned to one core, the load generator on the other, every route answered",
        "by `direct_response`. Overhead = median(X) − median(bare); ratio = overhead(X) /",
        "overhead(baseline). Only the ratios of one run compare; see bench/README.md.",
        "",
    ]
    if meta["quick"]:
        lines += ["**Quick mode (smoke run): too short to judge a ratio.**", ""]
    busy = meta.get("others_on_envoy_core_pct_median")
    if busy is not None and busy > BUSY_WARN_PCT:
        lines += [
            f"**⚠ The machine was busy: other processes took a median {busy:.0f} % of Envoy's core during"
            " the measured windows. The figures below are unreliable; rerun when the machine is quieter,"
            " with more rounds, or with `--realtime` (see bench/README.md).**",
            "",
        ]
    lines += [
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}; load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end;"
        f" other processes took a median {fmt(busy, 0, ' %')} of Envoy's core in the windows (steal {fmt(meta.get('steal_on_envoy_core_pct_median'), 1, ' %')})",
        f"- Envoy {m['envoy_version']} on core {meta['envoy_cpu']}; {m['load_client']} on core {meta['load_cpu']}, {meta['connections']} connections; tree {m['git']}",
        f"- {meta['rounds']} interleaved rounds × {meta['seconds']} s per scenario after {meta['warmup']} s warm-up; clock ticks {m['clock_ticks_per_s']}/s"
        + ("; Envoy and the load generator ran as SCHED_FIFO tasks (`--realtime`)" if meta["realtime"] else ""),
        "",
        "| scenario | CPU µs/req (median) | min–max over rounds (spread) | overhead over bare, µs | ratio | ratio within rounds: median (min–max) | target | result |"
        + (" instructions/request (callgrind) | instructions over bare | instructions ratio |" if instructions else ""),
        "|---|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|---:|" if instructions else ""),
    ]
    for name, s in summary.items():
        ratio = "—"
        if s["ratio"] is not None:
            ratio = f"{s['ratio']:.2f}× {s['compare_with']}"
        elif s["compare_with"] and s["compare_with"] in summary and summary[s["compare_with"]]["overhead_us"] is not None:
            ratio = f"n/a ({s['compare_with']} not above bare in this run)"
        elif s["compare_with"]:
            ratio = f"n/a ({s['compare_with']} not measured)"
        in_rounds = "—"
        if s["round_ratio_min"] is not None:
            in_rounds = f"{s['round_ratio_median']:.2f} ({s['round_ratio_min']:.2f}–{s['round_ratio_max']:.2f})"
        result = s["verdict"] or ("n/a" if s["target"] is not None else "—")
        if s["verdict"] and s["round_ratio_min"] is not None and s["round_ratio_min"] <= s["target"] < s["round_ratio_max"]:
            result += " (rounds straddle the target)"
        if s["problems"]:
            result += " ⚠ " + "; ".join(s["problems"])
        lines.append(
            f"| `{name}` | {fmt(s['cpu_us_per_req_median'])} | {fmt(s['cpu_us_per_req_min'])}–{fmt(s['cpu_us_per_req_max'])} ({fmt(s['spread_pct'], 0, ' %')})"
            f" | {fmt(s['overhead_us'], 1) if name != 'bare' else '—'} | {ratio} | {in_rounds}"
            f" | {'≤ %.2f×' % s['target'] if s['target'] is not None else '—'} | {result} |"
            + (instruction_cells(instructions.get(name)) if instructions else "")
        )
    lines += [
        "",
        "| scenario | description | worker thread µs/req | req/s | others on Envoy's core |",
        "|---|---|---:|---:|---:|",
    ]
    for name, s in summary.items():
        description = s["description"] + (f" (`{s['module']}`, {s['module_bytes']} bytes)" if s["module"] else "")
        lines.append(
            f"| `{name}` | {description} | {fmt(s['worker_us_per_req_median'])} | {fmt(s['rps_median'], 0)}"
            f" | {fmt(s['others_on_envoy_core_pct_median'], 0, ' %')} |"
        )
    variants = [(n, s) for n, s in summary.items() if s["variant_of"]]
    if variants:
        lines += [
            "",
            "## `wasm-opt -Oz` (binaryen)",
            "",
            "| module | bytes | -Oz bytes | CPU µs/req | -Oz CPU µs/req | overhead over bare, µs | -Oz overhead, µs |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, v in variants:
            o = summary[v["variant_of"]]
            lines.append(
                f"| `{o['module']}` | {o['module_bytes']} | {v['module_bytes']} | {fmt(o['cpu_us_per_req_median'])} | {fmt(v['cpu_us_per_req_median'])}"
                f" | {fmt(o['overhead_us'])} | {fmt(v['overhead_us'])} |"
            )
    lines += ["", "## Checks", ""]
    for name, evidence in meta["verified"].items():
        lines.append(f"- `{name}`: a traced request passed " + ", ".join(f"`{e}`" for e in evidence))
    for name, s in summary.items():
        for suffix in s["per_request_counters"]:
            if s["problems"]:
                lines.append(f"- `{name}`: counter `*{suffix}`: see ⚠ above")
            else:
                lines.append(f"- `{name}`: counter `*{suffix}` grew by at least one per completed request in every window")
    for note in notes:
        lines.append(f"- {note}")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main.


def parse_args(argv):
    env_rounds = os.environ.get("KEEL_BENCH_ROUNDS", "")
    env_seconds = os.environ.get("KEEL_BENCH_SECONDS", "")
    if not all(v.isdigit() for v in (env_rounds, env_seconds) if v):
        raise BenchError("KEEL_BENCH_ROUNDS and KEEL_BENCH_SECONDS must be whole numbers")
    p = argparse.ArgumentParser(
        description="Keel's Envoy overhead benchmark: Envoy CPU per request, as ratios against bare Envoy and an empty wasm filter measured in the same run.",
    )
    p.add_argument("--rounds", type=int, default=int(env_rounds) if env_rounds else None, help="interleaved rounds (default 3, env KEEL_BENCH_ROUNDS)")
    p.add_argument("--seconds", type=int, default=int(env_seconds) if env_seconds else None, help="seconds per measured window (default 5, env KEEL_BENCH_SECONDS)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of warm-up load per Envoy before the rounds (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 s, 1 s warm-up")
    p.add_argument("--scenarios", help="comma-separated subset (bare and the baselines are added); default: all")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--no-wasm-opt", action="store_true", help="skip the `wasm-opt -Oz` variants")
    p.add_argument("--client", choices=("wrk", "h2load"), default="wrk", help="load generator (HTTP/1.1 either way; default wrk)")
    p.add_argument("--connections", type=int, default=32, help="load connections (default 32)")
    p.add_argument("--envoy-cpu", type=int, default=0, help="core Envoy is pinned to (default 0)")
    p.add_argument("--load-cpu", type=int, default=1, help="core the load generator is pinned to (default 1)")
    p.add_argument("--realtime", action="store_true", help="run Envoy and the load generator as SCHED_FIFO tasks (root): other work on the machine barely runs during the windows")
    p.add_argument("--instructions", action="store_true", help="after the CPU rounds, count instructions per request under callgrind (bench-results/instructions.md)")
    p.add_argument("--instructions-only", action="store_true", help="only the callgrind pass, no CPU rounds")
    p.add_argument("--requests", dest="ins_requests", type=int, default=2000, help="--instructions: requests per measured window (default 2000)")
    p.add_argument("--warmups", dest="ins_warmups", default="4000,8000", help="--instructions: warm-up lengths in requests, one window after each (default 4000,8000)")
    p.add_argument("--idle-seconds", type=int, default=5, help="--instructions: seconds of an idle window that measures the worker's timers (default 5; 0: none)")
    p.add_argument("--jobs", type=int, default=2, help="--instructions: scenarios under callgrind at a time (default 2)")
    p.add_argument("--scenario-timeout", dest="ins_timeout", type=int, default=900, help="--instructions: seconds one scenario may take (default 900)")
    p.add_argument("--rewrite-report", action="store_true", help="--instructions: only rewrite <out>/instructions.md from <out>/instructions.json (e.g. with --compare-with a run that ended later)")
    p.add_argument("--dumps", type=Path, help="--instructions: copy each scenario's worker-thread profile (first window) into this folder, for callgrind_annotate")
    p.add_argument("--compare-with", type=Path, help="--instructions: a previous instructions.json; the report shows the difference per scenario")
    p.add_argument("--dist", type=Path, default=ROOT / "dist", help="folder of the .wasm modules (default dist/)")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results", help="results folder (default bench-results/)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.seconds = args.seconds or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.rounds < 1 or args.seconds < 1 or args.warmup < 0:
        p.error("--rounds and --seconds must be at least 1, --warmup at least 0")
    try:
        args.ins_warmups = sorted({int(w) for w in args.ins_warmups.split(",") if w.strip()})
    except ValueError:
        p.error(f"--warmups: expected comma-separated numbers of requests, got {args.ins_warmups!r}")
    if not args.ins_warmups or args.ins_warmups[0] < 0 or args.ins_requests < 1 or args.jobs < 1:
        p.error("--warmups needs at least one length (>= 0), --requests and --jobs at least 1")
    args.instructions = args.instructions or args.instructions_only
    return args


def select(names: Optional[str]) -> list:
    if not names:
        return list(SCENARIOS)
    by_name = {s.name: s for s in SCENARIOS}
    wanted = {"bare"}
    for name in names.split(","):
        name = name.strip()
        if name not in by_name:
            raise BenchError(f"unknown scenario {name!r}; known: {', '.join(by_name)}")
        wanted.add(name)
        for base in (by_name[name].compare_with, by_name[name].floor):
            if base and base in by_name:
                wanted.add(base)
    return [s for s in SCENARIOS if s.name in wanted]


def run(args) -> int:
    global REALTIME
    REALTIME = args.realtime
    if REALTIME:
        try:
            subprocess.run(["true"], preexec_fn=_child_setup(None), check=True)
        except (subprocess.SubprocessError, OSError) as e:
            raise BenchError(f"--realtime: cannot make a SCHED_FIFO task here (needs root): {e}")
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:28} {s.config:32} {s.description}")
        return 0
    if args.rewrite_report:
        saved = json.loads((args.out / "instructions.json").read_text())
        previous = None
        if args.compare_with:
            saved["meta"]["compare_with"] = display(args.compare_with.resolve())
            previous = json.loads(args.compare_with.read_text()).get("summary", {})
        report = instructions_markdown(saved["meta"], saved["summary"], saved["notes"], previous)
        (args.out / "instructions.md").write_text(report)
        print(report)
        return 0
    envoy_binary = find_envoy()
    load = Load(args.client, args.connections, args.load_cpu)
    cores = sorted(os.sched_getaffinity(0))
    if args.envoy_cpu not in cores or args.load_cpu not in cores or args.envoy_cpu == args.load_cpu:
        raise BenchError(f"need two distinct usable cores for --envoy-cpu/--load-cpu; usable: {cores}")
    # The script itself (admin reads, parsing) stays off Envoy's core.
    os.sched_setaffinity(0, {args.load_cpu})
    command = "python3 bench/envoy_bench.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    for var in ("KEEL_BENCH_SECONDS", "KEEL_BENCH_ROUNDS", "KEEL_ENVOY"):
        if os.environ.get(var):
            command = f"{var}={shlex.quote(os.environ[var])} {command}"
    meta = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "connections": args.connections,
        "envoy": envoy_binary,
        "envoy_cpu": args.envoy_cpu,
        "load_cpu": args.load_cpu,
        "realtime": args.realtime,
        "machine": machine_facts(envoy_binary, load),
        "loadavg_start": loadavg(),
        "verified": {},
    }
    notes = []
    envoys = {}
    with tempfile.TemporaryDirectory(prefix="keel-envoy-bench-") as tmp:
        workdir = Path(tmp)
        planned = plan(select(args.scenarios), args.dist.resolve(), workdir, not args.no_wasm_opt, notes)
        names = [p.scenario.name for p in planned]
        rounds = []
        ins_summary = None
        planned_cpu = []
        store = []
        try:
            if any(p.scenario.fleet_store for p in planned):
                try:
                    store = start_fleet_store(workdir)
                    print(f"fleet store: redis-server on {FLEET_REDIS}, webdis on {FLEET_WEBDIS}", flush=True)
                except BenchError as e:
                    notes.append(f"skipped the fleet-wide scenarios: {e}")
                    planned = [p for p in planned if not p.scenario.fleet_store]
            if args.instructions:
                # Under callgrind each Envoy runs on any core (the CPU rounds pin this script to one).
                os.sched_setaffinity(0, cores)
                ins_results, ins_notes, meta["valgrind"], ins_seconds = run_instructions(planned, envoy_binary, workdir, args)
                # Written now: the CPU rounds that follow take minutes and may fail.
                ins_summary = write_instructions(args, meta, planned, ins_results, notes + ins_notes, ins_seconds)
                os.sched_setaffinity(0, {args.load_cpu})
            planned_cpu = [] if args.instructions_only else planned
            total = len(planned_cpu) * (args.warmup + args.rounds * (args.seconds + 0.5))
            if planned_cpu:
                print(f"envoy bench: {len(planned)} scenarios ({', '.join(names)}), {args.rounds} rounds × {args.seconds} s, about {total / 60:.1f} min", flush=True)
            for p in planned_cpu:
                name = p.scenario.name
                print(f"start {name}: {p.scenario.config}" + (f" with {p.module.name}" if p.module else ""), flush=True)
                try:
                    envoys[name] = Envoy(envoy_binary, p.scenario, p.config_text, workdir, args.envoy_cpu)
                    meta["verified"][name] = envoys[name].verify()
                except BenchError as e:
                    if name == "bare":
                        raise
                    print(f"skip {name}: {e}", flush=True)
                    notes.append(f"skipped `{name}`: {str(e).splitlines()[0]}")
                    if name in envoys:
                        envoys.pop(name).stop()
            planned_cpu = [p for p in planned_cpu if p.scenario.name in envoys]
            for p in planned_cpu:
                if args.warmup:
                    print(f"warm up {p.scenario.name} ({args.warmup} s)", flush=True)
                    load.run(envoys[p.scenario.name].url(), args.warmup)
            for r in range(args.rounds if planned_cpu else 0):
                shift = r % len(planned_cpu)
                order = planned_cpu[shift:] + planned_cpu[:shift]
                results = {}
                for i, p in enumerate(order, 1):
                    name = p.scenario.name
                    print(f"round {r + 1}/{args.rounds} [{i}/{len(order)}] {name:28} ", end="", flush=True)
                    row = measure(envoys[name], load, args.seconds, args.envoy_cpu)
                    results[name] = row
                    print(
                        f"{fmt(row['cpu_us_per_req'])} µs/req ({row['requests']} requests, {fmt(row['rps'], 0)} req/s,"
                        f" others {row['others_on_envoy_core_pct']:.0f} % of Envoy's core)"
                        + ("  ⚠ " + "; ".join(row["problems"]) if row["problems"] else ""),
                        flush=True,
                    )
                rounds.append(results)
        finally:
            for envoy in envoys.values():
                envoy.stop()
            for child in store:
                _stop(child)
    meta["loadavg_end"] = loadavg()
    windows = [row for r in rounds for row in r.values()]
    for key in ("others_on_envoy_core_pct", "steal_on_envoy_core_pct"):
        meta[f"{key}_median"] = statistics.median(row[key] for row in windows) if windows else None
    args.out.mkdir(parents=True, exist_ok=True)
    if planned_cpu:
        summary = summarize(planned_cpu, rounds)
        (args.out / "envoy.json").write_text(json.dumps({"meta": meta, "notes": notes, "summary": summary, "rounds": rounds}, indent=2, ensure_ascii=False) + "\n")
        report = markdown(meta, summary, notes, ins_summary)
        (args.out / "envoy.md").write_text(report)
        print()
        print(report)
        print(f"wrote {args.out / 'envoy.md'} and {args.out / 'envoy.json'}")
    return 0


def _interrupt(signum, frame):
    # SIGTERM ends the run as Ctrl-C does: through the `finally` that stops every Envoy.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    # Also SIGINT explicitly: a shell starts background jobs with it ignored, and `kill -INT`
    # must still stop the run cleanly.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(parse_args(sys.argv[1:] if argv is None else argv))
    except BenchError as e:
        print(f"envoy bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nenvoy bench: interrupted; every Envoy stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
