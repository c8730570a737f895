//! envgate: a layer-7 load balancer and router for applications that run in several
//! runtime environments.
//!
//! Module map:
//! - `config`    topology documents: serde mirror (`raw`), validation and compilation
//! - `topology`  the validated, immutable model and its lookup tables
//! - `routing`   the routing decision: entry, tenant ranges, canary, application, candidates
//! - `balance`   smooth weighted round-robin and the failover order of candidates
//! - `dns`       nodes addressed by host names: resolution, members, refresh
//! - `h1`        the own HTTP/1.1 codec: framing, the fast path, lazily registered sockets
//! - `health`    per-node state (health, drain) carried across reloads
//! - `proxy`     listeners, the per-request handler, upstream connection pools
//! - `control`   the apply path (every topology change), its history, the file watch
//! - `server`    `start()`: workers, graceful drain
//! - `demo`      `envgate demo`: demo nodes and topology on loopback
//! - `sys`       what has no safe interface: a socket option, a reactor registration
//!   (the only unsafe code)
// The functions of `sys` do what no safe interface offers (a socket option, the inotify
// descriptor's registration with tokio); nothing else may use unsafe code.
#![deny(unsafe_code)]

pub mod accesslog;
pub mod balance;
pub mod config;
pub mod control;
pub mod demo;
pub mod dns;
pub mod h1;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod sys;
pub mod tls;
pub mod topology;
pub mod upgrade;
