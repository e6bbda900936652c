//! The contract between the operator and `crac-agent`, the program that runs inside every
//! app container. The operator sets these environment variables on the container; the agent
//! reads them (flags override them). When the agent exits it writes one [`AgentSummary`] as
//! JSON to the container's termination message path, and the operator reads it back from the
//! pod status. While it runs, the agent serves an [`ActivityReport`] on its activity port.

use serde::{Deserialize, Serialize};

/// Directory that holds this app's images, one sub-directory per checkpoint id.
pub const ENV_IMAGE_DIR: &str = "CRAC_IMAGE_DIR";
/// Full checkpoint id the agent writes (checkpoint mode) or restores (restore mode).
pub const ENV_CHECKPOINT_ID: &str = "CRAC_CHECKPOINT_ID";
/// Restore pods: the `sha256:<hex>` digest of the image's manifest, recorded by the operator
/// from the checkpoint Job's summary. The agent restores only an image whose manifest hashes
/// to it, and whose files match the manifest.
pub const ENV_IMAGE_DIGEST: &str = "CRAC_IMAGE_DIGEST";
/// `crac` or `criu`.
pub const ENV_ENGINE: &str = "CRAC_ENGINE";
/// How to tell the app is ready: `http://127.0.0.1:8080/path` or `tcp://127.0.0.1:8080`.
pub const ENV_READINESS: &str = "CRAC_READINESS";
/// Warm-up requests as JSON: `[{"path":"/","count":200}]`.
pub const ENV_WARMUP: &str = "CRAC_WARMUP";
/// How many images to keep in the app's directory after a successful checkpoint.
pub const ENV_RETAIN: &str = "CRAC_RETAIN";
/// Checkpoint Jobs: the CracApp's `metadata.generation` when the operator created the Job.
/// The agent records it in the image's metadata, and a checkpoint's prune never removes an
/// image of a greater generation (one taken for a newer spec, which the operator may already
/// restore from).
pub const ENV_SPEC_GENERATION: &str = "CRAC_SPEC_GENERATION";
/// Checkpoint Jobs: `false` skips the trial restore of the new image before it is published
/// (default `true`).
pub const ENV_TRIAL_RESTORE: &str = "CRAC_TRIAL_RESTORE";
/// `ColdStart` or `Fail`: what restore does when the image cannot be restored.
pub const ENV_FALLBACK: &str = "CRAC_FALLBACK";
/// Restore, engine criu: `true` restores memory lazily (`criu lazy-pages` beside `criu restore
/// --lazy-pages`: the JVM resumes before its heap is copied in, and pages arrive on first
/// touch or in the background). Default `false`. The operator never sets it: CRIU 4.2 can use
/// userfaultfd only when it runs without `--unprivileged`, which needs more privileges than
/// restore pods get (docs/agent.md, "Lazy restore").
pub const ENV_LAZY_PAGES: &str = "CRAC_LAZY_PAGES";
/// Deadline for the whole checkpoint, in seconds.
pub const ENV_TIMEOUT_SECONDS: &str = "CRAC_TIMEOUT_SECONDS";
/// TCP port the app serves on; activity is measured on it.
pub const ENV_APP_PORT: &str = "CRAC_APP_PORT";
/// Port of the agent's activity endpoint.
pub const ENV_ACTIVITY_PORT: &str = "CRAC_ACTIVITY_PORT";
/// Where the summary goes (Kubernetes' default termination message path).
pub const ENV_TERMINATION_LOG: &str = "CRAC_TERMINATION_LOG";
/// Restore pods: a file holding the bearer token that `POST /sleep` and `POST /wake` on the
/// activity port must carry (`Authorization: Bearer <token>`; see [`SLEEP_PATH`]). The operator
/// generates one random token per CracApp, keeps it in a Secret and mounts that Secret into
/// restore pods (read-only, mode 0400); the activator reads the same Secret. The agent reads
/// the file once at start: at most [`MAX_CONTROL_TOKEN_BYTES`], and at least
/// [`MIN_CONTROL_TOKEN_BYTES`] once surrounding whitespace is trimmed. Unset, unreadable or too
/// short: the two endpoints answer 404 (sleeping in place is off for the pod) and the agent
/// logs why.
pub const ENV_CONTROL_TOKEN_FILE: &str = "CRAC_CONTROL_TOKEN_FILE";

/// Default activity port (the app's own ports are the user's; this one is ours).
pub const DEFAULT_ACTIVITY_PORT: u16 = 9901;
/// Path of the activity endpoint.
pub const ACTIVITY_PATH: &str = "/activity";
/// `POST` on the activity port (restore mode, token required): end the JVM and keep the pod,
/// with the agent as its only process. Answers 200 with a [`ControlAnswer`] once the JVM's
/// whole tree is gone; at once when already asleep.
pub const SLEEP_PATH: &str = "/sleep";
/// `POST` on the activity port (restore mode, token required): restore the JVM in place as at
/// pod start (digest and integrity checks, the fallback of `CRAC_FALLBACK`). Answers 200 with a
/// [`ControlAnswer`] once the app passed its readiness check; at once when awake. Concurrent
/// calls share one restore; a `/sleep` that arrives meanwhile runs after it.
pub const WAKE_PATH: &str = "/wake";
/// Shortest control token accepted (bytes, after trimming whitespace).
pub const MIN_CONTROL_TOKEN_BYTES: usize = 32;
/// Longest control token file read.
pub const MAX_CONTROL_TOKEN_BYTES: usize = 4096;

/// Values of [`ActivityReport::mode`] and [`ControlAnswer::mode`].
pub mod mode {
    /// The JVM was restored from the image (at pod start or by the last `/wake`).
    pub const RESTORED: &str = "restored";
    /// The image could not be used and the JVM was started cold.
    pub const COLD_STARTED: &str = "coldStarted";
    /// Plain run mode.
    pub const RUNNING: &str = "running";
    /// Asleep in place: no JVM runs; the agent holds the pod (and the image's lock).
    pub const SLEEPING: &str = "sleeping";
}
/// Kubernetes' default termination message path.
pub const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";
/// Where the init container installs the agent binary inside every app container.
pub const AGENT_BIN_DIR: &str = "/crac-agent";
/// The installed agent's path.
pub const AGENT_BIN: &str = "/crac-agent/crac-agent";
/// Where the checkpoint volume is mounted.
pub const IMAGE_MOUNT: &str = "/crac";
/// File in a published image directory describing it.
pub const METADATA_FILE: &str = "metadata.json";

/// What the agent did, as the operator sees it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// Checkpoint mode: an image was written, verified and published.
    Checkpointed,
    /// Restore mode: the JVM was restored from an image.
    Restored,
    /// Restore mode: the image could not be used and the JVM was started cold.
    ColdStarted,
    /// Plain run mode, or the JVM exited after a restore or a cold start.
    Exited,
    /// Something went wrong; `reason` and `message` say what.
    Failed,
}

/// One line of JSON the agent writes to the termination message path when it exits.
/// Termination messages are capped at 4 KiB, so `message` is kept to one short line.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentSummary {
    pub outcome: Option<Outcome>,
    /// A stable CamelCase reason, e.g. `ReadinessTimeout`, `OpenFiles`, `ImageCorrupt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// One human line saying what happened and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// `java -version` of the JVM that was checkpointed, e.g. `17.0.15`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jdk: Option<String>,
    /// `sha256:<hex>` of the published image's manifest (see [`ENV_IMAGE_DIGEST`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// Total bytes of the published image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_bytes: Option<u64>,
    /// Start of the JVM until it answered its readiness check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
    /// Time spent sending warm-up requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ms: Option<u64>,
    /// Time to dump and publish the image, or to restore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    /// Checkpoint: the published image's trial restore in this pod, restore started → ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_restore_ms: Option<u64>,
    /// Exit code of the JVM, when it ran and exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Restore mode: how many times the pod was woken in place (`POST /wake` after a
    /// `/sleep`). `outcome`, `reason`, `message` and `restoreMs` then describe the last wake
    /// (`restoreMs`: the wake request received → the app ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wakes: Option<u32>,
    /// `true` when the agent ended while the pod slept in place (no JVM ran; it exits 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asleep: Option<bool>,
}

/// What `GET /activity` on the agent's activity port returns. Fields added later are optional
/// (absent from older agents' reports, ignored by older readers).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ActivityReport {
    /// How the JVM in this pod started: `restored`, `coldStarted` or `running` (plain run); or
    /// `sleeping` while the pod sleeps in place (no JVM; `openConnections` is 0). See [`mode`].
    pub mode: String,
    /// Checkpoint id this pod restored from, if it did; while sleeping, the one it will
    /// restore from at its next wake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<String>,
    /// Connections currently established on the app's port, from the kernel's socket tables.
    pub open_connections: u32,
    /// RFC 3339 time of the last observed traffic (a connection open, or bytes moving).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    /// Milliseconds the restore (or the cold start) took to the app's readiness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<u64>,
    /// `coldStarted`: why the restore did not happen (one of [`reason::ALL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `sleeping`: RFC 3339 time the pod went to sleep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleeping_since: Option<String>,
    /// How many times this pod was woken in place (omitted when never). After a wake, `mode`,
    /// `startMs` (the wake request received → ready) and `reason` describe that wake, and
    /// `lastActivityTime` is at least the wake's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wakes: Option<u32>,
}

/// The JSON body of every answer of `POST /sleep` and `POST /wake` (200, and 503 when the
/// agent could not do it: its JVM exited on its own, it is terminating, or a wake failed with
/// fallback `Fail`). 401 (no or wrong token), 404 (the feature is off), 405 (not `POST`) and
/// 413 (a body over 1 KiB) carry only `{"error": "..."}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ControlAnswer {
    /// After the call: `sleeping`, `restored` or `coldStarted` (see [`mode`]).
    pub mode: String,
    /// `/wake` that woke the pod (or waited for the wake that did): the request received →
    /// the app passed its readiness check. Absent when the pod was already awake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    /// `/sleep` that ended the JVM: the request received → its whole tree gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_ms: Option<u64>,
    /// `coldStarted`: why the wake did not restore (one of [`reason::ALL`]); on a 503, why it
    /// failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// One human line, on 503s and cold starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Stable reason strings (never rename one: operators and dashboards match on them).
pub mod reason {
    pub const CONFIG_INVALID: &str = "ConfigInvalid";
    pub const SPAWN_FAILED: &str = "SpawnFailed";
    pub const READINESS_TIMEOUT: &str = "ReadinessTimeout";
    pub const JVM_EXITED: &str = "JvmExited";
    pub const WARMUP_FAILED: &str = "WarmupFailed";
    pub const CHECKPOINT_TIMEOUT: &str = "CheckpointTimeout";
    pub const TERMINATED: &str = "Terminated";
    pub const OPEN_FILES: &str = "OpenFiles";
    pub const OPEN_SOCKETS: &str = "OpenSockets";
    pub const PERMISSION_DENIED: &str = "PermissionDenied";
    pub const CRIU_MISSING: &str = "CriuMissing";
    pub const CRIU_DUMP_FAILED: &str = "CriuDumpFailed";
    pub const CRIU_RESTORE_FAILED: &str = "CriuRestoreFailed";
    pub const PID_CONFLICT: &str = "PidConflict";
    pub const FILE_CHANGED: &str = "FileChanged";
    pub const PUBLISH_FAILED: &str = "PublishFailed";
    pub const IMAGE_MISSING: &str = "ImageMissing";
    pub const IMAGE_CORRUPT: &str = "ImageCorrupt";
    /// The image's metadata does not hash to the digest the operator recorded at checkpoint
    /// (or no valid digest was given): someone else may have rewritten it.
    pub const IMAGE_NOT_TRUSTED: &str = "ImageNotTrusted";
    pub const METADATA_MISMATCH: &str = "MetadataMismatch";
    pub const CPU_FEATURES_MISSING: &str = "CpuFeaturesMissing";
    pub const RESTORE_TIMEOUT: &str = "RestoreTimeout";
    pub const NOT_A_CRAC_JDK: &str = "NotACracJdk";
    pub const RESTORE_UNSUPPORTED: &str = "RestoreUnsupported";
    pub const JCMD_FAILED: &str = "JcmdFailed";
    pub const CRAC_CHECKPOINT_FAILED: &str = "CracCheckpointFailed";
    pub const CRAC_RESTORE_FAILED: &str = "CracRestoreFailed";
    /// Checkpoint: the new image did not restore to a ready app in its trial, so it was not
    /// published; the message carries the restore's own reason.
    pub const TRIAL_RESTORE_FAILED: &str = "TrialRestoreFailed";

    /// Every reason the agent reports; anything else in a summary came from somewhere else.
    pub const ALL: [&str; 28] = [
        CONFIG_INVALID,
        SPAWN_FAILED,
        READINESS_TIMEOUT,
        JVM_EXITED,
        WARMUP_FAILED,
        CHECKPOINT_TIMEOUT,
        TERMINATED,
        OPEN_FILES,
        OPEN_SOCKETS,
        PERMISSION_DENIED,
        CRIU_MISSING,
        CRIU_DUMP_FAILED,
        CRIU_RESTORE_FAILED,
        PID_CONFLICT,
        FILE_CHANGED,
        PUBLISH_FAILED,
        IMAGE_MISSING,
        IMAGE_CORRUPT,
        IMAGE_NOT_TRUSTED,
        METADATA_MISMATCH,
        CPU_FEATURES_MISSING,
        RESTORE_TIMEOUT,
        NOT_A_CRAC_JDK,
        RESTORE_UNSUPPORTED,
        JCMD_FAILED,
        CRAC_CHECKPOINT_FAILED,
        CRAC_RESTORE_FAILED,
        TRIAL_RESTORE_FAILED,
    ];
}
