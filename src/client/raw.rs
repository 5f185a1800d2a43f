//! Raw bytes: the command's output goes to the client as it comes, and the
//! client's bytes to the command's stdin (or are read and dropped), by the
//! relay's loops; the client's half-close is the command's end-of-file.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;

use crate::command::Input;
use crate::end::{End, Ending, Farewell};
use crate::fdio::{self, Class};
use crate::record::Traffic;
use crate::relay::{self, Count, Failed, Mode, Pumped, Side};

/// A raw client's side of the transfer.
pub struct Raw<'a> {
    /// The plaintext side of the client's transport.
    pub socket: &'a AsyncFd<OwnedFd>,
    /// The command's output.
    pub output: &'a AsyncFd<OwnedFd>,
    pub input: Input,
    /// How the output moves (splice, or copy through a buffer).
    pub mode: Mode,
    /// The most one call moves.
    pub chunk: usize,
    /// What `max_bytes` leaves of the output.
    pub budget: Option<u64>,
    /// Shared: a bulk stream counts its bytes from a thread of its own.
    pub traffic: &'a Arc<Traffic>,
}

impl Raw<'_> {
    /// Moves the output to the client until it ends (or `max_bytes` of it
    /// has gone, or the client fails), and the client's bytes to the
    /// command meanwhile.
    pub async fn pump(&mut self) -> End {
        let (socket, output, traffic) = (self.socket, self.output, self.traffic);
        let mut stdin = std::mem::replace(&mut self.input, Input::Null);
        let end = {
            let out = relay::pump(
                output,
                socket,
                self.mode,
                self.chunk,
                (self.budget, Count::Writes),
                sent_to(traffic),
            );
            let input = feed(socket, output, &mut stdin, self.mode, self.chunk, traffic);
            // After the client's end, what tells that it left for good;
            // boxed when it starts, so that only a connection whose client
            // has half-closed makes room for it.
            let departed = async { Box::pin(fdio::departed(socket)).await };
            tokio::pin!(out, input, departed);
            let mut input_open = true;
            loop {
                tokio::select! {
                    r = &mut out => break match r {
                        Ok(Pumped::EndOfFile) => End::OutputEnded,
                        Ok(Pumped::Limit) => End::MaxBytes,
                        // The command's side: a socket pair it closed with
                        // input left unread says ECONNRESET, not end-of-file.
                        Err(f) if f.side == Side::Source && fdio::class(f.errno) == Class::Disconnect => End::OutputEnded,
                        Err(f) => End::client_error(f.errno, "relaying output"),
                    },
                    r = &mut input, if input_open => match r {
                        Ok(()) => input_open = false,
                        Err(e) => break End::client_error(e, "reading from the client"),
                    },
                    e = &mut departed, if !input_open => break End::gone(e),
                }
            }
        };
        // Once the output has ended, so has the input, as with a pipe that
        // closes.
        stdin.close(output);
        end
    }

    /// The raw farewell: after a complete output, the end of it (and on the
    /// kernel's TLS its close_notify), then the client's close awaited;
    /// after any other end, nothing. True when the output was ended in order.
    pub async fn close(self, ending: &Ending) -> bool {
        if ending.farewell != Farewell::Complete {
            return false;
        }
        fdio::end_output(self.socket.get_ref());
        linger(self.socket, ending.grace, self.traffic).await;
        true
    }
}

/// Counts the bytes that went to the client.
fn sent_to(traffic: &Arc<Traffic>) -> impl FnMut(usize) + Clone + Send + 'static {
    let traffic = Arc::clone(traffic);
    move |n| traffic.sent(n)
}

/// The client's bytes to the command's stdin, until the client half-closes
/// (the command's end-of-file); then, or when the command takes no more, or
/// without a stdin, they are read and dropped, so a reset is seen at once.
/// Ok when the client has half-closed.
async fn feed(
    socket: &AsyncFd<OwnedFd>,
    output: &AsyncFd<OwnedFd>,
    input: &mut Input,
    mode: Mode,
    chunk: usize,
    traffic: &Arc<Traffic>,
) -> Result<(), Errno> {
    if let Some(to) = input.fd(output) {
        // Into a socket pair splice cannot go; into a pipe it can.
        let mode = if matches!(input, Input::Pair) {
            Mode::Copy
        } else {
            mode
        };
        let counted = (None, Count::Reads);
        // Boxed: only a connection whose command reads the client makes
        // room for this pump, not every raw connection's future.
        let traffic = Arc::clone(traffic);
        let received = move |n| traffic.received(n);
        let fed = Box::pin(relay::pump(socket, to, mode, chunk, counted, received)).await;
        match fed {
            Ok(_) => {
                input.close(output);
                return Ok(());
            }
            Err(f) if commands_end(f) => input.close(output),
            Err(f) => return Err(f.errno),
        }
    }
    fdio::discard(socket, |n| traffic.dropped(n as u64)).await
}

/// Whether an input pump stopped because the command closed its end (EPIPE
/// writing to it; a socket pair also says ECONNRESET), not the client.
fn commands_end(f: Failed) -> bool {
    match f.side {
        Side::Destination => fdio::class(f.errno) == Class::Disconnect,
        // splice: a pipe says EPIPE; the client's socket would say ECONNRESET.
        Side::Either => f.errno == Errno::EPIPE,
        Side::Source => false,
    }
}

/// After shutting down our side, reads until the client closes too (for at
/// most `limit`). Closing with unread input would send a reset, which can
/// destroy output still in flight to the client. True when the client closed.
pub async fn linger(socket: &AsyncFd<OwnedFd>, limit: Duration, traffic: &Traffic) -> bool {
    let read = fdio::discard(socket, |n| traffic.dropped(n as u64));
    matches!(tokio::time::timeout(limit, read).await, Ok(Ok(())))
}
