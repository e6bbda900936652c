//! What the operator's watches have seen, kept in memory, and what it last applied.
//!
//! With a thousand apps, most of the API server's work was the operator's own reads (a LIST of
//! the namespace's pods, a GET of the Job on every reconcile) and server-side applies that
//! changed nothing. Reads are served from stores filled by the watch streams that also
//! trigger reconciles ([`crate::watches::run`]), so a reconcile triggered by a change always
//! sees it; a reconcile makes no GET or LIST. An object is applied again only when the
//! operator wants something new, or when someone else changed it since the operator's last
//! apply (see [`crate::applied`]).
//!
//! A reconcile waits until every store holds a complete first listing, so it never mistakes
//! "not loaded yet" for "no pods" (which would empty a Service) or "no policy".

pub use crate::applied::{AppKey, Applied, Live, ObjectKey, Superseded, body_hash, difference};
use crate::error::{Error, Result};
use crac_api::CracApp;
use crac_api::policy::CracScalePolicy;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::store::{Writer, WriterDropped};
use kube::runtime::reflector::{self, ObjectRef, Store};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Stores of what the watches saw. Objects the operator applies but only needs the version of
/// are kept as metadata.
pub struct Caches {
    /// The CracApps (without their managedFields).
    pub apps: Store<CracApp>,
    /// Pods the operator's objects created (checkpoint, restore and cleanup pods).
    pub pods: Store<Pod>,
    /// Every CracScalePolicy.
    pub policies: Store<CracScalePolicy>,
    pub jobs: Store<Job>,
    /// Without their pod template (see [`slim_deployment`]).
    pub deployments: Store<Deployment>,
    pub services: Store<PartialObjectMeta<Service>>,
    /// Every claim where apps are watched: the apps' own, and the users' `existingClaim`s.
    pub claims: Store<PersistentVolumeClaim>,
    pub slices: Store<PartialObjectMeta<EndpointSlice>>,
    /// Namespaces' labels, for policies that select namespaces.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Which StorageClasses exist, for apps that name one.
    pub storage_classes: Store<PartialObjectMeta<StorageClass>>,
    /// The activator pods sleeping apps' Services point at.
    pub activators: Store<Pod>,
    /// What the operator last applied, per app.
    pub applied: Applied,
    /// Versions of apps whose status the operator has since written (see [`Superseded`]).
    pub superseded: Superseded,
    writers: Mutex<Option<Writers>>,
    all_ready: AtomicBool,
}

/// The write ends, taken once by the controller that feeds them.
pub struct Writers {
    pub apps: Writer<CracApp>,
    pub pods: Writer<Pod>,
    pub policies: Writer<CracScalePolicy>,
    pub jobs: Writer<Job>,
    pub deployments: Writer<Deployment>,
    pub services: Writer<PartialObjectMeta<Service>>,
    pub claims: Writer<PersistentVolumeClaim>,
    pub slices: Writer<PartialObjectMeta<EndpointSlice>>,
    pub namespaces: Writer<PartialObjectMeta<Namespace>>,
    pub storage_classes: Writer<PartialObjectMeta<StorageClass>>,
    pub activators: Writer<Pod>,
}

impl Default for Caches {
    fn default() -> Self {
        let (apps, apps_writer) = reflector::store();
        let (pods, pods_writer) = reflector::store();
        let (policies, policies_writer) = reflector::store();
        let (jobs, jobs_writer) = reflector::store();
        let (deployments, deployments_writer) = reflector::store();
        let (services, services_writer) = reflector::store();
        let (claims, claims_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let (namespaces, namespaces_writer) = reflector::store();
        let (storage_classes, storage_classes_writer) = reflector::store();
        let (activators, activators_writer) = reflector::store();
        Caches {
            apps,
            pods,
            policies,
            jobs,
            deployments,
            services,
            claims,
            slices,
            namespaces,
            storage_classes,
            activators,
            applied: Applied::default(),
            superseded: Superseded::default(),
            all_ready: AtomicBool::new(false),
            writers: Mutex::new(Some(Writers {
                apps: apps_writer,
                pods: pods_writer,
                policies: policies_writer,
                jobs: jobs_writer,
                deployments: deployments_writer,
                services: services_writer,
                claims: claims_writer,
                slices: slices_writer,
                namespaces: namespaces_writer,
                storage_classes: storage_classes_writer,
                activators: activators_writer,
            })),
        }
    }
}

impl Caches {
    /// The write ends; `None` after the first call (one controller feeds the stores).
    pub fn take_writers(&self) -> Option<Writers> {
        self.writers.lock().ok()?.take()
    }

    /// Returns once every store holds a complete listing.
    pub async fn ready(&self) -> Result<()> {
        if self.all_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let gone = |_| Error::CacheGone;
        until_ready(&self.apps).await.map_err(gone)?;
        until_ready(&self.pods).await.map_err(gone)?;
        until_ready(&self.policies).await.map_err(gone)?;
        until_ready(&self.jobs).await.map_err(gone)?;
        until_ready(&self.deployments).await.map_err(gone)?;
        until_ready(&self.services).await.map_err(gone)?;
        until_ready(&self.claims).await.map_err(gone)?;
        until_ready(&self.slices).await.map_err(gone)?;
        until_ready(&self.namespaces).await.map_err(gone)?;
        until_ready(&self.storage_classes).await.map_err(gone)?;
        until_ready(&self.activators).await.map_err(gone)?;
        self.all_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The app's restore pods (the pods that may serve).
    pub fn restore_pods(&self, namespace: &str, app: &str) -> Vec<Arc<Pod>> {
        self.pods.state_filter(|pod| {
            pod.metadata.namespace.as_deref() == Some(namespace)
                && crac_api::serving::is_restore_pod_of(pod, app)
        })
    }

    /// The checkpoint Jobs labelled as the app's (any id, any attempt).
    pub fn checkpoint_jobs(&self, namespace: &str, app: &str) -> Vec<Arc<Job>> {
        self.jobs.state_filter(|job| {
            let labels = job.labels();
            job.metadata.namespace.as_deref() == Some(namespace)
                && labels.get(crac_api::labels::APP).map(String::as_str) == Some(app)
                && labels.get(crac_api::labels::COMPONENT).map(String::as_str)
                    == Some(crate::build::job::CHECKPOINT_COMPONENT)
        })
    }

    /// The pods of one Job.
    pub fn job_pods(&self, namespace: &str, job: &str) -> Vec<Arc<Pod>> {
        self.pods.state_filter(|pod| {
            pod.metadata.namespace.as_deref() == Some(namespace)
                && pod.labels().get("job-name").map(String::as_str) == Some(job)
        })
    }

    pub fn policies(&self) -> Vec<CracScalePolicy> {
        self.policies
            .state()
            .iter()
            .map(|p| CracScalePolicy::clone(p))
            .collect()
    }

    /// Each namespace's labels (empty when no policy selects namespaces: not needed then).
    pub fn namespace_labels(
        &self,
        policies: &[CracScalePolicy],
    ) -> BTreeMap<String, BTreeMap<String, String>> {
        if policies.iter().all(|p| p.spec.namespace_selector.is_none()) {
            return BTreeMap::new();
        }
        self.namespaces
            .state()
            .iter()
            .map(|n| (n.name_any(), n.metadata.labels.clone().unwrap_or_default()))
            .collect()
    }

    /// Addresses of the ready activator pods.
    pub fn activator_ips(&self) -> Vec<String> {
        let mut ips: Vec<String> = self
            .activators
            .state()
            .iter()
            .filter_map(|p| crac_api::serving::serving_address(p).map(String::from))
            .collect();
        ips.sort();
        ips
    }
}

/// [`Store::wait_until_ready`] for any number of waiters. kube-runtime 5.0 wakes only the
/// task that polled it last (its one-shot channel keeps one waker), so a second waiter could
/// wait forever; polling again every 100 ms sees the value once it is there.
pub async fn until_ready<K>(store: &Store<K>) -> Result<(), WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) = tokio::time::timeout(READY_POLL, store.wait_until_ready()).await {
            return result;
        }
    }
}

const READY_POLL: Duration = Duration::from_millis(100);

/// The cached object of that name, if any.
pub fn cached<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<Arc<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(namespace))
}

/// Drops what the operator never reads from a cached object, to keep the stores small.
pub fn slim<K: kube::Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
}

/// Pods and Jobs are read for their labels and status only. (A thousand apps keep two
/// thousand pods in the store; what is dropped here is most of each.) A checkpoint pod's app
/// container keeps its `imageID`: the image restore pods are pinned to.
pub fn slim_pod(pod: &mut Pod) {
    slim_meta(pod);
    let checkpoint = pod
        .labels()
        .get(crac_api::labels::COMPONENT)
        .is_some_and(|c| c == crate::build::job::CHECKPOINT_COMPONENT);
    // Of the spec, only what sleeping in place resizes: the app container's requests and
    // resize policy.
    pod.spec = pod.spec.take().and_then(|spec| {
        let app = spec
            .containers
            .into_iter()
            .find(|c| c.name == crac_api::cracapp::APP_CONTAINER)?;
        Some(k8s_openapi::api::core::v1::PodSpec {
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: app.name,
                resources: app.resources,
                resize_policy: app.resize_policy,
                ..Default::default()
            }],
            ..Default::default()
        })
    });
    if let Some(status) = pod.status.as_mut() {
        // Kept: phase, reason, message, podIP, QoS class, the Ready condition, how containers
        // ended.
        status.host_ip = None;
        status.host_ips = None;
        status.pod_ips = None;
        status.start_time = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
        status.resource_claim_statuses = None;
        if let Some(conditions) = status.conditions.as_mut() {
            conditions.retain(|c| c.type_ == "Ready");
        }
        for c in status.container_statuses.iter_mut().flatten() {
            c.image = String::new();
            if !(checkpoint && c.name == crac_api::cracapp::APP_CONTAINER) {
                c.image_id = String::new();
            }
            c.container_id = None;
            c.allocated_resources = None;
            c.resources = None;
            c.volume_mounts = None;
            c.user = None;
        }
    }
}

/// Deployments are read for their replicas, the image id their pods restore (an annotation
/// of the template) and their status; the pod template, most of a parsed Deployment, is
/// dropped. Whether someone changed the spec is told by its generation
/// ([`Live::generation_of`]).
pub fn slim_deployment(deployment: &mut Deployment) {
    slim_meta(deployment);
    if let Some(spec) = deployment.spec.as_mut() {
        let restored = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(crac_api::labels::CHECKPOINT_ID_ANNOTATION))
            .cloned();
        spec.template = Default::default();
        spec.selector = Default::default();
        spec.strategy = None;
        if let Some(id) = restored {
            spec.template.metadata = Some(kube::api::ObjectMeta {
                annotations: Some(
                    [(crac_api::labels::CHECKPOINT_ID_ANNOTATION.to_string(), id)].into(),
                ),
                ..Default::default()
            });
        }
    }
}

/// Apps are read whole but for what a client added that the operator never reads: a copy of
/// the whole spec in `kubectl apply`'s annotation doubles a cached app.
pub fn slim_app(app: &mut CracApp) {
    let meta = kube::Resource::meta_mut(app);
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

pub fn slim_job(job: &mut Job) {
    slim_meta(job);
    job.spec = None;
}

/// Metadata the operator never reads from pods and Jobs. Owner references stay: they are how
/// a Job's change finds its app to reconcile.
fn slim_meta<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.generate_name = None;
    meta.finalizers = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slimmed_pod_still_says_whether_it_serves_and_how_its_app_ended() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "labels": { "crac.dev/app": "demo" },
                          "ownerReferences": [{ "apiVersion": "v1", "kind": "X", "name": "x", "uid": "u" }] },
            "spec": { "containers": [{ "name": "app", "image": "demo:1" }] },
            "status": {
                "phase": "Running", "podIP": "10.0.0.7", "hostIP": "10.1.0.1",
                "conditions": [{ "type": "Ready", "status": "True" },
                               { "type": "PodScheduled", "status": "True" }],
                "containerStatuses": [{ "name": "app", "image": "demo:1", "imageID": "sha",
                    "ready": true, "restartCount": 0,
                    "state": { "terminated": { "exitCode": 0, "message": "{\"outcome\":\"checkpointed\"}" } } }]
            }
        }))
        .expect("test pod parses");
        slim_pod(&mut pod);
        let spec = pod.spec.as_ref().expect("the app container kept");
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(
            spec.containers[0].image, None,
            "only its resources are kept"
        );
        assert!(
            pod.metadata.owner_references.is_some(),
            "owners find the app to reconcile"
        );
        assert_eq!(crac_api::serving::serving_address(&pod), Some("10.0.0.7"));
        let status = pod.status.as_ref().expect("status kept");
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
        let ended = status.container_statuses.as_ref().expect("kept")[0]
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.message.clone());
        assert_eq!(ended.as_deref(), Some("{\"outcome\":\"checkpointed\"}"));
        assert_eq!(
            pod.labels().get("crac.dev/app").map(String::as_str),
            Some("demo")
        );
    }

    #[test]
    fn only_a_checkpoint_pods_app_container_keeps_its_image_id() {
        let pod = |component: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "p", "labels": { crac_api::labels::COMPONENT: component } },
                "status": { "containerStatuses": [
                    { "name": "app", "image": "demo:1", "imageID": "demo@sha256:1",
                      "ready": false, "restartCount": 0 },
                    { "name": "sidecar", "image": "side:1", "imageID": "side@sha256:2",
                      "ready": false, "restartCount": 0 }
                ] }
            }))
            .expect("test pod parses")
        };
        let image_ids = |component: &str| {
            let mut p = pod(component);
            slim_pod(&mut p);
            p.status
                .and_then(|s| s.container_statuses)
                .into_iter()
                .flatten()
                .map(|c| c.image_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(image_ids("checkpoint"), ["demo@sha256:1", ""]);
        assert_eq!(image_ids("restore"), ["", ""]);
    }

    #[test]
    fn a_slimmed_deployment_still_says_what_it_restores_how_many_and_how_far() {
        use crate::build::deployment::{restore_deployment_for, restored_id};
        let app = crate::validate::tests::app();
        let validated = crate::validate::validate(&app, &Default::default()).expect("valid");
        let config = crate::build::BuildConfig {
            agent_image: "agent:1".into(),
        };
        let image = crac_api::cracapp::CheckpointStatus {
            id: "abc".into(),
            ..Default::default()
        };
        let mut d = restore_deployment_for(&app, &validated, &image, 2, false, &config);
        d.metadata.generation = Some(4);
        d.status = Some(serde_json::from_value(serde_json::json!({ "readyReplicas": 2 })).unwrap());
        let whole = serde_json::to_vec(&d).unwrap().len();
        slim_deployment(&mut d);
        assert_eq!(restored_id(&d), Some("abc"));
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
        assert_eq!(
            d.metadata.generation,
            Some(4),
            "how a change by someone else is seen"
        );
        assert_eq!(d.status.and_then(|s| s.ready_replicas), Some(2));
        let spec = d.spec.expect("spec kept in part");
        assert!(spec.template.spec.is_none(), "the pod template is dropped");
        assert!(serde_json::to_vec(&spec).unwrap().len() * 4 < whole);
    }

    #[test]
    fn a_slimmed_app_loses_kubectls_copy_of_itself_and_keeps_the_operators_annotations() {
        let mut app = crate::validate::tests::app();
        app.metadata.annotations = Some(
            [
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    "{...}".to_string(),
                ),
                (
                    crac_api::labels::WAKE_REQUESTED_AT.to_string(),
                    "2027-01-15T08:00:00Z".to_string(),
                ),
            ]
            .into(),
        );
        slim_app(&mut app);
        let kept: Vec<&String> = app
            .metadata
            .annotations
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kept, [crac_api::labels::WAKE_REQUESTED_AT]);
        assert!(app.spec.template.spec.is_some());
    }

    #[test]
    fn a_slimmed_job_still_finds_its_app_and_says_how_it_ended() {
        // owns_stream maps a Job to its app by owner reference: without it, a Job's completion
        // reconciled nothing until the next resync (found by the benchmark, not by a test).
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "demo-ckpt", "ownerReferences": [{ "apiVersion": "crac.dev/v1alpha1",
                "kind": "CracApp", "name": "demo", "uid": "u", "controller": true }] },
            "spec": { "template": { "spec": { "containers": [{ "name": "app" }] } } },
            "status": { "conditions": [{ "type": "Complete", "status": "True" }] }
        }))
        .expect("test job parses");
        slim_job(&mut job);
        assert!(job.spec.is_none());
        let owner = &job.metadata.owner_references.as_ref().expect("owners kept")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("CracApp", "demo")
        );
        assert!(job.status.is_some_and(|s| s.conditions.is_some()));
    }
}
