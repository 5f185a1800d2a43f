//! Descriptor numbers reserved for the command's standard streams, so that
//! the child can share the daemon's descriptor table and keep a small copy.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Three descriptor numbers near the bottom of the table, reserved at start
/// for one launcher thread: /dev/null while no spawn uses them.
///
/// A child of clone copies its parent's descriptor table, and the exec then
/// closes every close-on-exec entry: with thousands of connections open
/// that is most of the cost of a spawn. So the child shares the table
/// instead (CLONE_FILES) and, first thing, takes a private copy of only
/// the entries below the highest slot (close_range with
/// CLOSE_RANGE_UNSHARE): the launcher puts the command's stdin, stdout and
/// stderr in its slots before the clone, and /dev/null back after.
pub struct Slots {
    fds: [OwnedFd; 3],
    null: OwnedFd,
}

impl Slots {
    /// Call early, while the table is small, so the numbers are low.
    pub fn reserve() -> io::Result<Slots> {
        let null = || {
            nix::fcntl::open(
                "/dev/null",
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(io::Error::from)
        };
        Ok(Slots {
            fds: [null()?, null()?, null()?],
            null: null()?,
        })
    }

    /// Puts `stdio` in the slots (an atomic replacement of each number).
    pub(super) fn fill(&self, stdio: [BorrowedFd<'_>; 3]) -> io::Result<[RawFd; 3]> {
        for (slot, fd) in self.fds.iter().zip(stdio) {
            dup3_cloexec(fd.as_raw_fd(), slot.as_raw_fd())?;
        }
        Ok(self.fds.each_ref().map(|fd| fd.as_raw_fd()))
    }

    /// /dev/null back in the slots: the launcher keeps no stream open.
    pub(super) fn empty(&self) {
        for slot in &self.fds {
            let _ = dup3_cloexec(self.null.as_raw_fd(), slot.as_raw_fd());
        }
    }

    pub(super) fn above(&self) -> RawFd {
        self.fds.iter().map(|f| f.as_raw_fd()).max().unwrap_or(2) + 1
    }
}

fn dup3_cloexec(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup3 on descriptor numbers: `from` is open, and `to` is a slot
    // this launcher owns, which nothing else in the daemon uses.
    match unsafe { libc::dup3(from, to, libc::O_CLOEXEC) } {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}
