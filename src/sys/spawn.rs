//! Starting a command: posix_spawn's technique (clone with `CLONE_VM` and
//! `CLONE_VFORK`: no copy of the daemon's memory, the calling thread waits
//! until the exec) with only the work this daemon needs done in the child.
//!
//! Everything the child uses is prepared in the parent ([`Exec`]), so that
//! between clone and exec the child only makes system calls: no allocation,
//! no lock, no Rust runtime. Each step of the child is a small function with
//! its own `unsafe` block; a step that fails reports its [`Stage`] and errno
//! to the parent through memory they share until the exec.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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

impl Exec {
    /// `args` includes argv[0]; `env` is final (later duplicates are not removed here).
    pub fn new(
        program: &std::path::Path,
        args: &[String],
        env: &[(std::ffi::OsString, std::ffi::OsString)],
        cwd: &std::path::Path,
        run_as: &crate::runas::RunAs,
    ) -> io::Result<Exec> {
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
        let rlimits = rlimits(run_as);
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

    fn from_raw(raw: libc::c_int) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| *s as libc::c_int == raw)
    }
}

/// The limits the child sets: the service's `rlimit_*`, and the daemon's
/// original RLIMIT_NOFILE where the service sets none.
fn rlimits(run_as: &crate::runas::RunAs) -> Vec<(libc::__rlimit_resource_t, libc::rlimit)> {
    use crate::runas::Limit;
    let both = |soft, hard| libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    let mut rlimits: Vec<_> = run_as
        .rlimits
        .iter()
        .map(|&(limit, value)| {
            let resource = match limit {
                Limit::As => libc::RLIMIT_AS,
                Limit::Nofile => libc::RLIMIT_NOFILE,
                Limit::Nproc => libc::RLIMIT_NPROC,
                Limit::Cpu => libc::RLIMIT_CPU,
            };
            (resource, both(value, value))
        })
        .collect();
    let nofile = COMMAND_NOFILE
        .each_ref()
        .map(|a| a.load(std::sync::atomic::Ordering::Relaxed));
    if nofile[0] != 0 && !run_as.rlimits.iter().any(|(l, _)| *l == Limit::Nofile) {
        rlimits.push((libc::RLIMIT_NOFILE, both(nofile[0], nofile[1])));
    }
    rlimits
}

/// What the child reads, and where it reports a failure before exec.
#[repr(C)]
struct ChildArgs<'a> {
    exec: &'a Exec,
    stdio: [RawFd; 3],
    /// With a shared descriptor table (CLONE_FILES): the child's own table
    /// keeps only the descriptors below this one (-1: the table is a copy).
    keep_below: RawFd,
    /// `cgroup.procs` of the cgroup to join before anything else, when the
    /// kernel did not put the child there (-1: nothing to join).
    join: RawFd,
    /// Written by the child only, read by the parent once the child has
    /// exited or exec'd (CLONE_VFORK suspends the parent until then).
    failed_errno: libc::c_int,
    /// A [`Stage`] as its number; -1 while nothing failed.
    failed_stage: libc::c_int,
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

/// Stack for the child between clone and exec: a few calls deep only.
const CHILD_STACK: usize = 64 * 1024;

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

/// Whether clone3 with `CLONE_INTO_CGROUP` may be tried: not after it was
/// refused once (ENOSYS: systemd's `RestrictNamespaces=` filter refuses
/// clone3 whole, since seccomp cannot see its flags; EINVAL or E2BIG: a
/// kernel before 5.7).
static CLONE3_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(
    // Only x86_64 has the trampoline below; elsewhere the child joins.
    !cfg!(target_arch = "x86_64"),
);

/// Asks the kernel whether clone3 is allowed here, without starting
/// anything: an argument of size 0 is refused with EINVAL by the kernel, and
/// with ENOSYS by a seccomp filter (or a kernel before 5.3).
pub fn probe_clone3() {
    // SAFETY: a null pointer with size 0: the kernel reads nothing.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    if ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        CLONE3_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How the spawns of this process put commands into their cgroups.
pub fn cgroup_spawn_method() -> &'static str {
    if CLONE3_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
        "the child joins its cgroup before exec (clone3 is not allowed here)"
    } else {
        "clone3 with CLONE_INTO_CGROUP"
    }
}

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
    fn fill(&self, stdio: [BorrowedFd<'_>; 3]) -> io::Result<[RawFd; 3]> {
        for (slot, fd) in self.fds.iter().zip(stdio) {
            dup3_cloexec(fd.as_raw_fd(), slot.as_raw_fd())?;
        }
        Ok(self.fds.each_ref().map(|fd| fd.as_raw_fd()))
    }

    /// /dev/null back in the slots: the launcher keeps no stream open.
    fn empty(&self) {
        for slot in &self.fds {
            let _ = dup3_cloexec(self.null.as_raw_fd(), slot.as_raw_fd());
        }
    }

    fn above(&self) -> RawFd {
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

/// Whether the child may share the descriptor table: not once a kernel
/// refused close_range's CLOSE_RANGE_UNSHARE (before 5.9).
static SHARE_FILES_REFUSED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

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

/// The clone itself: `stdio` are the descriptors to make 0, 1 and 2; with
/// `keep_below` ≥ 0 the child shares the table and keeps a copy of only the
/// entries below it.
fn clone_child(
    exec: &Exec,
    stdio: [RawFd; 3],
    keep_below: RawFd,
    place: Place<'_>,
) -> Result<(nix::unistd::Pid, OwnedFd), (Stage, io::Error)> {
    use std::sync::atomic::Ordering;
    let files = if keep_below >= 0 {
        libc::CLONE_FILES
    } else {
        0
    };
    let mut args = ChildArgs {
        exec,
        stdio,
        keep_below,
        join: -1,
        failed_errno: 0,
        failed_stage: -1,
    };
    // Allocated, not initialised: the child writes before it reads, and
    // zeroing 64 KiB per connection would be wasted work.
    let mut stack: Vec<std::mem::MaybeUninit<u8>> = Vec::with_capacity(CHILD_STACK);
    // The stack grows down on every architecture Linux runs this on but
    // parisc; 16-byte alignment is what the ABIs ask for.
    let bottom = (stack.as_mut_ptr() as usize + 15) & !15;
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
    let mut pidfd: libc::c_int = -1;

    // Every signal blocked in this thread, so that no handler of the daemon
    // can run in the child, which shares the daemon's memory until exec. The
    // child inherits the mask and clears it only after resetting handlers.
    // (glibc keeps its two internal signals, SIGCANCEL and SIGSETXID,
    // unblocked; the daemon uses neither pthread_cancel nor glibc's setuid
    // family, so neither is ever sent.)
    let old = block_all_signals();
    let mut started = None;
    if let Place::Cgroup { dir, procs } = place {
        if !CLONE3_REFUSED.load(Ordering::Relaxed) {
            let mut clone_args = CloneArgs {
                flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | files) as u64
                    | CLONE_INTO_CGROUP,
                pidfd: &mut pidfd as *mut libc::c_int as u64,
                exit_signal: libc::SIGCHLD as u64,
                stack: bottom as u64,
                stack_size: (top - bottom) as u64,
                cgroup: dir.as_raw_fd() as u64,
                ..CloneArgs::default()
            };
            let arg = (&mut args as *mut ChildArgs<'_>).cast();
            // SAFETY: as for clone below; clone3 takes the stack's lowest
            // address and its size, and the trampoline calls `child_main`
            // on it in the child, which never returns into this frame.
            let pid = unsafe { clone3(&mut clone_args, child_main, arg) };
            match pid {
                ..0 if matches!(-pid as i32, libc::ENOSYS | libc::EINVAL | libc::E2BIG) => {
                    CLONE3_REFUSED.store(true, Ordering::Relaxed);
                }
                ..0 => started = Some(Err(io::Error::from_raw_os_error(-pid as i32))),
                _ => started = Some(Ok(pid as libc::pid_t)),
            }
        }
        if started.is_none() {
            args.join = procs.as_raw_fd();
        }
    }
    let started = started.unwrap_or_else(|| {
        // SAFETY: CLONE_VM|CLONE_VFORK: the child runs on `stack`, which
        // nothing else uses, and this thread is suspended until the child
        // has exec'd or exited, so `args`, `exec` and `stack` outlive every
        // access the child makes. The child (`child_main`) only makes system
        // calls on data prepared before the clone and never returns into
        // Rust code of the parent. CLONE_PIDFD stores the pidfd in `pidfd`
        // (the parent_tid argument).
        let pid = unsafe {
            libc::clone(
                child_main,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | files | libc::SIGCHLD,
                (&mut args as *mut ChildArgs<'_>).cast(),
                &mut pidfd as *mut libc::c_int,
            )
        };
        if pid < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(pid)
        }
    });
    restore_signals(&old);
    drop(stack);
    let pid = nix::unistd::Pid::from_raw(started.map_err(|e| (Stage::Exec, e))?);
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
    let Some(stage) = Stage::from_raw(stage) else {
        return Ok((pid, pidfd));
    };
    // The child exited with 127 before exec; reap it here.
    let _ = nix::sys::wait::waitpid(pid, None);
    Err((stage, io::Error::from_raw_os_error(errno)))
}

/// clone3(2)'s argument, version 2 (with `cgroup`, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// clone3 for a child on a stack of its own: libc has no wrapper, and a
/// plain syscall() would return into this function on the child's empty
/// stack. In the child this calls `child(arg)` and exits with its result;
/// in the parent it returns the pid, or minus the errno.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3(
    args: &mut CloneArgs,
    child: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> libc::c_long {
    let ret: libc::c_long;
    // SAFETY (the caller's): the child starts with rsp at the top of the
    // stack in `args` (16-byte aligned, so the call below sees the ABI's
    // alignment), with r12 and r13 as the parent had them; it never comes
    // back to the code after the asm block. syscall clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") child,
            in("r13") arg,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

/// Elsewhere there is no trampoline: report ENOSYS, and the child joins its
/// cgroup itself.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3(
    _: &mut CloneArgs,
    _: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    _: *mut libc::c_void,
) -> libc::c_long {
    -(libc::ENOSYS as libc::c_long)
}

/// Blocks every signal in the calling thread; returns the mask to restore.
fn block_all_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, filled completely by sigfillset; both
    // pointers are to valid sigset_t values in this frame.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    }
}

fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: `old` is a mask saved by `block_all_signals`.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// The child, between clone and exec. Runs on its own small stack in the
/// daemon's memory with every signal blocked: raw system calls only, each
/// step a function below. The user switch uses raw syscalls, not glibc's
/// wrappers, because those would signal every thread of the daemon (the
/// setxid broadcast) from here, where they are not this process's threads.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
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
