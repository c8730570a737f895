//! Topology documents: reading, parsing and validating them.
//!
//! `raw` mirrors the YAML, `validate` turns it into a checked [`Topology`] or the full list
//! of problems. The YAML crate is used only here, so it can change in one place.

pub mod raw;
pub mod validate;

use std::fmt;
use std::path::Path;

use crate::health::NodeRegistry;
use crate::topology::Topology;

/// What sort of problem a validation error is (the control API's `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Two parts of the document claim the same thing.
    Conflict,
    /// A name that does not resolve.
    Reference,
    /// A value out of range or malformed.
    Value,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Conflict => "conflict",
            ErrorKind::Reference => "reference",
            ErrorKind::Value => "value",
        }
    }
}

/// One problem in a topology, with the YAML path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            self.path,
            self.message,
            self.kind.as_str()
        )
    }
}

/// Why a document could not become a topology.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Not YAML, or not the shape of a topology (unknown key, wrong type).
    #[error("{0}")]
    Parse(String),
    /// Well formed, but breaks the rules; every problem is listed.
    #[error("{} problem(s):\n{}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

/// Parses and validates a document. `base_dir` is where relative paths in it point.
pub fn parse(text: &str, base_dir: &Path, registry: &NodeRegistry) -> Result<Topology, LoadError> {
    let raw: raw::RawTopology =
        serde_norway::from_str(text).map_err(|e| LoadError::Parse(e.to_string()))?;
    validate::validate(raw, base_dir, registry).map_err(LoadError::Invalid)
}

/// Reads, parses and validates the topology file at `path`.
pub fn load_file(path: &Path, registry: &NodeRegistry) -> Result<Topology, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base, registry)
}

/// Parses `500ms`, `2s`, `1m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); write 500ms, 2s, 1m"))
}
