//! The generated files are current, checked without Helm or a cluster (`make unit` runs this):
//! the CRDs in `crds/` and the chart's copy of them, the CRDs inside `deploy/crac-operator.yaml`,
//! and `docs/reference.md`, each against what `crac_operator::crds` renders from the types in
//! `crates/api` now (`crdgen` prints the same). The rest of `deploy/` is the chart rendered by
//! Helm, so that comparison stays with the Helm tests (`tests/tests/install.rs`).

use crac_operator::crds::{render, render_reference};
use crac_tests::repo_root;

fn committed(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

#[test]
fn the_crds_are_what_the_api_types_render() {
    assert!(
        committed("crds/crds.yaml") == render(),
        "crds/crds.yaml is stale: run `make crds` and commit the result"
    );
}

#[test]
fn the_charts_crds_are_the_same_as_crds() {
    assert!(
        committed("charts/crac-operator/crds/crds.yaml") == render(),
        "charts/crac-operator/crds/crds.yaml is stale: run `make crds` and commit the result"
    );
}

#[test]
fn the_plain_manifests_carry_the_current_crds() {
    // `helm template --include-crds` copies the chart's crds/ file as it is.
    assert!(
        committed("deploy/crac-operator.yaml").contains(&render()),
        "deploy/crac-operator.yaml does not hold the current CRDs: run `make crds` (or \
         `make manifests`) and commit the result"
    );
}

#[test]
fn the_reference_doc_is_what_the_api_types_render() {
    assert!(
        committed("docs/reference.md") == render_reference(),
        "docs/reference.md is stale: run `make crds` and commit the result"
    );
}
