//! The few system calls that need `unsafe`, behind safe functions.
//!
//! Everything else goes through `nix` or `std`. Each block says why it is sound.
#![allow(unsafe_code)]

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

/// Accepts one connection, nonblocking and close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    let fd = accept4(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a pidfd for a child of this process (Linux 5.3+).
///
/// The pidfd turns readable when the child exits, which lets the event loop wait
/// for one child without a SIGCHLD handler or a thread.
pub fn pidfd_open(pid: nix::unistd::Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word by value and touches no
    // memory of ours; flags 0 asks for a close-on-exec pidfd.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful pidfd_open returns a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
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

/// What runs in the child between fork and exec: resource limits, nice, and
/// the switch to another user and group, in that order (the first two may
/// need privileges the switch gives up). Prepared in full before the fork, so
/// the child only makes system calls: no allocation, no locks.
pub fn apply_before_exec(cmd: &mut std::process::Command, run_as: &crate::runas::RunAs) {
    use crate::runas::Limit;
    use std::os::unix::process::CommandExt;

    let rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)> = run_as
        .rlimits
        .iter()
        .map(|&(limit, value)| {
            let resource = match limit {
                Limit::As => libc::RLIMIT_AS,
                Limit::Nofile => libc::RLIMIT_NOFILE,
                Limit::Nproc => libc::RLIMIT_NPROC,
                Limit::Cpu => libc::RLIMIT_CPU,
            };
            let rlim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            (resource, rlim)
        })
        .collect();
    let nice = run_as.nice;
    let ids = run_as.credentials.as_ref().map(|c| {
        let groups: Vec<libc::gid_t> = c.groups.iter().map(|g| g.as_raw()).collect();
        (c.uid.as_raw(), c.gid.as_raw(), groups)
    });
    let setup = move || -> io::Result<()> {
        let check = |ret: libc::c_int| {
            if ret == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        for (resource, rlim) in &rlimits {
            // SAFETY: setrlimit reads the rlimit struct we pass by pointer,
            // which lives in this closure; it is async-signal-safe.
            check(unsafe { libc::setrlimit(*resource, rlim) })?;
        }
        if let Some(n) = nice {
            // SAFETY: setpriority takes plain integers; async-signal-safe.
            check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) })?;
        }
        if let Some((uid, gid, groups)) = &ids {
            // SAFETY: the pointer and length describe `groups`, which lives
            // in this closure; setgroups, setgid and setuid take plain values
            // otherwise. All three are async-signal-safe system calls.
            check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
            // SAFETY: as above.
            check(unsafe { libc::setgid(*gid) })?;
            // SAFETY: as above.
            check(unsafe { libc::setuid(*uid) })?;
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec. It allocates
    // nothing, takes no lock and makes only async-signal-safe system calls
    // (setrlimit, setpriority, setgroups, setgid, setuid) on data prepared
    // before the fork, which is what pre_exec requires in a threaded process.
    unsafe {
        cmd.pre_exec(setup);
    }
}
