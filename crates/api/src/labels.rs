//! Label and annotation keys. Every component uses these constants, never literals.

/// The API group of every crac-operator resource.
pub const GROUP: &str = "crac.dev";
/// Names the CracApp an object belongs to (on Jobs, Deployments, pods, PVCs, slices).
pub const APP: &str = "crac.dev/app";
/// The checkpoint id (shortened) a Job writes or a restore pod restores from.
pub const CHECKPOINT_ID: &str = "crac.dev/checkpoint-id";
/// What an object is for: `checkpoint`, `restore` or `images`.
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// Standard "managed by" label, set to [`MANAGER`].
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The field manager and `managed-by` value of the operator.
pub const MANAGER: &str = "crac-operator";
/// Full checkpoint id on a Job (labels cap at 63 characters, ids are 64).
pub const CHECKPOINT_ID_ANNOTATION: &str = "crac.dev/checkpoint-id";

/// Set (to an RFC 3339 time) by `kubectl crac wake` or anyone: wake the app now.
pub const WAKE_REQUESTED_AT: &str = "crac.dev/wake-requested-at";
/// Set by `kubectl crac sleep`: put the app to sleep now (if scale to zero is enabled).
pub const SLEEP_REQUESTED_AT: &str = "crac.dev/sleep-requested-at";
/// Set by `kubectl crac checkpoint`: take a fresh checkpoint even if the spec did not change.
pub const CHECKPOINT_REQUESTED_AT: &str = "crac.dev/checkpoint-requested-at";
/// Set by the operator (to an RFC 3339 time) when restore pods kept starting cold instead of
/// restoring the image (`spec.restore.recheckpointAfterColdStarts`): joins the checkpoint id,
/// so a new image is taken, and spaces such checkpoints an hour apart.
pub const STALE_IMAGE_AT: &str = "crac.dev/stale-image-at";

/// Annotation on a restore pod that sleeps in place: when the operator put it to sleep. The
/// operator removes it once the pod is awake and Ready again; the activator wakes only pods
/// that carry it (or that refused a request).
pub const ASLEEP_IN_PLACE_SINCE: &str = "crac.dev/asleep-in-place-since";
