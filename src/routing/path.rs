//! Path normalisation before routing, so that the application match and the node see the
//! same path (RFC 3986 5.2.4, RFC 9110 4.2.3).
//!
//! A path that is already normal (no `%`, no `.`/`..` segment, no empty segment before the
//! end) is left as it is: one scan of its bytes, no allocation. Otherwise it is rebuilt:
//! percent-encoded unreserved characters are decoded (`%41` -> `A`, `%2e` -> `.`), other
//! escapes are kept (hex in upper case), dot-segments are removed, and runs of `/` are
//! merged into one (like nginx's `merge_slashes`: `//admin` and `/admin` must reach the
//! same application). Refused: a `..` that climbs above the root, `%00`, a malformed
//! escape, an encoded `/` (`%2F`) unless the topology allows it (it then stays encoded and
//! never splits a segment), and what some nodes read as a separator or a dot-segment
//! while routing would not: a backslash, and `.`/`..` followed by `;` parameters
//! (`/public/..;/admin`, which Tomcat reads as `/admin`).

/// Why a path was refused (each answers 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `..` segment above the root.
    AboveRoot,
    /// `%00`.
    Nul,
    /// `%2F` where encoded slashes are not allowed.
    EncodedSlash,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// The path does not start with `/`.
    NotAbsolute,
    /// A backslash, or a dot-segment with `;` parameters.
    Ambiguous,
}

impl PathError {
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::AboveRoot => "a .. segment climbs above the root",
            PathError::Nul => "an encoded NUL (%00)",
            PathError::EncodedSlash => "an encoded slash (%2F)",
            PathError::BadEscape => "a malformed percent escape",
            PathError::NotAbsolute => "the path does not start with /",
            PathError::Ambiguous => "a backslash or a dot-segment with parameters",
        }
    }
}

/// `Ok(None)` when `path` is already normal, `Ok(Some(normal))` when it was rewritten.
#[inline]
pub fn normalize(path: &str, allow_encoded_slash: bool) -> Result<Option<String>, PathError> {
    let p = path.as_bytes();
    if p.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(p) {
        return Ok(None);
    }
    rebuild(p, allow_encoded_slash).map(Some)
}

#[inline]
fn is_normal(p: &[u8]) -> bool {
    let mut start = 1;
    for i in 1..=p.len() {
        let end = i == p.len();
        if end || p[i] == b'/' {
            let seg = &p[start..i];
            if seg == b"." || seg == b".." || (seg.is_empty() && !end) {
                return false;
            }
            start = i + 1;
        } else if matches!(p[i], b'%' | b'\\' | b';') {
            return false;
        }
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cold]
fn rebuild(p: &[u8], allow_encoded_slash: bool) -> Result<String, PathError> {
    // Decode the escapes of unreserved characters; `/` stays the only separator.
    let mut dec = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        let b = p[i];
        if b != b'%' {
            dec.push(b);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            p.get(i + 1).copied().and_then(hex),
            p.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let v = h << 4 | l;
        match v {
            0 => return Err(PathError::Nul),
            b'/' if !allow_encoded_slash => return Err(PathError::EncodedSlash),
            v if unreserved(v) => dec.push(v),
            v => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                dec.extend_from_slice(&[b'%', HEX[(v >> 4) as usize], HEX[(v & 15) as usize]]);
            }
        }
        i += 3;
    }
    if dec.contains(&b'\\') {
        return Err(PathError::Ambiguous);
    }
    // Remove dot-segments and empty segments.
    let mut segs: Vec<&[u8]> = Vec::new();
    let parts: Vec<&[u8]> = dec[1..].split(|b| *b == b'/').collect();
    let last = parts.len() - 1;
    let mut trailing = false;
    for (n, seg) in parts.into_iter().enumerate() {
        match seg {
            b"" => trailing = n == last,
            b"." => trailing = n == last,
            b".." => {
                if segs.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = n == last;
            }
            s if s.starts_with(b".;") || s.starts_with(b"..;") => {
                return Err(PathError::Ambiguous);
            }
            s => {
                segs.push(s);
                trailing = false;
            }
        }
    }
    let mut out = Vec::with_capacity(dec.len());
    for s in &segs {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() || trailing {
        out.push(b'/');
    }
    // Only ASCII went in: the input was a valid URI path and escapes stay escaped.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, false).map(|o| o.unwrap_or_else(|| p.to_string()))
    }

    #[test]
    fn normal_paths_are_left_alone() {
        for p in ["/", "/a", "/a/b/", "/a.b/c..d/.e", "/api/v1/x-y_z~"] {
            assert_eq!(normalize(p, false), Ok(None), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(n("/public/../admin/x").unwrap(), "/admin/x");
        assert_eq!(n("/a/./b").unwrap(), "/a/b");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/.").unwrap(), "/a/");
        assert_eq!(n("//admin//x").unwrap(), "/admin/x");
        assert_eq!(n("/a/..").unwrap(), "/");
        assert_eq!(n("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a/../..").unwrap_err(), PathError::AboveRoot);
    }

    #[test]
    fn escapes() {
        assert_eq!(n("/public/%2e%2E/admin").unwrap(), "/admin");
        assert_eq!(n("/%61pi").unwrap(), "/api");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n("/a%3fb").unwrap(), "/a%3Fb");
        assert_eq!(n("/a%00").unwrap_err(), PathError::Nul);
        assert_eq!(n("/a%2Fb").unwrap_err(), PathError::EncodedSlash);
        assert_eq!(n("/a%2").unwrap_err(), PathError::BadEscape);
        assert_eq!(n("/a%zz").unwrap_err(), PathError::BadEscape);
        assert_eq!(
            normalize("/a%2fb/../c", true).unwrap().unwrap(),
            "/c",
            "an allowed encoded slash does not split a segment"
        );
        assert_eq!(normalize("/a%2fb", true).unwrap().unwrap(), "/a%2Fb");
        assert_eq!(n("x").unwrap_err(), PathError::NotAbsolute);
        assert_eq!(n("/a\\..\\b").unwrap_err(), PathError::Ambiguous);
        assert_eq!(n("/a/..;/b").unwrap_err(), PathError::Ambiguous);
        assert_eq!(n("/a/%2e%2e;x/b").unwrap_err(), PathError::Ambiguous);
        assert_eq!(n("/a;v=1/b").unwrap(), "/a;v=1/b");
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for p in ["/a/./b/../c//d/", "/%2e/x", "/%7e%41/"] {
            let once = n(p).unwrap();
            assert_eq!(n(&once).unwrap(), once);
        }
    }
}
