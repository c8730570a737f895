//! TLS: the server side of TLS listeners (a certificate chosen by SNI, ALPN) and the client
//! side of nodes spoken to over TLS.
//!
//! Everything here is built while a topology is validated: a certificate that is missing,
//! unparsable, expired or whose key does not match refuses the topology with its path, and
//! a topology that validates serves with exactly the certificates it read. Reloading a
//! certificate is applying the topology again (`control`), so a listener switches to new
//! certificates with one pointer swap and keeps its socket; connections already open keep
//! the session they negotiated.
//!
//! The crypto provider is rustls' default, aws-lc-rs: it builds with only a C compiler on
//! x86-64 Linux, and its P-256 and RSA signatures make a full handshake cheaper than ring's.
//! One session-ticket key set (rotated by rustls every six hours) serves every listener and
//! survives reloads, so a client resumes across workers and across certificate renewals.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustc_hash::FxHashMap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// TLS 1.2 and 1.3 only.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Sessions a listener remembers for TLS 1.2 resumption by session id.
const SESSION_CACHE: usize = 4096;

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The process's session-ticket keys (`None` if they could not be made: no resumption by
/// ticket then, full handshakes still work).
fn ticketer() -> Option<Arc<dyn rustls::server::ProducesTickets>> {
    static T: OnceLock<Option<Arc<dyn rustls::server::ProducesTickets>>> = OnceLock::new();
    T.get_or_init(|| match rustls::crypto::aws_lc_rs::Ticketer::new() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "no TLS session tickets: resumption by ticket is off");
            None
        }
    })
    .clone()
}

/// The names a certificate covers: DNS names of its subjectAltName (or its subject's
/// common name when it has none), and IP addresses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names {
    /// Lowercase, without a trailing dot.
    exact: Vec<Box<str>>,
    /// `*.example.com` as `.example.com`.
    wildcard: Vec<Box<str>>,
}

impl Names {
    /// Whether `host` (a Host value: a name or an IP address, with or without a port) is
    /// one of the names, or matches a wildcard by its first label.
    pub fn covers(&self, host: &[u8]) -> bool {
        let host = strip_port(host);
        let host = host.strip_suffix(b".").unwrap_or(host);
        if self
            .exact
            .iter()
            .any(|n| n.as_bytes().eq_ignore_ascii_case(host))
        {
            return true;
        }
        match host.iter().position(|&b| b == b'.') {
            Some(dot) if dot > 0 => {
                let rest = &host[dot..];
                self.wildcard
                    .iter()
                    .any(|w| w.as_bytes().eq_ignore_ascii_case(rest))
            }
            _ => false,
        }
    }

    /// Every name, wildcards as written (`*.example.com`).
    pub fn all(&self) -> impl Iterator<Item = String> + '_ {
        self.exact
            .iter()
            .map(|n| n.to_string())
            .chain(self.wildcard.iter().map(|w| format!("*{w}")))
    }
}

/// `host:port` or `[v6]:port` -> the host part (brackets kept off).
fn strip_port(h: &[u8]) -> &[u8] {
    if let Some(rest) = h.strip_prefix(b"[") {
        return match rest.iter().position(|&b| b == b']') {
            Some(end) => &rest[..end],
            None => h,
        };
    }
    match h.iter().rposition(|&b| b == b':') {
        // One colon: a port. More (a bare IPv6 address) are part of the host.
        Some(i) if !h[..i].contains(&b':') => &h[..i],
        _ => h,
    }
}

/// One certificate of a listener.
#[derive(Debug)]
pub struct Cert {
    pub key: Arc<CertifiedKey>,
    pub names: Names,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
    pub cert_path: PathBuf,
    /// Of the certificate file's bytes.
    pub fingerprint: u64,
    /// How long ago it expired, for one kept because the running instance serves it.
    pub expired: Option<String>,
}

/// A listener's certificates, and the choice among them by SNI.
pub struct Certs {
    pub list: Vec<Cert>,
    exact: FxHashMap<Box<str>, usize>,
    wildcard: FxHashMap<Box<str>, usize>,
    /// The certificate for a client that names no known host: `None` refuses the
    /// handshake.
    default: Option<usize>,
    /// The certificate for a client that names no host at all (SNI is not sent for an IP
    /// address): the default one, or with `refuse`, one that covers the listener's address.
    no_sni: Option<usize>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("certificates", &self.list.len())
            .field("default", &self.default)
            .finish()
    }
}

/// What the handshake of one connection chose.
#[derive(Debug, Clone, Copy)]
pub struct Chosen {
    pub index: usize,
    /// The client named a host (SNI) and the certificate was chosen for that name.
    pub by_name: bool,
}

impl Certs {
    /// The certificate for a client hello naming `sni`.
    pub fn find(&self, sni: Option<&str>) -> Option<Chosen> {
        let Some(name) = sni else {
            return self.no_sni.map(|index| Chosen {
                index,
                by_name: false,
            });
        };
        let mut buf = [0u8; 253];
        let name = name.strip_suffix('.').unwrap_or(name);
        let lower: &str = if name.bytes().any(|b| b.is_ascii_uppercase()) && name.len() <= 253 {
            let b = &mut buf[..name.len()];
            b.copy_from_slice(name.as_bytes());
            b.make_ascii_lowercase();
            std::str::from_utf8(b).unwrap_or(name)
        } else {
            name
        };
        if let Some(&i) = self.exact.get(lower) {
            return Some(Chosen {
                index: i,
                by_name: true,
            });
        }
        if let Some(dot) = lower.find('.').filter(|&d| d > 0) {
            if let Some(&i) = self.wildcard.get(&lower[dot..]) {
                return Some(Chosen {
                    index: i,
                    by_name: true,
                });
            }
        }
        self.default.map(|index| Chosen {
            index,
            by_name: false,
        })
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = self.find(hello.server_name());
        if chosen.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "TLS handshake refused: no certificate for the name");
        }
        chosen.map(|c| self.list[c.index].key.clone())
    }
}

/// A TLS listener's server side, built at validation.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub certs: Arc<Certs>,
    /// Of every certificate and key file read: a reload with the same bytes is no change.
    pub fingerprint: u64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("certs", &self.certs)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// How a listener answers a client that names a host none of its certificates covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownName {
    /// The first certificate.
    Default,
    /// The handshake fails (an `access_denied` alert). A client that sends no SNI gets the
    /// certificate that covers the listener's address if it binds a specific one, and is
    /// refused otherwise.
    Refuse,
}

fn hash_bytes(h: &mut impl std::hash::Hasher, bytes: &[u8]) {
    h.write_usize(bytes.len());
    h.write(bytes);
}

/// Reads one certificate chain and its key; the error names the file at fault. An expired
/// certificate is refused unless its fingerprint is in `served` (the running instance serves
/// it: it expired since, and is kept with `expired` set).
pub fn load_cert(
    cert_path: &Path,
    key_path: &Path,
    fp: &mut impl std::hash::Hasher,
    served: &rustc_hash::FxHashSet<u64>,
) -> Result<Cert, String> {
    let cert_pem = std::fs::read(cert_path)
        .map_err(|e| format!("cannot read certificate {}: {e}", cert_path.display()))?;
    let key_pem = std::fs::read(key_path)
        .map_err(|e| format!("cannot read key {}: {e}", key_path.display()))?;
    hash_bytes(fp, &cert_pem);
    hash_bytes(fp, &key_pem);
    let fingerprint = {
        let mut h = rustc_hash::FxHasher::default();
        hash_bytes(&mut h, &cert_pem);
        std::hash::Hasher::finish(&h)
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate {} is not PEM: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate {} holds no CERTIFICATE block",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "key {} holds no private key in PEM: {e}",
            key_path.display()
        )
    })?;
    let (names, not_before, not_after) = read_x509(&chain[0])
        .map_err(|e| format!("certificate {} cannot be read: {e}", cert_path.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut expired = None;
    if not_after < now {
        let ago =
            humantime::format_duration(std::time::Duration::from_secs((now - not_after) as u64))
                .to_string();
        if !served.contains(&fingerprint) {
            return Err(format!(
                "certificate {} expired {ago} ago",
                cert_path.display()
            ));
        }
        expired = Some(ago);
    }
    if not_before > now {
        tracing::warn!(certificate = %cert_path.display(), "certificate not valid yet (its notBefore is in the future): clients will refuse it until then");
    }
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "key {} does not match certificate {}",
            key_path.display(),
            cert_path.display()
        ),
        e => format!(
            "key {} cannot be used with certificate {}: {e}",
            key_path.display(),
            cert_path.display()
        ),
    })?;
    Ok(Cert {
        key: Arc::new(key),
        names,
        not_after,
        cert_path: cert_path.to_path_buf(),
        fingerprint,
        expired,
    })
}

/// Names and validity of a certificate.
fn read_x509(der: &CertificateDer<'_>) -> Result<(Names, i64, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let mut names = Names::default();
    let mut add = |n: &str| {
        let n = n.trim_end_matches('.').to_ascii_lowercase();
        if let Some(rest) = n.strip_prefix('*') {
            if rest.starts_with('.') && rest.len() > 1 {
                names.wildcard.push(rest.into());
            }
        } else if !n.is_empty() {
            names.exact.push(n.into());
        }
    };
    let mut san = false;
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for g in &ext.value.general_names {
            match g {
                GeneralName::DNSName(n) => {
                    san = true;
                    add(n);
                }
                GeneralName::IPAddress(ip) => {
                    san = true;
                    let ip = match ip.len() {
                        4 => Some(std::net::IpAddr::from(
                            <[u8; 4]>::try_from(*ip).unwrap_or_default(),
                        )),
                        16 => Some(std::net::IpAddr::from(
                            <[u8; 16]>::try_from(*ip).unwrap_or_default(),
                        )),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        add(&ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if !san {
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                add(cn);
            }
        }
    }
    let v = cert.validity();
    Ok((names, v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Builds a listener's server side from certificates already read. The first certificate
/// is the default one unless `unknown` refuses; then a client that sends no SNI gets the
/// certificate that covers `bind_ip` (the listener's address, when it is not a wildcard
/// one), if any.
pub fn server(
    list: Vec<Cert>,
    unknown: UnknownName,
    bind_ip: Option<std::net::IpAddr>,
    http2: bool,
    resumption: bool,
    fingerprint: u64,
) -> Result<ServerTls, String> {
    let mut exact = FxHashMap::default();
    let mut wildcard = FxHashMap::default();
    // A name two certificates cover goes to the first.
    for (i, c) in list.iter().enumerate() {
        for n in &c.names.exact {
            exact.entry(n.clone()).or_insert(i);
        }
        for w in &c.names.wildcard {
            wildcard.entry(w.clone()).or_insert(i);
        }
    }
    let default = (unknown == UnknownName::Default && !list.is_empty()).then_some(0);
    let no_sni = default.or_else(|| {
        let ip = bind_ip?.to_string();
        list.iter().position(|c| c.names.covers(ip.as_bytes()))
    });
    let certs = Arc::new(Certs {
        default,
        no_sni,
        list,
        exact,
        wildcard,
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    if !resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        if let Some(t) = ticketer() {
            config.ticketer = t;
            // One ticket per full handshake: a client keeps one per server anyway.
            config.send_tls13_tickets = 1;
        }
    }
    Ok(ServerTls {
        config: Arc::new(config),
        certs,
        fingerprint,
    })
}

/// A node spoken to over TLS.
pub struct NodeTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
    /// The name as written, the CA file and a fingerprint of its bytes: two nodes with
    /// the same are spoken to the same way (a reload keeps their connection pools).
    ident: (String, Option<PathBuf>, u64, bool),
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("server_name", &self.ident.0)
            .field("ca", &self.ident.1)
            .finish()
    }
}

impl PartialEq for NodeTls {
    fn eq(&self, other: &Self) -> bool {
        self.ident == other.ident
    }
}

impl NodeTls {
    /// The name sent (SNI) and verified.
    pub fn name(&self) -> &str {
        &self.ident.0
    }
    /// The CA file, or `None` for the system's roots.
    pub fn ca(&self) -> Option<&Path> {
        self.ident.1.as_deref()
    }
}

/// The system's trusted roots, read once.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static R: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    R.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err("no system CA certificates found (install ca-certificates, or give the node a `ca` file)".into());
        }
        Ok(Arc::new(roots))
    })
    .clone()
}

/// The client side for a node: certificates verified against `ca` (or the system roots)
/// for `server_name`, which is also sent as SNI (unless it is an IP address); ALPN offers
/// `h2` when `h2`, else `http/1.1`.
pub fn node(server_name: &str, ca: Option<&Path>, h2: bool) -> Result<NodeTls, String> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| format!("{server_name:?} is not a DNS name or IP address"))?;
    let (roots, fp) = match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            let mut h = rustc_hash::FxHasher::default();
            hash_bytes(&mut h, &pem);
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("CA file {} is not PEM: {e}", path.display()))?;
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "CA file {} holds no usable certificate",
                    path.display()
                ));
            }
            (Arc::new(roots), std::hash::Hasher::finish(&h))
        }
        None => (system_roots()?, 0),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(NodeTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name: name,
        ident: (server_name.to_string(), ca.map(Path::to_path_buf), fp, h2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(exact: &[&str], wild: &[&str]) -> Names {
        Names {
            exact: exact.iter().map(|s| (*s).into()).collect(),
            wildcard: wild.iter().map(|s| (*s).into()).collect(),
        }
    }

    #[test]
    fn covers_exact_wildcard_and_ports() {
        let n = names(
            &["shop.example.com", "10.0.0.1", "::1"],
            &[".api.example.com"],
        );
        assert!(n.covers(b"shop.example.com"));
        assert!(n.covers(b"SHOP.example.com:8443"));
        assert!(n.covers(b"shop.example.com."));
        assert!(n.covers(b"eu.api.example.com"));
        assert!(n.covers(b"eu.api.example.com:443"));
        assert!(!n.covers(b"a.eu.api.example.com"));
        assert!(!n.covers(b"api.example.com"));
        assert!(!n.covers(b".api.example.com"));
        assert!(!n.covers(b"other.example.com"));
        assert!(n.covers(b"10.0.0.1:443"));
        assert!(n.covers(b"[::1]:443"));
        assert!(!n.covers(b"10.0.0.2"));
    }
}
