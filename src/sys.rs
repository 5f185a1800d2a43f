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

/// A command ready to start: every string, pointer array and value the child
/// needs, prepared in the parent, so that the child between clone and exec only
/// makes system calls (no allocation, no lock, no Rust runtime).
pub struct Exec {
    program: std::ffi::CString,
    // The pointer arrays point into these; they live as long as the Exec.
    _args: Vec<std::ffi::CString>,
    _env: Vec<std::ffi::CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: std::ffi::CString,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    nice: Option<libc::c_int>,
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// The uid changes: drop every capability after the switch (from one
    /// non-root uid to another the kernel keeps them, ambient ones included).
    drop_capabilities: bool,
}

/// The soft and hard RLIMIT_NOFILE the daemon started with, restored in every
/// command that does not set `rlimit_nofile` (0: the daemon did not raise it).
static COMMAND_NOFILE: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// Records the soft RLIMIT_NOFILE the daemon had before it raised its own:
/// commands get it back. Call once, at start.
pub fn commands_get_nofile(soft: u64) {
    use std::sync::atomic::Ordering;
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(libc::RLIM_INFINITY, |(_, h)| h);
    COMMAND_NOFILE[0].store(soft, Ordering::Relaxed);
    COMMAND_NOFILE[1].store(hard, Ordering::Relaxed);
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

/// The step of the child at which a spawn failed, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Stdio,
    WorkingDirectory,
    Limits,
    Nice,
    Credentials,
    Exec,
}

impl Exec {
    /// `args` includes argv[0]; `env` is final (later duplicates are not removed here).
    pub fn new(
        program: &std::path::Path,
        args: &[String],
        env: &[(std::ffi::OsString, std::ffi::OsString)],
        cwd: &std::path::Path,
        run_as: &crate::runas::RunAs,
    ) -> io::Result<Exec> {
        use crate::runas::Limit;
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |b: &[u8]| {
            CString::new(b)
                .map_err(|_| io::Error::other("a NUL byte in the command or its environment"))
        };
        let args: Vec<CString> = args
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let env: Vec<CString> = env
            .iter()
            .map(|(k, v)| {
                let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
                kv.extend_from_slice(k.as_bytes());
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                c(&kv)
            })
            .collect::<io::Result<_>>()?;
        let nul_terminated = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let mut rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)> = run_as
            .rlimits
            .iter()
            .map(|&(limit, value)| {
                let resource = match limit {
                    Limit::As => libc::RLIMIT_AS,
                    Limit::Nofile => libc::RLIMIT_NOFILE,
                    Limit::Nproc => libc::RLIMIT_NPROC,
                    Limit::Cpu => libc::RLIMIT_CPU,
                };
                (
                    resource,
                    libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    },
                )
            })
            .collect();
        let nofile = COMMAND_NOFILE
            .each_ref()
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed));
        if nofile[0] != 0 && !run_as.rlimits.iter().any(|(l, _)| *l == Limit::Nofile) {
            let rlim = libc::rlimit {
                rlim_cur: nofile[0],
                rlim_max: nofile[1],
            };
            rlimits.push((libc::RLIMIT_NOFILE, rlim));
        }
        Ok(Exec {
            program: c(program.as_os_str().as_bytes())?,
            argv: nul_terminated(&args),
            envp: nul_terminated(&env),
            _args: args,
            _env: env,
            cwd: c(cwd.as_os_str().as_bytes())?,
            rlimits,
            nice: run_as.nice,
            ids: run_as.credentials.as_ref().map(|c| {
                (
                    c.uid.as_raw(),
                    c.gid.as_raw(),
                    c.groups.iter().map(|g| g.as_raw()).collect(),
                )
            }),
            drop_capabilities: run_as
                .credentials
                .as_ref()
                .is_some_and(|c| c.uid != nix::unistd::geteuid()),
        })
    }
}

/// What the child reads, and where it reports a failure before exec.
#[repr(C)]
struct ChildArgs<'a> {
    exec: &'a Exec,
    stdio: [RawFd; 3],
    /// Written by the child only, read by the parent once the child has
    /// exited or exec'd (CLONE_VFORK suspends the parent until then).
    failed_errno: libc::c_int,
    failed_stage: libc::c_int,
}

/// Signals whose dispositions the daemon changes: tokio's handlers (TERM,
/// INT, HUP), std's stack-overflow handlers (SEGV, BUS), and PIPE, which std
/// ignores. The child sets them back to the default before it unblocks
/// signals; execve would reset the handlers but not the ignored PIPE. No other
/// code in the daemon installs a handler.
const RESET_SIGNALS: [libc::c_int; 6] = [
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

/// Stack for the child between clone and exec: a few calls deep only.
const CHILD_STACK: usize = 64 * 1024;

/// Starts `exec` with `stdio` as its descriptors 0, 1 and 2, in a new process
/// group, and returns its pid and a pidfd.
///
/// This is what posix_spawn does (clone with CLONE_VM and CLONE_VFORK: no copy
/// of the daemon's memory, the calling thread waits until the exec), minus
/// what the daemon does not need: glibc's child resets all 64 signal
/// dispositions; this one resets the six the daemon changed. It also does the
/// user switch, limits and nice that std would need a full fork for, and gets
/// the pidfd from clone itself. Descriptors 0–2 of the daemon are always open
/// (see `main`), so no source in `stdio` is below 3 and the dup2 calls cannot
/// overwrite one another.
pub fn spawn(
    exec: &Exec,
    stdio: [BorrowedFd<'_>; 3],
) -> Result<(nix::unistd::Pid, OwnedFd), (Stage, io::Error)> {
    use std::os::fd::AsRawFd;
    let mut args = ChildArgs {
        exec,
        stdio: stdio.map(|fd| fd.as_raw_fd()),
        failed_errno: 0,
        failed_stage: -1,
    };
    // Allocated, not initialised: the child writes before it reads, and
    // zeroing 64 KiB per connection would be wasted work.
    let mut stack: Vec<std::mem::MaybeUninit<u8>> = Vec::with_capacity(CHILD_STACK);
    // The stack grows down on every architecture Linux runs this on but
    // parisc; 16-byte alignment is what the ABIs ask for.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
    let mut pidfd: libc::c_int = -1;

    // SAFETY: sigset_t is plain data; sigfillset fills it completely.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above, for the mask we restore.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t owned by this frame.
    unsafe { libc::sigfillset(&mut all) };
    // Block every signal in this thread, so that no handler of the daemon
    // can run in the child, which shares the daemon's memory until exec. The
    // child inherits the mask and clears it only after resetting handlers.
    // (glibc keeps its two internal signals, SIGCANCEL and SIGSETXID,
    // unblocked; the daemon uses neither pthread_cancel nor glibc's setuid
    // family, so neither is ever sent.)
    // SAFETY: both pointers are to valid sigset_t values in this frame.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    // SAFETY: CLONE_VM|CLONE_VFORK: the child runs on `stack`, which nothing
    // else uses, and this thread is suspended until the child has exec'd or
    // exited, so `args`, `exec` and `stack` outlive every access the child
    // makes. The child (`child_main`) only makes system calls on data
    // prepared before the clone and never returns into Rust code of the
    // parent. CLONE_PIDFD stores the pidfd in `pidfd` (the parent_tid argument).
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            (&mut args as *mut ChildArgs<'_>).cast(),
            &mut pidfd as *mut libc::c_int,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: `old` is the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err((Stage::Exec, clone_error));
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    if pidfd < 0 {
        // A kernel before 5.2 ignores CLONE_PIDFD: the command runs, but
        // could not be watched. End it rather than leave it unsupervised.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err((
            Stage::Exec,
            io::Error::other("this kernel has no CLONE_PIDFD (Linux 5.2 or later is needed)"),
        ));
    }
    // SAFETY: clone with CLONE_PIDFD succeeded and stored a non-negative
    // number, so `pidfd` is a new close-on-exec descriptor that only we hold.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: the child has exec'd or exited (CLONE_VFORK), so it no longer
    // writes to `args`; a volatile read keeps the compiler from assuming the
    // fields still hold what this thread stored before the clone.
    let (errno, stage) = unsafe {
        (
            std::ptr::read_volatile(&args.failed_errno),
            std::ptr::read_volatile(&args.failed_stage),
        )
    };
    if stage < 0 {
        return Ok((pid, pidfd));
    }
    // The child exited with 127 before exec; reap it here.
    let _ = nix::sys::wait::waitpid(pid, None);
    let stage = match stage {
        0 => Stage::Stdio,
        1 => Stage::WorkingDirectory,
        2 => Stage::Limits,
        3 => Stage::Nice,
        4 => Stage::Credentials,
        _ => Stage::Exec,
    };
    Err((stage, io::Error::from_raw_os_error(errno)))
}

/// The child, between clone and exec. Runs on its own small stack in the
/// daemon's memory with every signal blocked: raw system calls only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs the parent passed to clone; it is
    // valid and not touched by the parent until this child execs or exits.
    let args = unsafe { &mut *arg.cast::<ChildArgs<'_>>() };
    let exec = args.exec;
    let stdio = args.stdio;
    let fail = |args: &mut ChildArgs<'_>, stage: libc::c_int| -> libc::c_int {
        // SAFETY: reading errno of this thread; writing the report fields
        // of `args` (see above); _exit ends only this child.
        unsafe {
            let errno = *libc::__errno_location();
            std::ptr::write_volatile(&mut args.failed_errno, errno);
            std::ptr::write_volatile(&mut args.failed_stage, stage);
            libc::_exit(127)
        }
    };
    // SAFETY (for each call below): plain system calls on integers and on
    // pointers into `exec` and into this frame, all valid until exec. The
    // user switch uses raw syscalls, not glibc's wrappers, because those
    // would signal every thread of the daemon (the setxid broadcast) from
    // here, where they are not this process's threads.
    unsafe {
        libc::setpgid(0, 0);
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in RESET_SIGNALS {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        for (target, fd) in stdio.into_iter().enumerate() {
            let target = target as libc::c_int;
            let ok = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                return fail(args, 0);
            }
        }
        for (resource, rlim) in &exec.rlimits {
            if libc::setrlimit(*resource, rlim) != 0 {
                return fail(args, 2);
            }
        }
        if let Some(n) = exec.nice {
            if libc::setpriority(libc::PRIO_PROCESS, 0, n) != 0 {
                return fail(args, 3);
            }
        }
        if let Some((uid, gid, groups)) = &exec.ids {
            if libc::syscall(SYS_SETGROUPS, groups.len(), groups.as_ptr()) != 0
                || libc::syscall(SYS_SETGID, *gid) != 0
                || libc::syscall(SYS_SETUID, *uid) != 0
            {
                return fail(args, 4);
            }
            if exec.drop_capabilities {
                let header = CapHeader {
                    version: LINUX_CAPABILITY_VERSION_3,
                    pid: 0,
                };
                let none = [CapData::default(); 2];
                if libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ) != 0
                    || libc::syscall(libc::SYS_capset, &header, none.as_ptr()) != 0
                {
                    return fail(args, 4);
                }
            }
        }
        // After the switch, so that the command cannot start in a directory
        // its user could not enter.
        if libc::chdir(exec.cwd.as_ptr()) != 0 {
            return fail(args, 1);
        }
        // No command inherits the daemon's ambient capabilities (a unit may
        // grant some for `user`); EINVAL on kernels before 4.3, which have none.
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(
            exec.program.as_ptr(),
            exec.argv.as_ptr(),
            exec.envp.as_ptr(),
        );
        fail(args, 5)
    }
}
