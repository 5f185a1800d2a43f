//! A thread's nice value.

use std::io;

/// Sets the calling thread's nice value (Linux's setpriority(2) on a thread
/// id acts on that thread alone). Lowering it below the process's needs
/// CAP_SYS_NICE or a large enough RLIMIT_NICE.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes integers only; `tid` names this thread, and
    // PRIO_PROCESS with a thread id changes that thread's value alone.
    let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    match done {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}
