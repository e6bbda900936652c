//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// One kind of request to the API server: `get`, `list`, `watch`, `create`, `patch`, … and
/// the resource (with its subresource, `cracapps/status`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub verb: String,
    pub resource: String,
}

pub struct Metrics {
    pub api_requests: Family<RequestLabel, Counter>,
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub checkpoint_seconds: Histogram,
    pub checkpoint_failures: Family<ReasonLabel, Counter>,
    pub checkpoints_started: Counter,
    pub checkpoints_superseded: Counter,
    pub restore_cold_starts: Counter,
    pub stale_images: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            api_requests: Family::default(),
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            checkpoint_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            checkpoint_failures: Family::default(),
            checkpoints_started: Counter::default(),
            checkpoints_superseded: Counter::default(),
            restore_cold_starts: Counter::default(),
            stale_images: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("crac_operator");
        r.register(
            "api_requests",
            "Requests the operator sent to the API server, by verb and resource",
            m.api_requests.clone(),
        );
        r.register(
            "reconciles",
            "Reconciles by result (ok or the error's reason)",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time of one reconcile",
            m.reconcile_seconds.clone(),
        );
        r.register(
            "checkpoint_duration_seconds",
            "Time from a checkpoint Job's start to its published image",
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "checkpoint_failures",
            "Failed checkpoint Jobs by the agent's reason",
            m.checkpoint_failures.clone(),
        );
        r.register(
            "checkpoints_started",
            "Checkpoint Jobs created",
            m.checkpoints_started.clone(),
        );
        r.register(
            "checkpoints_superseded",
            "Checkpoint Jobs deleted because the spec changed before they ended",
            m.checkpoints_superseded.clone(),
        );
        r.register(
            "restore_cold_starts",
            "Restore pods that started cold instead of restoring their image, as their agents reported",
            m.restore_cold_starts.clone(),
        );
        r.register(
            "stale_images",
            "Images replaced by a new checkpoint because restore pods kept starting cold from them",
            m.stale_images.clone(),
        );
        m
    }
}
