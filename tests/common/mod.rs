//! Support for the integration tests, which run the real `splice-relay`
//! binary the way systemd does and look at it from outside only.
//!
//! # Layout
//! - [`daemon`]: the daemon under test, its notifications and its log;
//! - [`record`]: log lines, and the typed record of a connection's end;
//! - [`net`]: clients, alone or many at once;
//! - [`procfs`]: what /proc says about processes, threads, descriptors and
//!   sockets;
//! - [`hold`]: some of a process's threads held stopped with ptrace, the
//!   others running;
//! - [`cgroup`]: cgroups delegated to the daemon under test, as systemd
//!   delegates one with `Delegate=yes`;
//! - [`certs`]: certificates for the TLS tests, made with openssl;
//! - [`curl`]: curl as the HTTP tests' client;
//! - [`ws`]: WebSocket clients: Python's and node's, and one that writes
//!   frames by hand.
//!
//! Tests that need root are marked
//! `#[cfg_attr(not(as_root), ignore = "needs root: …")]` and call
//! [`require_root`] first: build.rs sets `as_root` when the build runs as
//! root, so elsewhere they show as ignored, with the reason.
// Each test target uses a part of this.
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod cgroup;
pub mod curl;
pub mod daemon;
pub mod hold;
pub mod net;
pub mod procfs;
pub mod record;
pub mod ws;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use certs::*;
pub use cgroup::*;
pub use curl::*;
pub use daemon::*;
pub use hold::*;
pub use net::*;
pub use procfs::*;
pub use record::*;
pub use ws::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_splice-relay");

/// How long any wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Calls `check` every 5 ms until it gives Some, and returns that; None once
/// `patience` has passed. For what /proc shows, which nothing announces.
pub fn poll<T>(patience: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(t) = check() {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A one-service config running `command` (TOML array text) with `extra` lines.
pub fn one_service(command: &str, extra: &str) -> String {
    format!("[[service]]\nname = \"test\"\ncommand = {command}\nkill_grace = \"300ms\"\n{extra}\n")
}

/// `splice-relay --check --config PATH`, run to its end.
pub fn check_config(path: &std::path::Path) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("--check")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap()
}

/// The TOML array that runs `script` with `sh -c` (no double quotes in it).
pub fn sh(script: &str) -> String {
    assert!(!script.contains('"'), "{script}");
    format!(r#"["sh", "-c", "{script}"]"#)
}

/// A daemon serving [`one_service`] on one passed TCP socket, READY.
pub fn serve(command: &str, extra: &str) -> (Daemon, SocketAddr) {
    let (passed, addr) = pass_tcp("test");
    (
        Daemon::start(&one_service(command, extra), vec![passed]),
        addr,
    )
}

/// Reads a ledger that commands append to (O_APPEND, so lines never mix):
/// `start` before their work, another line after it. Returns the most
/// commands at work at once, how many still are, and how many started. The
/// ledger's running count bounds the commands alive at once from below.
pub fn ledger_peak(path: &std::path::Path, start: &str) -> (i64, i64, usize) {
    let (mut now, mut most, mut starts) = (0i64, 0i64, 0usize);
    for line in std::fs::read_to_string(path).unwrap().lines() {
        if line == start {
            now += 1;
            starts += 1;
        } else {
            now -= 1;
        }
        most = most.max(now);
    }
    (most, now, starts)
}

/// A count from the environment (a long run's size), or `default`.
pub fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{var}: a number")))
        .unwrap_or(default)
}

/// Writes `bytes` random bytes (from /dev/urandom) to `path`; returns their
/// sha256 in hex.
pub fn random_file(path: &std::path::Path, bytes: u64) -> String {
    let status = std::process::Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(path).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "head -c {bytes} /dev/urandom");
    sha256_of(path)
}

/// The sha256 of a file, in hex (`sha256sum`).
pub fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Called first by a test that needs root. Such a test is ignored unless the
/// build ran as root; a binary built as root and run by another user fails
/// here, saying why, rather than somewhere obscure.
pub fn require_root() {
    let euid = nix::unistd::geteuid();
    assert!(
        euid.is_root(),
        "this test needs root and runs as uid {euid}: it was built as root \
         (cfg as_root); build as this user to have it ignored"
    );
}
