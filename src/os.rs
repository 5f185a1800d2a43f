//! Small helpers around the operating system that several modules share:
//! a descriptor's blocking mode, and error text.

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
