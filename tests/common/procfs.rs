//! What /proc says about processes (state, parent, group, CPU time, limits),
//! their descriptors and pipes, and the kernel's TCP sockets.

use std::net::SocketAddr;
use std::time::Duration;

use super::poll;

/// The fields of /proc/PID/stat the tests use (proc(5) numbers them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    /// Field 3: R running, S sleeping, Z zombie, t stopped by a tracer, …
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 5: the process group.
    pub pgrp: i32,
    /// Field 6: the session.
    pub session: i32,
    /// Field 10: page faults that needed no I/O (a page mapped anew, say).
    pub minflt: u64,
    /// Fields 14 and 15, in clock ticks.
    pub utime: u64,
    pub stime: u64,
}

impl Stat {
    /// Parses the text of /proc/PID/stat. The command name (field 2) is in
    /// parentheses and may hold spaces and parentheses itself, so the other
    /// fields are counted from the last ')'.
    pub fn parse(text: &str) -> Option<Stat> {
        let pid = text.split(' ').next()?.parse().ok()?;
        let rest = text.get(text.rfind(')')? + 2..)?;
        let f: Vec<&str> = rest.split(' ').collect();
        Some(Stat {
            pid,
            state: f.first()?.chars().next()?,
            ppid: f.get(1)?.parse().ok()?,
            pgrp: f.get(2)?.parse().ok()?,
            session: f.get(3)?.parse().ok()?,
            minflt: f.get(7)?.parse().ok()?,
            utime: f.get(11)?.parse().ok()?,
            stime: f.get(12)?.parse().ok()?,
        })
    }
}

/// /proc/PID/stat; None once the process is gone (zombies are still there).
pub fn stat(pid: i32) -> Option<Stat> {
    Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A thread of a process: its id and its name (/proc/PID/task/TID/comm, at
/// most 15 bytes; a thread started without a name has its creator's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub tid: i32,
    pub comm: String,
}

/// The threads of `pid`, by thread id: the order they were started in.
pub fn threads(pid: i32) -> Vec<Task> {
    let mut out: Vec<Task> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some(Task {
                tid,
                comm: comm.trim_end_matches('\n').to_owned(),
            })
        })
        .collect();
    out.sort_by_key(|t| t.tid);
    out
}

/// /proc/PID/task/TID/stat: the state of one thread ('t': stopped by a tracer).
pub fn thread_stat(pid: i32, tid: i32) -> Option<Stat> {
    Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?)
}

/// Every process's stat (those that exit meanwhile are left out).
pub fn processes() -> Vec<Stat> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(stat)
        .collect()
}

/// Processes whose parent is `parent`, zombies included.
pub fn children_of(parent: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|s| s.ppid == parent)
        .map(|s| s.pid)
        .collect()
}

/// Live (not zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|s| s.pgrp == pgid && s.state != 'Z')
        .map(|s| s.pid)
        .collect()
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// Waits (up to a second) for `pid` to be gone: a process killed by the
/// daemon dies a moment after the signal, and only its parent could wait for it.
pub fn gone_soon(pid: i32) -> bool {
    poll(Duration::from_secs(1), || (!alive(pid)).then_some(())).is_some()
}

/// User plus system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let s = stat(pid).unwrap_or_else(|| panic!("no process {pid}"));
    s.utime + s.stime
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |t| t as u64)
}

/// The value of `name` in /proc/PID/status (`SigIgn`, `Uid`, `VmRSS`, …).
pub fn status_field(pid: i32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// A signal mask of /proc/PID/status (`SigBlk`, `SigIgn`, `SigCgt`).
pub fn signal_mask(pid: i32, name: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, name), 16).unwrap()
}

/// Anonymous memory of `pid` in KiB (/proc/PID/smaps_rollup): its heap,
/// its threads' stacks and its other private mappings.
pub fn anonymous_kib(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no Anonymous in /proc/{pid}/smaps_rollup"))
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let v = status_field(pid, "VmRSS");
    v.trim_end_matches("kB").trim().parse().unwrap()
}

/// The soft and hard limit named `name` in /proc/PID/limits ("Max open files").
pub fn limits(pid: i32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name:?} in {text}"));
    let mut values = line[name.len()..].split_whitespace();
    (
        values.next().unwrap().to_owned(),
        values.next().unwrap().to_owned(),
    )
}

/// How many descriptors `pid` has open.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The open descriptors of `pid`: number and target (`pipe:[123]`, `socket:[…]`, paths).
pub fn fd_targets(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.to_string_lossy().into_owned()))
        })
        .collect();
    out.sort();
    out
}

/// How many of `pid`'s descriptors are pipes.
pub fn pipe_fd_count(pid: i32) -> usize {
    fd_targets(pid)
        .iter()
        .filter(|(_, t)| t.starts_with("pipe:"))
        .count()
}

/// The bytes queued in, and the capacity of, the pipe at descriptor `fd` of
/// `pid` (reopened through /proc, read-write so the open never blocks).
pub fn pipe_fill(pid: i32, fd: i32) -> Option<(u64, usize)> {
    use std::os::unix::fs::OpenOptionsExt;
    let pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .ok()?;
    let capacity = nix::fcntl::fcntl(&pipe, nix::fcntl::FcntlArg::F_GETPIPE_SZ).ok()?;
    let queued = rustix::io::ioctl_fionread(&pipe).ok()?;
    Some((queued, capacity as usize))
}

/// True while `pid` waits to write to its stdout, a full pipe: it sleeps,
/// in the kernel's pipe write where wchan tells (`pipe_write`,
/// `anon_pipe_write` since 6.x), and the pipe has no room for another page
/// (the reader may have taken part of the oldest one).
pub fn blocked_on_full_stdout(pid: i32) -> bool {
    if stat(pid).is_none_or(|s| s.state != 'S') {
        return false;
    }
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let in_pipe_write = wchan.ends_with("pipe_write") || wchan.is_empty() || wchan == "0";
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as usize);
    in_pipe_write
        && pipe_fill(pid, 1).is_some_and(|(queued, capacity)| queued as usize + page > capacity)
}

/// True while `pid` waits to write to its stdout, a socket (the default
/// transfer's socket pair): it sleeps in the kernel's wait for send buffer
/// room, where wchan tells (`sock_alloc_send_pskb`).
pub fn blocked_on_full_socket(pid: i32) -> bool {
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    stat(pid).is_some_and(|s| s.state == 'S')
        && wchan == "sock_alloc_send_pskb"
        && std::fs::read_link(format!("/proc/{pid}/fd/1"))
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
}

/// The send and receive queues (bytes not yet acknowledged, bytes not yet
/// read) of the TCP socket from `local` to `remote`, from /proc/net/tcp{,6}.
pub fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let table = match local {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    let (local, remote) = (proc_net_addr(local), proc_net_addr(remote));
    let text = std::fs::read_to_string(table).unwrap();
    text.lines().skip(1).find_map(|l| {
        // sl local_address rem_address st tx_queue:rx_queue …
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (tx, rx) = f.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// An address as /proc/net/tcp writes it: the address's 32-bit words in
/// host order, in hex, then the port.
fn proc_net_addr(addr: SocketAddr) -> String {
    let octets = match addr {
        SocketAddr::V4(a) => a.ip().octets().to_vec(),
        SocketAddr::V6(a) => a.ip().octets().to_vec(),
    };
    let words: String = octets
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes(w.try_into().unwrap())))
        .collect();
    format!("{words}:{:04X}", addr.port())
}
