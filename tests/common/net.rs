//! Clients: connecting, reading to the end (a reset included), leaving with
//! a reset, and many clients at once.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::PATIENCE;

/// Connects, with reads bounded by [`PATIENCE`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// Connects, trying up to `tries` times: a failed attempt is the client's
/// count, not the test's failure.
pub fn connect_retrying(addr: SocketAddr, tries: usize) -> std::io::Result<TcpStream> {
    let mut last = None;
    for _ in 0..tries {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one try"))
}

/// Connects and reads until end-of-file.
pub fn fetch(addr: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    connect(addr)
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
    out
}

pub fn fetch_text(addr: SocketAddr) -> String {
    String::from_utf8(fetch(addr)).unwrap()
}

/// Reads until end-of-file or an error; returns what came before it, and
/// the error.
pub fn read_until_end(s: &mut impl Read) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Reads until end-of-file; a reset counts as the end (a daemon that ends a
/// connection with input unread resets it), any other error fails.
pub fn read_all(mut s: impl Read) -> Vec<u8> {
    match read_until_end(&mut s) {
        (out, None) => out,
        (out, Some(e)) if e.kind() == ErrorKind::ConnectionReset => out,
        (out, Some(e)) => panic!("read after {} bytes: {e}", out.len()),
    }
}

/// One read, again if a signal cuts it short; panics on an error.
pub fn read_some(mut s: impl Read, buf: &mut [u8]) -> usize {
    loop {
        match s.read(buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Reads one line a byte at a time, so nothing after it is taken from the
/// socket; "" at end-of-file.
pub fn read_line(s: &mut impl Read) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {}
            // A signal to the test's process (a child's SIGCHLD) may cut a read short.
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!(
                "reading a line after {:?}: {e}",
                String::from_utf8_lossy(&line)
            ),
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

/// SO_LINGER 0: closing `s` sends a reset instead of a FIN.
pub fn reset_on_close(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, sockopt::Linger, &linger).unwrap();
}

/// True if the client has nothing to read yet (not served, not closed).
pub fn nothing_yet(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let idle = matches!(s.peek(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    idle
}

/// Runs `job(0)` to `job(jobs - 1)` on `threads` threads, each taking the
/// next job when it is done with one; returns the results in job order. A
/// panic in a job fails the caller with the job's own message. The threads
/// are scoped, so a job may borrow (the daemon, an address).
pub fn fan_out<T, F>(threads: usize, jobs: usize, job: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    let next = AtomicUsize::new(0);
    let mut all: Vec<(usize, T)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= jobs {
                            return done;
                        }
                        done.push((i, job(i)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}
