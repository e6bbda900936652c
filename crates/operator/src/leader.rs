//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! only one reconciles. The rules are client-go's:
//!
//! - **Expiry is judged on the candidate's own monotonic clock.** A candidate never compares
//!   the record's `renewTime` with its wall clock (replicas' clocks may disagree by any
//!   amount). It notes when it first saw the record as it is now (holder, `renewTime`,
//!   resourceVersion) and takes the lease only once it has seen no change for the record's
//!   `leaseDurationSeconds`.
//! - **The leader stops acting at its renew deadline** (shorter than the lease duration),
//!   counted on its own monotonic clock from when it *sent* its last successful renewal. A
//!   candidate that saw that renewal saw it after it was sent, so the leader has stopped before
//!   any candidate's wait can end.
//! - **Updates carry the resourceVersion read**: two candidates cannot both take the lease.
//! - **A leader that shuts down gracefully releases the lease** (no holder, duration 1 s), so
//!   a standby takes over at once instead of a lease duration later.
//!
//! [`Elector`] holds the decisions and takes the time as arguments; the functions below it only
//! read and write the Lease.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub identity: String,
    /// How long a candidate waits, after it last saw the lease change, before taking it; written
    /// into the Lease as `leaseDurationSeconds`.
    pub duration: Duration,
    /// How long the leader keeps acting without a successful renewal. Shorter than `duration`:
    /// the difference is the margin for the leader to stop and for clocks running at slightly
    /// different rates.
    pub renew_deadline: Duration,
    /// Pause between attempts: a leader's renewals, a candidate's tries.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: a 15 s lease, a 10 s renew deadline, a try every 2 s.
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseSettings {
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What identifies one version of the lease record: any renewal or takeover changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RecordVersion {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
}

impl RecordVersion {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        RecordVersion {
            holder: spec.and_then(|s| s.holder_identity.clone()),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// One replica's side of the election: what it last saw of the lease and when (on its own
/// monotonic clock), and when its last successful renewal was sent. No API calls and no clock
/// reads: every method is given the time.
#[derive(Clone, Debug)]
pub struct Elector {
    pub settings: LeaseSettings,
    /// The record as last read, and when it was first read as it is.
    observed: Option<(RecordVersion, Instant)>,
    /// When the last successful write of the lease as ours was sent.
    renewed_at: Option<Instant>,
}

impl Elector {
    pub fn new(settings: LeaseSettings) -> Self {
        Elector {
            settings,
            observed: None,
            renewed_at: None,
        }
    }

    fn me(&self) -> &str {
        &self.settings.identity
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.settings.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Given the lease as just read at `now` (`None`: there is none), the spec to write to take
    /// or renew it, or `None` while another holds it and it has not expired by this replica's
    /// clock. `wall` is only written into the record (`acquireTime`, `renewTime`), for people
    /// reading it; no decision reads it.
    pub fn plan(
        &mut self,
        current: Option<&Lease>,
        now: Instant,
        wall: Timestamp,
    ) -> Option<LeaseSpec> {
        let Some(lease) = current else {
            self.observed = None;
            return Some(LeaseSpec {
                holder_identity: Some(self.me().to_string()),
                lease_duration_seconds: Some(self.duration_secs()),
                acquire_time: Some(MicroTime(wall)),
                renew_time: Some(MicroTime(wall)),
                lease_transitions: Some(0),
                ..Default::default()
            });
        };
        let version = RecordVersion::of(lease);
        let since = match &self.observed {
            Some((seen, since)) if *seen == version => *since,
            _ => {
                self.observed = Some((version, now));
                now
            }
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        let mine = holder == self.me();
        if !holder.is_empty() && !mine {
            // The holder's own duration, as it wrote it; ours if it wrote none (or nonsense).
            let held_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(self.settings.duration, Duration::from_secs);
            if now.saturating_duration_since(since) < held_for {
                return None;
            }
        }
        if !mine {
            spec.acquire_time = Some(MicroTime(wall));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.me().to_string());
        }
        spec.renew_time = Some(MicroTime(wall));
        spec.lease_duration_seconds = Some(self.duration_secs());
        Some(spec)
    }

    /// The write planned by an attempt that started (before its read) at `started` succeeded,
    /// and the server returned `written`: this replica leads until `started + renew_deadline`.
    pub fn renewed(&mut self, written: &Lease, started: Instant) {
        self.renewed_at = Some(started);
        self.observed = Some((RecordVersion::of(written), started));
    }

    /// Whether this replica may act as the leader at `now`.
    pub fn is_leading(&self, now: Instant) -> bool {
        self.lead_deadline().is_some_and(|deadline| now < deadline)
    }

    /// When this replica must stop acting unless a renewal succeeds first.
    pub fn lead_deadline(&self) -> Option<Instant> {
        self.renewed_at.map(|at| at + self.settings.renew_deadline)
    }

    /// Whether the record as last read names another holder (a leader that sees this has lost).
    pub fn another_holds(&self) -> bool {
        self.observed
            .as_ref()
            .and_then(|(seen, _)| seen.holder.as_deref())
            .is_some_and(|h| !h.is_empty() && h != self.me())
    }

    /// The spec that gives up `current` if it is ours (no holder, a 1 s duration, as
    /// client-go's `ReleaseOnCancel`), so that a standby takes it at once. `None` if it is not
    /// ours. This replica stops leading whether or not the write then succeeds.
    pub fn release(&mut self, current: &Lease, wall: Timestamp) -> Option<LeaseSpec> {
        self.renewed_at = None;
        let mut spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.me()) {
            return None;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(MicroTime(wall));
        spec.renew_time = Some(MicroTime(wall));
        Some(spec)
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Tries once to take or renew the lease. `Ok(true)` when this replica holds it afterwards,
/// until [`Elector::lead_deadline`].
pub async fn try_acquire(api: &Api<Lease>, elector: &mut Elector) -> kube::Result<bool> {
    let started = Instant::now();
    let current = api.get_opt(&elector.settings.name).await?;
    let Some(spec) = elector.plan(current.as_ref(), Instant::now(), Timestamp::now()) else {
        return Ok(false);
    };
    let written = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(elector.settings.name.clone()),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            lease.spec = Some(spec);
            // replace carries the resourceVersion we read: a concurrent update makes it 409.
            api.replace(&elector.settings.name, &PostParams::default(), &lease)
                .await
        }
    };
    match written {
        Ok(lease) => {
            elector.renewed(&lease, started);
            Ok(true)
        }
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(api: &Api<Lease>, elector: &mut Elector) {
    loop {
        match try_acquire(api, elector).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "lease: could not read or update"),
        }
        tokio::time::sleep(elector.settings.retry_period).await;
    }
}

/// Renews the lease every retry period; returns as soon as this replica must stop acting:
/// another holds the lease, or the renew deadline passed without a successful renewal (an
/// attempt still in flight then is abandoned).
pub async fn hold(api: &Api<Lease>, elector: &mut Elector) {
    loop {
        let Some(deadline) = elector.lead_deadline() else {
            return;
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        let next = tokio::time::Instant::now() + elector.settings.retry_period;
        tokio::time::sleep_until(next.min(deadline)).await;
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("lease: no renewal succeeded within the renew deadline");
            return;
        }
        match tokio::time::timeout_at(deadline, try_acquire(api, elector)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) if elector.another_holds() => {
                tracing::warn!("lease: another replica holds it");
                return;
            }
            Ok(Ok(false)) => tracing::warn!("lease: renewal conflicted; retrying"),
            Ok(Err(e)) => tracing::warn!(error = %e, "lease: renewal failed"),
            Err(_) => {
                tracing::warn!("lease: no renewal succeeded within the renew deadline");
                return;
            }
        }
    }
}

/// Gives the lease up if this replica holds it, so that a standby takes over at once. Call
/// only once this replica has stopped acting. `Ok(false)`: it was not ours (or changed under
/// us), nothing was written.
pub async fn release(api: &Api<Lease>, elector: &mut Elector) -> kube::Result<bool> {
    let Some(mut lease) = api.get_opt(&elector.settings.name).await? else {
        elector.renewed_at = None;
        return Ok(false);
    };
    let Some(spec) = elector.release(&lease, Timestamp::now()) else {
        return Ok(false);
    };
    lease.spec = Some(spec);
    match api
        .replace(&elector.settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn settings(identity: &str) -> LeaseSettings {
        LeaseSettings::new("crac-operator", identity)
    }

    /// The API server's part, in memory: a Lease with a resourceVersion that every write
    /// bumps, and updates that must carry the version read.
    #[derive(Default)]
    struct Server {
        lease: Option<Lease>,
        version: u64,
    }

    impl Server {
        fn get(&self) -> Option<Lease> {
            self.lease.clone()
        }

        fn write(&mut self, read: Option<&Lease>, spec: LeaseSpec) -> Option<Lease> {
            let read_version = read.and_then(|l| l.metadata.resource_version.clone());
            let current_version = self
                .lease
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone());
            if read_version != current_version {
                return None; // 409
            }
            self.version += 1;
            self.lease = Some(Lease {
                metadata: ObjectMeta {
                    name: Some("crac-operator".into()),
                    resource_version: Some(self.version.to_string()),
                    ..Default::default()
                },
                spec: Some(spec),
            });
            self.lease.clone()
        }
    }

    /// One replica: its election state and its wall clock, `skew` away from true time.
    struct Replica {
        elector: Elector,
        skew: SignedDuration,
    }

    impl Replica {
        fn new(identity: &str, skew_secs: i64) -> Self {
            Replica {
                elector: Elector::new(settings(identity)),
                skew: SignedDuration::from_secs(skew_secs),
            }
        }

        /// [`try_acquire`], against the in-memory server, at `now`; `reachable: false` is an
        /// attempt whose requests fail.
        fn attempt(
            &mut self,
            server: &mut Server,
            now: Instant,
            t0: Timestamp,
            t: Duration,
            reachable: bool,
        ) -> bool {
            if !reachable {
                return false;
            }
            let wall = t0 + SignedDuration::try_from(t).unwrap() + self.skew;
            let current = server.get();
            let Some(spec) = self.elector.plan(current.as_ref(), now, wall) else {
                return false;
            };
            match server.write(current.as_ref(), spec) {
                Some(written) => {
                    self.elector.renewed(&written, now);
                    true
                }
                None => false,
            }
        }
    }

    /// Runs `replicas` against one server for `secs` seconds in 100 ms steps, each replica
    /// trying every retry period (staggered), and checks at every step that at most one of
    /// them may act. `reachable(i, t)` says whether replica `i`'s requests at `t` succeed.
    /// Returns, per replica, the times (in ms) at which it newly started leading.
    fn simulate(
        replicas: &mut [Replica],
        secs: u64,
        reachable: impl Fn(usize, u64) -> bool,
    ) -> Vec<Vec<u64>> {
        let mut server = Server::default();
        let start = Instant::now();
        let t0 = Timestamp::now();
        let mut took = vec![Vec::new(); replicas.len()];
        for ms in (0..secs * 1000).step_by(100) {
            let t = Duration::from_millis(ms);
            let now = start + t;
            for (i, r) in replicas.iter_mut().enumerate() {
                let retry = r.elector.settings.retry_period.as_millis() as u64;
                // Staggered so that the replicas do not always try in the same order.
                if (ms + 300 * i as u64).is_multiple_of(retry) {
                    let was = r.elector.is_leading(now);
                    if r.attempt(&mut server, now, t0, t, reachable(i, ms)) && !was {
                        took[i].push(ms);
                    }
                }
            }
            let leading: Vec<usize> = (0..replicas.len())
                .filter(|i| replicas[*i].elector.is_leading(now))
                .collect();
            assert!(leading.len() <= 1, "two leaders at {ms} ms: {leading:?}");
        }
        took
    }

    #[test]
    fn skewed_wall_clocks_never_give_two_leaders() {
        // One replica's clock an hour behind, one an hour ahead: by the old rule (renewTime +
        // duration < my wall clock) the one ahead would take the lease from a live leader at
        // once, and the one behind would wait an hour for a dead one.
        for skews in [[-3600, 3600], [3600, -3600], [0, 86_400], [-86_400, 0]] {
            let mut replicas = [Replica::new("a", skews[0]), Replica::new("b", skews[1])];
            let took = simulate(&mut replicas, 60, |_, _| true);
            let total: usize = took.iter().map(Vec::len).sum();
            assert_eq!(
                total, 1,
                "{skews:?}: one leader, never taken over: {took:?}"
            );
        }
    }

    #[test]
    fn a_dead_leader_is_replaced_one_lease_duration_after_its_last_renewal_was_seen() {
        // "a" leads, then its requests all fail from 10 s on (a partition; it keeps running).
        // "b" takes over whatever the clocks say, and never while "a" may still act (the
        // simulation checks that at every step).
        let mut replicas = [Replica::new("a", 3600), Replica::new("b", -3600)];
        let took = simulate(&mut replicas, 60, |i, ms| i == 1 || ms < 10_000);
        assert_eq!(took[0], vec![0]);
        let [b_took] = took[1][..] else {
            panic!("b should take over once: {took:?}")
        };
        // a's last renewal was sent at 10 s less one retry period at most; b last saw the
        // record change then and waits out the 15 s lease duration on its own clock.
        assert!((23_000..=27_000).contains(&b_took), "b took at {b_took} ms");
    }

    #[test]
    fn a_leader_whose_renewals_fail_stops_acting_at_its_renew_deadline() {
        let start = Instant::now();
        let mut a = Elector::new(settings("a"));
        let spec = a.plan(None, start, Timestamp::now()).unwrap();
        let mut server = Server::default();
        let written = server.write(None, spec).unwrap();
        a.renewed(&written, start);
        assert!(a.is_leading(start + Duration::from_millis(9_999)));
        assert!(
            !a.is_leading(start + Duration::from_secs(10)),
            "renew deadline"
        );
        // Another replica, reading the same record the instant it was written, could take it
        // only at start + 15 s: by then "a" has stopped for 5 s.
        let mut b = Elector::new(settings("b"));
        assert!(
            b.plan(server.get().as_ref(), start, Timestamp::now())
                .is_none()
        );
        let later = start + Duration::from_millis(14_999);
        assert!(
            b.plan(server.get().as_ref(), later, Timestamp::now())
                .is_none()
        );
        assert!(
            b.plan(
                server.get().as_ref(),
                start + Duration::from_secs(15),
                Timestamp::now()
            )
            .is_some()
        );
        assert!(
            a.lead_deadline().unwrap() + Duration::from_secs(5) <= start + Duration::from_secs(15)
        );
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let start = Instant::now();
        let mut server = Server::default();
        let (mut a, mut b) = (Elector::new(settings("a")), Elector::new(settings("b")));
        let written = server
            .write(None, a.plan(None, start, Timestamp::now()).unwrap())
            .unwrap();
        a.renewed(&written, start);
        // b is standing by: it has seen the live lease.
        let t1 = start + Duration::from_secs(1);
        assert!(
            b.plan(server.get().as_ref(), t1, Timestamp::now())
                .is_none()
        );
        // a shuts down and releases it.
        let current = server.get().unwrap();
        let released = a.release(&current, Timestamp::now()).unwrap();
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_duration_seconds, Some(1));
        assert!(!a.is_leading(t1), "a stops leading when it releases");
        server.write(Some(&current), released).unwrap();
        // b's next try, one retry period later, takes it: no lease duration to wait.
        let t2 = t1 + Duration::from_secs(2);
        let current = server.get();
        let spec = b.plan(current.as_ref(), t2, Timestamp::now()).unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        let written = server.write(current.as_ref(), spec).unwrap();
        b.renewed(&written, t2);
        assert!(b.is_leading(t2));
        // A lease that is no longer ours is not released.
        assert!(a.release(&written, Timestamp::now()).is_none());
    }

    #[test]
    fn a_live_lease_of_another_is_respected_and_ours_is_renewed() {
        let start = Instant::now();
        let mut server = Server::default();
        let (mut a, mut b) = (Elector::new(settings("a")), Elector::new(settings("b")));
        let written = server
            .write(None, a.plan(None, start, Timestamp::now()).unwrap())
            .unwrap();
        a.renewed(&written, start);
        // a renews every 2 s; b keeps seeing a new record and never takes it.
        for step in 1..30 {
            let now = start + Duration::from_secs(2 * step);
            let current = server.get();
            assert!(
                b.plan(current.as_ref(), now, Timestamp::now()).is_none(),
                "step {step}"
            );
            assert!(b.another_holds());
            let spec = a.plan(current.as_ref(), now, Timestamp::now()).unwrap();
            assert_eq!(
                spec.lease_transitions,
                Some(0),
                "a renewal is no transition"
            );
            let written = server.write(current.as_ref(), spec).unwrap();
            a.renewed(&written, now);
            assert!(a.is_leading(now));
        }
        // Two candidates that read the same record: only the first write wins.
        let mut server = Server::default();
        let later = start + Duration::from_secs(100);
        let (mut a, mut b) = (Elector::new(settings("a")), Elector::new(settings("b")));
        let spec_a = a.plan(None, later, Timestamp::now()).unwrap();
        let spec_b = b.plan(None, later, Timestamp::now()).unwrap();
        assert!(server.write(None, spec_a).is_some());
        assert!(server.write(None, spec_b).is_none());
    }
}
