//! What the operator knows of how each app's restore pods started, as their agents said
//! (`reconcile/observe.rs` asks; `reconcile/fallbacks.rs` counts the cold starts). Kept in
//! memory, per app and pod uid, for the pods' lives only.

use std::collections::HashMap;
use std::sync::Mutex;

/// Per app (namespace, name), per pod uid.
pub type RestoreStarts = Mutex<HashMap<(String, String), HashMap<String, StartSeen>>>;

/// What the operator knows of how one restore pod started.
#[derive(Clone, Debug)]
pub enum StartSeen {
    Known(StartMode),
    /// Its agent has not answered yet: asked so many times, next no sooner than then.
    Unknown {
        asked: u8,
        next: std::time::Instant,
    },
}

#[derive(Clone, Debug)]
pub struct StartMode {
    pub cold: bool,
    pub reason: Option<String>,
    pub start_ms: Option<u64>,
}
