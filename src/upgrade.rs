//! Restart and upgrade without refusing a connection: the running instance hands its
//! listening sockets to the new one over a Unix socket (SCM_RIGHTS, as HAProxy's `-x`).
//!
//! The running instance (`--upgrade-socket PATH`) keeps a duplicate of every listening
//! socket it serves (each worker's, and the control endpoint's). A new instance started
//! with `--takeover PATH` connects, receives them all (one name and one descriptor per
//! message), serves every one of them (so nothing queued in an accept backlog is left
//! behind), and says `READY` once its workers accept. The old instance then stops
//! accepting and drains like on SIGTERM. The sockets never close in between: the kernel
//! keeps queueing connections, and one of the two processes accepts them.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::TcpListener as StdListener;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The fixed size of one message: a listener's name, padded with zeros.
const FRAME: usize = 128;
/// The name under which the control endpoint's socket travels.
pub const CONTROL: &str = "\u{0}control";
const END: &[u8] = b"\0end";
const READY: &[u8] = b"READY\n";
/// How long the running instance waits for the new one to be ready.
const READY_BOUND: Duration = Duration::from_secs(120);

/// Every listening socket an instance serves, by listener name (one per worker), for a
/// handoff.
#[derive(Default)]
pub struct Sockets(Mutex<Vec<(String, StdListener)>>);

impl Sockets {
    /// Keeps a duplicate of `sock`, which serves listener `name`.
    pub fn add(&self, name: &str, sock: &StdListener) {
        if let Ok(dup) = sock.try_clone() {
            self.lock().push((name.to_string(), dup));
        }
    }

    /// Forgets the sockets of listener `name` (it was removed).
    pub fn remove(&self, name: &str) {
        self.lock().retain(|(n, _)| n != name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, StdListener)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves handoffs on `path` (a thread): each new instance that connects gets every
/// socket; once it says it is ready, `handed_over` is called (the old instance drains).
pub fn serve(
    path: PathBuf,
    sockets: Arc<Sockets>,
    handed_over: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // Whoever connects gets every listening socket: the owner only.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let handed_over = Arc::new(handed_over);
    std::thread::Builder::new()
        .name("envgate-upgrade".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                // One thread per peer: a peer that says nothing does not hold the next.
                let (sockets, handed_over) = (sockets.clone(), handed_over.clone());
                let _ = std::thread::Builder::new()
                    .name("envgate-handoff".into())
                    .spawn(move || match hand_over(&mut conn, &sockets) {
                        Ok(()) => {
                            // The path is left alone: the new instance may serve handoffs
                            // on it already.
                            tracing::info!(
                                "upgrade: the new instance serves the listeners; draining"
                            );
                            handed_over();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upgrade: handoff failed; still serving")
                        }
                    });
            }
        })?;
    Ok(())
}

fn hand_over(conn: &mut UnixStream, sockets: &Sockets) -> std::io::Result<()> {
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let all: Vec<(String, StdListener)> = sockets
        .lock()
        .iter()
        .filter_map(|(n, s)| Some((n.clone(), s.try_clone().ok()?)))
        .collect();
    for (name, sock) in &all {
        let mut frame = [0u8; FRAME];
        let n = name.len().min(FRAME);
        frame[..n].copy_from_slice(&name.as_bytes()[..n]);
        let fds = [sock.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        let sent = rustix::net::sendmsg(
            &*conn,
            &[IoSlice::new(&frame)],
            &mut control,
            SendFlags::empty(),
        )?;
        if sent != FRAME {
            return Err(std::io::Error::other("short handoff write"));
        }
    }
    let mut end = [0u8; FRAME];
    end[..END.len()].copy_from_slice(END);
    conn.write_all(&end)?;
    conn.set_read_timeout(Some(READY_BOUND))?;
    let mut answer = [0u8; READY.len()];
    conn.read_exact(&mut answer)?;
    if answer != READY {
        return Err(std::io::Error::other("the new instance did not say READY"));
    }
    Ok(())
}

/// Sockets received from a running instance, and the connection to tell it `READY`.
pub struct Inherited {
    pub sockets: Vec<(String, StdListener)>,
    conn: UnixStream,
}

impl Inherited {
    /// Takes the sockets listener `name` was served with, if they are bound to `addr`
    /// (port 0: any port of its IP); none when the old instance had no such listener or
    /// had it elsewhere (the new instance binds it where its topology says).
    pub fn take(&mut self, name: &str, addr: std::net::SocketAddr) -> Vec<StdListener> {
        let at = |s: &StdListener| {
            s.local_addr()
                .is_ok_and(|a| a == addr || (addr.port() == 0 && a.ip() == addr.ip()))
        };
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(n, s)| n == name && at(s));
        self.sockets = rest;
        mine.into_iter().map(|(_, s)| s).collect()
    }

    /// Tells the old instance to stop accepting and drain.
    pub fn ready(mut self) -> std::io::Result<()> {
        self.conn.write_all(READY)
    }
}

/// Connects to the running instance at `path` and receives its sockets.
pub fn take_over(path: &Path) -> std::io::Result<Inherited> {
    let conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut sockets = Vec::new();
    loop {
        let mut frame = [0u8; FRAME];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &conn,
            &mut [IoSliceMut::new(&mut frame)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
                fd = fds.next();
            }
        }
        if got.bytes != FRAME {
            return Err(std::io::Error::other("short handoff message"));
        }
        if frame.starts_with(END) {
            break;
        }
        let len = frame.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        let name = String::from_utf8_lossy(&frame[..len]).into_owned();
        let Some(fd) = fd else {
            return Err(std::io::Error::other(
                "a handoff message without its socket",
            ));
        };
        let sock = StdListener::from(fd);
        sock.set_nonblocking(true)?;
        sockets.push((name, sock));
    }
    conn.set_read_timeout(None)?;
    Ok(Inherited { sockets, conn })
}
