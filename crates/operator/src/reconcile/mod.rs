//! One reconcile of one CracApp, as a pipeline:
//!
//! 1. [`observe`]: every read, once, from the watches' caches (and the agents' activity);
//! 2. [`decide`]: what should exist and what the status says, pure, from what was observed
//!    (with [`checkpoint`] and [`cycle`] deciding their parts and [`status`] the conditions);
//! 3. [`apply`]: the objects, in order, skipping what is unchanged;
//! 4. [`report`]: the Events, then the status, written only when it changed (before the
//!    objects when the app moves to the activator: [`decide::status_before_objects`]).
//!
//! An app with images on a shared `existingClaim` carries a finalizer; before it goes,
//! [`cleanup`] removes its images from the claim.

pub mod apply;
pub mod checkpoint;
pub mod cleanup;
pub mod cycle;
pub mod decide;
pub mod fallbacks;
pub mod in_place;
pub mod observe;
pub mod report;
pub mod status;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::metrics::ResultLabel;
use crac_api::CracApp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{Instrument, field, info_span, warn};

/// Removes the app's images from a shared claim before the CracApp goes.
pub const FINALIZER: &str = "crac.dev/cleanup-images";
/// How soon to look again at an app skipped because the cache still held a version whose
/// status the operator has since replaced.
const SUPERSEDED_RETRY: Duration = Duration::from_secs(2);

pub async fn reconcile(app: Arc<CracApp>, ctx: Arc<Context>) -> Result<Action> {
    let span = info_span!("reconcile", app = %app.name_any(), namespace = field::Empty);
    span.record("namespace", app.namespace().unwrap_or_default().as_str());
    let started = Instant::now();
    let result = with_finalizer(app, &ctx).instrument(span).await;
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.metric_label(),
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel {
            result: label.into(),
        })
        .inc();
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Only an app whose images sit on a shared claim needs a finalizer (its own claim goes with
/// it by owner reference); the others are spared the write that adds it.
async fn with_finalizer(app: Arc<CracApp>, ctx: &Context) -> Result<Action> {
    let needs_cleanup = app.spec.checkpoint.storage.existing_claim.is_some()
        || app.finalizers().iter().any(|f| f == FINALIZER);
    if !needs_cleanup {
        if app.meta().deletion_timestamp.is_some() {
            cleanup::forget(&app, ctx);
            return Ok(Action::await_change());
        }
        return pipeline(&app, ctx).await;
    }
    let api = Api::<CracApp>::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, app, |event| async {
        match event {
            Finalizer::Apply(app) => pipeline(&app, ctx).await,
            Finalizer::Cleanup(app) => cleanup::cleanup(&app, ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// observe → decide → apply → report.
async fn pipeline(app: &CracApp, ctx: &Context) -> Result<Action> {
    let key = (
        app.namespace().unwrap_or_default(),
        crate::build::app_name(app).to_string(),
    );
    let version = app.metadata.resource_version.clone().unwrap_or_default();
    if ctx.caches.superseded.is_superseded(&key, &version) {
        // The status was written since; that write's watch event reconciles again. The
        // requeue is only a safety net.
        return Ok(Action::requeue(SUPERSEDED_RETRY));
    }
    let seen = observe::observe(app, ctx).await?;
    let mut decision = decide::decide(app, &seen, &ctx.config, ctx.retry_base);
    let reported = decide::status_before_objects(&seen.previous, &decision.status);
    if reported {
        report::report(ctx, app, &seen, &decision).await?;
    }
    match apply::apply(ctx, app, &seen, &decision).await {
        Err(taken @ Error::NameTaken { .. }) => {
            decision = decide::name_taken(app, &seen, &decision, taken.to_string());
            report::report(ctx, app, &seen, &decision).await?;
        }
        Err(other) => return Err(other),
        Ok(()) if !reported => report::report(ctx, app, &seen, &decision).await?,
        Ok(()) => {}
    }
    Ok(match decision.requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

/// A merge or strategic patch under the operator's field manager (not an apply).
pub fn patch_params() -> kube::api::PatchParams {
    kube::api::PatchParams {
        field_manager: Some(crac_api::labels::MANAGER.into()),
        ..Default::default()
    }
}

pub fn error_policy(app: Arc<CracApp>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::Finalizer(inner)
            if matches!(
                **inner,
                kube::runtime::finalizer::Error::CleanupFailed(Error::CleanupPending { .. })
            ) =>
        {
            Action::requeue(Duration::from_secs(2))
        }
        // The namespace is being deleted: its objects go with it, nothing to retry hot.
        _ if error.namespace_terminating() => {
            tracing::debug!(app = %app.name_any(), "namespace terminating");
            Action::requeue(Duration::from_secs(60))
        }
        _ => {
            warn!(app = %app.name_any(), reason = error.metric_label(), error = %error, "reconcile failed");
            Action::requeue(Duration::from_secs(5))
        }
    }
}
