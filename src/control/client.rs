//! The command-line faces of a running instance's control endpoint: `envgate apply`,
//! `envgate status`, `envgate explain`. They find the endpoint and its token in the
//! topology file (`control.bind`, `control.token_file`) unless given on the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Where the endpoint is and how to write to it.
pub struct Target {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

/// Why a command could not talk to the endpoint (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("control endpoint {0}: {1}")]
    Io(SocketAddr, String),
}

impl Target {
    /// From `--control` and `--token-file`, else from the topology file's `control` key.
    pub fn find(
        config: &Path,
        control: Option<SocketAddr>,
        token_file: Option<PathBuf>,
    ) -> Result<Target, ClientError> {
        let from_config = || -> Result<crate::topology::ControlSpec, ClientError> {
            let t = crate::config::load_file(config)
                .map_err(|e| ClientError::Setup(format!("{}: {e}", config.display())))?;
            t.control.ok_or_else(|| {
                ClientError::Setup(format!(
                    "{} has no control endpoint (give --control ADDR)",
                    config.display()
                ))
            })
        };
        let (addr, file) = match (control, token_file) {
            (Some(a), f) => (a, f),
            (None, f) => {
                let spec = from_config()?;
                (spec.bind, f.or(spec.token_file))
            }
        };
        let token = match file {
            Some(f) => Some(
                std::fs::read_to_string(&f)
                    .map_err(|e| ClientError::Setup(format!("{}: {e}", f.display())))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        Ok(Target { addr, token })
    }

    /// One request; the status and the body.
    pub fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let io = |e: &dyn std::fmt::Display| ClientError::Io(self.addr, e.to_string());
        rt.block_on(async {
            let stream = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                tokio::net::TcpStream::connect(self.addr),
            )
            .await
            .map_err(|e| io(&e))?
            .map_err(|e| io(&e))?;
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| io(&e))?;
            tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path_and_query)
                .header(http::header::HOST, self.addr.to_string());
            if let Some(t) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req.body(Full::new(body)).map_err(|e| io(&e))?;
            let resp =
                tokio::time::timeout(std::time::Duration::from_secs(60), tx.send_request(req))
                    .await
                    .map_err(|e| io(&e))?
                    .map_err(|e| io(&e))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| io(&e))?
                .to_bytes();
            Ok((status, body))
        })
    }
}

/// A query parameter value, percent-encoded.
pub fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The answer as an operator reads it: pretty JSON, and a validation failure one problem
/// a line (`path: message (kind)`).
pub fn render(status: StatusCode, body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::from_utf8_lossy(body).into_owned();
    };
    if let Some(errs) = v.get("errors").and_then(|e| e.as_array()) {
        let mut out = format!("{status}\n");
        for e in errs {
            out.push_str(&format!(
                "{}: {} ({})\n",
                e["path"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or(""),
                e["kind"].as_str().unwrap_or("")
            ));
        }
        return out;
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode("/a b?c=1&d"), "/a%20b%3Fc%3D1%26d");
        assert_eq!(encode("X-Tenant-Id:1001"), "X-Tenant-Id:1001");
    }
}
