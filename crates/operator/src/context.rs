//! What every reconcile shares: the client, the Event publisher, the metrics, the caches the
//! watches fill, and the settings the binary parsed. Built once, from [`Settings`].

use crate::build::BuildConfig;
use crate::cache::Caches;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::pod_security::PodAllowance;
use crate::ports::PortTable;
use crate::restore_starts::RestoreStarts;
use crac_api::labels;
use kube::Client;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The activator's namespace and pod selector when nothing else is configured.
pub const DEFAULT_ACTIVATOR_NAMESPACE: &str = "crac-system";
pub const DEFAULT_ACTIVATOR_SELECTOR: &str = "app.kubernetes.io/name=crac-activator";
/// First wait before retrying a failed checkpoint in production.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(30);

/// How the operator finds the activator pods it points sleeping apps' Services at.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivatorRef {
    pub namespace: String,
    /// Label selector of the activator pods.
    pub selector: String,
}

impl Default for ActivatorRef {
    fn default() -> Self {
        ActivatorRef {
            namespace: DEFAULT_ACTIVATOR_NAMESPACE.into(),
            selector: DEFAULT_ACTIVATOR_SELECTOR.into(),
        }
    }
}

/// Everything a [`Context`] is built from.
pub struct Settings {
    pub build: BuildConfig,
    /// This replica's name, in the Events it publishes.
    pub instance: String,
    /// First wait before retrying a failed checkpoint; doubles with each failure.
    pub retry_base: Duration,
    pub activator: ActivatorRef,
    /// Reconcile CracApps of this namespace only (`None`: all namespaces).
    pub namespace: Option<String>,
    /// Activator ports handed out. Shared only by operators in one process (the tests'),
    /// which would otherwise hand out the same port twice.
    pub activator_ports: PortTable,
    /// What a CracApp's template may ask for beyond the baseline level.
    pub pod_allowance: PodAllowance,
}

impl Settings {
    /// The production defaults, injecting `agent_image`.
    pub fn new(agent_image: impl Into<String>, instance: impl Into<String>) -> Self {
        Settings {
            build: BuildConfig {
                agent_image: agent_image.into(),
            },
            instance: instance.into(),
            retry_base: DEFAULT_RETRY_BASE,
            activator: ActivatorRef::default(),
            namespace: None,
            activator_ports: PortTable::default(),
            pod_allowance: PodAllowance::default(),
        }
    }
}

pub struct Context {
    pub client: Client,
    pub events: Events,
    pub config: BuildConfig,
    pub metrics: Arc<Metrics>,
    pub retry_base: Duration,
    pub activator: ActivatorRef,
    pub namespace: Option<String>,
    pub activator_ports: PortTable,
    pub pod_allowance: PodAllowance,
    /// What the watches saw; every read a reconcile makes comes from here.
    pub caches: Caches,
    /// How each app's restore pods started, by pod uid, as their agents said (only pods that
    /// still exist are kept).
    pub restore_starts: RestoreStarts,
    /// The key apps' control tokens are derived from (sleep in place), once first needed.
    pub control_key: crate::control_key::ControlKey,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        Context {
            events: Events::new(client.clone(), labels::MANAGER, &settings.instance),
            client,
            config: settings.build,
            metrics,
            retry_base: settings.retry_base,
            activator: settings.activator,
            namespace: settings.namespace,
            activator_ports: settings.activator_ports,
            pod_allowance: settings.pod_allowance,
            caches: Caches::default(),
            restore_starts: Mutex::default(),
            control_key: Default::default(),
        }
    }
}
