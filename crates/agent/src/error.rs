//! Failures with a stable reason: the CamelCase string the operator puts in the CracApp's
//! conditions and events, plus one line telling the user what to do.

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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }
    pub fn config(message: impl Into<String>) -> Failure {
        Failure::new(reason::CONFIG_INVALID, message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Failure {}
