//! Header rewriting on arbitrary header maps: hop-by-hop removal, cookie joining,
//! `X-Forwarded-For` appending, upgrade checks and request-id sanity, with the invariants
//! each promises. Names and value pieces are drawn from a list of interesting ones most
//! of the time, so the fuzzer reaches `Connection`-named headers quickly.
#![no_main]

use envgate::proxy::headers::{
    append_forwarded_for, is_upgrade, join_cookies, sane_request_id, strip_hop_by_hop,
    upgrade_allowed,
};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "connection",
    "Connection",
    "transfer-encoding",
    "te",
    "keep-alive",
    "upgrade",
    "proxy-connection",
    "trailer",
    "proxy-authorization",
    "proxy-authenticate",
    "content-length",
    "cookie",
    "x-forwarded-for",
    "x-request-id",
    "host",
    "x-secret",
    "close",
    "x-a",
];

const PIECES: &[&str] = &[
    "close",
    "keep-alive",
    "upgrade",
    "Upgrade",
    "x-secret",
    "X-Secret",
    "content-length",
    "cookie",
    "x-forwarded-for",
    "transfer-encoding",
    "x-a",
    "websocket",
    "h2c",
    "chunked",
    "te",
    "host",
    "Host",
    "a=1",
    "1.2.3.4",
    ",",
    ", ",
    " ",
    "\t",
    "/",
];

/// Must be removed by `strip_hop_by_hop(_, false)`, whatever `Connection` says.
const HOP: &[&str] = &[
    "connection",
    "transfer-encoding",
    "te",
    "keep-alive",
    "upgrade",
    "proxy-connection",
    "trailer",
    "proxy-authorization",
    "proxy-authenticate",
];

fn name(u: &mut Unstructured) -> Result<Vec<u8>> {
    let pick: u8 = u.arbitrary()?;
    if (pick as usize) < NAMES.len() * 12 {
        Ok(NAMES[pick as usize % NAMES.len()].as_bytes().to_vec())
    } else {
        let len = u.int_in_range(0..=12)?;
        Ok(u.bytes(len)?.to_vec())
    }
}

fn value(u: &mut Unstructured) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    for _ in 0..u.int_in_range(0..=5)? {
        let pick: u8 = u.arbitrary()?;
        if (pick as usize) < PIECES.len() * 10 {
            v.extend_from_slice(PIECES[pick as usize % PIECES.len()].as_bytes());
        } else {
            let len = u.int_in_range(0..=8)?;
            v.extend_from_slice(u.bytes(len)?);
        }
    }
    Ok(v)
}

/// The tokens of a comma-separated list, trimmed, empty ones left out.
fn tokens(v: &HeaderValue) -> Vec<&[u8]> {
    v.as_bytes()
        .split(|b| *b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The cookie-pairs of `Cookie` fields: split at ';', trimmed, empty ones left out.
fn cookie_pairs(fields: &[HeaderValue]) -> Vec<&[u8]> {
    fields
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(|p| p.trim_ascii())
        .filter(|p| !p.is_empty())
        .collect()
}

fn values(map: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    map.get_all(name).iter().cloned().collect()
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let upgrade: bool = u.arbitrary()?;
    let mut map = HeaderMap::new();
    for _ in 0..u.int_in_range(0..=24)? {
        let (n, v) = (name(&mut u)?, value(&mut u)?);
        let (Ok(n), Ok(v)) = (HeaderName::from_bytes(&n), HeaderValue::from_bytes(&v)) else {
            continue;
        };
        map.append(n, v);
    }
    let orig = map.clone();

    // is_upgrade / upgrade_allowed.
    let conn_tokens: Vec<Vec<u8>> = orig
        .get_all("connection")
        .iter()
        .flat_map(|v| tokens(v).into_iter().map(|t| t.to_vec()))
        .collect();
    let expect_upgrade = orig.contains_key("upgrade")
        && conn_tokens
            .iter()
            .any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    assert_eq!(is_upgrade(&orig), expect_upgrade);
    for allowed in [
        vec![],
        vec!["websocket".to_string()],
        vec!["websocket".to_string(), "h2c".to_string()],
    ] {
        if upgrade_allowed(&orig, &allowed) {
            let protos: Vec<Vec<u8>> = orig
                .get_all("upgrade")
                .iter()
                .flat_map(|v| tokens(v).into_iter().map(|t| t.to_vec()))
                .collect();
            assert!(!protos.is_empty(), "allowed without a protocol");
            for p in protos {
                let name = p.split(|b| *b == b'/').next().unwrap();
                assert!(!name.eq_ignore_ascii_case(b"h2c"), "h2c allowed: {orig:?}");
                assert!(
                    allowed
                        .iter()
                        .any(|a| a.as_bytes().eq_ignore_ascii_case(name)),
                    "{:?} allowed with {allowed:?}",
                    String::from_utf8_lossy(&p)
                );
            }
        }
    }

    // strip_hop_by_hop.
    let named: Vec<HeaderName> = conn_tokens
        .iter()
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    let had_te = orig.contains_key("transfer-encoding");
    let had_hop = orig.keys().any(|k| HOP.contains(&k.as_str()));
    let mut stripped = orig.clone();
    strip_hop_by_hop(&mut stripped, upgrade);
    if upgrade {
        for h in HOP
            .iter()
            .filter(|h| !matches!(**h, "upgrade" | "connection"))
        {
            assert!(
                !stripped.contains_key(*h),
                "{h} kept: {orig:?} -> {stripped:?}"
            );
        }
        if had_hop {
            assert_eq!(
                values(&stripped, &http::header::CONNECTION),
                [HeaderValue::from_static("upgrade")],
                "{orig:?} -> {stripped:?}"
            );
        }
        // The protocols asked for reach the node as they were.
        assert_eq!(
            values(&stripped, &http::header::UPGRADE),
            values(&orig, &http::header::UPGRADE)
        );
    } else {
        for h in HOP {
            assert!(
                !stripped.contains_key(*h),
                "{h} kept: {orig:?} -> {stripped:?}"
            );
        }
        // RFC 9110 7.6.1: every header named in Connection goes, whatever its name, except
        // Host (end-to-end whatever a client says: routing used it; checked below).
        for n in named.iter().filter(|n| *n != http::header::HOST) {
            assert!(
                !stripped.contains_key(n),
                "{n} named in Connection but kept: {orig:?} -> {stripped:?}"
            );
        }
    }
    if had_te {
        assert!(
            !stripped.contains_key("content-length"),
            "content-length kept beside transfer-encoding: {orig:?} -> {stripped:?}"
        );
    }
    // Nothing else is touched.
    for k in orig.keys() {
        let s = k.as_str();
        if HOP.contains(&s)
            || (named.contains(k) && k != http::header::HOST)
            || (had_te && s == "content-length")
            || s == "connection"
        {
            continue;
        }
        assert_eq!(
            values(&stripped, k),
            values(&orig, k),
            "{k} changed: {orig:?} -> {stripped:?}"
        );
    }
    for k in stripped.keys() {
        assert!(
            orig.contains_key(k) || (upgrade && k == "connection"),
            "{k} appeared: {orig:?} -> {stripped:?}"
        );
    }

    // join_cookies.
    let cookies = values(&orig, &http::header::COOKIE);
    let mut joined = orig.clone();
    join_cookies(&mut joined);
    let after = values(&joined, &http::header::COOKIE);
    assert!(after.len() <= 1, "{} cookie fields after join", after.len());
    if cookies.len() >= 2 {
        // The same cookie-pairs, in the same order (empty fields may vanish).
        assert_eq!(
            cookie_pairs(&after),
            cookie_pairs(&cookies),
            "{cookies:?} joined as {after:?}"
        );
    } else {
        assert_eq!(after, cookies);
    }
    for k in orig.keys().filter(|k| *k != http::header::COOKIE) {
        assert_eq!(values(&joined, k), values(&orig, k));
    }

    // append_forwarded_for.
    let xff = values(&orig, &envgate::proxy::headers::X_FORWARDED_FOR);
    for peer in ["9.9.9.9", "::1", "2001:db8::7"] {
        let peer = HeaderValue::from_static(peer);
        match append_forwarded_for(&orig, &peer) {
            None => assert!(
                xff.iter().all(|v| v.is_empty()),
                "forwarded-for {xff:?} dropped"
            ),
            Some(v) => {
                let mut expect: Vec<u8> = Vec::new();
                for prev in &xff {
                    if !expect.is_empty() {
                        expect.extend_from_slice(b", ");
                    }
                    expect.extend_from_slice(prev.as_bytes());
                }
                expect.extend_from_slice(b", ");
                expect.extend_from_slice(peer.as_bytes());
                assert_eq!(v.as_bytes(), &expect[..]);
            }
        }
    }

    // sane_request_id.
    for v in orig.values() {
        if sane_request_id(v) {
            let b = v.as_bytes();
            assert!(!b.is_empty() && b.len() <= 128);
            assert!(v.to_str().is_ok());
            assert!(!b.iter().any(|c| c.is_ascii_whitespace() || *c == b','));
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
