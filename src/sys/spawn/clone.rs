//! The clone itself: clone3 into the connection's cgroup where allowed, else
//! clone, with every signal blocked around it, and the child's report read
//! back once it has exec'd or exited.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::child::{child_main, ChildArgs, Stage};
use super::exec::Exec;
use super::probe::CLONE3_REFUSED;
use super::Place;

/// Stack for the child between clone and exec: a few calls deep only.
const CHILD_STACK: usize = 64 * 1024;

/// The clone itself: `stdio` are the descriptors to make 0, 1 and 2; with
/// `keep_below` ≥ 0 the child shares the table and keeps a copy of only the
/// entries below it.
///
/// Kept whole, though over a hundred lines: it is the parent's side of the
/// vfork-style clone, from blocking every signal to reading back the child's
/// report. The child's stack, its `ChildArgs` and the pidfd slot live in this
/// frame, and the child works in this memory until its exec, so every step
/// that touches them (clone3 or clone, restoring the mask, freeing the stack,
/// the volatile reads) stands here in order, where the `SAFETY` comments can
/// be checked against one another. The child's own life before exec is
/// `child_main` and its small async-signal-safe steps.
pub(super) fn clone_child(
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
