//! Listening sockets: adopted from systemd (`LISTEN_FDS`) or bound from the config.
//!
//! Under socket activation every passed descriptor must be a listening stream
//! socket (TCP over IPv4/IPv6, or Unix); each is routed to the services whose
//! `socket_name` (else their name) is its `FileDescriptorName=`. Without socket
//! activation the `listen` addresses of the config are bound here, each once,
//! for the services that name it. A socket of several services is a
//! [`Site`], whose requests are routed by path.

use std::fmt;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{
    bind, getsockname, getsockopt, listen, setsockopt, socket, sockopt, AddressFamily, Backlog,
    SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
};

use crate::config::sites::{self, Site};
use crate::config::{Config, ListenAddr};
use crate::peer::Family;
use crate::sys;

/// A listening socket and the services it feeds.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub family: Family,
    pub key: Key,
    /// For logs: `fd 3 "web" 0.0.0.0:9009` or `127.0.0.1:9009`.
    pub label: String,
    /// A Unix socket file this process created and removes at exit.
    pub owned_path: Option<PathBuf>,
}

/// What routes a listener's connections to its services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// Passed by systemd under this FileDescriptorName=.
    Passed(String),
    /// Bound from this `listen` address.
    Bound(ListenAddr),
}

/// A socket passed by the service manager, not yet routed to a service.
#[derive(Debug)]
pub struct Inherited {
    pub fd: OwnedFd,
    pub number: RawFd,
    pub name: String,
}

/// A start-up error about sockets. `config` marks errors that a change of the
/// configuration (or of the socket units) fixes, which exit with EX_CONFIG.
#[derive(Debug)]
pub struct SocketError {
    pub message: String,
    pub config: bool,
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SocketError {}

fn config_error(message: String) -> SocketError {
    SocketError {
        message,
        config: true,
    }
}

/// Takes the sockets systemd passed, if any. Call first thing in `main`, before
/// any other descriptor is opened, so that numbers 3.. are still the passed ones.
/// The second value is a warning for the log, which does not exist yet: set
/// when `LISTEN_FDS` is set but meant for another process.
///
/// This reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` through sd-notify
/// rather than listenfd: listenfd ignores `LISTEN_FDNAMES` (which routes sockets
/// to services here), accepts a missing `LISTEN_PID`, skips malformed values
/// without a word, and removes the variables from the process environment, which
/// this daemon reads once and never changes.
pub fn inherited() -> Result<(Vec<Inherited>, Option<String>), SocketError> {
    // LISTEN_PID first: variables meant for another process (inherited from
    // a parent that was socket-activated) are ignored whatever else they say,
    // LISTEN_FDNAMES included.
    let Some(fds) = std::env::var_os("LISTEN_FDS") else {
        return Ok((Vec::new(), None));
    };
    let me = std::process::id();
    match std::env::var("LISTEN_PID").ok().map(|p| (p.trim().parse::<u32>(), p)) {
        Some((Ok(pid), _)) if pid == me => {}
        Some((Ok(pid), _)) => {
            return Ok((
                Vec::new(),
                Some(format!(
                    "LISTEN_FDS is set but LISTEN_PID is not this process ({pid}, not {me}); ignoring them"
                )),
            ))
        }
        None => {
            return Ok((
                Vec::new(),
                Some("LISTEN_FDS is set but LISTEN_PID is not this process (it is unset); ignoring them".into()),
            ))
        }
        Some((Err(_), text)) => {
            return Err(config_error(format!(
                "socket activation: invalid LISTEN_PID={text:?}: not a process id"
            )))
        }
    }
    let passed = sd_notify::listen_fds_with_names().map_err(|e| {
        config_error(format!(
            "socket activation: {e} (LISTEN_PID={:?}, LISTEN_FDS={:?}, LISTEN_FDNAMES={:?})",
            std::env::var("LISTEN_PID").unwrap_or_default(),
            fds,
            std::env::var("LISTEN_FDNAMES").unwrap_or_default(),
        ))
    })?;
    let mut out = Vec::with_capacity(passed.len());
    for (number, name) in passed {
        let fd = sys::adopt_inherited_fd(number).map_err(|e| {
            config_error(format!(
                "socket activation: LISTEN_FDS={fds:?} but fd {number} ({name:?}) is not open: {}",
                crate::fdio::reason(&e)
            ))
        })?;
        out.push(Inherited { fd, number, name });
    }
    let none = out.is_empty().then(|| {
        "LISTEN_FDS=0: socket activation passed no sockets; binding the configured addresses"
            .to_owned()
    });
    Ok((out, none))
}

/// Checks each passed socket and routes it to a service.
pub fn adopt(inherited: Vec<Inherited>, config: &Config) -> Result<Vec<Listener>, SocketError> {
    let mut out = Vec::with_capacity(inherited.len());
    for Inherited { fd, number, name } in inherited {
        let what = format!("fd {number} ({name:?})");
        let (family, local) =
            check_listening(&fd).map_err(|m| config_error(format!("{what}: {m}")))?;
        crate::fdio::set_nonblocking(&fd, true).map_err(|e| SocketError {
            message: format!("{what}: {e}"),
            config: false,
        })?;
        let label = format!("fd {number} {name:?} {local}");
        let listener = Listener {
            fd,
            family,
            key: Key::Passed(name),
            label,
            owned_path: None,
        };
        check_routes(config, [(&listener.key, listener.label.as_str())]).map_err(config_error)?;
        out.push(listener);
    }
    for s in &config.services {
        let serves = |l: &Listener| {
            route(config, &l.key)
                .is_some_and(|site| site.services().iter().any(|r| r.name == s.name))
        };
        if !out.iter().any(serves) {
            tracing::warn!(service = %s.name, "no socket passed for this service; it serves nothing");
        }
    }
    Ok(out)
}

/// The services a listener's connections go to under `config`.
pub fn route(config: &Config, key: &Key) -> Option<Site> {
    match key {
        Key::Passed(name) => sites::of_socket(&config.services, name),
        Key::Bound(addr) => sites::of_address(&config.services, addr),
    }
}

/// Proves every listener has a service under `config`: at start, and before a
/// reloaded config replaces the running one.
pub fn check_routes<'a>(
    config: &Config,
    listeners: impl IntoIterator<Item = (&'a Key, &'a str)>,
) -> Result<(), String> {
    for (key, label) in listeners {
        if route(config, key).is_some() {
            continue;
        }
        let names: Vec<_> = config.services.iter().map(|s| s.name.as_str()).collect();
        let names = names.join(", ");
        let (what, fix) = match key {
            Key::Passed(name) => (
                format!("is named {name:?} (services: {names}), nor has socket_name = {name:?}"),
                "set FileDescriptorName= in the .socket unit to a service's name or socket_name",
            ),
            Key::Bound(addr) => (
                format!("listens on {addr} (services: {names})"),
                "sockets bound from `listen` change only with a restart",
            ),
        };
        return Err(format!(
            "{label}: no [[service]] in {} {what}; {fix}",
            config.origin
        ));
    }
    Ok(())
}

/// Binds every `listen` address of the config (without socket activation).
pub fn bind_all(config: &Config) -> Result<Vec<Listener>, SocketError> {
    let mut out = Vec::new();
    for s in &config.services {
        if s.listen.is_empty() {
            return Err(config_error(format!(
                "{}: listen: no address given, and the daemon is not socket-activated \
                 (no LISTEN_FDS); give `listen` or start it through its .socket unit",
                s.position
            )));
        }
        for addr in &s.listen {
            // Services that name the same address share its socket.
            if out
                .iter()
                .any(|l: &Listener| l.key == Key::Bound(addr.clone()))
            {
                continue;
            }
            let (fd, family, owned_path) = bind_one(addr).map_err(|e| SocketError {
                message: format!("{}: listen: cannot listen on {addr}: {e}", s.position),
                config: false,
            })?;
            let local = local_address(&fd).unwrap_or_else(|| addr.to_string());
            out.push(Listener {
                fd,
                family,
                key: Key::Bound(addr.clone()),
                label: local,
                owned_path,
            });
        }
    }
    Ok(out)
}

fn bind_one(addr: &ListenAddr) -> nix::Result<(OwnedFd, Family, Option<PathBuf>)> {
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    match addr {
        ListenAddr::Tcp(a) => {
            let family = if a.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Stream, flags, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrStorage::from(*a),
            )?;
            listen(&fd, Backlog::MAXCONN)?;
            Ok((fd, Family::Tcp, None))
        }
        ListenAddr::Unix(path) => {
            remove_stale_socket(path);
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &UnixAddr::new(path.as_path())?,
            )?;
            listen(&fd, Backlog::MAXCONN)?;
            Ok((fd, Family::Unix, Some(path.clone())))
        }
    }
}

/// Removes a Unix socket file left by an earlier run, but only when nothing
/// answers on it, so a second instance cannot steal a live one's path.
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket
        && std::os::unix::net::UnixStream::connect(path)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Proves `fd` is a listening stream socket; returns its family and address.
fn check_listening(fd: &OwnedFd) -> Result<(Family, String), String> {
    let kind = getsockopt(fd, sockopt::SockType).map_err(|e| format!("not a socket ({e})"))?;
    if kind != SockType::Stream {
        return Err(format!(
            "a {kind:?} socket; expected a stream socket (ListenStream=)"
        ));
    }
    if !getsockopt(fd, sockopt::AcceptConn).map_err(|e| e.to_string())? {
        return Err("a stream socket that is not listening".into());
    }
    let addr: SockaddrStorage =
        getsockname(std::os::fd::AsRawFd::as_raw_fd(fd)).map_err(|e| e.to_string())?;
    let family = match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Family::Tcp,
        Some(AddressFamily::Unix) => Family::Unix,
        other => {
            return Err(format!(
                "an {other:?} socket; expected TCP (IPv4/IPv6) or Unix"
            ))
        }
    };
    Ok((family, addr.to_string()))
}

fn local_address(fd: &OwnedFd) -> Option<String> {
    getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(fd))
        .ok()
        .map(|a| a.to_string())
}
