//! The condition types of a `CracApp`'s status, written by the operator and read by
//! `kubectl crac` and the tests.

/// An image for the current spec exists (False: the checkpoint failed or is pending).
pub const CHECKPOINT_READY: &str = "CheckpointReady";
/// Enough restored pods are ready (or the app is asleep by design).
pub const AVAILABLE: &str = "Available";
/// Something needs attention: False is the healthy state.
pub const DEGRADED: &str = "Degraded";
/// The app is asleep: False while it serves from its pods.
pub const SCALED_TO_ZERO: &str = "ScaledToZero";
