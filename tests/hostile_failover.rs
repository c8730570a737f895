//! Failover details: healthy backups before panic mode, retry tokens spent only for a node
//! actually tried, in-flight counts that survive reloads, checkers bound to the live state
//! of a node added back.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_does_not_skip_a_healthy_backup() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let yaml = topo(
        &[("a", a.addr), ("b", b.addr), ("c", c.addr)],
        "health: { interval: 100ms, timeout: 80ms, fall: 1 }",
        "panic_threshold: 50",
    )
    .replace("c: { address: ", "c: { backup: true, address: ");
    let eg = Envgate::start(&yaml);
    let p = eg.port("http");
    // Both primaries fail their checks (they still answer requests): the backup serves,
    // not the sick primaries.
    a.set_healthy(false);
    b.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let mut all_c = true;
            for _ in 0..6 {
                all_c &= get(p, "company.com", "/").await.node() == "c";
            }
            all_c
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_token_is_spent_only_for_a_node_tried() {
    let (x, y) = (Breaker::start().await, Breaker::start().await);
    let eg = Envgate::start(&topo(
        &[("x", x.addr), ("y", y.addr)],
        "health: { type: tcp, interval: 1m }, passive: { consecutive_failures: 0 }, retries: 5, retry_budget: { percent: 0, min_retries: 2 }",
        "",
    ));
    let p = eg.port("http");
    // Each request tries both nodes once (one retry), then finds no node left: the two
    // tokens pay for two requests' retries, not one.
    for _ in 0..2 {
        assert_eq!(get(p, "company.com", "/").await.status, 502);
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            x.requests() + y.requests() >= 4
        })
        .await
    );
    // Out of tokens: the third request makes one attempt.
    assert_eq!(get(p, "company.com", "/").await.status, 502);
    assert!(
        eventually(Duration::from_secs(2), || async {
            x.requests() + y.requests() >= 5
        })
        .await
    );
    assert_eq!(x.requests() + y.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_count_survives_a_reload() {
    let a = Upstream::start("a").await;
    let yaml = topo(&[("a", a.addr)], "", "limits: { max_in_flight: 1 }");
    // Several workers: the count is one per environment, whatever worker serves.
    let eg = Envgate::start_with(&yaml, 2);
    let p = eg.port("http");
    let slow = tokio::spawn(async move { get(p, "company.com", "/slow?ms=1500").await });
    assert!(eventually(Duration::from_secs(5), || async { a.hits() == 1 }).await);
    eg.apply(&yaml.replace("max_in_flight: 1 }", "max_in_flight: 1 }, retries: 1"));
    let r = get(p, "company.com", "/").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(get(p, "company.com", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_back_gets_a_checker_of_its_own() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let both = topo(
        &[("a", a.addr), ("b", b.addr)],
        "health: { interval: 100ms, timeout: 80ms }",
        "",
    );
    let only_b = topo(
        &[("b", b.addr)],
        "health: { interval: 100ms, timeout: 80ms }",
        "",
    );
    let eg = Envgate::start(&both);
    let p = eg.port("http");
    // Removed and added back at once: the checker must follow the new state of `a`.
    eg.apply(&only_b);
    eg.apply(&both);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "company.com", "/").await.node() == "a"
        })
        .await,
        "node a never came up after it was added back"
    );
}
