//! What carries a client's bytes: its socket (plaintext, or encrypted by the
//! kernel's TLS), or TLS in the daemon, which the rest of the connection
//! sees as a plaintext socket too: the layer runs in a task of its own
//! between the client's socket and a socket pair, and the protocol takes the
//! pair's other end.

use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::end::End;
use crate::fdio;
use crate::supervise::{Bounds, Idle};
use crate::tls::{Layer, Outcome};

/// The client's transport.
pub struct Transport {
    /// Where the protocol reads and writes plaintext: the client's socket,
    /// or the protocol's end of the layer's socket pair.
    plain: AsyncFd<OwnedFd>,
    /// The TLS layer between that pair and the client, if the daemon encrypts.
    bridge: Option<Bridge>,
}

/// The TLS layer's task, and what it saw.
struct Bridge {
    task: JoinHandle<()>,
    outcome: watch::Receiver<Option<Outcome>>,
}

impl Transport {
    /// The client's socket itself: plaintext, or the kernel's TLS.
    pub fn socket(socket: AsyncFd<OwnedFd>) -> Transport {
        Transport {
            plain: socket,
            bridge: None,
        }
    }

    /// TLS in the daemon: `layer` runs between `socket` and a socket pair.
    /// The layer waits at most `grace` for the client's close after the end
    /// of the output.
    pub fn encrypted(
        socket: AsyncFd<OwnedFd>,
        layer: Layer,
        grace: Duration,
    ) -> std::io::Result<Transport> {
        let (ours, theirs) = Layer::pair()?;
        let plain = fdio::register(theirs, Interest::READABLE | Interest::WRITABLE)?;
        let (tell, outcome) = watch::channel(None);
        let task = tokio::spawn(async move {
            let outcome = layer.run(&socket, ours, grace).await;
            // Told before the socket closes, so that whoever sees the pair
            // close can ask why.
            let _ = tell.send(Some(outcome));
            drop(socket);
        });
        Ok(Transport {
            plain,
            bridge: Some(Bridge { task, outcome }),
        })
    }

    /// Where the protocol reads and writes the client's plaintext.
    pub fn plain(&self) -> &AsyncFd<OwnedFd> {
        &self.plain
    }

    /// The client's socket, where the daemon holds it itself (the kernel
    /// keeps its counts and its idle time: TCP_INFO); None behind the layer.
    pub fn kernel_socket(&self) -> Option<&OwnedFd> {
        self.bridge.is_none().then(|| self.plain.get_ref())
    }

    /// For a command that reads and writes the plaintext side itself
    /// (`transfer = "direct"`): the daemon only watches it for errors from
    /// now on, so the command's traffic does not wake the event loop.
    pub fn watch_errors_only(&mut self) -> std::io::Result<()> {
        let fd = self.plain.get_ref().try_clone()?;
        self.plain = fdio::register(fd, Interest::ERROR)?;
        Ok(())
    }

    /// Resolves if the transport fails on its own: the layer lost the
    /// client (a reset, a record that does not verify). Never for a socket.
    pub async fn lost(&self) -> End {
        let Some(bridge) = &self.bridge else {
            return std::future::pending().await;
        };
        // Boxed: only a connection with a TLS layer makes room for the wait.
        let failed = Box::pin(async {
            let mut outcome = bridge.outcome.clone();
            let seen = outcome.wait_for(|o| matches!(o, Some(o) if *o != Outcome::Closed));
            seen.await.map(|o| lost_end(o.as_ref()))
        })
        .await;
        match failed {
            Ok(Some(end)) => end,
            Ok(None) => End::Error("the TLS layer ended".into()),
            // The task is gone without a word (it panicked): never expected.
            Err(_) => End::Error("the TLS layer stopped".into()),
        }
    }

    /// The end a protocol saw, as the transport explains it: a protocol that
    /// saw the layer's pair close saw the client leave, or break TLS.
    pub fn explain(&self, end: End) -> End {
        match (&end, &self.bridge) {
            (End::ClientGone(_) | End::Unannounced | End::ClientClosed(None), Some(bridge)) => {
                lost_end(bridge.outcome.borrow().as_ref()).unwrap_or(end)
            }
            _ => end,
        }
    }

    /// Lets go of the client. `clean`: the protocol ended its output in
    /// order, so the layer may end the session in order too: the rest of
    /// the output, as the client takes it (the kernel does as much for a
    /// socket the daemon closed), then the close_notify and the client's
    /// close (at most `kill_grace`). `bounds` and `idle` (the layer's
    /// writes are activity) still hold: the End of one that cuts it first.
    /// Otherwise the session is cut (no close_notify, which would claim
    /// the output complete).
    pub async fn close(self, clean: bool, bounds: &Bounds, idle: Idle<'_>) -> Option<End> {
        let mut bridge = self.bridge?;
        let mut cut = None;
        if clean {
            let rest = async {
                let _ = (&mut bridge.task).await;
                Ok(())
            };
            match bounds.watch(rest, idle).await {
                Ok(()) => return None,
                Err(end) => cut = Some(end),
            }
        }
        bridge.task.abort();
        let _ = (&mut bridge.task).await;
        cut
    }
}

impl Drop for Bridge {
    /// A connection dropped part-way (its task cancelled) cuts the session.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the layer's outcome means for the record, if it failed.
fn lost_end(outcome: Option<&Outcome>) -> Option<End> {
    match outcome? {
        Outcome::Closed => None,
        Outcome::ClientGone(e) => Some(End::gone(*e)),
        Outcome::Failed(why) => Some(End::Tls(why.clone())),
    }
}
