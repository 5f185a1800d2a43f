//! Small helpers around the operating system that several modules share:
//! the standard descriptors, a descriptor's blocking mode, and error text.

use std::os::fd::AsFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

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

/// An io::Error's text without std's "(os error N)" suffix, for messages
/// such as `/usr/bin/foo: No such file or directory`.
pub fn reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

/// Makes sure descriptors 0, 1 and 2 are open (on /dev/null if not), so
/// that no descriptor the daemon opens later gets one of those numbers: the
/// child's dup2 onto 0–2 relies on it.
pub fn ensure_standard_fds() -> std::io::Result<()> {
    loop {
        let fd = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDWR,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| std::io::Error::other(format!("cannot open /dev/null: {}", e.desc())))?;
        if std::os::fd::AsRawFd::as_raw_fd(&fd) > 2 {
            return Ok(());
        }
        // One of 0-2 was closed and now holds /dev/null: keep it open for
        // good, as that standard descriptor.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
    }
}
