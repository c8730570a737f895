//! `GET /metrics` on the control endpoint, over real sockets: the text format, and values
//! that follow the live state (generation, reloads by source and result, node health and
//! checks, drain, requests in flight, process figures); series of a removed node vanish
//! after a reload while those of kept nodes continue.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::*;

const TOKEN: &str = "metrics-token";

/// `promtool check metrics` (Debian's `prometheus` package; `.ci/run` installs it) finds
/// no problem in the exposition. Skipped, with a note, where promtool is missing outside CI.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not run ({e}); install Debian's prometheus package");
            return;
        }
        Err(e) => panic!("promtool is needed in CI: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn put(port: u16, body: &str) -> http::StatusCode {
    send(
        port,
        Request::builder()
            .method(Method::PUT)
            .uri("/api/v1/topology")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_live_state() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let api = free_port();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let control = format!(
        "control: {{ bind: \"127.0.0.1:{api}\", token_file: \"{}\" }}\n",
        token.display()
    );
    let topo = |with_b: bool| {
        let mut t = Topo::new()
            .defaults("health: { interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }")
            .node("a", a.addr);
        if with_b {
            t = t
                .node("b", b.addr)
                .env("blue", &["company.com"], "nodes: [a, b]");
        } else {
            t = t.env("blue", &["company.com"], "nodes: [a]");
        }
        t.yaml() + &control
    };
    let eg = Envgate::start_with(&topo(true), 2);
    let port = eg.port("http");

    let (text, s) = scrape(api).await;
    let version = format!(
        "envgate_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(s.get(&version), Some(&1.0), "{text}");
    assert_eq!(s["envgate_topology_generation"], 1.0);
    assert!(
        text.contains("# TYPE envgate_topology_reloads_total counter"),
        "{text}"
    );
    assert!(text.contains("# TYPE envgate_node_up gauge"), "{text}");
    for source in ["file", "signal", "api", "rollback", "fleet"] {
        for result in ["applied", "rejected", "unchanged"] {
            let k = format!(
                "envgate_topology_reloads_total{{result=\"{result}\",source=\"{source}\"}}"
            );
            assert_eq!(s.get(&k), Some(&0.0), "{k}\n{text}");
        }
    }
    assert!(s["process_resident_memory_bytes"] > 1e6, "{text}");
    assert!(s["process_open_fds"] >= 3.0, "{text}");
    assert!(s["process_start_time_seconds"] > 1.6e9, "{text}");
    assert!(s.contains_key("process_cpu_seconds_total"), "{text}");

    promtool_accepts(&text);

    // Both nodes come up; their passed checks count.
    let up = |n: &str| format!("envgate_node_up{{node=\"{n}\"}}");
    let checks =
        |n: &str, r: &str| format!("envgate_health_checks_total{{node=\"{n}\",result=\"{r}\"}}");
    let s = until(api, "both nodes up", |s| {
        s[&up("a")] == 1.0 && s[&up("b")] == 1.0
    })
    .await;
    assert!(s[&checks("a", "passed")] >= 1.0);
    assert_eq!(s[&checks("a", "failed")], 0.0);
    assert_eq!(s["envgate_node_drained{node=\"a\"}"], 0.0);
    assert_eq!(s["envgate_node_ejected{node=\"a\"}"], 0.0);
    assert_eq!(s["envgate_in_flight{environment=\"blue\"}"], 0.0);
    // Requests are served meanwhile (the data plane is not touched by scrapes).
    assert_eq!(get(port, "company.com", "/").await.status, 200);

    // Node b fails its checks: down, and its failures count.
    b.set_healthy(false);
    let s = until(api, "b down", |s| s[&up("b")] == 0.0).await;
    assert!(s[&checks("b", "failed")] >= 1.0);
    assert_eq!(s[&up("a")], 1.0);

    // A refused document counts as rejected and changes nothing else.
    assert_eq!(
        put(api, "version: 1\nnodes: { x: { address: nope } }\n").await,
        422
    );
    let s = until(api, "one rejection", |s| {
        s["envgate_topology_reloads_total{result=\"rejected\",source=\"api\"}"] == 1.0
    })
    .await;
    assert_eq!(s["envgate_topology_generation"], 1.0);

    // A reload that removes b: its series vanish, a's counters continue.
    let passed_before = s[&checks("a", "passed")];
    assert_eq!(put(api, &eg.fill(&topo(false))).await, 200);
    let (text, s) = scrape(api).await;
    assert_eq!(s["envgate_topology_generation"], 2.0);
    assert_eq!(
        s["envgate_topology_reloads_total{result=\"applied\",source=\"api\"}"],
        1.0
    );
    assert!(!text.contains("node=\"b\""), "{text}");
    assert!(s[&checks("a", "passed")] >= passed_before, "{text}");
    // The same document again is no change.
    assert_eq!(put(api, &eg.fill(&topo(false))).await, 200);
    let (_, s) = scrape(api).await;
    assert_eq!(
        s["envgate_topology_reloads_total{result=\"unchanged\",source=\"api\"}"],
        1.0
    );
    assert_eq!(s["envgate_topology_generation"], 2.0);

    // Other methods are refused.
    let r = send(
        api,
        Request::builder()
            .method(Method::POST)
            .uri("/metrics")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 405);
    drop(dir);
    eg.stop().await;
}

/// A real Prometheus (Debian's `prometheus` package; `.ci/run` installs it) scrapes
/// envgate's control endpoint and answers a query over what it scraped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_envgate() {
    if std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus is needed in CI"
        );
        eprintln!("prometheus not run: install Debian's prometheus package");
        return;
    }
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults("health: { interval: 100ms, timeout: 100ms }")
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start(&yaml);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: envgate\n    static_configs: [ {{ targets: [\"127.0.0.1:{api}\"] }} ]\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prometheus = Kill(child);

    // Three requests, then Prometheus starts, scrapes (every second) and answers a query
    // for them; bounded at 60 s.
    let port = eg.port("http");
    for _ in 0..3 {
        assert_eq!(get(port, "company.com", "/").await.status, 200);
    }
    let query = "/api/v1/query?query=envgate_requests_total%7Benvironment%3D%22blue%22%2Ccode%3D%22200%22%7D";
    let mut last = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(mut tx) = tokio::time::timeout(Duration::from_secs(1), connect_maybe(web)).await {
            if let Some(r) = tx.as_mut() {
                if let Ok(Ok(resp)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    r.send_request(
                        Request::builder()
                            .uri(query)
                            .header("host", "localhost")
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    ),
                )
                .await
                {
                    use http_body_util::BodyExt;
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    last = String::from_utf8_lossy(&body).into_owned();
                    let v: serde_json::Value =
                        serde_json::from_str(&last).unwrap_or(serde_json::Value::Null);
                    let result = &v["data"]["result"];
                    // A scrape may come before the last request was recorded: wait for 3.
                    if result.as_array().is_some_and(|r| !r.is_empty())
                        && result[0]["value"][1] == "3"
                    {
                        assert_eq!(v["status"], "success", "{last}");
                        assert_eq!(result[0]["metric"]["job"], "envgate", "{last}");
                        assert_eq!(result[0]["metric"]["node"], "a", "{last}");
                        assert_eq!(result[0]["value"][1], "3", "{last}");
                        eg.stop().await;
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Prometheus never answered with envgate's series: {last}");
}

/// An HTTP/1.1 connection to `port`, if something accepts there.
async fn connect_maybe(port: u16) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(tx)
}

/// Metric names (`envgate_*`, `process_*`) in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for prefix in ["envgate_", "process_"] {
        let mut rest = expr;
        while let Some(i) = rest.find(prefix) {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            out.push(name);
        }
    }
    out
}

/// `deploy/`: the Prometheus configuration and rules pass `promtool`, and every metric
/// the rules and the Grafana dashboard query is one envgate exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_rules_query_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/envgate-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            exprs.push(v["query"].as_str().unwrap().to_string());
        }
    }
    let rules = std::fs::read_to_string(root.join("prometheus/envgate-rules.yml")).unwrap();
    exprs.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_string),
    );

    let api = free_port();
    let a = Upstream::start("a").await;
    // A canary and a tenant rule, and a request through each, so that every request
    // family has series.
    let yaml = Topo::new()
        .node("a", a.addr)
        .env(
            "blue",
            &["company.com"],
            "nodes: [a], canary: { environment: green, weight: 50, header: X-Canary }, tenants: { key: { header: X-Tenant }, ranges: [ { from: 1, to: 1, environment: private } ] }",
        )
        .env("green", &[], "nodes: [a]")
        .env("private", &[], "nodes: [a]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    // A TLS listener, for the certificate series.
    let certs = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["company.com".to_string()]).unwrap();
    let (cert, key) = (certs.path().join("c.pem"), certs.path().join("k.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let listeners = "listeners: [ { name: http, bind: \"127.0.0.1:{port:http}\" } ]";
    assert!(yaml.contains(listeners));
    let yaml = yaml.replace(
        listeners,
        &format!(
            "listeners: [ {{ name: http, bind: \"127.0.0.1:{{port:http}}\" }}, {{ name: https, bind: \"127.0.0.1:{{port:https}}\", tls: {{ certificates: [ {{ cert: \"{}\", key: \"{}\" }} ] }} }} ]",
            cert.display(),
            key.display()
        ),
    );
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    for (name, value) in [("x-tenant", "1"), ("x-canary", "always")] {
        let req = Request::builder()
            .uri("/")
            .header("host", "company.com")
            .header(name, value)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(port, req).await.status, 200);
    }
    until(api, "two requests recorded", |s| {
        sum(s, "envgate_requests_total", &[]) == 2.0
    })
    .await;
    let (text, _) = scrape(api).await;
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "no envgate metric in {e:?}");
        for n in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(&n)
                .to_string();
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{e:?} queries {n}, which envgate does not export"
            );
        }
    }
    eg.stop().await;

    // promtool, where it is (CI installs it).
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "envgate-rules.yml"],
    ] {
        match std::process::Command::new("promtool")
            .args(&args)
            .current_dir(root.join("prometheus"))
            .output()
        {
            Ok(o) => assert!(
                o.status.success(),
                "promtool {args:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => assert!(
                std::env::var_os("CI").is_none(),
                "promtool is needed in CI: {e}"
            ),
        }
    }
}

/// `envgate_connections_active{listener}` counts open client connections across workers,
/// and falls back when they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_by_listener() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start_with(&yaml, 2);
    let port = eg.port("http");
    let key = "envgate_connections_active{listener=\"http\"}";
    let s = until(api, "no connection open", |s| s.get(key) == Some(&0.0)).await;
    assert_eq!(s[key], 0.0);

    // Five keep-alive connections, each having served a request (so each was accepted).
    let mut conns = Vec::new();
    for _ in 0..5 {
        let mut tx = connect(port).await;
        assert_eq!(get_on(&mut tx, "company.com", "/").await.status, 200);
        conns.push(tx);
    }
    until(api, "five open", |s| s[key] == 5.0).await;
    conns.truncate(2);
    until(api, "two open", |s| s[key] == 2.0).await;
    drop(conns);
    until(api, "none open", |s| s[key] == 0.0).await;
    eg.stop().await;
}

/// Retries and passive ejections count: a node that refuses connections is tried, each
/// request retried on the live node, until passive detection ejects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_ejections_count() {
    let live = Upstream::start("live").await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let api = free_port();
    let yaml = Topo::new()
        .defaults("health: { interval: 1m, timeout: 1s, trust_unknown: true }")
        .node("dead", dead)
        .node("live", live.addr)
        .env("blue", &["company.com"], "nodes: [dead, live]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start_with(&yaml, 1);
    let port = eg.port("http");
    let (_, s) = scrape(api).await;
    assert_eq!(s["envgate_retries_total{environment=\"blue\"}"], 0.0);
    assert_eq!(s["envgate_passive_ejections_total{node=\"dead\"}"], 0.0);
    for _ in 0..20 {
        assert_eq!(get(port, "company.com", "/").await.status, 200);
    }
    let (text, s) = scrape(api).await;
    // Five consecutive failures eject the node (the default); each of them was retried.
    assert_eq!(
        s["envgate_passive_ejections_total{node=\"dead\"}"], 1.0,
        "{text}"
    );
    assert_eq!(
        s["envgate_passive_ejections_total{node=\"live\"}"], 0.0,
        "{text}"
    );
    assert_eq!(
        s["envgate_retries_total{environment=\"blue\"}"], 5.0,
        "{text}"
    );
    assert_eq!(s["envgate_node_ejected{node=\"dead\"}"], 1.0, "{text}");
    assert_eq!(live.hits(), 20);
    // The five failovers, by reason; every request counted against the node that answered.
    let s = until(api, "20 requests recorded", |s| {
        s.get("envgate_requests_total{code=\"200\",environment=\"blue\",node=\"live\"}")
            == Some(&20.0)
    })
    .await;
    let failovers = |reason: &str| {
        s[&format!("envgate_failovers_total{{environment=\"blue\",reason=\"{reason}\"}}")]
    };
    assert_eq!(failovers("connect_failed"), 5.0);
    assert_eq!(
        failovers("timeout") + failovers("reset") + failovers("local_resources"),
        0.0
    );
    assert!(!s
        .keys()
        .any(|k| k.starts_with("envgate_requests_total") && k.contains("node=\"dead\"")));
    eg.stop().await;
}

/// Exact request counters with one worker and with two: by environment, node and status
/// (envgate's own answers under an empty node, unrouted ones under an empty environment
/// too), the latency histogram's count equal to the requests, response bytes equal to
/// what the client read; after a reload that removes a node, its series vanish and the
/// kept node's counters continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_exactly() {
    for workers in [1, 2] {
        requests_counted(workers).await;
    }
}

async fn requests_counted(workers: usize) {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let api = free_port();
    let control = format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let topo = |with_b: bool| {
        let t = Topo::new()
            .defaults("health: { interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }")
            .node("a", a.addr)
            .node("dead", dead)
            .env("red", &["red.example"], "nodes: [dead]");
        let t = if with_b {
            t.node("b", b.addr)
                .env("blue", &["company.com"], "nodes: [a, b]")
        } else {
            t.env("blue", &["company.com"], "nodes: [a]")
        };
        t.yaml() + &control
    };
    let eg = Envgate::start_with(&topo(true), workers);
    let port = eg.port("http");
    until(api, "a and b up", |s| {
        s.get("envgate_node_up{node=\"a\"}") == Some(&1.0)
            && s.get("envgate_node_up{node=\"b\"}") == Some(&1.0)
    })
    .await;

    let mut bytes = 0;
    for i in 0..20 {
        let r = get(port, "company.com", &format!("/item/{i}")).await;
        assert_eq!(r.status, 200);
        bytes += r.body.len();
    }
    for _ in 0..3 {
        assert_eq!(get(port, "nowhere.example", "/").await.status, 404);
    }
    for _ in 0..2 {
        assert_eq!(get(port, "red.example", "/").await.status, 503);
    }
    let requests = "envgate_requests_total";
    let s = until(api, "25 requests recorded", |s| {
        sum(s, requests, &[]) == 25.0
    })
    .await;
    let (text, _) = scrape(api).await;
    let ok_a = sum(
        &s,
        requests,
        &["environment=\"blue\"", "node=\"a\"", "code=\"200\""],
    );
    let ok_b = sum(
        &s,
        requests,
        &["environment=\"blue\"", "node=\"b\"", "code=\"200\""],
    );
    assert_eq!(ok_a + ok_b, 20.0, "{text}");
    if workers == 1 {
        // One round-robin: exactly half each.
        assert_eq!((ok_a, ok_b), (10.0, 10.0), "{text}");
    }
    assert_eq!(
        s["envgate_requests_total{code=\"404\",environment=\"\",node=\"\"}"], 3.0,
        "{text}"
    );
    assert_eq!(
        s["envgate_requests_total{code=\"503\",environment=\"red\",node=\"\"}"], 2.0,
        "{text}"
    );
    assert_eq!(
        s["envgate_request_duration_seconds_count{environment=\"blue\"}"], 20.0,
        "{text}"
    );
    assert_eq!(
        s["envgate_request_duration_seconds_bucket{environment=\"blue\",le=\"+Inf\"}"], 20.0,
        "{text}"
    );
    assert!(s["envgate_request_duration_seconds_sum{environment=\"blue\"}"] > 0.0);
    assert_eq!(
        s["envgate_response_bytes_total{environment=\"blue\"}"], bytes as f64,
        "{text}"
    );
    assert_eq!(s["envgate_request_bytes_total{environment=\"blue\"}"], 0.0);
    // Connections opened to the nodes were timed (at least one per node per worker).
    assert!(
        s["envgate_upstream_connect_seconds_count{environment=\"blue\"}"] >= 2.0,
        "{text}"
    );
    promtool_accepts(&text);

    // b leaves: its series vanish; a's counter goes on from where it was.
    eg.apply(&topo(false));
    for i in 0..5 {
        assert_eq!(
            get(port, "company.com", &format!("/after/{i}"))
                .await
                .status,
            200
        );
    }
    let want = ok_a + 5.0;
    let s = until(api, "a counts on", |s| {
        sum(s, requests, &["node=\"a\"", "code=\"200\""]) == want
    })
    .await;
    let (text, _) = scrape(api).await;
    assert!(!text.contains("node=\"b\""), "{text}");
    assert_eq!(
        s["envgate_request_duration_seconds_count{environment=\"blue\"}"], 25.0,
        "{text}"
    );
    eg.stop().await;
}

/// Canary and tenant decisions, counted for the environment whose rule decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_and_tenant_decisions_are_counted() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let api = free_port();
    let yaml = Topo::new()
        .defaults("health: { interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }")
        .node("a", a.addr)
        .node("b", b.addr)
        .env(
            "main",
            &["shop.example"],
            "nodes: [a], canary: { environment: main-canary, weight: 50, header: X-Canary }",
        )
        .env("main-canary", &[], "nodes: [b]")
        .env(
            "shared",
            &["t.example"],
            "nodes: [a], tenants: { key: { header: X-Tenant }, ranges: [ { from: 1, to: 10, environment: private } ] }",
        )
        .env("private", &[], "nodes: [b]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start_with(&yaml, 2);
    let port = eg.port("http");
    until(api, "a and b up", |s| {
        s.get("envgate_node_up{node=\"a\"}") == Some(&1.0)
            && s.get("envgate_node_up{node=\"b\"}") == Some(&1.0)
    })
    .await;
    let req = |host: &str, name: &str, value: &str| {
        Request::builder()
            .uri("/")
            .header("host", host)
            .header(name, value)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    for i in 0..10 {
        let arm = if i < 4 { "always" } else { "never" };
        let r = send(port, req("shop.example", "x-canary", arm)).await;
        assert_eq!(r.node(), if i < 4 { "b" } else { "a" });
    }
    for id in ["3", "3", "7", "42", "x"] {
        assert_eq!(
            send(port, req("t.example", "x-tenant", id)).await.status,
            200
        );
    }
    assert_eq!(get(port, "t.example", "/").await.status, 200);
    let s = until(api, "16 requests recorded", |s| {
        sum(s, "envgate_requests_total", &[]) == 16.0
    })
    .await;
    let (text, _) = scrape(api).await;
    let arm =
        |a: &str| s[&format!("envgate_canary_requests_total{{arm=\"{a}\",environment=\"main\"}}")];
    assert_eq!((arm("primary"), arm("canary")), (6.0, 4.0), "{text}");
    assert_eq!(
        s["envgate_tenant_routed_total{environment=\"shared\",target=\"private\"}"], 3.0,
        "{text}"
    );
    let decision = |d: &str| {
        s[&format!("envgate_tenant_decisions_total{{decision=\"{d}\",environment=\"shared\"}}")]
    };
    assert_eq!(
        [
            decision("routed"),
            decision("outside"),
            decision("missing"),
            decision("malformed")
        ],
        [3.0, 1.0, 1.0, 1.0],
        "{text}"
    );
    // Requests are counted where they were served.
    assert_eq!(
        s["envgate_requests_total{code=\"200\",environment=\"private\",node=\"b\"}"], 3.0,
        "{text}"
    );
    assert_eq!(
        s["envgate_requests_total{code=\"200\",environment=\"main-canary\",node=\"b\"}"], 4.0,
        "{text}"
    );
    promtool_accepts(&text);
    eg.stop().await;
}
