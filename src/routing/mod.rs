//! Request routing decisions that read only the topology snapshot.
//!
//! `host` resolves the entry address (Host/authority and local port) to an environment.
//! Tenant ranges and canary splits are parsed and validated in `config/`; their routing
//! is not wired into the request path yet.

pub mod host;
