//! The count of work a graceful shutdown waits for, shared by the server (connections) and the
//! proxy (upgraded tunnels, which outlive their request).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Counts work that a graceful shutdown waits for: connections and upgraded tunnels.
#[derive(Clone, Default)]
pub struct Tracker {
    inner: Arc<(AtomicUsize, Notify)>,
}

pub struct TrackGuard {
    inner: Arc<(AtomicUsize, Notify)>,
}

impl Tracker {
    pub fn track(&self) -> TrackGuard {
        self.inner.0.fetch_add(1, Ordering::AcqRel);
        TrackGuard {
            inner: Arc::clone(&self.inner),
        }
    }

    pub fn active(&self) -> usize {
        self.inner.0.load(Ordering::Acquire)
    }

    /// Resolves once nothing is tracked.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.inner.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.1.notify_waiters();
        }
    }
}
