//! A framed client's bytes on their way to the command's stdin (WebSocket
//! messages, an HTTP request's body): kept until the command takes them,
//! written as its stdin has room, and dropped once it has closed it.

use std::io;
use std::os::fd::OwnedFd;

use nix::errno::Errno;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

use super::Input;
use crate::end::End;
use crate::fdio::{self, Class};

/// A buffer larger than this is freed once drained, so idle sessions hold little.
const KEEP: usize = 16 * 1024;

/// Bytes for the command's stdin.
pub struct Inbox {
    bytes: Vec<u8>,
    /// How much of `bytes` is written.
    at: usize,
    /// Whether the command takes them (its stdin is the client's, and open).
    feeding: bool,
}

impl Inbox {
    /// An inbox for `input` (nothing is kept for a command without one).
    pub fn new(input: &Input) -> Inbox {
        Inbox {
            bytes: Vec::new(),
            at: 0,
            feeding: !matches!(input, Input::Null),
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.bytes.len() - self.at
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps `bytes` for the command, if it takes any.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.feeding {
            self.bytes.extend_from_slice(bytes);
        }
    }

    /// Where bytes for the command may be appended (decoded straight into
    /// the inbox): None if it takes none.
    pub fn sink(&mut self) -> Option<&mut Vec<u8>> {
        self.feeding.then_some(&mut self.bytes)
    }

    /// Where `input` takes what waits: None while nothing does.
    pub fn stdin<'a>(
        &self,
        input: &'a Input,
        output: &'a AsyncFd<OwnedFd>,
    ) -> Option<&'a AsyncFd<OwnedFd>> {
        input.fd(output).filter(|_| !self.is_empty())
    }

    /// Writes what waits to the command's stdin, reported `ready`; false
    /// once the command takes no more (it closed its stdin: what waits,
    /// and what comes later, is dropped).
    pub fn feed(&mut self, ready: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>) -> Result<bool, End> {
        let written = match ready {
            Ok(mut ready) => {
                match fdio::retry(|| nix::unistd::write(ready.get_inner(), &self.bytes[self.at..]))
                {
                    Err(Errno::EAGAIN) => {
                        ready.clear_ready();
                        return Ok(true);
                    }
                    other => other,
                }
            }
            Err(e) => Err(fdio::errno(&e)),
        };
        match written {
            Ok(n) => self.at += n,
            Err(e) if fdio::class(e) == Class::Disconnect => {
                self.feeding = false;
                self.at = self.bytes.len();
            }
            Err(e) => {
                return Err(End::Error(format!(
                    "writing to the command's stdin: {}",
                    e.desc()
                )))
            }
        }
        if self.at == self.bytes.len() {
            self.at = 0;
            self.bytes.clear();
            if self.bytes.capacity() > KEEP {
                self.bytes = Vec::new();
            }
        }
        Ok(self.feeding)
    }
}

/// Waits until `stdin` (if any) takes bytes; never without one.
pub async fn writable(
    stdin: Option<&AsyncFd<OwnedFd>>,
) -> io::Result<AsyncFdReadyGuard<'_, OwnedFd>> {
    match stdin {
        Some(stdin) => stdin.writable().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large buffer is given back once the command has taken all of it,
    /// so that a session that once received much holds little when idle.
    #[tokio::test]
    async fn a_large_buffer_is_freed_once_drained() {
        let (out_r, _out_w) = nix::unistd::pipe().unwrap();
        let output = fdio::register(out_r, tokio::io::Interest::READABLE).unwrap();
        let (_in_r, in_w) = nix::unistd::pipe().unwrap();
        fdio::set_nonblocking(&in_w, true).unwrap();
        let input = Input::Pipe(fdio::register(in_w, tokio::io::Interest::WRITABLE).unwrap());
        let mut inbox = Inbox::new(&input);
        inbox.push(&[b'x'; 2 * KEEP]);
        while !inbox.is_empty() {
            let fd = inbox.stdin(&input, &output).unwrap();
            assert_eq!(inbox.feed(fd.writable().await), Ok(true));
        }
        assert_eq!(inbox.bytes.capacity(), 0);
        // A small one is kept for the next bytes.
        inbox.push(b"small");
        let fd = inbox.stdin(&input, &output).unwrap();
        assert_eq!(inbox.feed(fd.writable().await), Ok(true));
        assert!(inbox.is_empty() && inbox.bytes.capacity() > 0);
    }

    #[tokio::test]
    async fn what_waits_is_written_and_dropped_once_stdin_is_closed() {
        let register = |fd, interest| fdio::register(fd, interest).unwrap();
        let (out_r, _out_w) = nix::unistd::pipe().unwrap();
        let output = register(out_r, tokio::io::Interest::READABLE);
        let (in_r, in_w) = nix::unistd::pipe().unwrap();
        fdio::set_nonblocking(&in_w, true).unwrap();
        let input = Input::Pipe(register(in_w, tokio::io::Interest::WRITABLE));
        let mut inbox = Inbox::new(&input);
        inbox.push(b"hello");
        assert_eq!(inbox.len(), 5);
        let fd = inbox.stdin(&input, &output).unwrap();
        assert_eq!(inbox.feed(fd.writable().await), Ok(true));
        assert!(inbox.is_empty() && inbox.stdin(&input, &output).is_none());
        let mut got = [0u8; 8];
        assert_eq!(nix::unistd::read(&in_r, &mut got), Ok(5));
        drop(in_r);
        inbox.push(b"more");
        let fd = inbox.stdin(&input, &output).unwrap();
        assert_eq!(
            inbox.feed(fd.writable().await),
            Ok(false),
            "the command closed its stdin"
        );
        inbox.push(b"later");
        assert!(inbox.is_empty(), "dropped once the command takes no more");
        assert!(Inbox::new(&Input::Null)
            .stdin(&Input::Null, &output)
            .is_none());
    }
}
