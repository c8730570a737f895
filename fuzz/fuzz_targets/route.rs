//! The routing decision on arbitrary requests: `route` never panics, gives the same answer
//! for the same view, and its verdicts agree with their reasons (a tenant redirect's range
//! holds the id; a canary bucket read from a cookie decides the side by the weight; a
//! `required` rule never lets a missing or malformed id through).
#![no_main]

use envgate::routing::canary::{Arm, Basis, BucketSource};
use envgate::routing::tenant::TenantDecision;
use envgate::routing::{route, Redirect, RequestView, RouteError};
use envgate::topology::Topology;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const DOC: &str = r#"version: 1
listeners: [ { name: http, bind: "127.0.0.1:8080" } ]
defaults: { health: { trust_unknown: true } }
nodes:
  a: { address: "10.0.0.1:80" }
  b: { address: "10.0.0.2:80" }
  c: { address: "10.0.0.3:80" }
environments:
  header:
    entries: ["h.company.com:8080"]
    nodes: [a, b]
    apps: [ { name: shop, version: "1", path: / , read_nodes: [b] }, { name: api, version: "1", path: /api, nodes: [a] } ]
    tenants: { key: { header: X-Tenant-Id }, ranges: [ { from: 0, to: 0, environment: t }, { from: 10, to: 19, environment: t }, { from: 18446744073709551615, to: 18446744073709551615, environment: t } ] }
    canary: { environment: canary, weight: 33.33, header: X-Canary, cookie: cc, hash: { cookie: session } }
  label:
    entries: ["*.l.company.com:8080"]
    nodes: [a]
    tenants: { key: { host_label: 0 }, required: true, ranges: [ { from: 5, to: 500, environment: t } ] }
  segment:
    entries: ["p.company.com:8080"]
    nodes: [a]
    tenants: { key: { path_segment: 2 }, required: true, ranges: [ { from: 5, to: 500, environment: t } ] }
  query:
    entries: [":8080"]
    nodes: [a]
    tenants: { key: { query: t }, ranges: [ { from: 5, to: 500, environment: t } ] }
    canary: { environment: canary, weight: 0.01, hash: { client_address: true }, cookie: cc }
  canary: { nodes: [c], apps: [ { name: shop, version: "2", path: /shop } ] }
  t: { nodes: [c] }
"#;

fn topo() -> &'static Topology {
    static T: OnceLock<Topology> = OnceLock::new();
    T.get_or_init(|| envgate::config::parse(DOC, std::path::Path::new(".")).unwrap())
}

/// Splits the input at NUL bytes into the request's parts.
fn fields(data: &[u8]) -> [&[u8]; 6] {
    let mut out = [&b""[..]; 6];
    for (i, part) in data.splitn(6, |b| *b == 0).enumerate() {
        out[i] = part;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let t = topo();
    let [host, path, query, tenant, cookie, extra] = fields(data);
    let (Ok(path), Ok(query)) = (std::str::from_utf8(path), std::str::from_utf8(query)) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("x-tenant-id", tenant),
        ("cookie", cookie),
        ("x-canary", extra),
    ] {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(name), v);
        }
    }
    let method = if extra.first().is_some_and(|b| b & 1 == 1) {
        Method::POST
    } else {
        Method::GET
    };
    let view = RequestView {
        host: (!host.is_empty()).then_some(host),
        port: 8080,
        path,
        query: (!query.is_empty()).then_some(query),
        method: &method,
        headers: envgate::routing::Fields::Map(&headers),
        client: "192.0.2.1".parse().unwrap(),
        trusted: extra.len() % 3 == 0,
        random: data
            .iter()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64)),
    };
    let first = route(t, &view);
    let again = route(t, &view);
    match (&first, &again) {
        (Ok(a), Ok(b)) => {
            assert_eq!(
                (a.env, a.redirect, a.tenant, a.canary),
                (b.env, b.redirect, b.tenant, b.canary)
            );
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("not deterministic"),
    }
    let Ok(r) = first else {
        if let Err(RouteError::TenantRequired | RouteError::BadTenant) = first {
            assert!(t.entries.lookup(view.host, 8080).is_some());
        }
        return;
    };
    let origin = &t.environments[r.entry.env];
    match r.tenant {
        Some(TenantDecision::Routed { id, range }) => {
            assert!(range.from <= id && id <= range.to);
            assert_eq!(r.redirect, Some(Redirect::Tenant { id, range }));
            assert_eq!(r.env, range.environment);
            assert!(r.canary.is_none());
        }
        Some(TenantDecision::Missing | TenantDecision::Malformed) => {
            assert!(!origin.tenants.as_ref().unwrap().required);
        }
        Some(TenantDecision::Outside { id }) => {
            assert!(origin.tenants.as_ref().unwrap().range_of(id).is_none());
        }
        None => assert!(origin.tenants.is_none()),
    }
    if let Some(c) = r.canary {
        let canary = origin.canary.as_ref().unwrap();
        if let Basis::Bucket { bucket, source } = c.basis {
            assert!(bucket < 10_000);
            let wants = bucket < canary.threshold;
            assert_eq!(c.arm == Arm::Canary, wants && c.fallback.is_none());
            assert_eq!(c.set_cookie.is_some(), source != BucketSource::Cookie);
        }
        assert_eq!(c.arm == Arm::Canary, r.env == canary.environment);
    }
    // The application matched is one of the environment reached.
    assert!(r.environment.apps.iter().any(|a| std::ptr::eq(a, r.app)));
});
