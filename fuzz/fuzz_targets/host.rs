//! Host / authority handling on arbitrary bytes: `valid_authority` accepts only a plain
//! host or IP literal with an optional numeric port, and `EntryTable::lookup` never panics
//! and ignores case. Also: an entry address that parses prints back to itself.
#![no_main]

use envgate::routing::host::{valid_authority, Entry, EntryHost, EntryTable};
use libfuzzer_sys::fuzz_target;

const ENTRIES: &[(&str, usize)] = &[
    ("a.company.com:80", 1),
    ("*.company.com:80", 2),
    ("*.eu.company.com:80", 3),
    (":81", 4),
    ("[::1]:80", 5),
    ("Company.COM.:8080", 6),
    ("*.x_y.example:8080", 7),
];
const PORTS: &[u16] = &[80, 81, 8080, 443];

fn table() -> EntryTable {
    let mut t = EntryTable::default();
    for (e, env) in ENTRIES {
        t.insert(&Entry::parse(e).unwrap(), *env).unwrap();
    }
    t
}

fn check_authority(raw: &[u8]) {
    if !valid_authority(raw) {
        return;
    }
    assert!(raw.is_ascii(), "{raw:?}: valid yet not ASCII");
    for bad in [
        b'/', b'@', b' ', b'?', b'#', b'\\', b'\t', b'\r', b'\n', b'\0',
    ] {
        assert!(
            !raw.contains(&bad),
            "{raw:?}: valid yet holds {:?}",
            bad as char
        );
    }
    // At most one ':' outside brackets, and brackets only as `[v6]` at the start.
    let outside: Vec<u8> = if raw.first() == Some(&b'[') {
        let end = raw
            .iter()
            .position(|b| *b == b']')
            .expect("closing bracket");
        raw[end + 1..].to_vec()
    } else {
        raw.to_vec()
    };
    assert!(
        outside.iter().filter(|b| **b == b':').count() <= 1,
        "{raw:?}: valid yet several ':' outside brackets"
    );
    assert!(
        !outside.contains(&b'[') && !outside.contains(&b']'),
        "{raw:?}: valid yet stray brackets"
    );
    if let Some(i) = outside.iter().position(|b| *b == b':') {
        let port = &outside[i + 1..];
        assert!(
            port.iter().all(u8::is_ascii_digit),
            "{raw:?}: port not digits"
        );
        if !port.is_empty() {
            let n: u32 = std::str::from_utf8(port).unwrap().parse().unwrap();
            assert!(n <= 65535, "{raw:?}: port out of range");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_authority(data);

    let t = table();
    let upper = data.to_ascii_uppercase();
    for &port in PORTS {
        let a = t.lookup(Some(data), port).map(|m| m.env);
        // Case never matters.
        assert_eq!(
            a,
            t.lookup(Some(&upper), port).map(|m| m.env),
            "{data:?} on {port}: case matters"
        );
        if let Some(env) = a {
            assert!(ENTRIES.iter().any(|(_, e)| *e == env));
        }
    }
    let _ = t.lookup(None, 80);

    // An entry that parses prints back to the same entry, and the table finds it.
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(entry) = Entry::parse(s) {
            let printed = entry.to_string();
            assert_eq!(
                Entry::parse(&printed).as_ref(),
                Ok(&entry),
                "{s:?} prints as {printed:?}"
            );
            let mut t = EntryTable::default();
            t.insert(&entry, 99).unwrap();
            let probe = match &entry.host {
                EntryHost::Exact(_) | EntryHost::Any => printed.clone(),
                // A name under the wildcard, if it is still a legal host name (253 at most).
                EntryHost::Wildcard(suffix) if suffix.len() < 253 => {
                    format!("z{suffix}:{}", entry.port)
                }
                EntryHost::Wildcard(_) => return,
            };
            assert_eq!(
                t.lookup(Some(probe.as_bytes()), entry.port).map(|m| m.env),
                Some(99),
                "entry {s:?} ({printed:?}) does not match {probe:?}"
            );
        }
    }
});
