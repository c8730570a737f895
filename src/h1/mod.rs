//! Parts of an HTTP/1.1 codec of envgate's own, to serve the common case without hyper's
//! per-request machinery: message framing (`framing`). The request path still runs on
//! hyper; these parts follow the rules it keeps today, so that either codec frames every
//! message alike.

pub mod framing;
