//! Errors of a reconcile. Each has a stable reason used in logs, Events and metric labels.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("cleaning the app's images from {claim} is still running")]
    CleanupPending { claim: String },
}

impl Error {
    /// Stable, low-cardinality name for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::CleanupPending { .. } => "cleanup_pending",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
