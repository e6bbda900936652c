//! Before a CracApp with images on a shared `existingClaim` goes: a short Job running the
//! agent's `clean` command removes them (the app's own claim goes with it by owner reference).

use super::apply::apply_object;
use super::checkpoint::job_finished;
use crate::build::app_name;
use crate::build::cleanup::{cleanup_job_for, cleanup_job_name};
use crate::cache::cached;
use crate::context::Context;
use crate::error::{Error, Result, refused_as_terminating};
use crate::events::Note;
use crac_api::CracApp;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

/// Drops what the operator remembers of an app that is going: what it applied, the status
/// version it replaced, and its activator ports (free for another app).
pub fn forget(app: &CracApp, ctx: &Context) {
    let key = (
        app.namespace().unwrap_or_default(),
        app_name(app).to_string(),
    );
    ctx.caches.applied.forget(&key);
    ctx.caches.superseded.forget(&key);
    let table = ctx.activator_ports.clone();
    let release = async move {
        if let Some(table) = table.lock().await.as_mut() {
            table.retain(|_, owner| owner != &key);
        }
    };
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(release);
    }
}

pub async fn cleanup(app: &CracApp, ctx: &Context) -> Result<Action> {
    forget(app, ctx);
    let ns = app.namespace().unwrap_or_default();
    let Some(claim) = app.spec.checkpoint.storage.existing_claim.clone() else {
        return Ok(Action::await_change());
    };
    let name = cleanup_job_name(app);
    ctx.caches.ready().await?;
    match cached(&ctx.caches.jobs, &ns, &name) {
        None => {
            let job = cleanup_job_for(app, &name, &claim, &ctx.config);
            match apply_object(&ctx.client, &ns, &job).await {
                Ok(_) => Err(Error::CleanupPending { claim }),
                // The whole namespace is going, the claim with it: nothing can run there any
                // more, and holding the finalizer would hold the namespace's deletion forever.
                Err(Error::Kube(e)) if refused_as_terminating(&e) => {
                    tracing::info!(%claim, "namespace terminating; the claim goes with it");
                    Ok(Action::await_change())
                }
                Err(e) => Err(e),
            }
        }
        Some(job) if job_finished(&job, "Complete") => Ok(Action::await_change()),
        Some(job) if job_finished(&job, "Failed") => {
            let note = Note {
                warning: true,
                reason: "CleanupFailed",
                action: "Cleanup",
                message: format!(
                    "could not remove the app's images from claim {claim:?}; remove {}/{} by hand",
                    crac_api::agent::IMAGE_MOUNT,
                    app_name(app)
                ),
            };
            ctx.events.publish_or_log(&note, &app.object_ref(&())).await;
            Ok(Action::await_change())
        }
        Some(_) => Err(Error::CleanupPending { claim }),
    }
}
