//! Hot-path pieces measured alone: entry resolution (`EntryTable::lookup`) as the number
//! of entries grows from 10 to 100,000 (its cost must not grow with the count), the node
//! pick (`Wrr::pick`) for pools of 3 to 100 nodes, and the whole routing decision
//! (`routing::route`: entry, tenant rule, canary, application, candidates) in topologies
//! of 10 and 10,000 environments, with a tenant rule of 10,000 ranges.
//!
//! `cargo bench --bench routing`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use envgate::balance::Wrr;
use envgate::routing::host::{Entry, EntryTable};
use envgate::routing::{route, RequestView};
use envgate::topology::{Member, Topology};
use http::{HeaderMap, HeaderValue, Method};

fn table(n: usize) -> EntryTable {
    let mut t = EntryTable::default();
    for i in 0..n {
        // A mix like real deployments: exact hosts, some wildcards, one port-wide entry.
        let e = if i % 10 == 0 {
            format!("*.tenant{i}.company.com:443")
        } else {
            format!("app{i}.company.com:443")
        };
        t.insert(&Entry::parse(&e).unwrap(), i).unwrap();
    }
    t.insert(&Entry::parse(":443").unwrap(), n).unwrap();
    t
}

fn entries(c: &mut Criterion) {
    let mut g = c.benchmark_group("entry_lookup");
    for n in [10usize, 1_000, 100_000] {
        let t = table(n);
        let exact = format!("App{}.Company.com:443", n / 2 + 1);
        let wild = format!("eu.api.tenant{}.company.com", (n / 20) * 10);
        g.bench_with_input(BenchmarkId::new("exact", n), &t, |b, t| {
            b.iter(|| t.lookup(black_box(Some(exact.as_bytes())), black_box(443)))
        });
        g.bench_with_input(BenchmarkId::new("wildcard", n), &t, |b, t| {
            b.iter(|| t.lookup(black_box(Some(wild.as_bytes())), black_box(443)))
        });
        g.bench_with_input(BenchmarkId::new("port_wide", n), &t, |b, t| {
            b.iter(|| t.lookup(black_box(Some(b"nowhere.example.org")), black_box(443)))
        });
    }
    g.finish();
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("wrr_pick");
    for n in [3usize, 10, 100] {
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                node: i,
                weight: 1 + (i % 5) as u32,
                backup: i == n - 1,
            })
            .collect();
        let wrr = Wrr::new(n);
        g.bench_with_input(BenchmarkId::new("all_up", n), &members, |b, m| {
            b.iter(|| wrr.pick(black_box(m), |_| true))
        });
        g.bench_with_input(BenchmarkId::new("half_down", n), &members, |b, m| {
            b.iter(|| wrr.pick(black_box(m), |node| node % 2 == 0))
        });
    }
    g.finish();
}

/// `envs` environments `env-N` on `envN.company.com:443` with two applications each;
/// `env-0` (on `shop.company.com`) has a canary at 5% with a cookie and a tenant rule of
/// `ranges` ranges of 10 ids, every other one to `private-N`.
fn topology(envs: usize, ranges: usize) -> Topology {
    let mut y =
        String::from("version: 1\nlisteners: [ { name: https, bind: \"127.0.0.1:443\" } ]\n");
    y.push_str("defaults: { health: { trust_unknown: true } }\nnodes:\n");
    for i in 0..envs.max(3) {
        y.push_str(&format!(
            "  n{i}: {{ address: \"10.{}.{}.{}:80\" }}\n",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        ));
    }
    y.push_str("environments:\n");
    y.push_str("  env-0:\n    entries: [\"shop.company.com:443\"]\n    nodes: [n0, n1, n2]\n");
    y.push_str("    apps: [ { name: shop, version: \"1\", path: / }, { name: api, version: \"2\", path: /api } ]\n");
    y.push_str("    canary: { environment: env-canary, weight: 5, header: X-Canary, cookie: envgate_canary }\n");
    y.push_str("    tenants:\n      key: { header: X-Tenant-Id }\n      ranges:\n");
    for r in 0..ranges {
        let from = r as u64 * 20;
        y.push_str(&format!(
            "        - {{ from: {from}, to: {}, environment: private-{} }}\n",
            from + 9,
            r % 10
        ));
    }
    y.push_str(
        "  env-canary: { nodes: [n1], apps: [ { name: shop, version: \"2-rc\", path: / } ] }\n",
    );
    for p in 0..10 {
        y.push_str(&format!("  private-{p}: {{ nodes: [n2] }}\n"));
    }
    for i in 1..envs {
        y.push_str(&format!(
            "  env-{i}: {{ entries: [\"env{i}.company.com:443\"], nodes: [n{i}], apps: [ {{ name: web, version: \"1\", path: / }}, {{ name: api, version: \"1\", path: /api }} ] }}\n"
        ));
    }
    envgate::config::parse(&y, std::path::Path::new(".")).unwrap()
}

fn decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    let get = Method::GET;
    let client = "192.0.2.7".parse().unwrap();
    for (envs, ranges) in [(10usize, 10usize), (10_000, 10_000)] {
        let t = topology(envs, ranges);
        let id = format!("{envs}_envs_{ranges}_ranges");
        let other = format!("env{}.company.com", envs / 2);
        let view = |host: &'static str, headers: &'static HeaderMap| RequestView {
            host: Some(host.as_bytes()),
            port: 443,
            path: "/api/orders/42",
            query: None,
            method: &get,
            headers: envgate::routing::Fields::Map(headers),
            client,
            trusted: false,
            random: 0x9e37_79b9_7f4a_7c15,
        };
        let empty: &'static HeaderMap = Box::leak(Box::default());
        let mut h = HeaderMap::new();
        h.insert("x-tenant-id", HeaderValue::from_static("185"));
        let tenant: &'static HeaderMap = Box::leak(Box::new(h));
        let mut h = HeaderMap::new();
        h.insert("x-tenant-id", HeaderValue::from_static("15"));
        h.insert(
            "cookie",
            HeaderValue::from_static("session=abc; envgate_canary=4242"),
        );
        let cookie: &'static HeaderMap = Box::leak(Box::new(h));
        let other: &'static str = Box::leak(other.into_boxed_str());
        // An environment without rules (the common case).
        g.bench_function(BenchmarkId::new("plain", &id), |b| {
            b.iter(|| route(black_box(&t), black_box(&view(other, empty))).is_ok())
        });
        // The tenant id falls in a range: redirect to a private environment.
        g.bench_function(BenchmarkId::new("tenant_routed", &id), |b| {
            b.iter(|| route(black_box(&t), black_box(&view("shop.company.com", tenant))).is_ok())
        });
        // No tenant id; the canary draws a bucket (to be set in the cookie).
        g.bench_function(BenchmarkId::new("canary_random", &id), |b| {
            b.iter(|| route(black_box(&t), black_box(&view("shop.company.com", empty))).is_ok())
        });
        // An id in no range (binary search misses), then the canary reads its cookie.
        g.bench_function(BenchmarkId::new("tenant_miss_canary_cookie", &id), |b| {
            b.iter(|| route(black_box(&t), black_box(&view("shop.company.com", cookie))).is_ok())
        });
    }
    g.finish();
}

criterion_group!(benches, entries, pick, decision);
criterion_main!(benches);
