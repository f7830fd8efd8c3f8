//! `keel-upstream`: a small HTTP upstream for the demo, the `envoy/*.yaml` examples and users.
//!
//! ```text
//! keel-upstream --name users-1 --port 18091 [--bind 127.0.0.1] [--fail-rate 0.0] [--status 500]
//! ```
//!
//! It answers `200` with its name as the body (header `x-upstream: <name>`), `/healthz` with
//! `200`, and fails a fraction `--fail-rate` of requests with `--status`. It prints one line
//! when it is ready. A running process is switched over HTTP on the same port, e.g.
//! `curl -XPOST localhost:18091/__keel/mode -d '{"mode":"fail","status":503}'` and
//! `curl localhost:18091/__keel/stats` (see `keel_upstream::control`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::thread;

use keel_upstream::{Mode, Upstream};

const USAGE: &str = "usage: keel-upstream --name NAME --port PORT [--bind ADDRESS] \
                     [--fail-rate RATE] [--status STATUS]";

struct Options {
    name: String,
    port: u16,
    bind: IpAddr,
    fail_rate: f64,
    status: u16,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        name: String::new(),
        port: 0,
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        fail_rate: 0.0,
        status: 500,
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
            other => return Err(format!("unknown option {other}")),
        }
    }
    if options.name.is_empty() {
        return Err("--name is required".to_string());
    }
    options.port = port.ok_or("--port is required")?;
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
    let upstream = match Upstream::start_at(&options.name, addr) {
        Ok(upstream) => upstream,
        Err(e) => {
            eprintln!("keel-upstream: {e:#}");
            return ExitCode::FAILURE;
        }
    };
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
    // Serving happens on the upstream's own runtime; this thread only keeps it alive until
    // the process is interrupted.
    loop {
        thread::park();
    }
}
