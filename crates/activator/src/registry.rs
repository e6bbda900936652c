//! What the activator knows about the cluster, fed by the watches (or a test): apps and their
//! ports, ready pods per app. Requests look up their app here by local port.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio::sync::watch;

use crate::hold::AppState;
use crate::metrics::Metrics;
use crate::routes::{AppConfig, AppKey, port_table};

/// A local port's app and the port its pods listen on.
#[derive(Clone)]
pub struct Route {
    pub app: Arc<AppState>,
    pub target_port: u16,
}

#[derive(Default)]
struct Inner {
    configs: BTreeMap<AppKey, AppConfig>,
    apps: HashMap<AppKey, Arc<AppState>>,
    /// Ready pods per app, kept even for apps not (yet) seen, since the two watches deliver in
    /// any order.
    pods: HashMap<AppKey, Vec<IpAddr>>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    routes: RwLock<HashMap<u16, Route>>,
    ports: watch::Sender<BTreeSet<u16>>,
    metrics: Arc<Metrics>,
    apps_synced: AtomicBool,
    pods_synced: AtomicBool,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::default(),
            routes: RwLock::default(),
            ports: watch::channel(BTreeSet::new()).0,
            metrics,
            apps_synced: AtomicBool::new(false),
            pods_synced: AtomicBool::new(false),
        }
    }

    /// The app a connection on `port` is for.
    pub fn route(&self, port: u16) -> Option<Route> {
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
        self.rebuild_routes(&inner);
    }

    /// An app was deleted.
    pub fn remove_app(&self, key: &AppKey) {
        let mut inner = self.lock();
        self.remove_locked(&mut inner, key);
        self.rebuild_routes(&inner);
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
        self.rebuild_routes(&inner);
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

    pub fn mark_apps_synced(&self) {
        self.apps_synced.store(true, Ordering::Release);
    }

    pub fn mark_pods_synced(&self) {
        self.pods_synced.store(true, Ordering::Release);
    }

    /// Both watches have listed everything once.
    pub fn synced(&self) -> bool {
        self.apps_synced.load(Ordering::Acquire) && self.pods_synced.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn upsert_locked(&self, inner: &mut Inner, config: AppConfig) {
        match inner.apps.get(&config.key) {
            Some(app) => app.set_wake_timeout(config.wake_timeout),
            None => {
                let ips = inner.pods.get(&config.key).cloned().unwrap_or_default();
                let app = AppState::new(
                    config.key.clone(),
                    config.wake_timeout,
                    ips,
                    self.metrics.for_app(&config.key),
                );
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

    fn rebuild_routes(&self, inner: &Inner) {
        let (table, conflicts) = port_table(inner.configs.values());
        for c in conflicts {
            tracing::warn!(port = c.port, winner = %c.winner, loser = %c.loser, "two apps claim one activator port");
        }
        let routes: HashMap<u16, Route> = table
            .into_iter()
            .filter_map(|(port, route)| {
                let app = inner.apps.get(&route.app)?.clone();
                Some((
                    port,
                    Route {
                        app,
                        target_port: route.target_port,
                    },
                ))
            })
            .collect();
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
