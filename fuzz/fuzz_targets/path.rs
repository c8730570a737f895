//! `routing::path::normalize` on arbitrary paths starting with '/': no panic, and the
//! path it leaves (rewritten or as it was) is normal: starts with '/', no "//", no "." or
//! ".." segment (nor one with `;` parameters), no backslash, no encoded dot, and
//! normalising it again changes nothing. Each refusal has its cause in the input.
#![no_main]

use envgate::routing::path::{normalize, PathError};
use libfuzzer_sys::fuzz_target;

fn is_hex(b: u8) -> bool {
    b.is_ascii_hexdigit()
}

fn check_normal(p: &str, allow: bool, input: &str) {
    assert!(p.starts_with('/'), "{input:?} -> {p:?}: not absolute");
    assert!(!p.contains("//"), "{input:?} -> {p:?}: empty segment");
    assert!(!p.contains('\\'), "{input:?} -> {p:?}: backslash");
    for seg in p[1..].split('/') {
        assert!(
            seg != "." && seg != ".." && !seg.starts_with(".;") && !seg.starts_with("..;"),
            "{input:?} -> {p:?}: dot segment"
        );
    }
    let lower = p.to_ascii_lowercase();
    assert!(!lower.contains("%2e"), "{input:?} -> {p:?}: encoded dot");
    assert!(!lower.contains("%00"), "{input:?} -> {p:?}: encoded NUL");
    if !allow {
        assert!(!lower.contains("%2f"), "{input:?} -> {p:?}: encoded slash");
    }
    // Idempotent. A path without '%' or ';' must be recognised as normal (no rewrite, no
    // allocation); one that keeps an escape (`%20`) or parameters is rebuilt to the same
    // text.
    match normalize(p, allow) {
        Ok(None) => {}
        Ok(Some(q)) => {
            assert!(
                p.contains(['%', ';']),
                "{input:?} -> {p:?} -> {q:?}: normal path rewritten"
            );
            assert_eq!(q, p, "{input:?}: normalising twice changed the path");
        }
        Err(e) => panic!("{input:?} -> {p:?}: the result is refused: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let allow = flags & 1 == 1;
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let input = if s.starts_with('/') {
        s.to_string()
    } else {
        format!("/{s}")
    };
    match normalize(&input, allow) {
        Ok(None) => check_normal(&input, allow, &input),
        Ok(Some(p)) => check_normal(&p, allow, &input),
        Err(PathError::BadEscape) => {
            // Only for a '%' not followed by two hex digits (never for non-ASCII text).
            let b = input.as_bytes();
            assert!(
                b.iter().enumerate().any(|(i, c)| *c == b'%'
                    && !(b.get(i + 1).copied().is_some_and(is_hex)
                        && b.get(i + 2).copied().is_some_and(is_hex))),
                "{input:?}: BadEscape without a malformed escape"
            );
        }
        Err(PathError::NotAbsolute) => panic!("{input:?}: starts with '/' yet NotAbsolute"),
        Err(PathError::EncodedSlash) => {
            assert!(!allow, "{input:?}: EncodedSlash although allowed");
            assert!(input.to_ascii_lowercase().contains("%2f"));
        }
        Err(PathError::Nul) => assert!(input.contains("%00")),
        Err(PathError::AboveRoot) => {}
        Err(PathError::Ambiguous) => assert!(
            input.contains(['\\', ';']),
            "{input:?}: Ambiguous without a backslash or parameters"
        ),
        // A refusal added later: no invariant known here yet.
        #[allow(unreachable_patterns)]
        Err(_) => {}
    }
});
