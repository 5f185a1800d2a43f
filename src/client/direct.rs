//! `transfer = "direct"`: the client's plaintext socket is the command's
//! stdin and stdout, as with inetd. The daemon keeps a copy only to see the
//! client fail (it never reads it while the command runs), ends the
//! connection in order once the command has exited, and takes the byte
//! counts from the kernel (TCP_INFO) where it holds the socket itself.

use std::os::fd::{AsFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::raw::linger;
use crate::end::{End, Ending, Farewell};
use crate::fdio;
use crate::record::Traffic;
use crate::sys;

/// A client whose socket the command has.
pub struct Direct<'a> {
    /// The plaintext side of the transport, watched for errors only.
    pub socket: &'a AsyncFd<OwnedFd>,
    /// The client's TCP socket where the daemon holds it itself: the kernel
    /// counts its bytes. None behind the TLS layer, which counts them.
    pub kernel: Option<&'a OwnedFd>,
    pub traffic: &'a Traffic,
}

impl Direct<'_> {
    /// Resolves when the client's socket fails (the command's exit, the
    /// other way this ends, is the command's side). Behind the TLS layer,
    /// never: the transport sees the client fail.
    pub async fn pump(&self) -> End {
        let Some(socket) = self.kernel else {
            return std::future::pending().await;
        };
        // The command reads the client's end, not the daemon: probes tell
        // when a client of a quiet command is gone (see `fdio::departed`).
        fdio::keep_alive(socket);
        let _ = self.socket.ready(Interest::ERROR).await;
        End::gone(fdio::socket_error(self.socket.get_ref()))
    }

    /// After the command's exit, the socket's end in order (the command may
    /// have left output in flight), then the kernel's counts.
    pub async fn close(self, ending: &Ending) -> bool {
        let socket = self.socket.get_ref();
        // The command's copies are closed; ours may wait again.
        let complete =
            ending.farewell == Farewell::Complete && fdio::set_nonblocking(socket, true).is_ok();
        let mut client_closed = false;
        if complete {
            fdio::end_output(socket);
            client_closed = linger(self.socket, ending.grace, self.traffic).await;
        }
        if let Some((acked, received)) = self.kernel.and_then(|s| sys::tcp_bytes(s.as_fd())) {
            // Counted last, when the client has acknowledged all it got.
            // After an orderly close both FINs count in the sequence numbers.
            let fin = u64::from(client_closed);
            self.traffic
                .counted_by_kernel(acked.saturating_sub(fin), received.saturating_sub(fin));
        }
        complete
    }
}
