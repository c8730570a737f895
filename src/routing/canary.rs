//! Canary assignment: which side of a canary split a request is on.
//!
//! Each request gets a bucket from 0 to 9,999 and goes to the canary when its bucket is
//! below the weight in hundredths of a percent (5% -> buckets 0..499). The bucket is
//! sticky, so raising the weight only moves users onto the canary and lowering it only
//! moves them back:
//! 1. the canary cookie, when the request carries a valid one (`0`..`9999`);
//! 2. else a stable key (a header, a cookie of the application's, or the client address)
//!    hashed with a fixed function: FNV-1a (64 bit) over the owning environment's name, a
//!    zero byte and the key, then the MurmurHash3 finaliser, modulo 10,000. No per-process
//!    randomness: every instance with the same topology puts the same key in the same
//!    bucket. This function is part of the contract; changing it would move users;
//! 3. else at random.
//!
//! A bucket not read from the cookie is set in it (when the canary names one), so a
//! user keeps it, on this instance and on every other. The override header (`always`,
//! `never`) decides alone and sets nothing.
//!
//! Everything here reads the request in place; nothing allocates.

use std::net::IpAddr;

use http::header;

use super::{Fields, RequestView};
use crate::topology::{Canary, CanaryHash};

/// Number of buckets: weights have two decimals.
pub const BUCKETS: u16 = 10_000;

/// How long the canary cookie lives (30 days).
pub const COOKIE_MAX_AGE: u32 = 30 * 24 * 3600;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[inline]
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// MurmurHash3's 64-bit finaliser: spreads FNV's weak low bits before the modulo.
#[inline]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The hash state after an environment's name (computed once, when the topology is built).
pub fn salt(environment: &str) -> u64 {
    fnv(fnv(FNV_OFFSET, environment.as_bytes()), &[0])
}

/// The bucket of a stable key.
#[inline]
pub fn bucket_of(salt: u64, key: &[u8]) -> u16 {
    (fmix64(fnv(salt, key)) % BUCKETS as u64) as u16
}

/// Which side a request is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Canary,
    Primary,
}

impl Arm {
    /// The label value (`envgate_canary_requests_total{arm}`, access log).
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Canary => "canary",
            Arm::Primary => "primary",
        }
    }
}

/// Where the decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The override header said `always` (canary) or `never` (primary).
    Override,
    /// The bucket, compared with the weight.
    Bucket { bucket: u16, source: BucketSource },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketSource {
    Cookie,
    Hash,
    Random,
}

impl BucketSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BucketSource::Cookie => "cookie",
            BucketSource::Hash => "hash",
            BucketSource::Random => "random",
        }
    }
}

/// The split's verdict before the canary environment is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub arm: Arm,
    pub basis: Basis,
    /// The bucket to store in the canary cookie (one not read from it).
    pub set_cookie: Option<u16>,
}

/// Assigns a request to a side of `canary`.
#[inline]
pub fn assign(canary: &Canary, req: &RequestView<'_>) -> Assignment {
    if let Some(h) = &canary.header {
        if let Some(v) = req.headers.get(h) {
            let arm = if v.eq_ignore_ascii_case(b"always") {
                Some(Arm::Canary)
            } else if v.eq_ignore_ascii_case(b"never") {
                Some(Arm::Primary)
            } else {
                None
            };
            if let Some(arm) = arm {
                return Assignment {
                    arm,
                    basis: Basis::Override,
                    set_cookie: None,
                };
            }
        }
    }
    let from_cookie = canary
        .cookie
        .as_deref()
        .and_then(|name| cookie(req.headers, name))
        .and_then(parse_bucket);
    let (bucket, source) = match from_cookie {
        Some(b) => (b, BucketSource::Cookie),
        None => match canary.hash.as_ref().and_then(|k| hash_key(canary, k, req)) {
            Some(b) => (b, BucketSource::Hash),
            None => ((req.random % BUCKETS as u64) as u16, BucketSource::Random),
        },
    };
    Assignment {
        arm: if bucket < canary.threshold {
            Arm::Canary
        } else {
            Arm::Primary
        },
        basis: Basis::Bucket { bucket, source },
        set_cookie: (source != BucketSource::Cookie && canary.cookie.is_some()).then_some(bucket),
    }
}

/// The bucket of the request's stable key, if it carries one.
#[inline]
fn hash_key(canary: &Canary, key: &CanaryHash, req: &RequestView<'_>) -> Option<u16> {
    match key {
        CanaryHash::Header(h) => {
            let v = req.headers.get(h)?;
            (!v.is_empty()).then(|| bucket_of(canary.salt, v))
        }
        CanaryHash::Cookie(name) => {
            let v = cookie(req.headers, name)?;
            (!v.is_empty()).then(|| bucket_of(canary.salt, v))
        }
        CanaryHash::ClientAddress => {
            let ip = client_address(req);
            Some(match ip {
                IpAddr::V4(v4) => bucket_of(canary.salt, &v4.octets()),
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => bucket_of(canary.salt, &v4.octets()),
                    None => bucket_of(canary.salt, &v6.octets()),
                },
            })
        }
    }
}

/// The client's address: the peer's, or behind a trusted proxy the address that proxy
/// saw (the last `X-Forwarded-For` entry, which it appended).
fn client_address(req: &RequestView<'_>) -> IpAddr {
    if req.trusted {
        let last = req
            .headers
            .last(&super::X_FORWARDED_FOR_NAME)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok());
        if let Some(ip) = last {
            return ip;
        }
    }
    req.client
}

/// A bucket as the cookie holds it: 1 to 4 digits.
#[inline]
fn parse_bucket(v: &[u8]) -> Option<u16> {
    if v.is_empty() || v.len() > 4 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u16, |n, d| n * 10 + (d - b'0') as u16))
}

/// The value of cookie `name` in the request's `Cookie` fields (the first if repeated),
/// without surrounding quotes.
#[inline]
pub fn cookie<'h>(headers: Fields<'h>, name: &str) -> Option<&'h [u8]> {
    let name = name.as_bytes();
    for field in headers.get_all(&header::COOKIE) {
        for pair in field.split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() == name {
                let v = pair[eq + 1..].trim_ascii();
                let v = v
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v);
                return Some(v);
            }
        }
    }
    None
}

/// Longest `Set-Cookie` value `set_cookie` writes: a 64-byte name, then
/// `=9999; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax; Secure`.
pub const SET_COOKIE_MAX: usize = 64 + 64;

/// Writes the `Set-Cookie` value storing `bucket` into `buf`; returns its length.
#[inline]
pub fn set_cookie(buf: &mut [u8; SET_COOKIE_MAX], name: &str, bucket: u16, secure: bool) -> usize {
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        buf[n..n + bytes.len()].copy_from_slice(bytes);
        n += bytes.len();
    };
    put(name.as_bytes());
    put(b"=");
    let mut digits = [0u8; 4];
    let mut len = 0;
    let mut b = bucket.min(BUCKETS - 1);
    loop {
        digits[3 - len] = b'0' + (b % 10) as u8;
        len += 1;
        b /= 10;
        if b == 0 {
            break;
        }
    }
    put(&digits[4 - len..]);
    put(b"; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax");
    if secure {
        put(b"; Secure");
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hash_is_fixed_and_spread() {
        // Fixed values: the hash is part of the contract (every instance, every version).
        let s = salt("production");
        assert_eq!(
            bucket_of(s, b"user-1"),
            bucket_of(salt("production"), b"user-1")
        );
        assert_ne!(
            bucket_of(s, b"user-1"),
            bucket_of(salt("staging"), b"user-1")
        );
        let mut counts = [0u32; 10];
        for i in 0..100_000u32 {
            counts[(bucket_of(s, format!("user-{i}").as_bytes()) / 1000) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn hash_values_do_not_change() {
        assert_eq!(COOKIE_MAX_AGE, 2_592_000);
        // Pinned: a change here moves users between canary and primary.
        let s = salt("production");
        let got: Vec<u16> = ["", "a", "user-42", "10.0.0.1"]
            .iter()
            .map(|k| bucket_of(s, k.as_bytes()))
            .collect();
        assert_eq!(got, PINNED.to_vec());
    }
    // Computed independently from the definition in the module documentation.
    const PINNED: [u16; 4] = [2821, 4579, 1750, 2122];

    #[test]
    fn cookies_are_found_in_any_field() {
        use http::HeaderMap;
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; b=\"2\""));
        h.append(
            header::COOKIE,
            HeaderValue::from_static("envgate_canary=412;c=3"),
        );
        // The same fields as the own HTTP/1.1 codec hands them over (names in any case).
        let raw = [
            httparse::Header {
                name: "Cookie",
                value: b"a=1; b=\"2\"",
            },
            httparse::Header {
                name: "x-other",
                value: b"a=9",
            },
            httparse::Header {
                name: "COOKIE",
                value: b"envgate_canary=412;c=3",
            },
        ];
        for fields in [Fields::Map(&h), Fields::Raw(&raw)] {
            assert_eq!(cookie(fields, "a"), Some(&b"1"[..]));
            assert_eq!(cookie(fields, "b"), Some(&b"2"[..]));
            assert_eq!(cookie(fields, "envgate_canary"), Some(&b"412"[..]));
            assert_eq!(cookie(fields, "c"), Some(&b"3"[..]));
            assert_eq!(cookie(fields, "envgate"), None);
        }
    }

    #[test]
    fn buckets_parse_and_print() {
        assert_eq!(parse_bucket(b"0"), Some(0));
        assert_eq!(parse_bucket(b"9999"), Some(9999));
        assert_eq!(parse_bucket(b"0412"), Some(412));
        for bad in [&b""[..], b"10000", b"-1", b"12a", b"1 2"] {
            assert_eq!(parse_bucket(bad), None, "{bad:?}");
        }
        let mut buf = [0u8; SET_COOKIE_MAX];
        let n = set_cookie(&mut buf, "envgate_canary", 412, false);
        assert_eq!(
            &buf[..n],
            b"envgate_canary=412; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"
        );
        let name = "n".repeat(64);
        let n = set_cookie(&mut buf, &name, 0, true);
        assert!(buf[..n].ends_with(b"=0; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax; Secure"));
    }
}
