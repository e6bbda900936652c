//! crac-activator: holds requests for CracApps scaled to zero, asks the operator to wake them,
//! and forwards the held requests to the first pod that turns ready.
//!
//! The app a connection is for is named by the local port it arrived on (each app gets its own
//! activator ports, listed in `status.activatorPorts`), so callers using the Service's DNS name
//! and callers using its ClusterIP reach the same app. Module map:
//! - [`routes`]: pure state (ports to apps, ready pods, round-robin, whether an app is still
//!   served), unit-tested;
//! - [`access`]: pure caller check (trusted ranges, pod IP to namespace), unit-tested;
//! - [`registry`]: that state shared with the request path, fed by the watches;
//! - [`hold`]: bounded per-app queue with a deadline, and the one wake task per app;
//! - [`early`]: probing a woken pod itself, so held requests go as soon as the app answers;
//! - [`proxy`]: forwarding (HTTP/1.1, h2c, upgrades, streaming bodies) over pooled connections;
//! - [`server`]: listeners per port, connections, graceful shutdown;
//! - [`tracker`]: the count of connections and tunnels a graceful shutdown waits for;
//! - [`wake`]: the wake request, behind [`wake::WakeClient`] (a status patch in a cluster);
//! - [`kube`]: the watches;
//! - [`metrics`] and [`admin`]: `/metrics`, `/healthz`, `/readyz`.

pub mod access;
pub mod admin;
pub mod early;
pub mod early_answer;
pub mod hold;
pub mod kube;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod routes;
pub mod server;
pub mod tracker;
pub mod wake;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::access::Cidr;
use crate::hold::HoldContext;
use crate::metrics::Metrics;
use crate::proxy::{Pool, Proxy};
use crate::registry::Registry;
pub use crate::server::ConnectionLimits;
use crate::server::Server;
use crate::tracker::Tracker;
use crate::wake::WakeClient;

/// Settings of one activator instance.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address the app ports are bound on (`0.0.0.0` in a pod).
    pub listen_ip: IpAddr,
    /// Requests held per app at most; the next gets 503 at once.
    pub max_queue: usize,
    /// Wake deadline for apps that do not set `scaleToZero.wakeTimeout`.
    pub default_wake_timeout: Duration,
    /// `Retry-After` sent with every 503.
    pub retry_after: Duration,
    /// A wake still pending after this long is requested again.
    pub wake_resend_interval: Duration,
    /// Deadline of one wake request (status patch).
    pub wake_request_timeout: Duration,
    /// Deadline for connecting to a pod.
    pub connect_timeout: Duration,
    /// How long a shutdown waits for held and in-flight requests.
    pub drain_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per pod.
    pub max_idle_per_backend: usize,
    /// Source ranges whose requests skip the caller check (node-local health checks; tests).
    /// Everyone else must be a pod of the app's namespace or of its `callerNamespaces`.
    pub trusted_callers: Vec<Cidr>,
    /// How long after an app's `servingMode` turned `Pods` its requests are still forwarded.
    pub awake_grace: Duration,
    /// Requests held across all apps at most; the next gets 503 at once.
    pub max_held: usize,
    /// After SIGTERM, how long to go on accepting and serving (not ready) before the listeners
    /// close and the drain starts: endpoints take a while to stop sending traffic here.
    pub shutdown_delay: Duration,
    /// What one caller connection may take (connection cap, header timeout and size, HTTP/2).
    pub connections: ConnectionLimits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            max_queue: 1000,
            default_wake_timeout: routes::DEFAULT_WAKE_TIMEOUT,
            retry_after: Duration::from_secs(5),
            wake_resend_interval: Duration::from_secs(3),
            wake_request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            max_idle_per_backend: 64,
            trusted_callers: Vec::new(),
            awake_grace: Duration::from_secs(30),
            max_held: 10_000,
            shutdown_delay: Duration::from_secs(5),
            connections: ConnectionLimits {
                max_connections: 4096,
                header_timeout: Duration::from_secs(10),
                max_header_bytes: 32 * 1024,
                idle_timeout: Duration::from_secs(60),
                h2_max_concurrent_streams: 100,
                h2_keepalive_interval: Duration::from_secs(20),
                h2_keepalive_timeout: Duration::from_secs(20),
            },
        }
    }
}

/// One activator: its registry, listeners and request path.
pub struct Activator {
    config: Config,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    server: Arc<Server>,
    shutting_down: AtomicBool,
}

impl Activator {
    pub fn new(config: Config, waker: Arc<dyn WakeClient>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::new(Arc::clone(&metrics)));
        let proxy = Arc::new(Proxy {
            registry: Arc::clone(&registry),
            hold: HoldContext {
                max_queue: config.max_queue,
                max_held: config.max_held,
                held_total: Arc::default(),
                wake_resend_interval: config.wake_resend_interval,
                wake_request_timeout: config.wake_request_timeout,
                waker,
            },
            pool: Pool::new(config.connect_timeout, config.max_idle_per_backend),
            metrics: Arc::clone(&metrics),
            retry_after: config.retry_after,
            tracker: Tracker::default(),
            trusted_callers: config.trusted_callers.clone(),
            awake_grace: config.awake_grace,
        });
        let server = Arc::new(Server::new(
            proxy,
            config.listen_ip,
            config.connections.clone(),
        ));
        Arc::new(Self {
            config,
            registry,
            metrics,
            server,
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Starts listening on every port the registry lists, now and as it changes.
    pub fn start(&self) -> JoinHandle<()> {
        let wanted = self.registry.ports();
        tokio::spawn(Arc::clone(&self.server).run_listeners(wanted))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Waits until `port` is listening (or `timeout` passes). For tests and startup logs.
    pub async fn wait_listening(&self, port: u16, timeout: Duration) -> bool {
        let mut bound = self.server.bound();
        tokio::time::timeout(timeout, bound.wait_for(|b| b.contains(&port)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Ready to take traffic: every watch has synced and no shutdown has begun.
    pub fn ready(&self) -> bool {
        self.registry.synced() && !self.shutting_down.load(Ordering::Acquire)
    }

    /// Graceful shutdown: turn not-ready at once, go on serving for the shutdown delay (while
    /// endpoints stop sending traffic here), then stop accepting, let every connection finish
    /// its current requests (held ones included: they still get their wake or their 503), and
    /// return. Returns `false` when the drain timeout cut it short.
    pub async fn shutdown(&self) -> bool {
        self.shutting_down.store(true, Ordering::Release);
        if !self.config.shutdown_delay.is_zero() {
            tracing::info!(
                delay_ms =
                    u64::try_from(self.config.shutdown_delay.as_millis()).unwrap_or(u64::MAX),
                "not ready; still serving until the shutdown delay passes"
            );
            tokio::time::sleep(self.config.shutdown_delay).await;
        }
        self.server.begin_shutdown();
        let tracker = self.server.tracker().clone();
        tracing::info!(open = tracker.active(), "draining");
        let drained = tokio::time::timeout(self.config.drain_timeout, tracker.idle())
            .await
            .is_ok();
        if drained {
            tracing::info!("drained");
        } else {
            tracing::warn!(
                open = tracker.active(),
                "drain timeout; closing what is left"
            );
        }
        drained
    }
}
