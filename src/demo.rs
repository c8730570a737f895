//! `envgate demo`: a few demo nodes and a demo topology on loopback, with the curl lines
//! that show each feature.
//!
//! The demo nodes are small HTTP servers that answer with their own name, so the output
//! of each curl line shows where the request went.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::config;
use crate::health::NodeRegistry;
use crate::server::{self, Options};

const NODES: [&str; 7] = [
    "app-1", "app-2", "app-3", "test-1", "tools-1", "canary-1", "acme-1",
];

/// The demo topology, with `{NAME}` standing for each demo node's address, `{HTTP}` and
/// `{PORTWIDE}` for the listener ports and `{CONTROL}` for the (read-only) control endpoint.
const TOPOLOGY: &str = r#"version: 1
listeners:
  - { name: http, bind: "127.0.0.1:{HTTP}" }
  - { name: portwide, bind: "127.0.0.1:{PORTWIDE}" }
control: { bind: "127.0.0.1:{CONTROL}" }
nodes:
  app-1:   { address: "{app-1}", weight: 3 }
  app-2:   { address: "{app-2}" }
  app-3:   { address: "{app-3}", backup: true }
  test-1:  { address: "{test-1}" }
  tools-1: { address: "{tools-1}" }
  canary-1: { address: "{canary-1}" }
  acme-1:  { address: "{acme-1}" }
defaults:
  health: { interval: 1s, timeout: 500ms, rise: 1, fall: 2 }
environments:
  production:
    labels: { stage: production }
    entries: ["company.localhost:{HTTP}", "www.company.localhost:{HTTP}"]
    nodes: [app-1, app-2, app-3]
    apps:
      - { name: shop, version: "1.1.0", path: / }
      - { name: reports, version: "3.0.0", path: /reports, nodes: [app-2], read_nodes: [app-1] }
    tenants:
      key: { header: X-Tenant-Id }
      ranges: [ { from: 1001, to: 1001, environment: private-acme } ]
    canary: { environment: production-canary, weight: 10, header: X-Canary, cookie: envgate_canary }
  production-canary:
    nodes: [canary-1]
    apps: [ { name: shop, version: "1.2.0-rc.1", path: / } ]
  private-acme:
    labels: { customer: acme }
    nodes: [acme-1]
  testing:
    labels: { stage: test }
    entries: ["*.test.company.localhost:{HTTP}"]
    nodes: [test-1]
  tools:
    entries: [":{PORTWIDE}"]
    nodes: [tools-1]
"#;

pub fn run(port: u16, workers: usize) -> anyhow::Result<()> {
    let portwide = port.checked_add(3).context("port too high")?;
    let control = port.checked_add(10).context("port too high")?;
    // The demo nodes run on this thread's runtime while it waits for Ctrl-C.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut addrs = Vec::new();
    let mut text = TOPOLOGY
        .replace("{HTTP}", &port.to_string())
        .replace("{PORTWIDE}", &portwide.to_string())
        .replace("{CONTROL}", &control.to_string());
    for name in NODES {
        let addr = rt.block_on(demo_node(name))?;
        text = text.replace(&format!("{{{name}}}"), &addr.to_string());
        addrs.push(addr);
    }
    let registry = Arc::new(NodeRegistry::default());
    let topology = config::parse(&text, std::path::Path::new("."))
        .map_err(|e| anyhow::anyhow!("demo topology: {e}"))?;
    let mut listeners = Vec::new();
    for l in &topology.listeners {
        let sock = server::bind(l.bind)
            .with_context(|| format!("cannot bind {} (try `envgate demo --port N`)", l.bind))?;
        listeners.push((l.name.clone(), sock));
    }
    // The access log goes to stdout, below the instructions, as `envgate run` does.
    let log = crate::accesslog::AccessLog::start(
        crate::accesslog::Target::Stdout,
        crate::accesslog::Format::Text,
    )?;
    let server = server::start(
        topology,
        registry,
        listeners,
        Options {
            workers,
            document: text.clone(),
            base_dir: ".".into(),
            file: None,
            access_log: Some(log.sink()),
            inherited: Vec::new(),
            http1: crate::server::Http1::from_env(),
        },
    )?;
    let h = port;
    println!("envgate demo: topology\n\n{text}");
    println!("Try (each answer names the node that served it):\n");
    println!("  # exact host entry -> production, app shop; weights 3:1 (app-3 is a backup);");
    println!("  # a fresh client (no cookie) lands on the 10% canary (canary-1) now and then");
    println!("  for i in 1 2 3 4 5 6 7 8; do curl -s -H 'Host: company.localhost' http://127.0.0.1:{h}/; done");
    println!("  # the canary bucket (0-9999, canary below 1000) comes back in a cookie...");
    println!("  curl -si -H 'Host: company.localhost' http://127.0.0.1:{h}/ | grep -i set-cookie");
    println!(
        "  # ...and keeps a client on its side: a cookie jar gives the same node side each time"
    );
    println!("  for i in 1 2 3 4 5; do curl -s -b /tmp/envgate-demo.jar -c /tmp/envgate-demo.jar -H 'Host: company.localhost' http://127.0.0.1:{h}/; done");
    println!("  # bucket 42 is on the canary, 9000 is not; the override header decides alone");
    println!("  curl -s -b envgate_canary=42 -H 'Host: company.localhost' http://127.0.0.1:{h}/");
    println!("  curl -s -b envgate_canary=9000 -H 'Host: company.localhost' http://127.0.0.1:{h}/");
    println!("  curl -s -H 'X-Canary: always' -H 'Host: company.localhost' http://127.0.0.1:{h}/");
    println!("  # tenant 1001 has its own environment (private-acme); 1000 and 1002 stay");
    println!("  curl -s -H 'X-Tenant-Id: 1001' -H 'Host: company.localhost' http://127.0.0.1:{h}/");
    println!("  curl -s -H 'X-Tenant-Id: 1002' -H 'X-Canary: never' -H 'Host: company.localhost' http://127.0.0.1:{h}/");
    println!("  # path prefix /reports -> application reports: reads on app-1 (read node), writes on app-2");
    println!(
        "  curl -s -H 'X-Canary: never' http://company.localhost:{h}/reports/q3   # *.localhost resolves to loopback"
    );
    println!("  curl -s -X POST -H 'X-Canary: never' http://company.localhost:{h}/reports/q3");
    println!("  # wildcard entry *.test.company.localhost -> testing");
    println!("  curl -s -H 'Host: eu.test.company.localhost' http://127.0.0.1:{h}/");
    println!("  # port-wide entry :{portwide} -> tools, whatever the host");
    println!("  curl -s -H 'Host: anything.example' http://127.0.0.1:{portwide}/");
    println!("  # no entry matches -> 404 JSON");
    println!("  curl -si -H 'Host: nowhere.example' http://127.0.0.1:{h}/");
    println!("  # headers the node receives (X-Forwarded-*, X-Request-Id)");
    println!("  curl -s -H 'Host: company.localhost' http://127.0.0.1:{h}/headers");
    let (a1, a2) = (addrs[0], addrs[1]);
    println!("  # backup: make both primaries fail their health checks; within ~2 s app-3 (backup) serves");
    println!("  curl -s -X POST http://{a1}/_demo/down; curl -s -X POST http://{a2}/_demo/down");
    println!("  sleep 3; for i in 1 2 3; do curl -s -H 'Host: company.localhost' http://127.0.0.1:{h}/; done");
    println!(
        "  curl -s -X POST http://{a1}/_demo/up; curl -s -X POST http://{a2}/_demo/up   # and back"
    );
    println!("  # HTTP/2 cleartext");
    println!(
        "  curl -s --http2-prior-knowledge -H 'Host: company.localhost' http://127.0.0.1:{h}/"
    );
    println!("  # the status page (open it in a browser), Prometheus metrics, status and explain");
    println!("  #   http://127.0.0.1:{control}/");
    println!("  curl -s http://127.0.0.1:{control}/metrics | grep -E 'envgate_(node_up|requests_total|canary_requests_total)'");
    println!("  curl -s http://127.0.0.1:{control}/api/v1/status");
    println!("  curl -s 'http://127.0.0.1:{control}/api/v1/explain?host=company.localhost&port={h}&path=/reports/q3'");
    println!("\nCtrl-C stops the demo. Each request's access log line follows.\n");
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    server.shutdown();
    log.close();
    Ok(())
}

/// Starts one demo node on an ephemeral loopback port. `POST /_demo/down` makes its
/// `/healthz` answer 503 (it keeps serving everything else), `POST /_demo/up` undoes it.
async fn demo_node(name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let healthy = Arc::new(AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let healthy = healthy.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let healthy = healthy.clone();
                    async move {
                        let path = req.uri().path();
                        if path == "/healthz" {
                            let up = healthy.load(Ordering::Relaxed);
                            let mut resp = Response::new(Full::new(Bytes::from_static(if up {
                                b"ok\n"
                            } else {
                                b"down\n"
                            })));
                            if !up {
                                *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            }
                            return Ok::<_, Infallible>(resp);
                        }
                        if let Some(state) = path.strip_prefix("/_demo/") {
                            healthy.store(state != "down", Ordering::Relaxed);
                            return Ok(Response::new(Full::new(Bytes::from(format!(
                                "{name}: health checks now {}\n",
                                if state == "down" { "fail" } else { "pass" }
                            )))));
                        }
                        let body = if path == "/headers" {
                            let mut s = format!("{name} received:\n");
                            for (k, v) in req.headers() {
                                s.push_str(&format!(
                                    "  {k}: {}\n",
                                    String::from_utf8_lossy(v.as_bytes())
                                ));
                            }
                            s
                        } else {
                            format!("{name}: {} {}\n", req.method(), req.uri())
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
