//! The watches that feed the [`Registry`]: CracApps in every namespace, the restore pods
//! (labelled `crac.dev/app`), and every pod's IPs and namespace for the caller check. (The
//! activator's other tie to Kubernetes, the wake request, is [`crate::wake`].)

use std::sync::Arc;
use std::time::Duration;

use crac_api::CracApp;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::access::{CallerIndex, CallerPod, pod_addresses};
use crate::registry::Registry;
use crate::routes::{AppConfig, PodEntry, PodIndex, StartingPods, app_config, pod_entry};

/// Watches CracApps in every namespace and keeps the registry's apps and ports current.
/// Returns only if the watch stream ends (it retries errors with backoff itself).
pub async fn watch_apps(client: Client, registry: Arc<Registry>, default_wake_timeout: Duration) {
    let api: Api<CracApp> = Api::all(client);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relist: Option<Vec<AppConfig>> = None;
    loop {
        match events.try_next().await {
            Ok(Some(event)) => match event {
                Event::Apply(app) => {
                    if let Some(config) = app_config(&app, default_wake_timeout) {
                        registry.upsert_app(config);
                    }
                }
                Event::Delete(app) => {
                    if let Some(config) = app_config(&app, default_wake_timeout) {
                        registry.remove_app(&config.key);
                    }
                }
                Event::Init => relist = Some(Vec::new()),
                Event::InitApply(app) => {
                    if let Some(config) = app_config(&app, default_wake_timeout) {
                        relist.get_or_insert_with(Vec::new).push(config);
                    }
                }
                Event::InitDone => {
                    let configs = relist.take().unwrap_or_default();
                    tracing::info!(apps = configs.len(), "cracapps listed");
                    registry.replace_apps(configs);
                    registry.mark_apps_synced();
                }
            },
            Ok(None) => return,
            Err(err) => tracing::warn!(error = %err, "cracapp watch failed; retrying"),
        }
    }
}

/// Watches the restore pods (labelled `crac.dev/app`, component `restore`) in every namespace
/// and keeps each app's ready pods. Checkpoint and cleanup pods carry the app label too but
/// never serve.
pub async fn watch_pods(client: Client, registry: Arc<Registry>) {
    let api: Api<Pod> = Api::all(client);
    let selector = crac_api::serving::restore_pods_selector(None);
    let config = watcher::Config::default().labels(&selector);
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut index = PodIndex::default();
    // Pods running but not Ready yet: probed by the activator itself while requests are held.
    let mut starting = StartingPods::default();
    let mut relisted: Vec<PodEntry> = Vec::new();
    loop {
        match events.try_next().await {
            Ok(Some(event)) => match event {
                Event::Apply(pod) => {
                    if let Some(entry) = pod_entry(&pod) {
                        // Ready first: a pod that answered early and is now Ready stays a
                        // backend throughout, never missing for a moment in between.
                        let started = starting.apply(&entry);
                        if let Some(app) = index.apply(entry) {
                            registry.set_ready_pods(&app, index.ready_ips(&app));
                        }
                        if let Some(app) = started {
                            registry.set_starting_pods(
                                &app,
                                starting.ips(&app),
                                starting.asleep_ips(&app),
                            );
                        }
                    }
                }
                Event::Delete(pod) => {
                    if let Some(mut entry) = pod_entry(&pod) {
                        entry.starting_ip = None;
                        if let Some(app) = starting.apply(&entry) {
                            registry.set_starting_pods(
                                &app,
                                starting.ips(&app),
                                starting.asleep_ips(&app),
                            );
                        }
                        if let Some(app) = index.delete(&entry) {
                            registry.set_ready_pods(&app, index.ready_ips(&app));
                        }
                    }
                }
                Event::Init => {
                    index.start_relist();
                    relisted.clear();
                }
                Event::InitApply(pod) => {
                    if let Some(entry) = pod_entry(&pod) {
                        relisted.push(entry.clone());
                        index.relist_pod(entry);
                    }
                }
                Event::InitDone => {
                    for app in starting.replace(&std::mem::take(&mut relisted)) {
                        registry.set_starting_pods(
                            &app,
                            starting.ips(&app),
                            starting.asleep_ips(&app),
                        );
                    }
                    for app in index.finish_relist() {
                        registry.set_ready_pods(&app, index.ready_ips(&app));
                    }
                    registry.mark_pods_synced();
                }
            },
            Ok(None) => return,
            Err(err) => tracing::warn!(error = %err, "pod watch failed; retrying"),
        }
    }
}

/// Watches every pod in the cluster and keeps, for the caller check, only which namespace each
/// pod IP belongs to. Decodes just the pod's name, namespace, phase, host-network flag and IPs
/// ([`CallerPod`]), and keeps no objects: the index holds names and addresses only.
pub async fn watch_callers(client: Client, registry: Arc<Registry>) {
    let api: Api<CallerPod> = Api::all(client);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relist: Option<CallerIndex> = None;
    loop {
        match events.try_next().await {
            Ok(Some(event)) => match event {
                Event::Apply(pod) => {
                    if let Some(pod) = pod_addresses(&pod) {
                        registry.apply_caller_pod(pod);
                    }
                }
                Event::Delete(pod) => {
                    if let Some(pod) = pod_addresses(&pod) {
                        registry.delete_caller_pod(&pod.namespace, &pod.name);
                    }
                }
                Event::Init => relist = Some(CallerIndex::default()),
                Event::InitApply(pod) => {
                    if let Some(pod) = pod_addresses(&pod) {
                        relist.get_or_insert_with(CallerIndex::default).apply(pod);
                    }
                }
                Event::InitDone => {
                    let index = relist.take().unwrap_or_default();
                    tracing::info!(ips = index.len(), "pod addresses listed");
                    registry.replace_caller_pods(index);
                    registry.mark_callers_synced();
                }
            },
            Ok(None) => return,
            Err(err) => tracing::warn!(error = %err, "caller pod watch failed; retrying"),
        }
    }
}

/// How often the control key is looked for until it exists.
const CONTROL_KEY_RETRY: Duration = Duration::from_secs(5);

/// Reads the cluster key of sleeping in place ([`crac_api::control::KEY_SECRET`] in
/// `namespace`), retrying until the operator has created it; then hands it to the registry.
/// Only apps that sleep in place need it: until it is read, their sleeping pods are woken by
/// the operator alone (slower, never wrong).
pub async fn load_control_key(client: Client, namespace: String, registry: Arc<Registry>) {
    use crac_api::control::{KEY_FIELD, KEY_SECRET, MIN_KEY_BYTES};
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, &namespace);
    let mut said = false;
    loop {
        match api.get_opt(KEY_SECRET).await {
            Ok(Some(secret)) => {
                let key = secret
                    .data
                    .and_then(|mut d| d.remove(KEY_FIELD))
                    .map(|b| b.0)
                    .unwrap_or_default();
                if key.len() >= MIN_KEY_BYTES {
                    tracing::info!(%namespace, "control key read: pods sleeping in place are woken here");
                    registry.set_control_key(key.into());
                    return;
                }
                if !said {
                    tracing::warn!(%namespace, "the control key Secret holds no usable key");
                }
            }
            Ok(None) => {}
            Err(err) if !said => {
                tracing::warn!(%namespace, error = %err, "cannot read the control key; will retry");
            }
            Err(_) => {}
        }
        said = true;
        tokio::time::sleep(CONTROL_KEY_RETRY).await;
    }
}
