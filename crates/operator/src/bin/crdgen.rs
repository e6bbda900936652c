//! Prints the CustomResourceDefinitions as YAML (`crdgen > crds/crds.yaml`), or with
//! `--reference` the field reference (`crdgen --reference > docs/reference.md`).
//! `make crds` writes both; tests fail when either is stale.

fn main() {
    if std::env::args().any(|a| a == "--reference") {
        print!("{}", crac_operator::crds::render_reference());
    } else {
        print!("{}", crac_operator::crds::render());
    }
}
