//! Nodes addressed by a host name: every address the name resolves to is a member with its
//! own health and pool; a member that leaves the answer is drained; a name that does not
//! resolve leaves its node without members (a warning, not a refusal). Names are answered
//! from a hosts file given in `defaults.dns.hosts` (tests must not edit /etc/hosts); a
//! name not in it goes to the system resolver (`.invalid` never resolves there).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

/// Two nodes on the same port of 127.0.0.1 and 127.0.0.2 (all of 127/8 is loopback).
async fn pair() -> (Upstream, Upstream, u16) {
    for _ in 0..20 {
        let a = Upstream::start("a").await;
        let port = a.addr.port();
        let b: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        if std::net::TcpListener::bind(b).is_ok() {
            let b = Upstream::start_on("b", b).await;
            return (a, b, port);
        }
        a.stop();
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

struct Hosts {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Hosts {
    fn new(text: &str) -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        let h = Hosts { _dir: dir, path };
        h.set(text);
        h
    }

    /// Replaces the file whole (written aside, then renamed: a reader never sees half).
    fn set(&self, text: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

fn doc(hosts: &Hosts, nodes: &str, envs: &str, dns: &str, api: u16) -> String {
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
control: {{ bind: "127.0.0.1:{api}" }}
defaults:
  dns: {{ hosts: "{}", interval: 100ms, timeout: 500ms{dns} }}
  health: {{ interval: 200ms, timeout: 200ms, rise: 1, fall: 1 }}
  retries: 0
nodes:
{nodes}environments:
{envs}"#,
        hosts.path.display()
    )
}

async fn status(api: u16) -> serde_json::Value {
    let r = get(api, "localhost", "/api/v1/status").await;
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

/// The members' addresses of node `node` in the status.
async fn members(api: u16, node: &str) -> Vec<String> {
    let s = status(api).await;
    let mut m: Vec<String> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node"] == node)
        .map(|n| n["address"].as_str().unwrap().to_string())
        .collect();
    m.sort();
    m
}

async fn served_by(port: u16, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = get(port, "company.com", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
        out.push(r.node().to_string());
    }
    out
}

async fn both_members_then_one_drained(workers: usize) {
    let (a, b, port) = pair().await;
    let hosts = Hosts::new("127.0.0.1 orders.test\n127.0.0.2 orders.test\n");
    let api = free_port();
    let eg = Envgate::start_with(
        &doc(
            &hosts,
            &format!("  orders: {{ address: \"orders.test:{port}\" }}\n"),
            "  production: { entries: [\"company.com:{port:http}\"], apps: [ { name: shop, version: \"1\", path: /, nodes: [orders] } ], nodes: [orders] }\n",
            "",
            api,
        ),
        workers,
    );
    let p = eg.port("http");
    assert_eq!(
        members(api, "orders").await,
        [format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}")]
    );
    // Each member is health-checked on its own before it serves.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let seen = served_by(p, 8).await;
            seen.iter().any(|n| n == "a") && seen.iter().any(|n| n == "b")
        })
        .await,
        "both addresses are served"
    );
    // Metrics name each member.
    let (text, _) = scrape(api).await;
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let series = format!("envgate_node_up{{node=\"orders@{ip}:{port}\"}} 1");
        assert!(text.contains(&series), "{series}\n{text}");
    }
    assert!(
        text.contains("envgate_dns_addresses{node=\"orders\"} 2"),
        "{text}"
    );

    // Slow requests in flight on both members; then 127.0.0.2 leaves the answer.
    let slow: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(p, "company.com", "/slow?ms=1500").await }))
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.hits() > 0 && a.hits() > 0
        })
        .await,
        "slow requests reached both members"
    );
    hosts.set("127.0.0.1 orders.test\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            members(api, "orders").await == [format!("127.0.0.1:{port}")]
        })
        .await,
        "the member that left the answer is removed"
    );
    // Drained, not cut: what it was serving finishes.
    for s in slow {
        let r = s.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // New requests go to the remaining member only.
    let b_before = b.hits();
    assert!(served_by(p, 20).await.iter().all(|n| n == "a"));
    assert_eq!(b.hits(), b_before);
    let s = status(api).await;
    let recent = s["recent"].as_array().unwrap();
    assert!(
        recent
            .iter()
            .any(|r| r["source"] == "dns" && r["result"] == "applied"),
        "{recent:?}"
    );
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_with_two_addresses_serves_both_and_drains_one_that_leaves() {
    both_members_then_one_drained(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_with_two_addresses_serves_both_and_drains_one_that_leaves_two_workers() {
    both_members_then_one_drained(2).await;
}

/// A name that does not resolve: the topology is taken, with a warning; its environment
/// gets 503 while another environment serves; once the name resolves, its node serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unresolvable_name_leaves_its_node_without_members_until_it_resolves() {
    let other = Upstream::start("other").await;
    let ghost = Upstream::start("ghost").await;
    let port = ghost.addr.port();
    let hosts = Hosts::new("# nothing yet\n");
    let api = free_port();
    let eg = Envgate::start_with(
        &doc(
            &hosts,
            &format!(
                "  ghost: {{ address: \"ghost.invalid:{port}\" }}\n  other: {{ address: \"{}\" }}\n",
                other.addr
            ),
            "  production: { entries: [\"company.com:{port:http}\"], nodes: [ghost] }\n  staging: { entries: [\"staging.com:{port:http}\"], nodes: [other] }\n",
            "",
            api,
        ),
        2,
    );
    let p = eg.port("http");
    let topo = eg.server().topology();
    assert!(
        topo.warnings
            .iter()
            .any(|w| w.contains("ghost.invalid") && w.contains("does not resolve")),
        "{:?}",
        topo.warnings
    );
    assert!(members(api, "ghost").await.is_empty());
    let r = get(p, "company.com", "/").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("no_healthy_node"), "{}", r.text());
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "staging.com", "/").await.status == 200
        })
        .await
    );
    let s = status(api).await;
    assert_eq!(s["dns"][0]["name"], "ghost.invalid", "{s}");
    assert!(s["dns"][0]["error"].is_string(), "{s}");
    let (text, _) = scrape(api).await;
    assert!(
        text.contains("envgate_dns_failing{node=\"ghost\"} 1"),
        "{text}"
    );

    hosts.set("127.0.0.1 ghost.invalid\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(p, "company.com", "/").await.node() == "ghost"
        })
        .await,
        "the node serves once its name resolves"
    );
    let (text, _) = scrape(api).await;
    assert!(
        text.contains("envgate_dns_failing{node=\"ghost\"} 0"),
        "{text}"
    );
    eg.stop().await;
}

/// A name that stops resolving keeps its last answer for `hold`, then loses its members.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_that_stops_resolving_keeps_its_last_answer_for_the_hold_only() {
    let a = Upstream::start("a").await;
    let port = a.addr.port();
    let hosts = Hosts::new("127.0.0.1 orders.invalid\n");
    let api = free_port();
    let text = |hold: &str| {
        doc(
            &hosts,
            &format!("  orders: {{ address: \"orders.invalid:{port}\" }}\n"),
            "  production: { entries: [\"company.com:{port:http}\"], nodes: [orders] }\n",
            &format!(", hold: {hold}"),
            api,
        )
    };
    let eg = Envgate::start_with(&text("1h"), 1);
    let p = eg.port("http");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "company.com", "/").await.status == 200
        })
        .await
    );
    hosts.set("# gone\n");
    // The failure is seen (status and metrics), the member stays and serves.
    assert!(
        eventually(Duration::from_secs(10), || async {
            status(api).await["dns"][0]["error"].is_string()
        })
        .await
    );
    assert_eq!(members(api, "orders").await, [format!("127.0.0.1:{port}")]);
    assert_eq!(get(p, "company.com", "/").await.status, 200);
    // A short hold: the member goes, and the environment has nothing to serve with.
    eg.apply(&text("300ms"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            members(api, "orders").await.is_empty()
        })
        .await,
        "members are dropped after the hold"
    );
    assert_eq!(get(p, "company.com", "/").await.status, 503);
    eg.stop().await;
}

/// Health is per member: one address failing its checks takes only that member out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_checks_are_per_member() {
    let (a, b, port) = pair().await;
    let hosts = Hosts::new("127.0.0.1 orders.test\n127.0.0.2 orders.test\n");
    let api = free_port();
    let eg = Envgate::start_with(
        &doc(
            &hosts,
            &format!("  orders: {{ address: \"orders.test:{port}\" }}\n"),
            "  production: { entries: [\"company.com:{port:http}\"], nodes: [orders] }\n",
            "",
            api,
        ),
        1,
    );
    let p = eg.port("http");
    assert!(
        eventually(Duration::from_secs(10), || async {
            let seen = served_by(p, 8).await;
            seen.iter().any(|n| n == "b")
        })
        .await
    );
    b.set_healthy(false);
    let down = format!("envgate_node_up{{node=\"orders@127.0.0.2:{port}\"}}");
    until(api, "member b down", |s| s.get(&down) == Some(&0.0)).await;
    let up = format!("envgate_node_up{{node=\"orders@127.0.0.1:{port}\"}}");
    let (_, s) = scrape(api).await;
    assert_eq!(s.get(&up), Some(&1.0));
    assert!(served_by(p, 10).await.iter().all(|n| n == "a"));
    drop(a);
    eg.stop().await;
}

/// Validation: a mistyped IP address is not taken for a name, two nodes may not share a
/// name and port, and a hosts file that does not exist is refused.
#[test]
fn names_in_documents_are_checked() {
    let hosts = Hosts::new("127.0.0.1 orders.test\n");
    let parse = |nodes: &str, hosts_path: &str| {
        let text = format!(
            r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:8080" }} ]
defaults: {{ dns: {{ hosts: "{hosts_path}" }} }}
nodes:
{nodes}environments:
  production: {{ entries: [":8080"], nodes: [a] }}
"#
        );
        envgate::config::parse(&text, std::path::Path::new("."))
    };
    let path = hosts.path.display().to_string();
    let t = parse("  a: { address: \"orders.test:9000\" }\n", &path).unwrap();
    assert_eq!(t.nodes.len(), 1);
    assert_eq!(&*t.nodes[0].name, "a@127.0.0.1:9000");
    assert_eq!(&*t.nodes[0].defined, "a");
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);

    let e = parse("  a: { address: \"10.0.0.256:9000\" }\n", &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be an IP address or a host name"), "{e}");
    let e = parse(
        "  a: { address: \"orders.test:9000\" }\n  b: { address: \"ORDERS.test.:9000\" }\n",
        &path,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("both have address orders.test:9000"), "{e}");
    let e = parse(
        "  a: { address: \"orders.test:9000\" }\n",
        "/nonexistent/hosts",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("defaults.dns.hosts") && e.contains("does not exist"),
        "{e}"
    );
    // A name and an IP node reaching one address: allowed, with a warning.
    let t = parse(
        "  a: { address: \"orders.test:9000\" }\n  b: { address: \"127.0.0.1:9000\" }\n",
        &path,
    )
    .unwrap();
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("both reach 127.0.0.1:9000")),
        "{:?}",
        t.warnings
    );
}

/// `envgate check` takes a topology whose name does not resolve, and says so.
#[test]
fn check_reports_an_unresolvable_name_as_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hosts"), "127.0.0.1 orders.test\n").unwrap();
    let file = dir.path().join("envgate.yaml");
    std::fs::write(
        &file,
        r#"version: 1
listeners: [ { name: http, bind: "127.0.0.1:8080" } ]
defaults: { dns: { hosts: hosts, timeout: 500ms } }
nodes:
  a: { address: "orders.test:9000" }
  b: { address: "nowhere.invalid:9000" }
environments:
  production: { entries: [":8080"], nodes: [a, b] }
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envgate"))
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("nowhere.invalid") && all.contains("does not resolve"),
        "{all}"
    );
}
