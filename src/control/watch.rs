//! The topology file watch: a change of the file is applied like any other source.
//!
//! The directory is watched, not the file: editors save by writing a new file and renaming
//! it over the old one, and Kubernetes swaps a ConfigMap by re-pointing the `..data`
//! symlink, so the file's own inode comes and goes. Only events that name the file or a
//! `..`-prefixed entry count (other files of the directory, such as an access log, are
//! ignored). On Linux the watch asks inotify for what ends a change of an entry (written
//! and closed, renamed, created, removed, attributes) and not for each write: a file
//! appended to beside the topology (a log) costs nothing, and a file is read once its
//! writer closed it. Events are debounced (quiet for
//! `DEBOUNCE`), then the file is read by its path (following symlinks). A file that is
//! briefly missing or does not parse (half-written) is read again a few times before its
//! problems are recorded as a refused document; either way the running topology stays.
//! A document equal to the running one (envgate's own write-back, or a touch) is no
//! change.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::{Control, Source};
use crate::config::LoadError;

/// Quiet time after the last event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// Reads of a file that is missing or does not parse before its problems are reported.
const ATTEMPTS: u32 = 4;

/// A running watch; dropping it stops the watch.
pub struct FileWatch {
    _watcher: Option<DirWatch>,
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
pub fn spawn(control: Arc<Control>, path: &Path) -> std::io::Result<FileWatch> {
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
    // Events that may concern the file: its name (written, or renamed onto), a Kubernetes
    // `..data` swap, or one that names no entry (the directory itself, a lost event
    // queue). Other files of the directory do not delay the debounce.
    let mut watcher = DirWatch::new(move |n: Option<&OsStr>| {
        if n.is_none_or(|n| n == name.as_os_str() || n.as_encoded_bytes().starts_with(b"..")) {
            let _ = events.send(Event::Changed);
        }
    })?;
    watcher.watch(&dir)?;
    let thread = std::thread::Builder::new()
        .name("envgate-watch".into())
        .spawn(move || run(control, path, rx))?;
    Ok(FileWatch {
        _watcher: Some(watcher),
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

/// How often the files watch looks for a new set of files to watch (after an apply), and
/// compares the files' identities (for changes no event reported).
const RESYNC: Duration = Duration::from_secs(1);

/// Watches the files the live topology reads besides its document (certificates, keys,
/// CA files: `Topology::files`), and applies the topology again when one changes, with
/// `Source::Certificates`. The directories watched follow the live topology. A file caught
/// half-written is read again a few times before the topology is refused (and then the
/// running one, with the certificates it has, stays).
pub fn spawn_files(control: Arc<Control>) -> std::io::Result<FileWatch> {
    use std::collections::HashSet;
    use std::sync::Mutex;
    let (tx, rx) = mpsc::channel();
    let events = tx.clone();
    let names: Arc<Mutex<HashSet<OsString>>> = Arc::default();
    let wanted = names.clone();
    let watcher = DirWatch::new(move |n: Option<&OsStr>| {
        let relevant = n.is_none_or(|n| {
            n.as_encoded_bytes().starts_with(b"..")
                || wanted.lock().unwrap_or_else(|p| p.into_inner()).contains(n)
        });
        if relevant {
            let _ = events.send(Event::Changed);
        }
    })?;
    let thread = std::thread::Builder::new()
        .name("envgate-files".into())
        .spawn(move || {
            let mut watcher = watcher;
            let mut dirs: HashSet<PathBuf> = HashSet::new();
            let mut stamps = Vec::new();
            let mut seen = 0;
            loop {
                let generation = control.current().generation;
                if generation != seen {
                    seen = generation;
                    let topo = control.topology();
                    let now: HashSet<PathBuf> = topo.files.iter().flat_map(|f| watched_dirs(f)).collect();
                    *names.lock().unwrap_or_else(|p| p.into_inner()) = topo
                        .files
                        .iter()
                        .flat_map(|f| watched_names(f))
                        .collect();
                    for d in dirs.difference(&now) {
                        watcher.unwatch(d);
                    }
                    let added = now.difference(&dirs).count() > 0;
                    for d in now.difference(&dirs) {
                        if let Err(e) = watcher.watch(d) {
                            tracing::warn!(directory = %d.display(), error = %e, "cannot watch the certificates' directory; they are looked at every second");
                        }
                    }
                    dirs = now;
                    stamps = topo.files.iter().map(|f| stamp(f)).collect();
                    // A file of a directory watched only now may have changed between the
                    // apply that read it and this watch: read it again (no change, no apply).
                    if added && !topo.files.is_empty() && !reload_files(&control, &rx) {
                        return;
                    }
                    continue;
                }
                match rx.recv_timeout(RESYNC) {
                    Ok(Event::Changed) => {}
                    Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Events can be missed (a symlink swapped higher up the path, a
                        // network file system): the files' identities are compared too.
                        let topo = control.topology();
                        let now: Vec<_> = topo.files.iter().map(|f| stamp(f)).collect();
                        if now == stamps || control.current().generation != seen {
                            continue;
                        }
                        stamps = now;
                    }
                }
                loop {
                    match rx.recv_timeout(DEBOUNCE) {
                        Ok(Event::Changed) => continue,
                        Ok(Event::Stop) => return,
                        Err(mpsc::RecvTimeoutError::Timeout) => break,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                if !reload_files(&control, &rx) {
                    return;
                }
            }
        })?;
    Ok(FileWatch {
        _watcher: None,
        stop: tx,
        thread: Some(thread),
    })
}

/// The directories whose events concern `file`: its own, and the parent of every symbolic
/// link on its path (a directory link swapped, as `current -> v2`, is an event there).
fn watched_dirs(file: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut out = vec![parent(file)];
    for a in file.ancestors().skip(1) {
        if a.as_os_str().is_empty() {
            break;
        }
        if std::fs::symlink_metadata(a).is_ok_and(|m| m.file_type().is_symlink()) {
            out.push(parent(a));
        }
    }
    out
}

/// The names in those directories whose events count: the file's, and each link's.
fn watched_names(file: &Path) -> Vec<std::ffi::OsString> {
    let mut out: Vec<_> = file
        .file_name()
        .map(|n| n.to_os_string())
        .into_iter()
        .collect();
    for a in file.ancestors().skip(1) {
        if std::fs::symlink_metadata(a).is_ok_and(|m| m.file_type().is_symlink()) {
            out.extend(a.file_name().map(|n| n.to_os_string()));
        }
    }
    out
}

/// What identifies a file's content cheaply: where its path leads, and that file's inode,
/// size and modification time (`None` while it cannot be read).
fn stamp(file: &Path) -> Option<(PathBuf, u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(file).ok()?;
    let m = std::fs::metadata(&real).ok()?;
    Some((real, m.ino(), m.len(), m.modified().ok()?))
}

/// Reads the live document's files again and applies it if they changed. `false` when
/// asked to stop meanwhile.
fn reload_files(control: &Control, rx: &mpsc::Receiver<Event>) -> bool {
    for attempt in 1..=ATTEMPTS {
        let current = control.current();
        let parsed = control.parse(&current.document);
        match &parsed {
            Ok(t) if super::diff::diff(&control.topology(), t).is_empty() => return true,
            Err(e) if attempt < ATTEMPTS => {
                tracing::debug!(error = %e, "a file of the topology does not load; reading it again");
                if !pause(rx) {
                    return false;
                }
                continue;
            }
            _ => {}
        }
        // Only onto the generation it was read from: a document applied meanwhile wins.
        let _ = control.apply_files(&current, parsed);
        return true;
    }
    true
}

/// A watch of directories that reports the names of the entries that may have changed
/// (`None`: any may have, as when a watched directory itself went or events were lost).
#[cfg(target_os = "linux")]
struct DirWatch {
    watches: inotify::Watches,
    dirs: std::collections::HashMap<PathBuf, inotify::WatchDescriptor>,
    /// Dropped to stop the reader.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(target_os = "linux")]
impl DirWatch {
    /// What ends a change of an entry, and the directory's own end. Not `MODIFY`, `OPEN`
    /// nor `ACCESS`: a file written to all the time beside the watched ones (a log) would
    /// cost an event per write.
    const MASK: inotify::WatchMask = inotify::WatchMask::CLOSE_WRITE
        .union(inotify::WatchMask::MOVED_TO)
        .union(inotify::WatchMask::MOVED_FROM)
        .union(inotify::WatchMask::CREATE)
        .union(inotify::WatchMask::DELETE)
        .union(inotify::WatchMask::ATTRIB)
        .union(inotify::WatchMask::DELETE_SELF)
        .union(inotify::WatchMask::MOVE_SELF);

    fn new(on_event: impl Fn(Option<&OsStr>) + Send + 'static) -> std::io::Result<DirWatch> {
        use inotify::EventMask;
        let inotify = inotify::Inotify::init()?;
        let watches = inotify.watches();
        // The reader waits for the descriptor or for its stop, on a reactor of its own.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("envgate-inotify".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut fd = match crate::sys::inotify_fd(inotify) {
                        Ok(fd) => fd,
                        Err(e) => {
                            tracing::warn!(error = %e, "the file watch cannot wait for events; reload with SIGHUP");
                            return;
                        }
                    };
                    let mut buf = [0u8; 4096];
                    loop {
                        let mut ready = tokio::select! {
                            _ = &mut stopped => return,
                            r = fd.readable_mut() => match r {
                                Ok(r) => r,
                                Err(e) => {
                                    tracing::warn!(error = %e, "the file watch stopped; reload with SIGHUP");
                                    return;
                                }
                            },
                        };
                        let events = match ready.get_inner_mut().read_events(&mut buf) {
                            Ok(e) => e,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                ready.clear_ready();
                                continue;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                tracing::warn!(error = %e, "the file watch stopped; reload with SIGHUP");
                                return;
                            }
                        };
                        for e in events {
                            // A watch removed (by `unwatch`, or with its directory): the
                            // directory's own events said what happened.
                            if e.mask.contains(EventMask::IGNORED) {
                                continue;
                            }
                            on_event(if e.mask.contains(EventMask::Q_OVERFLOW) {
                                None
                            } else {
                                e.name
                            });
                        }
                    }
                })
            })?;
        Ok(DirWatch {
            watches,
            dirs: Default::default(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn watch(&mut self, dir: &Path) -> std::io::Result<()> {
        let wd = self.watches.add(dir, Self::MASK)?;
        self.dirs.insert(dir.to_path_buf(), wd);
        Ok(())
    }

    fn unwatch(&mut self, dir: &Path) {
        if let Some(wd) = self.dirs.remove(dir) {
            let _ = self.watches.remove(wd);
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for DirWatch {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Elsewhere, notify's watcher for the platform, filtered the same way.
#[cfg(not(target_os = "linux"))]
struct DirWatch {
    watcher: notify::RecommendedWatcher,
}

#[cfg(not(target_os = "linux"))]
impl DirWatch {
    fn new(on_event: impl Fn(Option<&OsStr>) + Send + 'static) -> std::io::Result<DirWatch> {
        let watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            let Ok(e) = e else { return };
            if matches!(
                e.kind,
                notify::EventKind::Access(
                    notify::event::AccessKind::Open(_)
                        | notify::event::AccessKind::Read
                        | notify::event::AccessKind::Close(notify::event::AccessMode::Read)
                )
            ) {
                return;
            }
            if e.paths.is_empty() || e.need_rescan() {
                on_event(None);
            }
            for p in &e.paths {
                on_event(p.file_name());
            }
        })
        .map_err(std::io::Error::other)?;
        Ok(DirWatch { watcher })
    }

    fn watch(&mut self, dir: &Path) -> std::io::Result<()> {
        use notify::Watcher;
        self.watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(std::io::Error::other)
    }

    fn unwatch(&mut self, dir: &Path) {
        use notify::Watcher;
        let _ = self.watcher.unwatch(dir);
    }
}
