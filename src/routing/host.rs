//! Entry resolution: (Host, local port) -> environment.
//!
//! Precedence (DESIGN.md): exact host, then the longest matching wildcard, then the
//! port-wide entry. The Host's own port, its case and a trailing dot are ignored. Lookups
//! cost one hash probe for the port, one for the exact host and one per dot in the host
//! for wildcards, whatever the number of entries; they allocate nothing (the host is
//! lowercased into a stack buffer).

use rustc_hash::FxHashMap;

use crate::topology::EnvId;

/// Longest host name we look up (RFC 1035: 253 characters, plus slack for a dot).
pub const MAX_HOST: usize = 255;

/// One parsed entry address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryHost {
    /// `company.com:443` (stored lowercased, without a trailing dot).
    Exact(String),
    /// `*.company.com:443`, stored as the suffix `.company.com`.
    Wildcard(String),
    /// `:8083`, the whole port.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub host: EntryHost,
    pub port: u16,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            EntryHost::Exact(h) if h.contains(':') => write!(f, "[{h}]:{}", self.port),
            EntryHost::Exact(h) => write!(f, "{h}:{}", self.port),
            EntryHost::Wildcard(s) => write!(f, "*{s}:{}", self.port),
            EntryHost::Any => write!(f, ":{}", self.port),
        }
    }
}

impl Entry {
    /// Parses `host:port`, `*.suffix:port`, `[v6]:port` or `:port`.
    pub fn parse(s: &str) -> Result<Entry, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("entry {s:?}: expected [ipv6]:port"))?;
            (h, p)
        } else {
            s.rsplit_once(':')
                .ok_or_else(|| format!("entry {s:?}: expected host:port or :port"))?
        };
        let port: u16 =
            port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!("entry {s:?}: port {port:?} is not a number from 1 to 65535")
            })?;
        if host.is_empty() {
            return Ok(Entry {
                host: EntryHost::Any,
                port,
            });
        }
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if let Some(suffix) = host.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 || !valid_host(&suffix[1..]) {
                return Err(format!(
                    "entry {s:?}: a wildcard must be \"*.\" followed by a host name"
                ));
            }
            return Ok(Entry {
                host: EntryHost::Wildcard(suffix.to_string()),
                port,
            });
        }
        if !valid_host(&host) && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("entry {s:?}: {host:?} is not a valid host name"));
        }
        Ok(Entry {
            host: EntryHost::Exact(host),
            port,
        })
    }
}

/// Whether a Host value or an authority is a valid reg-name or IP literal with an optional
/// numeric port (RFC 9110 7.2, RFC 3986 3.2): no userinfo, path, spaces or second port.
/// `a.com`, `a.com:8080`, `a.com.`, `10.0.0.1:80`, `[::1]:80` pass; `a.com:@evil`,
/// `a.com/x`, `a b`, `a:80:81`, `` do not.
#[inline]
pub fn valid_authority(raw: &[u8]) -> bool {
    let (host_ok, rest) = if raw.first() == Some(&b'[') {
        let Some(end) = raw.iter().position(|b| *b == b']') else {
            return false;
        };
        let ok = std::str::from_utf8(&raw[1..end])
            .ok()
            .is_some_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
        (ok, &raw[end + 1..])
    } else {
        // One table lookup a byte, up to the first byte that is not a host byte.
        let mut end = 0;
        while end < raw.len() && HOST_BYTE[raw[end] as usize] {
            end += 1;
        }
        let ok = end > 0 && end <= MAX_HOST;
        (ok, &raw[end..])
    };
    if !host_ok {
        return false;
    }
    match rest {
        [] => true,
        [b':', port @ ..] => {
            port.len() <= 5
                && port.iter().all(u8::is_ascii_digit)
                && port.iter().fold(0u32, |n, d| n * 10 + (d - b'0') as u32) <= 65535
        }
        _ => false,
    }
}

/// Bytes of a host name: letters, digits, `-`, `.`, `_`.
static HOST_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_';
        b += 1;
    }
    t
};

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[derive(Debug, Default)]
struct PortTable {
    exact: FxHashMap<Box<str>, EnvId>,
    /// Keyed by the suffix with its leading dot: `.company.com`.
    wildcard: FxHashMap<Box<str>, EnvId>,
    any: Option<EnvId>,
}

/// Compiled entry addresses of a topology.
#[derive(Debug, Default)]
pub struct EntryTable {
    ports: FxHashMap<u16, PortTable>,
}

impl EntryTable {
    /// Adds an entry; returns the environment that already holds it, if any.
    pub fn insert(&mut self, entry: &Entry, env: EnvId) -> Result<(), EnvId> {
        let table = self.ports.entry(entry.port).or_default();
        let slot = match &entry.host {
            EntryHost::Exact(h) => table.exact.entry(h.as_str().into()),
            EntryHost::Wildcard(s) => table.wildcard.entry(s.as_str().into()),
            EntryHost::Any => {
                return match table.any {
                    Some(other) => Err(other),
                    None => {
                        table.any = Some(env);
                        Ok(())
                    }
                }
            }
        };
        match slot {
            std::collections::hash_map::Entry::Occupied(o) => Err(*o.get()),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(env);
                Ok(())
            }
        }
    }

    /// Resolves a request. `host` is the Host header or the `:authority` as sent (any
    /// case, optional port, optional trailing dot); `None` when the request had none.
    #[inline]
    pub fn lookup(&self, host: Option<&[u8]>, port: u16) -> Option<EntryMatch<'_>> {
        let table = self.ports.get(&port)?;
        if let Some(raw) = host {
            let mut buf = [0u8; MAX_HOST];
            if let Some(host) = normalise(raw, &mut buf) {
                if let Some((key, env)) = table.exact.get_key_value(host) {
                    return Some(EntryMatch {
                        env: *env,
                        port,
                        host: MatchedHost::Exact(key),
                    });
                }
                if !table.wildcard.is_empty() {
                    // Each dot starts a shorter suffix: the first one found is the longest.
                    let bytes = host.as_bytes();
                    for i in 1..bytes.len() {
                        if bytes[i] == b'.' {
                            if let Some((key, env)) = table.wildcard.get_key_value(&host[i..]) {
                                return Some(EntryMatch {
                                    env: *env,
                                    port,
                                    host: MatchedHost::Wildcard(key),
                                });
                            }
                        }
                    }
                }
            }
        }
        table.any.map(|env| EntryMatch {
            env,
            port,
            host: MatchedHost::Any,
        })
    }
}

/// The entry address a request matched, borrowed from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMatch<'t> {
    pub env: EnvId,
    pub port: u16,
    pub host: MatchedHost<'t>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedHost<'t> {
    Exact(&'t str),
    /// The suffix with its leading dot.
    Wildcard(&'t str),
    Any,
}

impl std::fmt::Display for EntryMatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host {
            MatchedHost::Exact(h) if h.contains(':') => write!(f, "[{h}]:{}", self.port),
            MatchedHost::Exact(h) => write!(f, "{h}:{}", self.port),
            MatchedHost::Wildcard(s) => write!(f, "*{s}:{}", self.port),
            MatchedHost::Any => write!(f, ":{}", self.port),
        }
    }
}

/// The host part of a Host value or authority: without the port and a trailing dot,
/// lowercased into `buf`. `None` when too long or not ASCII.
#[inline]
pub fn host_part<'a>(raw: &[u8], buf: &'a mut [u8; MAX_HOST]) -> Option<&'a str> {
    normalise(raw, buf)
}

/// Strips the port and a trailing dot, lowercases into `buf`. `None` when the host is
/// too long or not ASCII (no entry can match it).
#[inline]
fn normalise<'a>(raw: &[u8], buf: &'a mut [u8; MAX_HOST]) -> Option<&'a str> {
    let host = if raw.first() == Some(&b'[') {
        // [v6]:port or [v6]
        let end = raw.iter().position(|b| *b == b']')?;
        &raw[1..end]
    } else {
        match raw.iter().rposition(|b| *b == b':') {
            Some(i) => &raw[..i],
            None => raw,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.len() > MAX_HOST {
        return None;
    }
    let out = &mut buf[..host.len()];
    for (o, b) in out.iter_mut().zip(host) {
        if !b.is_ascii() {
            return None;
        }
        *o = b.to_ascii_lowercase();
    }
    // Checked ASCII above.
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Env {
        fn env(self) -> Option<EnvId>;
    }
    impl Env for Option<EntryMatch<'_>> {
        fn env(self) -> Option<EnvId> {
            self.map(|m| m.env)
        }
    }

    fn table(entries: &[(&str, EnvId)]) -> EntryTable {
        let mut t = EntryTable::default();
        for (e, env) in entries {
            t.insert(&Entry::parse(e).unwrap(), *env).unwrap();
        }
        t
    }

    #[test]
    fn precedence_exact_then_longest_wildcard_then_port() {
        let t = table(&[
            ("a.company.com:80", 1),
            ("*.company.com:80", 2),
            ("*.eu.company.com:80", 3),
            (":80", 4),
        ]);
        assert_eq!(t.lookup(Some(b"a.company.com"), 80).env(), Some(1));
        assert_eq!(t.lookup(Some(b"b.company.com"), 80).env(), Some(2));
        assert_eq!(t.lookup(Some(b"x.eu.company.com"), 80).env(), Some(3));
        assert_eq!(t.lookup(Some(b"y.x.eu.company.com"), 80).env(), Some(3));
        assert_eq!(t.lookup(Some(b"company.com"), 80).env(), Some(4));
        assert_eq!(t.lookup(Some(b"other.org"), 80).env(), Some(4));
        assert_eq!(t.lookup(None, 80).env(), Some(4));
        assert_eq!(t.lookup(Some(b"a.company.com"), 81).env(), None);
    }

    #[test]
    fn host_port_case_and_trailing_dot_are_ignored() {
        let t = table(&[("Company.COM:8080", 7), ("[::1]:8080", 8)]);
        for h in [
            &b"company.com"[..],
            b"COMPANY.com:8080",
            b"company.com.",
            b"company.com.:1234",
        ] {
            assert_eq!(
                t.lookup(Some(h), 8080).env(),
                Some(7),
                "{:?}",
                std::str::from_utf8(h)
            );
        }
        assert_eq!(t.lookup(Some(b"[::1]:8080"), 8080).env(), Some(8));
        assert_eq!(t.lookup(Some(b"company.co"), 8080).env(), None);
        assert_eq!(t.lookup(Some("cömpany.com".as_bytes()), 8080).env(), None);
    }

    #[test]
    fn duplicate_is_reported_with_holder() {
        let mut t = table(&[("a.com:80", 1), (":81", 2)]);
        assert_eq!(t.insert(&Entry::parse("A.com.:80").unwrap(), 3), Err(1));
        assert_eq!(t.insert(&Entry::parse(":81").unwrap(), 3), Err(2));
    }

    #[test]
    fn authorities() {
        for ok in [
            "a.com",
            "A.com:8080",
            "a.com.",
            "a.com:",
            "10.0.0.1:80",
            "[::1]:80",
            "[::1]",
            "my_host",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a.com:@evil",
            "user@a.com",
            "a.com/x",
            "a b",
            "a:80:81",
            "a.com:123456",
            "a.com:65536",
            "[::1",
            "[zz]:80",
            ":80",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn bad_entries_are_refused() {
        for e in [
            "company.com",
            "a.com:0",
            "a.com:x",
            "*company.com:80",
            "a b:80",
            "*.:80",
        ] {
            assert!(Entry::parse(e).is_err(), "{e}");
        }
    }
}
