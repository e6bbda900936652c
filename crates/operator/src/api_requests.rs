//! Counts the operator's own requests to the API server by verb and resource, so its cost per
//! app can be told apart from the controllers' and the scheduler's (the API server's metrics
//! do not say who asked).

use crate::metrics::{Metrics, RequestLabel};
use kube::client::{Body, ClientBuilder};
use kube::{Client, Config};
use std::sync::Arc;

/// A client whose every request is counted in `metrics.api_requests`.
pub fn counted_client(config: Config, metrics: Arc<Metrics>) -> kube::Result<Client> {
    let layer = tower::util::MapRequestLayer::new(move |request: http::Request<Body>| {
        metrics
            .api_requests
            .get_or_create(&classify(request.method(), request.uri()))
            .inc();
        request
    });
    Ok(ClientBuilder::try_from(config)?.with_layer(&layer).build())
}

/// The verb and resource of a request, as the API server's RBAC and audit log name them.
pub fn classify(method: &http::Method, uri: &http::Uri) -> RequestLabel {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/… or /apis/<group>/<version>/…
    let rest: &[&str] = match segments.as_slice() {
        ["api", _, rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _, inner @ ..] if !inner.is_empty() => inner,
        other => other,
    };
    let (resource, named) = match rest {
        [] => (String::new(), false),
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
    };
    let watching = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match *method {
        http::Method::GET if watching => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PATCH => "patch",
        http::Method::PUT => "update",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    RequestLabel {
        verb: verb.into(),
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn of(method: Method, uri: &str) -> (String, String) {
        let l = classify(&method, &uri.parse().unwrap());
        (l.verb, l.resource)
    }

    #[test]
    fn requests_are_named_as_rbac_names_them() {
        let pair = |v: &str, r: &str| (v.to_string(), r.to_string());
        assert_eq!(
            of(
                Method::PATCH,
                "/apis/crac.dev/v1alpha1/namespaces/ns/cracapps/demo/status?fieldManager=x"
            ),
            pair("patch", "cracapps/status")
        );
        assert_eq!(
            of(
                Method::GET,
                "/api/v1/namespaces/ns/pods?labelSelector=a%3Db&watch=true&resourceVersion=1"
            ),
            pair("watch", "pods")
        );
        assert_eq!(
            of(Method::GET, "/api/v1/namespaces?limit=500"),
            pair("list", "namespaces")
        );
        assert_eq!(
            of(Method::GET, "/api/v1/namespaces/ns"),
            pair("get", "namespaces")
        );
        assert_eq!(
            of(Method::POST, "/apis/events.k8s.io/v1/namespaces/ns/events"),
            pair("create", "events")
        );
        assert_eq!(
            of(
                Method::PATCH,
                "/apis/apps/v1/namespaces/ns/deployments/demo"
            ),
            pair("patch", "deployments")
        );
        assert_eq!(
            of(
                Method::GET,
                "/apis/storage.k8s.io/v1/storageclasses/standard"
            ),
            pair("get", "storageclasses")
        );
    }
}
