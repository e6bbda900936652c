//! Failures with a stable reason: the CamelCase string the operator puts in the CracApp's
//! conditions and events, plus one line telling the user what to do.

/// Stable reason strings (never rename one: operators and dashboards match on them).
pub use crac_api::agent::reason;

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
