//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! only one reconciles. Updates use the Lease's resourceVersion: two candidates cannot both
//! take it. A leader that fails to renew in time stops (the process exits and restarts as a
//! candidate) rather than risk reconciling beside a new leader.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

/// Whether `holder` may take a lease last renewed at `renewed` for `duration_s` seconds.
pub fn can_take(spec: &LeaseSpec, me: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let Some(renewed) = spec.renew_time.as_ref() else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed.0 + duration < now
}

/// Tries once to take or renew the lease. `Ok(true)` when we hold it afterwards.
pub async fn try_acquire(api: &Api<Lease>, s: &LeaseSettings) -> kube::Result<bool> {
    let now = Timestamp::now();
    let secs = i32::try_from(s.duration.as_secs()).unwrap_or(15);
    match api.get_opt(&s.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(s.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if !can_take(spec, &s.identity, now) {
                return Ok(false);
            }
            if spec.holder_identity.as_deref() != Some(&s.identity) {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.holder_identity = Some(s.identity.clone());
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(secs);
            // replace carries the resourceVersion we read: a concurrent update makes it 409.
            match api.replace(&s.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(api: &Api<Lease>, s: &LeaseSettings) {
    loop {
        match try_acquire(api, s).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "lease: could not read or update"),
        }
        tokio::time::sleep(s.renew_every).await;
    }
}

/// Renews the lease until it is lost; returns when it is.
pub async fn hold(api: &Api<Lease>, s: &LeaseSettings) {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(s.renew_every).await;
        match try_acquire(api, s).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "lease: renewal failed");
                if last_renewal.elapsed() >= s.duration {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_is_respected() {
        assert!(!can_take(&spec("other", 5), "me", Timestamp::now()));
        assert!(
            can_take(&spec("other", 30), "me", Timestamp::now()),
            "expired"
        );
        assert!(can_take(&spec("me", 5), "me", Timestamp::now()), "renewal");
        assert!(
            can_take(&LeaseSpec::default(), "me", Timestamp::now()),
            "empty"
        );
    }
}
