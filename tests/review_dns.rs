//! Nodes addressed by a host name, under hostile conditions: a hosts file that never ends,
//! drains that must survive answers that change, fleet followers whose names move, odd
//! addresses that must not pass for names, and nodes left without members.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
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
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Hosts {
    fn new(text: &str) -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        let h = Hosts { dir, path };
        h.set(text);
        h
    }

    /// Replaces the file whole (written aside, then renamed).
    fn set(&self, text: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// Replaces the file by a named pipe (as a file on a stalled mount behaves: opening or
    /// reading it waits).
    fn set_fifo(&self) {
        let tmp = self.dir.path().join("fifo");
        let _ = std::fs::remove_file(&tmp);
        mkfifo(&tmp);
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

fn mkfifo(path: &std::path::Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

fn doc(hosts: &Hosts, nodes: &str, envs: &str, dns: &str, api: u16) -> String {
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
control: {{ bind: "127.0.0.1:{api}" }}
defaults:
  dns: {{ hosts: "{}", interval: 100ms, timeout: 500ms{dns} }}
  health: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }}
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

/// (member name, drained) of every member of `node` in the status.
async fn drained(api: u16, node: &str) -> Vec<(String, bool)> {
    let s = status(api).await;
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node"] == node)
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["drained"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Runs `f` on a thread of its own; `None` when it has not returned within `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// A hosts file that is a pipe nobody writes to: validation must still end (refusing it,
/// or counting the lookup as failed once `defaults.dns.timeout` has passed), not wait
/// forever on the control plane. (`/dev/zero` would likewise be read without end.)
#[test]
fn a_hosts_file_that_never_ends_does_not_hold_up_validation() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("hosts");
    mkfifo(&fifo);
    let text = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:8080" }} ]
defaults: {{ dns: {{ hosts: "{}", timeout: 500ms }} }}
nodes:
  a: {{ address: "orders.test:9000" }}
environments:
  production: {{ entries: [":8080"], nodes: [a] }}
"#,
        fifo.display()
    );
    let done = within(Duration::from_secs(10), move || {
        envgate::config::parse(&text, std::path::Path::new("."))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let Some(result) = done else {
        panic!("validation of a document whose hosts file is a pipe did not end");
    };
    // Not a regular file: refused.
    let e = result.unwrap_err();
    assert!(e.contains("defaults.dns.hosts"), "{e}");
}

/// The refresh reads the hosts file; one read that stalls must not stop every later
/// refresh: once the file is a regular file again, a new answer is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_hosts_file_does_not_stop_later_refreshes() {
    use std::os::unix::fs::OpenOptionsExt;
    let (_a, _b, port) = pair().await;
    let hosts = Hosts::new("127.0.0.1 orders.test\n");
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
    assert_eq!(members(api, "orders").await, [format!("127.0.0.1:{port}")]);
    hosts.set_fifo();
    // Wait until the refresh opens the pipe (a writer can open it without blocking only
    // then), and keep the writing end open without writing: the reader waits for more.
    const O_NONBLOCK: i32 = 0o4000; // Linux
    let path = hosts.path.clone();
    let mut writer = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            let w = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(O_NONBLOCK)
                .open(&path)
                .ok();
            let found = w.is_some();
            if found {
                writer = w;
            }
            async move { found }
        })
        .await,
        "the refresh never read the hosts file"
    );
    // The file is regular again, with a second address.
    hosts.set("127.0.0.1 orders.test\n127.0.0.2 orders.test\n");
    let ok = eventually(Duration::from_secs(10), || async {
        members(api, "orders").await.len() == 2
    })
    .await;
    drop(writer);
    assert!(
        ok,
        "refreshes stopped after one read of the hosts file stalled: {:?}",
        members(api, "orders").await
    );
    eg.stop().await;
}

/// `Server::set_drained` by the document's name drains every member; a member that
/// joins later (a new address of the name) must not bring the node back into service, and
/// the members that stay must stay drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_drained_by_its_name_stays_drained_when_a_member_joins() {
    let (a, b, port) = pair().await;
    let hosts = Hosts::new("127.0.0.1 orders.test\n");
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
            get(p, "company.com", "/").await.node() == "a"
        })
        .await
    );
    eg.server().set_drained("orders", true).unwrap();
    assert!(drained(api, "orders").await.iter().all(|(_, d)| *d));
    assert_ne!(get(p, "company.com", "/").await.status, 200);

    hosts.set("127.0.0.1 orders.test\n127.0.0.2 orders.test\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            members(api, "orders").await.len() == 2
        })
        .await
    );
    let now = drained(api, "orders").await;
    assert!(
        now.iter().all(|(_, d)| *d),
        "members not drained after a new address joined: {now:?}"
    );
    let (a0, b0) = (a.hits(), b.hits());
    for _ in 0..10 {
        let r = get(p, "company.com", "/").await;
        assert_ne!(r.status, 200, "a drained node served: {}", r.node());
    }
    assert_eq!((a.hits(), b.hits()), (a0, b0));
    eg.stop().await;
}

/// A node drained at run time (`Server::set_drained`) stays drained when the answer of
/// some other node's host name changes: nobody applied anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_that_moves_does_not_undrain_another_node() {
    let (_a, _b, port) = pair().await;
    let c = Upstream::start("c").await;
    let hosts = Hosts::new("127.0.0.1 orders.test\n");
    let api = free_port();
    let eg = Envgate::start_with(
        &doc(
            &hosts,
            &format!(
                "  orders: {{ address: \"orders.test:{port}\" }}\n  legacy: {{ address: \"{}\" }}\n",
                c.addr
            ),
            "  production: { entries: [\"company.com:{port:http}\"], nodes: [legacy] }\n  staging: { entries: [\"staging.com:{port:http}\"], nodes: [orders] }\n",
            "",
            api,
        ),
        1,
    );
    let p = eg.port("http");
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(p, "company.com", "/").await.node() == "c"
        })
        .await
    );
    eg.server().set_drained("legacy", true).unwrap();
    assert_ne!(get(p, "company.com", "/").await.status, 200);

    hosts.set("127.0.0.2 orders.test\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            members(api, "orders").await == [format!("127.0.0.2:{port}")]
        })
        .await
    );
    assert_eq!(
        drained(api, "legacy").await,
        [("legacy".to_string(), true)],
        "the drain of node legacy was undone by a change of orders.test's answer"
    );
    let before = c.hits();
    for _ in 0..5 {
        assert_ne!(get(p, "company.com", "/").await.status, 200);
    }
    assert_eq!(c.hits(), before);
    eg.stop().await;
}

/// A fleet follower whose host name moves re-applies its document (source `dns`); it must
/// still report the source's hash, or the fleet looks diverged while it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_whose_name_moves_still_reports_the_source_hash() {
    use envgate::control::fleet::{self, Follow};
    let (_a, _b, port) = pair().await;
    let own = Upstream::start("own").await;
    let hosts = Hosts::new("127.0.0.1 orders.test\n");
    let api = free_port();
    let source = doc(
        &hosts,
        &format!("  orders: {{ address: \"orders.test:{port}\" }}\n"),
        "  production: { entries: [\"company.com:{port:http}\"], nodes: [orders] }\n",
        "",
        api,
    );
    let first = Envgate::start_with(&source, 1);
    let http = first.port("http");

    let api2 = free_port();
    let local = format!(
        "version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.2:{http}\" }} ]\ncontrol: {{ bind: \"127.0.0.1:{api2}\" }}\nnodes: {{ own: {{ address: \"{}\" }} }}\nenvironments:\n  blue: {{ entries: [\"company.com:{http}\"], nodes: [own] }}\n",
        own.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind(("127.0.0.2", http)).unwrap();
    let topology = envgate::config::parse(&local, dir.path()).unwrap();
    let second = envgate::server::start(
        topology,
        Arc::new(envgate::health::NodeRegistry::default()),
        vec![("http".to_string(), listener)],
        envgate::server::Options {
            workers: 1,
            document: local.clone(),
            base_dir: dir.path().to_path_buf(),
            file: None,
            access_log: None,
            inherited: Vec::new(),
            http1: envgate::server::Http1::from_env(),
        },
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{api}/api/v1/topology");
    let _fleet = fleet::spawn(
        second.control().clone(),
        local,
        Follow::new(&url, Duration::from_millis(100), None).unwrap(),
        None,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            status(api).await["hash"] == status(api2).await["hash"]
        })
        .await,
        "the follower never converged"
    );

    hosts.set("127.0.0.1 orders.test\n127.0.0.2 orders.test\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            members(api, "orders").await.len() == 2 && members(api2, "orders").await.len() == 2
        })
        .await
    );
    let (s1, s2) = (status(api).await, status(api2).await);
    assert_eq!(
        s1["hash"], s2["hash"],
        "a follower reports another hash than its source after a dns apply"
    );
    second.shutdown();
    first.stop().await;
}

fn parse_node(address: &str) -> Result<envgate::topology::Topology, String> {
    let hosts = Hosts::new("127.0.0.1 orders.test\n");
    let text = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:8080" }} ]
defaults: {{ dns: {{ hosts: "{}", timeout: 500ms }} }}
nodes:
  a: {{ address: "{address}" }}
environments:
  production: {{ entries: [":8080"], nodes: [a] }}
"#,
        hosts.path.display()
    );
    envgate::config::parse(&text, std::path::Path::new(".")).map_err(|e| e.to_string())
}

/// A port is digits: `+9000` is not one.
#[test]
fn a_port_with_a_sign_is_refused() {
    assert!(parse_node("orders.test:9000").is_ok());
    let r = parse_node("orders.test:+9000");
    assert!(r.is_err(), "orders.test:+9000 was taken as a node address");
}

/// Numeric host forms that the system resolver reads as IPv4 addresses (hexadecimal,
/// a single number) are mistyped addresses, not names: refused like 10.0.0.256.
#[test]
fn numeric_ipv4_forms_are_not_taken_for_names() {
    for a in ["0x7f000001:9000", "0x7f.0.0.0x1:9000", "2130706433:9000"] {
        let r = parse_node(a);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("must be an IP address or a host name")),
            "{a}: {:?}",
            r.map(|t| t
                .nodes
                .iter()
                .map(|n| n.name.to_string())
                .collect::<Vec<_>>())
        );
    }
}

/// Names that are names: accepted (uppercase, a trailing dot, the longest, `localhost`).
#[test]
fn names_at_the_edges_are_accepted() {
    let long = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(long.len(), 253);
    for a in [
        "ORDERS.TEST:9000".to_string(),
        "orders.test.:9000".to_string(),
        format!("{long}:9000"),
        format!("{long}.:9000"),
        "localhost:9000".to_string(),
        "[::1]:9000".to_string(),
    ] {
        assert!(parse_node(&a).is_ok(), "{a}: {:?}", parse_node(&a).err());
    }
    for a in [
        format!("{long}x:9000"),
        "::1:9000".into(),
        "[orders.test]:9000".into(),
        "orders.test:65536".into(),
        "orders..test:9000".into(),
        "orders.test:".into(),
    ] {
        assert!(parse_node(&a).is_err(), "{a} was accepted");
    }
    let t = parse_node("ORDERS.TEST.:9000").unwrap();
    assert_eq!(&*t.nodes[0].name, "a@127.0.0.1:9000");
    assert_eq!(t.nodes[0].dns.as_deref(), Some("orders.test:9000"));
}

/// An application whose only node has no members answers 503 (the environment's other
/// nodes are not its nodes), with or without a panic threshold; reads for read nodes
/// without members go to the application's nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_application_whose_node_has_no_members_is_not_served_elsewhere() {
    let other = Upstream::start("other").await;
    let hosts = Hosts::new("# nothing\n");
    let api = free_port();
    let eg = Envgate::start_with(
        &doc(
            &hosts,
            &format!(
                "  ghost: {{ address: \"ghost.invalid:{}\" }}\n  other: {{ address: \"{}\" }}\n",
                other.addr.port(),
                other.addr
            ),
            "  production: { entries: [\"company.com:{port:http}\"], panic_threshold: 50, nodes: { ghost: { weight: 5 }, other: {} }, apps: [ { name: shop, version: \"1\", path: /shop, nodes: [ghost] }, { name: web, version: \"1\", path: /, nodes: [other], read_nodes: [ghost] } ] }\n",
            "",
            api,
        ),
        2,
    );
    let p = eg.port("http");
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(p, "company.com", "/").await.node() == "other"
        })
        .await
    );
    let before = other.hits();
    for _ in 0..10 {
        let r = get(p, "company.com", "/shop").await;
        assert_eq!(r.status, 503, "{}", r.text());
    }
    assert_eq!(other.hits(), before);
    // A read for `web` (read nodes without members) goes to its nodes.
    assert_eq!(get(p, "company.com", "/x").await.node(), "other");
    eg.stop().await;
}

/// A member that leaves the answer leaves no series behind, and each member's series
/// appears once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_leaves_leaves_no_series_behind() {
    let (_a, _b, port) = pair().await;
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
        2,
    );
    let p = eg.port("http");
    let gone = format!("orders@127.0.0.2:{port}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(p, "company.com", "/").await.node() == "b"
        })
        .await
    );
    for _ in 0..6 {
        get(p, "company.com", "/").await;
    }
    let (text, _) = scrape(api).await;
    assert!(text.contains(&gone), "{text}");
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let n = lines.len();
    lines.sort_unstable();
    lines.dedup_by(|x, y| x.rsplit_once(' ').map(|s| s.0) == y.rsplit_once(' ').map(|s| s.0));
    assert_eq!(lines.len(), n, "a series appears twice:\n{text}");

    hosts.set("127.0.0.1 orders.test\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            members(api, "orders").await.len() == 1
        })
        .await
    );
    let (text, _) = scrape(api).await;
    assert!(!text.contains(&gone), "{text}");
    assert!(
        text.contains("envgate_dns_addresses{node=\"orders\"} 1"),
        "{text}"
    );
    eg.stop().await;
}
