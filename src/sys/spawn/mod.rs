//! Starting a command: posix_spawn's technique (clone with `CLONE_VM` and
//! `CLONE_VFORK`: no copy of the daemon's memory, the calling thread waits
//! until the exec) with only the work this daemon needs done in the child.
//!
//! Everything the child uses is prepared in the parent ([`Exec`]), so that
//! between clone and exec the child only makes system calls: no allocation,
//! no lock, no Rust runtime. Each step of the child is a small function with
//! its own `unsafe` block; a step that fails reports its [`Stage`] and errno
//! to the parent through memory they share until the exec.
//!
//! The parts, in the order a spawn uses them:
//! - `exec`: [`Exec`], everything the child needs, prepared in the parent.
//! - `slots`: [`Slots`], the descriptor numbers the command's streams pass through.
//! - `probe`: what the kernel and the seccomp filter allow, learnt once per process.
//! - `clone`: the clone or clone3, with every signal blocked around it.
//! - `child`: the child's steps until exec, and the [`Stage`] a failure names.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

mod child;
mod clone;
mod exec;
mod probe;
mod slots;

pub use child::Stage;
pub use exec::{commands_get_nofile, Exec};
pub use probe::{cgroup_spawn_method, probe_clone3};
pub use slots::Slots;

use clone::clone_child;
use probe::SHARE_FILES_REFUSED;

/// Where a command starts.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// In the daemon's own cgroup (its process group is its own).
    Here,
    /// In the cgroup whose directory is `dir`, from the first instruction:
    /// clone3(`CLONE_INTO_CGROUP`) where the kernel and the service's seccomp
    /// filter allow it; else the child writes itself into `procs` (that
    /// cgroup's `cgroup.procs`) before it does anything else, so nothing of
    /// the command ever runs outside either way.
    Cgroup {
        dir: BorrowedFd<'a>,
        procs: BorrowedFd<'a>,
    },
}

/// Starts `exec` with `stdio` as its descriptors 0, 1 and 2, in a new process
/// group, at `place`, and returns its pid and a pidfd. With `slots`, the
/// child shares the daemon's descriptor table until it has a small copy of
/// its own (see [`Slots`]).
///
/// glibc's posix_spawn child resets all 64 signal dispositions; this one
/// resets the six the daemon changed. It also does the user switch, limits
/// and nice that std would need a full fork for, and gets the pidfd from
/// clone itself. Descriptors 0–2 of the daemon are always open (see `main`),
/// so no source in `stdio` is below 3 and the dup2 calls cannot overwrite one
/// another.
pub fn spawn(
    exec: &Exec,
    stdio: [BorrowedFd<'_>; 3],
    place: Place<'_>,
    slots: Option<&Slots>,
) -> Result<(nix::unistd::Pid, OwnedFd), (Stage, io::Error)> {
    use std::sync::atomic::Ordering;
    let slots = slots.filter(|_| !SHARE_FILES_REFUSED.load(Ordering::Relaxed));
    if let Some(slots) = slots {
        let filled = slots.fill(stdio).map_err(|e| (Stage::Stdio, e));
        let started = filled.and_then(|fds| clone_child(exec, fds, slots.above(), place));
        slots.empty();
        match started {
            // close_range(2) without CLOSE_RANGE_UNSHARE: a kernel before 5.9.
            Err((Stage::Stdio, e))
                if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) =>
            {
                SHARE_FILES_REFUSED.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    clone_child(exec, stdio.map(|fd| fd.as_raw_fd()), -1, place)
}
