//! Every rule of DESIGN.md's conflict table, and the shape checks around it: the error
//! names the YAML path and, for conflicts, both parties.

use envgate::config::{parse, ConfigError, ErrorKind, LoadError};
use envgate::health::NodeRegistry;

fn errors(yaml: &str) -> Vec<ConfigError> {
    match parse(yaml, std::path::Path::new("."), &NodeRegistry::default()) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(LoadError::Invalid(e)) => e,
        Err(e) => panic!("not a validation error: {e}"),
    }
}

fn parse_error(yaml: &str) -> String {
    match parse(yaml, std::path::Path::new("."), &NodeRegistry::default()) {
        Err(LoadError::Parse(e)) => e,
        Err(e) => panic!("not a parse error: {e}"),
        Ok(_) => panic!("accepted:\n{yaml}"),
    }
}

/// The one error at `path`, checking its kind and that the message holds every `needle`.
fn expect(errs: &[ConfigError], path: &str, kind: ErrorKind, needles: &[&str]) {
    let e = errs
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no error at {path}: {errs:#?}"));
    assert_eq!(e.kind, kind, "{e}");
    for n in needles {
        assert!(e.message.contains(n), "{n:?} not in {e}");
    }
}

const BASE: &str = r#"version: 1
listeners:
  - { name: http, bind: "127.0.0.1:8080" }
nodes:
  app-1: { address: "10.0.0.11:8000" }
  app-2: { address: "10.0.0.12:8000" }
"#;

#[test]
fn valid_document_passes() {
    let t = parse(
        &format!("{BASE}environments:\n  production: {{ entries: [\"company.com:8080\"], nodes: [app-1, app-2] }}\n"),
        std::path::Path::new("."),
        &NodeRegistry::default(),
    )
    .unwrap();
    assert_eq!(t.environments.len(), 1);
}

#[test]
fn one_entry_address_one_environment() {
    let errs = errors(&format!(
        "{BASE}environments:\n  testing: {{ entries: [\"test.com:8080\"], nodes: [app-1] }}\n  staging: {{ entries: [\"a.com:8080\", \"Test.COM.:8080\"], nodes: [app-2] }}\n"
    ));
    expect(
        &errs,
        "environments.staging.entries[1]",
        ErrorKind::Conflict,
        &[
            "test.com:8080",
            "\"testing\"",
            "\"staging\"",
            "environments.testing.entries[0]",
        ],
    );
    // Port-wide and wildcard entries conflict the same way.
    let errs = errors(&format!(
        "{BASE}environments:\n  a: {{ entries: [\":8080\", \"*.x.com:8080\"], nodes: [app-1] }}\n  b: {{ entries: [\":8080\", \"*.X.com:8080\"], nodes: [app-2] }}\n"
    ));
    expect(
        &errs,
        "environments.b.entries[0]",
        ErrorKind::Conflict,
        &[":8080", "\"a\"", "\"b\""],
    );
    expect(
        &errs,
        "environments.b.entries[1]",
        ErrorKind::Conflict,
        &["*.x.com:8080", "\"a\"", "\"b\""],
    );
}

#[test]
fn one_version_of_an_application_per_environment() {
    let errs = errors(&format!(
        "{BASE}environments:\n  production:\n    entries: [\"c.com:8080\"]\n    nodes: [app-1]\n    apps:\n      - {{ name: shop, version: \"1.0\", path: / }}\n      - {{ name: shop, version: \"1.1\", path: /v2 }}\n"
    ));
    expect(
        &errs,
        "environments.production.apps[1]",
        ErrorKind::Conflict,
        &["shop", "\"1.0\"", "\"1.1\"", "production"],
    );
}

#[test]
fn no_two_applications_on_one_prefix() {
    let errs = errors(&format!(
        "{BASE}environments:\n  production:\n    entries: [\"c.com:8080\"]\n    nodes: [app-1]\n    apps:\n      - {{ name: api, version: \"1\", path: /api }}\n      - {{ name: reports, version: \"1\", path: /api/ }}\n"
    ));
    expect(
        &errs,
        "environments.production.apps[1].path",
        ErrorKind::Conflict,
        &["\"api\"", "\"reports\"", "/api", "production"],
    );
}

#[test]
fn tenant_ranges_do_not_overlap() {
    let errs = errors(&format!(
        "{BASE}environments:\n  production:\n    entries: [\"c.com:8080\"]\n    nodes: [app-1]\n    tenants:\n      key: {{ header: X-Tenant-Id }}\n      ranges:\n        - {{ from: 1, to: 1000, environment: big }}\n        - {{ from: 900, to: 2000, environment: big }}\n  big: {{ nodes: [app-2] }}\n"
    ));
    expect(
        &errs,
        "environments.production.tenants.ranges[1]",
        ErrorKind::Conflict,
        &["1-1000", "900-2000", "overlap"],
    );
}

#[test]
fn every_reference_resolves() {
    let errs = errors(&format!(
        "{BASE}environments:\n  production:\n    entries: [\"c.com:8080\"]\n    nodes: [app-1, app-9]\n    apps: [ {{ name: shop, version: \"1\", nodes: [app-2] }} ]\n    canary: {{ environment: nowhere, weight: 5 }}\n    tenants: {{ key: {{ query: t }}, ranges: [ {{ from: 1, to: 2, environment: ghost }} ] }}\n"
    ));
    expect(
        &errs,
        "environments.production.nodes[1]",
        ErrorKind::Reference,
        &["\"app-9\"", "not defined"],
    );
    expect(
        &errs,
        "environments.production.apps[0].nodes[0]",
        ErrorKind::Reference,
        &["\"shop\"", "\"app-2\"", "production"],
    );
    expect(
        &errs,
        "environments.production.canary.environment",
        ErrorKind::Reference,
        &["\"nowhere\""],
    );
    expect(
        &errs,
        "environments.production.tenants.ranges[0].environment",
        ErrorKind::Reference,
        &["\"ghost\""],
    );
}

#[test]
fn redirects_do_not_chain_into_a_cycle() {
    let errs = errors(&format!(
        "{BASE}environments:\n  a:\n    entries: [\"a.com:8080\"]\n    nodes: [app-1]\n    canary: {{ environment: b, weight: 5 }}\n  b:\n    nodes: [app-2]\n    tenants: {{ key: {{ header: X-T }}, ranges: [ {{ from: 1, to: 9, environment: a }} ] }}\n"
    ));
    expect(
        &errs,
        "environments.a",
        ErrorKind::Conflict,
        &["cycle", "a -(canary)-> b", "b -(tenant range 1-9)-> a"],
    );
    assert_eq!(
        errs.iter().filter(|e| e.message.contains("cycle")).count(),
        1,
        "{errs:#?}"
    );
    // A canary to itself is a cycle too.
    let errs = errors(&format!("{BASE}environments:\n  a: {{ entries: [\"a.com:8080\"], nodes: [app-1], canary: {{ environment: a, weight: 1 }} }}\n"));
    expect(&errs, "environments.a", ErrorKind::Conflict, &["cycle"]);
}

#[test]
fn every_entry_port_has_a_listener_and_weights_are_sane() {
    let errs = errors(
        "version: 1\nlisteners: [ { name: http, bind: \"0.0.0.0:8080\" } ]\nnodes:\n  app-1: { address: \"10.0.0.11:8000\", weight: 0 }\n  app-2: { address: \"10.0.0.12:8000\", weight: 5000 }\nenvironments:\n  demo:\n    entries: [\":8084\"]\n    nodes: { app-1: { weight: -1 } }\n    canary: { environment: other, weight: 150 }\n  other: { nodes: [app-2] }\n",
    );
    expect(
        &errs,
        "environments.demo.entries[0]",
        ErrorKind::Reference,
        &[":8084", "port 8084", "8080"],
    );
    expect(&errs, "nodes.app-1.weight", ErrorKind::Value, &["weight 0"]);
    expect(
        &errs,
        "nodes.app-2.weight",
        ErrorKind::Value,
        &["weight 5000"],
    );
    expect(
        &errs,
        "environments.demo.nodes.app-1.weight",
        ErrorKind::Value,
        &["weight -1"],
    );
    expect(
        &errs,
        "environments.demo.canary.weight",
        ErrorKind::Value,
        &["150"],
    );
}

#[test]
fn duplicates_among_listeners_and_nodes() {
    let errs = errors(
        "version: 1\nlisteners:\n  - { name: http, bind: \"0.0.0.0:8080\" }\n  - { name: http, bind: \"0.0.0.0:8080\" }\nnodes:\n  a: { address: \"10.0.0.1:80\" }\n  b: { address: \"10.0.0.1:80\" }\nenvironments:\n  e: { entries: [\":8080\"], nodes: [a, b, a] }\n",
    );
    expect(
        &errs,
        "listeners[1].name",
        ErrorKind::Conflict,
        &["listeners[0]", "listeners[1]"],
    );
    expect(
        &errs,
        "listeners[1].bind",
        ErrorKind::Conflict,
        &["0.0.0.0:8080"],
    );
    expect(
        &errs,
        "nodes.b.address",
        ErrorKind::Conflict,
        &["\"a\"", "\"b\"", "10.0.0.1:80"],
    );
    expect(
        &errs,
        "environments.e.nodes[2]",
        ErrorKind::Conflict,
        &["\"a\"", "twice"],
    );
}

#[test]
fn values_are_checked() {
    let errs = errors(
        "version: 2\nlisteners: [ { name: http, bind: \"nowhere\" } ]\ncontrol: { bind: \"0.0.0.0:9090\" }\ndefaults:\n  health: { interval: 1s, timeout: 2s, rise: 0, expect: \"600\" }\n  timeouts: { connect: soon }\n  retries: 11\n  trusted_proxies: [\"10.0.0.0/40\"]\nnodes:\n  a: { address: \"app.internal:80\" }\nenvironments:\n  e:\n    entries: [\"bad host:80\"]\n    nodes: []\n    tenants: { key: { header: X-T, query: t }, ranges: [] }\n",
    );
    for path in [
        "version",
        "listeners[0].bind",
        "control.bind",
        "defaults.health.timeout",
        "defaults.health.rise",
        "defaults.health.expect",
        "defaults.timeouts.connect",
        "defaults.retries",
        "defaults.trusted_proxies[0]",
        "nodes.a.address",
        "environments.e.entries[0]",
        "environments.e.nodes",
        "environments.e.tenants.key",
    ] {
        expect(&errs, path, ErrorKind::Value, &[]);
    }
    expect(&errs, "control.bind", ErrorKind::Value, &["token_file"]);
}

#[test]
fn all_problems_are_reported_at_once() {
    let errs = errors(&format!(
        "{BASE}environments:\n  a: {{ entries: [\"x.com:8080\"], nodes: [ghost-1] }}\n  b: {{ entries: [\"x.com:8080\"], nodes: [ghost-2] }}\n"
    ));
    assert_eq!(errs.len(), 3, "{errs:#?}");
}

#[test]
fn unknown_keys_and_wrong_types_are_refused() {
    let e = parse_error(&format!(
        "{BASE}environments:\n  a: {{ entires: [\"x.com:8080\"], nodes: [app-1] }}\n"
    ));
    assert!(e.contains("entires"), "{e}");
    assert!(e.contains("line"), "{e}");
    let e =
        parse_error("version: 1\nlisteners: [ { name: http, bind: \"0.0.0.0:80\", tsl: {} } ]\n");
    assert!(e.contains("tsl"), "{e}");
    let e = parse_error("version: one\n");
    assert!(e.contains("version"), "{e}");
}
