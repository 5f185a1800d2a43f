//! The benchmark's WebSocket client: as little as a client can do, so that
//! the servers are measured, not it. It upgrades, reads server frames
//! (unmasked) through a large buffer, answers pings and the close, and
//! sends nothing else.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
const PING: u8 = 0x9;
const CLOSE: u8 = 0x8;

/// One WebSocket connection, upgraded.
pub struct Ws {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// A scratch buffer for payloads that are only counted.
    scratch: Vec<u8>,
}

/// A data frame's opcode (0 for a continuation), whether it ends its
/// message, and its payload's length.
pub struct Frame {
    pub opcode: u8,
    pub fin: bool,
    pub len: usize,
}

impl Ws {
    /// Upgrades `stream` (GET / of the server at `host`).
    pub fn upgrade(stream: TcpStream, host: &str) -> io::Result<Ws> {
        let mut writer = stream.try_clone()?;
        writer.write_all(
            format!(
                "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )?;
        let mut reader = BufReader::with_capacity(1 << 20, stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 101") {
            return Err(io::Error::other(format!("not upgraded: {line:?}")));
        }
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(io::Error::other("the answer ended in its headers"));
            }
            if line == "\r\n" {
                break;
            }
        }
        Ok(Ws {
            reader,
            writer,
            scratch: vec![0u8; 1 << 20],
        })
    }

    /// The next data frame, its payload read into `keep` if given (else
    /// dropped); None once the server has closed (a close frame answered,
    /// or end-of-file). Pings are answered on the way.
    pub fn next(&mut self, mut keep: Option<&mut Vec<u8>>) -> io::Result<Option<Frame>> {
        loop {
            let mut head = [0u8; 2];
            match self.reader.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
            let opcode = head[0] & 0x0f;
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.reader.read_exact(&mut b)?;
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.reader.read_exact(&mut b)?;
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            if opcode >= 0x8 {
                let mut payload = vec![0u8; len];
                self.reader.read_exact(&mut payload)?;
                match opcode {
                    PING => self.send(0xA, &payload)?,
                    CLOSE => {
                        let code = payload.get(..2).unwrap_or(&[0x03, 0xe8]).to_vec();
                        let _ = self.send(CLOSE, &code);
                        let _ = io::copy(&mut self.reader, &mut io::sink());
                        return Ok(None);
                    }
                    _ => {}
                }
                continue;
            }
            match keep.as_deref_mut() {
                Some(out) => {
                    out.clear();
                    out.resize(len, 0);
                    self.reader.read_exact(out)?;
                }
                None => {
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(self.scratch.len());
                        self.reader.read_exact(&mut self.scratch[..n])?;
                        left -= n;
                    }
                }
            }
            let fin = head[0] & 0x80 != 0;
            return Ok(Some(Frame { opcode, fin, len }));
        }
    }

    /// Sends a masked frame (the mask is all zeros: the benchmark's payloads
    /// are not secret, and XOR with zero costs nothing to either side).
    fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        self.writer.write_all(&frame)
    }

    /// Closes with 1000 and leaves without waiting.
    pub fn close(mut self) {
        let _ = self.send(CLOSE, &[0x03, 0xe8]);
    }
}

/// The text messages of a connection, as lines.
pub struct Messages(pub Ws);

impl Iterator for Messages {
    type Item = io::Result<String>;

    fn next(&mut self) -> Option<io::Result<String>> {
        let mut payload = Vec::new();
        match self.0.next(Some(&mut payload)) {
            Ok(Some(frame)) if frame.opcode != TEXT => {
                Some(Err(io::Error::other("not a text message")))
            }
            Ok(Some(_)) => Some(Ok(String::from_utf8_lossy(&payload).into_owned())),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}
