//! `CracScalePolicy`: scale-to-zero defaults a platform team sets for many apps at once.

use crate::cracapp::ScaleToZeroSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Scale-to-zero defaults, quiet hours and a cap on awake apps for the CracApps it selects.
/// A CracApp's own `spec.scaleToZero` fields always win over a policy's.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "crac.dev",
    version = "v1alpha1",
    kind = "CracScalePolicy",
    plural = "cracscalepolicies",
    shortname = "cracpolicy",
    status = "CracScalePolicyStatus",
    printcolumn(name = "Matched", type_ = "integer", json_path = ".status.matchedApps"),
    printcolumn(name = "Awake", type_ = "integer", json_path = ".status.awakeApps"),
    printcolumn(name = "Max Awake", type_ = "integer", json_path = ".spec.maxAwake"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CracScalePolicySpec {
    /// Namespaces whose apps the policy governs, by namespace labels. Unset: all namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Apps the policy governs, by the CracApp's labels. Unset: all apps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// Defaults for the apps' `spec.scaleToZero` fields they leave unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero: Option<ScaleToZeroSpec>,

    /// Daily windows (UTC) during which matching apps are put to sleep as soon as they have
    /// no open connections, and kept asleep unless a request wakes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub quiet_hours: Vec<QuietHours>,

    /// At most this many matching apps awake at once; beyond it the longest-idle app sleeps
    /// first. Apps woken by a request still wake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_awake: Option<i32>,

    /// When several policies match an app, the lowest priority wins (then the name).
    #[serde(default)]
    pub priority: i32,
}

/// A daily window, `start` to `end`, in UTC. `22:00` to `06:00` spans midnight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuietHours {
    /// `HH:MM`, 24-hour clock, UTC.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// `HH:MM`, 24-hour clock, UTC.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub end: String,
}

/// Which apps the policy governs now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CracScalePolicyStatus {
    /// Apps this policy governs (it is the winning policy for them).
    #[serde(default)]
    pub matched_apps: i32,
    /// Of those, how many are awake.
    #[serde(default)]
    pub awake_apps: i32,
    /// `namespace/name` of the governed apps (the first 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
}
