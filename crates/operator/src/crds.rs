//! The CRDs this operator serves, rendered as the YAML kept in `crds/`.

use crac_api::{CracApp, CracScalePolicy};
use kube::CustomResourceExt;

/// All CRDs as one multi-document YAML stream.
pub fn render() -> String {
    let crds = [CracApp::crd(), CracScalePolicy::crd()];
    crds.iter()
        .map(|crd| {
            let yaml = yaml_serde::to_string(crd).expect("a CRD always serializes");
            format!("---\n{yaml}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn crds_directory_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds/crds.yaml");
        let committed = std::fs::read_to_string(path).expect("crds/crds.yaml exists");
        assert!(
            committed == super::render(),
            "crds/crds.yaml is stale: run `make crds` and commit the result"
        );
    }
}
