//! The activator's two ties to Kubernetes: the watches that feed the [`Registry`] (CracApps in
//! every namespace, pods labelled `crac.dev/app`), and the wake request, a status patch behind
//! the [`WakeClient`] trait so the data path can be tested without a cluster.

use std::sync::Arc;
use std::time::Duration;

use crac_api::CracApp;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::registry::Registry;
use crate::routes::{AppConfig, AppKey, PodIndex, app_config, pod_entry};

/// The field manager of the activator's status writes.
pub const FIELD_MANAGER: &str = "crac-activator";

/// A wake request that did not go through.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct WakeError {
    /// Retrying cannot help (the app is gone, or the activator may not patch it): held
    /// requests get 503 now instead of at their deadline.
    pub permanent: bool,
    pub message: String,
}

/// Asks the operator to wake an app.
pub trait WakeClient: Send + Sync + 'static {
    fn request_wake<'a>(&'a self, app: &'a AppKey) -> BoxFuture<'a, Result<(), WakeError>>;
}

/// Wakes apps by setting `status.wakeRequestedAt` (a JSON merge patch on the status
/// subresource). Several replicas doing it at once is harmless: the operator only compares the
/// time with when the app went to sleep.
pub struct KubeWaker {
    client: Client,
}

impl KubeWaker {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl WakeClient for KubeWaker {
    fn request_wake<'a>(&'a self, app: &'a AppKey) -> BoxFuture<'a, Result<(), WakeError>> {
        Box::pin(async move {
            let api: Api<CracApp> = Api::namespaced(self.client.clone(), &app.namespace);
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let patch = serde_json::json!({ "status": { "wakeRequestedAt": now } });
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match api
                .patch_status(&app.name, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) => Err(WakeError {
                    // 404: the app is gone; 403: RBAC forbids it; 422: the status is invalid.
                    permanent: matches!(status.code, 403 | 404 | 422),
                    message: format!(
                        "patching status of {app}: {} ({})",
                        status.message, status.code
                    ),
                }),
                Err(err) => Err(WakeError {
                    permanent: false,
                    message: format!("patching status of {app}: {err}"),
                }),
            }
        })
    }
}

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
    loop {
        match events.try_next().await {
            Ok(Some(event)) => match event {
                Event::Apply(pod) => {
                    if let Some(app) = pod_entry(&pod).and_then(|e| index.apply(e)) {
                        registry.set_ready_pods(&app, index.ready_ips(&app));
                    }
                }
                Event::Delete(pod) => {
                    if let Some(app) = pod_entry(&pod).and_then(|e| index.delete(&e)) {
                        registry.set_ready_pods(&app, index.ready_ips(&app));
                    }
                }
                Event::Init => index.start_relist(),
                Event::InitApply(pod) => {
                    if let Some(entry) = pod_entry(&pod) {
                        index.relist_pod(entry);
                    }
                }
                Event::InitDone => {
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
