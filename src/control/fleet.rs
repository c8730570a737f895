//! Fleet mode: an instance that follows another one's topology (`envgate run
//! --topology-url URL`), so that many stateless instances behind an L4 balancer converge on
//! one document.
//!
//! A thread polls the URL every `poll` with `If-None-Match` (the source answers 304 while
//! nothing changed). A new document is applied through the same apply path as every other
//! source (`Source::Fleet`), with the instance's own `listeners` and `control` put in place
//! of the source's: they are instance-local (DESIGN.md). A source that cannot be reached
//! or serves garbage changes nothing: the last good topology keeps serving, a document
//! that does not validate is recorded as refused (once per version the source serves).
//! Local writes through the control endpoint are refused with 409 naming the source.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use super::{Control, Source};

/// Largest document accepted from a source.
const MAX_DOCUMENT: usize = 64 * 1024 * 1024;
/// Polls after which a refused document is fetched and tried again.
const RETRY_REFUSED: u32 = 20;
/// Bound on one poll (connect, request, body).
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// What to follow.
#[derive(Debug, Clone)]
pub struct Follow {
    /// `http://host:port/api/v1/topology` of the source (or any HTTP server serving a
    /// topology document).
    pub url: Uri,
    pub poll: Duration,
    /// A file holding a bearer token for the source, read at each poll.
    pub token_file: Option<PathBuf>,
    /// For an `https://` URL: the source's certificate is verified for the URL's host
    /// against a CA file or the system's roots.
    pub tls: Option<Arc<crate::tls::NodeTls>>,
}

impl Follow {
    /// Checks the URL: `http://` or `https://` (verified against the system's roots), a
    /// host, a port (80 or 443 when none).
    pub fn new(url: &str, poll: Duration, token_file: Option<PathBuf>) -> Result<Follow, String> {
        Self::with_ca(url, poll, token_file, None)
    }

    /// `new`, with the source's certificate verified against the CAs of file `ca` (for
    /// an `https://` URL).
    pub fn with_ca(
        url: &str,
        poll: Duration,
        token_file: Option<PathBuf>,
        ca: Option<&std::path::Path>,
    ) -> Result<Follow, String> {
        let url: Uri = url
            .parse()
            .map_err(|e| format!("topology URL {url:?}: {e}"))?;
        let https = match url.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "topology URL {url}: only http:// and https://host[:port]/path are supported"
                ))
            }
        };
        let Some(host) = url.host() else {
            return Err(format!("topology URL {url}: no host"));
        };
        if ca.is_some() && !https {
            return Err(format!(
                "topology URL {url}: a CA file is for an https:// URL"
            ));
        }
        let tls = if https {
            let host = host.trim_matches(['[', ']']);
            Some(Arc::new(
                crate::tls::node(host, ca, false)
                    .map_err(|e| format!("topology URL {url}: {e}"))?,
            ))
        } else {
            None
        };
        if poll < Duration::from_millis(100) {
            return Err(format!("poll interval {poll:?} is below 100ms"));
        }
        Ok(Follow {
            url,
            poll,
            token_file,
            tls,
        })
    }
}

/// A running follower; dropping it stops the polls.
pub struct Fleet {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Fleet {
    /// Stops the polls. A poll in flight (bounded by `POLL_TIMEOUT`) is not waited for:
    /// shutdown does not wait on a slow source.
    fn drop(&mut self) {
        self.stop = None;
        self.thread = None;
    }
}

/// One answer of the source.
enum Fetched {
    NotModified,
    Document { text: String, etag: Option<String> },
}

/// Fetches the source's document once (bounded by `POLL_TIMEOUT`), for the start: the
/// document with this instance's `local` keys, or why not.
pub fn fetch_once(follow: &Follow, local: &str) -> Result<(String, u64), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match rt.block_on(fetch(follow, None))? {
        Fetched::Document { text, .. } => Ok((merge(&text, local)?, hash(&text))),
        Fetched::NotModified => Err("the source answered 304 to a first request".into()),
    }
}

/// Starts following `follow` for `control`; `local` is this instance's own document, whose
/// `listeners` and `control` replace the source's. `etag` is the version already applied
/// at start, if any.
pub fn spawn(
    control: Arc<Control>,
    local: String,
    follow: Follow,
    etag: Option<String>,
) -> std::io::Result<Fleet> {
    control.follow(follow.url.to_string());
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("envgate-fleet".into())
        .spawn(move || run(control, local, follow, etag, stopped))?;
    Ok(Fleet {
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn run(
    control: Arc<Control>,
    local: String,
    follow: Follow,
    mut etag: Option<String>,
    stopped: mpsc::Receiver<()>,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tracing::error!("fleet: cannot start a runtime; not following");
        return;
    };
    let mut failing = false;
    // The last document fetched: a source without entity tags is not applied again (nor
    // a refusal recorded again) while it serves the same text.
    let mut last: Option<u64> = None;
    // Polls since the source's document was refused: it is tried again every
    // `RETRY_REFUSED` polls (what it refers to may reach this instance later).
    let mut refused: Option<u32> = None;
    loop {
        if let Some(n) = refused.as_mut() {
            *n += 1;
            if *n >= RETRY_REFUSED {
                (etag, last, refused) = (None, None, None);
            }
        }
        match rt.block_on(fetch(&follow, etag.as_deref())) {
            Ok(Fetched::NotModified) => failing = false,
            Ok(Fetched::Document { text, etag: tag }) => {
                failing = false;
                // The version is taken whether it applies or not: a refused document is
                // recorded once, not at every poll until the source changes.
                etag = tag;
                let h = hash(&text);
                if last.replace(h) != Some(h) {
                    // The source's text is never applied as it is: only with this
                    // instance's listeners and control in place of the source's.
                    let applied = match merge(&text, &local) {
                        Ok(merged) => control.apply(Source::Fleet, &merged, false),
                        Err(e) => control.apply_parsed(
                            Source::Fleet,
                            &text,
                            Err(crate::config::LoadError::Parse(format!(
                                "cannot put this instance's listeners and control in the source's document: {e}"
                            ))),
                        ),
                    };
                    match applied {
                        Ok(a) => {
                            refused = None;
                            control.set_fleet_hash(a.generation, h);
                        }
                        Err(e) => {
                            refused = Some(0);
                            tracing::warn!(source = %follow.url, error = ?e, "fleet: the source's topology was refused; the running one stays")
                        }
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(source = %follow.url, error = %e, "fleet: cannot fetch the topology; the running one stays");
                }
                failing = true;
            }
        }
        match stopped.recv_timeout(follow.poll) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// The source's document, by the hash followers and source compare (the hash of the
/// document as the source serves it).
pub fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    text.hash(&mut h);
    h.finish()
}

/// `fetched` with the `listeners` and `control` of `local` (absent there: absent here).
pub fn merge(fetched: &str, local: &str) -> Result<String, String> {
    use serde_norway::Value;
    let mut doc: Value = serde_norway::from_str(fetched).map_err(|e| e.to_string())?;
    let local: Value = serde_norway::from_str(local).map_err(|e| e.to_string())?;
    let map = doc
        .as_mapping_mut()
        .ok_or_else(|| "the source's document is not a mapping".to_string())?;
    for key in ["listeners", "control"] {
        match local.get(key) {
            Some(v) => {
                map.insert(Value::from(key), v.clone());
            }
            None => {
                map.remove(key);
            }
        }
    }
    serde_norway::to_string(&doc).map_err(|e| e.to_string())
}

async fn fetch(follow: &Follow, etag: Option<&str>) -> Result<Fetched, String> {
    tokio::time::timeout(POLL_TIMEOUT, fetch_unbounded(follow, etag))
        .await
        .map_err(|_| format!("no answer within {POLL_TIMEOUT:?}"))?
}

/// HTTP/1.1 over an open connection to the source.
async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(tx)
}

async fn fetch_unbounded(follow: &Follow, etag: Option<&str>) -> Result<Fetched, String> {
    let url = &follow.url;
    let host = url.host().unwrap_or_default();
    let port = url
        .port_u16()
        .unwrap_or(if follow.tls.is_some() { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut tx = match &follow.tls {
        None => handshake(stream).await?,
        Some(tls) => {
            let stream = tls
                .connector
                .connect(tls.server_name.clone(), stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            handshake(stream).await?
        }
    };
    let authority = match url.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let mut req = Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority);
    if let Some(tag) = etag {
        req = req.header(http::header::IF_NONE_MATCH, tag);
    }
    if let Some(f) = &follow.token_file {
        let token = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        req = req.header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        );
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    match resp.status() {
        StatusCode::NOT_MODIFIED => Ok(Fetched::NotModified),
        StatusCode::OK => {
            let etag = resp
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            let text = String::from_utf8(body.to_vec())
                .map_err(|_| "the document is not UTF-8".to_string())?;
            Ok(Fetched::Document { text, etag })
        }
        s => Err(format!("the source answered {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_the_local_keys() {
        let fetched = "version: 1\nlisteners: [ { name: a, bind: \"0.0.0.0:1\" } ]\ncontrol: { bind: \"127.0.0.1:9\" }\nnodes: { n: { address: \"127.0.0.1:5\" } }\n";
        let local = "version: 1\nlisteners: [ { name: b, bind: \"127.0.0.1:2\" } ]\n";
        let merged: serde_norway::Value =
            serde_norway::from_str(&merge(fetched, local).unwrap()).unwrap();
        assert_eq!(
            merged["listeners"][0]["name"],
            serde_norway::Value::from("b")
        );
        assert!(merged.get("control").is_none());
        assert_eq!(
            merged["nodes"]["n"]["address"],
            serde_norway::Value::from("127.0.0.1:5")
        );
        assert!(merge("- a list", local).is_err());
    }

    #[test]
    fn urls() {
        assert!(Follow::new(
            "http://10.0.0.1:9090/api/v1/topology",
            Duration::from_secs(3),
            None
        )
        .is_ok());
        assert!(Follow::new("ftp://x/api", Duration::from_secs(3), None).is_err());
        assert!(Follow::with_ca(
            "http://x/api",
            Duration::from_secs(3),
            None,
            Some(std::path::Path::new("/ca.pem"))
        )
        .is_err());
        assert!(Follow::new("http://x/api", Duration::from_millis(1), None).is_err());
    }
}
