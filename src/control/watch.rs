//! The topology file watch: a change of the file is applied like any other source.
//!
//! The directory is watched, not the file: editors save by writing a new file and renaming
//! it over the old one, and Kubernetes swaps a ConfigMap by re-pointing the `..data`
//! symlink, so the file's own inode comes and goes. Only events that name the file or a
//! `..`-prefixed entry count (other files of the directory, such as an access log, are
//! ignored). Events are debounced (quiet for
//! `DEBOUNCE`), then the file is read by its path (following symlinks). A file that is
//! briefly missing or does not parse (half-written) is read again a few times before its
//! problems are recorded as a refused document; either way the running topology stays.
//! A document equal to the running one (envgate's own write-back, or a touch) is no
//! change.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::{Control, Source};
use crate::config::LoadError;

/// Quiet time after the last event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// Reads of a file that is missing or does not parse before its problems are reported.
const ATTEMPTS: u32 = 4;

/// A running watch; dropping it stops the watch.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    stop: mpsc::Sender<Event>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Event {
    Changed,
    Stop,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        let _ = self.stop.send(Event::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Watches `path` and applies each change through `control`.
pub fn spawn(control: Arc<Control>, path: &Path) -> notify::Result<FileWatch> {
    let path = path.to_path_buf();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, rx) = mpsc::channel();
    let events = tx.clone();
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        // Events that may concern the file: its name (written, or renamed onto), a
        // Kubernetes `..data` swap, or a lost event queue. Other files of the directory
        // (an access log written beside the topology) do not delay the debounce.
        let relevant = |e: &notify::Event| {
            !e.kind.is_access()
                && (e.paths.is_empty()
                    || e.need_rescan()
                    || e.paths.iter().any(|p| {
                        p.file_name().is_some_and(|n| {
                            n == name.as_os_str() || n.as_encoded_bytes().starts_with(b"..")
                        })
                    }))
        };
        if e.is_ok_and(|e| relevant(&e)) {
            let _ = events.send(Event::Changed);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let thread = std::thread::Builder::new()
        .name("envgate-watch".into())
        .spawn(move || run(control, path, rx))
        .map_err(notify::Error::io)?;
    Ok(FileWatch {
        _watcher: watcher,
        stop: tx,
        thread: Some(thread),
    })
}

fn run(control: Arc<Control>, path: PathBuf, rx: mpsc::Receiver<Event>) {
    loop {
        match rx.recv() {
            Ok(Event::Changed) => {}
            Ok(Event::Stop) | Err(_) => return,
        }
        // Debounce: wait until the directory is quiet.
        loop {
            match rx.recv_timeout(DEBOUNCE) {
                Ok(Event::Changed) => continue,
                Ok(Event::Stop) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        if !reload(&control, &path, &rx) {
            return;
        }
    }
}

/// Reads and applies the file, retrying a missing or unparsable one. `false` when asked
/// to stop meanwhile.
fn reload(control: &Control, path: &Path, rx: &mpsc::Receiver<Event>) -> bool {
    for attempt in 1..=ATTEMPTS {
        let last = attempt == ATTEMPTS;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !last => {
                tracing::debug!(file = %path.display(), error = %e, "topology file unreadable; reading it again");
                if !pause(rx) {
                    return false;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "topology file unreadable; the running topology stays");
                return true;
            }
        };
        if text == *control.document() {
            return true;
        }
        // A half-written file usually does not parse: give the writer time to finish.
        let parsed = control.parse(&text);
        if !last && matches!(parsed, Err(LoadError::Parse(_))) {
            if !pause(rx) {
                return false;
            }
            continue;
        }
        // Refusals are logged and recorded by `apply_parsed`.
        let _ = control.apply_parsed(Source::File, &text, parsed);
        return true;
    }
    true
}

/// Waits one debounce period; `false` when asked to stop.
fn pause(rx: &mpsc::Receiver<Event>) -> bool {
    match rx.recv_timeout(DEBOUNCE) {
        Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => false,
        Ok(Event::Changed) | Err(mpsc::RecvTimeoutError::Timeout) => true,
    }
}
