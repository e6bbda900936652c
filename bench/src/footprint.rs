//! How much memory the operator's caches hold per app, object by object, without a cluster:
//! each object of one Ready app (dumped from a bench run into `bench/footprint/`, one list or
//! object per file) is parsed as the watch would parse it, slimmed as the cache slims it, and
//! the heap it keeps is counted (dhat's allocator, in testing mode).
//!
//! `cargo run --release -p crac-bench --bin crac-bench-footprint [dir]`

use crac_api::CracApp;
use crac_operator::cache;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// The objects of `file` (a kubectl list or one object), parsed and slimmed; the bytes they
/// keep on the heap, and their number.
fn kept<K: DeserializeOwned>(file: &Path, slim: fn(&mut K)) -> (usize, usize) {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let items: Vec<String> = match value.get("items") {
        Some(serde_json::Value::Array(items)) => items.iter().map(|v| v.to_string()).collect(),
        _ => vec![value.to_string()],
    };
    drop((text, value));
    // Parsed from text, as a watch event is; the texts live on, outside the count.
    let before = dhat::HeapStats::get().curr_bytes;
    let mut objects: Vec<K> = items
        .iter()
        .map(|text| serde_json::from_str(text).expect("the kind this file holds"))
        .collect();
    objects.iter_mut().for_each(slim);
    objects.shrink_to_fit();
    let after = dhat::HeapStats::get().curr_bytes;
    // The Vec's buffer holds the objects' inline part, as a store's Arcs would.
    let count = objects.len();
    drop(objects);
    (after.saturating_sub(before), count)
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("footprint"));
    let rows = [
        (
            "CracApp",
            kept::<CracApp>(&dir.join("app.json"), cache::slim_app),
        ),
        (
            "pods (restore + finished checkpoint)",
            kept::<Pod>(&dir.join("pods.json"), cache::slim_pod),
        ),
        ("Job", kept::<Job>(&dir.join("jobs.json"), cache::slim_job)),
        (
            "Deployment",
            kept::<Deployment>(&dir.join("deploy.json"), cache::slim_deployment),
        ),
        (
            "claim",
            kept::<PersistentVolumeClaim>(&dir.join("pvc.json"), cache::slim),
        ),
    ];
    println!("| cached per app | objects | heap kept |");
    println!("| --- | --- | --- |");
    let mut total = 0;
    for (what, (bytes, count)) in rows {
        total += bytes;
        println!("| {what} | {count} | {:.1} KiB |", bytes as f64 / 1024.0);
    }
    println!("| **sum** | | **{:.1} KiB** |", total as f64 / 1024.0);
    println!();
    println!(
        "inline sizes (bytes): Pod {}, Job {}, Deployment {}, PersistentVolumeClaim {}, CracApp {}",
        std::mem::size_of::<Pod>(),
        std::mem::size_of::<Job>(),
        std::mem::size_of::<Deployment>(),
        std::mem::size_of::<PersistentVolumeClaim>(),
        std::mem::size_of::<CracApp>()
    );
}
