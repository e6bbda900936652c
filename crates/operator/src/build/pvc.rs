//! The claim that holds the app's images, when the operator creates it.

use super::{claim_name, labels_for, owner_ref};
use crac_api::CracApp;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use std::collections::BTreeMap;

/// `None` when the app uses an `existingClaim`: the operator never creates or owns that one.
pub fn images_claim_for(app: &CracApp) -> Option<PersistentVolumeClaim> {
    let storage = &app.spec.checkpoint.storage;
    if storage.existing_claim.is_some() {
        return None;
    }
    Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(app)),
            namespace: app.metadata.namespace.clone(),
            labels: Some(labels_for(super::app_name(app), "images")),
            owner_references: Some(vec![owner_ref(app)]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(
                storage
                    .access_modes
                    .iter()
                    .map(|m| m.as_str().to_string())
                    .collect(),
            ),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::app;

    #[test]
    fn claim_has_size_modes_and_owner() {
        let pvc = images_claim_for(&app()).unwrap();
        assert_eq!(pvc.metadata.name.as_deref(), Some("demo-crac-images"));
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.access_modes.unwrap(), ["ReadWriteOnce"]);
        assert_eq!(
            spec.resources.unwrap().requests.unwrap()["storage"].0,
            "1Gi"
        );
        assert_eq!(pvc.metadata.owner_references.unwrap()[0].kind, "CracApp");
    }

    #[test]
    fn existing_claim_is_not_created() {
        let mut a = app();
        a.spec.checkpoint.storage.existing_claim = Some("shared".into());
        assert!(images_claim_for(&a).is_none());
        assert_eq!(super::super::claim_name(&a), "shared");
    }
}
