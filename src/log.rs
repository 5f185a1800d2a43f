//! Logging: structured records to the journal under systemd, readable lines
//! on stderr otherwise.
//!
//! Fields are written as journal fields (`service` becomes `SERVICE`, and so on)
//! so that `journalctl -u splice-relay SERVICE=name` selects one service. The
//! filter comes from `RUST_LOG` when set, else from the config's `log_level`,
//! and follows the config on reload.

use std::os::fd::AsFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the log filter of a running daemon.
pub struct Level {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

impl Level {
    /// Applies the config's `log_level`, unless `RUST_LOG` decides.
    pub fn set(&self, level: &str) {
        if let (Some(h), Ok(filter)) = (&self.handle, level.parse::<EnvFilter>()) {
            let _ = h.reload(filter);
        }
    }
}

/// Installs the global subscriber. `level` is the config's `log_level`.
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
        tracing_journald::layer()
            .map(|l| {
                l.with_field_prefix(None)
                    .with_syslog_identifier("splice-relay".into())
            })
            .ok()
    } else {
        None
    };
    match journal {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_target(false),
            )
            .init(),
    }
    Level {
        handle: (!env_decides).then_some(handle),
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
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}
