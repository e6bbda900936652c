//! The crac-operator library. [`watches`] wires the controller and fills the caches;
//! [`reconcile`] is one reconcile as a pipeline (observe → decide → apply → report). Pure
//! parts (validation, checkpoint id, the builders in [`build`], the scale-to-zero cycle in
//! [`scale`], the decisions) have no client in sight; the binary only parses flags, builds a
//! [`context::Context`] and runs.

pub mod agent_control;
pub mod api_requests;
pub mod applied;
pub mod build;
pub mod cache;
pub mod checkpoint_id;
pub mod checkpoint_pod;
pub mod context;
pub mod control_key;
pub mod crds;
pub mod error;
pub mod events;
pub mod image_ref;
pub mod in_place;
pub mod leader;
pub mod metrics;
pub mod pod_security;
pub mod policies;
pub mod ports;
pub mod reconcile;
pub mod restore_starts;
pub mod scale;
pub mod server;
pub mod validate;
pub mod watches;
