//! `keel-upstream`: a small HTTP upstream for the demo, the `envoy/*.yaml` examples and users.
//!
//! ```text
//! keel-upstream --name users-1 --port 18091 [--bind 127.0.0.1] [--fail-rate 0.0] [--status 500]
//!               [--etcd http://127.0.0.1:2379 --register /services/users/ [--ttl 3s]
//!                [--advertise 10.0.0.7]]
//!               [--capacity 20 --service 10ms [--queue 200] [--growth 0.0]]
//! ```
//!
//! It answers `200` with its name as the body (header `x-upstream: <name>`), `/healthz` with
//! `200`, and fails a fraction `--fail-rate` of requests with `--status`. It prints one line
//! when it is ready. A running process is switched over HTTP on the same port, e.g.
//! `curl -XPOST localhost:18091/__keel/mode -d '{"mode":"fail","status":503}'` and
//! `curl localhost:18091/__keel/stats` (see `keel_upstream::control`).
//!
//! With `--etcd` it registers itself: the key `<register><name>` holds
//! `{"address": <advertise or bind>, "port": <port>}` under a lease of `--ttl` (default 3s),
//! kept alive every third of the TTL and granted again if etcd lost it; SIGTERM or SIGINT
//! revoke the lease (the key vanishes at once) before the process exits
//! (see `keel_upstream::registry`).
//!
//! With `--capacity N --service D` it serves like a real service of `N` workers: at most `N`
//! requests at once for `D` each, the rest queued (up to `--queue`, default `10 N`), past that
//! `503` (see `keel_upstream::capacity`); `POST /__keel/capacity` changes it at run time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::thread;

use std::time::Duration;

use keel_upstream::registry::{Event, Registration};
use keel_upstream::{Mode, Upstream};

const USAGE: &str = "usage: keel-upstream --name NAME --port PORT [--bind ADDRESS] \
                     [--fail-rate RATE] [--status STATUS] \
                     [--etcd URL --register PREFIX [--ttl DURATION] [--advertise ADDRESS]] \
                     [--capacity N --service DURATION [--queue N] [--growth F]]";

struct Options {
    name: String,
    port: u16,
    bind: IpAddr,
    fail_rate: f64,
    status: u16,
    etcd: Option<String>,
    register: Option<String>,
    ttl: Duration,
    advertise: Option<IpAddr>,
    /// The capacity flags, as the JSON `POST /__keel/capacity` takes.
    capacity: serde_json::Map<String, serde_json::Value>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        name: String::new(),
        port: 0,
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        fail_rate: 0.0,
        status: 500,
        etcd: None,
        register: None,
        ttl: Duration::from_secs(3),
        advertise: None,
        capacity: serde_json::Map::new(),
    };
    let mut port = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag}: expected a value"))?;
        match flag.as_str() {
            "--name" => options.name = value.clone(),
            "--port" => {
                port = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--port: expected a port, got {value:?}"))?,
                )
            }
            "--bind" => {
                options.bind = value
                    .parse()
                    .map_err(|_| format!("--bind: expected an IP address, got {value:?}"))?
            }
            "--fail-rate" => {
                options.fail_rate = value
                    .parse()
                    .ok()
                    .filter(|r: &f64| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("--fail-rate: expected a number in [0, 1], got {value:?}")
                    })?
            }
            "--status" => {
                options.status = value
                    .parse()
                    .ok()
                    .filter(|s: &u16| (100..=599).contains(s))
                    .ok_or_else(|| format!("--status: expected an HTTP status, got {value:?}"))?
            }
            "--etcd" => options.etcd = Some(value.clone()),
            "--register" => options.register = Some(value.clone()),
            "--ttl" => {
                options.ttl = keel_core::time::Duration::parse(value)
                    .map(|d| Duration::from_nanos(d.as_nanos()))
                    .map_err(|_| format!("--ttl: expected a duration like \"3s\", got {value:?}"))?
            }
            "--advertise" => {
                options.advertise =
                    Some(value.parse().map_err(|_| {
                        format!("--advertise: expected an IP address, got {value:?}")
                    })?)
            }
            "--capacity" | "--queue" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| format!("{flag}: expected a whole number, got {value:?}"))?;
                options.capacity.insert(
                    if flag == "--capacity" {
                        "concurrency"
                    } else {
                        "queue"
                    }
                    .to_string(),
                    n.into(),
                );
            }
            "--service" => {
                options
                    .capacity
                    .insert("service".to_string(), value.clone().into());
            }
            "--growth" => {
                let g: f64 = value
                    .parse()
                    .map_err(|_| format!("--growth: expected a number, got {value:?}"))?;
                options.capacity.insert("growth".to_string(), g.into());
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if options.name.is_empty() {
        return Err("--name is required".to_string());
    }
    options.port = port.ok_or("--port is required")?;
    if options.etcd.is_some() != options.register.is_some() {
        return Err("--etcd and --register go together".to_string());
    }
    Ok(options)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("keel-upstream: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let addr = SocketAddr::new(options.bind, options.port);
    let registration = match (&options.etcd, &options.register) {
        (Some(url), Some(prefix)) => {
            let advertised =
                SocketAddr::new(options.advertise.unwrap_or(options.bind), options.port);
            match Registration::new(url, prefix, &options.name, advertised, options.ttl) {
                Ok(registration) => Some(registration),
                Err(message) => {
                    eprintln!("keel-upstream: {message}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => None,
    };
    let upstream = match Upstream::start_at(&options.name, addr) {
        Ok(upstream) => upstream,
        Err(e) => {
            eprintln!("keel-upstream: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if !options.capacity.is_empty() {
        match keel_upstream::control::capacity_from_json(&serde_json::Value::Object(
            options.capacity.clone(),
        )) {
            Ok(capacity) => upstream.set_capacity(capacity),
            Err(message) => {
                eprintln!("keel-upstream: capacity flags: {message}");
                return ExitCode::from(2);
            }
        }
    }
    if options.fail_rate > 0.0 {
        upstream.set_mode(Mode::FailRate {
            rate: options.fail_rate,
            status: options.status,
        });
    }
    println!(
        "keel-upstream {} ready on http://{} (fail rate {}, status {})",
        upstream.name(),
        upstream.addr(),
        options.fail_rate,
        options.status
    );
    let Some(registration) = registration else {
        // Serving happens on the upstream's own runtime; this thread only keeps it alive until
        // the process is interrupted.
        loop {
            thread::park();
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keel-upstream: starting the registration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let name = options.name.clone();
    runtime.block_on(registration.run(stop_signal(), |event| match event {
        Event::Registered { lease } => println!(
            "keel-upstream {name}: registered {} = {} in etcd {} (lease {lease:x}, ttl {}s)",
            registration.key,
            registration.value,
            registration.etcd,
            registration.ttl.as_secs()
        ),
        Event::LeaseLost { lease } => {
            println!("keel-upstream {name}: etcd lost lease {lease:x}; registering again")
        }
        Event::Failed { error } => eprintln!("keel-upstream {name}: {error}"),
        Event::Revoked { lease } => println!(
            "keel-upstream {name}: revoked lease {lease:x}; {} removed",
            registration.key
        ),
    }));
    drop(upstream);
    ExitCode::SUCCESS
}

/// Completes at the first SIGTERM or SIGINT (never, if neither can be watched).
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
