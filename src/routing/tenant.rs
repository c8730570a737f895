//! Tenant ids: where a request carries one, and which range (if any) owns it.
//!
//! An id is a decimal `u64`. From a header or a query parameter it is the whole value
//! (`X-Tenant-Id: 42`, `?tenant=42`). A query parameter is read as forms encode it: its
//! name and value percent-decoded, `+` a space, the name in any case (`?%74enant=` and
//! `?Tenant=` are `tenant` to some nodes, so they are to envgate). From a host
//! label or a path segment, which name things, it may follow a prefix of letters, `-` or
//! `_` (`t42.company.com`, `/tenants/tenant-42/...`). An empty value is a missing id;
//! anything else that is not such a number, a number that overflows `u64`, and a request
//! that carries the key twice with different values (a header field repeated, a query
//! parameter given twice: the node might read the other one) are malformed. A host that is
//! an IP address has no tenant label.
//!
//! Nothing here allocates: values are read in place, query names and values are decoded
//! on the fly.

use super::RequestView;
use crate::routing::host::{host_part, MAX_HOST};
use crate::topology::{TenantKey, TenantRange, Tenants};

/// What the tenant rule of an environment made of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantDecision {
    /// The request carries no id: it stays (or 400 `tenant_required`).
    Missing,
    /// The id is not a number: it stays (or 400 `bad_tenant`).
    Malformed,
    /// A valid id that no range holds: it stays.
    Outside { id: u64 },
    /// A range holds the id: the request goes to the range's environment.
    Routed { id: u64, range: TenantRange },
}

/// The id a request carries for `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantId {
    Missing,
    Malformed,
    Id(u64),
}

#[inline]
pub fn decide(rule: &Tenants, req: &RequestView<'_>) -> TenantDecision {
    match extract(&rule.key, req) {
        TenantId::Missing => TenantDecision::Missing,
        TenantId::Malformed => TenantDecision::Malformed,
        TenantId::Id(id) => match rule.range_of(id) {
            Some(range) => TenantDecision::Routed { id, range: *range },
            None => TenantDecision::Outside { id },
        },
    }
}

#[inline]
pub fn extract(key: &TenantKey, req: &RequestView<'_>) -> TenantId {
    match key {
        TenantKey::Header(name) => {
            let mut values = req.headers.get_all(name);
            let Some(first) = values.next() else {
                return TenantId::Missing;
            };
            let id = plain(first);
            for other in values {
                if plain(other) != id {
                    return TenantId::Malformed;
                }
            }
            id
        }
        TenantKey::HostLabel(n) => {
            let Some(raw) = req.host else {
                return TenantId::Missing;
            };
            let mut buf = [0u8; MAX_HOST];
            let Some(host) = host_part(raw, &mut buf) else {
                return TenantId::Malformed;
            };
            if raw.first() == Some(&b'[') || host.parse::<std::net::Ipv4Addr>().is_ok() {
                return TenantId::Missing;
            }
            match host.split('.').nth(*n as usize) {
                Some(label) => embedded(label.as_bytes()),
                None => TenantId::Missing,
            }
        }
        TenantKey::PathSegment(n) => {
            let Some(rest) = req.path.strip_prefix('/') else {
                return TenantId::Missing;
            };
            match rest.split('/').nth((*n as usize).saturating_sub(1)) {
                Some(segment) => embedded(segment.as_bytes()),
                None => TenantId::Missing,
            }
        }
        TenantKey::Query(name) => {
            let Some(query) = req.query else {
                return TenantId::Missing;
            };
            let mut found: Option<TenantId> = None;
            for pair in query.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if !form_name_is(k.as_bytes(), name.as_bytes()) {
                    continue;
                }
                let id = form_value(v.as_bytes());
                match found {
                    None => found = Some(id),
                    Some(prev) if prev != id => return TenantId::Malformed,
                    Some(_) => {}
                }
            }
            found.unwrap_or(TenantId::Missing)
        }
    }
}

/// Decodes form-encoded bytes one at a time: `%XX` escapes and `+` for a space. `None` for
/// a malformed escape (which stands for itself and the two bytes after it).
pub(crate) struct FormDecode<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Iterator for FormDecode<'_> {
    type Item = Option<u8>;

    #[inline]
    fn next(&mut self) -> Option<Option<u8>> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(match b {
            b'+' => Some(b' '),
            b'%' => {
                let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
                let (h, l) = (
                    hex(self.bytes.get(self.at)),
                    hex(self.bytes.get(self.at + 1)),
                );
                self.at += 2;
                match (h, l) {
                    (Some(h), Some(l)) => Some((h * 16 + l) as u8),
                    _ => None,
                }
            }
            b => Some(b),
        })
    }
}

pub(crate) fn form(bytes: &[u8]) -> FormDecode<'_> {
    FormDecode { bytes, at: 0 }
}

/// Whether a form-encoded parameter name is `name`, in any case.
#[inline]
fn form_name_is(raw: &[u8], name: &[u8]) -> bool {
    let mut decoded = form(raw);
    for want in name {
        match decoded.next() {
            Some(Some(b)) if b.eq_ignore_ascii_case(want) => {}
            _ => return false,
        }
    }
    decoded.next().is_none()
}

/// A form-encoded value that must be a number (surrounding spaces ignored), decoded and
/// parsed in one pass, whatever its length.
#[inline]
fn form_value(raw: &[u8]) -> TenantId {
    let mut id: u64 = 0;
    // 0: leading spaces, 1: digits, 2: trailing spaces.
    let mut state = 0;
    for b in form(raw) {
        let Some(b) = b else {
            return TenantId::Malformed;
        };
        match (state, b) {
            (0 | 2, b' ' | b'\t') => {}
            (0 | 1, b'0'..=b'9') => {
                state = 1;
                id = match id
                    .checked_mul(10)
                    .and_then(|n| n.checked_add((b - b'0') as u64))
                {
                    Some(n) => n,
                    None => return TenantId::Malformed,
                };
            }
            (1, b' ' | b'\t') => state = 2,
            _ => return TenantId::Malformed,
        }
    }
    match state {
        0 => TenantId::Missing,
        _ => TenantId::Id(id),
    }
}

/// A whole value that must be a number.
#[inline]
fn plain(v: &[u8]) -> TenantId {
    let v = v.trim_ascii();
    if v.is_empty() {
        return TenantId::Missing;
    }
    number(v)
}

/// A label or segment: an optional prefix of letters, `-` or `_`, then the number.
#[inline]
fn embedded(v: &[u8]) -> TenantId {
    if v.is_empty() {
        return TenantId::Missing;
    }
    let start = v
        .iter()
        .position(|b| !(b.is_ascii_alphabetic() || *b == b'-' || *b == b'_'))
        .unwrap_or(v.len());
    number(&v[start..])
}

/// Decimal digits only, no sign, fitting a `u64`.
#[inline]
fn number(v: &[u8]) -> TenantId {
    if v.is_empty() {
        return TenantId::Malformed;
    }
    let mut id: u64 = 0;
    for b in v {
        if !b.is_ascii_digit() {
            return TenantId::Malformed;
        }
        id = match id
            .checked_mul(10)
            .and_then(|n| n.checked_add((b - b'0') as u64))
        {
            Some(n) => n,
            None => return TenantId::Malformed,
        };
    }
    TenantId::Id(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(plain(b"42"), TenantId::Id(42));
        assert_eq!(plain(b" 0042 "), TenantId::Id(42));
        assert_eq!(plain(b""), TenantId::Missing);
        assert_eq!(plain(b"18446744073709551615"), TenantId::Id(u64::MAX));
        for bad in [
            &b"18446744073709551616"[..],
            b"-1",
            b"+1",
            b"4 2",
            b"t42",
            b"0x10",
        ] {
            assert_eq!(plain(bad), TenantId::Malformed, "{bad:?}");
        }
        assert_eq!(embedded(b"t42"), TenantId::Id(42));
        assert_eq!(embedded(b"tenant-42"), TenantId::Id(42));
        assert_eq!(embedded(b"42"), TenantId::Id(42));
        assert_eq!(embedded(b"acme"), TenantId::Malformed);
        assert_eq!(embedded(b"t42x"), TenantId::Malformed);
        assert_eq!(form_value(b"%34%32"), TenantId::Id(42));
        assert_eq!(form_value(b"+42+"), TenantId::Id(42));
        assert_eq!(form_value(b""), TenantId::Missing);
        assert_eq!(form_value(b"%20"), TenantId::Missing);
        let long = format!("{}1001", "0".repeat(100));
        assert_eq!(form_value(long.as_bytes()), TenantId::Id(1001));
        for bad in [
            &b"4%2"[..],
            b"42%00",
            b"4 2",
            b"-1",
            b"18446744073709551616",
            b"%",
        ] {
            assert_eq!(form_value(bad), TenantId::Malformed, "{bad:?}");
        }
        assert!(form_name_is(b"tenant", b"tenant"));
        assert!(form_name_is(b"%74enant", b"tenant"));
        assert!(form_name_is(b"TENANT", b"tenant"));
        assert!(!form_name_is(b"tenants", b"tenant"));
        assert!(!form_name_is(b"tenan", b"tenant"));
        assert!(!form_name_is(b"ten%ant", b"tenant"));
    }
}
