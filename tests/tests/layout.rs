//! The workspace's layering, as `cargo tree` sees it: the contract crate (`crac-api`) and the
//! agent, which runs inside every app container, build without a Kubernetes client, TLS or an
//! async runtime. A dependency that pulls one of them back in fails here.

use crac_tests::repo_root;
use std::process::Command;

/// Crates that belong to a client, its TLS or its runtime, never to the contract.
const CLIENT_SIDE: [&str; 7] = [
    "kube-client",
    "kube-runtime",
    "hyper",
    "rustls",
    "ring",
    "tokio",
    "tower",
];

fn normal_dependencies(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args([
            "tree", "-p", package, "-e", "normal", "--prefix", "none", "--format", "{p}",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn the_contract_crate_and_the_agent_build_without_a_kubernetes_client() {
    for package in ["crac-api", "crac-agent"] {
        let deps = normal_dependencies(package);
        assert!(
            deps.iter().any(|d| d == "kube-core"),
            "{package}: cargo tree lists no kube-core, so this check sees nothing: {deps:?}"
        );
        let client: std::collections::BTreeSet<_> = deps
            .iter()
            .filter(|d| CLIENT_SIDE.contains(&d.as_str()))
            .collect();
        assert!(
            client.is_empty(),
            "{package} depends on {client:?}: keep crates/api free of kube's client features"
        );
    }
}
