//! Stale images: restore pods that started cold instead of restoring the image (their agents
//! say so on the activity endpoint) are counted per image in `status.checkpoint.coldStartedPods`;
//! at `spec.restore.recheckpointAfterColdStarts` the operator takes a new checkpoint by setting
//! the `crac.dev/stale-image-at` annotation, which joins the checkpoint id. At most one such
//! checkpoint an hour, so an app whose restores fail on every node (a new image would not help)
//! costs one checkpoint Job an hour, not one per wake. Pure: the reads are in `observe.rs`.

use super::decide::Note;
use crate::checkpoint_id::short;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// The least time between two checkpoints taken because an image was stale.
pub const RECHECKPOINT_SPACING: SignedDuration = SignedDuration::from_hours(1);

/// How one ready restore pod of the current image started, as its agent reported.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreStart {
    pub pod: String,
    pub cold: bool,
    /// Why the restore did not happen (a known agent reason, else `None`).
    pub reason: Option<String>,
    /// The agent's start → the app ready, in milliseconds.
    pub start_ms: Option<u64>,
}

/// What the count says, for one reconcile.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    /// The image's cold-started pods, those already counted first (at most the threshold).
    pub cold_started_pods: Vec<String>,
    /// Pods counted for the first time now.
    pub newly_counted: usize,
    /// Set the stale annotation to this time: a new checkpoint is taken.
    pub recheckpoint_at: Option<Timestamp>,
    /// The threshold is reached but the last such checkpoint is too recent: look again then.
    pub next_allowed: Option<Timestamp>,
    pub events: Vec<Note>,
}

/// The inputs of [`tally`] that are not the pods.
pub struct Image<'a> {
    pub id: &'a str,
    /// Pods already counted for this image (from its status).
    pub counted: &'a [String],
    /// The image is the one the current spec would take (not already being replaced).
    pub current: bool,
}

pub fn tally(
    image: &Image<'_>,
    starts: &[RestoreStart],
    threshold: i32,
    last_stale_at: Option<Timestamp>,
    now: Timestamp,
) -> Tally {
    let threshold = usize::try_from(threshold).unwrap_or(0);
    let mut t = Tally {
        cold_started_pods: image.counted.to_vec(),
        ..Default::default()
    };
    if threshold == 0 {
        return t;
    }
    let image_short = short(image.id);
    let mut last_reason = None;
    for start in starts.iter().filter(|s| s.cold) {
        last_reason = start.reason.clone().or(last_reason);
        if t.cold_started_pods.len() >= threshold || t.cold_started_pods.contains(&start.pod) {
            continue;
        }
        t.cold_started_pods.push(start.pod.clone());
        t.newly_counted += 1;
        t.events.push(Note {
            warning: true,
            reason: "RestoreFellBack".into(),
            message: format!(
                "pod {} started cold instead of restoring image {image_short} ({}): {} of {threshold} before a new checkpoint",
                start.pod,
                start.reason.as_deref().unwrap_or("reason unknown"),
                t.cold_started_pods.len(),
            ),
        });
    }
    if t.cold_started_pods.len() < threshold || !image.current {
        return t;
    }
    let why = last_reason.unwrap_or_else(|| "reason unknown".into());
    let allowed = last_stale_at.map(|at| at + RECHECKPOINT_SPACING);
    match allowed.filter(|a| *a > now) {
        None => {
            t.recheckpoint_at = Some(now);
            t.events.push(Note {
                warning: true,
                reason: "ImageStale".into(),
                message: format!(
                    "{threshold} restore pods started cold instead of restoring image {image_short} (last: {why}): taking a new checkpoint"
                ),
            });
        }
        Some(next) => {
            t.next_allowed = Some(next);
            // Said once, when the count reaches the threshold, not on every look.
            if t.newly_counted > 0 {
                t.events.push(Note {
                    warning: true,
                    reason: "ImageStillStale".into(),
                    message: format!(
                        "{threshold} restore pods started cold instead of restoring image {image_short} (last: {why}), which was taken after an earlier image went stale: restore keeps failing here; the next new checkpoint may start at {next} (see docs/troubleshooting.md)"
                    ),
                });
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn cold(pod: &str) -> RestoreStart {
        RestoreStart {
            pod: pod.into(),
            cold: true,
            reason: Some("CpuFeaturesMissing".into()),
            start_ms: None,
        }
    }

    fn restored(pod: &str) -> RestoreStart {
        RestoreStart {
            pod: pod.into(),
            cold: false,
            reason: None,
            start_ms: None,
        }
    }

    const ID: &str = "0123456789abcdef";

    fn image<'a>(counted: &'a [String], current: bool) -> Image<'a> {
        Image {
            id: ID,
            counted,
            current,
        }
    }

    #[test]
    fn cold_starts_are_counted_once_each_and_restored_pods_not_at_all() {
        let counted = vec!["a".to_string()];
        let d = tally(
            &image(&counted, true),
            &[cold("a"), restored("b"), cold("c")],
            3,
            None,
            t(0),
        );
        assert_eq!(d.cold_started_pods, ["a", "c"]);
        assert_eq!(d.newly_counted, 1);
        assert_eq!(d.recheckpoint_at, None);
        assert_eq!(d.events.len(), 1);
        assert!(
            d.events[0].message.contains("pod c started cold")
                && d.events[0].message.contains("CpuFeaturesMissing")
                && d.events[0].message.contains("2 of 3"),
            "{:?}",
            d.events
        );
    }

    #[test]
    fn the_threshold_takes_a_new_checkpoint() {
        let d = tally(
            &image(&[], true),
            &[cold("a"), cold("b"), cold("c"), cold("d")],
            3,
            None,
            t(0),
        );
        assert_eq!(
            d.cold_started_pods,
            ["a", "b", "c"],
            "capped at the threshold"
        );
        assert_eq!(d.recheckpoint_at, Some(t(0)));
        assert!(d.events.iter().any(|e| e.reason == "ImageStale"));
    }

    #[test]
    fn at_most_one_new_checkpoint_an_hour() {
        let counted: Vec<String> = vec!["a".into(), "b".into()];
        let soon = tally(&image(&counted, true), &[cold("c")], 3, Some(t(-600)), t(0));
        assert_eq!(soon.recheckpoint_at, None);
        assert_eq!(soon.next_allowed, Some(t(3000)));
        assert!(soon.events.iter().any(|e| e.reason == "ImageStillStale"));
        // Looking again later says nothing new until it is allowed.
        let full: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let again = tally(&image(&full, true), &[cold("c")], 3, Some(t(-600)), t(60));
        assert!(again.events.is_empty(), "{:?}", again.events);
        let later = tally(&image(&full, true), &[], 3, Some(t(-600)), t(3000));
        assert_eq!(later.recheckpoint_at, Some(t(3000)));
    }

    #[test]
    fn nothing_is_taken_for_an_image_already_being_replaced_or_when_turned_off() {
        let d = tally(
            &image(&[], false),
            &[cold("a"), cold("b"), cold("c")],
            3,
            None,
            t(0),
        );
        assert_eq!(d.cold_started_pods.len(), 3, "still counted");
        assert_eq!(d.recheckpoint_at, None);
        let off = tally(&image(&[], true), &[cold("a")], 0, None, t(0));
        assert_eq!(off, Tally::default());
    }
}
