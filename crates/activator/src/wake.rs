//! The wake request: the [`WakeClient`] trait the request path asks through (so the data path
//! can be tested without a cluster), and [`KubeWaker`], which asks by patching the CracApp's
//! status.

use crac_api::CracApp;
use futures::future::BoxFuture;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use crate::routes::AppKey;

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
