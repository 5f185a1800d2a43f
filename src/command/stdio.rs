//! The command's standard streams: what it gets as descriptors 0, 1 and 2,
//! and the daemon's ends of them.
//!
//! Every end is close-on-exec: the child's dup2 onto 0/1/2 clears the flag on
//! the copy the command gets, and no other connection's command inherits
//! them. The command's ends stay blocking: a plain write(2) must never see
//! EAGAIN. The daemon's ends are nonblocking and join the event loop.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::LazyLock;
use std::time::Duration;

use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::socket::{shutdown, socketpair, AddressFamily, Shutdown as How, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::pipe2;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::config::StdinMode;
use crate::episode::Throttle;
use crate::fdio;

/// What the command's stdin and stdout are.
#[derive(Clone, Copy)]
pub enum Io<'a> {
    /// stdout a pipe the daemon splices from (of `size` bytes); stdin
    /// /dev/null, or a pipe the daemon feeds the client's bytes into.
    Pipes { stdin: StdinMode, size: usize },
    /// stdout one end of a socket pair (and stdin too, with `stdin =
    /// "client"`, as inetd gives one socket for both), whose other end the
    /// daemon relays to and from the client.
    Socketpair { stdin: StdinMode },
    /// The client's socket itself (`transfer = "direct"`), already blocking.
    Socket(&'a OwnedFd),
}

/// The daemon's ends of the command's standard streams, registered with the
/// event loop.
pub enum Streams {
    /// The read end of stdout, and with `stdin = "client"` the write end of stdin.
    Pipes {
        stdout: AsyncFd<OwnedFd>,
        stdin: Option<AsyncFd<OwnedFd>>,
    },
    /// The daemon's end of the socket pair: the command's output comes from
    /// it, and with `stdin = "client"` its input goes to it.
    Socketpair {
        pair: AsyncFd<OwnedFd>,
        stdin: StdinMode,
    },
    /// The socket is the command's stdin and stdout; the daemon holds nothing.
    Socket,
}

/// How a relay reaches the command's stdin, beside its output.
pub enum Stdin {
    /// stdin is /dev/null.
    None,
    /// A pipe of its own.
    Pipe(AsyncFd<OwnedFd>),
    /// The socket pair the output comes from.
    Pair,
}

impl Streams {
    /// The command's output and its stdin, for a relay (None with the
    /// socket itself as the command's stdin and stdout).
    pub fn relayed(self) -> Option<(AsyncFd<OwnedFd>, Stdin)> {
        match self {
            Streams::Pipes { stdout, stdin } => {
                Some((stdout, stdin.map_or(Stdin::None, Stdin::Pipe)))
            }
            Streams::Socketpair { pair, stdin } => Some((
                pair,
                match stdin {
                    StdinMode::Client => Stdin::Pair,
                    StdinMode::Null => Stdin::None,
                },
            )),
            Streams::Socket => None,
        }
    }
}

impl Stdin {
    /// Where the client's bytes go, `output` being the command's output.
    pub fn input(self, output: &AsyncFd<OwnedFd>) -> Option<Input<'_>> {
        match self {
            Stdin::None => None,
            Stdin::Pipe(pipe) => Some(Input::Pipe(pipe)),
            Stdin::Pair => Some(Input::Pair(output)),
        }
    }
}

/// The command's ends, until the spawn.
pub struct Theirs {
    stdin: OwnedFd,
    /// None when stdout is the same descriptor as stdin.
    stdout: Option<OwnedFd>,
    stderr: OwnedFd,
}

/// The daemon's ends, before they join the event loop.
pub struct Ours {
    stderr: OwnedFd,
    streams: Unregistered,
}

enum Unregistered {
    Pipes {
        stdout: OwnedFd,
        stdin: Option<OwnedFd>,
    },
    Socketpair {
        pair: OwnedFd,
        stdin: StdinMode,
    },
    Socket,
}

/// Opens the command's streams for `io`.
pub fn open_streams(io: Io<'_>) -> io::Result<(Theirs, Ours)> {
    let (err_r, err_w) = pipe()?;
    fdio::set_nonblocking(&err_r, true)?;
    let (theirs_in, theirs_out, streams) = match io {
        Io::Socket(socket) => (socket.try_clone()?, None, Unregistered::Socket),
        Io::Pipes { stdin, size } => {
            let (out_r, out_w) = pipe()?;
            set_pipe_size(&out_w, size);
            fdio::set_nonblocking(&out_r, true)?;
            let (theirs, ours) = match stdin {
                StdinMode::Null => (dev_null()?, None),
                StdinMode::Client => {
                    let (r, w) = pipe()?;
                    fdio::set_nonblocking(&w, true)?;
                    (r, Some(w))
                }
            };
            let streams = Unregistered::Pipes {
                stdout: out_r,
                stdin: ours,
            };
            (theirs, Some(out_w), streams)
        }
        Io::Socketpair { stdin } => {
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| described(e, "cannot create the command's socket pair"))?;
            fdio::set_nonblocking(&ours, true)?;
            // The kernel's default buffer (net.core.wmem_default) is kept:
            // measured, a larger one holds more data in flight than the
            // caches do, and every copy after it is slower (bench/, docs/performance.md).
            let streams = Unregistered::Socketpair { pair: ours, stdin };
            match stdin {
                StdinMode::Null => (dev_null()?, Some(theirs), streams),
                StdinMode::Client => (theirs, None, streams),
            }
        }
    };
    let theirs = Theirs {
        stdin: theirs_in,
        stdout: theirs_out,
        stderr: err_w,
    };
    Ok((
        theirs,
        Ours {
            stderr: err_r,
            streams,
        },
    ))
}

impl Theirs {
    /// Descriptors 0, 1 and 2 of the command.
    pub fn fds(&self) -> [BorrowedFd<'_>; 3] {
        let stdout = self.stdout.as_ref().unwrap_or(&self.stdin);
        [self.stdin.as_fd(), stdout.as_fd(), self.stderr.as_fd()]
    }
}

impl Ours {
    /// Registers the daemon's ends with the event loop: stderr, and the streams.
    pub fn register(self) -> io::Result<(AsyncFd<OwnedFd>, Streams)> {
        let stderr = fdio::register(self.stderr, Interest::READABLE)?;
        let streams = match self.streams {
            Unregistered::Pipes { stdout, stdin } => Streams::Pipes {
                stdout: fdio::register(stdout, Interest::READABLE)?,
                stdin: stdin
                    .map(|fd| fdio::register(fd, Interest::WRITABLE))
                    .transpose()?,
            },
            Unregistered::Socketpair { pair, stdin } => Streams::Socketpair {
                pair: fdio::register(pair, Interest::READABLE | Interest::WRITABLE)?,
                stdin,
            },
            Unregistered::Socket => Streams::Socket,
        };
        Ok((stderr, streams))
    }
}

fn dev_null() -> io::Result<OwnedFd> {
    open(
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
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {}", e.desc()))
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

/// The daemon's end of the command's stdin, where the client's bytes (or
/// messages) go. Dropping it is the command's end-of-file.
pub enum Input<'a> {
    /// A pipe of its own, closed when dropped.
    Pipe(AsyncFd<OwnedFd>),
    /// The daemon's end of the command's socket pair, shut down for
    /// writing when dropped.
    Pair(&'a AsyncFd<OwnedFd>),
}

impl Input<'_> {
    pub fn fd(&self) -> &AsyncFd<OwnedFd> {
        match self {
            Input::Pipe(fd) => fd,
            Input::Pair(fd) => fd,
        }
    }
}

impl Drop for Input<'_> {
    fn drop(&mut self) {
        if let Input::Pair(pair) = self {
            let _ = shutdown(pair.get_ref().as_raw_fd(), How::Write);
        }
    }
}
