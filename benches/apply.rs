//! The apply path at scale: a topology of 10,000 environments and 20,000 nodes, changed
//! by one canary step and one entry move, applied through `Control::apply` (parse,
//! validate, diff, bind node state, swap, record) on a running server; and its parts
//! alone, for the document in YAML and in JSON. The goal is under 100 ms for the whole
//! apply.
//!
//! `cargo bench --bench apply`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use envgate::control::Source;
use envgate::health::NodeRegistry;
use envgate::server::{self, Options};

const ENVS: usize = 10_000;
const NODES: usize = 20_000;

/// The document; `step` moves the canary weight and one entry between two environments.
fn document(step: bool) -> String {
    let mut y = String::with_capacity(4 << 20);
    y.push_str("version: 1\nlisteners: [ { name: https, bind: \"127.0.0.1:18443\" } ]\n");
    // Checks every 30 days: the nodes are not there (refused connects), and the bench
    // measures the apply, not the checkers.
    y.push_str(
        "defaults: { health: { type: tcp, interval: 30d, timeout: 1s, trust_unknown: true } }\n",
    );
    y.push_str("nodes:\n");
    for i in 0..NODES {
        y.push_str(&format!(
            "  n{i}: {{ address: \"127.0.{}.{}:{}\" }}\n",
            i / 250 % 250,
            i % 250 + 1,
            20_000 + i % 40_000
        ));
    }
    y.push_str("environments:\n");
    for e in 0..ENVS {
        let entries = if step && e == 0 {
            "[\"env0.company.com:18443\", \"env1.company.com:18443\"]".to_string()
        } else if step && e == 1 {
            "[]".to_string()
        } else {
            format!("[\"env{e}.company.com:18443\"]")
        };
        let canary = if e % 100 == 0 && e + 1 < ENVS {
            format!(
                ", canary: {{ environment: env{}, weight: {}, cookie: c }}",
                e + 1,
                if step { 20 } else { 5 }
            )
        } else {
            String::new()
        };
        y.push_str(&format!(
            "  env{e}: {{ entries: {entries}, nodes: [n{}, n{}], apps: [ {{ name: web, version: \"1\", path: / }}, {{ name: api, version: \"2\", path: /api }} ]{canary} }}\n",
            (2 * e) % NODES,
            (2 * e + 1) % NODES
        ));
    }
    y
}

fn apply(c: &mut Criterion) {
    let (a, b) = (document(false), document(true));
    // The same documents as JSON (what the control API and fleet mode send).
    let json = |y: &str| {
        let v: serde_json::Value = serde_norway::from_str(y).unwrap();
        serde_json::to_string(&v).unwrap()
    };
    let (ja, jb) = (json(&a), json(&b));
    let mut g = c.benchmark_group("apply_10000_envs_20000_nodes");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("parse_and_validate", |bench| {
        bench.iter(|| envgate::config::parse(black_box(&a), std::path::Path::new(".")).unwrap())
    });
    g.bench_function("parse_and_validate_json", |bench| {
        bench.iter(|| envgate::config::parse(black_box(&ja), std::path::Path::new(".")).unwrap())
    });
    let ta = envgate::config::parse(&a, std::path::Path::new(".")).unwrap();
    let tb = envgate::config::parse(&b, std::path::Path::new(".")).unwrap();
    g.bench_function("diff", |bench| {
        bench.iter(|| envgate::control::diff::diff(black_box(&ta), black_box(&tb)))
    });
    let registry = std::sync::Arc::new(NodeRegistry::default());
    let sock = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let srv = server::start(
        ta,
        registry,
        vec![("https".into(), sock)],
        Options {
            workers: 1,
            document: a.clone(),
            base_dir: ".".into(),
            file: None,
            access_log: None,
            inherited: Vec::new(),
            http1: envgate::server::Http1::from_env(),
        },
    )
    .unwrap();
    let control = srv.control().clone();
    // Applies are not back to back in real life: each measured apply starts after a
    // pause (unmeasured) in which the previous topology is freed and the checkers
    // reconcile, as they would between two real changes.
    let pause = || std::thread::sleep(Duration::from_millis(300));
    let mut flip = false;
    g.bench_function("control_apply", |bench| {
        bench.iter_batched(
            || {
                pause();
                flip = !flip;
                if flip {
                    &b
                } else {
                    &a
                }
            },
            |doc| control.apply(Source::Api, doc, false).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("control_apply_json", |bench| {
        bench.iter_batched(
            || {
                pause();
                flip = !flip;
                if flip {
                    &jb
                } else {
                    &ja
                }
            },
            |doc| control.apply(Source::Api, doc, false).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
    drop(control);
    srv.shutdown();
}

criterion_group!(benches, apply);
criterion_main!(benches);
