//! Request routing decisions that read only the topology snapshot.
//!
//! `host` resolves the entry address (Host and port -> environment) and checks the syntax
//! of Host values; `path` normalises the path before the application match. Tenant ranges
//! and canary splits are parsed and validated in `config/`; their routing is not wired into
//! the request path yet.

pub mod host;
pub mod path;
