//! Topology documents: reading, parsing and validating them.
//!
//! `raw` mirrors the YAML, `validate` turns it into a checked [`Topology`] or the full list
//! of problems. The YAML crate is used only here, so it can change in one place.

pub mod raw;
pub mod validate;

use std::fmt;
use std::path::Path;

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
    /// Not YAML, or not the shape of a topology (wrong type, missing required key).
    #[error("{0}")]
    Parse(String),
    /// Well formed, but breaks the rules (unknown keys included); every problem is listed.
    #[error("{} problem(s):\n{}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

/// Parses and validates a document. `base_dir` is where relative paths in it point.
///
/// Unknown keys do not stop the parse: each becomes an error of its own, listed before the
/// problems validation finds, so a typo never hides the rest of the document's problems
/// (and never passes silently either: the document is still refused).
pub fn parse(text: &str, base_dir: &Path) -> Result<Topology, LoadError> {
    parse_serving(text, base_dir, &Default::default(), &Default::default())
}

/// `parse` for a running instance that serves the certificates of fingerprints `served`:
/// one of them that expired since it was taken is a warning (it keeps serving until it is
/// renewed), so that it does not block unrelated changes. Any other expired certificate is
/// refused. Node host names are answered from `dns` (and looked up there when new).
pub fn parse_serving(
    text: &str,
    base_dir: &Path,
    served: &rustc_hash::FxHashSet<u64>,
    dns: &crate::dns::Cache,
) -> Result<Topology, LoadError> {
    check_nesting(text, MAX_NESTING).map_err(LoadError::Parse)?;
    // (YAML path, key) of every key that no field took.
    let mut unknown: Vec<(String, String)> = Vec::new();
    // JSON is YAML, but a JSON parser reads it many times faster: a document that is a
    // JSON object (as the control API and fleet mode send) takes that path. One that only
    // looks like one (a YAML flow mapping, `{ version: 1 }`) goes on to the YAML parser.
    let mut raw: Option<Result<raw::RawTopology, String>> = None;
    if text.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        let r = serde_ignored::deserialize(&mut de, |path| {
            unknown.push((yaml_path(&path), last_key(&path)));
        })
        .and_then(|raw| de.end().map(|()| raw));
        match r {
            Ok(t) => raw = Some(Ok(t)),
            Err(e) if e.is_data() => raw = Some(Err(e.to_string())),
            Err(_) => unknown.clear(),
        }
    }
    let raw = match raw {
        Some(r) => r,
        None => {
            let de = serde_norway::Deserializer::from_str(text);
            serde_ignored::deserialize(de, |path| {
                unknown.push((yaml_path(&path), last_key(&path)));
            })
            .map_err(|e| e.to_string())
        }
    };
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) if unknown.is_empty() => return Err(LoadError::Parse(e)),
        // A misspelt required key shows up as missing: name the unknown keys seen so far.
        Err(e) => {
            let paths: Vec<&str> = unknown.iter().map(|(p, _)| p.as_str()).collect();
            return Err(LoadError::Parse(format!(
                "{e} (unknown keys: {})",
                paths.join(", ")
            )));
        }
    };
    let mut errors: Vec<ConfigError> = unknown
        .into_iter()
        .map(|(path, key)| ConfigError {
            path,
            kind: ErrorKind::Value,
            message: format!("unknown key {key:?}"),
        })
        .collect();
    match validate::validate(raw, base_dir, served, dns) {
        Ok(topology) if errors.is_empty() => Ok(topology),
        Ok(_) => Err(LoadError::Invalid(errors)),
        Err(more) => {
            errors.extend(more);
            Err(LoadError::Invalid(errors))
        }
    }
}

/// Deepest nesting of flow collections (`[`, `{`) a document may have. A topology needs a
/// handful of levels; the YAML scanner's cost grows with the square of this depth, so a
/// small document of nested brackets could otherwise take minutes to refuse.
pub const MAX_NESTING: usize = 64;

/// Refuses a document whose flow collections nest deeper than `max` (outside quoted
/// scalars and comments), before the YAML parser sees it. One pass, no allocation.
pub fn check_nesting(text: &str, max: usize) -> Result<(), String> {
    let b = text.as_bytes();
    let (mut depth, mut i) = (0usize, 0usize);
    let mut line_start = true;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'\'' => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'#' if line_start || matches!(b[i - 1], b' ' | b'\t') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(format!(
                        "the document nests collections more than {max} deep (line {})",
                        b[..i].iter().filter(|c| **c == b'\n').count() + 1
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        line_start = i < b.len() && b[i] == b'\n';
        i += 1;
    }
    Ok(())
}

/// `serde_ignored`'s path in the notation of validation errors: `environments.a.entires`,
/// `listeners[0].tsl`.
fn yaml_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", yaml_path(parent)),
        Path::Map { parent, key } => match yaml_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => yaml_path(parent),
    }
}

/// The last key of a `serde_ignored` path (`entires` in `environments.a.entires`).
fn last_key(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { index, .. } => format!("[{index}]"),
        Path::Map { key, .. } => key.clone(),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => last_key(parent),
    }
}

/// Reads, parses and validates the topology file at `path`.
pub fn load_file(path: &Path) -> Result<Topology, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base)
}

#[cfg(test)]
mod nesting_tests {
    use super::*;

    #[test]
    fn nesting_is_bounded_outside_quotes_and_comments() {
        let deep = format!("a: {}1{}", "[".repeat(65), "]".repeat(65));
        assert!(check_nesting(&deep, 64)
            .unwrap_err()
            .contains("more than 64"));
        let ok = format!("a: {}1{}", "[".repeat(64), "]".repeat(64));
        assert!(check_nesting(&ok, 64).is_ok());
        let quoted = format!(
            "a: \"{}\"\nb: '{}'\n# {}\nc: 1 # {}\n",
            "[".repeat(100),
            "{{".repeat(100),
            "[".repeat(100),
            "[".repeat(100)
        );
        assert!(check_nesting(&quoted, 64).is_ok(), "{quoted}");
        // Refused by the scan (its message), before the YAML scanner would take minutes.
        let huge = "[".repeat(200_000);
        match parse(&huge, Path::new(".")) {
            Err(LoadError::Parse(m)) => assert!(m.contains("more than 64 deep"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}

/// Parses `500ms`, `2s`, `1m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); write 500ms, 2s, 1m"))
}

/// Parses a size in bytes: `10MiB`, `64KiB`, `1GB`, `512B` or a plain `1048576`. Units
/// (case ignored): B, KB = 1000, KiB = 1024, MB, MiB, GB, GiB; a space may stand between
/// the number and the unit. Whole numbers only.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size; write 64KiB, 10MiB, 1GB or a number of bytes");
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" => 1 << 10,
        "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large a size"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_in_bytes_and_units() {
        for (text, bytes) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("512B", 512),
            ("64KiB", 64 * 1024),
            ("64KB", 64_000),
            ("10MiB", 10 << 20),
            ("10MB", 10_000_000),
            ("1GiB", 1 << 30),
            ("1GB", 1_000_000_000),
            (" 2 kib ", 2048),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn malformed_sizes_are_refused() {
        for text in [
            "", "MiB", "1.5MiB", "-1", "10 MiBs", "10TB", "ten", "1e6", "0x10",
        ] {
            let e = parse_size(text).unwrap_err();
            assert!(e.contains("is not a size"), "{text}: {e}");
        }
        let e = parse_size("99999999999GiB").unwrap_err();
        assert!(e.contains("too large"), "{e}");
        assert!(parse_size("99999999999999999999").is_err());
    }
}
