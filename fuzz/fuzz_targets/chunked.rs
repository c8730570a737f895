//! The chunked decoder of the own HTTP/1.1 codec on arbitrary bytes, fed whole and in
//! arbitrary pieces: the same body, trailers, bytes consumed and error either way (a
//! message split across reads must decode as it does in one read), never a panic, and a
//! decoded body encoded again as one chunk decodes to itself.
#![no_main]

use envgate::h1::framing::{ChunkError, ChunkedDecoder};
use libfuzzer_sys::fuzz_target;

type Outcome = Result<(Vec<u8>, Vec<u8>, usize, bool), ChunkError>;

/// Feeds `input` in pieces of the given sizes (cycled): body, trailers, bytes consumed,
/// whether the body ended.
fn run(input: &[u8], steps: &[usize]) -> Outcome {
    let mut d = ChunkedDecoder::new();
    let mut body = Vec::new();
    let mut at = 0;
    let mut k = 0;
    while at < input.len() && !d.is_done() {
        let step = steps[k % steps.len()].max(1);
        k += 1;
        let end = (at + step).min(input.len());
        let piece = &input[at..end];
        let (used, data) = d.decode(piece)?;
        assert!(used <= piece.len());
        assert!(data.end <= used && data.start <= data.end);
        body.extend_from_slice(&piece[data]);
        if used == 0 {
            // Nothing taken: only at the end of the body.
            assert!(d.is_done());
            break;
        }
        at += used;
    }
    Ok((body, d.trailers().to_vec(), at, d.is_done()))
}

fuzz_target!(|data: &[u8]| {
    let (steps, input) = match data.split_first() {
        Some((&n, rest)) => {
            let n = usize::from(n % 8);
            if rest.len() < n {
                return;
            }
            let steps: Vec<usize> = rest[..n].iter().map(|b| usize::from(*b % 17) + 1).collect();
            (steps, &rest[n..])
        }
        None => return,
    };
    let whole = run(input, &[input.len().max(1)]);
    let split = run(input, if steps.is_empty() { &[1] } else { &steps });
    assert_eq!(whole, split);
    if let Ok((body, _, _, true)) = whole {
        let mut again = format!("{:x}\r\n", body.len()).into_bytes();
        if !body.is_empty() {
            again.extend_from_slice(&body);
            again.extend_from_slice(b"\r\n0\r\n\r\n");
        } else {
            again.extend_from_slice(b"\r\n");
        }
        let (b2, t2, used, done) =
            run(&again, &[again.len()]).expect("a body encoded again decodes");
        assert!(done);
        assert_eq!(b2, body);
        assert!(t2.is_empty());
        assert_eq!(used, again.len());
    }
});
