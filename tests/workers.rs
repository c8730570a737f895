//! Several workers: each serves every listener through a listening socket of its own
//! (SO_REUSEPORT), listeners added by an apply included, and together they serve every
//! connection.

mod support;

use std::time::Duration;

use support::*;

/// Listening sockets on 127.0.0.1:`port`, from the kernel's table.
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && f[3] == "0A"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_has_its_own_listening_socket() {
    let a = Upstream::start("a").await;
    let topo = |extra: Option<u16>| {
        let yaml = Topo::new()
            .node("a", a.addr)
            .env("blue", &["company.com"], "nodes: [a]")
            .yaml();
        match extra {
            Some(p) => yaml.replacen(
                "listeners: [ ",
                &format!("listeners: [ {{ name: extra, bind: \"127.0.0.1:{p}\" }}, "),
                1,
            ),
            None => yaml,
        }
    };
    let eg = Envgate::start_with(&topo(None), 3);
    let port = eg.port("http");
    assert_eq!(listening_sockets(port), 3);
    // Fresh connections, spread by the kernel over the three sockets: all served.
    for _ in 0..60 {
        assert_eq!(get(port, "company.com", "/").await.status, 200);
    }
    assert_eq!(a.hits(), 60);

    // A listener an apply adds gets one socket per worker too, and goes away whole.
    let extra = free_port();
    eg.apply(&topo(Some(extra)));
    assert!(
        eventually(Duration::from_secs(5), || async {
            listening_sockets(extra) == 3
        })
        .await
    );
    eg.apply(&topo(None));
    assert!(
        eventually(Duration::from_secs(5), || async {
            listening_sockets(extra) == 0
        })
        .await
    );
    assert_eq!(listening_sockets(port), 3);
    eg.stop().await;
}
