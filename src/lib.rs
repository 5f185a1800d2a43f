//! splice-relay: a socket-activated daemon that runs a command for each
//! connection and moves the command's output to the client with splice(2).
//!
//! # Layout
//!
//! Start-up, in `main.rs`: inherited sockets → config → logging → listeners →
//! READY=1 → serve.
//!
//! - [`config`]: the TOML file, its defaults, and every check on it.
//! - [`listen`]: sockets adopted from systemd or bound from the config.
//! - [`server`]: accept loops, limits, reload, status, watchdog, stop.
//! - [`limit`]: the counted limits the accept loops wait on.
//! - [`admit`]: whether a client gets a command: PROXY header, access rules,
//!   per-source limits, rates, and refusal episodes in the log.
//! - [`access`]: the rules themselves: address ranges, per-source counts, token buckets.
//! - [`proxy`]: the PROXY protocol v1/v2 header.
//! - [`connection`]: one connection, from accept to its log record.
//! - [`child`]: the command: spawn, process group, termination, reaping.
//! - [`runas`]: the command's user, group, resource limits and nice value.
//! - [`relay`]: the splice loop that moves the bytes.
//! - [`reload`]: how `systemctl reload` waits until a file is applied.
//! - [`peer`]: who is connected, for the log and the command's environment.
//! - [`notify`]: sd_notify messages to systemd.
//! - [`log`]: journal or stderr logging.
//! - [`shutdown`]: the phases of stopping.
//! - `os`: a descriptor's blocking mode and error text, shared by the modules.
//! - `sys`: the only `unsafe` code: the spawn, and a few system calls behind safe functions.

pub mod access;
pub mod admit;
pub mod child;
pub mod config;
pub mod connection;
pub mod limit;
pub mod listen;
pub mod log;
pub mod notify;
mod os;
pub mod peer;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod runas;
pub mod server;
pub mod shutdown;
mod sys;

pub use sys::{cloexec_from_3, commands_get_nofile};

/// The first thing `main` does: descriptors 0-2 open, SIGCHLD at its default.
pub fn prepare_process() -> std::io::Result<()> {
    os::ensure_standard_fds()?;
    sys::default_sigchld()
}

/// Exit codes, as documented in the README and the man page.
pub mod exit {
    /// Stopped by SIGTERM or SIGINT, or `--check` found the config valid.
    pub const OK: u8 = 0;
    /// A listener or the runtime failed; systemd may restart the daemon.
    pub const FAILURE: u8 = 1;
    /// Configuration error (EX_CONFIG): fix the config or the socket units.
    pub const CONFIG: u8 = 78;
}
