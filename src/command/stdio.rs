//! The command's standard streams: what it gets as descriptors 0, 1 and 2,
//! and the daemon's ends of them ([`Streams`]).
//!
//! Every end is close-on-exec: the child's dup2 onto 0/1/2 clears the flag on
//! the copy the command gets, and no other connection's command inherits
//! them. The command's ends stay blocking: a plain write(2) must never see
//! EAGAIN. The daemon's ends are nonblocking and join the event loop as they
//! are made.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::LazyLock;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{shutdown, socketpair, AddressFamily, Shutdown as How, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::pipe2;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::SpawnError;
use crate::config::{Service, StdinMode, Transfer};
use crate::episode::Throttle;
use crate::fdio;

/// The daemon's ends of a relayed command's stdout and stdin.
pub struct Streams {
    /// Where the command's output comes from: the read end of its stdout
    /// pipe, or the daemon's end of its socket pair. Kept open until the
    /// command has ended: closed earlier, it would kill the command with
    /// SIGPIPE rather than the signals the end policy sends.
    pub output: AsyncFd<OwnedFd>,
    /// Where the client's bytes go.
    pub input: Input,
}

/// Where the client's bytes go, until the command's input ends.
pub enum Input {
    /// Nowhere: the command's stdin is /dev/null (or its input has ended).
    Null,
    /// The write end of the command's stdin pipe.
    Pipe(AsyncFd<OwnedFd>),
    /// The socket pair the output comes from, as inetd gives one socket for
    /// both.
    Pair,
}

impl Input {
    /// The descriptor the client's bytes are written to, `output` being the
    /// command's output; None when nothing takes them.
    pub fn fd<'a>(&'a self, output: &'a AsyncFd<OwnedFd>) -> Option<&'a AsyncFd<OwnedFd>> {
        match self {
            Input::Null => None,
            Input::Pipe(pipe) => Some(pipe),
            Input::Pair => Some(output),
        }
    }

    /// The command's input ends (the client half-closed, or the command
    /// closed its stdin): its pipe is closed, or the pair shut down for
    /// writing, so the command reads end-of-file.
    pub fn close(&mut self, output: &AsyncFd<OwnedFd>) {
        if let Input::Pair = self {
            let _ = shutdown(output.get_ref().as_raw_fd(), How::Write);
        }
        *self = Input::Null;
    }
}

/// A command's streams, made: the command's descriptors 0, 1 and 2, the
/// daemon's end of its stderr, and the daemon's ends of the rest (None with
/// `transfer = "direct"`: the command has the client's socket).
pub(super) struct Opened {
    pub child: [OwnedFd; 3],
    pub stderr: OwnedFd,
    pub streams: Option<Streams>,
}

/// Makes `service`'s streams. `socket` is the client's (plaintext) socket,
/// given to the command itself with `transfer = "direct"`: it is made
/// blocking, as programs expect (the flag belongs to the open file
/// description, shared with the daemon's copy, which is only polled).
pub(super) fn open(service: &Service, socket: &OwnedFd) -> Result<Opened, SpawnError> {
    let start = SpawnError::Start;
    let (stderr, err_w) = pipe().map_err(start)?;
    let (stdin, stdout, streams) = match service.transfer {
        Transfer::Direct => {
            fdio::set_nonblocking(socket, false).map_err(|e| start(e.into()))?;
            let copy = || socket.try_clone().map_err(start);
            (copy()?, copy()?, None)
        }
        Transfer::Splice | Transfer::Copy => {
            let (out_r, out_w) = pipe().map_err(start)?;
            set_pipe_size(&out_w, service.pipe_size);
            let (stdin, input) = match service.stdin {
                StdinMode::Null => (dev_null().map_err(start)?, Input::Null),
                StdinMode::Client => {
                    let (r, w) = pipe().map_err(start)?;
                    (r, Input::Pipe(registered(w, Interest::WRITABLE)?))
                }
            };
            let output = registered(out_r, Interest::READABLE)?;
            (stdin, out_w, Some(Streams { output, input }))
        }
        Transfer::Socketpair => {
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| start(described(e, "cannot create the command's socket pair")))?;
            // The kernel's default buffer (net.core.wmem_default) is kept:
            // measured, a larger one holds more data in flight than the
            // caches do, and every copy after it is slower (bench/, docs/performance.md).
            let output = registered(ours, Interest::READABLE | Interest::WRITABLE)?;
            let (stdin, input) = match service.stdin {
                StdinMode::Null => (dev_null().map_err(start)?, Input::Null),
                StdinMode::Client => (theirs.try_clone().map_err(start)?, Input::Pair),
            };
            (stdin, theirs, Some(Streams { output, input }))
        }
    };
    Ok(Opened {
        child: [stdin, stdout, err_w],
        stderr,
        streams,
    })
}

/// A shared command's streams: stdin /dev/null, stdout a pipe of
/// `pipe_size` whose reading end (the daemon's, returned) fans out.
pub(super) fn open_shared(service: &Service) -> Result<(Opened, AsyncFd<OwnedFd>), SpawnError> {
    let start = SpawnError::Start;
    let (stderr, err_w) = pipe().map_err(start)?;
    let (out_r, out_w) = pipe().map_err(start)?;
    set_pipe_size(&out_w, service.pipe_size);
    let output = registered(out_r, Interest::READABLE)?;
    let stdin = dev_null().map_err(start)?;
    let opened = Opened {
        child: [stdin, out_w, err_w],
        stderr,
        streams: None,
    };
    Ok((opened, output))
}

/// A client's pipe from a shared command's fan-out, of `size`: its reading
/// end (the connection's, as a command's stdout would be) and its writing
/// end (the fan-out's), both nonblocking, in the event loop.
pub fn client_pipe(size: usize) -> io::Result<(AsyncFd<OwnedFd>, AsyncFd<OwnedFd>)> {
    let (r, w) = pipe()?;
    set_pipe_size(&w, size);
    let unwatched = |e: SpawnError| match e {
        SpawnError::Start(e) | SpawnError::Unwatched(e) => e,
    };
    let r = registered(r, Interest::READABLE).map_err(unwatched)?;
    let w = registered(w, Interest::WRITABLE).map_err(unwatched)?;
    Ok((r, w))
}

/// The daemon's end of a stream, nonblocking, in the event loop.
fn registered(fd: OwnedFd, interest: Interest) -> Result<AsyncFd<OwnedFd>, SpawnError> {
    fdio::set_nonblocking(&fd, true).map_err(|e| SpawnError::Start(e.into()))?;
    fdio::register(fd, interest).map_err(SpawnError::Unwatched)
}

fn dev_null() -> io::Result<OwnedFd> {
    nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| described(e, "cannot open /dev/null"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(|e| described(e, "cannot create the command's pipes"))
}

fn described(e: nix::errno::Errno, what: &str) -> io::Error {
    super::described(e, format!("{what}: {}", e.desc()))
}

/// The kernel refused `pipe_size`: said at most once a minute, so that a
/// daemon that hovers at the pipe quota does not fill the journal.
static PIPE_REFUSED: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(Duration::from_secs(60)));

/// Grows the pipe to `size`. Where the kernel refuses (above
/// /proc/sys/fs/pipe-max-size, or over the per-user pipe quota,
/// fs.pipe-user-pages-soft), halves it down to 64 KiB; past that the pipe keeps
/// the size the kernel gave it (two pages over the quota) and still works.
fn set_pipe_size(fd: &OwnedFd, size: usize) {
    let mut want = size;
    let mut first_error = None;
    loop {
        let Ok(n) = i32::try_from(want) else {
            return;
        };
        match fcntl(fd.as_fd(), FcntlArg::F_SETPIPE_SZ(n)) {
            Ok(_) => break,
            Err(e) => {
                first_error.get_or_insert(e);
                if want <= 64 * 1024 {
                    break;
                }
                want /= 2;
            }
        }
    }
    if let Some(e) = first_error {
        if PIPE_REFUSED.ready() {
            let got = fcntl(fd.as_fd(), FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
            tracing::warn!(
                pipe_size = size,
                got,
                error = %e.desc(),
                "the kernel refuses pipes of pipe_size ({size} bytes; pipe-max-size or the per-user pipe quota); using smaller pipes ({got} bytes for this one); logged at most once a minute"
            );
        }
    }
}
