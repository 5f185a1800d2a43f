//! Descriptor I/O that every module moving bytes shares: waiting for
//! readiness, what an errno means, and a descriptor's blocking mode.
//!
//! Every nonblocking call goes through [`read_with`] or [`write_with`]: wait
//! until the event loop reports the descriptor ready, make the call, and on
//! `EAGAIN` let tokio clear the readiness (`try_io`) and wait again; `EINTR`
//! is retried at once. What any other errno means is decided in one place,
//! [`class`]. (The splice loop is the exception that proves the rule: one
//! splice touches two descriptors, and `EAGAIN` does not say which one
//! blocked; see `relay`.)

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::Interest;

/// What an errno from a connection's descriptors means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The peer, or the path to it, is gone: the connection ends, nothing
    /// is broken (`EPIPE`, `ECONNRESET`, `ETIMEDOUT`, unreachable, and what
    /// accept(2) reports for a connection that failed in the backlog).
    Disconnect,
    /// Try again: `EAGAIN` (wait for readiness) or `EINTR` (at once).
    Transient,
    /// Out of descriptors, buffers or memory: more attempts right now fail too.
    Exhausted,
    /// Anything else: logged, and the one connection (never the daemon) ends.
    Other,
}

/// The one errno classification of the daemon.
pub fn class(e: Errno) -> Class {
    match e {
        Errno::EPIPE
        | Errno::ECONNRESET
        | Errno::ECONNABORTED
        | Errno::ETIMEDOUT
        | Errno::EHOSTUNREACH
        | Errno::ENETUNREACH
        | Errno::EHOSTDOWN
        | Errno::ENETDOWN
        | Errno::ENONET
        // accept(2) passes these on from the pending connection (its man
        // page asks callers to treat them like EAGAIN): its own failure.
        | Errno::EPROTO
        // A TLS record that does not verify, from the kernel's TLS.
        | Errno::EBADMSG
        | Errno::ENOPROTOOPT
        | Errno::EOPNOTSUPP
        | Errno::EPERM => Class::Disconnect,
        Errno::EAGAIN | Errno::EINTR => Class::Transient,
        Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM => Class::Exhausted,
        _ => Class::Other,
    }
}

/// The errno inside an `io::Error` (`EIO` for errors that carry none).
pub fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

/// An io::Error's text without std's "(os error N)" suffix, for messages
/// such as `/usr/bin/foo: No such file or directory`.
pub fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

/// Registers a descriptor with the event loop. Must run inside the runtime.
pub fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    crate::sys::register(fd, interest)
}

/// Runs `op` once `fd` is readable, waiting again whenever it says `EAGAIN`.
pub async fn read_with<R>(
    fd: &AsyncFd<OwnedFd>,
    op: impl FnMut(&OwnedFd) -> nix::Result<R>,
) -> Result<R, Errno> {
    when_ready(fd, Interest::READABLE, op).await
}

/// Runs `op` once `fd` is writable, waiting again whenever it says `EAGAIN`.
pub async fn write_with<R>(
    fd: &AsyncFd<OwnedFd>,
    op: impl FnMut(&OwnedFd) -> nix::Result<R>,
) -> Result<R, Errno> {
    when_ready(fd, Interest::WRITABLE, op).await
}

async fn when_ready<R>(
    fd: &AsyncFd<OwnedFd>,
    interest: Interest,
    mut op: impl FnMut(&OwnedFd) -> nix::Result<R>,
) -> Result<R, Errno> {
    loop {
        let mut ready = fd.ready(interest).await.map_err(|e| errno(&e))?;
        let done = ready.try_io(|inner| loop {
            match op(inner.get_ref()) {
                Err(Errno::EINTR) => continue,
                other => break other.map_err(io::Error::from),
            }
        });
        // Err: EAGAIN; try_io has cleared the readiness, so wait for the next edge.
        if let Ok(result) = done {
            return result.map_err(|e| errno(&e));
        }
    }
}

/// Runs `op` again while it says EINTR.
pub fn retry<R>(mut op: impl FnMut() -> nix::Result<R>) -> nix::Result<R> {
    loop {
        match op() {
            Err(Errno::EINTR) => {}
            other => return other,
        }
    }
}

/// One read(2), where a client's socket may be the kernel's TLS (kTLS): a
/// record that is not data makes the read say EIO, and is then read and
/// taken for what it means. The client's close_notify is end-of-file;
/// another alert is its end (ECONNRESET); a handshake message (a TLS 1.3
/// KeyUpdate, which these kernels cannot take) is answered with an alert
/// and ends the connection (EPROTO), with a warning that says why.
pub fn read(fd: &OwnedFd, buf: &mut [u8]) -> nix::Result<usize> {
    match nix::unistd::read(fd, buf) {
        Err(Errno::EIO) => match control_record(fd.as_fd()) {
            Ok(Control::CloseNotify) => Ok(0),
            Ok(Control::Alert) => Err(Errno::ECONNRESET),
            Ok(Control::Handshake) => {
                tracing::warn!(
                    "a TLS client sent a handshake message (a key update), which the kernel's TLS \
                     cannot take before Linux 6.14: its connection is ended"
                );
                Err(Errno::EPROTO)
            }
            Err(e) => Err(e),
        },
        other => other,
    }
}

/// A kTLS record that is not data.
enum Control {
    CloseNotify,
    Alert,
    Handshake,
}

/// After a read of a kTLS socket said EIO: reads the record that is not
/// data and says what it was. Err(EIO) when there is none (a real I/O
/// error, or not a kTLS socket).
fn control_record(fd: BorrowedFd<'_>) -> Result<Control, Errno> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, TlsGetRecordType};
    let mut payload = [0u8; 64];
    let mut iov = [io::IoSliceMut::new(&mut payload)];
    let mut space = nix::cmsg_space!(u8);
    let (kind, len) = {
        let msg = recvmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(|_| Errno::EIO)?;
        let kind = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|m| match m {
                ControlMessageOwned::TlsGetRecordType(t) => Some(t),
                _ => None,
            })
        });
        (kind, msg.bytes)
    };
    match kind {
        Some(TlsGetRecordType::Alert) if len >= 2 && payload[1] == 0 => Ok(Control::CloseNotify),
        Some(TlsGetRecordType::Alert) if len >= 2 => Ok(Control::Alert),
        Some(TlsGetRecordType::Handshake) => {
            // A fatal unexpected_message: this kernel cannot rekey.
            let _ = crate::sys::send_alert(fd, 2, 10);
            Ok(Control::Handshake)
        }
        _ => Err(Errno::EIO),
    }
}

/// Shuts our side of a client's socket down for writing; on a kTLS socket,
/// after the close_notify that the kernel does not send itself.
pub fn end_output(fd: impl AsFd) {
    let fd = fd.as_fd();
    if crate::sys::is_ktls(fd) {
        let _ = crate::sys::send_alert(fd, 1, 0);
    }
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        nix::sys::socket::Shutdown::Write,
    );
}

/// Writes all of `bytes`, calling `sent` after each write with its length.
pub async fn write_all(
    fd: &AsyncFd<OwnedFd>,
    bytes: &[u8],
    mut sent: impl FnMut(usize),
) -> Result<(), Errno> {
    let mut done = 0;
    while done < bytes.len() {
        let n = write_with(fd, |fd| nix::unistd::write(fd, &bytes[done..])).await?;
        done += n;
        sent(n);
    }
    Ok(())
}

/// What a destination takes now: its free space, as the kernel counts it.
/// Reading no more from a source than its destination takes keeps what a
/// slow reader cannot take yet in the kernel's buffers, where it holds the
/// writer back, and not in the daemon's memory.
///
/// `known` is a lower bound of the room, kept without asking the kernel
/// again: room only grows as the reader takes bytes, and shrinks by what is
/// written. The kernel is asked when more is wanted than is known to fit.
pub struct Room {
    kind: RoomKind,
    known: usize,
    /// What the last read wanted room for: what a wait for room waits for.
    want: usize,
}

enum RoomKind {
    /// A socket (TCP, kTLS or Unix): its send buffer less what it holds,
    /// as the kernel counts them when it takes a write (`sys::send_room`;
    /// for TCP the buffer is the one the kernel tunes as it goes).
    Socket,
    /// A pipe of this capacity: less what is in it (FIONREAD).
    Pipe(usize),
    /// Neither: no bound.
    Unknown,
}

/// What is read when the kernel reports room that the count does not see
/// (its overhead and the count's differ): a write takes at least this much
/// of a writable socket or pipe.
const ROOM_FLOOR: usize = 4096;

/// Room worth a read. With less (and less than is wanted), a read waits
/// until the kernel reports the destination writable, as a write that
/// found it full would: reading each crumb of room as it frees would move
/// the same bytes in many more, smaller calls.
const ROOM_LOW: usize = 64 * 1024;

impl Room {
    /// The room of `fd`, whatever it is.
    pub fn of(fd: &OwnedFd) -> Room {
        let kind = if crate::sys::send_room(fd.as_fd()).is_ok() {
            RoomKind::Socket
        } else if let Ok(size) = fcntl(fd.as_fd(), FcntlArg::F_GETPIPE_SZ) {
            RoomKind::Pipe(usize::try_from(size).unwrap_or(0))
        } else {
            RoomKind::Unknown
        };
        Room {
            kind,
            known: 0,
            want: 1,
        }
    }

    /// The room of `fd` now, at least as much as `want` when it has that
    /// much; 0 when it is full.
    pub fn now(&mut self, fd: &OwnedFd, want: usize) -> usize {
        if self.known < want {
            self.known = match self.kind {
                RoomKind::Socket => crate::sys::send_room(fd.as_fd()).unwrap_or(0),
                RoomKind::Pipe(size) => {
                    size.saturating_sub(crate::sys::readable_bytes(fd.as_fd()).unwrap_or(0))
                }
                RoomKind::Unknown => usize::MAX,
            };
        }
        self.known
    }

    /// `n` bytes were written.
    pub fn took(&mut self, n: usize) {
        self.known = self.known.saturating_sub(n);
    }

    /// A write was cut short: the destination is full for now.
    pub fn full(&mut self) {
        self.known = 0;
    }

    /// The room of `fd` for a read of up to `want` bytes: what it has, if
    /// that is worth a read (`want`, or `ROOM_LOW`), or if the kernel
    /// reports it writable; else 0, and a wait for room waits for that much.
    pub fn for_read(&mut self, fd: &OwnedFd, want: usize) -> usize {
        self.want = want;
        let room = self.now(fd, want);
        if room >= want.min(ROOM_LOW) {
            return room;
        }
        if writable_now(fd) {
            // The kernel takes a write (or has an error for it), however
            // little room the count sees.
            self.known = room.max(ROOM_FLOOR);
            return self.known;
        }
        0
    }

    /// Waits until `fd` has room for a read of up to `want` bytes (as
    /// [`Room::for_read`] says), and says how much.
    pub async fn wait(&mut self, fd: &AsyncFd<OwnedFd>, want: usize) -> Result<usize, Errno> {
        self.want = want;
        loop {
            let mut ready = fd.writable().await.map_err(|e| errno(&e))?;
            if let Some(room) = self.reported(&mut ready) {
                return Ok(room);
            }
        }
    }

    /// After the event loop reported a destination writable: its room for
    /// the read [`Room::for_read`] last found no room for; or None, with
    /// the readiness cleared, so that waiting again waits for the kernel's
    /// next report (a report since the wait began survives the clear).
    /// (Asked for less than that read wants, it would find room that the
    /// read does not, and the two would go round without waiting.)
    pub fn reported(&mut self, ready: &mut AsyncFdReadyGuard<'_, OwnedFd>) -> Option<usize> {
        match self.for_read(ready.get_inner(), self.want) {
            0 => {
                ready.clear_ready();
                None
            }
            room => Some(room),
        }
    }
}

/// Whether poll(2) says `fd` takes a write now (or has an error or a
/// hang-up a write would report).
fn writable_now(fd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLOUT | PollFlags::POLLERR | PollFlags::POLLHUP)
        })
}

/// Reads and drops everything from `fd` until end-of-file, counting it. Used
/// on the client's socket when nothing consumes its bytes, so that a reset is
/// seen at once and unread bytes cannot turn the final close into a reset
/// that destroys output still in flight.
pub async fn discard(fd: &AsyncFd<OwnedFd>, mut counted: impl FnMut(usize)) -> Result<(), Errno> {
    loop {
        match read_with(fd, read_and_drop).await? {
            0 => return Ok(()),
            n => counted(n),
        }
    }
}

/// One read into a buffer on the stack of a plain function, not of the
/// future: every idle connection's future would otherwise carry it.
fn read_and_drop(fd: &OwnedFd) -> nix::Result<usize> {
    let mut buf = [0u8; 4096];
    read(fd, &mut buf)
}

/// The pending error of a socket (SO_ERROR); `ECONNRESET` when none is
/// pending (the socket reported an error condition that has since cleared).
pub fn socket_error(fd: &OwnedFd) -> Errno {
    use nix::sys::socket::{getsockopt, sockopt};
    match getsockopt(fd, sockopt::SocketError) {
        Ok(code) if code != 0 => Errno::from_raw(code),
        _ => Errno::ECONNRESET,
    }
}

/// Whether the other side of a pipe or socket is gone for good: no writer
/// is left (POLLHUP), so what it holds is all there will be.
pub fn hung_up(fd: impl AsFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

/// How often the kernel probes a client that sent its end (TCP keepalive):
/// the first probe this long after the last traffic, then at this interval.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before a client's host counts as gone.
const PROBES: u32 = 3;

/// Resolves when a client that has sent its end (end-of-file on its
/// socket) is gone for good, with the socket's error. A client that only
/// half-closed still reads, and its kernel answers the probes; one that
/// closed is forgotten by its kernel after its FIN timeout (60 s on
/// Linux), and the next probe is answered with a reset; a host that
/// vanished answers none (`PROBES` unanswered probes after the first `PROBE_INTERVAL` of quiet). A Unix socket says
/// so itself (POLLHUP once the peer has closed); it is looked at every
/// `PROBE_INTERVAL`. Never resolves for a socket pair whose other end
/// stays open.
pub async fn departed(socket: &AsyncFd<OwnedFd>) -> Errno {
    keep_alive(socket.get_ref());
    loop {
        if hung_up(socket.get_ref()) {
            return socket_error(socket.get_ref());
        }
        tokio::select! {
            _ = socket.ready(Interest::ERROR) => return socket_error(socket.get_ref()),
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

/// Turns on TCP keepalive probes at [`PROBE_INTERVAL`] (not a TCP socket:
/// nothing to do).
pub fn keep_alive(socket: &OwnedFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = PROBE_INTERVAL.as_secs() as u32;
    if setsockopt(socket, sockopt::TcpKeepIdle, &secs).is_ok() {
        let _ = setsockopt(socket, sockopt::TcpKeepInterval, &secs);
        let _ = setsockopt(socket, sockopt::TcpKeepCount, &PROBES);
        let _ = setsockopt(socket, sockopt::KeepAlive, &true);
    }
}

/// Sets or clears O_NONBLOCK. The flag belongs to the open file description,
/// so every duplicate of the descriptor shares it.
pub fn set_nonblocking(fd: impl AsFd, on: bool) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Makes sure descriptors 0, 1 and 2 are open (on /dev/null if not), so
/// that no descriptor the daemon opens later gets one of those numbers: the
/// child's dup2 onto 0–2 relies on it.
pub fn ensure_standard_fds() -> io::Result<()> {
    loop {
        let fd = nix::fcntl::open("/dev/null", OFlag::O_RDWR, nix::sys::stat::Mode::empty())
            .map_err(|e| io::Error::other(format!("cannot open /dev/null: {}", e.desc())))?;
        if std::os::fd::AsRawFd::as_raw_fd(&fd) > 2 {
            return Ok(());
        }
        // One of 0-2 was closed and now holds /dev/null: keep it open for
        // good, as that standard descriptor.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_errno_has_one_meaning() {
        assert_eq!(class(Errno::EPIPE), Class::Disconnect);
        assert_eq!(class(Errno::ECONNABORTED), Class::Disconnect);
        assert_eq!(class(Errno::EAGAIN), Class::Transient);
        assert_eq!(class(Errno::EMFILE), Class::Exhausted);
        assert_eq!(class(Errno::EBADF), Class::Other);
        assert_eq!(errno(&io::Error::other("x")), Errno::EIO);
    }

    #[test]
    fn a_pipe_without_writers_is_hung_up() {
        let (r, w) = nix::unistd::pipe().unwrap();
        assert!(!hung_up(&r));
        nix::unistd::write(&w, b"x").unwrap();
        drop(w);
        assert!(hung_up(&r), "with data left in it, too");
    }

    /// A wait for room waits for the room the read wanted: a destination
    /// with a little room (less than the read wants, and not writable by
    /// the kernel's measure) is not reported ready, or the read and the
    /// wait would go round without end.
    #[tokio::test]
    async fn a_wait_for_room_waits_for_what_the_read_wants() {
        use std::io::Read;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = register(ours.into(), Interest::WRITABLE).unwrap();
        drop(ours.writable().await.unwrap());
        let chunk = [0u8; 16 * 1024];
        while nix::unistd::write(ours.get_ref(), &chunk).is_ok() {}
        let mut taken = vec![0u8; chunk.len()];
        (&theirs).read_exact(&mut taken).unwrap();

        let mut room = Room::of(ours.get_ref());
        let little = room.now(ours.get_ref(), usize::MAX);
        assert!(little > 0 && little < ROOM_LOW, "{little} bytes of room");
        assert_eq!(
            room.for_read(ours.get_ref(), 1 << 20),
            0,
            "not worth a read"
        );
        let mut ready = ours.writable().await.unwrap();
        assert_eq!(room.reported(&mut ready), None, "the wait goes on");
        assert!(
            room.for_read(ours.get_ref(), 4096) > 0,
            "a smaller read fits"
        );
    }

    #[tokio::test]
    async fn reads_wait_for_readiness_and_see_end_of_file() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = register(a.into(), Interest::READABLE | Interest::WRITABLE).unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut b = b;
            b.write_all(&[7u8; 10_000]).unwrap();
        });
        let mut counted = 0;
        discard(&a, |n| counted += n).await.unwrap();
        writer.join().unwrap();
        assert_eq!(counted, 10_000);
    }
}
