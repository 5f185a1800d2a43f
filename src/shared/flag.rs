//! A flag raised once, that tasks can wait for: a client dropped for
//! lagging, a hub told to stop, a command ended.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Flag {
    raised: AtomicBool,
    notify: Notify,
}

impl Flag {
    /// Raises it: every task waiting in [`Flag::raised`] goes on, and any
    /// that waits later does not wait.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Resolves once the flag is raised.
    pub async fn raised(&self) {
        loop {
            // Registered before the check, so a raise in between is seen.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn waiters_before_and_after_the_raise_go_on() {
        let flag = Arc::new(Flag::default());
        assert!(!flag.is_raised());
        let early = tokio::spawn({
            let flag = Arc::clone(&flag);
            async move { flag.raised().await }
        });
        tokio::task::yield_now().await;
        assert!(!early.is_finished());
        flag.raise();
        early.await.unwrap();
        assert!(flag.is_raised());
        flag.raised().await;
    }
}
