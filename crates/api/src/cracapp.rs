//! The `CracApp` resource: a JVM application that runs from a checkpoint.
//!
//! Doc comments on fields become the CRD's descriptions (and `docs/reference.md`), so they are
//! written for users. Validation lives in the schema (patterns, ranges) and in CEL rules, so
//! the API server refuses a malformed object with a message naming the field.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Name of the container in `spec.template` that runs the JVM.
pub const APP_CONTAINER: &str = "app";

/// A JVM application that starts by restoring a checkpoint instead of booting cold.
// clippy reads the repeated `type_` keys of several printcolumns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "crac.dev",
    version = "v1alpha1",
    kind = "CracApp",
    plural = "cracapps",
    shortname = "crac",
    category = "all",
    namespaced,
    status = "CracAppStatus",
    validation = Rule::new("size(self.metadata.name) <= 40").message(
        "metadata.name: at most 40 characters; it prefixes the names of the Jobs, Services and labels the operator creates"
    ),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message(
        "metadata.name: must be a DNS label that starts with a letter (lower-case letters, digits and '-'), because it names the app's Service"
    ),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Checkpoint",
        type_ = "date",
        json_path = ".status.checkpoint.createdAt",
        description = "Age of the image the pods restore from"
    ),
    printcolumn(
        name = "Last Activity",
        type_ = "date",
        json_path = ".status.lastActivityTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Checkpoint ID",
        type_ = "string",
        json_path = ".status.checkpoint.id",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CracAppSpec {
    /// The pods to run. Exactly one container must be named `app`: it runs the JVM, and its
    /// `command` (plus `args`) is the cold-start command the agent wraps. Its `readinessProbe`
    /// (httpGet or tcpSocket) tells the agent when the JVM is ready to be checkpointed;
    /// without one, the agent and the restore pods' readiness use a TCP connect to its first port.
    #[x_kube(
        validation = Rule::new("self.spec.containers.exists_one(c, c.name == 'app')")
            .message("spec.template.spec.containers must have exactly one container named 'app'")
            .reason(Reason::FieldValueRequired),
        validation = Rule::new("self.spec.containers.all(c, c.name != 'app' || (has(c.command) && size(c.command) > 0))")
            .message("the 'app' container must set command: the agent needs the JVM's start command (the image entrypoint cannot be read from the cluster)")
            .reason(Reason::FieldValueRequired),
        // What a template may ask for is checked whole by the operator (pod_security.rs);
        // the API server refuses the plainest escalations first.
        validation = Rule::new("!has(self.spec.hostPID) || !self.spec.hostPID")
            .message("host namespaces are not allowed")
            .field_path(".spec.hostPID")
            .reason(Reason::FieldValueForbidden),
        validation = Rule::new("!has(self.spec.hostIPC) || !self.spec.hostIPC")
            .message("host namespaces are not allowed")
            .field_path(".spec.hostIPC")
            .reason(Reason::FieldValueForbidden),
        validation = Rule::new("!has(self.spec.hostNetwork) || !self.spec.hostNetwork")
            .message("host namespaces are not allowed")
            .field_path(".spec.hostNetwork")
            .reason(Reason::FieldValueForbidden),
        validation = Rule::new("!has(self.spec.volumes) || self.spec.volumes.all(v, !has(v.hostPath))")
            .message("hostPath volumes are not allowed")
            .field_path(".spec.volumes")
            .reason(Reason::FieldValueForbidden),
        validation = Rule::new("self.spec.containers.all(c, !has(c.securityContext) || !has(c.securityContext.privileged) || !c.securityContext.privileged)")
            .message("privileged containers are not allowed")
            .field_path(".spec.containers")
            .reason(Reason::FieldValueForbidden),
        validation = Rule::new("!has(self.spec.initContainers) || self.spec.initContainers.all(c, !has(c.securityContext) || !has(c.securityContext.privileged) || !c.securityContext.privileged)")
            .message("privileged containers are not allowed")
            .field_path(".spec.initContainers")
            .reason(Reason::FieldValueForbidden)
    )]
    #[schemars(schema_with = "pod_template_schema")]
    pub template: PodTemplateSpec,

    /// Pods to run while the app is awake. Served as the scale subresource, so `kubectl scale`
    /// and HorizontalPodAutoscalers work. Sleeping never changes it: it is the awake size.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// How the checkpoint image is made and kept.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,

    /// How pods restore from the image.
    #[serde(default)]
    pub restore: RestoreSpec,

    /// Scale the app to zero when idle and wake it on the first request. Fields left unset
    /// take the defaults of a matching CracScalePolicy; fields set here always win.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero: Option<ScaleToZeroSpec>,
}

fn default_replicas() -> i32 {
    1
}

/// The pod template schema of Kubernetes, with a bound on the number of containers so the
/// API server can cost the CEL rules that look for the `app` container, and without
/// Kubernetes' own field descriptions (they are the Pod reference's; kept, they make the CRD
/// 500 KB, past what a client-side `kubectl apply` can store).
fn pod_template_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<PodTemplateSpec>();
    if let Some(map) = schema.as_object_mut() {
        map.values_mut().for_each(strip_descriptions);
    }
    let containers = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("spec"))
        .and_then(|s| s.get_mut("properties"))
        .and_then(|p| p.get_mut("containers"));
    if let Some(serde_json::Value::Object(containers)) = containers {
        containers.insert("maxItems".into(), 64.into());
        if let Some(serde_json::Value::Object(items)) = containers.get_mut("items")
            && let Some(serde_json::Value::Object(props)) = items.get_mut("properties")
            && let Some(serde_json::Value::Object(name)) = props.get_mut("name")
        {
            name.insert("maxLength".into(), 63.into());
        }
    }
    schema
}

fn strip_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("description");
            map.values_mut().for_each(strip_descriptions);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_descriptions),
        _ => {}
    }
}

/// Which checkpoint engine the agent drives.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// A CRaC JDK (`-XX:CRaCCheckpointTo`, `jcmd JDK.checkpoint`). The app takes part in the
    /// checkpoint through `org.crac` resources (closing files and sockets first).
    #[default]
    Crac,
    /// Any JDK: the agent checkpoints the JVM's process tree with CRIU itself. The image must
    /// contain CRIU.
    Criu,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Crac => "crac",
            Engine::Criu => "criu",
        }
    }
}

/// How the checkpoint image is made and kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// `crac` (a CRaC JDK) or `criu` (any JDK, CRIU in the image).
    #[serde(default)]
    pub engine: Engine,

    /// Requests sent to the app after it is ready and before the checkpoint, so the image holds
    /// a warm JVM (loaded classes, JIT-compiled code, filled caches).
    #[serde(default)]
    pub warmup: WarmupSpec,

    /// The volume that holds the images.
    #[serde(default)]
    pub storage: StorageSpec,

    /// Images kept per app. The newest is the one pods restore from; older ones let a rollback
    /// restore without a new checkpoint.
    #[serde(default = "default_retain")]
    #[schemars(range(min = 1, max = 20))]
    pub retain: i32,

    /// Deadline for one checkpoint attempt (start, readiness, warm-up and dump), as a
    /// duration such as `10m`.
    #[serde(default = "default_checkpoint_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('30s') && duration(self) <= duration('6h')")
        .message("must be between 30s and 6h"))]
    pub timeout: String,

    /// Restore each new image once inside its checkpoint pod, wait for the app's readiness
    /// and end it, before the image is published. An image that fails its trial is never
    /// rolled out: the checkpoint fails with `TrialRestoreFailed` and is retried. Costs one
    /// restore per checkpoint; turn it off only for an app whose restore must not run twice
    /// (it runs once more than without the trial, with no traffic).
    #[serde(default = "default_true")]
    pub trial_restore: bool,
}

fn default_true() -> bool {
    true
}

fn default_retain() -> i32 {
    2
}

fn default_checkpoint_timeout() -> String {
    "10m".into()
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            engine: Engine::default(),
            warmup: WarmupSpec::default(),
            storage: StorageSpec::default(),
            retain: default_retain(),
            timeout: default_checkpoint_timeout(),
            trial_restore: true,
        }
    }
}

/// Warm-up traffic sent before the checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmupSpec {
    /// Requests to send, in order.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub requests: Vec<WarmupRequest>,
}

/// One warm-up request, repeated `count` times against the app's own port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmupRequest {
    /// Path and query, starting with `/`.
    #[schemars(regex(pattern = r"^/"), length(max = 2048))]
    pub path: String,
    /// How many times to send it.
    #[serde(default = "default_warmup_count")]
    // int32, not schemars' uint32: the API server knows only int32 and int64 and warns about
    // other formats on every apply.
    #[schemars(range(min = 1, max = 100000), extend("format" = "int32"))]
    pub count: u32,
}

fn default_warmup_count() -> u32 {
    1
}

/// The PersistentVolumeClaim that holds the images.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.existingClaim) || !has(self.storageClassName)")
    .message("set either existingClaim (a volume you manage) or storageClassName (a volume the operator creates), not both")
    .field_path(".existingClaim"))]
pub struct StorageSpec {
    /// Size of the volume the operator creates. An image is roughly the JVM's resident memory.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    #[x_kube(validation = Rule::new("quantity(self).isGreaterThan(quantity('0'))").message("must be greater than zero"))]
    pub size: String,

    /// Storage class of the volume the operator creates; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,

    /// Access modes of the volume the operator creates. `ReadWriteMany` lets restore pods on
    /// any node mount the images; `ReadWriteOnce` keeps them on the node that wrote them.
    #[serde(default = "default_access_modes")]
    #[schemars(length(min = 1, max = 4))]
    pub access_modes: Vec<AccessMode>,

    /// Use this existing claim (in the app's namespace) instead of creating one. Several apps
    /// may share it: each keeps its images under its own directory. The operator never
    /// deletes it, only the app's images on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub existing_claim: Option<String>,
}

fn default_storage_size() -> String {
    "2Gi".into()
}

fn default_access_modes() -> Vec<AccessMode> {
    vec![AccessMode::ReadWriteOnce]
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            access_modes: default_access_modes(),
            existing_claim: None,
        }
    }
}

/// A PersistentVolume access mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadWriteMany,
    ReadWriteOncePod,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadWriteMany => "ReadWriteMany",
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
        }
    }
}

/// What a pod does when its image cannot be restored.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum Fallback {
    /// Start the JVM cold and serve (slower start, still available). The operator counts it.
    #[default]
    ColdStart,
    /// Exit with the reason; the pod restarts and the operator reports it.
    Fail,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::ColdStart => "ColdStart",
            Fallback::Fail => "Fail",
        }
    }
}

/// How pods restore from the image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// `ColdStart` (default) or `Fail`.
    #[serde(default)]
    pub fallback: Fallback,

    /// Take a new checkpoint once this many restore pods of one image started cold instead
    /// of restoring it (the image is stale: another node type, kernel or CPU). At most one
    /// such checkpoint an hour; 0 never takes one, and the operator then does not ask the
    /// pods' agents how they started.
    #[serde(default = "default_recheckpoint_after_cold_starts")]
    #[schemars(range(min = 0, max = 20))]
    pub recheckpoint_after_cold_starts: i32,
}

fn default_recheckpoint_after_cold_starts() -> i32 {
    3
}

impl Default for RestoreSpec {
    fn default() -> Self {
        Self {
            fallback: Fallback::default(),
            recheckpoint_after_cold_starts: default_recheckpoint_after_cold_starts(),
        }
    }
}

/// How long a request at zero may be held while the app wakes when neither the app nor a
/// policy says: the operator's default and the activator's.
pub const DEFAULT_WAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Scale-to-zero settings. Unset fields take a matching CracScalePolicy's defaults.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleToZeroSpec {
    /// Put the app to sleep when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,

    /// How long without traffic before the app sleeps, such as `15m`. At least `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('30s')").message("must be at least 30s"))]
    pub idle_after: Option<String>,

    /// How long a request may wait for the app to wake before it gets 503 with Retry-After.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('10m')")
        .message("must be between 1s and 10m"))]
    pub wake_timeout: Option<String>,

    /// Namespaces whose pods may call the app through the activator while it sleeps or wakes.
    /// The app's own namespace always may; callers from anywhere else get 403 and the app sees
    /// nothing. (While the app is awake, the Service sends callers to its pods directly, and
    /// the namespace's NetworkPolicies decide.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        )
    )]
    pub caller_namespaces: Vec<String>,

    /// How the app sleeps: `Recreate` (default) scales it to zero and a wake starts new pods;
    /// `InPlace` keeps its pods, ends the JVMs (each agent stays, holding a few MB), shrinks the
    /// pods' requests, and a wake restores the JVM inside the same pods. `InPlace` needs an app
    /// container without a liveness probe (nothing answers it while asleep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<SleepMode>,
}

/// How an app sleeps (`spec.scaleToZero.mode`).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum SleepMode {
    /// Scale to zero; a wake schedules and starts new pods, which restore.
    #[default]
    Recreate,
    /// Keep the pods with only the agent running; a wake restores the JVM in them.
    InPlace,
}

impl SleepMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SleepMode::Recreate => "Recreate",
            SleepMode::InPlace => "InPlace",
        }
    }
}

/// Where an app is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    /// Accepted; nothing runs yet (waiting for the volume, say).
    Pending,
    /// The first checkpoint is being taken; no image to restore yet.
    Checkpointing,
    /// Pods are restoring (rolling out, or waking from zero).
    Restoring,
    /// Every wanted pod is ready.
    Ready,
    /// Asleep: no pods (or, sleeping in place, pods with no JVM); the first request wakes
    /// the app.
    ScaledToZero,
    /// Cannot proceed without a change; the conditions say why.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Checkpointing => "Checkpointing",
            Phase::Restoring => "Restoring",
            Phase::Ready => "Ready",
            Phase::ScaledToZero => "ScaledToZero",
            Phase::Failed => "Failed",
        }
    }
}

/// Whether the Service sends traffic to the app's pods or to the activator.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ServingMode {
    /// The Service's endpoints are the app's ready pods; nothing sits in the path.
    Pods,
    /// The Service's endpoints are the activator, which holds requests and wakes the app.
    Activator,
}

/// Observed state, written by the operator (and `wakeRequestedAt` by the activator).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CracAppStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `CheckpointReady`, `Available`, `ScaledToZero` and `Degraded`, each with a reason and
    /// a message saying what to do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The image the pods restore from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,

    /// A checkpoint being taken for the current spec while the pods keep serving the
    /// previous image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_checkpoint: Option<PendingCheckpoint>,

    /// Pods that exist now (zero while asleep).
    #[serde(default)]
    pub replicas: i32,

    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Where the Service sends traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_mode: Option<ServingMode>,

    /// The activator ports assigned to this app, one per Service port: while the app sleeps
    /// the Service's endpoints are `<activator pod>:<activatorPort>`, which tells the
    /// activator which app a connection is for, whether the caller used the Service's DNS
    /// name or its ClusterIP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activator_ports: Vec<ActivatorPort>,

    /// Namespaces besides its own whose pods the activator lets call the app: the app's
    /// `scaleToZero.callerNamespaces`, else its policy's. Written by the operator for the
    /// activator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caller_namespaces: Vec<String>,

    /// How the app sleeps, as resolved from its `scaleToZero.mode` and its policy's (absent:
    /// `Recreate`). Written by the operator for the activator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_mode: Option<SleepMode>,

    /// The last time a pod of the app saw traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<Time>,

    /// The last wake from zero and what it cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_wake: Option<WakeStatus>,

    /// Set by the activator when a request arrives for a sleeping app; the operator wakes the
    /// app when this is newer than the time it went to sleep. The cycle's times keep
    /// microseconds: a sleep and a wake in one second must still be ordered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_requested_at: Option<MicroTime>,

    /// When the app last went to sleep (unset while awake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slept_at: Option<MicroTime>,

    /// When the current drain began: the Service points at the activator and the operator
    /// waits for the pods' open connections to end before scaling to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_started_at: Option<MicroTime>,
}

/// A published checkpoint image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Hash of everything that shapes the JVM's memory (image, command, env, engine, ...).
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "int64"))]
    pub size_bytes: Option<u64>,
    /// How long the checkpoint Job took, start to published image, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// The image's trial restore in its checkpoint pod: restore started → app ready, in ms
    /// (absent when `spec.checkpoint.trialRestore` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "int64"))]
    pub trial_restore_ms: Option<u64>,
    /// Restore pods that started cold instead of restoring this image, as their agents
    /// reported (up to `spec.restore.recheckpointAfterColdStarts`, which then takes a new
    /// checkpoint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub cold_started_pods: Vec<String>,
    /// The JDK that was checkpointed; restore needs the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jdk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<Engine>,
    /// `sha256:<hex>` of the image's manifest (every file's name, size and sha256), as the
    /// checkpoint Job reported it. Restore pods get it in their spec and restore only an image
    /// that matches it, whatever the files beside the image say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The app container's image as the checkpoint pod ran it, pinned by digest:
    /// `<repository>@sha256:<hex>`, the spec's repository (tag dropped) at the repository
    /// digest the kubelet reported for that pod (`containerStatuses[].imageID`), or the spec's
    /// own image when it already pins one. Restore pods, and their cold-start fallback, run
    /// this reference instead of the tag, so a tag pushed again later never puts new bytes
    /// under checkpointed memory; a new checkpoint (`kubectl crac checkpoint`, or a spec
    /// change) resolves the tag afresh. Unset when the runtime reported no repository digest
    /// (an image imported or built on the node, whose `imageID` is its config's digest): the
    /// pods then run the spec's tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_image: Option<String>,
}

/// A checkpoint in progress, or failing and waiting to be retried.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingCheckpoint {
    pub id: String,
    /// Checkpoint Jobs that failed for this id so far.
    #[serde(default)]
    pub failures: i32,
    /// When the last attempt failed; the next waits an exponential backoff from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Why the last attempt failed: the agent's reason (`OpenSockets`, `ReadinessTimeout`, …),
    /// kept as data so a reconcile during the backoff reports it without reading it back from a
    /// condition's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_reason: Option<String>,
    /// The last failure's message, as the agent wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_message: Option<String>,
}

/// An activator port assigned to one of the app's Service ports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivatorPort {
    /// Service port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port the app's container listens on.
    pub target_port: i32,
    /// Port the activator listens on for this app.
    pub activator_port: i32,
}

/// The last wake from zero.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WakeStatus {
    /// When the wake was requested.
    pub at: MicroTime,
    /// From the wake request to the first ready pod, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<i64>,
    /// How the woken pod's app started, as its agent said: `restored` or `coldStarted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Of the latency, the woken pod's agent: its start → the app restored (or started cold)
    /// and ready, in milliseconds. The rest is the control plane's and the kubelet's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<i64>,
}
