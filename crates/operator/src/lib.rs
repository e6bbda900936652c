//! The crac-operator library. Pure parts (validation, checkpoint id, builders, status) are
//! apart from the parts that call the API (controller, leader election, server), and the
//! binary only parses flags and wires them together.

pub mod build;
pub mod cache;
pub mod checkpoint_id;
pub mod checkpoint_pod;
pub mod controller;
pub mod crds;
pub mod error;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod policies;
pub mod scale;
pub mod server;
pub mod sleep;
pub mod status;
pub mod validate;
