//! Stopping: running, then draining (no new connections, running ones go on
//! for up to `shutdown_timeout`), then forced (running ones are ended as when
//! their client disconnects).

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Forced,
}

/// Sets the phase; held by the server.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<Phase>);

/// Watches the phase; each accept loop and connection holds one.
#[derive(Debug, Clone)]
pub struct Watch(watch::Receiver<Phase>);

impl Shutdown {
    pub fn new() -> (Shutdown, Watch) {
        let (tx, rx) = watch::channel(Phase::Running);
        (Shutdown(tx), Watch(rx))
    }

    pub fn advance(&self, phase: Phase) {
        self.0.send_if_modified(|p| {
            let later = phase > *p;
            if later {
                *p = phase;
            }
            later
        });
    }
}

impl Watch {
    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&mut self, phase: Phase) {
        // An error means the server is gone, which is as final as it gets.
        let _ = self.0.wait_for(|p| *p >= phase).await;
    }
}
