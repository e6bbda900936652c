//! The apply step: the decided objects, in order (claim, checkpoint Job, Deployment, Service,
//! EndpointSlice), by server-side apply with one field manager, each skipped when it would
//! change nothing (see [`crate::cache::Applied`]). The exceptions: while a new image is taken,
//! only the Deployment's replicas are patched; checkpoint Jobs of an earlier spec still running
//! are deleted first.

use super::checkpoint::{Outcome, SupersededJob};
use super::decide::Decision;
use super::observe::Observed;
use super::patch_params;
use crate::build::app_name;
use crate::cache::{self, Live};
use crate::context::Context;
use crate::error::{Error, Result};
use crac_api::{CracApp, labels};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions, PropagationPolicy};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use tracing::info;

pub async fn apply(
    ctx: &Context,
    app: &CracApp,
    seen: &Observed,
    decision: &Decision,
) -> Result<()> {
    for job in &decision.superseded_jobs {
        delete_superseded(ctx, &seen.key.0, job).await?;
    }
    ctx.metrics
        .restore_cold_starts
        .inc_by(decision.cold_starts_counted as u64);
    if let Some(at) = decision.stale_image_at {
        mark_stale(ctx, app, seen, at).await?;
    }
    if let Some(claim) = &decision.claim {
        let live = seen.claim.clone().map(Live::of);
        refuse_if_taken(ctx, app, claim, live.is_some()).await?;
        apply_changed(ctx, app, claim, live).await?;
    }
    if let Some(job) = &decision.job {
        // Until the watch delivers the new Job, a reconcile finds none and applies the same
        // Job again (a no-op for the API server); only the first apply is counted.
        let key = ("Job".to_string(), job.name_any());
        let first = !ctx.caches.applied.knows(&seen.key, &key);
        apply_changed(ctx, app, job, None).await?;
        if first {
            ctx.metrics.checkpoints_started.inc();
            info!(job = %key.1, "checkpoint Job created");
        }
    }
    match &decision.outcome {
        Some(Outcome::Published { seconds }) => {
            if let Some(secs) = seconds {
                ctx.metrics.checkpoint_seconds.observe(*secs);
            }
            info!("checkpoint image published");
        }
        Some(Outcome::Failed { reason }) => {
            ctx.metrics
                .checkpoint_failures
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: crate::checkpoint_pod::reason_label(reason).to_string(),
                })
                .inc();
        }
        None => {}
    }
    if let Some(secret) = &decision.control_secret {
        apply_unread(ctx, app, secret).await?;
    }
    if let Some(deployment) = &decision.deployment {
        let live = seen.deployment.as_deref().map(Live::generation_of);
        refuse_if_taken(ctx, app, deployment, live.is_some()).await?;
        apply_changed(ctx, app, deployment, live).await?;
    }
    if let Some(replicas) = decision.scale {
        // A merge patch of the replicas alone: an apply would have to send the template.
        let api = Api::<Deployment>::namespaced(ctx.client.clone(), &seen.key.0);
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        let params = patch_params();
        api.patch(&seen.key.1, &params, &Patch::Merge(patch))
            .await?;
    }
    if let Some(service) = &decision.service {
        let live = seen.service.as_deref().map(Live::version_of);
        refuse_if_taken(ctx, app, service, live.is_some()).await?;
        apply_changed(ctx, app, service, live).await?;
    }
    if let Some(slice) = &decision.slice {
        let live = seen.slice.as_deref().map(Live::version_of);
        apply_changed(ctx, app, slice, live).await?;
    }
    if let Some(run) = &decision.in_place {
        for note in super::in_place::carry_out(ctx, &seen.key, run).await {
            super::report::publish(ctx, app, &note).await;
        }
    }
    Ok(())
}

/// An object about to be applied, as [`crate::applied::Applied`] keys and hashes it.
struct Sending {
    ns: String,
    owner: (String, String),
    key: (String, String),
    body: serde_json::Value,
    hash: u64,
}

fn sending<K: Applicable>(app: &CracApp, obj: &K) -> Sending {
    let ns = app.namespace().unwrap_or_default();
    let body = serde_json::to_value(obj).expect("Kubernetes objects serialize");
    Sending {
        owner: (ns.clone(), app_name(app).to_string()),
        key: (
            K::kind(&()).to_string(),
            obj.meta().name.clone().unwrap_or_default(),
        ),
        hash: cache::body_hash(&body),
        body,
        ns,
    }
}

/// Applies an object the operator may write but not read (the control Secret: reading
/// Secrets in every namespace is more than the operator needs), once per process and content.
/// Whoever made an object of that name first, the forced apply makes its data the app's.
async fn apply_unread<K: Applicable>(ctx: &Context, app: &CracApp, obj: &K) -> Result<()> {
    let Sending {
        ns,
        owner,
        key,
        hash,
        ..
    } = sending(app, obj);
    if ctx.caches.applied.sent(&owner, &key, hash) {
        return Ok(());
    }
    let answer = apply_object(&ctx.client, &ns, obj).await?;
    let version = answer.meta().resource_version.clone().unwrap_or_default();
    ctx.caches
        .applied
        .record(owner, key, hash, None, version, None);
    Ok(())
}

/// Sets the app's stale-image annotation: it joins the checkpoint id, so the next reconcile
/// takes a new image (the pods keep serving the stale one, cold or not, until it is ready).
async fn mark_stale(
    ctx: &Context,
    app: &CracApp,
    seen: &Observed,
    at: k8s_openapi::jiff::Timestamp,
) -> Result<()> {
    let api = Api::<CracApp>::namespaced(ctx.client.clone(), &seen.key.0);
    let patch = serde_json::json!({
        "metadata": { "annotations": { labels::STALE_IMAGE_AT: at.to_string() } }
    });
    let params = patch_params();
    api.patch(&seen.key.1, &params, &Patch::Merge(patch))
        .await?;
    ctx.metrics.stale_images.inc();
    info!("image stale: restore pods kept starting cold; a new checkpoint follows");
    // Until the cache holds the write, a reconcile handed the old version is skipped (it
    // would mark the image stale again, at another time, and take a second image).
    if let Some(version) = app.metadata.resource_version.clone() {
        ctx.caches.superseded.record(seen.key.clone(), version);
    }
    Ok(())
}

/// Deletes a checkpoint Job the spec superseded, and its pods with it (background
/// propagation: a Job's own default, orphan, would leave its pod to publish and prune). Gone
/// already, or replaced by another Job of that name (the uid precondition): nothing to do.
async fn delete_superseded(ctx: &Context, ns: &str, job: &SupersededJob) -> Result<()> {
    let api = Api::<Job>::namespaced(ctx.client.clone(), ns);
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        preconditions: Some(Preconditions {
            uid: Some(job.uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&job.name, &params).await {
        Ok(_) => {
            ctx.metrics.checkpoints_superseded.inc();
            info!(job = %job.name, "superseded checkpoint Job deleted");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A namespaced object the operator applies.
pub trait Applicable:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + Serialize
    + std::fmt::Debug
{
}

impl<K> Applicable for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + Serialize
        + std::fmt::Debug
{
}

pub fn apply_params() -> PatchParams {
    PatchParams::apply(labels::MANAGER).force()
}

/// Server-side applies `obj` in namespace `ns`; what the API server answered.
pub async fn apply_object<K: Applicable>(client: &Client, ns: &str, obj: &K) -> Result<K> {
    let api = Api::<K>::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(obj).expect("Kubernetes objects serialize");
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    Ok(api
        .patch(&name, &apply_params(), &Patch::Apply(body))
        .await?)
}

/// Before the operator first applies `obj` (the caches hold no such object of the app's, and
/// it has not applied it since it started): refuses when an object of that name exists that
/// the app does not own. A forced apply would take it over, and deleting the app would then
/// delete it, so whoever may create a CracApp could seize a Service they may not edit.
async fn refuse_if_taken<K: Applicable>(
    ctx: &Context,
    app: &CracApp,
    obj: &K,
    cached: bool,
) -> Result<()> {
    let ns = app.namespace().unwrap_or_default();
    let owner = (ns.clone(), app_name(app).to_string());
    let name = obj.meta().name.clone().unwrap_or_default();
    let key = (K::kind(&()).to_string(), name.clone());
    if cached || ctx.caches.applied.knows(&owner, &key) {
        return Ok(());
    }
    let api = Api::<K>::namespaced(ctx.client.clone(), &ns);
    match api.get_opt(&name).await? {
        Some(existing) if !owned_by(existing.meta(), app) => {
            Err(Error::NameTaken { kind: key.0, name })
        }
        _ => Ok(()),
    }
}

/// Whether `meta` names `app` as its controller.
fn owned_by(meta: &kube::api::ObjectMeta, app: &CracApp) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == app.metadata.uid.as_ref())
}

/// Applies `obj` unless that would change nothing: the same object was applied last and the
/// object `live` (from the caches) still holds it.
async fn apply_changed<K: Applicable>(
    ctx: &Context,
    app: &CracApp,
    obj: &K,
    live: Option<Live>,
) -> Result<()> {
    let Sending {
        ns,
        owner,
        key,
        body,
        hash,
    } = sending(app, obj);
    if let Some(live) = &live
        && ctx
            .caches
            .applied
            .unchanged(&owner, &key, hash, &body, live)
    {
        return Ok(());
    }
    let answer = apply_object(&ctx.client, &ns, obj).await?;
    let version = answer.meta().resource_version.clone().unwrap_or_default();
    let generation = answer.meta().generation;
    let over = live.map(|l| l.version);
    ctx.caches
        .applied
        .record(owner, key, hash, over, version, generation);
    Ok(())
}
