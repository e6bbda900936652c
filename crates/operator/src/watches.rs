//! The controller's wiring: one watch per kind the operator reads, each filling a cache in
//! [`crate::cache::Caches`] and, for the kinds whose changes matter to an app, triggering that
//! app's reconcile. Reconciles read only those caches.

use crate::cache;
use crate::context::Context;
use crate::reconcile::cleanup::forget;
use crate::reconcile::{error_policy, reconcile};
use crac_api::policy::CracScalePolicy;
use crac_api::{CracApp, labels};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tracing::warn;

/// Where the controller looks: the whole cluster, or one namespace.
fn api_in<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until the stream ends (or the future is dropped). `on_ready` is called
/// once every cache holds a complete listing.
pub async fn run(ctx: Arc<Context>, concurrency: u16, on_ready: impl Fn() + Send + 'static) {
    let client = ctx.client.clone();
    let ns = ctx.namespace.as_deref();
    let owned =
        watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER));
    let Some(writers) = ctx.caches.take_writers() else {
        warn!("the controller already runs for this context");
        return;
    };
    // The streams that trigger reconciles also fill the caches reconciles read from, so a
    // reconcile triggered by a change always sees it.
    let pods = cached_stream(api_in(&client, ns), &owned, cache::slim_pod, writers.pods);
    let policies = watcher(
        Api::<CracScalePolicy>::all(client.clone()),
        Default::default(),
    )
    .default_backoff()
    .reflect(writers.policies);
    let jobs = cached_stream(api_in(&client, ns), &owned, cache::slim_job, writers.jobs);
    let deployments = cached_stream(
        api_in(&client, ns),
        &owned,
        cache::slim_deployment,
        writers.deployments,
    );
    let services = cached_stream(api_in(&client, ns), &owned, cache::slim, writers.services);
    let slices = cached_stream(api_in(&client, ns), &owned, cache::slim, writers.slices);
    // Every claim, not only the apps' own: an app's `existingClaim` is the user's.
    let claims = cached_stream(
        api_in(&client, ns),
        &watcher::Config::default(),
        cache::slim,
        writers.claims,
    );
    // Read, never triggering: namespace labels and which StorageClasses exist.
    let namespaces = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        Default::default(),
    )
    .default_backoff()
    .reflect(writers.namespaces)
    .for_each(|_| std::future::ready(()));
    let storage_classes = watcher(
        Api::<PartialObjectMeta<StorageClass>>::all(client.clone()),
        Default::default(),
    )
    .default_backoff()
    .reflect(writers.storage_classes)
    .for_each(|_| std::future::ready(()));
    tokio::spawn(namespaces);
    tokio::spawn(storage_classes);
    let activators = watcher(
        Api::<Pod>::namespaced(client.clone(), &ctx.activator.namespace),
        watcher::Config::default().labels(&ctx.activator.selector),
    )
    .default_backoff()
    .modify(cache::slim_pod)
    .reflect(writers.activators);
    // The apps themselves, without their managedFields: parsed, those were the largest part
    // of a cached app (about 13 KiB each), and the operator never reads them.
    // An app deleted without a finalizer is never reconciled again: forget it when it goes.
    let forgetting = ctx.clone();
    let app_changes = watcher(api_in::<CracApp>(&client, ns), watcher::Config::default())
        .default_backoff()
        .modify(cache::slim_app)
        .reflect(writers.apps)
        .inspect(move |event| {
            if let Ok(watcher::Event::Delete(app)) = event {
                forget(app, &forgetting);
            }
        })
        .applied_objects();
    let apps = ctx.caches.apps.clone();
    let claim_users = apps.clone();
    let controller = Controller::for_stream(app_changes, apps)
        .with_config(Config::default().concurrency(concurrency))
        .owns_stream(jobs)
        .owns_stream(deployments)
        .owns_stream(services)
        .owns_stream(slices)
        // An app's own claim, and a user's claim apps wait for (`existingClaim`).
        .watches_stream(claims, move |claim| apps_using_claim(&claim, &claim_users))
        // Pods carry no owner reference to the app; map them by their label. Checkpoint pod
        // failures and restore pods' readiness both change what the app's status says.
        .watches_stream(pods, |pod| {
            let app = pod.labels().get(labels::APP)?.clone();
            Some(ObjectRef::new(&app).within(&pod.namespace()?))
        })
        // A policy's new spec may change every app's settings; its status writes do not.
        .reconcile_all_on(policy_spec_changes(policies))
        // Sleeping apps' endpoints are the activator pods: follow them as they come and go.
        .reconcile_all_on(activator_address_changes(activators));
    let caches_ready = ctx.clone();
    tokio::spawn(async move {
        if caches_ready.caches.ready().await.is_ok() {
            on_ready();
        }
    });
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile ended with an error");
            }
        })
        .await;
}

/// The objects of one kind, as a trigger stream that also fills the cache `writer` (slimmed
/// by `slim` first).
fn cached_stream<K>(
    api: Api<K>,
    config: &watcher::Config,
    slim: fn(&mut K),
    writer: kube::runtime::reflector::store::Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, config.clone())
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .touched_objects()
}

/// The apps a claim matters to: the one that owns it, and those naming it as `existingClaim`.
fn apps_using_claim(
    claim: &PersistentVolumeClaim,
    apps: &Store<CracApp>,
) -> Vec<ObjectRef<CracApp>> {
    let Some(ns) = claim.namespace() else {
        return Vec::new();
    };
    let name = claim.name_any();
    let owner = claim
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "CracApp")
        .map(|o| ObjectRef::new(&o.name).within(&ns));
    let users = apps
        .state()
        .into_iter()
        .filter(|a| {
            a.namespace().as_deref() == Some(ns.as_str())
                && a.spec.checkpoint.storage.existing_claim.as_deref() == Some(name.as_str())
        })
        .map(|a| ObjectRef::from_obj(&*a));
    owner.into_iter().chain(users).collect()
}

/// One trigger per change of a policy's spec (a new generation) or deletion; the status
/// writes `policies::keep_status` makes every few seconds trigger nothing.
fn policy_spec_changes(
    events: impl Stream<Item = Result<watcher::Event<CracScalePolicy>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = ()> + Send + 'static {
    let mut generations: HashMap<String, Option<i64>> = HashMap::new();
    events.filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                let generation = p.metadata.generation;
                generations.insert(p.name_any(), generation) != Some(generation)
            }
            Ok(watcher::Event::Delete(p)) => generations.remove(&p.name_any()).is_some(),
            _ => false,
        };
        std::future::ready(changed.then_some(()))
    })
}

/// One trigger per change of an activator pod's serving address (ready, gone, moved); the
/// first listing triggers nothing (every app is reconciled at start anyway).
fn activator_address_changes(
    events: impl Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = ()> + Send + 'static {
    let mut addresses: BTreeMap<String, Option<String>> = BTreeMap::new();
    events.filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(p)) => {
                let address = crac_api::serving::serving_address(&p).map(String::from);
                addresses.insert(p.name_any(), address.clone()).flatten() != address
            }
            Ok(watcher::Event::InitApply(p)) => {
                let address = crac_api::serving::serving_address(&p).map(String::from);
                addresses.insert(p.name_any(), address);
                false
            }
            Ok(watcher::Event::Delete(p)) => addresses.remove(&p.name_any()).flatten().is_some(),
            _ => false,
        };
        std::future::ready(changed.then_some(()))
    })
}
