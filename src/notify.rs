//! Talking to the service manager: READY, STATUS, WATCHDOG, RELOADING,
//! STOPPING. Without `NOTIFY_SOCKET` every call is a no-op, so the daemon runs
//! the same way outside systemd.
//!
//! Notifications are sent from the event loop, so a send must never block:
//! when the manager lags and its socket's queue is full
//! (`net.unix.max_dgram_qlen` datagrams), a blocking send would stop a worker
//! thread and with it every connection on that thread. So the socket is
//! nonblocking. A STATUS or WATCHDOG that finds the queue full is dropped (the
//! next one supersedes it); READY, RELOADING and STOPPING, which the manager
//! must see, are queued, in order, for one thread that waits for room. Either
//! way the episode is logged once.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::OnceLock;

use crate::episode::Episode;

/// The socket and address, set up on first use; None without NOTIFY_SOCKET.
static SOCKET: OnceLock<Option<(UnixDatagram, SocketAddr)>> = OnceLock::new();
/// While notifications find the manager's queue full.
static LAGGING: Episode = Episode::new();

fn socket() -> Option<&'static (UnixDatagram, SocketAddr)> {
    SOCKET
        .get_or_init(|| {
            let path = std::env::var_os("NOTIFY_SOCKET")?;
            let address = match address(&path) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "NOTIFY_SOCKET={path:?} is not usable; not notifying");
                    return None;
                }
            };
            let socket = UnixDatagram::unbound().and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(s)
            });
            match socket {
                Ok(s) => Some((s, address)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create a socket to notify the service manager");
                    None
                }
            }
        })
        .as_ref()
}

/// A path, or `@name` for an abstract socket.
fn address(path: &std::ffi::OsStr) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    match path.as_bytes() {
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        [b'/', ..] => SocketAddr::from_pathname(path),
        _ => Err(io::Error::other("neither an absolute path nor @abstract")),
    }
}

/// Sends one notification; `must_arrive` for the states the manager waits for.
fn send(message: String, must_arrive: bool) {
    let Some((socket, address)) = socket() else {
        return;
    };
    // Behind one already waiting: keep their order (READY after RELOADING).
    if must_arrive && PENDING.load(Ordering::Acquire) > 0 {
        return enqueue(message, address);
    }
    match socket.send_to_addr(message.as_bytes(), address) {
        Ok(_) => {
            if LAGGING.end() {
                tracing::info!("the service manager reads notifications again");
            }
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if LAGGING.begin() {
                tracing::warn!("the service manager's notification queue is full; dropping STATUS and WATCHDOG until it reads again");
            }
            if must_arrive {
                enqueue(message, address);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot notify the service manager"),
    }
}

/// Notifications that must arrive, waiting for room in the manager's queue.
static PENDING: AtomicUsize = AtomicUsize::new(0);
static QUEUE: OnceLock<Option<Sender<String>>> = OnceLock::new();

/// Hands a notification to the one thread that sends them in order, with a
/// blocking socket, as room frees in the manager's queue.
fn enqueue(message: String, address: &SocketAddr) {
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let address = address.clone();
        let started = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                let socket = UnixDatagram::unbound();
                for message in rx {
                    let sent = match &socket {
                        Ok(s) => s.send_to_addr(message.as_bytes(), &address).map(|_| ()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    };
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "cannot notify the service manager");
                    }
                    PENDING.fetch_sub(1, Ordering::Release);
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to notify the service manager");
                None
            }
        }
    });
    if let Some(tx) = queue {
        PENDING.fetch_add(1, Ordering::AcqRel);
        if tx.send(message).is_err() {
            PENDING.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Escapes a STATUS= text to one line.
fn status_line(status: &str) -> String {
    status.replace('\n', " ")
}

pub fn ready(status: &str) {
    send(format!("READY=1\nSTATUS={}", status_line(status)), true);
}

pub fn status(status: &str) {
    send(format!("STATUS={}", status_line(status)), false);
}

pub fn watchdog() {
    send("WATCHDOG=1".into(), false);
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd expects beside it.
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000);
    match now {
        Ok(usec) => send(format!("RELOADING=1\nMONOTONIC_USEC={usec}"), true),
        Err(_) => send("RELOADING=1".into(), true),
    }
}

pub fn stopping(status: &str) {
    send(format!("STOPPING=1\nSTATUS={}", status_line(status)), true);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, when
/// `WATCHDOG_PID` is unset or this process).
pub fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled()
}
