//! The data plane: accepted connections, the per-request handler and the upstream pools.
//!
//! Everything here runs on one worker thread's current-thread runtime: per-worker state
//! (`Worker`, connection pools, round-robin counters) is `Rc`/`Cell`, never locked. The
//! only cross-thread reads are the topology snapshot (one `ArcSwap` load per request) and
//! per-node health atomics.

pub mod body;
pub mod error;
pub mod handler;
pub mod headers;
pub mod io;
pub mod listener;
pub mod pool;
pub mod record;
pub mod worker;
