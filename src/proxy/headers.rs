//! Header rewriting both ways: hop-by-hop removal and the `X-Forwarded-*` /
//! `X-Request-Id` headers envgate adds (DESIGN.md, "Traffic responses of envgate's own").
//!
//! Order matters: the names listed in `Connection` are removed *before* envgate adds its
//! own headers, so a client cannot make envgate drop `X-Forwarded-For` by listing it.

use std::cell::{Cell, RefCell};

use bytes::BytesMut;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Hop-by-hop headers of RFC 9110 section 7.6.1, plus the old `Proxy-Connection` and
/// `Keep-Alive`. `Trailer` is not one: it declares a response's trailer fields end to end,
/// and an HTTP/1.1 client is sent only the trailers it declares.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// Whether the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
#[inline]
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(b"upgrade")))
}

fn tokens(v: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    v.as_bytes()
        .split(|b| *b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers and those named in `Connection`. With `upgrade`, keeps
/// `Upgrade` and answers with `Connection: upgrade` (the upgrade must reach the peer).
#[inline]
///
/// Returns whether fields named in `Connection` (beyond the standard hop-by-hop set) were
/// removed, so that a caller that looked at the names before knows to look again.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) -> bool {
    strip_hop_by_hop_keeping(headers, upgrade, None)
}

/// `strip_hop_by_hop`, except that a `Connection` option naming `keep` does not remove it:
/// the field routing read the request by (a tenant id header) reaches the node as routing
/// saw it, whatever the client lists in `Connection`, as Host does.
#[inline]
pub fn strip_hop_by_hop_keeping(
    headers: &mut HeaderMap,
    upgrade: bool,
    keep: Option<&HeaderName>,
) -> bool {
    // One pass over the message's few names finds the hop-by-hop ones (usually none, or
    // just `Connection`), so only those cost a removal.
    let mut found: [Option<HeaderName>; 8] = Default::default();
    let mut n = 0;
    let mut connection = false;
    // A field literally named `close`: `Connection: close` names it too (RFC 9110 7.6.1).
    let mut close_field = false;
    for k in headers.keys() {
        if *k == header::UPGRADE || HOP_BY_HOP.contains(k) {
            connection |= *k == header::CONNECTION;
            found[n] = Some(k.clone());
            n += 1;
        } else if k.as_str() == "close" {
            close_field = true;
        }
    }
    if n == 0 {
        return false;
    }
    let mut named = false;
    // RFC 9112 6.3: with Transfer-Encoding, Content-Length is wrong by definition; the body
    // was de-chunked, so a stale length would frame it wrongly on the other side.
    if found[..n]
        .iter()
        .any(|k| k.as_ref() == Some(&header::TRANSFER_ENCODING))
    {
        headers.remove(header::CONTENT_LENGTH);
    }
    if connection {
        // The fields a Connection option names go too. The options that name standard
        // hop-by-hop fields (`keep-alive`, `upgrade`...) are covered by `found`; Host stays
        // whatever a client says (routing used it). Removal by `&str` allocates nothing;
        // only the values are copied (a reference count each), to free the map for removal.
        let mut all = headers.get_all(header::CONNECTION).iter();
        let first = all.next().cloned();
        // Empty, and so not allocated, unless the message has several Connection fields.
        let more: Vec<HeaderValue> = all.cloned().collect();
        for v in first.iter().chain(&more) {
            for t in tokens(v) {
                if t.eq_ignore_ascii_case(b"close") {
                    if close_field {
                        named |= headers.remove("close").is_some();
                    }
                } else if !t.eq_ignore_ascii_case(b"host")
                    && keep.is_none_or(|k| !t.eq_ignore_ascii_case(k.as_str().as_bytes()))
                    && !HOP_BY_HOP
                        .iter()
                        .chain(std::iter::once(&header::UPGRADE))
                        .any(|h| t.eq_ignore_ascii_case(h.as_str().as_bytes()))
                {
                    if let Ok(name) = std::str::from_utf8(t) {
                        named |= headers.remove(name).is_some();
                    }
                }
            }
        }
    }
    for name in found.iter_mut().take(n).filter_map(Option::take) {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    named
}

/// Whether a request's `TE` lists `trailers`.
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(b"trailers")))
}

/// What one pass over a request's field names found, so that the rewrite looks up only
/// what is there.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scan {
    /// A hop-by-hop field or `Upgrade`.
    pub hop: bool,
    pub forwarded: bool,
    pub forwarded_for: bool,
    pub forwarded_proto: bool,
    pub forwarded_host: bool,
    pub request_id: bool,
}

/// One pass over the field names (each name once, however many values it has).
#[inline]
pub fn scan(headers: &HeaderMap) -> Scan {
    let mut s = Scan::default();
    for k in headers.keys() {
        if *k == header::UPGRADE || HOP_BY_HOP.contains(k) {
            s.hop = true;
        } else if *k == header::FORWARDED {
            s.forwarded = true;
        } else if *k == X_FORWARDED_FOR {
            s.forwarded_for = true;
        } else if *k == X_FORWARDED_PROTO {
            s.forwarded_proto = true;
        } else if *k == X_FORWARDED_HOST {
            s.forwarded_host = true;
        } else if *k == X_REQUEST_ID {
            s.request_id = true;
        }
    }
    s
}

/// Whether every protocol a request's `Upgrade` asks for is one the environment tunnels.
/// `h2c` never is: inside such a tunnel later requests would bypass routing.
#[inline]
pub fn upgrade_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let mut any = false;
    for v in headers.get_all(header::UPGRADE) {
        for t in tokens(v) {
            // `websocket`, or `name/version`.
            let name = t.split(|b| *b == b'/').next().unwrap_or(t);
            if name.eq_ignore_ascii_case(b"h2c")
                || !allowed
                    .iter()
                    .any(|a| a.as_bytes().eq_ignore_ascii_case(name))
            {
                return false;
            }
            any = true;
        }
    }
    any
}

/// Joins several `Cookie` fields (HTTP/2 sends one per cookie) into one, separated by
/// `; `, for an HTTP/1.1 node (RFC 9113 8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut it = headers.get_all(header::COOKIE).iter();
    if it.next().is_none() || it.next().is_none() {
        return;
    }
    let mut v = Vec::new();
    for c in headers.get_all(header::COOKIE) {
        if !v.is_empty() {
            v.extend_from_slice(b"; ");
        }
        v.extend_from_slice(c.as_bytes());
    }
    if let Ok(joined) = HeaderValue::from_bytes(&v) {
        headers.insert(header::COOKIE, joined);
    }
}

/// A trusted proxy's `X-Forwarded-For` fields, joined in order, with `peer` appended; `None`
/// when there were none.
pub fn append_forwarded_for(headers: &HeaderMap, peer: &HeaderValue) -> Option<HeaderValue> {
    let mut v = Vec::new();
    for prev in headers.get_all(&X_FORWARDED_FOR) {
        if !v.is_empty() {
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(prev.as_bytes());
    }
    if v.is_empty() {
        return None;
    }
    v.extend_from_slice(b", ");
    v.extend_from_slice(peer.as_bytes());
    HeaderValue::from_bytes(&v).ok()
}

/// Whether a client's `X-Request-Id` may be passed on as it is.
#[inline]
pub fn sane_request_id(v: &HeaderValue) -> bool {
    sane_request_id_bytes(v.as_bytes())
}

/// `sane_request_id` of raw bytes.
#[inline]
pub fn sane_request_id_bytes(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=@".contains(c))
}

/// Header values made by envgate (request ids, client addresses), cut from a per-worker
/// arena of 8 KiB: one allocation per chunk instead of one per value, and the values are
/// shared from the start, so cloning them (as the copy kept for a retry does) allocates
/// nothing either. Also the worker's cache of the field names nodes answer with.
#[derive(Default)]
pub struct ValueArena {
    arena: RefCell<BytesMut>,
    /// The field names of nodes' answers met last, as the codec reads them (a node sends
    /// the same few names in each answer).
    names: RefCell<Vec<(Box<[u8]>, HeaderName)>>,
}

const ARENA: usize = 8 * 1024;
/// Names kept by `ValueArena::name`, and the longest kept.
const NAMES: usize = 32;
const NAME_BYTES: usize = 64;

impl ValueArena {
    /// `bytes` as a header value; `None` when they are not a valid one.
    #[inline]
    pub fn value(&self, bytes: &[u8]) -> Option<HeaderValue> {
        let mut arena = self.arena.borrow_mut();
        if arena.capacity() < bytes.len() {
            *arena = BytesMut::with_capacity(ARENA.max(bytes.len()));
        }
        arena.extend_from_slice(bytes);
        HeaderValue::from_maybe_shared(arena.split().freeze()).ok()
    }

    /// `raw` (a field name as received) as a `HeaderName`; `None` when it is not a valid
    /// one. Names met before are not parsed again.
    #[inline]
    pub fn name(&self, raw: &[u8]) -> Option<HeaderName> {
        let mut names = self.names.borrow_mut();
        if let Some((_, n)) = names.iter().find(|(k, _)| **k == *raw) {
            return Some(n.clone());
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        if raw.len() <= NAME_BYTES {
            if names.len() == NAMES {
                names.remove(0);
            }
            names.push((raw.into(), name.clone()));
        }
        Some(name)
    }
}

/// Makes request ids: a random per-worker prefix and a counter, 32 hex digits.
pub struct RequestIds {
    prefix: u64,
    next: Cell<u64>,
}

impl Default for RequestIds {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS once per process and varies per instance.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        RequestIds {
            prefix: h.finish(),
            next: Cell::new(0),
        }
    }
}

impl RequestIds {
    #[inline]
    pub fn next(&self, arena: &ValueArena) -> HeaderValue {
        // Hex digits are always a valid header value.
        arena
            .value(&self.next_raw())
            .expect("hex is a valid header value")
    }

    /// The next id as its 32 hex digits, for a head written as bytes.
    #[inline]
    pub fn next_raw(&self) -> [u8; 32] {
        let n = self.next.get();
        self.next.set(n.wrapping_add(1));
        let mut buf = [0u8; 32];
        hex(self.prefix, &mut buf[..16]);
        hex(n, &mut buf[16..]);
        buf
    }
}

#[inline]
fn hex(mut v: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_go_and_hop_by_hop_too() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret , x-forwarded-for"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn every_named_field_goes_but_host() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, host"));
        h.insert("close", HeaderValue::from_static("x"));
        h.insert(header::HOST, HeaderValue::from_static("a.com"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host"]);
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn transfer_encoding_removes_content_length() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn upgrades_cookies_and_forwarded_for() {
        let allowed = vec!["websocket".to_string()];
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(upgrade_allowed(&h, &allowed));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!upgrade_allowed(&h, &["h2c".to_string()]));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket, foo"));
        assert!(!upgrade_allowed(&h, &allowed));

        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");

        let mut h = HeaderMap::new();
        let peer = HeaderValue::from_static("9.9.9.9");
        assert_eq!(append_forwarded_for(&h, &peer), None);
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        assert_eq!(
            append_forwarded_for(&h, &peer).unwrap(),
            "1.1.1.1, 2.2.2.2, 3.3.3.3, 9.9.9.9"
        );
    }

    #[test]
    fn request_ids_are_unique_and_sane() {
        let (ids, arena) = (RequestIds::default(), ValueArena::default());
        let (a, b) = (ids.next(&arena), ids.next(&arena));
        assert_ne!(a, b);
        assert!(sane_request_id(&a));
        assert!(!sane_request_id(&HeaderValue::from_static("a b")));
        assert!(!sane_request_id(&HeaderValue::from_static("")));
    }
}
