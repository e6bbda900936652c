//! Errors of a reconcile. Each has a stable reason used in logs, Events and metric labels.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("cleaning the app's images from {claim} is still running")]
    CleanupPending { claim: String },
    #[error("the operator's watch caches stopped")]
    CacheGone,
    /// An object the app needs exists already and is not the app's.
    #[error(
        "{kind} {name:?} exists and does not belong to this CracApp; the operator does not take it over: delete or rename it, or rename the CracApp"
    )]
    NameTaken { kind: String, name: String },
    /// The cluster key of sleeping in place cannot be read or created.
    #[error("the sleep-in-place control key: {0}")]
    ControlKey(String),
}

impl Error {
    /// Stable, low-cardinality name for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::CleanupPending { .. } => "cleanup_pending",
            Error::CacheGone => "cache_gone",
            Error::NameTaken { .. } => "name_taken",
            Error::ControlKey(_) => "control_key",
        }
    }
}

impl Error {
    /// The API server refused a write because the namespace is being deleted.
    pub fn namespace_terminating(&self) -> bool {
        let api = match self {
            Error::Kube(kube::Error::Api(e)) => Some(e),
            Error::Finalizer(inner) => match &**inner {
                kube::runtime::finalizer::Error::ApplyFailed(Error::Kube(kube::Error::Api(e))) => {
                    Some(e)
                }
                _ => None,
            },
            _ => None,
        };
        api.is_some_and(|e| is_terminating(e))
    }
}

/// A write refused because its namespace is being deleted.
pub fn refused_as_terminating(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(e) if is_terminating(e))
}

fn is_terminating(e: &kube::core::Status) -> bool {
    e.code == 403 && e.message.contains("being terminated")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
