//! What the operator last applied, per app and object, so an apply that would change nothing
//! is skipped; and which app versions a status write has replaced (see [`Superseded`]).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// For each app, each object the operator applied: a hash of what it sent, and the
/// resourceVersions at which the object is known to hold it.
#[derive(Default)]
pub struct Applied {
    apps: Mutex<HashMap<AppKey, HashMap<ObjectKey, Sent>>>,
}

/// Namespace and name of an app.
pub type AppKey = (String, String);
/// Kind and name of an applied object.
pub type ObjectKey = (String, String);

struct Sent {
    hash: u64,
    /// The `metadata.generation` the last apply answered with, for kinds whose generation
    /// moves with every change of their spec (Deployments).
    generation: Option<i64>,
    /// The version an apply answered with, the version it was applied over (a cache that lags
    /// may still show that one), and versions found to hold what was sent. Newest last.
    versions: Vec<String>,
}

/// Enough versions for a cache a few writes behind.
const VERSIONS_KEPT: usize = 8;

impl Sent {
    fn remember(&mut self, version: String) {
        if self.versions.contains(&version) {
            return;
        }
        if self.versions.len() == VERSIONS_KEPT {
            self.versions.remove(0);
        }
        self.versions.push(version);
    }
}

/// What a cache holds of an object the operator applies.
pub struct Live {
    pub version: String,
    /// The object's `metadata.generation`, when a cache of it keeps its spec only in part:
    /// an unchanged generation says nobody changed the spec since.
    pub generation: Option<i64>,
    /// The whole object as JSON, when the cache keeps more than its metadata. Made only when
    /// the version does not settle it: most reconciles find a version they know.
    object: Option<Box<dyn Fn() -> Option<serde_json::Value> + Send + Sync>>,
}

impl Live {
    pub fn of<K>(object: Arc<K>) -> Live
    where
        K: kube::Resource + serde::Serialize + Send + Sync + 'static,
    {
        Live {
            version: object.meta().resource_version.clone().unwrap_or_default(),
            generation: None,
            object: Some(Box::new(move || serde_json::to_value(&*object).ok())),
        }
    }

    /// For caches that keep a spec only in part (Deployments, without their pod template):
    /// the generation settles it.
    pub fn generation_of<K: kube::Resource>(object: &K) -> Live {
        Live {
            version: object.meta().resource_version.clone().unwrap_or_default(),
            generation: object.meta().generation,
            object: None,
        }
    }

    /// For caches of metadata only.
    pub fn version_of<K: kube::Resource>(object: &K) -> Live {
        Live {
            version: object.meta().resource_version.clone().unwrap_or_default(),
            generation: None,
            object: None,
        }
    }
}

impl Applied {
    /// Whether applying `body` (hashed `hash`) again would change nothing: it is what was
    /// applied last, and the live object still holds it. Others' writes that leave the
    /// operator's fields alone (a Deployment's status, a claim's binding) are not changes.
    pub fn unchanged(
        &self,
        app: &AppKey,
        key: &ObjectKey,
        hash: u64,
        body: &serde_json::Value,
        live: &Live,
    ) -> bool {
        let Ok(mut apps) = self.apps.lock() else {
            return false;
        };
        let Some(sent) = apps.get_mut(app).and_then(|objects| objects.get_mut(key)) else {
            return false;
        };
        if sent.hash != hash {
            return false;
        }
        if sent.versions.contains(&live.version) {
            return true;
        }
        if live.generation.is_some() {
            // Others' writes that leave the spec alone (the Deployment's status) keep the
            // generation; any change of the spec moves it.
            if live.generation == sent.generation {
                sent.remember(live.version.clone());
                return true;
            }
            tracing::debug!(kind = %key.0, name = %key.1, "spec changed by someone else");
            return false;
        }
        let whole = live.object.as_ref().and_then(|make| make());
        match whole.map(|o| difference(&o, body)) {
            Some(None) => {
                sent.remember(live.version.clone());
                true
            }
            Some(Some(path)) => {
                tracing::debug!(kind = %key.0, name = %key.1, field = %path, "changed by someone else");
                false
            }
            None => false,
        }
    }

    /// Records an apply of a body hashed `hash` over version `over` (none: created) that
    /// answered with version `answered` (and `generation`); true when this object had not
    /// been applied before.
    pub fn record(
        &self,
        app: AppKey,
        key: ObjectKey,
        hash: u64,
        over: Option<String>,
        answered: String,
        generation: Option<i64>,
    ) -> bool {
        let Ok(mut apps) = self.apps.lock() else {
            return true;
        };
        let objects = apps.entry(app).or_default();
        let first = !objects.contains_key(&key);
        let sent = objects.entry(key).or_insert_with(|| Sent {
            hash,
            generation,
            versions: Vec::new(),
        });
        sent.generation = generation;
        if sent.hash != hash {
            sent.hash = hash;
            sent.versions.clear();
        }
        // The object at `over` had the operator's apply made on top of it: seen again (from a
        // lagging cache) it needs nothing more.
        if let Some(over) = over {
            sent.remember(over);
        }
        sent.remember(answered);
        first
    }

    /// Whether the operator applied this object before.
    pub fn knows(&self, app: &AppKey, key: &ObjectKey) -> bool {
        self.apps.lock().is_ok_and(|apps| {
            apps.get(app)
                .is_some_and(|objects| objects.contains_key(key))
        })
    }

    /// Whether this process applied exactly `hash` as the object last (for objects the caches
    /// do not hold: the control Secret, which the operator may write but not read).
    pub fn sent(&self, app: &AppKey, key: &ObjectKey, hash: u64) -> bool {
        self.apps.lock().is_ok_and(|apps| {
            apps.get(app)
                .and_then(|objects| objects.get(key))
                .is_some_and(|sent| sent.hash == hash)
        })
    }

    /// Forgets an app (it is being deleted).
    pub fn forget(&self, app: &AppKey) {
        if let Ok(mut apps) = self.apps.lock() {
            apps.remove(app);
        }
    }
}

/// The path of the first field sent that `live` does not hold; `None` when `live` holds
/// everything in `sent`: each field sent has the same value there (fields the API server or
/// others added do not matter). Lists must match item by item; a zero value sent (empty,
/// false, 0) matches a missing one (the API server drops them). When unsure it names a
/// field, which costs one apply that changes nothing.
pub fn difference(live: &serde_json::Value, sent: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match (sent, live) {
        (Value::Object(sent), Value::Object(live)) => sent.iter().find_map(|(k, v)| {
            match live.get(k) {
                Some(l) => difference(l, v),
                None if is_empty(v) => None,
                None => Some(String::new()),
            }
            .map(|rest| format!(".{k}{rest}"))
        }),
        (Value::Array(sent), Value::Array(live)) if sent.len() == live.len() => sent
            .iter()
            .zip(live)
            .enumerate()
            .find_map(|(i, (s, l))| difference(l, s).map(|rest| format!("[{i}]{rest}"))),
        (Value::Null, _) => None,
        (sent, live) if sent == live => None,
        _ => Some(String::new()),
    }
}

/// Zero values, which the API server leaves out of what it returns (Go's `omitempty`).
fn is_empty(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Bool(true) => false,
    }
}

/// For each app, the resourceVersion it had when the operator last wrote its status. A
/// reconcile handed exactly that version (the cache has not caught up with the write yet,
/// and some other change triggered it) would work from a status already replaced, and repeat
/// its Events; it is skipped, because the write's own watch event brings the app back. Only
/// for a few seconds after the write: should a write have changed nothing (no new version, no
/// event), the app is reconciled normally again.
#[derive(Default)]
pub struct Superseded {
    apps: Mutex<HashMap<AppKey, (String, Instant)>>,
}

const SUPERSEDED_FOR: Duration = Duration::from_secs(10);

impl Superseded {
    pub fn record(&self, app: AppKey, version: String) {
        if let Ok(mut apps) = self.apps.lock() {
            apps.insert(app, (version, Instant::now()));
        }
    }

    pub fn is_superseded(&self, app: &AppKey, version: &str) -> bool {
        self.apps.lock().is_ok_and(|apps| {
            apps.get(app)
                .is_some_and(|(v, at)| v == version && at.elapsed() < SUPERSEDED_FOR)
        })
    }

    pub fn forget(&self, app: &AppKey) {
        if let Ok(mut apps) = self.apps.lock() {
            apps.remove(app);
        }
    }
}

/// A hash of an object as it would be sent.
pub fn body_hash(body: &serde_json::Value) -> u64 {
    let mut hasher = DefaultHasher::new();
    body.to_string().hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> (String, String) {
        ("ns".into(), "demo".into())
    }

    fn version(v: &str) -> Live {
        Live {
            version: v.into(),
            generation: None,
            object: None,
        }
    }

    #[test]
    fn an_object_is_unchanged_with_the_same_body_at_a_version_the_apply_accounts_for() {
        let applied = Applied::default();
        let key: ObjectKey = ("Service".into(), "demo".into());
        let sent = serde_json::json!({ "spec": { "ports": [80] } });
        let hash = body_hash(&sent);
        let unchanged = |hash, v| applied.unchanged(&app(), &key, hash, &sent, &version(v));
        assert!(!unchanged(hash, "7"), "never applied");
        assert!(applied.record(app(), key.clone(), hash, Some("6".into()), "7".into(), None));
        assert!(unchanged(hash, "7"), "the version the apply answered with");
        assert!(
            unchanged(hash, "6"),
            "a cache that has not seen the apply yet"
        );
        assert!(!unchanged(hash, "8"), "someone else changed it since");
        let other = body_hash(&serde_json::json!({ "spec": { "ports": [81] } }));
        assert!(!unchanged(other, "7"), "a new body");
        assert!(!applied.record(
            app(),
            key.clone(),
            other,
            Some("7".into()),
            "9".into(),
            None
        ));
        assert!(
            !unchanged(hash, "9"),
            "the old body is not the last applied"
        );
        applied.forget(&app());
        assert!(!unchanged(other, "9"), "forgotten");
    }

    #[test]
    fn a_partly_cached_object_is_unchanged_while_its_generation_is() {
        let applied = Applied::default();
        let key: ObjectKey = ("Deployment".into(), "demo".into());
        let sent = serde_json::json!({ "spec": { "replicas": 2 } });
        let hash = body_hash(&sent);
        applied.record(app(), key.clone(), hash, None, "7".into(), Some(1));
        let live = |v: &str, generation| Live {
            version: v.into(),
            generation: Some(generation),
            object: None,
        };
        assert!(
            applied.unchanged(&app(), &key, hash, &sent, &live("8", 1)),
            "a status update"
        );
        assert!(
            !applied.unchanged(&app(), &key, hash, &sent, &live("9", 2)),
            "someone changed the spec"
        );
    }

    #[test]
    fn the_first_field_not_held_is_named() {
        let sent = serde_json::json!({ "spec": { "ports": [{ "port": 80 }, { "port": 81 }] } });
        let live = serde_json::json!({ "spec": { "ports": [{ "port": 80 }, { "port": 82 }] } });
        assert_eq!(
            difference(&live, &sent).as_deref(),
            Some(".spec.ports[1].port")
        );
        assert_eq!(difference(&sent, &sent), None);
    }

    #[test]
    fn others_writes_that_leave_the_operators_fields_alone_change_nothing() {
        let applied = Applied::default();
        let key: ObjectKey = ("Deployment".into(), "demo".into());
        let sent = serde_json::json!({
            "metadata": { "name": "demo", "labels": { "crac.dev/app": "demo" } },
            "spec": { "replicas": 2, "template": { "spec": {
                "containers": [{ "name": "app", "image": "demo:1", "args": [],
                    "volumeMounts": [{ "name": "agent", "mountPath": "/a", "readOnly": false }] }],
                "volumes": [{ "name": "agent", "emptyDir": {} }] } } }
        });
        let hash = body_hash(&sent);
        applied.record(app(), key.clone(), hash, None, "7".into(), None);
        let at = |v: &str, object: serde_json::Value| Live {
            version: v.into(),
            generation: None,
            object: Some(Box::new(move || Some(object.clone()))),
        };
        let mut live = sent.clone();
        live["metadata"]["resourceVersion"] = "8".into();
        live["metadata"]["labels"]["added-by"] = "someone".into();
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Always".into();
        live["spec"]["template"]["spec"]["containers"][0]
            .as_object_mut()
            .expect("a container")
            .remove("args");
        live["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
            .as_object_mut()
            .expect("a mount")
            .remove("readOnly");
        live["status"] = serde_json::json!({ "readyReplicas": 2 });
        assert!(applied.unchanged(&app(), &key, hash, &sent, &at("8", live.clone())));

        let mut edited = live.clone();
        edited["spec"]["replicas"] = 5.into();
        assert!(!applied.unchanged(&app(), &key, hash, &sent, &at("9", edited)));
        let mut more = live.clone();
        more["spec"]["template"]["spec"]["volumes"] =
            serde_json::json!([{ "name": "agent", "emptyDir": {} }, { "name": "x" }]);
        assert!(
            !applied.unchanged(&app(), &key, hash, &sent, &at("10", more)),
            "lists must match item by item"
        );
        let mut gone = live;
        gone["metadata"]["labels"]
            .as_object_mut()
            .expect("labels")
            .remove("crac.dev/app");
        assert!(!applied.unchanged(&app(), &key, hash, &sent, &at("11", gone)));
    }

    #[test]
    fn only_the_exact_version_a_status_write_replaced_is_superseded() {
        let superseded = Superseded::default();
        assert!(!superseded.is_superseded(&app(), "5"));
        superseded.record(app(), "5".into());
        assert!(superseded.is_superseded(&app(), "5"));
        assert!(
            !superseded.is_superseded(&app(), "6"),
            "the write's own version"
        );
        superseded.forget(&app());
        assert!(!superseded.is_superseded(&app(), "5"));
    }
}
