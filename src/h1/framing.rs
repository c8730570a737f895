//! How an HTTP/1.1 message's body is framed (RFC 9112 section 6), for the own codec.
//!
//! The rules are those the request path keeps today through hyper, so that both codecs
//! frame every message alike (the differential tests compare them):
//! - A request's `Transfer-Encoding` must be exactly one `chunked` (any other coding or a
//!   list is refused: 400); it overrides a `Content-Length`, which is then dropped, and the
//!   connection is closed after the exchange (RFC 9112 6.3 item 3: a sender of both may be
//!   trying to smuggle a request). HTTP/1.0 requests may not have one.
//! - `Content-Length`: digits only; several values (fields or a list) must all be equal.
//! - A response to HEAD, a 1xx, 204 or 304 has no body, whatever its fields say; one whose
//!   codings end in `chunked` is chunked, with other codings it runs until the node
//!   closes; else `Content-Length`, else until the node closes.

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes (more than zero).
    Length(u64),
    /// Chunked (see `ChunkedDecoder`).
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

/// A request's framing, and whether the connection must close after the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFraming {
    pub framing: Framing,
    pub close_after: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("Content-Length is not a number")]
    BadLength,
    #[error("Content-Length values differ")]
    ConflictingLength,
    #[error("Transfer-Encoding other than chunked")]
    UnsupportedCoding,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    CodingInHttp10,
}

/// The framing of a request whose `Transfer-Encoding` fields are `te` and
/// `Content-Length` fields `cl` (raw values, in order).
pub fn request(http10: bool, te: &[&[u8]], cl: &[&[u8]]) -> Result<RequestFraming, FramingError> {
    if !te.is_empty() {
        if http10 {
            return Err(FramingError::CodingInHttp10);
        }
        if te.len() != 1 || !trim(te[0]).eq_ignore_ascii_case(b"chunked") {
            return Err(FramingError::UnsupportedCoding);
        }
        return Ok(RequestFraming {
            framing: Framing::Chunked,
            close_after: !cl.is_empty(),
        });
    }
    let framing = match length(cl)? {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    };
    Ok(RequestFraming {
        framing,
        close_after: false,
    })
}

/// The framing of a response with status `status` to a request (`head`: to a HEAD), whose
/// last `Transfer-Encoding` field is `te`. A 2xx to CONNECT and a 101 are tunnels: the
/// caller's business, not framing.
pub fn response(
    head: bool,
    status: u16,
    te: Option<&[u8]>,
    cl: &[&[u8]],
) -> Result<Framing, FramingError> {
    if head || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    if let Some(v) = te {
        // The last coding decides (RFC 9112 6.3 item 4), read as hyper's client reads it:
        // what follows the last comma of the last field, in a value of visible ASCII.
        let visible = v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
        let last = v.rsplit(|b| *b == b',').next().map(trim);
        return Ok(match last {
            Some(c) if visible && c.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::Close,
        });
    }
    Ok(match length(cl)? {
        None => Framing::Close,
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// The one value of the `Content-Length` fields `cl`, if any.
pub fn length(cl: &[&[u8]]) -> Result<Option<u64>, FramingError> {
    let mut found: Option<u64> = None;
    for field in cl {
        for v in field.split(|b| *b == b',') {
            let v = trim(v);
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(FramingError::BadLength);
            }
            // Any number of digits (leading zeros too) while the value fits, up to hyper's
            // largest length (`u64::MAX - 2`).
            let n = v
                .iter()
                .try_fold(0u64, |n, d| {
                    n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                })
                .filter(|n| *n <= u64::MAX - 2)
                .ok_or(FramingError::BadLength)?;
            match found {
                Some(m) if m != n => return Err(FramingError::ConflictingLength),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Most chunk-extension bytes a body may carry, all its chunks together (hyper's bound:
/// its decoder refuses the body at the 16,384th).
pub const MAX_CHUNK_EXTENSIONS: u64 = 16 * 1024;
/// Largest trailer section accepted (as a head: 64 KiB).
pub const MAX_TRAILERS: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size")]
    BadSize,
    #[error("chunk extensions over limit")]
    ExtensionsTooLong,
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("trailer section too large")]
    TrailersTooLarge,
    #[error("malformed trailer section")]
    BadTrailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of the size (`digits`: one came).
    Size,
    /// Spaces or tabs after the size.
    SizeLws,
    /// After the size: extensions until CR.
    Extension,
    /// CR seen at the end of the size line.
    SizeLf,
    /// `remaining` data bytes to go.
    Data,
    /// The CR after a chunk's data.
    DataCr,
    /// The LF after a chunk's data.
    DataLf,
    /// After the last chunk: the trailer section, up to an empty line.
    Trailers,
    /// The LF due after a trailer line's CR.
    TrailerLf,
    /// The LF due after the CR of the section's closing empty line.
    TrailersEndLf,
    Done,
}

/// A chunked body, decoded incrementally: data passes through as ranges of the input (no
/// copy); the trailer section, if any, is kept (bounded) for the caller to parse.
/// The grammar is hyper's, so that both codecs take and refuse the same bodies: CRLF
/// everywhere (a bare LF is refused, as is any byte where one is due); a size of any
/// number of hex digits whose value fits 64 bits, then spaces or tabs; extensions of at
/// most `MAX_CHUNK_EXTENSIONS` bytes over the body. In the trailer section a CR alone ends
/// a line (it must be followed by LF); a bare LF is a byte of the line, which httparse
/// then reads as a line end, as hyper's decoder and parser do.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: bool,
    extensions: u64,
    remaining: u64,
    trailers: Vec<u8>,
    /// Bytes of the trailer line being read (none: at a line's start).
    trailer_line: usize,
    /// Trailer lines ended by CR LF.
    trailer_lines: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            size: 0,
            digits: false,
            extensions: 0,
            remaining: 0,
            trailers: Vec::new(),
            trailer_line: 0,
            trailer_lines: 0,
        }
    }

    /// Whether the body ended (the last chunk and the trailer section were read).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The trailer section as received (fields, each ending in CRLF; without the final
    /// empty line), once done.
    pub fn trailers(&self) -> &[u8] {
        &self.trailers
    }

    /// The trailer section read whole as hyper reads it, handed to `f` as fields: httparse
    /// over the section, into as many fields as it has lines ended by CR LF (a line ended
    /// by a bare LF is a field of its own to httparse, but not a line to hyper's decoder,
    /// which then finds too many fields), at most `MAX` of them. `None` when that fails.
    pub fn with_trailer_fields<const MAX: usize, R>(
        &self,
        f: impl FnOnce(&[httparse::Header<'_>]) -> R,
    ) -> Option<R> {
        let mut section = Vec::with_capacity(self.trailers.len() + 2);
        section.extend_from_slice(&self.trailers);
        section.extend_from_slice(b"\r\n");
        let mut fields = [httparse::EMPTY_HEADER; MAX];
        match httparse::parse_headers(&section, &mut fields) {
            Ok(httparse::Status::Complete((_, parsed)))
                if parsed.len() <= self.trailer_lines && self.trailer_lines <= MAX =>
            {
                Some(f(parsed))
            }
            _ => None,
        }
    }

    /// Reads from `input`: returns the bytes consumed and the range of `input` that is
    /// body data (empty when none). Call again with the rest while it consumes something
    /// and the body has not ended; bytes after the end are not consumed.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, std::ops::Range<usize>), ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => {
                    let d = match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        b'A'..=b'F' => b - b'A' + 10,
                        b';' | b'\r' | b' ' | b'\t' if self.digits => {
                            self.state = match b {
                                b';' => State::Extension,
                                b'\r' => State::SizeLf,
                                _ => State::SizeLws,
                            };
                            i += 1;
                            continue;
                        }
                        _ => return Err(ChunkError::BadSize),
                    };
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(d)))
                        .ok_or(ChunkError::BadSize)?;
                    self.digits = true;
                }
                State::SizeLws => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = State::Extension,
                    b'\r' => self.state = State::SizeLf,
                    _ => return Err(ChunkError::BadSize),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::BadSize),
                    _ => {
                        self.extensions += 1;
                        if self.extensions >= MAX_CHUNK_EXTENSIONS {
                            return Err(ChunkError::ExtensionsTooLong);
                        }
                    }
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadSize);
                    }
                    self.digits = false;
                    if self.size == 0 {
                        self.state = State::Trailers;
                    } else {
                        self.remaining = self.size;
                        self.state = State::Data;
                    }
                    self.size = 0;
                }
                State::Data => {
                    let n = (input.len() - i)
                        .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    self.remaining -= n as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    // Data goes out at once, one run a call.
                    return Ok((i + n, i..i + n));
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::MissingCrlf);
                    }
                    self.state = State::Size;
                }
                State::Trailers | State::TrailerLf | State::TrailersEndLf => {
                    if self.trailers.len() >= MAX_TRAILERS {
                        return Err(ChunkError::TrailersTooLarge);
                    }
                    match self.state {
                        State::TrailersEndLf => {
                            if b != b'\n' {
                                return Err(ChunkError::BadTrailers);
                            }
                            // The section, without its closing empty line.
                            self.trailers.pop();
                            self.state = State::Done;
                            return Ok((i + 1, i + 1..i + 1));
                        }
                        State::TrailerLf => {
                            if b != b'\n' {
                                return Err(ChunkError::BadTrailers);
                            }
                            self.trailer_line = 0;
                            self.trailer_lines += 1;
                            self.state = State::Trailers;
                        }
                        _ if b == b'\r' => {
                            self.state = if self.trailer_line == 0 {
                                State::TrailersEndLf
                            } else {
                                State::TrailerLf
                            };
                        }
                        _ => self.trailer_line += 1,
                    }
                    self.trailers.push(b);
                }
                State::Done => return Ok((i, i..i)),
            }
            i += 1;
        }
        Ok((i, i..i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(te: &[&str], cl: &[&str]) -> Result<RequestFraming, FramingError> {
        let te: Vec<&[u8]> = te.iter().map(|s| s.as_bytes()).collect();
        let cl: Vec<&[u8]> = cl.iter().map(|s| s.as_bytes()).collect();
        request(false, &te, &cl)
    }

    #[test]
    fn request_framing() {
        use Framing::*;
        assert_eq!(req(&[], &[]).unwrap().framing, Empty);
        assert_eq!(req(&[], &["0"]).unwrap().framing, Empty);
        assert_eq!(req(&[], &["12"]).unwrap().framing, Length(12));
        assert_eq!(req(&[], &["12, 12", "12"]).unwrap().framing, Length(12));
        assert_eq!(
            req(&[], &["12", "13"]),
            Err(FramingError::ConflictingLength)
        );
        for bad in ["+1", "-1", "1 2", "0x1", "", "99999999999999999999"] {
            assert_eq!(req(&[], &[bad]), Err(FramingError::BadLength), "{bad:?}");
        }
        assert_eq!(
            req(&[" Chunked "], &[]).unwrap(),
            RequestFraming {
                framing: Chunked,
                close_after: false
            }
        );
        // Both: chunked wins, and the connection closes after.
        assert_eq!(
            req(&["chunked"], &["5"]).unwrap(),
            RequestFraming {
                framing: Chunked,
                close_after: true
            }
        );
        for te in [
            &["gzip, chunked"][..],
            &["chunked", "chunked"],
            &["chunked, chunked"],
            &["gzip"],
        ] {
            assert_eq!(req(te, &[]), Err(FramingError::UnsupportedCoding), "{te:?}");
        }
        assert_eq!(
            request(true, &[b"chunked"], &[]),
            Err(FramingError::CodingInHttp10)
        );
    }

    #[test]
    fn response_framing() {
        use Framing::*;
        // `te` is the last field's value.
        let r = |head, status, te: &[&str], cl: &[&str]| {
            let te = te.last().map(|s| s.as_bytes());
            let cl: Vec<&[u8]> = cl.iter().map(|s| s.as_bytes()).collect();
            response(head, status, te, &cl)
        };
        assert_eq!(r(true, 200, &["chunked"], &["5"]), Ok(Empty));
        for s in [100, 103, 204, 304] {
            assert_eq!(r(false, s, &[], &["5"]), Ok(Empty));
        }
        assert_eq!(r(false, 200, &["chunked"], &["5"]), Ok(Chunked));
        assert_eq!(r(false, 200, &["gzip", "chunked"], &[]), Ok(Chunked));
        assert_eq!(r(false, 200, &["gzip, \tChunked "], &[]), Ok(Chunked));
        assert_eq!(r(false, 200, &["chunked, gzip"], &[]), Ok(Close));
        // hyper's client reads what follows the last comma, and the last field alone.
        assert_eq!(r(false, 200, &["chunked,"], &[]), Ok(Close));
        assert_eq!(r(false, 200, &["chunked", "gzip"], &[]), Ok(Close));
        assert_eq!(r(false, 200, &["chunked\u{7f}"], &[]), Ok(Close));
        // A coding makes the lengths irrelevant, even disagreeing ones.
        assert_eq!(r(false, 200, &["chunked"], &["5", "6"]), Ok(Chunked));
        assert_eq!(r(false, 200, &[], &["5"]), Ok(Length(5)));
        assert_eq!(r(false, 200, &[], &["0"]), Ok(Empty));
        assert_eq!(r(false, 200, &[], &[]), Ok(Close));
        assert_eq!(
            r(false, 200, &[], &["5", "6"]),
            Err(FramingError::ConflictingLength)
        );
    }

    /// Decodes `input` fed `step` bytes at a time: (body, trailers, bytes consumed).
    fn run(input: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut body = Vec::new();
        let mut at = 0;
        while at < input.len() && !d.is_done() {
            let end = (at + step).min(input.len());
            let (used, data) = d.decode(&input[at..end])?;
            body.extend_from_slice(&input[at..end][data]);
            if used == 0 && end == input.len() {
                break;
            }
            at += used;
        }
        assert!(d.is_done(), "not done: {:?}", d.state);
        Ok((body, d.trailers().to_vec(), at))
    }

    #[test]
    fn chunked_bodies() {
        let msg = b"5\r\nhello\r\nA;name=value\r\n0123456789\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (body, trailers, used) = run(msg, step).unwrap();
            assert_eq!(body, b"hello0123456789", "step {step}");
            assert!(trailers.is_empty());
            assert_eq!(used, msg.len() - 4, "the next message is left");
        }
        let msg = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx: y\r\n\r\n";
        for step in [1, 4, 100] {
            let (body, trailers, _) = run(msg, step).unwrap();
            assert_eq!(body, b"abc");
            assert_eq!(trailers, b"grpc-status: 0\r\nx: y\r\n");
        }
        // Uppercase hex, a size of 16 digits of leading zeros.
        let (body, _, _) = run(b"000000000000000B\r\nhello world\r\n0\r\n\r\n", 5).unwrap();
        assert_eq!(body, b"hello world");
        // As hyper reads them: any number of leading zeros, spaces and tabs after the size
        // (before an extension too), the largest size that fits 64 bits.
        let msg = b"00000000000000000000005 \t\r\nhello\r\n3\t;a=b\r\nabc\r\n0 \r\n\r\n";
        for step in [1, 3, 100] {
            let (body, _, used) = run(msg, step).unwrap();
            assert_eq!(body, b"helloabc", "step {step}");
            assert_eq!(used, msg.len());
        }
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.decode(b"ffffffffffffffff\r\nab").unwrap(), (20, 18..20));
        // Extensions: up to the bound over the whole body, in any number of chunks.
        let mut msg = Vec::new();
        for _ in 0..15 {
            msg.extend_from_slice(b"1;");
            msg.extend(std::iter::repeat_n(b'x', 1000));
            msg.extend_from_slice(b"\r\nz\r\n");
        }
        msg.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(run(&msg, 64).unwrap().0, b"z".repeat(15));
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for (bad, e) in [
            (&b"5\nhello\r\n0\r\n\r\n"[..], ChunkError::BadSize),
            (b"\r\nhello", ChunkError::BadSize),
            (b"x\r\n", ChunkError::BadSize),
            (b" 5\r\nhello\r\n", ChunkError::BadSize),
            (b"5 5\r\nhello\r\n", ChunkError::BadSize),
            (b"5 \n", ChunkError::BadSize),
            (b"5;a\nhello", ChunkError::BadSize),
            (b"10000000000000000\r\n", ChunkError::BadSize),
            (
                b"00000000000000000000000010000000000000000\r\n",
                ChunkError::BadSize,
            ),
            (b"5\r\nhelloX\r\n", ChunkError::MissingCrlf),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::MissingCrlf),
            (b"0\r\nx: y\rz\r\n", ChunkError::BadTrailers),
            (b"0\r\n\rx", ChunkError::BadTrailers),
        ] {
            let mut d = ChunkedDecoder::new();
            let mut at = 0;
            let err = loop {
                match d.decode(&bad[at..]) {
                    Err(e) => break Some(e),
                    Ok((0, _)) => break None,
                    Ok((n, _)) => at += n,
                }
                if at >= bad.len() {
                    break None;
                }
            };
            assert_eq!(err, Some(e), "{:?}", String::from_utf8_lossy(bad));
        }
        // A bare LF is a byte of a trailer line (httparse reads it as a line end), as in
        // hyper's decoder; only CR LF ends a line there.
        for step in [1, 3, 100] {
            let (body, trailers, _) = run(b"0\r\nx: y\n\r\n\r\n", step).unwrap();
            assert!(body.is_empty());
            assert_eq!(trailers, b"x: y\n\r\n");
        }
        let mut long = Vec::new();
        for _ in 0..17 {
            long.extend_from_slice(b"1;");
            long.extend(std::iter::repeat_n(b'x', 1000));
            long.extend_from_slice(b"\r\nz\r\n");
        }
        assert_eq!(run(&long, 64), Err(ChunkError::ExtensionsTooLong));
        let mut big = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILERS / 8 + 1 {
            big.extend_from_slice(b"a: bcd\r\n");
        }
        assert_eq!(
            ChunkedDecoder::new().decode(&big),
            Err(ChunkError::TrailersTooLarge)
        );
    }
}
