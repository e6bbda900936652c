//! What the activator knows about the cluster, fed by the watches (or a test): apps and their
//! ports, ready pods per app, and which namespace each pod IP belongs to. Requests look up
//! their app here by local port, and their caller by source IP.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::access::{CallerIndex, PodAddresses};
use crate::hold::AppState;
use crate::metrics::Metrics;
use crate::routes::{AppConfig, AppKey, Serving, port_table};

/// A local port's app, the port its pods listen on, and who may call it.
#[derive(Clone)]
pub struct Route {
    pub app: Arc<AppState>,
    pub target_port: u16,
    /// `spec.scaleToZero.callerNamespaces` (the app's own namespace may always call).
    pub caller_namespaces: Arc<[String]>,
}

/// What a local port serves.
#[derive(Clone)]
pub enum PortEntry {
    App(Route),
    /// Two or more apps claim the port: it serves none of them.
    Contested,
}

#[derive(Default)]
struct Inner {
    configs: BTreeMap<AppKey, AppConfig>,
    apps: HashMap<AppKey, Arc<AppState>>,
    /// Ready pods per app, kept even for apps not (yet) seen, since the two watches deliver in
    /// any order.
    pods: HashMap<AppKey, Vec<IpAddr>>,
    /// Pods running but not Ready yet, and those of them asleep in place, per app (kept the
    /// same way).
    starting: HashMap<AppKey, (Vec<IpAddr>, Vec<IpAddr>)>,
    /// Ports claimed by more than one app, as last logged.
    contested: BTreeMap<u16, BTreeSet<AppKey>>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    routes: RwLock<HashMap<u16, PortEntry>>,
    callers: RwLock<CallerIndex>,
    ports: watch::Sender<BTreeSet<u16>>,
    metrics: Arc<Metrics>,
    apps_synced: AtomicBool,
    pods_synced: AtomicBool,
    callers_synced: AtomicBool,
    control_key: RwLock<Option<Arc<[u8]>>>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::default(),
            routes: RwLock::default(),
            callers: RwLock::default(),
            ports: watch::channel(BTreeSet::new()).0,
            metrics,
            apps_synced: AtomicBool::new(false),
            pods_synced: AtomicBool::new(false),
            callers_synced: AtomicBool::new(false),
            control_key: RwLock::default(),
        }
    }

    /// What a connection on `port` is for.
    pub fn route(&self, port: u16) -> Option<PortEntry> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&port)
            .cloned()
    }

    /// The state of an app, if known.
    pub fn app(&self, key: &AppKey) -> Option<Arc<AppState>> {
        self.lock().apps.get(key).cloned()
    }

    /// The ports the activator should listen on; changes whenever apps come and go.
    pub fn ports(&self) -> watch::Receiver<BTreeSet<u16>> {
        self.ports.subscribe()
    }

    /// An app was added or changed.
    pub fn upsert_app(&self, config: AppConfig) {
        let mut inner = self.lock();
        self.upsert_locked(&mut inner, config);
        self.rebuild_routes(&mut inner);
    }

    /// An app was deleted.
    pub fn remove_app(&self, key: &AppKey) {
        let mut inner = self.lock();
        self.remove_locked(&mut inner, key);
        self.rebuild_routes(&mut inner);
    }

    /// A full relist of apps: anything not in `configs` is gone.
    pub fn replace_apps(&self, configs: Vec<AppConfig>) {
        let mut inner = self.lock();
        let keep: BTreeSet<AppKey> = configs.iter().map(|c| c.key.clone()).collect();
        let gone: Vec<AppKey> = inner
            .configs
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.remove_locked(&mut inner, &key);
        }
        for config in configs {
            self.upsert_locked(&mut inner, config);
        }
        self.rebuild_routes(&mut inner);
    }

    /// The ready pods of an app changed (first-ready first).
    pub fn set_ready_pods(&self, key: &AppKey, ips: Vec<IpAddr>) {
        let mut inner = self.lock();
        if let Some(app) = inner.apps.get(key) {
            app.set_backends(ips.clone());
        }
        if ips.is_empty() {
            inner.pods.remove(key);
        } else {
            inner.pods.insert(key.clone(), ips);
        }
    }

    /// The pods of an app that run but are not Ready yet changed.
    /// The app's pods that run but are not Ready, and those of them asleep in place.
    pub fn set_starting_pods(&self, key: &AppKey, ips: Vec<IpAddr>, asleep: Vec<IpAddr>) {
        let mut inner = self.lock();
        if let Some(app) = inner.apps.get(key) {
            app.set_starting(ips.clone(), asleep.clone());
        }
        if ips.is_empty() {
            inner.starting.remove(key);
        } else {
            inner.starting.insert(key.clone(), (ips, asleep));
        }
    }

    /// The cluster key control tokens derive from ([`crac_api::control`]), once read: every
    /// app that sleeps in place gets its token.
    pub fn set_control_key(&self, key: Arc<[u8]>) {
        let inner = self.lock();
        *self
            .control_key
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(key);
        for config in inner.configs.values() {
            if let Some(app) = inner.apps.get(&config.key) {
                app.set_control_token(self.token_for(config));
            }
        }
    }

    fn token_for(&self, config: &AppConfig) -> Option<String> {
        let uid = config.in_place_uid.as_deref()?;
        let key = self
            .control_key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        Some(crac_api::control::app_token(&key, uid))
    }

    /// The namespace of the pod with this IP; `None` when no pod (or pods of two namespaces)
    /// has it.
    pub fn caller_namespace(&self, ip: IpAddr) -> Option<Arc<str>> {
        self.callers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .namespace_of(ip)
            .cloned()
    }

    /// A pod was added or changed (its IPs; none when it has no IP of its own any more).
    pub fn apply_caller_pod(&self, pod: PodAddresses) {
        let mut callers = self.callers.write().unwrap_or_else(PoisonError::into_inner);
        callers.apply(pod);
        self.metrics.caller_ips.set(callers.len() as i64);
    }

    /// A pod was deleted.
    pub fn delete_caller_pod(&self, namespace: &str, name: &str) {
        let mut callers = self.callers.write().unwrap_or_else(PoisonError::into_inner);
        callers.delete(namespace, name);
        self.metrics.caller_ips.set(callers.len() as i64);
    }

    /// A full relist of pods: this index replaces the current one.
    pub fn replace_caller_pods(&self, index: CallerIndex) {
        self.metrics.caller_ips.set(index.len() as i64);
        *self.callers.write().unwrap_or_else(PoisonError::into_inner) = index;
    }

    pub fn mark_callers_synced(&self) {
        self.callers_synced.store(true, Ordering::Release);
    }

    pub fn mark_apps_synced(&self) {
        self.apps_synced.store(true, Ordering::Release);
    }

    pub fn mark_pods_synced(&self) {
        self.pods_synced.store(true, Ordering::Release);
    }

    /// Every watch (apps, restore pods, callers) has listed everything once.
    pub fn synced(&self) -> bool {
        self.apps_synced.load(Ordering::Acquire)
            && self.pods_synced.load(Ordering::Acquire)
            && self.callers_synced.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn upsert_locked(&self, inner: &mut Inner, config: AppConfig) {
        match inner.apps.get(&config.key) {
            Some(app) => {
                app.set_wake_timeout(config.wake_timeout);
                app.observe_serving_mode(config.serving_mode, Instant::now());
                app.set_probe(config.probe.clone());
                app.set_control_token(self.token_for(&config));
            }
            None => {
                let ips = inner.pods.get(&config.key).cloned().unwrap_or_default();
                let app = AppState::new(
                    config.key.clone(),
                    config.wake_timeout,
                    ips,
                    Serving::first_seen(config.serving_mode),
                    self.metrics.for_app(&config.key),
                );
                app.set_probe(config.probe.clone());
                app.set_control_token(self.token_for(&config));
                if let Some((starting, asleep)) = inner.starting.get(&config.key) {
                    app.set_starting(starting.clone(), asleep.clone());
                }
                inner.apps.insert(config.key.clone(), Arc::new(app));
            }
        }
        inner.configs.insert(config.key.clone(), config);
    }

    fn remove_locked(&self, inner: &mut Inner, key: &AppKey) {
        inner.configs.remove(key);
        if let Some(app) = inner.apps.remove(key) {
            app.set_removed();
            self.metrics.remove_app(key);
        }
    }

    fn rebuild_routes(&self, inner: &mut Inner) {
        let table = port_table(inner.configs.values());
        if table.contested != inner.contested {
            for (port, apps) in &table.contested {
                if inner.contested.get(port) != Some(apps) {
                    let apps: Vec<String> = apps.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        port,
                        apps = apps.join(", "),
                        "several apps claim one activator port; serving none of them"
                    );
                }
            }
            for port in inner.contested.keys() {
                if !table.contested.contains_key(port) {
                    tracing::info!(port, "activator port claimed by one app again");
                }
            }
            self.metrics
                .port_conflicts
                .set(table.contested.len() as i64);
            inner.contested = table.contested.clone();
        }
        let mut routes: HashMap<u16, PortEntry> = table
            .routes
            .into_iter()
            .filter_map(|(port, route)| {
                let app = inner.apps.get(&route.app)?.clone();
                let caller_namespaces = inner
                    .configs
                    .get(&route.app)
                    .map(|c| c.caller_namespaces.clone())
                    .unwrap_or_default()
                    .into();
                Some((
                    port,
                    PortEntry::App(Route {
                        app,
                        target_port: route.target_port,
                        caller_namespaces,
                    }),
                ))
            })
            .collect();
        for port in table.contested.keys() {
            // Still listened on: callers get a 503 that says why, not a refused connection.
            routes.insert(*port, PortEntry::Contested);
        }
        let ports: BTreeSet<u16> = routes.keys().copied().collect();
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = routes;
        self.ports.send_if_modified(|current| {
            if *current == ports {
                return false;
            }
            *current = ports;
            true
        });
    }
}
