//! The checkpoint id: a hash of everything that shapes the JVM's memory. Two specs with the
//! same id can restore each other's image; any change to these inputs needs a new checkpoint,
//! and a change to anything else (replicas, idle timers, labels, probes) does not.

use crate::validate::ValidatedApp;
use crac_api::cracapp::Engine;
use crac_api::labels;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The inputs of the id, serialized in a fixed order.
#[derive(Serialize)]
struct Identity<'a> {
    /// Bump when the meaning of the inputs changes, so old images are not reused.
    scheme: u32,
    image: &'a str,
    command: &'a [String],
    env: &'a [k8s_openapi::api::core::v1::EnvVar],
    env_from: &'a [k8s_openapi::api::core::v1::EnvFromSource],
    working_dir: Option<&'a str>,
    /// Memory and CPU limits steer the JVM's heap and thread ergonomics.
    resources: Option<&'a k8s_openapi::api::core::v1::ResourceRequirements>,
    engine: &'static str,
    /// The agent takes part in the image (its PID layout, the files it records).
    agent_image: &'a str,
    /// `kubectl crac checkpoint` sets an annotation to ask for a fresh image of the same
    /// spec: its value joins the identity, so a new image is taken and rolled out.
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh: Option<&'a str>,
    /// Set by the operator when restore pods kept starting cold from the image (see
    /// `crac_api::labels::STALE_IMAGE_AT`): a new image is taken the same way.
    #[serde(skip_serializing_if = "Option::is_none")]
    stale: Option<&'a str>,
}

/// A 64-character hex id. `annotations` are the CracApp's: two of them ask for a new image of
/// the same spec.
pub fn checkpoint_id(
    app: &ValidatedApp,
    engine: Engine,
    agent_image: &str,
    annotations: &BTreeMap<String, String>,
) -> String {
    let c = &app.container;
    let identity = Identity {
        scheme: 1,
        image: c.image.as_deref().unwrap_or_default(),
        command: &app.command,
        env: c.env.as_deref().unwrap_or_default(),
        env_from: c.env_from.as_deref().unwrap_or_default(),
        working_dir: c.working_dir.as_deref(),
        resources: c.resources.as_ref(),
        engine: engine.as_str(),
        agent_image,
        refresh: annotations
            .get(labels::CHECKPOINT_REQUESTED_AT)
            .map(String::as_str),
        stale: annotations.get(labels::STALE_IMAGE_AT).map(String::as_str),
    };
    let bytes = serde_json::to_vec(&identity).expect("identity always serializes");
    hex::encode(Sha256::digest(bytes))
}

/// The short form used in object names and labels.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(10)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{tests::app, validate};
    use k8s_openapi::api::core::v1::EnvVar;
    use kube::ResourceExt;

    fn id_of(a: &crac_api::CracApp) -> String {
        checkpoint_id(
            &validate(a, &Default::default()).unwrap(),
            a.spec.checkpoint.engine,
            "agent:1",
            a.annotations(),
        )
    }

    #[test]
    fn id_is_stable_and_hex() {
        let a = app();
        assert_eq!(id_of(&a), id_of(&a));
        assert_eq!(id_of(&a).len(), 64);
        assert!(id_of(&a).chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn memory_shaping_changes_change_the_id() {
        let base = id_of(&app());
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].image = Some("demo:0.0.2".into());
        assert_ne!(id_of(&a), base, "image");
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].args = Some(vec!["-Xmx1g".into()]);
        assert_ne!(id_of(&a), base, "args");
        let mut a = app();
        a.spec.template.spec.as_mut().unwrap().containers[0].env = Some(vec![EnvVar {
            name: "JAVA_TOOL_OPTIONS".into(),
            value: Some("-XX:+UseSerialGC".into()),
            ..Default::default()
        }]);
        assert_ne!(id_of(&a), base, "env");
        let mut a = app();
        a.spec.checkpoint.engine = Engine::Crac;
        assert_ne!(id_of(&a), base, "engine");
        let v = validate(&app(), &Default::default()).unwrap();
        assert_ne!(
            checkpoint_id(&v, Engine::Criu, "agent:2", &BTreeMap::new()),
            base,
            "agent"
        );
        let mut a = app();
        a.annotations_mut().insert(
            crac_api::labels::CHECKPOINT_REQUESTED_AT.into(),
            "2026-11-24T10:00:00Z".into(),
        );
        assert_ne!(id_of(&a), base, "a requested refresh");
        let mut b = app();
        b.annotations_mut().insert(
            crac_api::labels::STALE_IMAGE_AT.into(),
            "2026-11-24T10:00:00Z".into(),
        );
        assert_ne!(id_of(&b), base, "a stale image");
        assert_ne!(id_of(&b), id_of(&a), "stale and refresh are told apart");
        let mut c = app();
        c.annotations_mut()
            .insert("example.com/unrelated".into(), "x".into());
        assert_eq!(id_of(&c), base, "other annotations");
    }

    #[test]
    fn other_changes_keep_the_id() {
        let base = id_of(&app());
        let mut a = app();
        a.spec.replicas = 7;
        a.spec.checkpoint.retain = 5;
        a.spec.template.spec.as_mut().unwrap().containers[0].readiness_probe = None;
        a.spec.template.metadata = Some(Default::default());
        assert_eq!(id_of(&a), base);
    }
}
