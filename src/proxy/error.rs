//! Why an exchange failed, who caused it, and envgate's own answer for it.
//!
//! One rule drives everything here: only a node's own fault counts against the node
//! (passive ejection) and may be retried on another node. A client's fault (bad framing,
//! a body that stalls or exceeds its limit, a client that goes away) is answered, or just
//! dropped, and touches neither the node's record nor the retry budget. envgate's own
//! resource errors (out of file descriptors, ephemeral ports or buffers) are local: logged,
//! never blamed on a node.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use crate::routing::path::PathError;

/// How a client failed its own request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// Broken framing (a bad chunk, a body shorter or longer than announced): 400.
    Framing,
    /// No body byte within `body_idle` while envgate waited for one: 408.
    Stalled,
    /// More than `max_request_body` bytes: 413.
    TooLarge,
    /// The client went away (closed or reset): nobody to answer.
    Gone,
}

impl ClientFault {
    /// Whether the client may still be sending the body envgate gave up on (its answer
    /// is then followed by a lingering close): broken framing or a body over the limit.
    /// A stalled or gone client sends nothing more.
    pub fn unread(self) -> bool {
        matches!(self, ClientFault::Framing | ClientFault::TooLarge)
    }

    /// Classifies an error of a client's body as hyper reports it: broken framing when the
    /// decoder refused the bytes, else the client is gone.
    pub fn of(e: &hyper::Error) -> ClientFault {
        match io_kind(e) {
            Some(std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput) => {
                ClientFault::Framing
            }
            Some(_) => ClientFault::Gone,
            None if e.is_parse() || e.is_parse_too_large() => ClientFault::Framing,
            None => ClientFault::Gone,
        }
    }

    pub fn refusal(self) -> Refusal {
        match self {
            ClientFault::Framing | ClientFault::Gone => Refusal::BadBody,
            ClientFault::Stalled => Refusal::BodyTimeout,
            ClientFault::TooLarge => Refusal::BodyTooLarge,
        }
    }
}

/// The kind of the I/O error behind a hyper error, if one is behind it.
pub fn io_kind(e: &hyper::Error) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = s.source();
    }
    None
}

/// Whether an HTTP/2 node refused the stream unprocessed (REFUSED_STREAM, or beyond the
/// last stream of its GOAWAY): the request did nothing there and may go elsewhere.
pub fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            // A stream past the last one a node's GOAWAY covers fails with the GOAWAY's own
            // reason (usually NO_ERROR): the node never processed it.
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = s.source();
    }
    false
}

/// A request envgate answers itself because of what the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// HTTP/1.1 without Host, or HTTP/2 with neither `:authority` nor `host`.
    MissingHost,
    /// More than one Host field.
    DuplicateHost,
    /// A Host or authority that is not a host name or IP literal with an optional port.
    BadHost,
    /// HTTP/2 `host` that disagrees with `:authority`.
    HostMismatch,
    /// An authority-form or `*` target where the method does not allow it.
    BadTarget,
    BadPath(PathError),
    /// A Transfer-Encoding other than `chunked`.
    BadTransferEncoding,
    /// The body's framing broke.
    BadBody,
    /// More header fields than allowed (HTTP/2; hyper enforces it for HTTP/1).
    TooManyFields,
    /// `CONNECT` where the environment does not allow it.
    ConnectNotAllowed,
    /// The body passed `max_request_body`.
    BodyTooLarge,
    /// The client stalled its body.
    BodyTimeout,
    /// The environment's tenant rule is `required` and the request carries no tenant id.
    TenantRequired,
    /// The environment's tenant rule is `required` and the tenant id is not a number.
    BadTenant,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::TooManyFields => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::ConnectNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The JSON body: a stable `error` and, for 400, the `reason`.
    pub fn body(self) -> &'static [u8] {
        match self {
            Refusal::MissingHost => br#"{"error":"bad_request","reason":"missing_host"}"#,
            Refusal::DuplicateHost => br#"{"error":"bad_request","reason":"duplicate_host"}"#,
            Refusal::BadHost => br#"{"error":"bad_request","reason":"bad_host"}"#,
            Refusal::HostMismatch => br#"{"error":"bad_request","reason":"host_mismatch"}"#,
            Refusal::BadTarget => br#"{"error":"bad_request","reason":"bad_target"}"#,
            Refusal::BadPath(_) => br#"{"error":"bad_request","reason":"bad_path"}"#,
            Refusal::BadTransferEncoding => {
                br#"{"error":"bad_request","reason":"bad_transfer_encoding"}"#
            }
            Refusal::BadBody => br#"{"error":"bad_request","reason":"bad_body"}"#,
            Refusal::TooManyFields => br#"{"error":"too_many_header_fields"}"#,
            Refusal::ConnectNotAllowed => br#"{"error":"method_not_allowed"}"#,
            Refusal::BodyTooLarge => br#"{"error":"body_too_large"}"#,
            Refusal::BodyTimeout => br#"{"error":"request_timeout"}"#,
            Refusal::TenantRequired => br#"{"error":"tenant_required"}"#,
            Refusal::BadTenant => br#"{"error":"bad_tenant"}"#,
        }
    }

    /// Whether the request itself was well framed, so that the connection may carry on.
    fn keeps_connection(self) -> bool {
        matches!(self, Refusal::TenantRequired | Refusal::BadTenant)
    }

    /// The answer. HTTP/1 connections are closed after it (except for a refusal of what a
    /// well-framed request asked for): what follows a refused request on the same
    /// connection cannot be trusted to be framed as the client meant.
    #[cold]
    pub fn response(self, h1: bool) -> Response<ProxyBody> {
        let mut resp = own(self.status(), Bytes::from_static(self.body()));
        if h1 && !self.keeps_connection() {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self == Refusal::ConnectNotAllowed {
            resp.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"),
            );
        }
        resp
    }
}

/// envgate's own JSON answer.
#[inline]
pub fn own(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Whether a connect error is envgate's own lack of resources rather than the node's
/// fault: out of file descriptors (EMFILE, ENFILE), of local addresses or ports
/// (EADDRNOTAVAIL), of buffers or memory (ENOBUFS, ENOMEM).
pub fn is_local_resource_error(e: &std::io::Error) -> bool {
    if e.kind() == std::io::ErrorKind::AddrNotAvailable
        || e.kind() == std::io::ErrorKind::OutOfMemory
    {
        return true;
    }
    // Linux numbers; other systems fall back on the kinds above.
    #[cfg(target_os = "linux")]
    const LOCAL: [i32; 5] = [
        23,  /* ENFILE */
        24,  /* EMFILE */
        99,  /* EADDRNOTAVAIL */
        105, /* ENOBUFS */
        12,  /* ENOMEM */
    ];
    #[cfg(not(target_os = "linux"))]
    const LOCAL: [i32; 0] = [];
    e.raw_os_error().is_some_and(|n| LOCAL.contains(&n))
}

/// The error a body envgate relays ends with; hyper closes the connection on it, so a cut
/// body is never passed off as complete.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the client's body failed: {0:?}")]
    Client(ClientFault),
    #[error("the node's body failed: {0}")]
    Node(hyper::Error),
    #[error("the node sent no body byte within the body idle timeout")]
    NodeStalled,
    /// A body read by the own codec (`h1::fast::send_bodiless`) broke.
    #[error("the node's body failed: {0}")]
    NodeBroken(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_resource_errors_are_told_apart() {
        for n in [23, 24, 99, 105] {
            assert!(
                is_local_resource_error(&std::io::Error::from_raw_os_error(n)),
                "{n}"
            );
        }
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::TimedOut,
        ] {
            assert!(!is_local_resource_error(&std::io::Error::from(kind)));
        }
        // ECONNREFUSED (111) is the node's.
        assert!(!is_local_resource_error(
            &std::io::Error::from_raw_os_error(111)
        ));
    }

    #[test]
    fn each_refusal_has_its_status_and_a_json_body() {
        for r in [
            Refusal::MissingHost,
            Refusal::BadPath(PathError::AboveRoot),
            Refusal::TooManyFields,
            Refusal::ConnectNotAllowed,
            Refusal::BodyTooLarge,
            Refusal::BodyTimeout,
        ] {
            let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
            assert!(body["error"].is_string(), "{r:?}");
            let resp = r.response(true);
            assert_eq!(resp.status(), r.status());
            assert_eq!(resp.headers()[header::CONNECTION], "close");
            assert!(r
                .response(false)
                .headers()
                .get(header::CONNECTION)
                .is_none());
        }
    }
}
