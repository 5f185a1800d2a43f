//! The bytes of an HTTP exchange's bodies: the request's, decoded as it
//! comes (`Content-Length`, or chunked, RFC 9112 section 7.1), and the
//! response's, encoded (chunks, or events for `text/event-stream`).

/// How much of a chunk-size line or the trailers is read before the body is
/// refused as malformed.
const MAX_LINE: usize = 1024;
const MAX_TRAILERS: usize = 8 * 1024;

/// A request body being read: what is left of it, and how it is framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// `Content-Length`: the bytes still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
    /// All of it has come.
    Done,
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// In a chunk-size line: the size so far, and the line's length.
    Size {
        size: u64,
        digits: usize,
        len: usize,
        extension: bool,
    },
    /// In a chunk's data: what is left of it.
    Data(u64),
    /// After a chunk's data: its CRLF (`seen` of the two bytes).
    DataEnd { seen: u8 },
    /// After the last chunk: trailer lines until an empty one (`line` is
    /// the current line's length; `total` all of them).
    Trailers { line: usize, total: usize },
}

impl Chunked {
    fn start() -> Chunked {
        Chunked::Size {
            size: 0,
            digits: 0,
            len: 0,
            extension: false,
        }
    }
}

impl Body {
    pub fn chunked() -> Body {
        Body::Chunked(Chunked::start())
    }

    /// No body at all.
    pub fn none() -> Body {
        Body::Done
    }

    pub fn is_done(&self) -> bool {
        *self == Body::Done
    }

    /// Decodes what came, appending the body's bytes to `out`; at most
    /// `budget` bytes of body in all (the rest of the allowance is
    /// returned through it). Bytes after the body's end are left (not
    /// consumed). Returns how many bytes of `input` were consumed, or why
    /// the body is refused.
    pub fn decode(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        budget: &mut u64,
    ) -> Result<usize, String> {
        let mut at = 0;
        while at < input.len() && !self.is_done() {
            let rest = &input[at..];
            match self {
                Body::Done => break,
                Body::Length(left) => {
                    let n = rest.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    take(&rest[..n], out, budget)?;
                    *left -= n as u64;
                    at += n;
                    if *left == 0 {
                        *self = Body::Done;
                    }
                }
                Body::Chunked(state) => {
                    let (used, next) = step(state, rest, out, budget)?;
                    at += used;
                    match next {
                        Some(next) => *state = next,
                        None => *self = Body::Done,
                    }
                }
            }
        }
        Ok(at)
    }
}

fn take(bytes: &[u8], out: &mut Vec<u8>, budget: &mut u64) -> Result<(), String> {
    let n = bytes.len() as u64;
    if n > *budget {
        return Err("the request body is larger than max_body_size".into());
    }
    *budget -= n;
    out.extend_from_slice(bytes);
    Ok(())
}

/// One step of a chunked body from `state`: the bytes it used, and the next
/// state (None: the body has ended).
fn step(
    state: &Chunked,
    input: &[u8],
    out: &mut Vec<u8>,
    budget: &mut u64,
) -> Result<(usize, Option<Chunked>), String> {
    let malformed = |what: &str| format!("a malformed chunked body: {what}");
    Ok(match *state {
        Chunked::Size {
            size,
            digits,
            len,
            extension,
        } => {
            let b = input[0];
            if len >= MAX_LINE {
                return Err(malformed("a chunk-size line over 1 KiB"));
            }
            let next = |size, digits, extension| Chunked::Size {
                size,
                digits,
                len: len + 1,
                extension,
            };
            match b {
                b'\n' => {
                    if digits == 0 {
                        return Err(malformed("a chunk without its size"));
                    }
                    match size {
                        0 => (1, Some(Chunked::Trailers { line: 0, total: 0 })),
                        n => (1, Some(Chunked::Data(n))),
                    }
                }
                b'\r' => (1, Some(next(size, digits, extension))),
                _ if extension => (1, Some(next(size, digits, true))),
                b';' | b' ' | b'\t' if digits > 0 => (1, Some(next(size, digits, true))),
                _ => {
                    let d = (b as char)
                        .to_digit(16)
                        .ok_or_else(|| malformed("a chunk size that is not hexadecimal"))?;
                    if digits >= 15 {
                        return Err(malformed("a chunk size of more than 15 digits"));
                    }
                    (1, Some(next(size * 16 + u64::from(d), digits + 1, false)))
                }
            }
        }
        Chunked::Data(left) => {
            let n = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            take(&input[..n], out, budget)?;
            match left - n as u64 {
                0 => (n, Some(Chunked::DataEnd { seen: 0 })),
                left => (n, Some(Chunked::Data(left))),
            }
        }
        Chunked::DataEnd { seen } => match (seen, input[0]) {
            (0, b'\r') => (1, Some(Chunked::DataEnd { seen: 1 })),
            (_, b'\n') => (1, Some(Chunked::start())),
            _ => return Err(malformed("a chunk's data longer than its size")),
        },
        Chunked::Trailers { line, total } => {
            if total >= MAX_TRAILERS {
                return Err(malformed("trailers over 8 KiB"));
            }
            match input[0] {
                b'\n' if line == 0 => (1, None),
                b'\n' => (
                    1,
                    Some(Chunked::Trailers {
                        line: 0,
                        total: total + 1,
                    }),
                ),
                b'\r' => (
                    1,
                    Some(Chunked::Trailers {
                        line,
                        total: total + 1,
                    }),
                ),
                _ => (
                    1,
                    Some(Chunked::Trailers {
                        line: line + 1,
                        total: total + 1,
                    }),
                ),
            }
        }
    })
}

/// Room kept before a chunk's payload for its size line.
pub const CHUNK_HEAD: usize = 18;

/// Turns `buf[CHUNK_HEAD..]` (the payload, read behind the room) into a
/// chunk: its size line written just before the payload and CRLF after.
/// Returns where the chunk starts in `buf`.
pub fn frame_chunk(buf: &mut Vec<u8>) -> usize {
    let n = buf.len() - CHUNK_HEAD;
    let head = format!("{n:x}\r\n");
    let start = CHUNK_HEAD - head.len();
    buf[start..CHUNK_HEAD].copy_from_slice(head.as_bytes());
    buf.extend_from_slice(b"\r\n");
    start
}

/// The end of a chunked body: the last chunk, no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Output cut into Server-Sent Events: each line one event, its text the
/// event's data. A line cannot end an event early: a carriage return inside
/// it (which the event stream reads as a line's end) starts another `data:`
/// field of the same event, which the browser joins with a newline.
#[derive(Default)]
pub struct Events {
    /// A line not yet ended by a newline.
    partial: Vec<u8>,
}

/// A line longer than this is sent as an event of its own, as it is.
pub const MAX_EVENT: usize = 64 * 1024;

impl Events {
    /// Appends the events of the lines `output` ends to `out`; what follows
    /// the last newline waits for the rest of its line.
    pub fn encode(&mut self, output: &[u8], out: &mut Vec<u8>) {
        let mut rest = output;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                event(&rest[..at], out);
            } else {
                self.partial.extend_from_slice(&rest[..at]);
                event(&std::mem::take(&mut self.partial), out);
            }
            rest = &rest[at + 1..];
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() >= MAX_EVENT {
            event(&std::mem::take(&mut self.partial), out);
        }
    }

    /// The last line, without its newline, is an event too.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            event(&std::mem::take(&mut self.partial), out);
        }
    }

    /// How much of a line waits for its end.
    pub fn waiting(&self) -> usize {
        self.partial.len()
    }
}

fn event(line: &[u8], out: &mut Vec<u8>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    for field in line.split(|&b| b == b'\r') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(field);
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// An event stream's keep-alive: a comment, which clients ignore.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// The event that ends an event stream: `event: end`, its data the
/// connection's end (`output-ended`, `timeout`, …), so that a page can close
/// its `EventSource` rather than have it reconnect.
pub fn end_event(reason: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: end\ndata: ");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        mut body: Body,
        input: &[u8],
        budget: u64,
    ) -> (Result<usize, String>, Vec<u8>, Body) {
        let mut out = Vec::new();
        let mut budget = budget;
        let r = body.decode(input, &mut out, &mut budget);
        (r, out, body)
    }

    #[test]
    fn a_length_body_ends_at_its_length_and_leaves_the_rest() {
        let (r, out, body) = decode_all(Body::Length(5), b"hello, more", 100);
        assert_eq!(
            (r, out.as_slice(), body),
            (Ok(5), &b"hello"[..], Body::Done)
        );
        let (r, out, body) = decode_all(Body::Length(5), b"hel", 100);
        assert_eq!(
            (r, out.as_slice(), body),
            (Ok(3), &b"hel"[..], Body::Length(2))
        );
        let (r, _, _) = decode_all(Body::Length(5), b"hello", 4);
        assert!(r.unwrap_err().contains("max_body_size"));
        let (r, out, _) = decode_all(Body::Length(5), b"hello", 5);
        assert_eq!(
            (r, out.as_slice()),
            (Ok(5), &b"hello"[..]),
            "exactly the bound is taken"
        );
    }

    #[test]
    fn a_chunked_body_decodes_byte_by_byte_as_at_once() {
        let wire =
            b"5;name=value\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let (r, out, body) = decode_all(Body::chunked(), wire, 100);
        assert_eq!(r, Ok(wire.len() - 4));
        assert_eq!(out, b"hello 0123456789");
        assert_eq!(body, Body::Done);
        let mut body = Body::chunked();
        let (mut out, mut budget) = (Vec::new(), 100);
        for b in &wire[..wire.len() - 4] {
            assert_eq!(body.decode(&[*b], &mut out, &mut budget), Ok(1));
        }
        assert_eq!(
            (out.as_slice(), body),
            (&b"hello 0123456789"[..], Body::Done)
        );
        assert_eq!(budget, 100 - 16);
    }

    #[test]
    fn bad_chunked_bodies_are_refused_with_why() {
        for (wire, why) in [
            (&b"x\r\n"[..], "not hexadecimal"),
            (b"\r\n", "without its size"),
            (b"3\r\nabcd\r\n", "longer than its size"),
            (b"1000000000000000\r\n", "more than 15 digits"),
        ] {
            let (r, _, _) = decode_all(Body::chunked(), wire, u64::MAX);
            assert!(r.as_ref().unwrap_err().contains(why), "{r:?} for {wire:?}");
        }
        let (r, _, _) = decode_all(Body::chunked(), b"5\r\nhello\r\n", 4);
        assert!(r.unwrap_err().contains("max_body_size"));
        let long = [b'1'; 2000];
        let (r, _, _) = decode_all(Body::chunked(), &long, u64::MAX);
        assert!(r.is_err());
        // A size line made long by its extension, and trailers past their bound.
        let mut line = b"5;".to_vec();
        line.extend_from_slice(&[b'x'; 1100]);
        let (r, _, _) = decode_all(Body::chunked(), &line, u64::MAX);
        assert!(r.unwrap_err().contains("over 1 KiB"));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..300 {
            trailers.extend_from_slice(b"X-Trailer: 0123456789abcdef\r\n");
        }
        let (r, _, _) = decode_all(Body::chunked(), &trailers, u64::MAX);
        assert!(r.unwrap_err().contains("trailers over 8 KiB"));
        // Every byte of the trailers counts, line ends too.
        for filler in [&b"a\n"[..], b"\r"] {
            let mut trailers = b"0\r\n".to_vec();
            trailers.extend(filler.iter().cycle().take(10_000));
            let (r, _, _) = decode_all(Body::chunked(), &trailers, u64::MAX);
            assert!(r.unwrap_err().contains("trailers over 8 KiB"), "{filler:?}");
        }
        let (r, _, _) = decode_all(Body::chunked(), b";x\r\n", u64::MAX);
        assert!(
            r.unwrap_err().contains("not hexadecimal"),
            "an extension needs a size first"
        );
    }

    #[test]
    fn chunks_carry_their_size_in_hex() {
        let mut buf = vec![0; CHUNK_HEAD];
        buf.extend_from_slice(&[b'x'; 26]);
        let start = frame_chunk(&mut buf);
        assert_eq!(&buf[start..start + 4], b"1a\r\n");
        assert!(buf.ends_with(b"xx\r\n"));
        assert_eq!(buf.len() - start, 4 + 26 + 2);
    }

    #[test]
    fn each_line_is_one_event_and_no_line_ends_one_early() {
        let mut events = Events::default();
        let mut out = Vec::new();
        events.encode(b"one\r\n\nthree a\rb\nfou", &mut out);
        assert_eq!(out, b"data: one\n\ndata: \n\ndata: three a\ndata: b\n\n");
        assert_eq!(events.waiting(), 3);
        out.clear();
        events.encode(b"r\nfive", &mut out);
        assert_eq!(out, b"data: four\n\n");
        out.clear();
        events.finish(&mut out);
        assert_eq!(out, b"data: five\n\n");
        let mut long = Vec::new();
        events.encode(&vec![b'y'; MAX_EVENT], &mut long);
        assert_eq!(
            long.len(),
            MAX_EVENT + 8,
            "a line at the bound is sent whole"
        );
    }
}
