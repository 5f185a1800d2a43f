//! What /proc says about processes (state, parent, group, CPU time, limits)
//! and their descriptors.

use std::time::Duration;

use super::poll;

/// The fields of /proc/PID/stat the tests use (proc(5) numbers them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    /// Field 3: R running, S sleeping, Z zombie, …
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 5: the process group.
    pub pgrp: i32,
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
            utime: f.get(11)?.parse().ok()?,
            stime: f.get(12)?.parse().ok()?,
        })
    }
}

/// /proc/PID/stat; None once the process is gone (zombies are still there).
pub fn stat(pid: i32) -> Option<Stat> {
    Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
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
