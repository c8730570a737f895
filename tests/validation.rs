//! Every rule of DESIGN.md's conflict table, and the shape checks around it: the error
//! names the YAML path and, for conflicts, both parties.

use std::time::Duration;

use envgate::config::{parse, ConfigError, ErrorKind, LoadError};

fn errors(yaml: &str) -> Vec<ConfigError> {
    match parse(yaml, std::path::Path::new(".")) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(LoadError::Invalid(e)) => e,
        Err(e) => panic!("not a validation error: {e}"),
    }
}

fn parse_error(yaml: &str) -> String {
    match parse(yaml, std::path::Path::new(".")) {
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
        std::path::Path::new("."))
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

/// Long application lists are checked with maps instead of scans: the same conflicts,
/// the same paths.
#[test]
fn long_application_lists_are_checked_alike() {
    let mut apps: Vec<String> = (0..30)
        .map(|i| format!("      - {{ name: a{i}, version: \"1\", path: /p{i} }}\n"))
        .collect();
    apps.push("      - { name: a3, version: \"2\", path: /other }\n".into());
    apps.push("      - { name: b, version: \"1\", path: /p7/ }\n".into());
    let errs = errors(&format!(
        "{BASE}environments:\n  production:\n    entries: [\"c.com:8080\"]\n    nodes: [app-1]\n    apps:\n{}",
        apps.concat()
    ));
    expect(
        &errs,
        "environments.production.apps[30]",
        ErrorKind::Conflict,
        &["\"a3\"", "apps[3]", "\"1\"", "\"2\""],
    );
    expect(
        &errs,
        "environments.production.apps[31].path",
        ErrorKind::Conflict,
        &["\"a7\"", "apps[7]", "\"b\"", "/p7"],
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
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
        "version: 2\nlisteners: [ { name: http, bind: \"nowhere\" } ]\ncontrol: { bind: \"0.0.0.0:9090\" }\ndefaults:\n  health: { interval: 1s, timeout: 2s, rise: 0, expect: \"600\" }\n  timeouts: { connect: soon }\n  retries: 11\n  trusted_proxies: [\"10.0.0.0/40\"]\nnodes:\n  a: { address: \"app.internal\" }\nenvironments:\n  e:\n    entries: [\"bad host:80\"]\n    nodes: []\n    tenants: { key: { header: X-T, query: t }, ranges: [] }\n",
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

/// Parses a document expected to be valid.
fn topology(yaml: &str) -> envgate::topology::Topology {
    parse(yaml, std::path::Path::new(".")).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// `BASE` plus one environment `e` on `a.com:8080` with `extra` keys, and `defaults`.
fn with(defaults: &str, extra: &str) -> String {
    format!("{BASE}defaults:\n{defaults}\nenvironments:\n  e: {{ entries: [\"a.com:8080\"], nodes: [app-1]{extra} }}\n")
}

#[test]
fn wrong_types_are_refused() {
    let e = parse_error("version: one\n");
    assert!(e.contains("version"), "{e}");
    let e = parse_error(&format!(
        "{BASE}environments:\n  a: {{ entries: \"x.com:8080\", nodes: [app-1] }}\n"
    ));
    assert!(e.contains("line"), "{e}");
    let e = parse_error("version: 1\nlisteners: [ {\n");
    assert!(e.contains("line"), "{e}");
    // A misspelt required key reads as a missing one; the unknown key is named with it.
    let e = parse_error("version: 1\nnodes: { a: { adress: \"10.0.0.1:80\" } }\n");
    assert!(e.contains("address"), "{e}");
    assert!(e.contains("nodes.a.adress"), "{e}");
}

#[test]
fn unknown_keys_are_errors_with_their_path() {
    let errs = errors(&format!(
        "{BASE}defaults: {{ timeouts: {{ conect: 1s }}, health: {{ intervall: 1s }} }}\nenvironments:\n  a: {{ entires: [\"x.com:8080\"], nodes: [app-1], apps: [ {{ name: s, version: 1, prefix: / }} ] }}\n"
    ));
    expect(
        &errs,
        "environments.a.entires",
        ErrorKind::Value,
        &["unknown key \"entires\""],
    );
    expect(
        &errs,
        "environments.a.apps[0].prefix",
        ErrorKind::Value,
        &["unknown key \"prefix\""],
    );
    expect(
        &errs,
        "defaults.timeouts.conect",
        ErrorKind::Value,
        &["unknown key \"conect\""],
    );
    expect(
        &errs,
        "defaults.health.intervall",
        ErrorKind::Value,
        &["unknown key \"intervall\""],
    );
    let errs = errors(
        "version: 1\nlisteners: [ { name: http, bind: \"0.0.0.0:80\", tsl: {} } ]\nwhatever: 1\n",
    );
    expect(&errs, "listeners[0].tsl", ErrorKind::Value, &["\"tsl\""]);
    expect(&errs, "whatever", ErrorKind::Value, &["\"whatever\""]);
    // An unknown key alone is enough to refuse a document.
    let errs = errors(&format!(
        "{BASE}environments:\n  a: {{ entries: [\"x.com:8080\"], nodes: [app-1], retires: 3 }}\n"
    ));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    expect(
        &errs,
        "environments.a.retires",
        ErrorKind::Value,
        &["unknown key"],
    );
}

#[test]
fn a_typo_does_not_hide_the_other_problems() {
    let errs = errors(&format!(
        "{BASE}environments:\n  staging: {{ entires: [\"x.com:8080\"], nodes: [app-1, app-9] }}\n"
    ));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    // Unknown keys come first.
    assert_eq!(errs[0].path, "environments.staging.entires", "{errs:#?}");
    expect(
        &errs,
        "environments.staging.entires",
        ErrorKind::Value,
        &["unknown key \"entires\""],
    );
    expect(
        &errs,
        "environments.staging.nodes[1]",
        ErrorKind::Reference,
        &["\"app-9\"", "not defined"],
    );
}

#[test]
fn node_overrides_in_a_map_keep_both_forms() {
    let t = topology(&format!(
        "{BASE}environments:\n  a: {{ entries: [\"a.com:8080\"], nodes: {{ app-1: {{ weight: 5 }}, app-2: }} }}\n  b: {{ entries: [\"b.com:8080\"], nodes: [app-1] }}\n"
    ));
    assert_eq!(t.environments.len(), 2);
    // Inside the untagged list-or-map form, a typo is still refused, as a parse error.
    let e = parse_error(&format!(
        "{BASE}environments:\n  a: {{ entries: [\"a.com:8080\"], nodes: {{ app-1: {{ wieght: 5 }} }} }}\n"
    ));
    assert!(e.contains("environments"), "{e}");
}

#[test]
fn new_timeouts_have_defaults_and_take_durations() {
    let t = topology(&with("  retries: 1", ""));
    let d = &t.defaults.timeouts;
    assert_eq!(d.body_idle, Duration::from_secs(60));
    assert_eq!(d.request, Duration::from_secs(60));
    assert_eq!(d.tunnel_idle, Duration::from_secs(3600));
    let t = topology(&with(
        "  timeouts: { body_idle: 5s, request: 2m, tunnel_idle: 30d }",
        "",
    ));
    let d = &t.defaults.timeouts;
    assert_eq!(d.body_idle, Duration::from_secs(5));
    assert_eq!(d.request, Duration::from_secs(120));
    assert_eq!(d.tunnel_idle, Duration::from_secs(30 * 86400));
    let errs = errors(&with(
        "  timeouts: { body_idle: 0s, request: soon, tunnel_idle: -1s }",
        "",
    ));
    expect(
        &errs,
        "defaults.timeouts.body_idle",
        ErrorKind::Value,
        &["zero"],
    );
    expect(
        &errs,
        "defaults.timeouts.request",
        ErrorKind::Value,
        &["\"soon\""],
    );
    expect(
        &errs,
        "defaults.timeouts.tunnel_idle",
        ErrorKind::Value,
        &[],
    );
}

#[test]
fn no_duration_is_longer_than_30_days() {
    let errs = errors(&with(
        "  timeouts: { tunnel_idle: 31d, connect: 1000000h, drain: 999999999999999999999s }\n  health: { interval: 60d, timeout: 720h 1s }\n  passive: { ejection: 30d 1ms, max_ejection: 1y }",
        "",
    ));
    for path in [
        "defaults.timeouts.tunnel_idle",
        "defaults.timeouts.connect",
        "defaults.health.interval",
        "defaults.health.timeout",
        "defaults.passive.ejection",
        "defaults.passive.max_ejection",
    ] {
        expect(
            &errs,
            path,
            ErrorKind::Value,
            &["longer than the maximum of 30d"],
        );
    }
    // Too large even to read: refused all the same.
    expect(&errs, "defaults.timeouts.drain", ErrorKind::Value, &[]);
    // A node's own health check too.
    let errs = errors(
        "version: 1\nlisteners: [ { name: http, bind: \"127.0.0.1:8080\" } ]\nnodes:\n  app-1: { address: \"10.0.0.11:8000\", health: { interval: 40d, timeout: 40d } }\nenvironments:\n  e: { entries: [\"a.com:8080\"], nodes: [app-1] }\n"
    );
    expect(
        &errs,
        "nodes.app-1.health.interval",
        ErrorKind::Value,
        &["30d"],
    );
    // Exactly 30 days passes.
    topology(&with(
        "  health: { interval: 30d, timeout: 720h }\n  passive: { ejection: 30d, max_ejection: 30d }",
        "",
    ));
}

#[test]
fn max_request_body_takes_sizes_and_falls_back_to_the_default() {
    let t = topology(&with("  retries: 1", ""));
    assert_eq!(t.defaults.max_request_body, None);
    assert_eq!(t.environments[0].max_request_body, None);

    let t = topology(&with(
        "  limits: { max_request_body: 10MiB }",
        ", limits: { max_in_flight: 5 }",
    ));
    assert_eq!(t.defaults.max_request_body, Some(10 << 20));
    assert_eq!(t.environments[0].max_request_body, Some(10 << 20));

    for (written, bytes) in [
        ("64KiB", 64 * 1024),
        ("64KB", 64_000),
        ("1GB", 1_000_000_000),
        ("1GiB", 1 << 30),
        ("512B", 512),
        ("1048576", 1 << 20),
        ("\"1\"", 1),
    ] {
        let t = topology(&with(
            "  limits: { max_request_body: 1MiB }",
            &format!(", limits: {{ max_request_body: {written} }}"),
        ));
        assert_eq!(t.environments[0].max_request_body, Some(bytes), "{written}");
        assert_eq!(t.defaults.max_request_body, Some(1 << 20));
    }

    let errs = errors(&with(
        "  limits: { max_request_body: 0 }",
        ", limits: { max_request_body: 10 MiBs }",
    ));
    expect(
        &errs,
        "defaults.limits.max_request_body",
        ErrorKind::Value,
        &["at least 1"],
    );
    expect(
        &errs,
        "environments.e.limits.max_request_body",
        ErrorKind::Value,
        &["\"10 MiBs\"", "is not a size"],
    );
    for bad in ["1.5MiB", "-1", "lots", "10TB", "99999999999GiB", "0B"] {
        let errs = errors(&with(
            "  retries: 1",
            &format!(", limits: {{ max_request_body: \"{bad}\" }}"),
        ));
        expect(
            &errs,
            "environments.e.limits.max_request_body",
            ErrorKind::Value,
            &[],
        );
    }
    // Not a scalar at all: the shape is wrong.
    parse_error(&with("  limits: { max_request_body: [1] }", ""));
}

#[test]
fn allow_encoded_slash_defaults_to_false() {
    assert!(
        !topology(&with("  retries: 1", ""))
            .defaults
            .allow_encoded_slash
    );
    assert!(
        topology(&with("  allow_encoded_slash: true", ""))
            .defaults
            .allow_encoded_slash
    );
    assert!(
        !topology(&with("  allow_encoded_slash: false", ""))
            .defaults
            .allow_encoded_slash
    );
    parse_error(&with("  allow_encoded_slash: sometimes", ""));
}

#[test]
fn upgrades_and_connect_per_environment() {
    let t = topology(&with("  retries: 1", ""));
    let e = &t.environments[0];
    assert_eq!(e.upgrades, vec!["websocket".to_string()]);
    assert!(!e.allow_connect);
    assert_eq!(e.in_flight.load(std::sync::atomic::Ordering::Relaxed), 0);

    let t = topology(&with(
        "  retries: 1",
        ", upgrades: [WebSocket, my-proto], allow_connect: true",
    ));
    let e = &t.environments[0];
    assert_eq!(e.upgrades, vec!["websocket".to_string(), "my-proto".into()]);
    assert!(e.allow_connect);

    let t = topology(&with("  retries: 1", ", upgrades: []"));
    assert!(t.environments[0].upgrades.is_empty());

    let errs = errors(&with(
        "  retries: 1",
        ", upgrades: [websocket, H2C, \"tls/1.0\", \"\", WEBSOCKET]",
    ));
    expect(
        &errs,
        "environments.e.upgrades[1]",
        ErrorKind::Value,
        &["h2c upgrades are never tunnelled (a client could bypass routing inside the tunnel)"],
    );
    expect(
        &errs,
        "environments.e.upgrades[2]",
        ErrorKind::Value,
        &["\"tls/1.0\"", "token"],
    );
    expect(
        &errs,
        "environments.e.upgrades[3]",
        ErrorKind::Value,
        &["token"],
    );
    expect(
        &errs,
        "environments.e.upgrades[4]",
        ErrorKind::Value,
        &["twice"],
    );
    parse_error(&with("  retries: 1", ", allow_connect: maybe"));
}

#[test]
fn canary_tenant_and_read_node_shapes() {
    let errs = errors(&format!(
        "{BASE}environments:\n  production:\n    entries: [\"c.com:8080\"]\n    nodes: [app-1]\n    apps: [ {{ name: shop, version: \"1\", read_nodes: [app-2] }}, {{ name: api, version: \"1\", path: /api, read_nodes: [] }}, {{ name: dup, version: \"1\", path: /dup, read_nodes: [app-1, app-1] }} ]\n    canary: {{ environment: next, weight: 0.125, header: \"X Canary\", cookie: \"a;b\", hash: {{ header: X-User, client_address: true }} }}\n    tenants: {{ key: {{ path_segment: 0 }}, ranges: [ {{ from: 1, to: 2, environment: next }} ] }}\n  next: {{ nodes: [app-2] }}\n"
    ));
    expect(
        &errs,
        "environments.production.apps[0].read_nodes[0]",
        ErrorKind::Reference,
        &["\"shop\"", "\"app-2\"", "production"],
    );
    expect(
        &errs,
        "environments.production.apps[1].read_nodes",
        ErrorKind::Value,
        &["no read nodes"],
    );
    expect(
        &errs,
        "environments.production.apps[2].read_nodes[1]",
        ErrorKind::Conflict,
        &["\"app-1\"", "twice"],
    );
    expect(
        &errs,
        "environments.production.canary.weight",
        ErrorKind::Value,
        &["0.125", "two decimals"],
    );
    expect(
        &errs,
        "environments.production.canary.header",
        ErrorKind::Value,
        &["\"X Canary\""],
    );
    expect(
        &errs,
        "environments.production.canary.cookie",
        ErrorKind::Value,
        &["\"a;b\""],
    );
    expect(
        &errs,
        "environments.production.canary.hash",
        ErrorKind::Value,
        &["exactly one"],
    );
    expect(
        &errs,
        "environments.production.tenants.key.path_segment",
        ErrorKind::Value,
        &["from 1"],
    );
    // Two decimals are fine, and so is each kind of hash key.
    for (weight, hash) in [
        ("0.01", "{ header: X-User-Id }"),
        ("12.5", "{ cookie: session }"),
        ("99.99", "{ client_address: true }"),
    ] {
        let doc = format!(
            "{BASE}environments:\n  production:\n    entries: [\"c.com:8080\"]\n    nodes: [app-1]\n    canary: {{ environment: next, weight: {weight}, cookie: envgate_canary, hash: {hash} }}\n  next: {{ nodes: [app-2] }}\n"
        );
        let t = parse(&doc, std::path::Path::new(".")).unwrap_or_else(|e| panic!("{e}\n{doc}"));
        let c = t.environments[0].canary.as_ref().unwrap();
        assert_eq!(
            c.threshold as f64,
            (weight.parse::<f64>().unwrap() * 100.0).round()
        );
    }
}

#[test]
fn json_documents_and_yaml_flow_documents_read_alike() {
    let yaml = format!(
        "{BASE}environments:\n  production: {{ entries: [\"company.com:8080\"], nodes: [app-1, app-2], canary: {{ environment: next, weight: 2.5 }} }}\n  next: {{ nodes: [app-2] }}\n"
    );
    let value: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    let json = serde_json::to_string_pretty(&value).unwrap();
    assert!(json.starts_with('{'));
    let (a, b) = (
        parse(&yaml, std::path::Path::new(".")).unwrap(),
        parse(&json, std::path::Path::new(".")).unwrap(),
    );
    assert_eq!(a.environments.len(), b.environments.len());
    let threshold = |t: &envgate::topology::Topology| {
        let e = t.env_by_name("production").unwrap();
        t.environments[e].canary.as_ref().unwrap().threshold
    };
    assert_eq!((threshold(&a), threshold(&b)), (250, 250));
    // A JSON document's unknown keys and wrong values are reported with their paths too.
    let typo = json.replacen("\"entries\"", "\"entires\"", 1);
    let errs = errors(&typo);
    expect(
        &errs,
        "environments.production.entires",
        ErrorKind::Value,
        &["unknown key"],
    );
    // A YAML flow mapping that is not JSON is still read as YAML.
    let flow = "{ version: 1, listeners: [ { name: http, bind: \"127.0.0.1:8080\" } ], nodes: { a: { address: \"10.0.0.1:80\" } }, environments: { e: { entries: [\":8080\"], nodes: [a] } } }";
    assert_eq!(
        parse(flow, std::path::Path::new("."))
            .unwrap()
            .environments
            .len(),
        1
    );
}
