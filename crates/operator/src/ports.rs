//! The activator ports handed out to apps, one per app port, unique across the apps this
//! operator manages. Kept in memory, seeded once from the apps' status (from the cache).
//!
//! The table, not the status, decides who owns a port: a status is written back on every
//! reconcile, and anyone allowed to write an app's status could put another app's port in it.
//! A forged or duplicated entry is replaced by a port of the app's own; at worst it displaces
//! another app's port (its Service follows it), it never receives that app's traffic.

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

/// The ports `apps` hold in their status. A port two apps claim is nobody's (the table is
/// seeded after a restart from statuses anyone with status access could have written), and
/// so is a port outside [`ACTIVATOR_PORTS`].
pub fn ports_held<'a>(
    apps: impl IntoIterator<Item = &'a CracApp>,
) -> BTreeMap<i32, (String, String)> {
    let mut held = BTreeMap::new();
    let mut contested = BTreeSet::new();
    for a in apps {
        let owner = (
            a.metadata.namespace.clone().unwrap_or_default(),
            a.metadata.name.clone().unwrap_or_default(),
        );
        for p in a.status.iter().flat_map(|s| s.activator_ports.iter()) {
            if !ACTIVATOR_PORTS.contains(&p.activator_port) {
                continue;
            }
            match held.get(&p.activator_port) {
                Some(other) if *other != owner => {
                    contested.insert(p.activator_port);
                }
                _ => {
                    held.insert(p.activator_port, owner.clone());
                }
            }
        }
    }
    held.retain(|port, _| !contested.contains(port));
    held
}

/// The app `key`'s activator ports for `target_ports`: the ones its status holds (`kept`)
/// when they still match and the table does not give them to another app, else the lowest free
/// ones; recorded in `table` as the app's.
pub fn reserve(
    table: &mut BTreeMap<i32, (String, String)>,
    key: &(String, String),
    kept: &[ActivatorPort],
    target_ports: &[i32],
) -> Vec<ActivatorPort> {
    let ours = |p: &ActivatorPort| {
        ACTIVATOR_PORTS.contains(&p.activator_port)
            && table
                .get(&p.activator_port)
                .is_none_or(|owner| owner == key)
    };
    let distinct: BTreeSet<i32> = kept.iter().map(|p| p.activator_port).collect();
    if distinct.len() == kept.len()
        && kept.iter().all(ours)
        && kept
            .iter()
            .map(|p| p.target_port)
            .eq(target_ports.iter().copied())
    {
        for p in kept {
            table.insert(p.activator_port, key.clone());
        }
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
    fn a_forged_or_duplicated_port_is_replaced_by_one_of_the_apps_own() {
        let mut table = BTreeMap::new();
        let victim = reserve(&mut table, &key("victim"), &[], &[8080]);
        let port = |activator_port| ActivatorPort {
            name: None,
            target_port: 8080,
            activator_port,
        };
        // Another app's port, written into the tenant's status.
        let forged = reserve(&mut table, &key("tenant"), &[port(20000)], &[8080]);
        assert_ne!(forged[0].activator_port, victim[0].activator_port);
        assert_eq!(table[&20000], key("victim"), "the victim keeps its port");
        // A port outside the range, and one port listed twice.
        let outside = reserve(&mut table, &key("tenant"), &[port(22)], &[8080]);
        assert!(ACTIVATOR_PORTS.contains(&outside[0].activator_port));
        let mut twice = port(25000);
        twice.target_port = 9090;
        let doubled = reserve(&mut table, &key("t2"), &[port(25000), twice], &[8080, 9090]);
        assert_ne!(doubled[0].activator_port, doubled[1].activator_port);
        // The victim's own entry is still kept.
        assert_eq!(
            reserve(&mut table, &key("victim"), &victim, &[8080]),
            victim
        );
    }

    #[test]
    fn a_port_two_statuses_claim_is_nobodys_after_a_restart() {
        let app = |name: &str, ports: &[i32]| {
            let mut a = CracApp::new(
                name,
                serde_json::from_value(serde_json::json!({"template": {}})).unwrap(),
            );
            a.metadata.namespace = Some("ns".into());
            a.status = Some(crac_api::cracapp::CracAppStatus {
                activator_ports: ports
                    .iter()
                    .map(|&p| ActivatorPort {
                        name: None,
                        target_port: 8080,
                        activator_port: p,
                    })
                    .collect(),
                ..Default::default()
            });
            a
        };
        let apps = [
            app("a", &[20000, 20001]),
            app("b", &[20001]),
            app("c", &[80]),
        ];
        let held = ports_held(&apps);
        assert_eq!(held.get(&20000), Some(&key("a")));
        assert!(!held.contains_key(&20001), "contested");
        assert!(!held.contains_key(&80), "outside the range");
    }

    #[test]
    fn ports_are_the_lowest_free_ones() {
        let taken = [20000, 20002].into_iter().collect();
        assert_eq!(allocate_ports(2, &taken), [20001, 20003]);
    }
}
