//! Prometheus metrics. Per-app handles are created once per app and cached in its state, so
//! the request path increments an atomic instead of hashing label sets.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::routes::AppKey;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub namespace: String,
    pub app: String,
}

/// How a request that reached the activator ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Forwarded at once to a ready pod (the app was awake or waking had finished).
    forwarded,
    /// Held while the app woke, then forwarded.
    woken,
    /// Held until the wake deadline passed: 503.
    wake_timeout,
    /// The wake request failed for good (app deleted, forbidden): 503.
    wake_failed,
    /// The app's queue was full: 503 at once.
    queue_full,
    /// A pod was chosen but the exchange with it failed: 502.
    bad_gateway,
    /// The app is awake and its grace has passed: 503 with `Connection: close`, so the caller
    /// reconnects through the Service, which points at the pods.
    app_awake,
    /// The activator holds `--max-held` requests across all apps already: 503 at once.
    held_limit,
}

const OUTCOMES: [Outcome; 8] = [
    Outcome::forwarded,
    Outcome::woken,
    Outcome::wake_timeout,
    Outcome::wake_failed,
    Outcome::queue_full,
    Outcome::bad_gateway,
    Outcome::app_awake,
    Outcome::held_limit,
];

/// Why the activator closed a connection on its own (`kind` label; a fixed set).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConnectionTimeout {
    /// No complete request head within `--header-timeout` (a silent or trickling caller).
    header,
    /// HTTP/2: no request open for `--idle-timeout` (GOAWAY).
    idle,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub kind: ConnectionTimeout,
}

/// Why a request was refused before it reached any app's state (`reason` label; a fixed set).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusedReason {
    /// 403: the source IP is no pod the activator knows, and not a trusted caller.
    unknown_caller,
    /// 403: the caller's pod is in a namespace the app does not let call it.
    namespace_not_allowed,
    /// 503: two or more apps claim the port, so it serves none of them.
    port_conflict,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: RefusedReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub namespace: String,
    pub app: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub port: u16,
}

/// How the app slept before a request arrived at zero (`mode` label): its pods deleted and
/// created again on wake, or kept with their JVMs ended and woken in place.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SleepMode {
    recreate,
    in_place,
}

/// How a request that arrived at zero ended (`outcome` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WakeOutcome {
    /// Answered by a pod whose agent restored the image.
    restored,
    /// Answered by a pod whose agent could not restore and started the JVM cold.
    cold_started,
    /// Answered, by a pod whose agent did not say how it started.
    unknown,
    /// Not answered: the wake deadline passed or the wake failed (503).
    failed,
}

const WAKE_OUTCOMES: [WakeOutcome; 4] = [
    WakeOutcome::restored,
    WakeOutcome::cold_started,
    WakeOutcome::unknown,
    WakeOutcome::failed,
];

/// Which span of a request at zero (`part` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WakePart {
    /// Arrival → the first byte of the app's answer (or the 503): what the caller waited.
    first_byte,
    /// Arrival → a pod to send it to (held while the app woke).
    held,
    /// The answering pod's agent: its start → the app restored (or started cold) and ready.
    restore,
}

const WAKE_PARTS: [WakePart; 3] = [WakePart::first_byte, WakePart::held, WakePart::restore];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AtZeroLabels {
    pub namespace: String,
    pub app: String,
    pub mode: SleepMode,
    pub outcome: WakeOutcome,
    pub part: WakePart,
}

type AtZeroFamily = Family<AtZeroLabels, Histogram, fn() -> Histogram>;

fn wake_histogram() -> Histogram {
    Histogram::new([
        0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
    ])
}

pub struct Metrics {
    pub registry: Registry,
    held: Family<AppLabels, Gauge>,
    wakes: Family<AppLabels, Counter>,
    wake_requests_failed: Family<AppLabels, Counter>,
    wake_seconds: Family<AppLabels, Histogram, fn() -> Histogram>,
    answered_early: Family<AppLabels, Counter>,
    woken_in_place: Family<AppLabels, Counter>,
    at_zero: AtZeroFamily,
    outcomes: Family<OutcomeLabels, Counter>,
    /// Connections for a port no app owns (an app deleted while its callers were connected).
    pub unknown_port: Counter,
    /// Activator ports that could not be bound (in use by something else).
    pub bind_failures: Family<PortLabels, Counter>,
    /// Requests refused, by reason (handles made once: the request path only increments).
    refused: [Counter; 3],
    /// Ports two or more apps claim now (served to none).
    pub port_conflicts: Gauge,
    /// Pod IPs the caller check knows now.
    pub caller_ips: Gauge,
    /// Caller connections open now (upgraded tunnels included).
    pub connections: Gauge,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused: Counter,
    /// Connections the activator closed on a timeout, by kind (handles made once).
    connection_timeouts: [Counter; 2],
}

/// Handles for one app, cheap to use on the request path.
#[derive(Clone, Debug)]
pub struct AppMetrics {
    pub held: Gauge,
    pub wakes: Counter,
    pub wake_requests_failed: Counter,
    pub wake_seconds: Histogram,
    pub answered_early: Counter,
    pub woken_in_place: Counter,
    outcomes: [Counter; 8],
    at_zero: AtZeroFamily,
    key: AppKey,
}

impl AppMetrics {
    /// One span of one request that arrived at zero.
    pub fn at_zero(&self, mode: SleepMode, outcome: WakeOutcome, part: WakePart, seconds: f64) {
        self.at_zero
            .get_or_create(&AtZeroLabels {
                namespace: self.key.namespace.clone(),
                app: self.key.name.clone(),
                mode,
                outcome,
                part,
            })
            .observe(seconds);
    }

    pub fn outcome(&self, outcome: Outcome) -> &Counter {
        &self.outcomes[outcome as usize]
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("crac_activator");
        let held = Family::<AppLabels, Gauge>::default();
        let wakes = Family::<AppLabels, Counter>::default();
        let wake_requests_failed = Family::<AppLabels, Counter>::default();
        let wake_seconds =
            Family::<AppLabels, Histogram, fn() -> Histogram>::new_with_constructor(wake_histogram);
        let answered_early = Family::<AppLabels, Counter>::default();
        let woken_in_place = Family::<AppLabels, Counter>::default();
        let at_zero = AtZeroFamily::new_with_constructor(wake_histogram);
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let unknown_port = Counter::default();
        let bind_failures = Family::<PortLabels, Counter>::default();
        let refused_family = Family::<RefusedLabels, Counter>::default();
        let refused = [
            RefusedReason::unknown_caller,
            RefusedReason::namespace_not_allowed,
            RefusedReason::port_conflict,
        ]
        .map(|reason| {
            refused_family
                .get_or_create(&RefusedLabels { reason })
                .clone()
        });
        let port_conflicts = Gauge::default();
        let caller_ips = Gauge::default();
        let connections = Gauge::default();
        let connections_refused = Counter::default();
        let timeouts_family = Family::<TimeoutLabels, Counter>::default();
        let connection_timeouts =
            [ConnectionTimeout::header, ConnectionTimeout::idle].map(|kind| {
                timeouts_family
                    .get_or_create(&TimeoutLabels { kind })
                    .clone()
            });
        registry.register(
            "held_requests",
            "Requests held while their app wakes",
            held.clone(),
        );
        registry.register(
            "wakes",
            "Wakes started (one per wake, not per held request)",
            wakes.clone(),
        );
        registry.register(
            "wake_requests_failed",
            "Wake requests (status patches) the API server refused or did not answer",
            wake_requests_failed.clone(),
        );
        registry.register(
            "wake_duration_seconds",
            "From the first held request of a wake to the first ready pod: the cold-start cost callers saw",
            wake_seconds.clone(),
        );
        registry.register(
            "pods_answered_early",
            "Woken pods whose app answered the activator's own probe before the pod was Ready, taking the held requests then",
            answered_early.clone(),
        );
        registry.register(
            "pods_woken_in_place",
            "Pods sleeping in place that the activator woke itself (POST /wake to their agent) for held requests",
            woken_in_place.clone(),
        );
        registry.register(
            "request_at_zero_seconds",
            "Requests that arrived while their app had no ready pod, by how the app slept (mode) and how the request ended (outcome): arrival to first byte, the time held, and the answering pod's restore",
            at_zero.clone(),
        );
        registry.register("requests", "Requests by how they ended", outcomes.clone());
        registry.register(
            "unknown_port_requests",
            "Requests on a port no app owns any more (404)",
            unknown_port.clone(),
        );
        registry.register(
            "bind_failures",
            "Activator ports that could not be bound",
            bind_failures.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests refused before reaching an app: callers not allowed (403), ports two apps claim (503)",
            refused_family,
        );
        registry.register(
            "port_conflicts",
            "Activator ports two or more apps claim now; served to none of them",
            port_conflicts.clone(),
        );
        registry.register(
            "caller_ips",
            "Pod IPs the caller check knows (every pod in the cluster with its own IP)",
            caller_ips.clone(),
        );
        registry.register(
            "connections",
            "Caller connections open now, upgraded tunnels included",
            connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        registry.register(
            "connection_timeouts",
            "Connections the activator closed: no request head within --header-timeout (header), HTTP/2 idle past --idle-timeout (idle)",
            timeouts_family,
        );
        Self {
            registry,
            held,
            wakes,
            wake_requests_failed,
            wake_seconds,
            answered_early,
            woken_in_place,
            at_zero,
            outcomes,
            unknown_port,
            bind_failures,
            refused,
            port_conflicts,
            caller_ips,
            connections,
            connections_refused,
            connection_timeouts,
        }
    }

    pub fn connection_timeout(&self, kind: ConnectionTimeout) -> &Counter {
        &self.connection_timeouts[kind as usize]
    }

    pub fn refused(&self, reason: RefusedReason) -> &Counter {
        &self.refused[reason as usize]
    }

    pub fn for_app(&self, app: &AppKey) -> AppMetrics {
        let labels = AppLabels {
            namespace: app.namespace.clone(),
            app: app.name.clone(),
        };
        let outcome = |outcome| {
            self.outcomes
                .get_or_create(&OutcomeLabels {
                    namespace: app.namespace.clone(),
                    app: app.name.clone(),
                    outcome,
                })
                .clone()
        };
        AppMetrics {
            held: self.held.get_or_create(&labels).clone(),
            wakes: self.wakes.get_or_create(&labels).clone(),
            wake_requests_failed: self.wake_requests_failed.get_or_create(&labels).clone(),
            wake_seconds: self.wake_seconds.get_or_create(&labels).clone(),
            answered_early: self.answered_early.get_or_create(&labels).clone(),
            woken_in_place: self.woken_in_place.get_or_create(&labels).clone(),
            outcomes: OUTCOMES.map(outcome),
            at_zero: self.at_zero.clone(),
            key: app.clone(),
        }
    }

    /// Drops an app's series once the app is gone, so deleted apps do not linger in scrapes.
    pub fn remove_app(&self, app: &AppKey) {
        let labels = AppLabels {
            namespace: app.namespace.clone(),
            app: app.name.clone(),
        };
        self.held.remove(&labels);
        self.wakes.remove(&labels);
        self.wake_requests_failed.remove(&labels);
        self.wake_seconds.remove(&labels);
        self.answered_early.remove(&labels);
        self.woken_in_place.remove(&labels);
        for mode in [SleepMode::recreate, SleepMode::in_place] {
            for outcome in WAKE_OUTCOMES {
                for part in WAKE_PARTS {
                    self.at_zero.remove(&AtZeroLabels {
                        namespace: app.namespace.clone(),
                        app: app.name.clone(),
                        mode,
                        outcome,
                        part,
                    });
                }
            }
        }
        for outcome in OUTCOMES {
            self.outcomes.remove(&OutcomeLabels {
                namespace: app.namespace.clone(),
                app: app.name.clone(),
                outcome,
            });
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
