#!/usr/bin/env python3
"""Keel's adaptive concurrency limit against Envoy's own, on the same overloaded upstream, in one run.

One Envoy (`--concurrency 2`) with three listeners in front of one `keel-upstream` in capacity
mode (C = 20 requests served at once, S = 10 ms each, queue 400, past it 503): no limit, Envoy's
`adaptive_concurrency` (gradient controller, its documented defaults), and Keel's
`keel_adaptive.wasm` (gradient controller, its defaults, which are Envoy's). `keel-load` (a
closed-loop client that reports the latency of successful answers apart) first measures the
unloaded latency with one connection, then offers each listener 6000 requests/s (three times
the upstream's capacity of 2000/s) from 200 paced connections, for 20 s each, in turn. Then the capacity drops to half (C = 10) in the
middle of a 20 s run, for Envoy's limit and for Keel's. Every 250 ms the script reads both
limits from Envoy's admin `/stats`, and the upstream's queue from its control endpoint.

Results: bench-results/adaptive.md (table), adaptive.json (everything measured),
adaptive-limit.svg and adaptive-goodput.svg. Benchmarks are reported, not asserted (exit 0
whatever the figures; 2 when the benchmark cannot run). Ports are free ones chosen at start.
The machine is shared and has two cores: Envoy, the upstream and the load generator compete for
them, which the report states beside the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
CAPACITY = 20
SERVICE_MS = 10
QUEUE = 400
CONNECTIONS = 200
# Offered load: three times the upstream's capacity (C / S = 2000 requests/s).
RATE = 3 * CAPACITY * 1000 // SERVICE_MS
SECONDS = 20


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_envoy() -> str:
    chosen = os.environ.get("KEEL_ENVOY")
    for candidate in (chosen, str(ROOT / ".venv" / "envoy"), shutil.which("envoy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError("no Envoy: set KEEL_ENVOY, or run `make setup` (installs .venv/envoy)")


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def build_tools() -> tuple:
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "keel-upstream", "--bin", "keel-upstream", "--bin", "keel-load"],
        cwd=ROOT,
        check=True,
    )
    release = target_dir() / "release"
    return str(release / "keel-upstream"), str(release / "keel-load")


def get(url: str, body: bytes | None = None, timeout: float = 5) -> str:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


ENVOY_AC = """
          - name: envoy.filters.http.adaptive_concurrency
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency
              gradient_controller_config:
                sample_aggregate_percentile: { value: 50 }
                concurrency_limit_params:
                  concurrency_update_interval: 0.1s
                min_rtt_calc_params:
                  interval: 60s
                  request_count: 50"""

KEEL_AC = """
          - name: keel.adaptive
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: adaptive
                root_id: adaptive
                vm_config:
                  vm_id: keel
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: DIST/keel_adaptive.wasm } }
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{"policies": [{"name": "bench", "scope": "cluster", "concurrency": {"controller": "gradient"}}]}'"""


def listener(name: str, port: int, filters: str) -> str:
    return f"""
  - name: {name}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            name: {name}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - name: "{name}"
                match: {{ prefix: "/" }}
                route: {{ cluster: backend, timeout: 30s }}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"""


def envoy_config(admin: int, ports: dict, upstream: int) -> str:
    listeners = (
        listener("none", ports["none"], "")
        + listener("envoy", ports["envoy"], ENVOY_AC)
        + listener("keel", ports["keel"], KEEL_AC.replace("DIST", str(ROOT / "dist")))
    )
    return f"""admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}
static_resources:
  listeners:{listeners}
  clusters:
  - name: backend
    connect_timeout: 1s
    type: STATIC
    # Envoy's default circuit breaker (1024 pending) is far above the load; no retries.
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {upstream} }}
"""


class Sampler(threading.Thread):
    """Every 250 ms: both limits from Envoy's stats, the upstream's queue."""

    def __init__(self, admin: int, upstream: int):
        super().__init__(daemon=True)
        self.admin = admin
        self.upstream = upstream
        self.samples: list = []
        self.stop_flag = threading.Event()
        self.start_time = time.monotonic()

    def run(self):
        while not self.stop_flag.is_set():
            row = {"t": round(time.monotonic() - self.start_time, 3)}
            try:
                stats = json.loads(get(f"http://127.0.0.1:{self.admin}/stats?format=json&filter=concurrency_limit|keel.adaptive.bench|min_rtt"))
                for stat in stats.get("stats", []):
                    name, value = stat.get("name", ""), stat.get("value")
                    if name.endswith("gradient_controller.concurrency_limit"):
                        row["envoy_limit"] = value
                    elif name.endswith("gradient_controller.min_rtt_msecs"):
                        row["envoy_min_rtt_ms"] = value
                    elif name.endswith("keel.adaptive.bench.limit"):
                        row["keel_limit"] = value
                    elif name.endswith("keel.adaptive.bench.min_rtt_us"):
                        row["keel_min_rtt_ms"] = value / 1000 if value else value
                capacity = json.loads(get(f"http://127.0.0.1:{self.upstream}/__keel/capacity"))
                row["in_service"] = capacity.get("in_service")
                row["queued"] = capacity.get("queued")
            except Exception as e:  # a missed sample is reported as missing, never fatal
                row["error"] = str(e)
            self.samples.append(row)
            self.stop_flag.wait(0.25)

    def window(self, start: float, end: float) -> list:
        return [s for s in self.samples if start <= s["t"] <= end]


def run_load(load: str, port: int, connections: int, seconds: int, rate: int | None) -> dict:
    command = [load, "--url", f"http://127.0.0.1:{port}/work", "--connections", str(connections), "--duration", f"{seconds}s"]
    if rate:
        command += ["--rate", str(rate)]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if out.returncode != 0:
        raise BenchError(f"keel-load failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def set_capacity(upstream: int, concurrency: int):
    body = json.dumps({"concurrency": concurrency, "service": f"{SERVICE_MS}ms", "queue": QUEUE}).encode()
    get(f"http://127.0.0.1:{upstream}/__keel/capacity", body)


def phase(name, sampler, load, port, connections, seconds, rate=None, during=None) -> dict:
    start = time.monotonic() - sampler.start_time
    timer = None
    if during:
        timer = threading.Timer(during[0], during[1])
        timer.start()
    result = run_load(load, port, connections, seconds, rate)
    if timer:
        timer.join()
    end = time.monotonic() - sampler.start_time
    result["name"] = name
    result["window"] = [round(start, 3), round(end, 3)]
    result["limits"] = sampler.window(start, end)
    lat = result["ok_latency_us"]
    print(
        f"  {name:<16} ok/s {result['ok_per_s']:7.0f}  p50 {lat['p50'] / 1000:6.1f} ms  p99 {lat['p99'] / 1000:6.1f} ms"
        f"  statuses {result['by_status']}  errors {result['errors']}",
        flush=True,
    )
    return result


def median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def follow_time(result: dict, key: str, drop_at: float) -> float | None:
    """Seconds after the drop until the limit is at most 60 % of its median over the 5 s before."""
    start = result["window"][0]
    before = [s.get(key) for s in result["limits"] if drop_at - 5 <= s["t"] - start < drop_at]
    reference = median(before)
    if not reference:
        return None
    for s in result["limits"]:
        t = s["t"] - start
        if t >= drop_at and s.get(key) is not None and s[key] <= 0.6 * reference:
            return round(t - drop_at, 2)
    return None


def svg_lines(title: str, series: list, y_label: str, width=900, height=320) -> str:
    """series: [(label, colour, [(x, y), ...])]."""
    pad_l, pad_r, pad_t, pad_b = 60, 160, 30, 40
    xs = [x for _, _, pts in series for x, _ in pts] or [0, 1]
    ys = [y for _, _, pts in series for _, y in pts] or [0, 1]
    x0, x1 = 0, max(xs) or 1
    y1 = max(ys) * 1.1 or 1
    sx = lambda x: pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)
    sy = lambda y: height - pad_b - y / y1 * (height - pad_t - pad_b)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="{pad_l}" y="18" font-size="14">{title}</text>',
        f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#444"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#444"/>',
        f'<text x="{(width - pad_r + pad_l) / 2}" y="{height - 8}" text-anchor="middle">seconds into the phase</text>',
        f'<text x="14" y="{(height) / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">{y_label}</text>',
    ]
    for i in range(6):
        v = y1 * i / 5
        parts.append(f'<text x="{pad_l - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        parts.append(f'<line x1="{pad_l}" y1="{sy(v):.1f}" x2="{width - pad_r}" y2="{sy(v):.1f}" stroke="#eee"/>')
    for i in range(int(x1) + 1):
        if i % 5 == 0:
            parts.append(f'<text x="{sx(i):.1f}" y="{height - pad_b + 14}" text-anchor="middle">{i}</text>')
    for n, (label, colour, pts) in enumerate(series):
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{path}"/>')
        parts.append(f'<rect x="{width - pad_r + 10}" y="{pad_t + n * 18}" width="12" height="3" fill="{colour}"/>')
        parts.append(f'<text x="{width - pad_r + 28}" y="{pad_t + n * 18 + 5}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def limit_series(result: dict, key: str) -> list:
    start = result["window"][0]
    return [(s["t"] - start, s[key]) for s in result["limits"] if s.get(key) is not None]


def run(args) -> int:
    envoy_bin = find_envoy()
    if not (ROOT / "dist" / "keel_adaptive.wasm").exists():
        raise BenchError("dist/keel_adaptive.wasm is missing: run `make build`")
    upstream_bin, load = build_tools()
    seconds = args.seconds
    ports = {name: free_port() for name in ("none", "envoy", "keel")}
    admin, upstream_port = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="keel-adaptive-bench-"))
    procs = []
    try:
        upstream = subprocess.Popen(
            [upstream_bin, "--name", "backend", "--port", str(upstream_port), "--capacity", str(CAPACITY),
             "--service", f"{SERVICE_MS}ms", "--queue", str(QUEUE)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        procs.append(upstream)
        config = workdir / "envoy.yaml"
        config.write_text(envoy_config(admin, ports, upstream_port))
        log = open(workdir / "envoy.log", "w")
        envoy = subprocess.Popen(
            [envoy_bin, "-c", str(config), "--concurrency", "2", "--base-id", str(os.getpid() % 60000 + 1000),
             "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        procs.append(envoy)
        deadline = time.time() + 30
        while True:
            try:
                if get(f"http://127.0.0.1:{admin}/ready").strip() == "LIVE":
                    break
            except Exception:
                pass
            if time.time() > deadline or envoy.poll() is not None:
                raise BenchError(f"Envoy did not start; log: {(workdir / 'envoy.log').read_text()[-2000:]}")
            time.sleep(0.2)
        sampler = Sampler(admin, upstream_port)
        sampler.start()
        print(f"adaptive bench: upstream C={CAPACITY} S={SERVICE_MS}ms queue {QUEUE}; {args.rate} requests/s offered by {args.connections} connections, {seconds} s per phase", flush=True)
        phases = {}
        phases["unloaded"] = phase("unloaded", sampler, load, ports["none"], 1, 5)
        for name in ("none", "envoy", "keel"):
            time.sleep(3)
            phases[name] = phase(name, sampler, load, ports[name], args.connections, seconds, args.rate)
        drop_at = seconds / 2
        for name in ("envoy", "keel"):
            time.sleep(3)
            set_capacity(upstream_port, CAPACITY)
            phases[f"{name}_drop"] = phase(
                f"{name} half-drop", sampler, load, ports[name], args.connections, seconds, args.rate,
                during=(drop_at, lambda: set_capacity(upstream_port, CAPACITY // 2)),
            )
        set_capacity(upstream_port, CAPACITY)
        sampler.stop_flag.set()
        sampler.join(timeout=2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    report(phases, args, drop_at, load_avg=os.getloadavg())
    return 0


def suffix(args) -> str:
    tag = getattr(args, "tag", "")
    return f"-{tag}" if tag else ""


def report(phases: dict, args, drop_at: float, load_avg):
    capacity_rps = CAPACITY * 1000 / SERVICE_MS
    unloaded = phases["unloaded"]["ok_latency_us"]
    rows = []
    for key, label, limit_key in (
        ("none", "no limit", None),
        ("envoy", "Envoy adaptive_concurrency", "envoy_limit"),
        ("keel", "Keel adaptive (gradient)", "keel_limit"),
    ):
        r = phases[key]
        lat = r["ok_latency_us"]
        limits = [s.get(limit_key) for s in r["limits"]] if limit_key else []
        rows.append({
            "phase": key, "label": label, "ok_per_s": round(r["ok_per_s"]),
            "share_of_capacity": round(r["ok_per_s"] / capacity_rps, 3),
            "p50_ms": lat["p50"] / 1000, "p99_ms": lat["p99"] / 1000,
            "refused_per_s": round(sum(v for k, v in r["by_status"].items() if k != "200") / max(r["duration_s"], 1e-9)),
            "median_limit": median(limits) if limit_key else None,
        })
    follow = {
        "envoy": follow_time(phases["envoy_drop"], "envoy_limit", drop_at),
        "keel": follow_time(phases["keel_drop"], "keel_limit", drop_at),
    }
    keel = next(r for r in rows if r["phase"] == "keel")
    envoy = next(r for r in rows if r["phase"] == "envoy")
    goal = {
        "keel_goodput_at_least_90pct": keel["share_of_capacity"] >= 0.9,
        "keel_p99_at_most_2x_unloaded_p50": keel["p99_ms"] <= 2 * unloaded["p50"] / 1000,
        "keel_p99_better_than_envoy_at_equal_or_better_goodput": keel["p99_ms"] < envoy["p99_ms"] and keel["ok_per_s"] >= envoy["ok_per_s"] * 0.98,
        "keel_limit_follows_the_drop_within_5s": follow["keel"] is not None and follow["keel"] <= 5,
    }
    data = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": {"capacity": CAPACITY, "service_ms": SERVICE_MS, "queue": QUEUE, "connections": args.connections, "rate": args.rate,
                  "seconds": args.seconds, "envoy_concurrency": 2, "cpus": os.cpu_count(), "loadavg_after": load_avg},
        "unloaded_ms": {"p50": unloaded["p50"] / 1000, "p99": unloaded["p99"] / 1000},
        "rows": rows, "follow_s": follow, "goal": goal, "phases": phases,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"adaptive{suffix(args)}.json").write_text(json.dumps(data, indent=1) + "\n")
    series = [
        ("Envoy, overload", "#d62728", limit_series(phases["envoy"], "envoy_limit")),
        ("Keel, overload", "#1f77b4", limit_series(phases["keel"], "keel_limit")),
        ("Envoy, C halved", "#ff9896", limit_series(phases["envoy_drop"], "envoy_limit")),
        ("Keel, C halved", "#aec7e8", limit_series(phases["keel_drop"], "keel_limit")),
    ]
    (RESULTS / f"adaptive{suffix(args)}-limit.svg").write_text(svg_lines(
        f"Concurrency limit over time (C = {CAPACITY}, halved at {drop_at:.0f} s in the 'C halved' runs)", series, "limit"))
    colours = {"none": "#7f7f7f", "envoy": "#d62728", "keel": "#1f77b4", "envoy_drop": "#ff9896", "keel_drop": "#aec7e8"}
    goodput = [(k, colours[k], [(p["t"], p["ok"]) for p in phases[k]["per_second"][:-1]]) for k in colours]
    (RESULTS / f"adaptive{suffix(args)}-goodput.svg").write_text(svg_lines("Successful responses per second", goodput, "ok / s"))
    lines = [
        "# Adaptive concurrency: Keel against Envoy's `adaptive_concurrency`, one run",
        "",
        f"Measured {data['date']} by `python3 bench/adaptive_bench.py{' --rate ' + str(args.rate) + ' --tag ' + args.tag if getattr(args, 'tag', '') else ''}` (part of `make bench`). One Envoy 1.40 "
        f"(`--concurrency 2`) with three listeners in front of one `keel-upstream` in capacity mode: "
        f"C = {CAPACITY} requests at once, S = {SERVICE_MS} ms each (capacity {capacity_rps:.0f} requests/s), "
        f"queue {QUEUE}, then 503. `keel-load`: {args.rate} requests/s offered ({args.rate / capacity_rps:.1f} x capacity) by "
        f"{args.connections} connections, each paced to its share and sending one request at a time, "
        f"{args.seconds} s per listener, in turn. Envoy's filter uses its documented defaults "
        f"(p50, 100 ms updates, minRTT every 60 s from 50 requests at concurrency 3, buffer 25 %); "
        f"Keel's uses its defaults, the same constants. The machine has {os.cpu_count()} cores, shared "
        f"with other work (load average {load_avg[0]:.1f} at the end): Envoy, the upstream and the "
        f"load generator compete for them, so absolute latencies include CPU queueing.",
        "",
        f"Unloaded latency (1 connection, no limit): p50 {unloaded['p50'] / 1000:.1f} ms, p99 {unloaded['p99'] / 1000:.1f} ms.",
        "",
        "| listener | successes/s | of capacity | p50 of successes | p99 of successes | refused/s | median limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        limit = "-" if r["median_limit"] is None else f"{r['median_limit']:.0f}"
        lines.append(f"| {r['label']} | {r['ok_per_s']} | {r['share_of_capacity'] * 100:.0f} % | {r['p50_ms']:.1f} ms | "
                     f"{r['p99_ms']:.1f} ms | {r['refused_per_s']} | {limit} |")
    idle = {}
    for key in ("envoy", "keel"):
        r = phases[key]
        starved = [s for s in r["limits"] if s.get("in_service") == 0 and s.get("queued") == 0]
        idle[key] = round(len(starved) / max(len(r["limits"]), 1), 2)
    data["upstream_idle_share"] = idle
    (RESULTS / f"adaptive{suffix(args)}.json").write_text(json.dumps(data, indent=1) + "\n")
    lines += [
        "",
        f"Share of the 250 ms samples in which the upstream had nothing in service and nothing queued "
        f"while the load ran: {idle['envoy'] * 100:.0f} % (Envoy's limit), {idle['keel'] * 100:.0f} % (Keel's limit). "
        f"Success latencies far above {SERVICE_MS} ms while the upstream is idle are time spent in "
        f"the proxy and the load generator waiting for a CPU, which a latency-based limit reads as "
        f"upstream queueing (see the per-second figures in adaptive.json).",
        "",
        f"Capacity halved at {drop_at:.0f} s: the limit fell to 60 % of its level before the drop after "
        f"{follow['envoy'] if follow['envoy'] is not None else 'never'} s (Envoy) and "
        f"{follow['keel'] if follow['keel'] is not None else 'never'} s (Keel).",
        "",
        "Goal (issue 16): " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goal.items()) + ".",
        "",
        f"![limit over time](adaptive{suffix(args)}-limit.svg)",
        "",
        f"![successes per second](adaptive{suffix(args)}-goodput.svg)",
        "",
    ]
    (RESULTS / f"adaptive{suffix(args)}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=SECONDS)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--tag", default="", help="suffix of the result files (adaptive-<tag>.md, ...)")
    parser.add_argument("--rate", type=int, default=RATE, help="requests/s offered (0: closed loop, as fast as answers come)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BenchError as e:
        print(f"adaptive bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
