//! Holding chosen threads of a process still with ptrace while its other
//! threads run on: what a stalled event loop looks like from outside.
//! PTRACE_SEIZE and PTRACE_INTERRUPT stop a thread wherever it is, without a
//! signal the process could see. ptrace ties a stopped thread to the thread
//! that stopped it, so the test thread that holds releases too (on drop, a
//! panic included).

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::procfs::{thread_stat, Task};

/// Threads held stopped; released when dropped.
pub struct HeldThreads {
    pid: i32,
    /// Each thread, and the signal it was about to take when it stopped,
    /// handed back at the release.
    held: Vec<(Task, Option<Signal>)>,
}

impl HeldThreads {
    /// Stops each of `threads` (threads of `pid`) and returns once every one
    /// has stopped.
    pub fn hold(pid: i32, threads: &[Task]) -> HeldThreads {
        let mut held = HeldThreads {
            pid,
            held: Vec::new(),
        };
        for task in threads {
            let tid = Pid::from_raw(task.tid);
            ptrace::seize(tid, ptrace::Options::empty())
                .unwrap_or_else(|e| panic!("PTRACE_SEIZE {task:?} of {pid}: {e}"));
            held.held.push((task.clone(), None));
            ptrace::interrupt(tid)
                .unwrap_or_else(|e| panic!("PTRACE_INTERRUPT {task:?} of {pid}: {e}"));
            let signal = loop {
                match waitpid(tid, Some(WaitPidFlag::__WALL)) {
                    // The interrupt's stop.
                    Ok(WaitStatus::PtraceEvent(..)) => break None,
                    // Stopped on the way to a signal: it stays there, and
                    // takes the signal once released.
                    Ok(WaitStatus::Stopped(_, signal)) => break Some(signal),
                    Err(Errno::EINTR) => continue,
                    other => panic!("{task:?} of {pid} did not stop: {other:?}"),
                }
            };
            held.held.last_mut().unwrap().1 = signal;
        }
        held
    }

    /// The threads held.
    pub fn threads(&self) -> Vec<Task> {
        self.held.iter().map(|(t, _)| t.clone()).collect()
    }

    /// True while every thread held is in its stop ('t' in
    /// /proc/PID/task/TID/stat).
    pub fn all_stopped(&self) -> bool {
        self.held
            .iter()
            .all(|(t, _)| thread_stat(self.pid, t.tid).is_some_and(|s| s.state == 't'))
    }

    /// Lets every thread go on.
    pub fn release(self) {}
}

impl Drop for HeldThreads {
    fn drop(&mut self) {
        for (task, signal) in self.held.drain(..) {
            // Fails only once the thread is gone.
            let _ = ptrace::detach(Pid::from_raw(task.tid), signal);
        }
    }
}
