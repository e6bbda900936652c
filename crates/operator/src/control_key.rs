//! The cluster key apps' control tokens are derived from ([`crac_api::control`]): a Secret in
//! the activator's namespace, created by the operator the first time an app sleeps in place,
//! read by the activator. Loaded once per process and kept.

use crac_api::control::{KEY_BYTES, KEY_FIELD, KEY_SECRET, MIN_KEY_BYTES};
use crac_api::labels;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};
use std::io::Read;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// The key, loaded (or created) on first use.
#[derive(Default)]
pub struct ControlKey(OnceCell<Arc<[u8]>>);

impl ControlKey {
    pub async fn get(&self, client: &Client, namespace: &str) -> Result<Arc<[u8]>, String> {
        self.0
            .get_or_try_init(|| load_or_create(client, namespace))
            .await
            .cloned()
    }
}

/// Reads the key Secret; creates it with a random key when there is none (two operators
/// racing: the loser reads the winner's).
async fn load_or_create(client: &Client, namespace: &str) -> Result<Arc<[u8]>, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(found) = api
        .get_opt(KEY_SECRET)
        .await
        .map_err(|e| format!("reading Secret {namespace}/{KEY_SECRET}: {e}"))?
    {
        return key_of(&found);
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(KEY_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some([(labels::MANAGED_BY.to_string(), labels::MANAGER.to_string())].into()),
            ..Default::default()
        },
        data: Some([(KEY_FIELD.to_string(), ByteString(random_key()?))].into()),
        immutable: Some(true),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(%namespace, secret = KEY_SECRET, "created the sleep-in-place control key");
            key_of(&created)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let found = api
                .get(KEY_SECRET)
                .await
                .map_err(|e| format!("reading Secret {namespace}/{KEY_SECRET}: {e}"))?;
            key_of(&found)
        }
        Err(e) => Err(format!("creating Secret {namespace}/{KEY_SECRET}: {e}")),
    }
}

fn key_of(secret: &Secret) -> Result<Arc<[u8]>, String> {
    let key = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY_FIELD))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    if key.len() < MIN_KEY_BYTES {
        return Err(format!(
            "Secret {KEY_SECRET}: field {KEY_FIELD:?} holds {} bytes, fewer than {MIN_KEY_BYTES}",
            key.len()
        ));
    }
    Ok(key.into())
}

fn random_key() -> Result<Vec<u8>, String> {
    let mut key = vec![0u8; KEY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(key)
}
