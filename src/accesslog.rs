//! The access log: one line per exchange, written off the hot path.
//!
//! Each worker formats its lines into a buffer of its own (`LogBuf`, no lock) and hands
//! the buffer whole to a writer thread through a bounded channel when it fills, and at
//! least every 100 ms. When the writer falls behind (a slow disk, a blocked pipe) the
//! channel is full: the worker drops that buffer's lines and counts them
//! (`envgate_access_log_dropped_total`); a request never waits on the log. The writer
//! reopens its file on SIGUSR1 (after logrotate moved it).
//!
//! Formats: `text`, one line of space-separated fields (quoted where a field may hold a
//! space), and `json`, one object per line.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A worker hands its buffer on past this size (about 400 lines): each hand-over wakes the
/// writer thread, which shares the cores with the workers.
const BUF_BYTES: usize = 128 * 1024;
/// Buffers waiting for the writer, across all workers: 8 x 128 KiB (about 3,000 lines)
/// bound the memory.
const QUEUE: usize = 8;
/// The longest `close` waits for the writer.
const CLOSE_BOUND: Duration = Duration::from_secs(5);
/// The longest a line waits in a worker's buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

enum Msg {
    Lines(Vec<u8>),
    Reopen,
}

/// A worker's way to the writer (cheap to clone).
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Msg>,
    format: Format,
    /// Lines dropped because the writer fell behind.
    pub dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("format", &self.format)
            .finish()
    }
}

/// The writer thread; `close` flushes what the workers handed on and joins it.
pub struct AccessLog {
    sink: Option<Sink>,
    thread: Option<JoinHandle<()>>,
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Opens `target` (a file is created if missing and appended to) and starts the
    /// writer.
    pub fn start(target: Target, format: Format) -> std::io::Result<AccessLog> {
        let out = Output::open(&target)?;
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let dropped: Arc<AtomicU64> = Arc::default();
        let thread = std::thread::Builder::new()
            .name("envgate-access-log".into())
            .spawn({
                let (reopen, dropped) = (reopen.clone(), dropped.clone());
                move || write_loop(rx, out, target, reopen, dropped)
            })?;
        Ok(AccessLog {
            sink: Some(Sink {
                tx,
                format,
                dropped,
            }),
            thread: Some(thread),
            reopen,
        })
    }

    pub fn sink(&self) -> Sink {
        self.sink.clone().expect("open until closed")
    }

    /// Asks the writer to reopen its file (SIGUSR1). Never blocks.
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
        if let Some(s) = &self.sink {
            // A full queue is drained soon: the writer sees the flag at its next buffer.
            let _ = s.tx.try_send(Msg::Reopen);
        }
    }

    /// Writes what is queued and stops the writer (once every worker has ended). A writer
    /// stuck on its output (a full pipe nobody reads) is given `CLOSE_BOUND`, then left
    /// behind: shutdown never hangs on the log.
    pub fn close(mut self) {
        self.sink = None;
        let Some(t) = self.thread.take() else { return };
        let (done, wait) = std::sync::mpsc::channel();
        let joiner = std::thread::spawn(move || {
            let _ = t.join();
            let _ = done.send(());
        });
        match wait.recv_timeout(CLOSE_BOUND) {
            Ok(()) => {
                let _ = joiner.join();
            }
            Err(_) => tracing::warn!(
                bound = ?CLOSE_BOUND,
                "the access log writer is stuck on its output; its last lines are lost"
            ),
        }
    }
}

enum Output {
    Stdout(std::io::Stdout),
    File(std::fs::File),
}

impl Output {
    fn open(target: &Target) -> std::io::Result<Output> {
        Ok(match target {
            Target::Stdout => Output::Stdout(std::io::stdout()),
            Target::File(p) => Output::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        })
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout(s) => {
                let mut s = s.lock();
                s.write_all(buf)?;
                s.flush()
            }
            Output::File(f) => f.write_all(buf),
        }
    }
}

fn write_loop(
    rx: Receiver<Msg>,
    mut out: Output,
    target: Target,
    reopen: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
) {
    let mut failing = false;
    for msg in rx {
        if reopen.swap(false, Relaxed) {
            if let Target::File(p) = &target {
                match Output::open(&target) {
                    Ok(o) => {
                        out = o;
                        tracing::info!(file = %p.display(), "access log reopened");
                    }
                    Err(e) => {
                        tracing::error!(file = %p.display(), error = %e, "cannot reopen the access log; writing to the old file")
                    }
                }
            }
        }
        match msg {
            // Only wakes the writer for the flag above.
            Msg::Reopen => {}
            Msg::Lines(buf) => match out.write_all(&buf) {
                Ok(()) => failing = false,
                Err(e) => {
                    // Counted as dropped (a full disk), reported once per failing spell.
                    let lines = buf.iter().filter(|&&b| b == b'\n').count();
                    dropped.fetch_add(lines as u64, Relaxed);
                    if !failing {
                        failing = true;
                        tracing::error!(error = %e, "cannot write the access log");
                    }
                }
            },
        }
    }
}

/// One worker's buffer.
pub struct LogBuf {
    sink: Sink,
    buf: RefCell<Vec<u8>>,
    lines: Cell<u64>,
    /// The second `stamp` was made for, and the `YYYY-MM-DDTHH:MM:SS` of it.
    clock: Cell<(u64, [u8; 19])>,
    /// A monotonic instant and the wall clock read with it, at most a second old (`wall`).
    anchor: Cell<Option<(std::time::Instant, SystemTime)>>,
}

impl LogBuf {
    pub fn new(sink: Sink) -> Self {
        LogBuf {
            sink,
            buf: RefCell::new(Vec::with_capacity(BUF_BYTES + 1024)),
            lines: Cell::new(0),
            clock: Cell::new((u64::MAX, [0; 19])),
            anchor: Cell::new(None),
        }
    }

    /// Appends `line`, handing the buffer on once it is full.
    pub fn write(&self, line: &Line<'_>) {
        let full = {
            let mut buf = self.buf.borrow_mut();
            match self.sink.format {
                Format::Text => line.text(&mut buf, self.stamp(line.time)),
                Format::Json => line.json(&mut buf, self.stamp(line.time)),
            }
            buf.len() >= BUF_BYTES
        };
        self.lines.set(self.lines.get() + 1);
        if full {
            self.flush();
        }
    }

    /// The wall clock at `now` (a monotonic instant just read): from an anchor taken at
    /// most a second before, so a line costs no clock read of its own. A step of the
    /// system clock shows in the lines within a second.
    #[inline]
    pub fn wall(&self, now: std::time::Instant) -> SystemTime {
        if let Some(t) = self.anchor.get().and_then(|a| from_anchor(a, now)) {
            return t;
        }
        let wall = SystemTime::now();
        self.anchor.set(Some((now, wall)));
        wall
    }

    /// Hands the buffer to the writer, or drops its lines if the writer is behind.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        let lines = self.lines.replace(0);
        let full = std::mem::replace(&mut *buf, Vec::with_capacity(BUF_BYTES + 1024));
        match self.sink.tx.try_send(Msg::Lines(full)) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Lines(mut back)))
            | Err(TrySendError::Disconnected(Msg::Lines(mut back))) => {
                self.sink.dropped.fetch_add(lines, Relaxed);
                // Keep the allocation for the next lines.
                back.clear();
                *buf = back;
            }
            Err(_) => {}
        }
    }

    /// `time` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (the date part made once a second).
    fn stamp(&self, time: SystemTime) -> [u8; 24] {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (at, mut date) = self.clock.get();
        if at != secs {
            date = civil(secs);
            self.clock.set((secs, date));
        }
        let mut out = [0u8; 24];
        out[..19].copy_from_slice(&date);
        let ms = since.subsec_millis();
        out[19] = b'.';
        out[20] = b'0' + (ms / 100) as u8;
        out[21] = b'0' + (ms / 10 % 10) as u8;
        out[22] = b'0' + (ms % 10) as u8;
        out[23] = b'Z';
        out
    }
}

impl Drop for LogBuf {
    /// Lines of exchanges that ended after the worker's last flush (cut by shutdown).
    fn drop(&mut self) {
        self.flush();
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (UTC; days to civil date after H. Hinnant).
fn civil(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut out = *b"0000-00-00T00:00:00";
    let put = |out: &mut [u8; 19], at: usize, width: usize, mut v: u64| {
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(&mut out, 0, 4, y.clamp(0, 9999) as u64);
    put(&mut out, 5, 2, m as u64);
    put(&mut out, 8, 2, d as u64);
    put(&mut out, 11, 2, rem / 3600);
    put(&mut out, 14, 2, rem / 60 % 60);
    put(&mut out, 17, 2, rem % 60);
    out
}

/// The fields of one line, borrowed from the exchange's record.
pub struct Line<'a> {
    pub time: SystemTime,
    pub client: &'a [u8],
    pub client_port: u16,
    pub method: &'a str,
    pub host: &'a [u8],
    /// The path and query as the client sent them.
    pub target: &'a [u8],
    pub version: &'a str,
    pub status: u16,
    pub environment: &'a str,
    pub application: &'a str,
    pub node: &'a str,
    pub attempts: u8,
    /// `primary` or `canary` when a canary split decided, else empty.
    pub canary: &'a str,
    /// The environment a tenant range sent the request to, else empty.
    pub tenant: &'a str,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_us: u64,
    pub upstream_us: Option<u64>,
    pub request_id: &'a [u8],
    /// Whether the response went out whole (false: cut, or the client went away).
    pub complete: bool,
}

fn num(buf: &mut Vec<u8>, n: u64) {
    let mut b = itoa::Buffer::new();
    buf.extend_from_slice(b.format(n).as_bytes());
}

/// Microseconds as seconds, `0.000321`.
fn secs(buf: &mut Vec<u8>, us: u64) {
    num(buf, us / 1_000_000);
    buf.push(b'.');
    let frac = us % 1_000_000;
    let mut digits = [b'0'; 6];
    let mut f = frac;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (f % 10) as u8;
        f /= 10;
    }
    buf.extend_from_slice(&digits);
}

/// Bytes written as they are: printable ASCII but quotes and backslashes (and, in text,
/// spaces). One table lookup a byte.
const fn plain_table(space: bool) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        t[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    t[0x20] = space;
    t
}
static TEXT_PLAIN: [bool; 256] = plain_table(false);
static JSON_PLAIN: [bool; 256] = plain_table(true);

/// Whether the eight bytes of `w` are all plain in the text format (`TEXT_PLAIN`: 0x21 to
/// 0x7e but `"` and `\\`), a word at a time. Each test below is exact as a yes or no: a
/// borrow or carry between bytes only comes from a byte that already answered yes.
#[inline]
fn text_plain8(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below = w.wrapping_sub(ONES * 0x21) & !w & HIGH;
    let above = (w.wrapping_add(ONES) | w) & HIGH;
    (below
        | above
        | has_zero(w ^ (ONES * u64::from(b'"')))
        | has_zero(w ^ (ONES * u64::from(b'\\'))))
        == 0
}

/// The wall clock at `now` from `anchor` (an instant and the wall clock read with it), if
/// `now` is within a second of it either way. An instant read before the anchor (an
/// exchange that ended before another's line was written) is dated back from it.
fn from_anchor(
    anchor: (std::time::Instant, SystemTime),
    now: std::time::Instant,
) -> Option<SystemTime> {
    let (at, wall) = anchor;
    let near = Duration::from_secs(1);
    match now.checked_duration_since(at) {
        Some(d) if d < near => Some(wall + d),
        None if at - now < near => wall.checked_sub(at - now),
        _ => None,
    }
}

/// A field of the text format: `-` when empty; bytes outside printable ASCII, spaces,
/// quotes and backslashes as `\xHH`, so a line is always one line of fields.
fn text_field(buf: &mut Vec<u8>, v: &[u8]) {
    if v.is_empty() {
        buf.push(b'-');
        return;
    }
    let plain = |b: u8| TEXT_PLAIN[usize::from(b)];
    let mut words = v.chunks_exact(8);
    let all_plain = words
        .by_ref()
        .all(|w| text_plain8(u64::from_le_bytes(w.try_into().unwrap_or_default())))
        && words.remainder().iter().all(|&b| plain(b));
    if all_plain {
        buf.extend_from_slice(v);
        return;
    }
    for &b in v {
        if plain(b) {
            buf.push(b);
        } else {
            hex_escape(buf, b"\\x", b);
        }
    }
}

fn hex_escape(buf: &mut Vec<u8>, prefix: &[u8], b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.extend_from_slice(prefix);
    buf.push(HEX[usize::from(b >> 4)]);
    buf.push(HEX[usize::from(b & 15)]);
}

/// A JSON string: UTF-8 as it is (controls escaped); bytes that are not UTF-8 as
/// `\u00XX`, so the line stays valid UTF-8 whatever a client sent.
fn json_str(buf: &mut Vec<u8>, v: &[u8]) {
    buf.push(b'"');
    if v.iter().all(|&b| JSON_PLAIN[usize::from(b)]) {
        buf.extend_from_slice(v);
        buf.push(b'"');
        return;
    }
    let utf8 = std::str::from_utf8(v).is_ok();
    for &b in v {
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            0x20..=0x7e => buf.push(b),
            0x80.. if utf8 => buf.push(b),
            _ => hex_escape(buf, b"\\u00", b),
        }
    }
    buf.push(b'"');
}

impl Line<'_> {
    /// Room for the line, so that the fields below never grow the buffer one by one.
    fn reserve(&self, buf: &mut Vec<u8>) {
        buf.reserve(
            320 + self.host.len()
                + self.target.len()
                + self.request_id.len()
                + self.environment.len()
                + self.application.len()
                + self.node.len()
                + self.tenant.len(),
        );
    }

    fn text(&self, buf: &mut Vec<u8>, stamp: [u8; 24]) {
        self.reserve(buf);
        buf.extend_from_slice(&stamp);
        buf.push(b' ');
        text_field(buf, self.client);
        buf.push(b':');
        num(buf, self.client_port.into());
        buf.extend_from_slice(b" \"");
        text_field(buf, self.method.as_bytes());
        buf.push(b' ');
        text_field(buf, self.host);
        buf.push(b' ');
        text_field(buf, self.target);
        buf.push(b' ');
        buf.extend_from_slice(self.version.as_bytes());
        buf.extend_from_slice(b"\" ");
        num(buf, self.status.into());
        for (k, v) in [
            (&b" env="[..], self.environment),
            (b" app=", self.application),
            (b" node=", self.node),
        ] {
            buf.extend_from_slice(k);
            text_field(buf, v.as_bytes());
        }
        buf.extend_from_slice(b" attempts=");
        num(buf, self.attempts.into());
        buf.extend_from_slice(b" canary=");
        text_field(buf, self.canary.as_bytes());
        buf.extend_from_slice(b" tenant=");
        text_field(buf, self.tenant.as_bytes());
        buf.extend_from_slice(b" in=");
        num(buf, self.bytes_in);
        buf.extend_from_slice(b" out=");
        num(buf, self.bytes_out);
        buf.extend_from_slice(b" time=");
        secs(buf, self.duration_us);
        buf.extend_from_slice(b" upstream=");
        match self.upstream_us {
            Some(u) => secs(buf, u),
            None => buf.push(b'-'),
        }
        buf.extend_from_slice(b" id=");
        text_field(buf, self.request_id);
        if !self.complete {
            buf.extend_from_slice(b" cut");
        }
        buf.push(b'\n');
    }

    fn json(&self, buf: &mut Vec<u8>, stamp: [u8; 24]) {
        self.reserve(buf);
        buf.extend_from_slice(b"{\"time\":\"");
        buf.extend_from_slice(&stamp);
        buf.extend_from_slice(b"\",\"client\":");
        json_str(buf, self.client);
        buf.extend_from_slice(b",\"client_port\":");
        num(buf, self.client_port.into());
        for (k, v) in [
            (&b",\"method\":"[..], self.method.as_bytes()),
            (b",\"host\":", self.host),
            (b",\"path\":", self.target),
            (b",\"protocol\":", self.version.as_bytes()),
        ] {
            buf.extend_from_slice(k);
            json_str(buf, v);
        }
        buf.extend_from_slice(b",\"status\":");
        num(buf, self.status.into());
        for (k, v) in [
            (&b",\"environment\":"[..], self.environment),
            (b",\"application\":", self.application),
            (b",\"node\":", self.node),
        ] {
            buf.extend_from_slice(k);
            json_str(buf, v.as_bytes());
        }
        buf.extend_from_slice(b",\"attempts\":");
        num(buf, self.attempts.into());
        for (k, v) in [
            (&b",\"canary\":"[..], self.canary),
            (b",\"tenant\":", self.tenant),
        ] {
            buf.extend_from_slice(k);
            json_str(buf, v.as_bytes());
        }
        buf.extend_from_slice(b",\"bytes_in\":");
        num(buf, self.bytes_in);
        buf.extend_from_slice(b",\"bytes_out\":");
        num(buf, self.bytes_out);
        buf.extend_from_slice(b",\"duration\":");
        secs(buf, self.duration_us);
        buf.extend_from_slice(b",\"upstream_time\":");
        match self.upstream_us {
            Some(u) => secs(buf, u),
            None => buf.extend_from_slice(b"null"),
        }
        buf.extend_from_slice(b",\"request_id\":");
        json_str(buf, self.request_id);
        buf.extend_from_slice(b",\"complete\":");
        buf.extend_from_slice(if self.complete { b"true" } else { b"false" });
        buf.extend_from_slice(b"}\n");
    }
}

#[cfg(test)]
mod tests {

    /// The wall clock of an instant within a second of the anchor, after it or before it;
    /// none (a new anchor) further away.
    #[test]
    fn wall_clock_from_the_anchor() {
        let at = std::time::Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_795_790_026);
        let ms = Duration::from_millis;
        assert_eq!(from_anchor((at, wall), at + ms(300)), Some(wall + ms(300)));
        assert_eq!(from_anchor((at, wall), at), Some(wall));
        assert_eq!(from_anchor((at + ms(200), wall), at), Some(wall - ms(200)));
        assert_eq!(from_anchor((at, wall), at + ms(1000)), None);
        assert_eq!(from_anchor((at + ms(1000), wall), at), None);
    }

    /// The word-at-a-time test answers as the byte table, for every byte in every place
    /// of a word of plain bytes, and for words of random bytes.
    #[test]
    fn text_plain8_answers_as_the_table() {
        let table = |w: [u8; 8]| w.iter().all(|&b| TEXT_PLAIN[usize::from(b)]);
        for fill in [b'a', b'!', b'~', b'0'] {
            for at in 0..8 {
                for b in 0..=255u8 {
                    let mut w = [fill; 8];
                    w[at] = b;
                    assert_eq!(text_plain8(u64::from_le_bytes(w)), table(w), "{w:?}");
                }
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly plain bytes, so that the words that are all plain come up too.
            let w = x
                .to_le_bytes()
                .map(|b| if b & 0xc0 == 0 { b } else { 0x21 + b % 0x5e });
            assert_eq!(text_plain8(u64::from_le_bytes(w)), table(w), "{w:?}");
        }
    }
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(&civil(0), b"1970-01-01T00:00:00");
        assert_eq!(&civil(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&civil(1_795_790_026), b"2026-11-27T14:33:46");
    }

    fn line() -> Line<'static> {
        Line {
            time: UNIX_EPOCH + Duration::from_millis(1_500),
            client: b"127.0.0.1",
            client_port: 4242,
            method: "GET",
            host: b"shop.example",
            target: b"/a b?x=\"1\"",
            version: "HTTP/1.1",
            status: 200,
            environment: "production",
            application: "shop",
            node: "node-1",
            attempts: 2,
            canary: "canary",
            tenant: "",
            bytes_in: 0,
            bytes_out: 1234,
            duration_us: 321,
            upstream_us: Some(1_000_002),
            request_id: b"abc\xff",
            complete: true,
        }
    }

    #[test]
    fn text_line() {
        let mut buf = Vec::new();
        let log = LogBuf::new(
            AccessLog::start(Target::Stdout, Format::Text)
                .unwrap()
                .sink(),
        );
        line().text(&mut buf, log.stamp(line().time));
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "1970-01-01T00:00:01.500Z 127.0.0.1:4242 \"GET shop.example /a\\x20b?x=\\x221\\x22 HTTP/1.1\" 200 env=production app=shop node=node-1 attempts=2 canary=canary tenant=- in=0 out=1234 time=0.000321 upstream=1.000002 id=abc\\xff\n"
        );
    }

    #[test]
    fn json_line_parses() {
        let mut buf = Vec::new();
        let log = LogBuf::new(
            AccessLog::start(Target::Stdout, Format::Json)
                .unwrap()
                .sink(),
        );
        line().json(&mut buf, log.stamp(line().time));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["path"], "/a b?x=\"1\"");
        assert_eq!(v["request_id"], "abc\u{ff}");
        let mut utf8 = Vec::new();
        json_str(&mut utf8, "/café\u{7f}\n".as_bytes());
        assert_eq!(
            serde_json::from_slice::<String>(&utf8).unwrap(),
            "/café\u{7f}\n"
        );
        assert_eq!(v["duration"], 0.000321);
        assert_eq!(v["upstream_time"], 1.000002);
        assert_eq!(v["time"], "1970-01-01T00:00:01.500Z");
        assert_eq!(v["status"], 200);
    }
}
