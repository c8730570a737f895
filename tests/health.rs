//! Health checks, passive ejection and failover through a running envgate, with real
//! nodes that die, fail their health path, hang, break connections and come back.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

const LISTENER: &str = r#"listeners: [ { name: http, bind: "127.0.0.1:{port:http}" } ]"#;

fn topology(health: &str, nodes: &[(&str, std::net::SocketAddr)], env_nodes: &str) -> String {
    let mut t = format!("version: 1\n{LISTENER}\ndefaults:\n{health}\nnodes:\n");
    for (name, addr) in nodes {
        t.push_str(&format!("  {name}: {{ address: \"{addr}\" }}\n"));
    }
    t.push_str(&format!(
        "environments:\n  production:\n    entries: [\":{{port:http}}\"]\n    nodes: {env_nodes}\n"
    ));
    t
}

/// Requests until `pred(node)` holds for `n` answers in a row, within `limit`.
async fn settles(port: u16, limit: Duration, n: usize, pred: impl Fn(&str) -> bool) -> bool {
    eventually(limit, || async {
        for _ in 0..n {
            let r = get(port, "x", "/").await;
            if r.status != 200 || !pred(r.node()) {
                return false;
            }
        }
        true
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_stopped_under_load_costs_no_request() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    // Checks are slow here on purpose: the requests meet the dead node before any check does.
    let eg = Envgate::start(&topology(
        "  health: { interval: 10s, timeout: 1s }",
        &[("a", a.addr), ("b", b.addr), ("c", c.addr)],
        "[a, b, c]",
    ));
    let port = eg.port("http");
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (ok, failed) = (ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            // A keep-alive client connection, 400 requests in a row.
            let mut tx = connect(port).await;
            for _ in 0..400 {
                tx.ready().await.unwrap();
                let req = Request::get("/")
                    .header("host", "x")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match tx.send_request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.into_body().collect().await;
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            ok.load(Ordering::SeqCst) >= 300
        })
        .await
    );
    b.stop();
    let b_hits = b.hits();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests lost when b died"
    );
    assert_eq!(ok.load(Ordering::SeqCst), 1600);
    // Only the requests b was serving as it stopped can have reached it afterwards (and
    // those whose answers were lost with it were sent again elsewhere).
    assert!(
        b.hits() <= b_hits + 4,
        "b served {} after it stopped",
        b.hits() - b_hits
    );
    assert!(a.hits() + b.hits() + c.hits() >= 1600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_path_takes_a_node_out_and_back() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    // interval * fall = 300 ms to go down, interval * rise = 200 ms to come back.
    let eg = Envgate::start(&topology(
        "  health: { interval: 100ms, timeout: 80ms, rise: 2, fall: 3, jitter: 0 }",
        &[("a", a.addr), ("b", b.addr)],
        "[a, b]",
    ));
    let p = eg.port("http");
    assert!(settles(p, Duration::from_secs(2), 4, |_| true).await);
    b.set_healthy(false); // still serves traffic, only its health path fails
    let margin = Duration::from_millis(700);
    assert!(
        settles(p, Duration::from_millis(300) + margin, 6, |n| n == "a").await,
        "b still served"
    );
    b.set_healthy(true);
    assert!(
        eventually(Duration::from_millis(200) + margin, || async {
            get(p, "x", "/").await.node() == "b"
        })
        .await,
        "b did not come back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_node_is_skipped_and_taken_out() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&topology(
        "  health: { interval: 200ms, timeout: 100ms, fall: 2 }\n  timeouts: { response_header: 300ms }",
        &[("a", a.addr), ("b", b.addr)],
        "[a, b]",
    ));
    let p = eg.port("http");
    b.set_hanging(true);
    // GETs that meet the hanging node time out there and are answered by a.
    for _ in 0..6 {
        let r = get(p, "x", "/").await;
        assert_eq!((r.status.as_u16(), r.node()), (200, "a"));
    }
    // Its checks time out too, so it goes down and requests stop waiting on it.
    assert!(
        eventually(Duration::from_secs(3), || async {
            eg.server().topology().nodes[1].state.health() == envgate::health::Health::Down
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_timed_out_is_not_sent_again() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&topology(
        "  health: { type: tcp, interval: 1m, timeout: 1s }\n  timeouts: { response_header: 300ms }\n  passive: { consecutive_failures: 0 }",
        &[("a", a.addr), ("b", b.addr)],
        "[a, b]",
    ));
    let p = eg.port("http");
    b.set_hanging(true);
    let mut codes = Vec::new();
    for _ in 0..2 {
        let req = Request::post("/")
            .header("host", "x")
            .body(Full::new(Bytes::from_static(b"order")))
            .unwrap();
        codes.push(send(p, req).await.status.as_u16());
    }
    codes.sort();
    assert_eq!(codes, [200, 504]);
    assert_eq!(a.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_comes_back() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&topology(
        "  health: { interval: 100ms, timeout: 80ms, rise: 2, fall: 2 }",
        &[("a", a.addr), ("b", b.addr)],
        "[a, b]",
    ));
    let p = eg.port("http");
    let addr = b.addr;
    b.stop();
    assert!(settles(p, Duration::from_secs(3), 6, |n| n == "a").await);
    let b2 = Upstream::start_on("b", addr).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            get(p, "x", "/").await.node() == "b"
        })
        .await
    );
    assert!(b2.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_down_is_503_at_once() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&topology(
        "  health: { interval: 100ms, timeout: 80ms, fall: 1 }",
        &[("a", a.addr), ("b", b.addr)],
        "[a, b]",
    ));
    let p = eg.port("http");
    a.stop();
    b.stop();
    assert!(
        eventually(Duration::from_secs(3), || async {
            get(p, "x", "/").await.status == 503
        })
        .await
    );
    // Never a hang: each answer comes back well within a bound.
    for _ in 0..5 {
        let r = tokio::time::timeout(Duration::from_secs(2), get(p, "x", "/"))
            .await
            .expect("no answer");
        assert_eq!(r.status, 503);
        assert_eq!(
            r.text(),
            r#"{"error":"no_healthy_node","environment":"production"}"#
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_gets_no_new_requests_but_finishes_its_own() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&topology(
        "  health: { interval: 100ms, timeout: 80ms }",
        &[("a", a.addr), ("b", b.addr)],
        "[a, b]",
    ));
    let p = eg.port("http");
    // The first request goes to a (equal weights, first listed first): make it slow.
    let slow = tokio::spawn(async move { get(p, "x", "/slow?ms=500").await });
    assert!(eventually(Duration::from_secs(3), || async { a.hits() == 1 }).await);
    eg.server().set_drained("a", true).unwrap();
    for _ in 0..10 {
        assert_eq!(get(p, "x", "/").await.node(), "b");
    }
    let r = slow.await.unwrap();
    assert_eq!((r.status.as_u16(), r.node()), (200, "a"));
    assert_eq!(a.hits(), 1);
    // Checks go on while drained; undrained, it serves again.
    assert!(eg.server().topology().nodes[0].state.health() == envgate::health::Health::Up);
    eg.server().set_drained("a", false).unwrap();
    assert!(
        eventually(Duration::from_secs(2), || async {
            get(p, "x", "/").await.node() == "a"
        })
        .await
    );
    assert!(eg.server().set_drained("nope", true).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_health() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let health = "  health: { interval: 150ms, timeout: 100ms, rise: 3, fall: 1 }";
    let first = topology(health, &[("a", a.addr), ("b", b.addr)], "[a, b]");
    let eg = Envgate::start(&first);
    let p = eg.port("http");
    b.set_healthy(false);
    assert!(settles(p, Duration::from_secs(3), 4, |n| n == "a").await);
    // b is healthy again, but needs three passes (450 ms) to come back: a reload now
    // must neither forget that b is down nor make a unknown.
    b.set_healthy(true);
    let second =
        format!("{first}  staging: {{ entries: [\"staging.com:{{port:http}}\"], nodes: [b] }}\n");
    let generation = eg.apply(&second);
    assert_eq!(generation, 2);
    for _ in 0..3 {
        assert_eq!(get(p, "x", "/").await.node(), "a");
    }
    assert_eq!(get(p, "staging.com", "/").await.status, 503);
    assert!(
        eventually(Duration::from_secs(3), || async {
            get(p, "staging.com", "/").await.status == 200
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_of_a_node_that_breaks_live_traffic() {
    let breaker = Breaker::start().await;
    let good = Upstream::start("good").await;
    // TCP checks pass on the breaker: only live traffic shows that it is broken.
    let eg = Envgate::start(&topology(
        "  health: { type: tcp, interval: 1m, timeout: 1s }\n  passive: { consecutive_failures: 3, ejection: 1500ms, max_ejection: 10s }",
        &[("breaker", breaker.addr), ("good", good.addr)],
        "[breaker, good]",
    ));
    let p = eg.port("http");
    for _ in 0..10 {
        let r = get(p, "x", "/").await;
        assert_eq!((r.status.as_u16(), r.node()), (200, "good"));
    }
    // The breaker met three requests (it may count them a little late).
    assert!(eventually(Duration::from_secs(2), || async { breaker.requests() >= 3 }).await);
    let seen = breaker.requests();
    // Ejected: the next requests do not even try it.
    for _ in 0..10 {
        assert_eq!(get(p, "x", "/").await.node(), "good");
    }
    assert_eq!(breaker.requests(), seen);
    // After the cool-down it gets one trial, fails it and is ejected again (for 3 s).
    assert!(
        eventually(Duration::from_secs(5), || async {
            assert_eq!(get(p, "x", "/").await.status, 200);
            breaker.requests() > seen
        })
        .await
    );
    let again = breaker.requests();
    for _ in 0..10 {
        assert_eq!(get(p, "x", "/").await.node(), "good");
    }
    assert_eq!(breaker.requests(), again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_a_node_is_not_sent_again() {
    let reader = Breaker::start().await;
    let good = Upstream::start("good").await;
    let eg = Envgate::start(&topology(
        "  health: { type: tcp, interval: 1m, timeout: 1s }\n  passive: { consecutive_failures: 0 }",
        &[("reader", reader.addr), ("good", good.addr)],
        "[reader, good]",
    ));
    let p = eg.port("http");
    // Round-robin alternates reader, good: of two POSTs one meets the reader, which read
    // it and broke the connection. It is not retried.
    let mut codes = Vec::new();
    for _ in 0..2 {
        let req = Request::post("/")
            .header("host", "x")
            .body(Full::new(Bytes::from_static(b"pay 10")))
            .unwrap();
        codes.push(send(p, req).await.status.as_u16());
    }
    codes.sort();
    assert_eq!(codes, [200, 502]);
    assert_eq!(good.hits(), 1);
    // GETs that meet the reader are sent again, to good.
    for _ in 0..4 {
        assert_eq!(get(p, "x", "/").await.status, 200);
    }
    assert_eq!(good.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_retries() {
    let breaker = Breaker::start().await;
    let good = Upstream::start("good").await;
    let eg = Envgate::start(&topology(
        "  health: { type: tcp, interval: 1m, timeout: 1s }\n  passive: { consecutive_failures: 0 }\n  retry_budget: { percent: 0, min_retries: 0 }",
        &[("breaker", breaker.addr), ("good", good.addr)],
        "[breaker, good]",
    ));
    let p = eg.port("http");
    // No budget: the requests that meet the breaker fail instead of being retried.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(get(p, "x", "/").await.status.as_u16());
    }
    codes.sort();
    assert_eq!(codes, [200, 200, 502, 502]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_threshold_spreads_over_all_nodes() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let eg = Envgate::start(&format!(
        "{}    panic_threshold: 50\n",
        topology(
            "  health: { interval: 100ms, timeout: 80ms, fall: 1 }",
            &[("a", a.addr), ("b", b.addr), ("c", c.addr)],
            "[a, b, c]"
        )
    ));
    let p = eg.port("http");
    // One of three down: 67% usable, above the threshold: health is honoured.
    c.set_healthy(false);
    assert!(settles(p, Duration::from_secs(3), 6, |n| n != "c").await);
    // Two of three down (their nodes still serve): 33% < 50%, traffic spreads over all.
    b.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(3), || async {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..6 {
                seen.insert(get(p, "x", "/").await.node().to_string());
            }
            seen.len() == 3
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_cluster_is_not_hammered_twice() {
    let (x, y) = (Breaker::start().await, Breaker::start().await);
    let eg = Envgate::start(&topology(
        "  health: { type: tcp, interval: 1m, timeout: 1s }\n  passive: { consecutive_failures: 0 }\n  retries: 2\n  retry_budget: { percent: 20, min_retries: 5 }",
        &[("x", x.addr), ("y", y.addr)],
        "[x, y]",
    ));
    let p = eg.port("http");
    // Every request fails. Without a budget each would be tried on both nodes (200
    // attempts); with it, 100 requests earn 20 retries on top of the 5 to start with.
    for _ in 0..100 {
        assert_eq!(get(p, "x", "/").await.status, 502);
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            x.requests() + y.requests() >= 100
        })
        .await
    );
    let attempts = x.requests() + y.requests();
    assert!(
        (100..=126).contains(&attempts),
        "{attempts} attempts for 100 requests"
    );
}
