//! `keel-load`: a closed-loop HTTP/1.1 load generator that reports the latency of successful
//! responses apart from the others (what `wrk` and `h2load` do not separate), for the adaptive
//! benchmark (`bench/adaptive_bench.py`).
//!
//! ```text
//! keel-load --url http://127.0.0.1:10000/ --connections 60 --duration 20s [--rate 6000]
//!           [--header NAME:VALUE]
//! ```
//!
//! Each connection sends one request at a time, the next as soon as the answer is read, until
//! the duration is over; with `--rate R` each connection paces itself to `R / connections`
//! requests a second (the next request leaves at its scheduled time, or at once when the answer
//! came later: a fast refusal does not make the client send faster, a slow answer makes it
//! send less, as a pool of `connections` clients of that rate would). It prints one JSON object: totals by
//! status, transport errors, latency percentiles of the `2xx` answers (µs), and the same per
//! second of the run. Loopback only: it connects to the address in the URL and nothing else.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

const USAGE: &str =
    "usage: keel-load --url http://HOST:PORT/PATH --connections N --duration DURATION [--rate R] [--header NAME:VALUE]";

/// One answered request: when it ended (ms since the start), its status, its latency (µs).
type Sample = (u32, u16, u32);

struct Options {
    host: String,
    port: u16,
    path: String,
    connections: usize,
    duration: Duration,
    /// Requests per second over all connections; `None`: as fast as answers come.
    rate: Option<f64>,
    headers: Vec<(String, String)>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut url = None;
    let mut connections = 10;
    let mut duration = Duration::from_secs(10);
    let mut headers = Vec::new();
    let mut rate = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag}: expected a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value.clone()),
            "--connections" => {
                connections = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| format!("--connections: expected 1..=10000, got {value:?}"))?
            }
            "--duration" => {
                duration = keel_core::time::Duration::parse(value)
                    .map(|d| Duration::from_nanos(d.as_nanos()))
                    .ok()
                    .filter(|d| !d.is_zero() && *d <= Duration::from_secs(600))
                    .ok_or_else(|| {
                        format!("--duration: expected a duration up to 10m, got {value:?}")
                    })?
            }
            "--rate" => {
                rate = Some(
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && *r > 0.0 && *r <= 1e6)
                        .ok_or_else(|| {
                            format!("--rate: expected requests per second, got {value:?}")
                        })?,
                )
            }
            "--header" => {
                let (name, v) = value
                    .split_once(':')
                    .ok_or_else(|| format!("--header: expected NAME:VALUE, got {value:?}"))?;
                headers.push((name.trim().to_string(), v.trim().to_string()));
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    let rest = url
        .strip_prefix("http://")
        .ok_or("--url: expected http://HOST:PORT/PATH")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or("--url: expected a port, http://HOST:PORT/PATH")?;
    let port = port
        .parse()
        .map_err(|_| format!("--url: bad port {port:?}"))?;
    Ok(Options {
        host: host.to_string(),
        port,
        path,
        connections,
        duration,
        rate,
        headers,
    })
}

async fn connection(
    options: Arc<Options>,
    index: usize,
    start: Instant,
    deadline: Instant,
) -> (Vec<Sample>, u64) {
    let mut samples = Vec::new();
    let mut errors = 0u64;
    let gap = options
        .rate
        .map(|r| Duration::from_secs_f64(options.connections as f64 / r));
    // Connections start spread over one gap, so that paced sends do not come in waves.
    let mut next_send = start
        + gap.map_or(Duration::ZERO, |g| {
            g.mul_f64(index as f64 / options.connections as f64)
        });
    let authority = format!("{}:{}", options.host, options.port);
    while Instant::now() < deadline {
        let Ok(stream) = TcpStream::connect((options.host.as_str(), options.port)).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            errors += 1;
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < deadline {
            if let Some(gap) = gap {
                let now = Instant::now();
                if next_send > now {
                    tokio::time::sleep_until(next_send.into()).await;
                }
                next_send = next_send.max(now) + gap;
                if next_send - gap >= deadline {
                    break;
                }
            }
            let mut builder = hyper::Request::get(options.path.as_str()).header("host", &authority);
            for (name, value) in &options.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            let Ok(request) = builder.body(Empty::new()) else {
                return (samples, errors + 1);
            };
            let sent = Instant::now();
            let Ok(response) = sender.send_request(request).await else {
                errors += 1;
                break;
            };
            let status = response.status().as_u16();
            let close = response
                .headers()
                .get("connection")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            if response.into_body().collect().await.is_err() {
                errors += 1;
                break;
            }
            let now = Instant::now();
            let latency = u32::try_from(now.duration_since(sent).as_micros()).unwrap_or(u32::MAX);
            let at = u32::try_from(now.duration_since(start).as_millis()).unwrap_or(u32::MAX);
            samples.push((at, status, latency));
            if close {
                break;
            }
        }
    }
    (samples, errors)
}

/// The `pct` percentile (nearest rank) of sorted values; 0 when empty.
fn percentile(sorted: &[u32], pct: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn latency_json(mut values: Vec<u32>) -> Value {
    values.sort_unstable();
    json!({
        "count": values.len(),
        "p50": percentile(&values, 50.0),
        "p90": percentile(&values, 90.0),
        "p99": percentile(&values, 99.0),
        "max": values.last().copied().unwrap_or(0),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(options) => Arc::new(options),
        Err(message) => {
            eprintln!("keel-load: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keel-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    let collected = Arc::new(Mutex::new((Vec::<Sample>::new(), 0u64)));
    let start = Instant::now();
    let deadline = start + options.duration;
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for index in 0..options.connections {
            let options = Arc::clone(&options);
            let collected = Arc::clone(&collected);
            tasks.push(tokio::spawn(async move {
                let (samples, errors) = connection(options, index, start, deadline).await;
                let mut all = collected.lock().unwrap_or_else(PoisonError::into_inner);
                all.0.extend(samples);
                all.1 += errors;
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
    let (samples, errors) =
        std::mem::take(&mut *collected.lock().unwrap_or_else(PoisonError::into_inner));
    let elapsed = start.elapsed().as_secs_f64();
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut ok = Vec::new();
    let seconds = options.duration.as_secs().max(1) as usize + 1;
    let mut per_second: Vec<(u64, u64, Vec<u32>)> = vec![(0, 0, Vec::new()); seconds];
    for (at, status, latency) in &samples {
        *by_status.entry(status.to_string()).or_insert(0) += 1;
        let second = (*at as usize / 1000).min(seconds - 1);
        let success = (200..300).contains(status);
        if success {
            ok.push(*latency);
        }
        if let Some(slot) = per_second.get_mut(second) {
            if success {
                slot.0 += 1;
                slot.2.push(*latency);
            } else {
                slot.1 += 1;
            }
        }
    }
    let per_second: Vec<Value> = per_second
        .into_iter()
        .enumerate()
        .map(|(t, (good, other, latencies))| {
            json!({"t": t, "ok": good, "other": other, "latency_us": latency_json(latencies)})
        })
        .collect();
    let report = json!({
        "connections": options.connections,
        "rate": options.rate,
        "duration_s": elapsed,
        "total": samples.len(),
        "errors": errors,
        "by_status": by_status,
        "ok_per_s": ok.len() as f64 / elapsed.max(1e-9),
        "ok_latency_us": latency_json(ok),
        "per_second": per_second,
    });
    println!("{report}");
    ExitCode::SUCCESS
}
