//! Keeps each CracScalePolicy's status saying which apps it governs. A small periodic loop
//! over the controller's caches rather than a controller: policies are few, and their status
//! is informational.

use crate::context::Context;
use crate::scale::governing_policy;
use crac_api::CracApp;
use crac_api::labels;
use crac_api::policy::{CracScalePolicy, CracScalePolicyStatus};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How many app names a policy's status lists.
const LISTED: usize = 100;

/// The status each policy should have, given every app and namespace.
pub fn statuses(
    policies: &[CracScalePolicy],
    apps: &[CracApp],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> BTreeMap<String, CracScalePolicyStatus> {
    let mut out: BTreeMap<String, CracScalePolicyStatus> = policies
        .iter()
        .map(|p| (p.name_any(), CracScalePolicyStatus::default()))
        .collect();
    let empty = BTreeMap::new();
    for app in apps {
        let ns = app.namespace().unwrap_or_default();
        let Some(policy) = governing_policy(app, namespaces.get(&ns).unwrap_or(&empty), policies)
        else {
            continue;
        };
        let status = out.entry(policy.name_any()).or_default();
        status.matched_apps += 1;
        if app
            .status
            .as_ref()
            .is_some_and(|s| s.slept_at.is_none() && s.ready_replicas > 0)
        {
            status.awake_apps += 1;
        }
        if status.apps.len() < LISTED {
            status.apps.push(format!("{ns}/{}", app.name_any()));
        }
    }
    out
}

/// Writes each policy's status where it differs from what the caches say it should be.
async fn update_once(ctx: &Context) -> kube::Result<()> {
    let caches = &ctx.caches;
    let policies = caches.policies();
    if policies.is_empty() {
        return Ok(());
    }
    let apps: Vec<CracApp> = caches
        .apps
        .state()
        .iter()
        .map(|a| CracApp::clone(a))
        .collect();
    let wanted = statuses(&policies, &apps, &caches.namespace_labels(&policies));
    let api = Api::<CracScalePolicy>::all(ctx.client.clone());
    for policy in &policies {
        let name = policy.name_any();
        let Some(status) = wanted.get(&name) else {
            continue;
        };
        if policy.status.as_ref() == Some(status) {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": "crac.dev/v1alpha1", "kind": "CracScalePolicy", "status": status
        });
        api.patch_status(
            &name,
            &PatchParams::apply(labels::MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    }
    Ok(())
}

/// Updates the policies' status every `every`, forever, from the controller's caches (so it
/// waits until the controller runs and its caches are filled); returns at once when the
/// operator watches one namespace.
pub async fn keep_status(ctx: Arc<Context>, every: Duration) {
    // An operator that reconciles one namespace sees only that namespace's apps, while a
    // policy is cluster-scoped and shared with other installs: its status would flip between
    // what each install sees. So in that mode the status is left alone (and the chart grants
    // no `cracscalepolicies/status` then).
    if ctx.namespace.is_some() {
        return;
    }
    if ctx.caches.ready().await.is_err() {
        return;
    }
    loop {
        if let Err(e) = update_once(&ctx).await {
            tracing::warn!(error = %e, "could not update CracScalePolicy status");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_app_counts_for_its_governing_policy_only() {
        let mut wide = CracScalePolicy::new("wide", Default::default());
        wide.spec.priority = 10;
        let mut shop = CracScalePolicy::new("shop", Default::default());
        shop.spec.selector = Some(
            serde_json::from_value(serde_json::json!({"matchLabels": {"team": "shop"}})).unwrap(),
        );
        let app = |name: &str, team: &str| {
            let mut a = CracApp::new(
                name,
                serde_json::from_value(serde_json::json!({"template": {}})).unwrap(),
            );
            a.metadata.namespace = Some("ns".into());
            a.metadata.labels = Some([("team".to_string(), team.to_string())].into());
            a
        };
        let apps = [app("a", "shop"), app("b", "shop"), app("c", "web")];
        let s = statuses(&[wide, shop], &apps, &BTreeMap::new());
        assert_eq!(s["shop"].matched_apps, 2);
        assert_eq!(s["shop"].apps, ["ns/a", "ns/b"]);
        assert_eq!(
            s["wide"].matched_apps, 1,
            "only the app no better policy claims"
        );
    }
}
