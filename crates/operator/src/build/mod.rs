//! Pure builders of the objects the operator owns. No `Client` here: each function takes
//! the validated app and returns the object to apply, so tests need no cluster.

pub mod cleanup;
pub mod deployment;
mod inject;
pub mod job;
pub mod pvc;
pub mod service;

use crac_api::CracApp;
use crac_api::labels;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use std::collections::BTreeMap;

/// Operator settings that shape what it builds.
#[derive(Clone, Debug)]
pub struct BuildConfig {
    /// Image holding the static `crac-agent` binary at [`AGENT_IMAGE_BINARY`].
    pub agent_image: String,
}

/// Path of the agent binary inside the agent image.
pub const AGENT_IMAGE_BINARY: &str = "/usr/local/bin/crac-agent";

/// The labels every owned object carries.
pub fn labels_for(app: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::APP.to_string(), app.to_string()),
        (labels::COMPONENT.to_string(), component.to_string()),
        (labels::MANAGED_BY.to_string(), labels::MANAGER.to_string()),
    ])
}

/// Makes the CracApp the controlling owner, so deleting it deletes the object.
pub fn owner_ref(app: &CracApp) -> OwnerReference {
    app.controller_owner_ref(&())
        .expect("a CracApp read from the API server has a name and uid")
}

/// Name of the claim holding the app's images.
pub fn claim_name(app: &CracApp) -> String {
    app.spec
        .checkpoint
        .storage
        .existing_claim
        .clone()
        .unwrap_or_else(|| format!("{}-crac-images", app_name(app)))
}

pub fn app_name(app: &CracApp) -> &str {
    app.metadata.name.as_deref().unwrap_or_default()
}
