//! Descriptors: the ones systemd passed, accepted connections, the event
//! loop's registrations, TCP_INFO, and the process-wide settings that keep
//! descriptors and children from leaking into commands.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{accept4, SockFlag};

/// Takes ownership of a descriptor the service manager passed to this process.
///
/// Fails with `EBADF` when `fd` is not open, so a wrong `LISTEN_FDS` cannot make
/// two owners of one descriptor number that something else opened later.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    nix::fcntl::fcntl(
        // SAFETY: the borrow lives only for this F_GETFD call, which checks that
        // the number refers to an open descriptor and changes nothing.
        unsafe { BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )?;
    // SAFETY: the socket-activation protocol hands descriptors LISTEN_FDS_START..
    // to this process, which is their only owner; the caller takes each number
    // once (listen.rs walks the range once), and the check above proved it open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Marks every descriptor from 3 up close-on-exec: those the daemon was
/// started with (by systemd, or leaked by whatever started it) are not for
/// the commands, which get 0, 1 and 2 only. Call once, right after the
/// inherited sockets are adopted and before anything else is opened.
pub fn cloexec_from_3() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC takes integers and only
    // sets a flag on descriptors; it closes nothing (Linux 5.11+).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret == 0 {
        return;
    }
    // Older kernels: one by one.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: the borrow lasts for one F_SETFD on a number that was open
        // a moment ago; if it was the directory listing's own (now closed)
        // descriptor, the call fails with EBADF and changes nothing.
        let _ = nix::fcntl::fcntl(
            unsafe { BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

/// Accepts one connection, nonblocking and close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    let fd = accept4(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers a descriptor with the event loop. Must run inside the runtime.
pub fn register(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open until dropped and always returns the same
    // number; the AsyncFd owns it from here on, and nothing in this crate swaps
    // it out (AsyncFd::get_mut is never used).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(io::Error::from)
}

/// The kernel's TCP_INFO for a socket; None for other sockets and for
/// kernels older than 4.1/4.2, whose shorter struct lacks the byte counters.
fn tcp_info(fd: BorrowedFd<'_>) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, which outlives the call;
    // the kernel writes at most `len` bytes and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    (ret == 0 && len as usize >= needed).then_some(info)
}

/// Bytes the peer acknowledged and bytes received on a TCP socket, from
/// TCP_INFO; None for other sockets. Both follow sequence numbers, so each
/// includes a FIN once one was acknowledged or received. The daemon's count for `transfer =
/// "direct"`, where the bytes never pass through it.
pub fn tcp_bytes(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    tcp_info(fd).map(|i| (i.tcpi_bytes_acked, i.tcpi_bytes_received))
}

/// How long since data last went either way on a TCP socket; None for other sockets.
pub fn tcp_quiet(fd: BorrowedFd<'_>) -> Option<std::time::Duration> {
    tcp_info(fd).map(|i| {
        std::time::Duration::from_millis(i.tcpi_last_data_sent.min(i.tcpi_last_data_recv).into())
    })
}

/// Sets SIGCHLD to its default action. Started with it ignored (a parent's
/// choice, inherited across exec), the kernel would reap the commands by
/// itself, and the zombie that keeps a command's process-group id from being
/// reused would never exist.
pub fn default_sigchld() -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_DFL runs no code of ours in a signal context;
    // nothing in the daemon relies on another SIGCHLD disposition.
    unsafe { sigaction(Signal::SIGCHLD, &default) }
        .map(|_| ())
        .map_err(io::Error::from)
}

/// The value of extended attribute `name` of `path`; None when it is not set
/// or cannot be read (reading `trusted.*` needs CAP_SYS_ADMIN).
pub fn getxattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = std::ffi::CString::new(name).ok()?;
    let mut value = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // kernel writes at most `value.len()` bytes into `value`.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    usize::try_from(n).ok().map(|n| value[..n].to_vec())
}

/// Reaps `pid`: its wait status, and the CPU time (user and system, in µs)
/// it and the children it waited for used.
pub fn wait(pid: nix::unistd::Pid) -> io::Result<(nix::sys::wait::WaitStatus, u64)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let ret = loop {
        // SAFETY: both pointers are to values in this frame that outlive the call.
        let ret = unsafe { libc::wait4(pid.as_raw(), &mut status, 0, &mut usage) };
        if ret >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break ret;
        }
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let usec = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    let status = nix::sys::wait::WaitStatus::from_raw(pid, status).map_err(io::Error::from)?;
    Ok((status, usec(usage.ru_utime) + usec(usage.ru_stime)))
}

/// Bytes waiting to be read in a pipe or socket (FIONREAD).
pub fn readable_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer, which is to `n`.
    let ret = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::FIONREAD, &mut n) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// SO_MEMINFO (Linux 4.12), which the libc crate does not name: 55 but on
/// sparc (parisc, with 0x4030, has no Rust target).
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_MEMINFO: libc::c_int = 0x39;
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_MEMINFO: libc::c_int = 55;

/// What a socket's send buffer has room for now, as the kernel counts it
/// when it takes a write: its size (SO_SNDBUF) less what it holds, with the
/// kernel's overhead (SO_MEMINFO: for TCP the bytes queued, sent or not, not
/// yet acknowledged; for a Unix socket those its peer has not read). Before
/// Linux 4.12, what it holds is SIOCOUTQ, without the overhead. Fails for
/// descriptors that are not sockets.
pub fn send_room(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, which outlives the
    // call; the kernel writes at most `len` bytes and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let at = |i: libc::c_int| info[i as usize] as usize;
    if ret == 0 && len as usize > libc::SK_MEMINFO_WMEM_QUEUED as usize * 4 {
        let held = at(libc::SK_MEMINFO_WMEM_ALLOC).max(at(libc::SK_MEMINFO_WMEM_QUEUED));
        return Ok(at(libc::SK_MEMINFO_SNDBUF).saturating_sub(held));
    }
    let e = io::Error::last_os_error();
    if ret == 0 || e.raw_os_error() == Some(libc::ENOPROTOOPT) {
        let size = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SndBuf)?;
        return Ok(size.saturating_sub(unsent_bytes(fd)?));
    }
    Err(e)
}

/// Bytes a socket holds on their way out (SIOCOUTQ, which is TIOCOUTQ): for
/// TCP, those not yet acknowledged; for a Unix socket, those its peer has
/// not read yet (with the kernel's overhead).
fn unsent_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int to the pointer, which is to `n`.
    let ret = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::TIOCOUTQ, &mut n) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}
