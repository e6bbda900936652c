//! The activator ports handed out to apps, one per app port, unique across the apps this
//! operator manages. Kept in memory, seeded once from the apps' status (from the cache).

use crac_api::CracApp;
use crac_api::cracapp::ActivatorPort;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Activator ports handed out, by port: `(namespace, app)`; `None` until seeded.
pub type PortTable = Arc<tokio::sync::Mutex<Option<BTreeMap<i32, (String, String)>>>>;

/// Activator ports are handed out from this range, one per app port, unique cluster-wide.
pub const ACTIVATOR_PORTS: std::ops::Range<i32> = 20000..30000;

/// The lowest `count` ports of the range not in `taken`.
pub fn allocate_ports(count: usize, taken: &std::collections::BTreeSet<i32>) -> Vec<i32> {
    ACTIVATOR_PORTS
        .filter(|p| !taken.contains(p))
        .take(count)
        .collect()
}

/// The ports `apps` hold in their status.
pub fn ports_held<'a>(
    apps: impl IntoIterator<Item = &'a CracApp>,
) -> BTreeMap<i32, (String, String)> {
    let mut held = BTreeMap::new();
    for a in apps {
        let owner = (
            a.metadata.namespace.clone().unwrap_or_default(),
            a.metadata.name.clone().unwrap_or_default(),
        );
        for p in a.status.iter().flat_map(|s| s.activator_ports.iter()) {
            held.insert(p.activator_port, owner.clone());
        }
    }
    held
}

/// The app `key`'s activator ports for `target_ports`: the ones it holds (`kept`) when they
/// still match, else the lowest free ones, recorded in `table` as the app's.
pub fn reserve(
    table: &mut BTreeMap<i32, (String, String)>,
    key: &(String, String),
    kept: &[ActivatorPort],
    target_ports: &[i32],
) -> Vec<ActivatorPort> {
    if kept
        .iter()
        .map(|p| p.target_port)
        .eq(target_ports.iter().copied())
    {
        return kept.to_vec();
    }
    table.retain(|_, owner| owner != key);
    let taken: BTreeSet<i32> = table.keys().copied().collect();
    let ports = allocate_ports(target_ports.len(), &taken);
    target_ports
        .iter()
        .zip(ports)
        .map(|(&target_port, activator_port)| {
            table.insert(activator_port, key.clone());
            ActivatorPort {
                name: None,
                target_port,
                activator_port,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> (String, String) {
        ("ns".into(), name.into())
    }

    #[test]
    fn ports_are_kept_while_the_app_ports_match_and_never_shared() {
        let mut table = BTreeMap::new();
        let a = reserve(&mut table, &key("a"), &[], &[8080, 9090]);
        assert_eq!(
            a.iter().map(|p| p.activator_port).collect::<Vec<_>>(),
            [20000, 20001]
        );
        let b = reserve(&mut table, &key("b"), &[], &[8080]);
        assert_eq!(b[0].activator_port, 20002);
        assert_eq!(reserve(&mut table, &key("a"), &a, &[8080, 9090]), a);
        // a's ports change: its old ones are freed and the lowest free are taken.
        let a2 = reserve(&mut table, &key("a"), &a, &[8081]);
        assert_eq!(a2[0].activator_port, 20000);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn ports_are_the_lowest_free_ones() {
        let taken = [20000, 20002].into_iter().collect();
        assert_eq!(allocate_ports(2, &taken), [20001, 20003]);
    }
}
