//! Attacks on the control endpoint's status page and `/metrics`: markup from hostile
//! documents must render as text, tenant ids past 2^53 must show exactly, query strings
//! and other methods, scrapes racing applies over many nodes, and process figures read
//! while the process name holds parentheses and spaces.

mod support;

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::*;

const TOKEN: &str = "attack-token";

/// Renders `url` until `ok` holds on the DOM (a bounded number of loads).
async fn render_until(url: &str, what: &str, ok: impl Fn(&str) -> bool) -> Option<String> {
    let mut last = String::new();
    for _ in 0..5 {
        let u = url.to_string();
        let dom = tokio::task::spawn_blocking(move || rendered(&u))
            .await
            .unwrap()?;
        if ok(&dom) {
            return Some(dom);
        }
        last = dom;
    }
    panic!("never: {what}\n{last}");
}

fn req(method: Method, uri: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn status(api: u16) -> serde_json::Value {
    let r = send(api, req(Method::GET, "/api/v1/status", "")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

/// A control block with a token file kept in `dir`.
fn control(api: u16, dir: &tempfile::TempDir) -> String {
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    format!(
        "control: {{ bind: \"127.0.0.1:{api}\", token_file: \"{}\" }}\n",
        token.display()
    )
}

/// A rejected document's names reach the history summary verbatim; the page must show
/// them as text, never as markup (the CSP allows inline handlers, so an injected
/// `<img onerror>` would run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markup_in_a_rejected_document_renders_as_text() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let dir = tempfile::tempdir().unwrap();
    let yaml = Topo::new()
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api, &dir);
    let eg = Envgate::start(&yaml);

    let hostile = "version: 1\nnodes:\n  \"<img src=x onerror=document.title='pwned'>\": { address: \"127.0.0.1:9\" }\nenvironments:\n  \"</td><script>document.title='pwned2'</script>\": { nodes: [a] }\n";
    let r = send(api, req(Method::PUT, "/api/v1/topology", hostile)).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let s = status(api).await;
    let summary = s["recent"][0]["summary"].as_str().unwrap().to_string();
    assert_eq!(s["recent"][0]["result"], "rejected", "{s}");
    assert!(summary.contains("<img src=x"), "{summary}");

    let url = format!("http://127.0.0.1:{api}/");
    let Some(dom) = render_until(&url, "the rejection shown", |d| d.contains("rejected")).await
    else {
        eg.stop().await;
        return;
    };
    assert!(dom.contains("&lt;img src=x onerror="), "{dom}");
    assert!(dom.contains("&lt;/td&gt;&lt;script&gt;"), "{dom}");
    assert!(!dom.contains("<img"), "markup injected: {dom}");
    assert!(!dom.contains("pwned'</script>"), "markup injected: {dom}");
    assert!(
        dom.contains("<title>envgate</title>"),
        "a script ran: {dom}"
    );
    eg.stop().await;
}

/// Tenant ids are u64: a range past 2^53 (snowflake-style ids) must show the bounds the
/// document gave, not the nearest double (`JSON.parse` rounds them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_ranges_past_two_to_the_53_show_exactly() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let api = free_port();
    let dir = tempfile::tempdir().unwrap();
    let yaml = Topo::new()
        .node("a", a.addr)
        .node("b", b.addr)
        .env(
            "shared",
            &["company.com"],
            "nodes: [a], tenants: { key: { header: X-Tenant }, ranges: [ { from: 9007199254740993, to: 18446744073709551615, environment: big } ] }",
        )
        .env("big", &[], "nodes: [b]")
        .yaml()
        + &control(api, &dir);
    let yaml = yaml.replace("entries: [], ", "");
    let eg = Envgate::start(&yaml);

    // The JSON itself is exact.
    let r = send(api, req(Method::GET, "/api/v1/status", "")).await;
    let text = r.text();
    assert!(
        text.contains("\"from\":9007199254740993") && text.contains("\"to\":18446744073709551615"),
        "{text}"
    );

    let url = format!("http://127.0.0.1:{api}/");
    let Some(dom) = render_until(&url, "the tenant ranges shown", |d| {
        d.contains("data-environment=\"shared\"")
    })
    .await
    else {
        eg.stop().await;
        return;
    };
    assert!(
        dom.contains("9007199254740993-18446744073709551615 → big"),
        "rounded tenant ids: {dom}"
    );
    eg.stop().await;
}

/// Query strings do not change what `/` and `/metrics` answer; other methods are refused
/// with 405 and nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_strings_and_methods_on_the_page_and_metrics() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let dir = tempfile::tempdir().unwrap();
    let yaml = Topo::new()
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api, &dir);
    let eg = Envgate::start(&yaml);

    let r = send(api, req(Method::GET, "/metrics?x=1&name[]=%22", "")).await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    assert!(
        r.text().contains("envgate_node_up{node=\"a\"}"),
        "{}",
        r.text()
    );

    let r = send(api, req(Method::GET, "/?a=b&%3Cscript%3E=1", "")).await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(!r.text().contains("%3Cscript%3E"), "the query reflected");

    for (m, path) in [
        (Method::POST, "/metrics"),
        (Method::PUT, "/metrics?x=1"),
        (Method::DELETE, "/"),
        (Method::POST, "/?a=b"),
        (Method::PATCH, "/"),
    ] {
        let r = send(api, req(m.clone(), path, "x")).await;
        assert_eq!(r.status, 405, "{m} {path}: {}", r.text());
    }
    // HEAD: whatever the answer, not a failure of the endpoint.
    for path in ["/", "/metrics"] {
        let r = send(api, req(Method::HEAD, path, "")).await;
        assert!(r.status.as_u16() < 500, "HEAD {path}: {}", r.status);
    }
    // Still serving after all that.
    let r = send(api, req(Method::GET, "/metrics", "")).await;
    assert_eq!(r.status, 200);
    eg.stop().await;
}

/// The node names of each node family of one scrape.
fn node_sets(text: &str) -> HashMap<String, BTreeSet<String>> {
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((family, rest)) = l.split_once('{') else {
            continue;
        };
        let Some(i) = rest.find("node=\"") else {
            continue;
        };
        let name = &rest[i + 6..];
        let name = &name[..name.find('"').unwrap()];
        out.entry(family.to_string())
            .or_default()
            .insert(name.to_string());
    }
    out
}

/// Scrapes from several clients at once while the topology flips between two sets of
/// many nodes: every scrape answers 200 and shows one topology, the same nodes in every
/// node family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_during_applies_see_one_topology_each() {
    const N: usize = 600;
    let api = free_port();
    let dir = tempfile::tempdir().unwrap();
    let ctl = control(api, &dir);
    // Nodes on closed loopback ports (checks fail fast); `odd` picks which half.
    let topo = |odd: bool| {
        let mut t = Topo::new().defaults("health: { type: tcp, interval: 2s, timeout: 200ms }");
        let mut names = Vec::new();
        for i in 0..N {
            if i % 3 == 0 || (i % 2 == 1) == odd {
                let name = format!("n{i}");
                t = t.node(
                    &name,
                    format!("127.0.{}.{}:9", i / 200, i % 200 + 1)
                        .parse()
                        .unwrap(),
                );
                names.push(name);
            }
        }
        let yaml = t
            .env(
                "blue",
                &["company.com"],
                &format!("nodes: [{}]", names.join(", ")),
            )
            .yaml()
            + &ctl;
        (yaml, names.into_iter().collect::<BTreeSet<String>>())
    };
    let (first, set_a) = topo(false);
    let (second, set_b) = topo(true);
    let eg = Envgate::start_with(&first, 2);
    let (doc_a, doc_b) = (eg.fill(&first), eg.fill(&second));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut scrapers = Vec::new();
    for _ in 0..6 {
        let stop = stop.clone();
        scrapers.push(tokio::spawn(async move {
            let mut texts = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || texts.is_empty() {
                let r = send(api, req(Method::GET, "/metrics", "")).await;
                assert_eq!(r.status, 200, "{}", r.text());
                texts.push(r.text().to_string());
            }
            texts
        }));
    }
    for i in 0..8 {
        let doc = if i % 2 == 0 { &doc_b } else { &doc_a };
        let r = send(api, req(Method::PUT, "/api/v1/topology", doc)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut scrapes = 0;
    for s in scrapers {
        for text in s.await.unwrap() {
            scrapes += 1;
            let sets = node_sets(&text);
            let up = &sets["envgate_node_up"];
            assert!(*up == set_a || *up == set_b, "a mixed topology: {up:?}");
            for family in [
                "envgate_node_ejected",
                "envgate_node_drained",
                "envgate_health_checks_total",
            ] {
                assert_eq!(&sets[family], up, "{family} disagrees with envgate_node_up");
            }
        }
    }
    assert!(scrapes >= 6);
    let r = send(api, req(Method::GET, "/metrics", "")).await;
    assert_eq!(r.status, 200);
    assert_eq!(node_sets(r.text())["envgate_node_up"], set_a);
    assert!(r
        .text()
        .contains("envgate_topology_reloads_total{source=\"api\",result=\"applied\"} 8"));
    eg.stop().await;
}

/// The process figures come from `/proc/self/stat`, whose second field (the command name)
/// may hold spaces and parentheses: with a name like `a) b (c) d` the fields after it must
/// still be read at their places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_metrics_with_parentheses_in_the_command_name() {
    // The command name of the whole process (its main thread), as `ps` shows it.
    std::fs::write("/proc/self/comm", "a) b (c) d").unwrap();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    assert!(stat.contains("(a) b (c) d)"), "{stat}");

    let a = Upstream::start("a").await;
    let api = free_port();
    let dir = tempfile::tempdir().unwrap();
    let yaml = Topo::new()
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api, &dir);
    let eg = Envgate::start(&yaml);
    let r = send(api, req(Method::GET, "/metrics", "")).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}: {text}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = value("process_start_time_seconds");
    assert!(
        start <= now + 2.0 && start > now - 3600.0,
        "{start} vs {now}"
    );
    let cpu = value("process_cpu_seconds_total");
    assert!((0.0..3600.0).contains(&cpu), "{cpu}");
    let (virt, rss) = (
        value("process_virtual_memory_bytes"),
        value("process_resident_memory_bytes"),
    );
    assert!(rss > 1e6 && virt >= rss, "virtual {virt}, resident {rss}");
    let (open, max) = (value("process_open_fds"), value("process_max_fds"));
    assert!(open >= 3.0 && max >= open, "open {open}, max {max}");
    eg.stop().await;
}
