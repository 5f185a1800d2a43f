//! Logging: structured records to the journal under systemd, readable lines
//! on stderr otherwise.
//!
//! Fields are written as journal fields (`service` becomes `SERVICE`, and so on)
//! so that `journalctl -u splice-relay SERVICE=name` selects one service. The
//! filter comes from `RUST_LOG` when set, else from the config's `log_level`,
//! and follows the config on reload.
//!
//! # Never blocked by its own log
//!
//! No thread that logs writes to the log itself. A record is formatted
//! where it is logged (the readable line, or the journal's native-protocol
//! datagram) and put in a bounded queue; one thread of its own writes the
//! queue out, and is the only one that waits on a stderr pipe nobody drains
//! or on a journald that lags. Records that find the queue full are dropped
//! and counted, and once the writer catches up (at most once a second) one
//! warning says how many were lost.
//!
//! Under pressure a command's stderr lines (records with a `stream` field)
//! go first: they are queued only while the queue holds less than
//! `STDERR_SHARE` (1 MiB), everything else (the connections' records
//! above all) up to `CAPACITY` (4 MiB). One queue, so the log keeps the
//! order in which records were logged.
//!
//! Before the event loop runs and after it has ended, the main thread waits
//! for its own records to be written, and dropping [`Level`] (as the daemon
//! stops) waits for what is queued: an exit right after does not lose them.
//! Each such wait gives up after `PATIENCE` (1 s) without progress, and
//! none waits again until the writer has made some.

mod journal;
mod queue;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use journal::{Journal, JOURNAL_SOCKET};
use queue::{Output, Queued, Sink};

/// Changes the log filter of a running daemon. Dropped as the daemon stops,
/// it waits for the queued records to be written (see the module
/// documentation).
pub struct Level {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    sink: Arc<Sink>,
}

impl Level {
    /// Applies the config's `log_level`, unless `RUST_LOG` decides.
    pub fn set(&self, level: &str) {
        if let (Some(h), Ok(filter)) = (&self.handle, level.parse::<EnvFilter>()) {
            let _ = h.reload(filter);
        }
    }
}

impl Drop for Level {
    fn drop(&mut self) {
        self.sink.flush();
    }
}

/// Installs the global subscriber and starts the thread that writes the
/// log. `level` is the config's `log_level`.
pub fn init(level: &str) -> Level {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<EnvFilter>().ok());
    let env_decides = from_env.is_some();
    let filter =
        from_env.unwrap_or_else(|| level.parse().unwrap_or_else(|_| EnvFilter::new("info")));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);

    let journal = if stderr_is_journal() {
        Output::journal(Path::new(JOURNAL_SOCKET)).ok()
    } else {
        None
    };
    let sink = match journal {
        Some(output) => {
            let sink = Sink::start(output);
            registry.with(Journal::new(Arc::clone(&sink))).init();
            sink
        }
        None => {
            let sink = Sink::start(Output::Stream(Box::new(io::stderr())));
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(Queued(Arc::clone(&sink)))
                        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
                        .with_target(false),
                )
                .init();
            sink
        }
    };
    Level {
        handle: (!env_decides).then_some(handle),
        sink,
    }
}

/// True when stderr is connected to the journal: systemd sets `JOURNAL_STREAM`
/// to the device and inode of that stream, and we check it is still ours
/// (a shell started from a unit inherits the variable, but not the stream).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(io::stderr().as_fd()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}
