#!/usr/bin/env python3
"""Keel demo: all five filters composed in one Envoy (envoy/composed.yaml), driven through six
phases, with a Markdown + SVG report in demo-report/.

Run it with `make demo` (which builds and installs what is missing first), or directly from the
repository root: `python3 examples/demo.py`. Python 3.11 standard library only: the demo is
orchestration (processes, HTTP, timing, a report), which needs no compile step and no package.

What runs (loopback only): etcd on 2379/2380 when installed, four keel-upstream processes
(static on 18080; users-1..3 on 18091-18093, registering themselves in etcd with 2 s leases;
users-4 on 18094 joins in phase d), Envoy on 10000 (admin 9901) with `--concurrency 2`.

Phases, each bounded in time, while a steady load runs on /api/, /users/ and /static/:
  a. steady state
  b. users-2 starts answering 500 (its control endpoint): its per-host breaker opens,
     retries absorb the /api/ errors, discovery ejects it and the picker moves its keys
  c. a burst over the /api/ rate limit on one x-api-key: 429 with Retry-After; /static/ is
     unaffected
  d. users-4 registers, then users-1 shuts down (revoking its lease): only their keys move
  e. (when Debian's redis-server and webdis are installed) two more Envoy processes with
     envoy/rate-limit-fleet.yaml share one limit of 100/s through Redis + Webdis (on 16379 and
     17379; listeners 10011 and 10012): the report shows each process's share and the total
     against 100 + 100/s x elapsed
  f. idempotency keys: an Envoy with envoy/idempotency.yaml (listener 10021) in front of a slow
     orders upstream (18085); one keyed POST runs upstream once, repeats while it is in flight
     get 409 with Retry-After, the repeat after it gets the stored answer byte for byte, the key
     with another body 422
  g. adaptive protection: an Envoy with envoy/adaptive.yaml (listener 10031) in front of an
     upstream of 20 workers at 10 ms each (18086), offered three times its capacity by keel-load;
     then half its workers go and Keel's concurrency limit follows

Everything started is stopped at the end, on Ctrl-C and on failure.
"""

from __future__ import annotations

import html
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENER = ("127.0.0.1", 10000)
ADMIN = ("127.0.0.1", 9901)
ETCD_PORTS = (2379, 2380)
STATIC_PORT = 18080
USER_PORTS = {"users-1": 18091, "users-2": 18092, "users-3": 18093, "users-4": 18094}
LEASE_TTL = "2s"
FAILING = "users-2"  # phase b
ADDED, REMOVED = "users-4", "users-1"  # phase d
REPORT_DIR = ROOT / "demo-report"

# Steady load (requests per second, per route) and the keys it uses.
API_RATE, USERS_RATE, STATIC_RATE = 40, 50, 10
API_KEYS = ["alice", "bob", "carol", "dave"]  # 10/s each, under the 20/s limit
USER_KEYS = [f"user-{i}" for i in range(1000)]
SWEEP_KEYS = [f"member-{i}" for i in range(600)]  # phase d's key map
FLEET_REDIS, FLEET_WEBDIS = 16379, 17379  # phase e
FLEET_ENVOYS = [(10011, 9911), (10012, 9912)]  # phase e: (listener, admin) per process
ORDERS_PORT, ORDERS_ENVOY = 18085, (10021, 9921)  # phase f: the orders upstream, (listener, admin)
ORDERS_DELAY_S = 1.5  # phase f: the upstream's service time, so that repeats meet the first in flight
BACKEND_PORT, ADAPTIVE_ENVOY = 18086, (10031, 9931)  # phase g: the capacity-mode upstream, (listener, admin)
BACKEND_WORKERS, BACKEND_SERVICE_MS = 20, 10  # phase g: 20 at once, 10 ms each: 2000 requests/s

PHASES = [
    ("a", "steady state", 10.0),
    ("b", f"{FAILING} fails", 16.0),
    ("c", "burst over the /api/ rate limit", 8.0),
    ("d", "membership change", 30.0),  # an upper bound: it ends when its steps are done
]

BOLD = "\033[1m" if sys.stdout.isatty() else ""
PLAIN = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{PLAIN}", flush=True)


def note(text: str) -> None:
    print(f"   {text}", flush=True)


class DemoError(Exception):
    """A failure the demo explains in one line."""


# ----- processes -----


class Processes:
    """Everything the demo starts, stopped in reverse order (SIGTERM, then SIGKILL)."""

    def __init__(self, work: Path):
        self.work = work
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")
        # A session of its own: Ctrl-C reaches only the demo, which stops children in order.
        child = subprocess.Popen(
            args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.children.append((name, child))
        return child

    def stop(self, name: str, timeout: float = 5.0) -> None:
        for entry in list(self.children):
            if entry[0] == name:
                terminate(entry[1], timeout)
                self.children.remove(entry)

    def stop_all(self) -> None:
        while self.children:
            _, child = self.children.pop()
            terminate(child, 5.0)

    def log(self, name: str) -> str:
        try:
            return (self.work / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""


def terminate(child: subprocess.Popen, timeout: float) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ----- HTTP -----


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def request(
    conn_cache: dict,
    addr: tuple[str, int],
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> Answer:
    """One request on a kept-alive connection (one per thread and address)."""
    for attempt in (0, 1):
        conn = conn_cache.get(addr)
        if conn is None:
            conn = http.client.HTTPConnection(*addr, timeout=timeout)
            conn_cache[addr] = conn
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            hdrs = {k.lower(): v for k, v in response.getheaders()}
            if hdrs.get("connection", "").lower() == "close":
                conn.close()
                conn_cache.pop(addr, None)
            return Answer(response.status, hdrs, data)
        except (OSError, http.client.HTTPException):
            conn.close()
            conn_cache.pop(addr, None)
            # A kept-alive connection the server closed meanwhile: one fresh try.
            if attempt == 1:
                raise
    raise OSError("unreachable")


_admin_conns: dict = {}
_admin_lock = threading.Lock()


def admin_get(path: str, addr=ADMIN) -> Answer:
    with _admin_lock:
        return request(_admin_conns, addr, "GET", path, timeout=3.0)


def stats() -> dict[str, int]:
    text = admin_get("/stats?filter=wasmcustom.keel%7Ccluster.pool.outlier_detection.ejections_enforced_total").body.decode(errors="replace")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def discovery_status() -> dict:
    with _admin_lock:
        answer = request(_admin_conns, LISTENER, "GET", "/keel/discovery", timeout=3.0)
    return json.loads(answer.body)


def routable() -> list[str]:
    try:
        services = discovery_status().get("services", [])
    except (OSError, ValueError, http.client.HTTPException):
        return []
    for service in services:
        if service.get("name") == "users":
            return sorted(e["address"] for e in service.get("endpoints", []) if e.get("routable"))
    return []


def control(port: int, what: str, body: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("POST", f"/__keel/{what}", body=json.dumps(body))
        conn.getresponse().read()
    finally:
        conn.close()


def wait_until(what: str, check, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise DemoError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


# ----- load -----


@dataclass
class Sample:
    t: float  # seconds since the demo's load started
    phase: str
    route: str
    status: int  # 0: no answer
    outcome: str  # ok, retried, limited, breaker, no_host, error, failed
    latency_ms: float
    upstream: str
    retry_after: str | None = None
    key: str = ""  # x-user of a /users/ request
    attempt_hosts: str = ""  # x-keel-attempt-hosts: the host of each attempt, in order


def classify(answer: Answer | None) -> str:
    if answer is None:
        return "failed"
    if 200 <= answer.status < 300:
        attempts = answer.headers.get("x-keel-attempts", "1")
        return "retried" if attempts not in ("", "1") else "ok"
    if answer.status == 429:
        return "limited"
    if answer.status == 503 and answer.body.startswith(b"circuit breaker open"):
        return "breaker"
    if answer.status == 503 and answer.headers.get("x-keel-picker") == "no-host":
        return "no_host"
    return "error"


@dataclass
class Recorder:
    start: float = field(default_factory=time.monotonic)
    phase: str = "-"
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.start

    def send(self, conns: dict, route: str, path: str, headers: dict) -> Answer | None:
        began = time.monotonic()
        try:
            answer = request(conns, LISTENER, "GET", path, headers)
        except (OSError, http.client.HTTPException):
            answer = None
        elapsed = (time.monotonic() - began) * 1000
        sample = Sample(
            t=began - self.start,
            phase=self.phase,
            route=route,
            status=answer.status if answer else 0,
            outcome=classify(answer),
            latency_ms=elapsed,
            upstream=(answer.headers.get("x-upstream", "") if answer else ""),
            retry_after=(answer.headers.get("retry-after") if answer else None),
            key=headers.get("x-user", ""),
            attempt_hosts=(answer.headers.get("x-keel-attempt-hosts", "") if answer else ""),
        )
        with self.lock:
            self.samples.append(sample)
        return answer


class SteadyLoad:
    """Paced threads: /api/ on four keys, /users/ on random keys, /static/."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        plans = [
            ("api", API_RATE / 2, 0),
            ("api", API_RATE / 2, 1),
            ("users", USERS_RATE / 2, 0),
            ("users", USERS_RATE / 2, 1),
            ("static", STATIC_RATE, 0),
        ]
        for route, rate, seed in plans:
            thread = threading.Thread(target=self.run, args=(route, rate, seed), daemon=True)
            thread.start()
            self.threads.append(thread)

    def run(self, route: str, rate: float, seed: int) -> None:
        conns: dict = {}
        rng = random.Random(seed)
        interval = 1.0 / rate
        next_at = time.monotonic()
        n = seed
        while not self.stop.is_set():
            n += 2
            if route == "api":
                key = API_KEYS[n // 2 % len(API_KEYS)]
                self.recorder.send(conns, "api", f"/api/orders/{n}", {"x-api-key": key})
            elif route == "users":
                user = rng.choice(USER_KEYS)
                self.recorder.send(conns, "users", f"/users/{user}", {"x-user": user})
            else:
                self.recorder.send(conns, "static", f"/static/app-{n % 7}.js", {})
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                next_at = time.monotonic()  # behind: do not catch up in a burst

    def halt(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


class StatsSampler:
    """Envoy's keel counters every second, for the timeline."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.stop = threading.Event()
        self.series: list[tuple[float, dict[str, int]]] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.series.append((self.recorder.now(), stats()))
            except (OSError, ValueError, http.client.HTTPException):
                pass


# ----- the demo -----


@dataclass
class Demo:
    work: Path
    procs: Processes
    with_etcd: bool
    upstream_bin: Path
    recorder: Recorder = field(default_factory=Recorder)
    figures: dict = field(default_factory=dict)
    phase_bounds: list = field(default_factory=list)
    log_lines: list = field(default_factory=list)
    sampler: "StatsSampler | None" = None

    def sampler_series(self) -> list:
        return list(self.sampler.series) if self.sampler else []

    def start_upstream(self, name: str, port: int) -> None:
        args = [str(self.upstream_bin), "--name", name, "--port", str(port)]
        if self.with_etcd and name.startswith("users"):
            args += ["--etcd", "http://127.0.0.1:2379", "--register", "/services/users/"]
            args += ["--ttl", LEASE_TTL]
        self.procs.start(name, args)
        wait_until(f"{name} listening on {port}", lambda: port_in_use(port), 10)

    def event(self, text: str) -> None:
        t = self.recorder.now()
        self.log_lines.append((t, self.recorder.phase, text))
        note(f"[{t:5.1f}s] {text}")


def progress_line(recorder: Recorder, since: float, phase: str, extra: str) -> str:
    with recorder.lock:
        recent = [s for s in recorder.samples if s.t >= since]
    parts = []
    for route in ("api", "users", "static"):
        mine = [s for s in recent if s.route == route]
        if not mine:
            continue
        counts: dict[str, int] = {}
        for s in mine:
            counts[s.outcome] = counts.get(s.outcome, 0) + 1
        shown = " ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        parts.append(f"{route}: {shown}")
    return f"[{phase} {recorder.now():5.1f}s] " + " | ".join(parts) + (f" | {extra}" if extra else "")


def watch(demo: Demo, phase: str, seconds: float, extra=lambda: "") -> None:
    """Shows a progress line per second for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        since = demo.recorder.now()
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        print("   " + progress_line(demo.recorder, since, phase, extra()), flush=True)


def breaker_text() -> str:
    try:
        s = stats()
    except (OSError, ValueError, http.client.HTTPException):
        return ""
    states = {0: "closed", 1: "open", 2: "half-open"}
    hosts = []
    prefix = "wasmcustom.keel.circuit_breaker.users-host.host."
    for name, value in sorted(s.items()):
        if name.startswith(prefix) and name.endswith(".state"):
            host = name[len(prefix) : -len(".state")].replace("_", ".")
            host = host[::-1].replace(".", ":", 1)[::-1]
            hosts.append(f"{host} {states.get(value, value)}")
    routable_n = s.get("wasmcustom.keel.discovery.users.endpoints_routable", "?")
    return f"breakers: {', '.join(hosts) or 'all closed'}; routable {routable_n}"


def key_map(demo: Demo, keys: list[str]) -> dict[str, str]:
    """Which upstream answers each key (8 threads, each key once)."""
    result: dict[str, str] = {}
    lock = threading.Lock()
    queue = list(keys)

    def worker() -> None:
        conns: dict = {}
        while True:
            with lock:
                if not queue:
                    return
                key = queue.pop()
            answer = demo.recorder.send(conns, "users", f"/users/{key}", {"x-user": key})
            with lock:
                result[key] = answer.headers.get("x-upstream", "?") if answer else "?"

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return result


def phase_b(demo: Demo, seconds: float) -> None:
    port = USER_PORTS[FAILING]
    before = stats()
    watch(demo, "b", 2, breaker_text)
    control(port, "mode", {"mode": "fail", "status": 500})
    control(port, "health", {"up": False})
    demo.event(f"{FAILING} (127.0.0.1:{port}) now answers 500, and 503 to health checks")
    t_fail = demo.recorder.now()
    watch(demo, "b", 8, breaker_text)
    control(port, "mode", {"mode": "normal"})
    control(port, "health", {"up": True})
    demo.event(f"{FAILING} answers normally again")
    watch(demo, "b", max(0.0, seconds - 10), breaker_text)
    after = stats()
    series = [(t, st) for t, st in demo.sampler_series() if t >= t_fail]
    first = lambda cond: next((round(t - t_fail, 1) for t, st in series if cond(st)), None)  # noqa: E731
    breaker_open_s = first(
        lambda st: st.get("wasmcustom.keel.circuit_breaker.users-host.opened", 0)
        > before.get("wasmcustom.keel.circuit_breaker.users-host.opened", 0)
    )
    failover_s = first(lambda st: st.get("wasmcustom.keel.discovery.users.endpoints_routable", 3) < 3)

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    with demo.recorder.lock:
        mine = [s for s in demo.recorder.samples if s.phase == "b"]
    failing_window = [s for s in mine if t_fail <= s.t < t_fail + 8]
    api = [s for s in failing_window if s.route == "api"]
    users = [s for s in failing_window if s.route == "users"]
    to_failing_after = [
        s for s in users if s.upstream == FAILING and s.t > t_fail + 2 and s.status != 200
    ]
    # Per request, where each attempt of a retried /users/ request went: the failing host,
    # then the key's next host on the ring (keel.retry re-picks through the picker's list).
    names = {f"127.0.0.1:{port}": name for name, port in USER_PORTS.items()}
    failovers = [s for s in users if "," in s.attempt_hosts]
    shown = []
    for s in failovers[:12]:
        hops = " -> ".join(names.get(h, h) for h in s.attempt_hosts.split(","))
        shown.append(f"+{s.t - t_fail:4.1f}s x-user {s.key}: {hops}, answered by {s.upstream or '-'} ({s.status})")
    if failovers:
        say(f"/users/ retries while {FAILING} failed (first {len(shown)} of {len(failovers)}):")
        for line in shown:
            print("   " + line, flush=True)
    skipped = sum(1 for s in users if s.attempt_hosts and "," not in s.attempt_hosts
                  and s.upstream != FAILING and s.status == 200)
    demo.figures["b"] = {
        "users_failover_lines": shown,
        "users_failovers": len(failovers),
        "users_failover_to_failing": sum(1 for s in failovers if s.upstream == FAILING),
        "users_picked_around": skipped,
        "api_requests": len(api),
        "api_client_errors": sum(s.outcome not in ("ok", "retried") for s in api),
        "api_retried_ok": sum(s.outcome == "retried" for s in api),
        "users_requests": len(users),
        "users_client_errors": sum(s.outcome not in ("ok", "retried") for s in users),
        "users_breaker_replies": sum(s.outcome == "breaker" for s in users),
        "users_failing_after_2s": len(to_failing_after),
        "breaker_opened": delta("wasmcustom.keel.circuit_breaker.users-host.opened"),
        "breaker_closed": delta("wasmcustom.keel.circuit_breaker.users-host.closed"),
        "breaker_rejected": delta("wasmcustom.keel.circuit_breaker.users-host.rejected"),
        "api_breaker_opened": delta("wasmcustom.keel.circuit_breaker.api.opened"),
        "retries": delta("wasmcustom.keel.retry.api.retries"),
        "recovered": delta("wasmcustom.keel.retry.api.recovered"),
        "budget_exhausted": delta("wasmcustom.keel.retry.api.budget_exhausted"),
        "ejections": delta("wasmcustom.keel.discovery.users.ejections"),
        "pool_ejections": delta("cluster.pool.outlier_detection.ejections_enforced_total"),
        "users_retries": delta("wasmcustom.keel.retry.users.retries"),
        "users_recovered": delta("wasmcustom.keel.retry.users.recovered"),
        "breaker_open_within_s": breaker_open_s,
        "failover_within_s": failover_s,
    }


def phase_c(demo: Demo, seconds: float) -> None:
    burst_n, threads_n = 300, 8
    note(f"one client, x-api-key: mallory, sends {burst_n} requests over {threads_n} connections")
    done = threading.Event()
    sent = {"n": 0}
    lock = threading.Lock()
    first_429: list[Answer] = []

    def burster() -> None:
        conns: dict = {}
        while not done.is_set():
            with lock:
                if sent["n"] >= burst_n:
                    return
                sent["n"] += 1
                n = sent["n"]
            answer = demo.recorder.send(conns, "burst", f"/api/orders/{n}", {"x-api-key": "mallory"})
            if answer is not None and answer.status == 429 and not first_429:
                first_429.append(answer)

    t0 = demo.recorder.now()
    threads = [threading.Thread(target=burster, daemon=True) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        since = demo.recorder.now()
        time.sleep(1.0)
        print("   " + progress_line(demo.recorder, since, "c", "burst: " + burst_text(demo, t0)), flush=True)
        if all(not t.is_alive() for t in threads) and time.monotonic() > end - seconds + 3:
            break
    done.set()
    for thread in threads:
        thread.join(10)
    with demo.recorder.lock:
        mine = [s for s in demo.recorder.samples if s.phase == "c"]
    burst = [s for s in mine if s.route == "burst"]
    static = [s for s in mine if s.route == "static"]
    api = [s for s in mine if s.route == "api"]
    demo.figures["c"] = {
        "burst_sent": len(burst),
        "burst_allowed": sum(s.status == 200 for s in burst),
        "burst_429": sum(s.status == 429 for s in burst),
        "burst_429_with_retry_after": sum(s.status == 429 and bool(s.retry_after) for s in burst),
        "burst_seconds": (max((s.t for s in burst), default=t0) - t0),
        "other_api_keys_ok": f"{sum(s.status == 200 for s in api)}/{len(api)}",
        "static_ok": f"{sum(s.status == 200 for s in static)}/{len(static)}",
        "example_429": (
            {k: v for k, v in first_429[0].headers.items() if k in ("retry-after", "ratelimit", "ratelimit-policy")}
            if first_429
            else {}
        ),
    }
    if first_429:
        demo.event(
            "a refused request: 429, "
            + ", ".join(f"{k}: {v}" for k, v in demo.figures["c"]["example_429"].items())
        )


def burst_text(demo: Demo, t0: float) -> str:
    with demo.recorder.lock:
        burst = [s for s in demo.recorder.samples if s.route == "burst" and s.t >= t0]
    ok = sum(s.status == 200 for s in burst)
    limited = sum(s.status == 429 for s in burst)
    return f"{ok} allowed, {limited} refused (429)"


def phase_d(demo: Demo) -> None:
    if not demo.with_etcd:
        demo.event("no etcd installed: endpoints are static, so no instance can join or leave; phase d skipped")
        demo.figures["d"] = {"skipped": "no etcd (static endpoints)"}
        return
    wait_until("all 3 endpoints routable again", lambda: len(routable()) == 3, 15)
    before = key_map(demo, SWEEP_KEYS)
    counts_before = tally(before.values())
    demo.event(f"key map of {len(SWEEP_KEYS)} keys: {fmt_tally(counts_before)}")

    demo.start_upstream(ADDED, USER_PORTS[ADDED])
    t_join = time.monotonic()
    demo.event(f"{ADDED} (127.0.0.1:{USER_PORTS[ADDED]}) started and registered itself")
    wait_until("4 routable endpoints", lambda: len(routable()) == 4, 15)
    join_s = time.monotonic() - t_join
    demo.event(f"discovery lists 4 routable endpoints after {join_s:.1f} s (refresh 500 ms + first check)")
    after_add = key_map(demo, SWEEP_KEYS)
    moved_add = [k for k in SWEEP_KEYS if after_add[k] != before[k]]
    moved_add_elsewhere = [k for k in moved_add if after_add[k] != ADDED]
    demo.event(
        f"{len(moved_add)} keys moved ({pct(len(moved_add), len(SWEEP_KEYS))}; expected about 1/4 = 25.0 %), "
        f"{len(moved_add_elsewhere)} of them to an instance other than {ADDED}"
    )

    demo.procs.stop(REMOVED)
    t_leave = time.monotonic()
    demo.event(f"{REMOVED} stopped (SIGTERM: it revoked its lease)")
    wait_until("3 known endpoints", lambda: len(routable()) == 3, 15)
    leave_s = time.monotonic() - t_leave
    demo.event(f"discovery lists 3 endpoints after {leave_s:.1f} s")
    after_remove = key_map(demo, SWEEP_KEYS)
    moved_rm = [k for k in SWEEP_KEYS if after_remove[k] != after_add[k]]
    owned = [k for k in SWEEP_KEYS if after_add[k] == REMOVED]
    moved_rm_not_owned = [k for k in moved_rm if after_add[k] != REMOVED]
    demo.event(
        f"{len(moved_rm)} keys moved ({pct(len(moved_rm), len(SWEEP_KEYS))}; expected: the "
        f"{len(owned)} keys {REMOVED} held = {pct(len(owned), len(SWEEP_KEYS))}), "
        f"{len(moved_rm_not_owned)} keys of other instances moved"
    )
    demo.figures["d"] = {
        "keys": len(SWEEP_KEYS),
        "before": counts_before,
        "after_add": tally(after_add.values()),
        "after_remove": tally(after_remove.values()),
        "join_seconds": round(join_s, 2),
        "leave_seconds": round(leave_s, 2),
        "moved_on_add": len(moved_add),
        "moved_on_add_share": len(moved_add) / len(SWEEP_KEYS),
        "moved_on_add_not_to_new": len(moved_add_elsewhere),
        "moved_on_remove": len(moved_rm),
        "moved_on_remove_share": len(moved_rm) / len(SWEEP_KEYS),
        "held_by_removed": len(owned),
        "moved_on_remove_not_owned": len(moved_rm_not_owned),
        "unanswered": sum(v == "?" for v in list(after_add.values()) + list(after_remove.values())),
    }


def phase_e(demo: Demo, envoy: Path, seconds: float = 6.0) -> None:
    """Two Envoy processes share one fleet-wide limit (Redis through Webdis)."""
    redis, webdis = shutil.which("redis-server"), shutil.which("webdis")
    if not (redis and webdis):
        demo.figures["e"] = {"skipped": "redis-server or webdis not installed (`make setup` installs them)"}
        demo.event("no redis-server/webdis installed: phase e skipped")
        return
    procs, work = demo.procs, demo.work
    procs.start("redis", [redis, "--port", str(FLEET_REDIS), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    wait_until("redis listening", lambda: port_in_use(FLEET_REDIS), 10)
    (work / "webdis.json").write_text(json.dumps({
        "redis_host": "127.0.0.1", "redis_port": FLEET_REDIS, "http_host": "127.0.0.1",
        "http_port": FLEET_WEBDIS, "daemonize": False, "threads": 2,
        "acl": [{"disabled": ["DEBUG", "FLUSHALL", "FLUSHDB", "CONFIG", "SHUTDOWN"]}],
    }))
    procs.start("webdis", [webdis, str(work / "webdis.json")])
    wait_until("webdis listening", lambda: port_in_use(FLEET_WEBDIS), 10)
    text = (ROOT / "envoy" / "rate-limit-fleet.yaml").read_text()
    for i, (listener, admin) in enumerate(FLEET_ENVOYS):
        config = work / f"fleet-{i}.yaml"
        config.write_text(
            text.replace("port_value: 10000", f"port_value: {listener}")
            .replace("port_value: 9901", f"port_value: {admin}")
            .replace("port_value: 7379", f"port_value: {FLEET_WEBDIS}")
            .replace('"expected_processes": 3', '"expected_processes": 2')
        )
        procs.start(f"fleet-envoy-{i}", [str(envoy), "-c", str(config), "--concurrency", "2",
                                          "--disable-hot-restart", "--log-level", "warn"])
    for i, (_, admin) in enumerate(FLEET_ENVOYS):
        wait_until(f"fleet Envoy {i} ready",
                   lambda a=admin: admin_get("/ready", ("127.0.0.1", a)).body.strip() == b"LIVE"
                   if port_in_use(a) else False, 30)
    note(f"Redis on {FLEET_REDIS}, Webdis on {FLEET_WEBDIS}; two Envoy processes (listeners "
         f"{', '.join(str(l) for l, _ in FLEET_ENVOYS)}) with one policy of 100/s, burst 100, on x-api-key: fleet-demo")
    rate = 150  # per process: 300/s in all, three times the limit
    counts = [{"200": 0, "429": 0, "other": 0} for _ in FLEET_ENVOYS]
    start = time.monotonic()

    def drive(i: int, listener: int) -> None:
        conns: dict = {}
        for n in range(int(seconds * rate)):
            due = start + (n + i / len(FLEET_ENVOYS)) / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                answer = request(conns, ("127.0.0.1", listener), "GET", "/", {"x-api-key": "fleet-demo"})
                key = str(answer.status) if answer.status in (200, 429) else "other"
            except (OSError, http.client.HTTPException):
                key = "other"
            counts[i][key] += 1

    threads = [threading.Thread(target=drive, args=(i, l), daemon=True) for i, (l, _) in enumerate(FLEET_ENVOYS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    elapsed = time.monotonic() - start
    calls = []
    for _, admin in FLEET_ENVOYS:
        stats_text = admin_get("/stats?filter=keel.rate_limit.fleet.store_calls", ("127.0.0.1", admin)).body.decode()
        calls.append(sum(int(line.rsplit(":", 1)[1]) for line in stats_text.splitlines() if ":" in line))
    admitted = [c["200"] for c in counts]
    demo.figures["e"] = {
        "seconds": elapsed,
        "offered_per_s": rate * len(FLEET_ENVOYS),
        "admitted": admitted,
        "refused": [c["429"] for c in counts],
        "other": sum(c["other"] for c in counts),
        "total": sum(admitted),
        "expected": 100 + 100 * elapsed,
        "store_calls": calls,
    }
    e = demo.figures["e"]
    demo.event(f"fleet: {e['total']} admitted of {sum(sum(c.values()) for c in counts)} in {elapsed:.1f} s "
               f"(shares {', '.join(map(str, admitted))}); the shared limit allows {e['expected']:.0f}")
    for i in range(len(FLEET_ENVOYS)):
        procs.stop(f"fleet-envoy-{i}")
    procs.stop("webdis")
    procs.stop("redis")


def phase_f(demo: Demo, envoy: Path) -> None:
    """Idempotency keys: one keyed POST runs upstream once, whatever its repeats do."""
    procs, work = demo.procs, demo.work
    demo.start_upstream("orders", ORDERS_PORT)
    control(ORDERS_PORT, "mode", {"mode": "delay", "for": f"{int(ORDERS_DELAY_S * 1000)}ms"})
    listener, admin = ORDERS_ENVOY
    text = (ROOT / "envoy" / "idempotency.yaml").read_text()
    for old, new in (("port_value: 10000", f"port_value: {listener}"), ("port_value: 9901", f"port_value: {admin}"),
                     ("port_value: 18080", f"port_value: {ORDERS_PORT}")):
        if old not in text:
            raise DemoError(f"envoy/idempotency.yaml: {old!r} not found")
        text = text.replace(old, new)
    config = work / "orders-envoy.yaml"
    config.write_text(text)
    procs.start("orders-envoy", [str(envoy), "-c", str(config), "--concurrency", "2",
                                 "--disable-hot-restart", "--log-level", "warn"])
    wait_until("orders Envoy ready",
               lambda: admin_get("/ready", ("127.0.0.1", admin)).body.strip() == b"LIVE"
               if port_in_use(admin) else False, 30)
    note(f"Envoy with envoy/idempotency.yaml on 127.0.0.1:{listener}; the orders upstream takes "
         f"{ORDERS_DELAY_S:.1f} s per request")
    addr = ("127.0.0.1", listener)
    key = f"demo-order-{random.randrange(10**9)}"
    headers = {"x-api-key": "alice", "idempotency-key": key, "content-type": "application/json"}
    body = b'{"item": 1, "quantity": 2}'

    def post(payload: bytes) -> Answer:
        return request({}, addr, "POST", "/orders", headers, payload, timeout=ORDERS_DELAY_S + 5)

    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(answer=post(body)), daemon=True)
    t0 = time.monotonic()
    runner.start()
    time.sleep(ORDERS_DELAY_S / 3)  # the first is at the upstream now
    concurrent = [post(body) for _ in range(3)]
    runner.join(ORDERS_DELAY_S + 10)
    answer = first.get("answer")
    if answer is None:
        raise DemoError("phase f: the first keyed POST got no answer")
    replays = [post(body) for _ in range(3)]
    mismatch = post(b'{"item": 1, "quantity": 3}')
    stats_text = admin_get("/stats?filter=keel.idempotency", ("127.0.0.1", admin)).body.decode()
    keel_stats = {k.strip(): v.strip() for k, v in (line.rsplit(":", 1) for line in stats_text.splitlines() if ":" in line)}
    upstream_posts = json.loads(request({}, ("127.0.0.1", ORDERS_PORT), "GET", "/__keel/stats").body).get("by_method", {}).get("POST", 0)
    same = [r.status == answer.status and r.body == answer.body
            and r.headers.get("x-upstream-seq") == answer.headers.get("x-upstream-seq") for r in replays]
    demo.figures["f"] = {
        "key": key,
        "first": {"status": answer.status, "seq": answer.headers.get("x-upstream-seq"),
                  "seconds": round(time.monotonic() - t0, 2)},
        "concurrent": [r.status for r in concurrent],
        "concurrent_retry_after": [r.headers.get("retry-after") for r in concurrent],
        "replays": [r.status for r in replays],
        "replays_marked": sum(r.headers.get("idempotent-replayed") == "true" for r in replays),
        "replays_identical": sum(same),
        "mismatch": mismatch.status,
        "upstream_posts": upstream_posts,
        "stats": {k.removeprefix("wasmcustom."): v for k, v in keel_stats.items() if ".orders." in k},
    }
    f = demo.figures["f"]
    demo.event(f"idempotency: first POST {answer.status} (upstream seq {f['first']['seq']}); "
               f"3 repeats in flight -> {f['concurrent']} (Retry-After {f['concurrent_retry_after']}); "
               f"3 repeats after -> {f['replays']}, {f['replays_identical']} identical, {f['replays_marked']} marked "
               f"idempotent-replayed; another body -> {mismatch.status}; the upstream got {upstream_posts} POST")
    if answer.status != 200 or upstream_posts != 1 or f["replays_identical"] != 3 or mismatch.status != 422 \
            or any(status != 409 for status in f["concurrent"]):
        raise DemoError(f"phase f: idempotency keys did not behave as documented: {f}")
    procs.stop("orders-envoy")
    procs.stop("orders")


def phase_g(demo: Demo, envoy: Path) -> None:
    """Adaptive protection: Keel's concurrency limit in front of an overloaded upstream that
    then slows down."""
    procs, work = demo.procs, demo.work
    load_bin = demo.upstream_bin.with_name("keel-load")
    if not load_bin.is_file():
        raise DemoError(f"{load_bin} not found (cargo build --release -p keel-upstream builds it)")
    demo.start_upstream("backend", BACKEND_PORT)

    def capacity(workers: int) -> None:
        control(BACKEND_PORT, "capacity", {"concurrency": workers, "service": f"{BACKEND_SERVICE_MS}ms", "queue": 200})

    capacity(BACKEND_WORKERS)
    listener, admin = ADAPTIVE_ENVOY
    text = (ROOT / "envoy" / "adaptive.yaml").read_text()
    # The flaky cluster gets no request here; its port points at nothing.
    for old, new in (("port_value: 10000", f"port_value: {listener}"), ("port_value: 9901", f"port_value: {admin}"),
                     ("port_value: 18080", f"port_value: {BACKEND_PORT}"), ("port_value: 18081", "port_value: 1")):
        if old not in text:
            raise DemoError(f"envoy/adaptive.yaml: {old!r} not found")
        text = text.replace(old, new)
    config = work / "adaptive-envoy.yaml"
    config.write_text(text)
    procs.start("adaptive-envoy", [str(envoy), "-c", str(config), "--concurrency", "2",
                                   "--disable-hot-restart", "--log-level", "warn"])
    wait_until("adaptive Envoy ready",
               lambda: admin_get("/ready", ("127.0.0.1", admin)).body.strip() == b"LIVE"
               if port_in_use(admin) else False, 30)
    capacity_per_s = BACKEND_WORKERS * 1000 // BACKEND_SERVICE_MS
    note(f"Envoy with envoy/adaptive.yaml on 127.0.0.1:{listener}; the backend serves {BACKEND_WORKERS} requests at "
         f"once for {BACKEND_SERVICE_MS} ms each ({capacity_per_s}/s), queues 200, then answers 503")

    def load(connections: int, seconds: int) -> dict:
        out = subprocess.run([str(load_bin), "--url", f"http://127.0.0.1:{listener}/work", "--connections",
                              str(connections), "--duration", f"{seconds}s"],
                             capture_output=True, text=True, timeout=seconds + 60)
        if out.returncode != 0:
            raise DemoError(f"keel-load failed: {out.stderr.strip()[:300]}")
        return json.loads(out.stdout)

    def gauge(name: str) -> int:
        text = admin_get(f"/stats?filter=keel.adaptive.backend.{name}$", ("127.0.0.1", admin)).body.decode()
        values = [int(v) for v in (line.rsplit(":", 1)[-1].strip() for line in text.splitlines()) if v.isdigit()]
        return values[0] if values else 0

    def step(label: str, result: dict) -> dict:
        lat = result["ok_latency_us"]
        row = {"label": label, "ok_per_s": round(result["ok_per_s"]), "p50_ms": round(lat["p50"] / 1000, 1),
               "p99_ms": round(lat["p99"] / 1000, 1), "by_status": result["by_status"], "errors": result["errors"],
               "limit": gauge("limit")}
        demo.event(f"adaptive, {label}: {row['ok_per_s']} ok/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                   f"statuses {row['by_status']}, Keel's limit {row['limit']}")
        return row

    steps = [step("unloaded (1 connection)", load(1, 2))]
    steps.append(step(f"60 connections (3x its {BACKEND_WORKERS} workers)", load(60, 4)))
    capacity(BACKEND_WORKERS // 2)
    steps.append(step(f"60 connections, capacity halved to {BACKEND_WORKERS // 2} workers", load(60, 4)))
    demo.figures["g"] = {"capacity_per_s": capacity_per_s, "steps": steps}
    if not any(row["ok_per_s"] for row in steps):
        raise DemoError(f"phase g: no request succeeded through the adaptive limit: {steps}")
    procs.stop("adaptive-envoy")
    procs.stop("backend")


def tally(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def fmt_tally(t: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in t.items())


def pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f} %" if total else "n/a"


# ----- report -----

COLORS = {
    "ok": "#4caf50",
    "retried": "#8bc34a",
    "limited": "#ff9800",
    "breaker": "#9c27b0",
    "no_host": "#607d8b",
    "error": "#f44336",
    "failed": "#000000",
}
UPSTREAM_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def svg_frame(width: int, height: int, title: str, body: list[str]) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
            f"{html.escape(title)}</text>",
            *body,
            "</svg>",
        ]
    )


def axes(x0, y0, w, h, tmax, ymax, ylabel, bounds) -> list[str]:
    out = [
        f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="#333"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + h}" stroke="#333"/>',
        f'<text x="{x0 - 38}" y="{y0 + h / 2}" transform="rotate(-90 {x0 - 38} {y0 + h / 2})" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>',
        f'<text x="{x0 + w / 2}" y="{y0 + h + 30}" text-anchor="middle">seconds</text>',
    ]
    for i in range(5):
        v = ymax * i / 4
        y = y0 + h - h * i / 4
        out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{v:.0f}</text>')
        out.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + w}" y2="{y}" stroke="#eee"/>')
    step = 10 if tmax > 40 else 5
    for t in range(0, int(tmax) + 1, step):
        x = x0 + w * t / tmax
        out.append(f'<text x="{x}" y="{y0 + h + 14}" text-anchor="middle">{t}</text>')
    for name, label, t_start, _ in bounds:
        x = x0 + w * t_start / tmax
        out.append(f'<line x1="{x}" y1="{y0}" x2="{x}" y2="{y0 + h}" stroke="#999" stroke-dasharray="3,3"/>')
        out.append(f'<text x="{x + 3}" y="{y0 + 10}" fill="#555">{html.escape(name)}: {html.escape(label)}</text>')
    return out


def legend(x, y, items) -> list[str]:
    out = []
    for i, (label, color) in enumerate(items):
        out.append(f'<rect x="{x + i * 95}" y="{y}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + i * 95 + 14}" y="{y + 9}">{html.escape(label)}</text>')
    return out


def outcomes_svg(samples: list[Sample], bounds, tmax: float) -> str:
    width, height, x0, y0, w, h = 900, 340, 60, 50, 820, 230
    seconds = int(tmax) + 1
    buckets = [dict.fromkeys(COLORS, 0) for _ in range(seconds)]
    for s in samples:
        i = int(s.t)
        if 0 <= i < seconds:
            buckets[i][s.outcome] += 1
    ymax = max(10, max(sum(b.values()) for b in buckets))
    ymax = (ymax + 49) // 50 * 50
    body = axes(x0, y0, w, h, seconds, ymax, "requests per second", bounds)
    bw = w / seconds
    for i, b in enumerate(buckets):
        y = y0 + h
        for outcome, color in COLORS.items():
            n = b[outcome]
            if n:
                bh = h * n / ymax
                y -= bh
                body.append(
                    f'<rect x="{x0 + i * bw:.1f}" y="{y:.1f}" width="{bw * 0.9:.1f}" height="{bh:.1f}" '
                    f'fill="{color}"><title>{i}s {outcome}: {n}</title></rect>'
                )
    body += legend(x0, height - 22, [(k, v) for k, v in COLORS.items()])
    return svg_frame(width, height, "Client-visible outcomes per second (all routes)", body)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latency_svg(samples: list[Sample], bounds, tmax: float) -> str:
    width, height, x0, y0, w, h = 900, 340, 60, 50, 820, 230
    seconds = int(tmax) + 1
    lines = {
        ("api", 0.5): "#1f77b4",
        ("api", 0.99): "#aec7e8",
        ("users", 0.5): "#ff7f0e",
        ("users", 0.99): "#ffbb78",
        ("static", 0.5): "#2ca02c",
    }
    series = {}
    for (route, q), _ in lines.items():
        per = [[] for _ in range(seconds)]
        for s in samples:
            if s.route == route and 0 <= int(s.t) < seconds and s.status:
                per[int(s.t)].append(s.latency_ms)
        series[(route, q)] = [percentile(v, q) if v else None for v in per]
    ymax = max([v for ser in series.values() for v in ser if v is not None] + [1.0])
    ymax = max(5.0, float(int(ymax * 1.1) + 1))
    body = axes(x0, y0, w, h, seconds, ymax, "latency, ms", bounds)
    for key, color in lines.items():
        points = [
            f"{x0 + w * (i + 0.5) / seconds:.1f},{y0 + h - h * v / ymax:.1f}"
            for i, v in enumerate(series[key])
            if v is not None
        ]
        if points:
            body.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" stroke-width="2"/>')
    body += legend(
        x0, height - 22, [(f"{r} p{int(q * 100)}", c) for (r, q), c in lines.items()]
    )
    return svg_frame(width, height, "Latency per second (client side, p50 and p99)", body)


def upstreams_svg(samples: list[Sample], phases: list[str]) -> str:
    names = sorted({s.upstream for s in samples if s.upstream})
    width, height, x0, y0, w, h = 900, 340, 60, 50, 820, 230
    counts = {p: {n: 0 for n in names} for p in phases}
    for s in samples:
        if s.upstream and s.phase in counts and s.route in ("api", "users", "burst"):
            counts[s.phase][s.upstream] += 1
    ymax = max([max(c.values(), default=0) for c in counts.values()] + [10])
    ymax = (ymax + 99) // 100 * 100
    body = axes(x0, y0, w, h, 1, ymax, "requests answered", [])[:4]
    for i in range(5):
        v = ymax * i / 4
        y = y0 + h - h * i / 4
        body.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{v:.0f}</text>')
        body.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + w}" y2="{y}" stroke="#eee"/>')
    group = w / max(1, len(phases))
    bw = group * 0.8 / max(1, len(names))
    for pi, phase in enumerate(phases):
        gx = x0 + pi * group + group * 0.1
        body.append(f'<text x="{gx + group * 0.4}" y="{y0 + h + 14}" text-anchor="middle">phase {phase}</text>')
        for ni, name in enumerate(names):
            n = counts[phase][name]
            bh = h * n / ymax
            body.append(
                f'<rect x="{gx + ni * bw:.1f}" y="{y0 + h - bh:.1f}" width="{bw * 0.9:.1f}" height="{bh:.1f}" '
                f'fill="{UPSTREAM_COLORS[ni % len(UPSTREAM_COLORS)]}"><title>{name}: {n}</title></rect>'
            )
    body += legend(x0, height - 22, [(n, UPSTREAM_COLORS[i % len(UPSTREAM_COLORS)]) for i, n in enumerate(names)])
    return svg_frame(width, height, "Requests per upstream and phase (/api/ and /users/)", body)


def phase_table(samples: list[Sample], phase: str) -> list[str]:
    mine = [s for s in samples if s.phase == phase]
    rows = [
        "| route | requests | ok | retried, then ok | 429 | breaker 503 | other errors | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for route in ("api", "burst", "users", "static"):
        rs = [s for s in mine if s.route == route]
        if not rs:
            continue
        lat = [s.latency_ms for s in rs if s.status]
        count = lambda o: sum(s.outcome == o for s in rs)  # noqa: E731
        errors = count("error") + count("failed") + count("no_host")
        rows.append(
            f"| {'/api/ (burst key)' if route == 'burst' else '/' + route + '/'} | {len(rs)} | {count('ok')} | "
            f"{count('retried')} | {count('limited')} | {count('breaker')} | {errors} | "
            f"{percentile(lat, 0.5):.1f} | {percentile(lat, 0.99):.1f} |"
        )
    return rows


def write_report(demo: Demo, total_s: float) -> Path:
    REPORT_DIR.mkdir(exist_ok=True)
    samples = demo.recorder.samples
    tmax = max([s.t for s in samples] + [1.0])
    bounds = demo.phase_bounds
    (REPORT_DIR / "outcomes.svg").write_text(outcomes_svg(samples, bounds, tmax))
    (REPORT_DIR / "latency.svg").write_text(latency_svg(samples, bounds, tmax))
    phases = [b[0] for b in bounds]
    (REPORT_DIR / "upstreams.svg").write_text(upstreams_svg(samples, phases))
    (REPORT_DIR / "samples.json").write_text(
        json.dumps([s.__dict__ for s in samples], separators=(",", ":"))
    )
    f = demo.figures
    lines = [
        "# Keel demo report",
        "",
        f"Envoy 1.40 (`--concurrency 2`) with `envoy/composed.yaml`; registry: "
        f"{'etcd (upstreams register themselves with 2 s leases)' if demo.with_etcd else 'none (static endpoints)'}; "
        f"{len(samples)} requests in {total_s:.0f} s. Written by `examples/demo.py` (`make demo`).",
        "",
        "![outcomes](outcomes.svg)",
        "",
        "![latency](latency.svg)",
        "",
        "![upstreams](upstreams.svg)",
        "",
    ]
    for name, label, start, end in bounds:
        lines += [f"## Phase {name}: {label} ({start:.0f}-{end:.0f} s)", ""]
        lines += phase_table(samples, name)
        lines.append("")
        if name == "b" and "b" in f:
            b = f["b"]
            lines += [
                f"While {FAILING} answered 500 (8 s):",
                "",
                f"- /api/: {b['api_client_errors']} client-visible errors of {b['api_requests']} requests; "
                f"{b['api_retried_ok']} answered after a retry (keel.retry: {b['retries']} retries, "
                f"{b['recovered']} recovered, budget exhausted {b['budget_exhausted']} times) until Envoy's "
                f"outlier detection took {FAILING} out of the static pool ({b['pool_ejections']} ejection(s), "
                "10 s each). "
                f"The cluster breaker `api` opened {b['api_breaker_opened']} times (one upstream of three "
                "stays under its 50 % threshold).",
                f"- /users/: {b['users_client_errors']} client-visible errors of {b['users_requests']} requests "
                f"({b['users_breaker_replies']} of them the breaker's own 503). The per-host breaker "
                f"`users-host` for {FAILING} opened {b['breaker_opened']} time(s) (seen by the 1 s stats "
                f"sampler within {b['breaker_open_within_s']} s) and rejected {b['breaker_rejected']} requests "
                f"at once; keel.retry sent {b['users_retries']} retries, each to the key's next host on the "
                f"ring not yet tried and whose breaker is closed ({b['users_recovered']} recovered, "
                f"{b['users_failover_to_failing']} answered by {FAILING}). Discovery took {FAILING} out of the set within "
                f"{b['failover_within_s']} s (two failed health checks; passive ejections: {b['ejections']}), "
                f"and the picker moved only its keys to the next endpoints on the ring. After it recovered, "
                f"the breaker closed {b['breaker_closed']} time(s) (two good half-open probes).",
                "",
            ]
            if b["users_failover_lines"]:
                lines += [
                    f"Where each attempt of a retried /users/ request went (`x-keel-attempt-hosts`; first "
                    f"{len(b['users_failover_lines'])} of {b['users_failovers']}):",
                    "",
                    "```",
                    *b["users_failover_lines"],
                    "```",
                    "",
                ]
        if name == "c" and "c" in f:
            c = f["c"]
            lines += [
                f"- The burst key sent {c['burst_sent']} requests in {c['burst_seconds']:.1f} s: "
                f"{c['burst_allowed']} allowed (bucket of 20 plus 20/s refill), {c['burst_429']} refused with 429, "
                f"{c['burst_429_with_retry_after']} of them with Retry-After.",
                f"- Meanwhile the other API keys got {c['other_api_keys_ok']} OK and /static/ {c['static_ok']} OK.",
                f"- A refusal's headers: `{json.dumps(c['example_429'])}`",
                "",
            ]
        if name == "d" and "d" in f:
            d = f["d"]
            if "skipped" in d:
                lines += [f"Skipped: {d['skipped']}.", ""]
            else:
                lines += [
                    f"Key map of {d['keys']} keys (`x-user: member-N`), one request each:",
                    "",
                    f"- before: {fmt_tally(d['before'])}",
                    f"- {ADDED} joined (routable after {d['join_seconds']} s): {d['moved_on_add']} keys moved "
                    f"= {100 * d['moved_on_add_share']:.1f} % (expected about 1/4 = 25 %), "
                    f"{d['moved_on_add_not_to_new']} to an instance other than {ADDED}. "
                    f"After: {fmt_tally(d['after_add'])}",
                    f"- {REMOVED} left (gone after {d['leave_seconds']} s): {d['moved_on_remove']} keys moved "
                    f"= {100 * d['moved_on_remove_share']:.1f} % (expected: the {d['held_by_removed']} keys it held), "
                    f"{d['moved_on_remove_not_owned']} keys of other instances moved. "
                    f"After: {fmt_tally(d['after_remove'])}",
                    f"- unanswered key lookups: {d['unanswered']}",
                    "",
                ]
    e = f.get("e")
    if e and "skipped" not in e:
        lines += [
            "## Phase e: two Envoy processes share one fleet-wide limit",
            "",
            f"Two more Envoy processes (`envoy/rate-limit-fleet.yaml`, `--concurrency 2` each) shared one "
            f"policy of 100/s, burst 100, through Redis and Webdis, under {e['offered_per_s']}/s on one key for "
            f"{e['seconds']:.1f} s.",
            "",
            "| process | admitted | refused (429) | store calls |",
            "|---|---|---|---|",
        ]
        for i, (a, r, c) in enumerate(zip(e["admitted"], e["refused"], e["store_calls"])):
            lines.append(f"| {i + 1} | {a} | {r} | {c} |")
        lines += [
            f"| total | {e['total']} | {sum(e['refused'])} | {sum(e['store_calls'])} |",
            "",
            f"The limit allows 100 + 100/s x {e['seconds']:.1f} s = {e['expected']:.0f} in all; the two processes "
            f"admitted {e['total']} ({100 * e['total'] / e['expected']:.1f} %). With a limit per process instead "
            f"(no store) the two could have admitted up to {2 * e['expected']:.0f}. Other answers: {e['other']}.",
            "",
        ]
    elif e:
        lines += ["## Phase e: skipped", "", f"{e['skipped']}.", ""]
    i = f.get("f")
    if i:
        lines += [
            "## Phase f: idempotency keys",
            "",
            f"An Envoy with `envoy/idempotency.yaml` in front of an orders upstream that takes {ORDERS_DELAY_S:.1f} s "
            f"per request; every request below carries `Idempotency-Key: {i['key']}` and `x-api-key: alice`.",
            "",
            "| request | answers |",
            "|---|---|",
            f"| the first `POST /orders` | {i['first']['status']} after {i['first']['seconds']} s (upstream arrival {i['first']['seq']}) |",
            f"| 3 repeats while it is in flight | {', '.join(map(str, i['concurrent']))} (Retry-After: {', '.join(map(str, i['concurrent_retry_after']))}) |",
            f"| 3 repeats after it | {', '.join(map(str, i['replays']))}: {i['replays_identical']} byte for byte the first answer, "
            f"{i['replays_marked']} with `idempotent-replayed: true` |",
            f"| the key with another body | {i['mismatch']} |",
            "",
            f"The upstream received {i['upstream_posts']} `POST` in all. Keel's counters: "
            + ", ".join(f"`{k}` {v}" for k, v in sorted(i["stats"].items())),
            "",
        ]
    g = f.get("g")
    if g:
        lines += [
            "## Phase g: adaptive protection",
            "",
            f"An Envoy with `envoy/adaptive.yaml` (Keel's gradient concurrency limit, its defaults) in front of an upstream "
            f"of {BACKEND_WORKERS} workers (capacity {g['capacity_per_s']} requests/s at {BACKEND_SERVICE_MS} ms each, a "
            f"queue of 200, then 503), loaded by `keel-load`; then half its workers go.",
            "",
            "| load | successful/s | p50 | p99 | statuses | Keel's limit after |",
            "|---|---:|---:|---:|---|---:|",
        ]
        lines += [f"| {r['label']} | {r['ok_per_s']} | {r['p50_ms']} ms | {r['p99_ms']} ms | "
                  f"{', '.join(f'{k}: {v}' for k, v in sorted(r['by_status'].items()))} | {r['limit']} |" for r in g["steps"]]
        lines += ["", "Keel's refusals are `503` with `x-keel-adaptive: backend`; the upstream's own are `503` past its queue.", ""]
    if demo.log_lines:
        lines += ["## Events", ""]
        lines += [f"- {t:5.1f} s (phase {p}): {text}" for t, p, text in demo.log_lines]
        lines.append("")
    lines += [
        "## Files",
        "",
        "- `outcomes.svg`, `latency.svg`, `upstreams.svg`: the charts above",
        "- `samples.json`: every request (time, phase, route, status, outcome, latency, upstream)",
        "- `stats.json`: Envoy's keel counters, sampled every second",
        "- `envoy.log`, `*.log`: the processes' logs",
        "",
    ]
    (REPORT_DIR / "report.md").write_text("\n".join(lines))
    return REPORT_DIR / "report.md"


# ----- main -----


def ensure_built(target_dir: Path) -> Path:
    modules = ["rate_limit", "circuit_breaker", "retry", "picker", "discovery"]
    missing = [m for m in modules if not (ROOT / "dist" / f"keel_{m}.wasm").is_file()]
    if missing:
        say("Building the filters (make build)")
        subprocess.run(["make", "build"], cwd=ROOT, check=True)
    say("Building keel-upstream")
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "keel-upstream"], cwd=ROOT, check=True)
    return target_dir / "release" / "keel-upstream"


def interrupted(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    envoy = Path(os.environ.get("KEEL_ENVOY", ROOT / ".venv" / "envoy"))
    if not envoy.is_file():
        print("demo: no Envoy at .venv/envoy: run `make setup` (or `make demo`)", file=sys.stderr)
        return 1
    target_dir = Path(os.environ.get("TARGET_DIR") or os.environ.get("CARGO_TARGET_DIR") or "target")
    if not target_dir.is_absolute():
        target_dir = ROOT / target_dir
    etcd = shutil.which("etcd")
    ports = [LISTENER[1], ADMIN[1], STATIC_PORT, *USER_PORTS.values()] + (list(ETCD_PORTS) if etcd else [])
    ports += [FLEET_REDIS, FLEET_WEBDIS, *(p for pair in FLEET_ENVOYS for p in pair), ORDERS_PORT, *ORDERS_ENVOY]
    busy = [p for p in ports if port_in_use(p)]
    if busy:
        print(f"demo: ports in use on 127.0.0.1: {busy}; stop what listens there and run again", file=sys.stderr)
        return 1
    upstream_bin = ensure_built(target_dir)

    work = Path(tempfile.mkdtemp(prefix="keel-demo-"))
    procs = Processes(work)
    demo = Demo(work=work, procs=procs, with_etcd=etcd is not None, upstream_bin=upstream_bin)
    sampler = None
    load = None
    # SIGTERM (e.g. from a supervisor) ends the demo like Ctrl-C: through the cleanup below.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    t_begin = time.monotonic()
    try:
        say("Starting etcd, the upstreams and Envoy (envoy/composed.yaml)")
        config = ROOT / "envoy" / "composed.yaml"
        if etcd:
            procs.start(
                "etcd",
                [
                    etcd, "--name", "keel-demo", "--data-dir", str(work / "etcd"),
                    "--listen-client-urls", "http://127.0.0.1:2379",
                    "--advertise-client-urls", "http://127.0.0.1:2379",
                    "--listen-peer-urls", "http://127.0.0.1:2380",
                    "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                    "--initial-cluster", "keel-demo=http://127.0.0.1:2380",
                    "--log-level", "warn",
                ],
            )
            wait_until("etcd healthy", lambda: port_in_use(2379), 20)
            note(f"etcd {etcd} on 127.0.0.1:2379; upstreams register under /services/users/ with {LEASE_TTL} leases")
        else:
            note("etcd is not installed (`make setup` installs it): discovery uses a static list of "
                 "the three users upstreams instead, and phase d (instances joining and leaving) is skipped")
            text = config.read_text()
            static = ", ".join(
                f'{{"address": "127.0.0.1", "port": {USER_PORTS[n]}}}' for n in ("users-1", "users-2", "users-3")
            )
            etcd_source = '{"etcd": {"cluster": "etcd", "prefix": "/services/users/"}}'
            if etcd_source not in text:
                raise DemoError("envoy/composed.yaml: the etcd source of discovery was not found")
            config = work / "composed-static.yaml"
            config.write_text(text.replace(etcd_source, f'{{"static": [{static}]}}'))
        demo.start_upstream("static", STATIC_PORT)
        for name in ("users-1", "users-2", "users-3"):
            demo.start_upstream(name, USER_PORTS[name])
        note("upstreams: static on 18080, users-1..3 on 18091-18093")
        procs.start(
            "envoy",
            [str(envoy), "-c", str(config), "--concurrency", "2", "--disable-hot-restart",
             "--log-level", "warn", "--component-log-level", "wasm:info"],
        )

        def ready():
            try:
                return admin_get("/ready").body.strip() == b"LIVE"
            except (OSError, http.client.HTTPException):
                if procs.children and procs.children[-1][1].poll() is not None:
                    raise DemoError("Envoy exited:\n" + procs.log("envoy")[-3000:])
                return False

        wait_until("Envoy ready", ready, 30)
        wait_until("discovery publishing 3 routable endpoints", lambda: len(routable()) == 3, 20)
        note(f"Envoy ready on 127.0.0.1:10000 (admin 9901); discovery: {', '.join(routable())}")

        demo.recorder = Recorder()
        load = SteadyLoad(demo.recorder)
        sampler = StatsSampler(demo.recorder)
        demo.sampler = sampler
        load.start()
        sampler.thread.start()
        note(f"steady load: /api/ {API_RATE}/s on keys {', '.join(API_KEYS)} (limit 20/s each), "
             f"/users/ {USERS_RATE}/s on random x-user, /static/ {STATIC_RATE}/s")

        for name, label, seconds in PHASES:
            say(f"Phase {name}: {label}")
            demo.recorder.phase = name
            start = demo.recorder.now()
            if name == "a":
                watch(demo, "a", seconds, breaker_text)
            elif name == "b":
                phase_b(demo, seconds)
            elif name == "c":
                phase_c(demo, seconds)
            else:
                phase_d(demo)
            demo.phase_bounds.append((name, label, start, demo.recorder.now()))
        load.halt()
        say("Phase e: two Envoy processes share one fleet-wide limit (Redis + Webdis)")
        demo.recorder.phase = "e"
        phase_e(demo, envoy)
        say("Phase f: idempotency keys (a replay, a conflict, a mismatch)")
        demo.recorder.phase = "f"
        phase_f(demo, envoy)
        say("Phase g: adaptive protection (an overloaded upstream, then one of half the capacity)")
        demo.recorder.phase = "g"
        phase_g(demo, envoy)
        sampler.stop.set()
        total = time.monotonic() - t_begin
        REPORT_DIR.mkdir(exist_ok=True)
        (REPORT_DIR / "stats.json").write_text(json.dumps(sampler.series))
        report = write_report(demo, demo.recorder.now())
        summary(demo)
        say(f"Done in {total:.0f} s. Report: {report.relative_to(ROOT)} (charts: demo-report/*.svg)")
        return 0
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    except (DemoError, subprocess.CalledProcessError, OSError) as e:
        print(f"\ndemo: {e}", file=sys.stderr)
        for name in ("envoy", "etcd"):
            tail = procs.log(name)[-1500:]
            if tail:
                print(f"--- {name} log (end) ---\n{tail}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if load:
            load.halt()
        if sampler:
            sampler.stop.set()
        procs.stop_all()
        if REPORT_DIR.is_dir():
            for name in ("envoy", "etcd", "static", *USER_PORTS, "redis", "webdis", "fleet-envoy-0", "fleet-envoy-1", "orders",
                         "orders-envoy", "backend", "adaptive-envoy"):
                log = work / f"{name}.log"
                if log.is_file():
                    shutil.copy(log, REPORT_DIR / f"{name}.log")
        shutil.rmtree(work, ignore_errors=True)


def summary(demo: Demo) -> None:
    say("What happened")
    for name, label, start, end in demo.phase_bounds:
        with demo.recorder.lock:
            mine = [s for s in demo.recorder.samples if s.phase == name]
        counts = tally(s.outcome for s in mine)
        note(f"phase {name} ({label}, {end - start:.0f} s): {len(mine)} requests: {fmt_tally(counts)}")
    f = demo.figures
    if "b" in f:
        b = f["b"]
        note(f"b: users-host breaker opened {b['breaker_opened']}x, closed {b['breaker_closed']}x; "
             f"failover within {b['failover_within_s']} s; /api/ errors seen by clients {b['api_client_errors']}/{b['api_requests']} "
             f"({b['retries']} retries); /users/ errors {b['users_client_errors']}/{b['users_requests']}")
    if "c" in f:
        c = f["c"]
        note(f"c: burst {c['burst_sent']} -> {c['burst_allowed']} allowed, {c['burst_429']} x 429 "
             f"({c['burst_429_with_retry_after']} with Retry-After); /static/ {c['static_ok']} OK")
    if "e" in f and "skipped" not in f["e"]:
        e = f["e"]
        note(f"e: two processes under {e['offered_per_s']}/s on one key for {e['seconds']:.1f} s: admitted "
             f"{' + '.join(map(str, e['admitted']))} = {e['total']} (the shared limit: {e['expected']:.0f}); "
             f"store calls {', '.join(map(str, e['store_calls']))}")
    if "f" in f:
        i = f["f"]
        note(f"f: one keyed POST ran upstream {i['upstream_posts']}x; repeats in flight {i['concurrent']}, "
             f"after it {i['replays']} ({i['replays_identical']} byte for byte, marked idempotent-replayed), "
             f"another body {i['mismatch']}")
    if "g" in f:
        g = f["g"]
        note("g: " + "; ".join(f"{r['label']}: {r['ok_per_s']} ok/s, p99 {r['p99_ms']} ms, limit {r['limit']}"
                               for r in g["steps"]))
    if "d" in f and "skipped" not in f["d"]:
        d = f["d"]
        note(f"d: join moved {100 * d['moved_on_add_share']:.1f} % of keys (expected ~25 %), "
             f"{d['moved_on_add_not_to_new']} elsewhere; leave moved {100 * d['moved_on_remove_share']:.1f} % "
             f"(= the {d['held_by_removed']} keys it held), {d['moved_on_remove_not_owned']} others")


if __name__ == "__main__":
    sys.exit(main())
