//! What the operating system offers that no safe interface does: the crate's only unsafe
//! code.

use std::io;
use std::os::fd::AsRawFd;

/// How long (seconds) the kernel holds a new connection that has sent nothing yet before
/// handing it over all the same (then the client header timeout counts, as for any
/// connection).
const DEFER_SECS: libc::c_int = 1;

/// TCP_DEFER_ACCEPT on a listening socket: a connection is handed over by `accept` once its
/// first bytes came (or after `DEFER_SECS`), so that the first read after the accept finds
/// the request and the connection needs no wake-up of its own for it. nginx's `deferred`,
/// HAProxy's `defer-accept`. Linux only; elsewhere nothing.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn defer_accept(listener: &std::net::TcpListener) -> io::Result<()> {
    let value: libc::c_int = DEFER_SECS;
    // SAFETY: the descriptor is open for the whole call (borrowed from `listener`); the
    // option value points to a c_int that outlives the call, and its size is given.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn defer_accept(_listener: &std::net::TcpListener) -> io::Result<()> {
    Ok(())
}

/// An inotify instance waited on by the current tokio reactor (for reading).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn inotify_fd(
    inotify: inotify::Inotify,
) -> io::Result<tokio::io::unix::AsyncFd<inotify::Inotify>> {
    // SAFETY: an `Inotify` owns its descriptor (shared only with its `Watches`, which close
    // it with the last of them) and always returns that one; it is moved into the AsyncFd
    // and dropped only with it, after the deregistration.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}
