//! The daemon's side of the wire: server frames written whole and in order
//! ([`Wire`]), their headers, and text output cut into one message a line
//! ([`Lines`]). And one thing of the client's side: the code its close frame
//! carried, as sent ([`ClientClose`]).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{splice, SpliceFFlags};
use nix::sys::socket::{send, MsgFlags};

use crate::fdio::retry;
use crate::record::Traffic;

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
/// The largest read of text output, on the stack of a plain function.
pub const TEXT_READ: usize = 16 * 1024;
/// A buffer larger than this is freed once drained, so idle sessions hold little.
pub const KEEP: usize = 16 * 1024;

/// The bytes on their way to the client, whole frames in order.
#[derive(Default)]
pub struct Wire {
    bytes: Vec<u8>,
    /// How much of `bytes` is written.
    at: usize,
    /// Payload still to splice from the pipe behind `bytes`, which ends
    /// with its frame's header.
    splice: usize,
    /// The data frames in `bytes`: where each ends, and its payload's
    /// length, counted as sent once the frame is written.
    frames: VecDeque<(usize, usize)>,
}

impl Wire {
    pub fn is_empty(&self) -> bool {
        self.at == self.bytes.len() && self.splice == 0
    }

    /// Takes the control frames of the outbox (the wire is empty).
    pub fn load(&mut self, outbox: &mut Vec<u8>) {
        self.reset();
        std::mem::swap(&mut self.bytes, outbox);
    }

    fn reset(&mut self) {
        self.bytes.clear();
        self.at = 0;
        if self.bytes.capacity() > KEEP {
            self.bytes = Vec::new();
        }
    }

    /// Appends a data frame with its payload.
    pub fn frame(&mut self, opcode: u8, payload: &[u8]) {
        if self.is_empty() {
            self.reset();
        }
        header(opcode, payload.len(), &mut self.bytes);
        self.bytes.extend_from_slice(payload);
        self.frames.push_back((self.bytes.len(), payload.len()));
    }

    /// A binary frame whose `n` bytes of payload are in the pipe.
    pub fn spliced(&mut self, n: usize) {
        self.reset();
        header(BINARY, n, &mut self.bytes);
        self.splice = n;
    }

    /// Reads up to `want` bytes of binary output into a frame of its own,
    /// behind room left for its header. Ok(0) at end-of-file.
    pub fn read_binary(&mut self, fd: &OwnedFd, want: usize) -> Result<usize, Errno> {
        const ROOM: usize = 10;
        self.reset();
        self.bytes.resize(ROOM + want, 0);
        let n = match retry(|| nix::unistd::read(fd, &mut self.bytes[ROOM..])) {
            Ok(n) => n,
            Err(e) => {
                self.bytes.clear();
                return Err(e);
            }
        };
        self.bytes.truncate(ROOM + n);
        if n == 0 {
            self.bytes.clear();
            return Ok(0);
        }
        let mut head = Vec::with_capacity(ROOM);
        header(BINARY, n, &mut head);
        self.at = ROOM - head.len();
        self.bytes[self.at..ROOM].copy_from_slice(&head);
        self.frames.push_back((ROOM + n, n));
        Ok(n)
    }

    /// While the client takes nothing: nothing is kept once all is written;
    /// else what is left, in a buffer of its size if the one it is in is
    /// large (and the frames' list too, if far larger than what is left).
    pub fn compact(&mut self) {
        if self.is_empty() {
            self.bytes = Vec::new();
            self.frames = VecDeque::new();
            self.at = 0;
            return;
        }
        if self.bytes.capacity() > KEEP {
            self.bytes = self.bytes.split_off(self.at);
            for (end, _) in &mut self.frames {
                *end -= self.at;
            }
            self.at = 0;
        }
        // (Shrunk each time, the list of a text session's many short
        // messages would be grown again each time.)
        if self.frames.capacity() * 16 > KEEP && self.frames.len() * 8 < self.frames.capacity() {
            self.frames.shrink_to_fit();
        }
    }

    /// One write (or splice) to the client: how many bytes it took; EAGAIN
    /// when it takes nothing.
    pub fn write(
        &mut self,
        socket: &OwnedFd,
        pipe: &OwnedFd,
        traffic: &Traffic,
    ) -> Result<usize, Errno> {
        if self.at < self.bytes.len() {
            let mut flags = MsgFlags::MSG_NOSIGNAL;
            if self.splice > 0 {
                // The payload follows at once: one segment, not two.
                flags |= MsgFlags::from_bits_retain(libc::MSG_MORE);
            }
            let n = retry(|| send(socket.as_raw_fd(), &self.bytes[self.at..], flags))?;
            self.at += n;
            let (mut messages, mut payload) = (0, 0);
            while let Some(&(end, len)) = self.frames.front() {
                if end > self.at {
                    break;
                }
                self.frames.pop_front();
                messages += 1;
                payload += len;
            }
            if messages > 0 {
                traffic.messages_sent(messages);
                traffic.sent(payload);
            }
            Ok(n)
        } else if self.splice > 0 {
            let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
            let n = retry(|| splice(pipe, None, socket, None, self.splice, flags))?;
            if n == 0 {
                // The pipe held these bytes a moment ago; nobody else reads it.
                return Err(Errno::EPIPE);
            }
            self.splice -= n;
            traffic.sent(n);
            if self.splice == 0 {
                traffic.messages_sent(1);
            }
            Ok(n)
        } else {
            Ok(0)
        }
    }
}

/// A server frame's header (final, unmasked): 2, 4 or 10 bytes.
fn header(opcode: u8, len: usize, out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// The code of the client's first close frame, as the client sent it,
/// found in its bytes on their way to tungstenite. tungstenite answers a
/// code no endpoint may send (RFC 6455 7.4) with 1002, and reports 1002 in
/// its place; this tells which code it was. Only frame headers are read:
/// payloads are skipped by their length, but for the close frame's first
/// two bytes, unmasked.
#[derive(Debug, Default)]
pub struct ClientClose {
    at: Position,
    code: Option<u16>,
    /// Past the first close frame, or past a header tungstenite refuses:
    /// nothing more to learn.
    done: bool,
}

#[derive(Debug)]
enum Position {
    /// In a frame's header: the bytes so far (at most 14).
    Header([u8; 14], usize),
    /// In a frame's payload: what is left of it; for a close frame, its
    /// mask and the code's bytes so far.
    Payload {
        left: u64,
        close: Option<([u8; 4], [u8; 2], usize)>,
    },
}

impl Default for Position {
    fn default() -> Position {
        Position::Header([0; 14], 0)
    }
}

impl ClientClose {
    /// The code of the client's close frame, once its bytes have passed.
    pub fn code(&self) -> Option<u16> {
        self.code
    }

    /// Follows the client's bytes, in the order tungstenite reads them.
    pub fn pass(&mut self, mut bytes: &[u8]) {
        while !self.done && !bytes.is_empty() {
            match &mut self.at {
                Position::Header(head, len) => {
                    head[*len] = bytes[0];
                    *len += 1;
                    bytes = &bytes[1..];
                    if let Some(next) = after_header(&head[..*len]) {
                        match next {
                            Some(payload) => self.at = payload,
                            None => self.done = true,
                        }
                    }
                }
                Position::Payload { left, close: None } => {
                    let n = bytes.len().min(clamp(*left));
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.at = Position::default();
                    }
                }
                Position::Payload {
                    left,
                    close: Some((mask, code, seen)),
                } => {
                    code[*seen] = bytes[0] ^ mask[*seen % 4];
                    *seen += 1;
                    *left -= 1;
                    bytes = &bytes[1..];
                    if *seen == 2 {
                        self.code = Some(u16::from_be_bytes(*code));
                        self.done = true;
                    }
                }
            }
        }
    }
}

/// What follows the header `head` once it is whole: Some(Some(payload)) to
/// follow, Some(None) when there is nothing more to learn (the close frame
/// has no code, or the length is one tungstenite refuses). None while the
/// header is not whole yet.
fn after_header(head: &[u8]) -> Option<Option<Position>> {
    let second = *head.get(1)?;
    let extended = match second & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask_at = 2 + extended;
    let masked = second & 0x80 != 0;
    let whole = mask_at + if masked { 4 } else { 0 };
    if head.len() < whole {
        return None;
    }
    let left = match extended {
        0 => u64::from(second & 0x7F),
        _ => head[2..mask_at]
            .iter()
            .fold(0u64, |n, &b| (n << 8) | u64::from(b)),
    };
    let mut mask = [0; 4];
    if masked {
        mask.copy_from_slice(&head[mask_at..whole]);
    }
    let close = head[0] & 0x0F == 0x8;
    Some(match (close, left) {
        (true, 0 | 1) => None,
        (_, left) if left >> 63 == 1 => None,
        (true, left) => Some(Position::Payload {
            left,
            close: Some((mask, [0; 2], 0)),
        }),
        (false, 0) => Some(Position::default()),
        (false, left) => Some(Position::Payload { left, close: None }),
    })
}

/// Text output to text messages: one a line, without its newline (nor a
/// carriage return before it). Bytes that are not UTF-8 become U+FFFD; a
/// line longer than `max` goes out in pieces of at most `max` bytes.
pub struct Lines<'w> {
    pub wire: &'w mut Wire,
    pub partial: &'w mut Vec<u8>,
    pub max: usize,
    pub budget: &'w mut u64,
}

impl Lines<'_> {
    /// One read of output, of at most `limit` bytes, framed. Ok(0) at
    /// end-of-file. The buffer is on the stack of this plain function, not
    /// in the session.
    pub fn read(&mut self, fd: &OwnedFd, limit: usize) -> Result<usize, Errno> {
        let mut buf = [0u8; TEXT_READ];
        let n = retry(|| nix::unistd::read(fd, &mut buf[..limit.min(TEXT_READ)]))?;
        self.split(&buf[..n]);
        Ok(n)
    }

    fn split(&mut self, mut data: &[u8]) {
        while let Some(at) = data.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                self.message(&data[..at]);
            } else {
                let mut line = std::mem::take(self.partial);
                line.extend_from_slice(&data[..at]);
                self.message(&line);
                line.clear();
                *self.partial = line;
            }
            data = &data[at + 1..];
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() > self.max {
            // A line this long goes out in pieces, so memory stays bounded.
            let whole = std::mem::take(self.partial);
            let keep = whole.len() % self.max;
            let (out, rest) = whole.split_at(whole.len() - keep);
            self.message(out);
            self.partial.extend_from_slice(rest);
        }
        if self.partial.is_empty() && self.partial.capacity() > KEEP {
            *self.partial = Vec::new();
        }
    }

    /// One line out, as one message or (longer than `max`) several.
    pub fn message(&mut self, line: &[u8]) {
        if *self.budget == 0 {
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = String::from_utf8_lossy(line);
        let mut text: &str = &text;
        if text.len() as u64 > *self.budget {
            text = &text[..floor_char(text, clamp(*self.budget))];
        }
        *self.budget -= text.len() as u64;
        loop {
            let cut = match floor_char(text, self.max) {
                // A character longer than `max` goes whole.
                0 => text.chars().next().map_or(0, char::len_utf8),
                cut => cut,
            };
            let (piece, rest) = text.split_at(cut);
            self.wire.frame(TEXT, piece.as_bytes());
            if rest.is_empty() {
                return;
            }
            text = rest;
        }
    }
}

/// The largest character boundary of `text` at or below `at`.
fn floor_char(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    (0..=at)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

pub fn clamp(budget: u64) -> usize {
    usize::try_from(budget).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    fn lines(input: &[&[u8]], max: usize, budget: u64) -> (Vec<Vec<u8>>, u64) {
        let mut wire = Wire::default();
        let mut partial = Vec::new();
        let mut left = budget;
        let mut l = Lines {
            wire: &mut wire,
            partial: &mut partial,
            max,
            budget: &mut left,
        };
        for chunk in input {
            l.split(chunk);
        }
        if !partial.is_empty() {
            let last = std::mem::take(&mut partial);
            Lines {
                wire: &mut wire,
                partial: &mut partial,
                max,
                budget: &mut left,
            }
            .message(&last);
        }
        (frames(&wire.bytes), left)
    }

    /// Decodes server frames (final, unmasked) into their payloads.
    fn frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], 0x80 | TEXT);
            let (len, skip) = match bytes[1] {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            out.push(bytes[skip..skip + len].to_vec());
            bytes = &bytes[skip + len..];
        }
        out
    }

    #[test]
    fn each_line_is_a_message_however_the_output_is_cut() {
        let (got, _) = lines(&[b"one\ntw", b"o\r\n\nthr", b"ee"], 1 << 20, u64::MAX);
        let want: Vec<&[u8]> = vec![b"one", b"two", b"", b"three"];
        assert_eq!(got, want);
    }

    #[test]
    fn long_lines_are_split_and_bad_utf8_is_replaced() {
        let (got, _) = lines(&[b"abcdefghij\n"], 4, u64::MAX);
        let want: Vec<&[u8]> = vec![b"abcd", b"efgh", b"ij"];
        assert_eq!(got, want);
        let (got, _) = lines(&["\u{e9}\u{e9}\u{e9}\n".as_bytes()], 3, u64::MAX);
        assert_eq!(
            got,
            vec!["\u{e9}".as_bytes(); 3],
            "cut at a character's start"
        );
        let (got, _) = lines(&[b"a\xffb\n"], 100, u64::MAX);
        assert_eq!(got, vec!["a\u{fffd}b".as_bytes()]);
    }

    #[test]
    fn max_bytes_cuts_the_payload() {
        let (got, left) = lines(&[b"hello\nworld\n"], 100, 7);
        let want: Vec<&[u8]> = vec![b"hello", b"wo"];
        assert_eq!(got, want);
        assert_eq!(left, 0);
    }

    /// A client frame, masked with `mask` (None: unmasked).
    fn client_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = Vec::new();
        header(opcode, payload.len(), &mut out);
        match mask {
            Some(key) => {
                out[1] |= 0x80;
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    #[test]
    fn the_clients_close_code_is_found_however_its_bytes_are_cut() {
        let mask = Some([0x12, 0x34, 0x56, 0x78]);
        let mut stream = client_frame(TEXT, &[b'x'; 200], mask);
        stream.extend(client_frame(0x9, b"ping", mask));
        stream.extend(client_frame(BINARY, &[0; 70_000], mask));
        stream.extend(client_frame(0x8, &[0x03, 0xe7, b'b', b'y', b'e'], mask));
        stream.extend(client_frame(0x8, &1000u16.to_be_bytes(), mask));
        for cut in [1, 2, 3, 7, 4096, stream.len()] {
            let mut watch = ClientClose::default();
            for piece in stream.chunks(cut) {
                watch.pass(piece);
            }
            assert_eq!(watch.code(), Some(999), "in pieces of {cut}");
        }
        let mut unmasked = ClientClose::default();
        unmasked.pass(&client_frame(0x8, &4000u16.to_be_bytes(), None));
        assert_eq!(unmasked.code(), Some(4000));
        // A close without a code, then nothing more is followed.
        let mut bare = ClientClose::default();
        bare.pass(&client_frame(0x8, b"", mask));
        bare.pass(&client_frame(0x8, &1000u16.to_be_bytes(), mask));
        assert_eq!(bare.code(), None);
    }

    #[test]
    fn a_compacted_wire_keeps_what_is_left_and_counts_it_right() {
        let mut wire = Wire::default();
        wire.frame(BINARY, &[1u8; 20_000]);
        wire.frame(TEXT, b"ab");
        let whole = wire.bytes.clone();
        wire.at = 15_000;
        wire.compact();
        assert_eq!(wire.bytes, whole[15_000..]);
        assert!(wire.bytes.capacity() < whole.len());
        let (c, d) = std::os::unix::net::UnixStream::pair().unwrap();
        let stats = Arc::new(crate::record::Stats::default());
        let record = crate::record::Record::open(1, "s".into(), stats);
        let c = OwnedFd::from(c);
        while !wire.is_empty() {
            wire.write(&c, &c, record.traffic()).unwrap();
        }
        assert_eq!(record.traffic().messages(), (2, 0));
        assert_eq!(record.traffic().bytes_sent(), 20_002);
        let mut got = vec![0u8; whole.len() - 15_000];
        (&d).read_exact(&mut got).unwrap();
        assert_eq!(got, whole[15_000..]);

        let mut written = Wire::default();
        written.frame(BINARY, &[1u8; 20_000]);
        while !written.is_empty() {
            written.write(&c, &c, record.traffic()).unwrap();
        }
        written.compact();
        assert_eq!(written.bytes.capacity(), 0, "all written: nothing kept");
    }

    #[test]
    fn headers_take_the_shortest_form() {
        for (len, size) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            header(BINARY, len, &mut out);
            assert_eq!(out.len(), size, "{len}");
            assert_eq!(out[0], 0x82);
        }
    }

    #[tokio::test]
    async fn binary_frames_from_a_socket_pair_carry_what_was_read() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (c, d) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (&a).write_all(&[7u8; 300]).unwrap();
        let mut wire = Wire::default();
        assert_eq!(wire.read_binary(&OwnedFd::from(b), 1000), Ok(300));
        let stats = Arc::new(crate::record::Stats::default());
        let record = crate::record::Record::open(1, "s".into(), stats);
        let (c, d) = (OwnedFd::from(c), d);
        while !wire.is_empty() {
            wire.write(&c, &c, record.traffic()).unwrap();
        }
        assert_eq!(record.traffic().bytes_sent(), 300);
        assert_eq!(record.traffic().messages(), (1, 0));
        let mut got = vec![0u8; 304];
        (&d).read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &[0x82, 126, 1, 44]);
        assert!(got[4..].iter().all(|&b| b == 7));
    }
}
