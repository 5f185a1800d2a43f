//! The child, from clone to exec: each step a small function with its own
//! `unsafe` block, and the [`Stage`] a failed step reports to the parent.

use std::os::fd::RawFd;

use super::exec::Exec;

/// The step of the child at which a spawn failed, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Stage {
    Stdio = 0,
    WorkingDirectory = 1,
    Limits = 2,
    Nice = 3,
    Credentials = 4,
    Exec = 5,
    /// Joining the connection's cgroup (where clone3 is not allowed).
    Cgroup = 6,
}

impl Stage {
    const ALL: [Stage; 7] = [
        Stage::Stdio,
        Stage::WorkingDirectory,
        Stage::Limits,
        Stage::Nice,
        Stage::Credentials,
        Stage::Exec,
        Stage::Cgroup,
    ];

    pub(super) fn from_raw(raw: libc::c_int) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| *s as libc::c_int == raw)
    }
}

/// What the child reads, and where it reports a failure before exec.
#[repr(C)]
pub(super) struct ChildArgs<'a> {
    pub(super) exec: &'a Exec,
    pub(super) stdio: [RawFd; 3],
    /// With a shared descriptor table (CLONE_FILES): the child's own table
    /// keeps only the descriptors below this one (-1: the table is a copy).
    pub(super) keep_below: RawFd,
    /// `cgroup.procs` of the cgroup to join before anything else, when the
    /// kernel did not put the child there (-1: nothing to join).
    pub(super) join: RawFd,
    /// Written by the child only, read by the parent once the child has
    /// exited or exec'd (CLONE_VFORK suspends the parent until then).
    pub(super) failed_errno: libc::c_int,
    /// A [`Stage`] as its number; -1 while nothing failed.
    pub(super) failed_stage: libc::c_int,
}

/// Signals whose dispositions the daemon changes: tokio's handlers (TERM,
/// INT, HUP), std's stack-overflow handlers (SEGV, BUS), and PIPE, which std
/// ignores. The child sets them back to the default before it unblocks
/// signals; execve would reset the handlers but not the ignored PIPE. No other
/// code in the daemon installs a handler.
pub const RESET_SIGNALS: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGPIPE,
];

/// The 32-bit uid and gid calls; on i686 and 32-bit Arm the plain numbers
/// are the old 16-bit ones.
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETUID: libc::c_long = libc::SYS_setuid32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETGID: libc::c_long = libc::SYS_setgid32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETGROUPS: libc::c_long = libc::SYS_setgroups32;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETUID: libc::c_long = libc::SYS_setuid;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETGID: libc::c_long = libc::SYS_setgid;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETGROUPS: libc::c_long = libc::SYS_setgroups;

/// capset(2)'s header and data, version 3 (two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The child, between clone and exec. Runs on its own small stack in the
/// daemon's memory with every signal blocked: raw system calls only, each
/// step a function below. The user switch uses raw syscalls, not glibc's
/// wrappers, because those would signal every thread of the daemon (the
/// setxid broadcast) from here, where they are not this process's threads.
pub(super) extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs the parent passed to clone; it is
    // valid and not touched by the parent until this child execs or exits.
    let args = unsafe { &mut *arg.cast::<ChildArgs<'_>>() };
    let exec = args.exec;
    let steps = || -> Result<(), Stage> {
        // Before the table is the child's own: a write, no change to it.
        join_cgroup(args.join).ok_or(Stage::Cgroup)?;
        own_descriptor_table(args.keep_below).ok_or(Stage::Stdio)?;
        new_process_group();
        default_signal_dispositions();
        standard_streams(args.stdio).ok_or(Stage::Stdio)?;
        resource_limits(exec).ok_or(Stage::Limits)?;
        nice(exec).ok_or(Stage::Nice)?;
        switch_user(exec).ok_or(Stage::Credentials)?;
        // After the switch, so that the command cannot start in a directory
        // its user could not enter.
        working_directory(exec).ok_or(Stage::WorkingDirectory)?;
        clear_ambient_capabilities();
        unblock_signals();
        execute(exec);
        Err(Stage::Exec)
    };
    let Err(stage) = steps() else {
        return 0;
    };
    // SAFETY: reads this thread's errno, writes the report fields of `args`
    // (see above), and _exit ends only this child.
    unsafe {
        let errno = *libc::__errno_location();
        std::ptr::write_volatile(&mut args.failed_errno, errno);
        std::ptr::write_volatile(&mut args.failed_stage, stage as libc::c_int);
        libc::_exit(127)
    }
}

/// Moves the child into the cgroup whose `cgroup.procs` is `procs` ("0"
/// means the writer), first of all.
fn join_cgroup(procs: RawFd) -> Option<()> {
    if procs < 0 {
        return Some(());
    }
    // SAFETY: a write of one byte from a static string to a descriptor the
    // parent holds open until the exec.
    (unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) } == 1).then_some(())
}

/// With a shared table: a private copy of its entries below `keep_below`,
/// the rest left out (close_range with CLOSE_RANGE_UNSHARE copies only what
/// it keeps). Nothing in the shared table changes before this.
fn own_descriptor_table(keep_below: RawFd) -> Option<()> {
    if keep_below < 0 {
        return Some(());
    }
    // SAFETY: close_range on integers; with CLOSE_RANGE_UNSHARE it acts on
    // the new private table only.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            keep_below as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        )
    };
    (ret == 0).then_some(())
}

fn new_process_group() {
    // SAFETY: setpgid on the calling process takes integers only.
    unsafe { libc::setpgid(0, 0) };
}

fn default_signal_dispositions() {
    // SAFETY: a zeroed sigaction is a valid SIG_DFL action with an empty
    // mask; sigaction reads it and writes nothing back (null old action).
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in RESET_SIGNALS {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
    }
}

/// dup2 each source onto 0, 1, 2; one already in place loses close-on-exec.
fn standard_streams(stdio: [RawFd; 3]) -> Option<()> {
    for (target, fd) in stdio.into_iter().enumerate() {
        let target = target as libc::c_int;
        // SAFETY: fcntl and dup2 on descriptor numbers; `fd` is open (the
        // parent holds it until the exec) and no source is below 3.
        let ok = unsafe {
            if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            }
        };
        ok.then_some(())?;
    }
    Some(())
}

fn resource_limits(exec: &Exec) -> Option<()> {
    for (resource, rlim) in &exec.rlimits {
        // SAFETY: `rlim` points into `exec`, valid until the exec.
        (unsafe { libc::setrlimit(*resource, rlim) } == 0).then_some(())?;
    }
    Some(())
}

fn nice(exec: &Exec) -> Option<()> {
    match exec.nice {
        // SAFETY: setpriority on this process takes integers only.
        Some(n) => (unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) } == 0).then_some(()),
        None => Some(()),
    }
}

fn switch_user(exec: &Exec) -> Option<()> {
    let Some((uid, gid, groups)) = &exec.ids else {
        return Some(());
    };
    // SAFETY: raw setgroups/setgid/setuid on this thread; `groups` points
    // into `exec`, valid until the exec, and its length is passed with it.
    let switched = unsafe {
        libc::syscall(SYS_SETGROUPS, groups.len(), groups.as_ptr()) == 0
            && libc::syscall(SYS_SETGID, *gid) == 0
            && libc::syscall(SYS_SETUID, *uid) == 0
    };
    switched.then_some(())?;
    if exec.drop_capabilities {
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let none = [CapData::default(); 2];
        // SAFETY: prctl takes integers; capset reads the header and the two
        // data words from this frame.
        let dropped = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) == 0
                && libc::syscall(libc::SYS_capset, &header, none.as_ptr()) == 0
        };
        dropped.then_some(())?;
    }
    Some(())
}

fn working_directory(exec: &Exec) -> Option<()> {
    // SAFETY: `cwd` is a NUL-terminated string in `exec`, valid until the exec.
    (unsafe { libc::chdir(exec.cwd.as_ptr()) } == 0).then_some(())
}

/// No command inherits the daemon's ambient capabilities (a unit may grant
/// some for `user`); EINVAL on kernels before 4.3, which have none.
fn clear_ambient_capabilities() {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
}

fn unblock_signals() {
    // SAFETY: an emptied sigset_t in this frame; no old mask is written.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Returns only if execve failed.
fn execute(exec: &Exec) {
    // SAFETY: the program, argv and envp are NUL-terminated strings and
    // null-terminated pointer arrays owned by `exec`, valid until the exec.
    unsafe {
        libc::execve(
            exec.program.as_ptr(),
            exec.argv.as_ptr(),
            exec.envp.as_ptr(),
        )
    };
}
