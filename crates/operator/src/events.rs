//! Events about CracApps (`events.k8s.io/v1`), published the way kube-runtime's `Recorder`
//! does: an Event repeated within a few minutes becomes a series on the first one instead of
//! a new object. Unlike the `Recorder`, which keeps every Event whole for six minutes (a
//! quarter of the operator's memory with a thousand apps arriving at once), this remembers
//! only each Event's name and count. Its message is part of what makes an Event the same, so
//! a new failure message is a new Event, not a count on the old one.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a repeat counts as the same Event (the `Recorder`'s figure).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// One Event to publish.
pub struct Note<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub action: &'a str,
    pub message: String,
}

pub struct Events {
    client: Client,
    controller: String,
    instance: String,
    /// Published Events by a hash of what makes them the same.
    seen: Mutex<HashMap<u64, Seen>>,
}

struct Seen {
    name: String,
    count: i32,
    at: Instant,
}

impl Events {
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Events {
            client,
            controller: controller.into(),
            instance: instance.into(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes `note` about `regarding`, logging a failure instead of returning it: an Event
    /// is never worth failing a reconcile for. A refusal because the namespace is being
    /// deleted is not even a warning: nobody will read the Event.
    pub async fn publish_or_log(&self, note: &Note<'_>, regarding: &ObjectReference) {
        match self.publish(note, regarding).await {
            Ok(()) => {}
            Err(e) if crate::error::refused_as_terminating(&e) => {
                tracing::debug!("no Event: the namespace is being deleted");
            }
            Err(e) => tracing::warn!(error = %e, "could not publish an Event"),
        }
    }

    /// Publishes `note` about `regarding`: a new Event, or one more in the series of the
    /// same Event published in the last few minutes.
    pub async fn publish(
        &self,
        note: &Note<'_>,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api = Api::<Event>::namespaced(self.client.clone(), &namespace);
        let key = key_of(note, regarding);
        let repeat = self.repeat_of(key);
        let now = Timestamp::now();
        if let Some((name, count)) = repeat {
            let series = serde_json::json!({ "series": EventSeries {
                count,
                last_observed_time: MicroTime(now),
            }});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                .await
            {
                Ok(_) => {
                    self.remember(key, name, count);
                    return Ok(());
                }
                // Deleted meanwhile (Events expire): publish it anew.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = self.event(note, regarding, now);
        let name = event.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), &event).await?;
        self.remember(key, name, 1);
        Ok(())
    }

    /// The name and next count of the same Event published within the window.
    fn repeat_of(&self, key: u64) -> Option<(String, i32)> {
        let mut seen = self.seen.lock().ok()?;
        seen.retain(|_, s| s.at.elapsed() < SERIES_WINDOW);
        seen.get(&key).map(|s| (s.name.clone(), s.count + 1))
    }

    fn remember(&self, key: u64, name: String, count: i32) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(
                key,
                Seen {
                    name,
                    count,
                    at: Instant::now(),
                },
            );
        }
    }

    fn event(&self, note: &Note<'_>, regarding: &ObjectReference, now: Timestamp) -> Event {
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        Event {
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if note.warning { "Warning" } else { "Normal" }.into()),
            reason: Some(note.reason.into()),
            action: Some(note.action.into()),
            note: Some(note.message.clone()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

/// What makes two Events the same: the object, and everything the Event says.
fn key_of(note: &Note<'_>, regarding: &ObjectReference) -> u64 {
    let mut hasher = DefaultHasher::new();
    (
        &regarding.uid,
        &regarding.namespace,
        &regarding.name,
        &regarding.kind,
    )
        .hash(&mut hasher);
    (note.warning, note.reason, note.action, &note.message).hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(uid: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("CracApp".into()),
            namespace: Some("ns".into()),
            name: Some("demo".into()),
            uid: Some(uid.into()),
            ..Default::default()
        }
    }

    fn note(reason: &'static str, message: &str) -> Note<'static> {
        Note {
            warning: false,
            reason,
            action: "Reconcile",
            message: message.into(),
        }
    }

    #[test]
    fn the_same_event_is_the_same_object_and_message_and_reason() {
        let a = key_of(&note("Checkpointing", "attempt 1"), &app("u1"));
        assert_eq!(a, key_of(&note("Checkpointing", "attempt 1"), &app("u1")));
        assert_ne!(a, key_of(&note("Checkpointing", "attempt 2"), &app("u1")));
        assert_ne!(a, key_of(&note("Restoring", "attempt 1"), &app("u1")));
        assert_ne!(
            a,
            key_of(&note("Checkpointing", "attempt 1"), &app("u2")),
            "a new app of the same name"
        );
    }
}
