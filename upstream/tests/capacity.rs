//! Capacity mode on a real upstream: slots, queue, refusals, and switching it over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use keel_upstream::capacity::Capacity;
use keel_upstream::Upstream;

/// One HTTP/1.1 request on a fresh connection: (status, whole response text, latency).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    (status, text, started.elapsed())
}

#[test]
fn serves_c_at_once_queues_the_rest_and_refuses_past_the_queue() {
    let upstream = Upstream::start("svc").unwrap();
    upstream.set_capacity(Some(Capacity {
        concurrency: 2,
        service: Duration::from_millis(200),
        queue: 2,
        growth: 0.0,
    }));
    let port = upstream.port();
    let threads: Vec<_> = (0..6)
        .map(|i| {
            thread::spawn(move || {
                // Staggered so that arrivals have an order.
                thread::sleep(Duration::from_millis(30 * i));
                http(port, "GET", "/work", "")
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Two served at once, two queued, two refused at once (which ones depends on arrival, so
    // the counts are asserted, not the order).
    let served: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!((served.len(), refused.len()), (4, 2), "{results:?}");
    assert!(refused
        .iter()
        .all(|r| r.1.contains("x-keel-capacity: full")));
    // The queued ones waited for a slot: the slowest took two service times less its later
    // start (at most 90 ms; a loaded machine only makes it slower).
    let slowest = served.iter().map(|r| r.2).max().unwrap();
    assert!(slowest >= Duration::from_millis(300), "{slowest:?}");
    assert!(served.iter().all(|r| r.2 >= Duration::from_millis(200)));
    let counts = upstream.capacity_counts();
    assert_eq!(
        (
            counts.rejected,
            counts.waited,
            counts.in_service,
            counts.queued
        ),
        (2, 2, 0, 0)
    );
    assert_eq!(upstream.count_status(503), 2);
    assert_eq!(upstream.total(), 6);
}

#[test]
fn the_control_endpoint_sets_and_clears_capacity() {
    let upstream = Upstream::start("svc").unwrap();
    let port = upstream.port();
    let (status, text, _) = http(
        port,
        "POST",
        "/__keel/capacity",
        r#"{"concurrency": 1, "service": "50ms", "queue": 0}"#,
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        upstream.capacity(),
        Some(Capacity {
            concurrency: 1,
            service: Duration::from_millis(50),
            queue: 0,
            growth: 0.0
        })
    );
    // Service time applies: one request takes at least 50 ms.
    let (status, _, took) = http(port, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(50));
    let (status, text, _) = http(port, "GET", "/__keel/stats", "");
    assert_eq!(status, 200);
    assert!(text.contains(r#""capacity":{"#), "{text}");
    let (status, text, _) = http(
        port,
        "POST",
        "/__keel/capacity",
        r#"{"concurrency": 0, "service": "1ms"}"#,
    );
    assert_eq!(status, 400);
    assert!(text.contains("concurrency:"), "{text}");
    let (status, _, _) = http(port, "POST", "/__keel/capacity", r#"{"off": true}"#);
    assert_eq!(status, 200);
    assert_eq!(upstream.capacity(), None);
}
