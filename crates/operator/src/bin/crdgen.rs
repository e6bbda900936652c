//! Prints the CustomResourceDefinitions as YAML: `cargo run --bin crdgen > crds/crds.yaml`.
//! `make crds` writes them; a test fails when `crds/` is stale.

fn main() {
    print!("{}", crac_operator::crds::render());
}
