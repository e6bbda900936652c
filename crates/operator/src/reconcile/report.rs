//! The status step: the decided Events, then the status, written by server-side apply only
//! when it changed (an unchanged status is not written: no self-triggered reconciles).

use super::apply::apply_params;
use super::decide::{Decision, Note, status_changed};
use super::observe::Observed;
use crate::build::app_name;
use crate::context::Context;
use crate::error::Result;
use crate::events;
use crac_api::CracApp;
use kube::api::{Api, Patch};
use kube::{Resource, ResourceExt};

pub async fn report(
    ctx: &Context,
    app: &CracApp,
    seen: &Observed,
    decision: &Decision,
) -> Result<()> {
    for note in &decision.events {
        publish(ctx, app, note).await;
    }
    if !status_changed(&seen.previous, &decision.status) {
        return Ok(());
    }
    let api = Api::<CracApp>::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": CracApp::api_version(&()),
        "kind": CracApp::kind(&()),
        "status": decision.status,
    });
    api.patch_status(app_name(app), &apply_params(), &Patch::Apply(patch))
        .await?;
    // Until the cache holds the write, a reconcile handed the old version is skipped.
    if let Some(version) = app.metadata.resource_version.clone() {
        ctx.caches.superseded.record(seen.key.clone(), version);
    }
    Ok(())
}

/// Publishes one Event about the app (a failure is logged, not fatal).
pub async fn publish(ctx: &Context, app: &CracApp, note: &Note) {
    let note = events::Note {
        warning: note.warning,
        reason: &note.reason,
        action: "Reconcile",
        message: note.message.clone(),
    };
    ctx.events.publish_or_log(&note, &app.object_ref(&())).await;
}
