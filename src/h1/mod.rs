//! envgate's own HTTP/1.1 codec, to serve the common case without hyper's per-request
//! machinery: message framing (`framing`) and the fast path that serves connections with
//! it (`fast`, chosen with `--http1 fast`). Both follow the rules the hyper path keeps, so
//! that either codec frames every message alike.

pub mod client;
pub mod fast;
pub mod framing;
