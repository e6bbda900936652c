//! The count of work a graceful shutdown waits for, shared by the server (connections) and the
//! proxy (upgraded tunnels, which outlive their request); and the cap on open connections,
//! whose slots the same two hold.

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

/// The cap on open caller connections (`--max-connections`), shared by every port.
#[derive(Clone)]
pub struct ConnectionSlots {
    slots: Arc<tokio::sync::Semaphore>,
    open: prometheus_client::metrics::gauge::Gauge,
}

/// One open connection's place under the cap, released on drop: when the connection and any
/// tunnel it was upgraded to are gone, since both hold its socket.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: prometheus_client::metrics::gauge::Gauge,
}

impl ConnectionSlots {
    /// `open` is set to the count of connections holding a slot.
    pub fn new(max: usize, open: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(
                max.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            open,
        }
    }

    /// A slot, or `None` when every one is taken.
    pub fn try_take(&self) -> Option<ConnectionSlot> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        self.open.inc();
        Some(ConnectionSlot {
            _permit: permit,
            open: self.open.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}
