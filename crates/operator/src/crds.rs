//! The CRDs this operator serves, rendered as the YAML kept in `crds/`.

use crac_api::CracApp;
use kube::CustomResourceExt;

/// All CRDs as one multi-document YAML stream.
pub fn render() -> String {
    let crds = [CracApp::crd()];
    crds.iter()
        .map(|crd| {
            let yaml = yaml_serde::to_string(crd).expect("a CRD always serializes");
            format!("---\n{yaml}")
        })
        .collect()
}
