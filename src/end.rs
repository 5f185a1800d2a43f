//! Why a connection ended ([`End`]: its record's `REASON`), and how it
//! ends: the one end policy ([`Ending`]), which every transport and protocol
//! follows.
//!
//! # The policy
//!
//! | the end | the command | the client |
//! |---|---|---|
//! | the output ended | `kill_grace` to exit on its own | [`Farewell::Complete`] |
//! | the command exited (with `transfer = "direct"`, or its output held by a process that left) | (it has exited) | [`Farewell::Complete`] |
//! | `max_bytes` | SIGTERM at once | [`Farewell::Complete`] |
//! | `timeout`, `idle_timeout`, the stop, an error | SIGTERM at once | [`Farewell::Cut`] |
//! | a shared command's client fell `max_lag` behind (`lagging`) | (it goes on for the others) | [`Farewell::Cut`] |
//! | the client left, closed, or broke its protocol | SIGTERM at once | [`Farewell::Abrupt`] |
//!
//! After the SIGTERM every process the command contains gets `kill_grace`,
//! then SIGKILL (`command`). The client's side never waits longer than
//! `kill_grace` either.
//!
//! Once the command is reaped, its record may tell more than the end did
//! ([`End::after_exit`]): output that ended because the OOM killer killed
//! the command is `oom-killed`.

use std::fmt;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;

use crate::fdio::{self, Class};

/// Why a connection ended: its record's `REASON` and the detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    OutputEnded,
    CommandExited,
    /// The command exited, and a process outside its process group kept its
    /// output open (`command-exited`).
    OutputHeld,
    ClientGone(Errno),
    Shutdown,
    Timeout,
    IdleTimeout,
    MaxBytes,
    Error(String),
    SpawnFailed(String),
    /// TLS: the client broke the record layer (a bad or forged record, a
    /// fatal alert), or the kernel refused the session's keys.
    Tls(String),
    /// WebSocket: the client sent a close frame, with this code if any (a
    /// code no endpoint may send is a `ProtocolError`).
    ClientClosed(Option<u16>),
    /// WebSocket: the client closed the connection without a close frame
    /// (`client-gone`).
    Unannounced,
    /// WebSocket: an invalid frame, or a close code no endpoint may send
    /// (closed with 1002); HTTP: a malformed request body, or one cut short.
    ProtocolError(String),
    /// WebSocket: a text message that is not UTF-8 (closed with 1007).
    InvalidUtf8,
    /// WebSocket: a message over `max_message_size` (closed with 1009);
    /// HTTP: a request body over `max_body_size` (413 if nothing was sent).
    MessageTooBig(String),
    /// WebSocket: no pong within `ping_interval`.
    PingTimeout,
    /// A browser's plain GET got the console page (`console = true`).
    Page,
    /// HTTP: a HEAD request got the response's headers alone (no command).
    HeadersOnly,
    /// A client of a shared command fell more than `max_lag` behind it.
    Lagging,
    /// The OOM killer killed the command (its main process died of SIGKILL,
    /// and its cgroup's `memory.events` counts OOM kills): known once the
    /// command is reaped, in place of the end its death caused.
    OomKilled,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
    /// It could not be reaped (logged); never expected.
    Unknown,
}

impl fmt::Display for Exit {
    /// `0`, `1`, … or a signal name such as `SIGTERM`: one field, always present.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "{c}"),
            Exit::Signal(s) => f.write_str(s.as_str()),
            Exit::Unknown => f.write_str("unknown"),
        }
    }
}

impl End {
    /// The client left (a close, a reset, a WebSocket close): before its
    /// command started, such ends are counted in episodes, not recorded one
    /// by one (see `admit`).
    pub fn is_departure(&self) -> bool {
        matches!(
            self,
            End::ClientGone(_) | End::Unannounced | End::ClientClosed(_)
        )
    }

    /// The client's socket said `e`: it is gone, or, on the kernel's TLS,
    /// it sent a record that does not verify (`EBADMSG`).
    pub fn gone(e: Errno) -> End {
        match e {
            Errno::EBADMSG => End::Tls("a record that does not verify (the kernel's TLS)".into()),
            e => End::ClientGone(e),
        }
    }

    /// Reading the command's output failed with `e`.
    pub fn reading_output(e: Errno) -> End {
        End::Error(format!("reading the command's output: {}", e.desc()))
    }

    /// What an errno on the client's side means, `doing` what.
    pub fn client_error(e: Errno, doing: &str) -> End {
        match fdio::class(e) {
            Class::Disconnect => End::gone(e),
            _ => End::Error(format!("{doing}: {}", e.desc())),
        }
    }

    /// The end the record gives once the command is reaped, with its exit
    /// and its cgroup's `oom_kill` count (None without the memory
    /// controller): an end the command's side caused (its output ended, it
    /// exited) is `oom-killed` when SIGKILL ended the command and the OOM
    /// killer killed in its cgroup. Any other end came first, and a SIGKILL
    /// after it may be the daemon's own.
    pub fn after_exit(self, exit: &Exit, oom_kills: Option<u64>) -> End {
        let commands_end = matches!(
            self,
            End::OutputEnded | End::CommandExited | End::OutputHeld
        );
        let killed = matches!(exit, Exit::Signal(Signal::SIGKILL));
        if commands_end && killed && oom_kills.is_some_and(|n| n > 0) {
            End::OomKilled
        } else {
            self
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            End::OutputEnded => "output-ended",
            End::CommandExited | End::OutputHeld => "command-exited",
            End::ClientGone(_) | End::Unannounced => "client-gone",
            End::Shutdown => "shutdown",
            End::Timeout => "timeout",
            End::IdleTimeout => "idle-timeout",
            End::MaxBytes => "max-bytes",
            End::Error(_) => "error",
            End::SpawnFailed(_) => "spawn-failed",
            End::Tls(_) => "tls-error",
            End::ClientClosed(_) => "client-closed",
            End::ProtocolError(_) => "protocol-error",
            End::InvalidUtf8 => "invalid-utf8",
            End::MessageTooBig(_) => "message-too-big",
            End::PingTimeout => "ping-timeout",
            End::Page => "page",
            End::HeadersOnly => "headers-only",
            End::OomKilled => "oom-killed",
            End::Lagging => "lagging",
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())?;
        match self {
            End::ClientGone(e) => write!(f, " ({})", e.desc()),
            End::OutputHeld => f.write_str(
                " (its output is held open by a process that left its process group; \
                 no longer waited for, kill_grace after the group was killed)",
            ),
            End::Error(e)
            | End::SpawnFailed(e)
            | End::Tls(e)
            | End::ProtocolError(e)
            | End::MessageTooBig(e) => {
                write!(f, " ({e})")
            }
            End::ClientClosed(Some(code)) => write!(f, " (close code {code})"),
            End::ClientClosed(None) => f.write_str(" (no close code)"),
            End::Unannounced => f.write_str(" (closed the connection without a close frame)"),
            End::OomKilled => f.write_str(" (the OOM killer killed the command)"),
            End::Lagging => f.write_str(" (more than max_lag behind the shared command)"),
            _ => Ok(()),
        }
    }
}

/// What the client's side gets at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    /// The output is complete (or cut at `max_bytes`, which the client asked
    /// for by connecting to such a service): everything sent arrives, then
    /// the end of the output (raw: end-of-file; TLS: a close_notify before
    /// it; WebSocket: a close frame), and the daemon reads until the client
    /// closes too, so that unread input cannot turn the close into a reset
    /// that destroys output in flight.
    Complete,
    /// The daemon cuts the connection (a limit of time, the stop, an
    /// error): a protocol that can say why says so and waits for the
    /// client's answer (WebSocket: a close frame with its code); a raw
    /// connection is closed at once, and over TLS without a close_notify,
    /// which would claim the output complete.
    Cut,
    /// The client is gone, closed, or broke its protocol: nothing is waited
    /// for (a WebSocket client that broke the protocol is told the code,
    /// best effort).
    Abrupt,
}

/// How a connection ends after an [`End`]: the one policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    /// How long the command may take to exit on its own before SIGTERM.
    pub patience: Duration,
    /// What the client gets.
    pub farewell: Farewell,
    /// The longest the client's side may take (`kill_grace`).
    pub grace: Duration,
}

impl Ending {
    /// The policy: see the module's table. `grace` is the service's `kill_grace`.
    pub fn after(end: &End, grace: Duration) -> Ending {
        let farewell = match end {
            // (oom-killed is known only after the end: its output had ended.)
            End::OutputEnded
            | End::CommandExited
            | End::OutputHeld
            | End::OomKilled
            | End::MaxBytes => Farewell::Complete,
            End::Shutdown
            | End::Timeout
            | End::IdleTimeout
            | End::Error(_)
            | End::SpawnFailed(_)
            | End::Lagging => Farewell::Cut,
            End::ClientGone(_)
            | End::Tls(_)
            | End::ClientClosed(_)
            | End::Unannounced
            | End::ProtocolError(_)
            | End::InvalidUtf8
            | End::MessageTooBig(_)
            | End::PingTimeout
            | End::Page
            | End::HeadersOnly => Farewell::Abrupt,
        };
        // Only a command whose output has ended is on its way out by itself;
        // at max_bytes it is still writing, and nobody reads it any more.
        let exiting = matches!(
            end,
            End::OutputEnded | End::CommandExited | End::OutputHeld | End::OomKilled
        );
        Ending {
            patience: if exiting { grace } else { Duration::ZERO },
            farewell,
            grace,
        }
    }

    /// The client gets the rest of the output and an orderly end.
    pub fn is_complete(&self) -> bool {
        self.farewell == Farewell::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module's table, row by row: every end, what the command gets
    /// and what the client gets.
    #[test]
    fn each_end_ends_the_way_the_policy_table_says() {
        use Farewell::*;
        let g = Duration::from_millis(700);
        let z = Duration::ZERO;
        let table: &[(End, Duration, Farewell)] = &[
            (End::OutputEnded, g, Complete),
            (End::CommandExited, g, Complete),
            (End::OutputHeld, g, Complete),
            (End::MaxBytes, z, Complete),
            (End::Timeout, z, Cut),
            (End::IdleTimeout, z, Cut),
            (End::Shutdown, z, Cut),
            (End::Error("x".into()), z, Cut),
            (End::SpawnFailed("x".into()), z, Cut),
            (End::ClientGone(Errno::ECONNRESET), z, Abrupt),
            (End::Tls("x".into()), z, Abrupt),
            (End::ClientClosed(Some(1000)), z, Abrupt),
            (End::Unannounced, z, Abrupt),
            (End::ProtocolError("x".into()), z, Abrupt),
            (End::InvalidUtf8, z, Abrupt),
            (End::MessageTooBig("x".into()), z, Abrupt),
            (End::PingTimeout, z, Abrupt),
            (End::Page, z, Abrupt),
            (End::HeadersOnly, z, Abrupt),
            (End::OomKilled, g, Complete),
            (End::Lagging, z, Cut),
        ];
        for (end, patience, farewell) in table {
            let ending = Ending::after(end, g);
            assert_eq!(
                (ending.patience, ending.farewell, ending.grace),
                (*patience, *farewell, g),
                "{end}"
            );
            assert_eq!(ending.is_complete(), *farewell == Complete, "{end}");
        }
    }

    /// oom-killed: the command's own end, SIGKILL, and an OOM kill counted;
    /// without any of the three the end stays what it was.
    #[test]
    fn a_command_the_oom_killer_killed_is_oom_killed() {
        let kill = Exit::Signal(Signal::SIGKILL);
        let term = Exit::Signal(Signal::SIGTERM);
        let table: &[(End, Exit, Option<u64>, &str)] = &[
            (End::OutputEnded, kill, Some(1), "oom-killed"),
            (End::CommandExited, kill, Some(2), "oom-killed"),
            (End::OutputHeld, kill, Some(1), "oom-killed"),
            // No OOM kill, or no memory controller to count them.
            (End::OutputEnded, kill, Some(0), "output-ended"),
            (End::OutputEnded, kill, None, "output-ended"),
            // A child was OOM-killed; the command ended otherwise.
            (End::OutputEnded, Exit::Code(1), Some(1), "output-ended"),
            (End::OutputEnded, term, Some(1), "output-ended"),
            (
                End::CommandExited,
                Exit::Code(137),
                Some(1),
                "command-exited",
            ),
            // The daemon ended it first, and may have sent the SIGKILL.
            (End::Timeout, kill, Some(1), "timeout"),
            (End::MaxBytes, kill, Some(1), "max-bytes"),
            (End::ClientGone(Errno::EPIPE), kill, Some(1), "client-gone"),
            (End::Shutdown, kill, Some(1), "shutdown"),
        ];
        for (end, exit, oom_kills, reason) in table {
            let after = end.clone().after_exit(exit, *oom_kills);
            assert_eq!(after.reason(), *reason, "{end}, exit {exit}, {oom_kills:?}");
        }
        assert_eq!(
            End::OomKilled.to_string(),
            "oom-killed (the OOM killer killed the command)"
        );
    }

    #[test]
    fn a_bad_record_on_the_kernels_tls_is_a_tls_error() {
        assert_eq!(End::gone(Errno::EBADMSG).reason(), "tls-error");
        assert_eq!(End::gone(Errno::EPIPE), End::ClientGone(Errno::EPIPE));
        assert_eq!(
            End::client_error(Errno::EINVAL, "writing").to_string(),
            "error (writing: Invalid argument)"
        );
    }
}
