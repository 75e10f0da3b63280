//! Set-up and clean-up: the names and labels a run gives things, server-side apply, the
//! bench namespaces, keyhaven's CRDs and the tagged OpenBao tokens.

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};
use vaultrs::client::VaultClient;

/// Label on everything a run makes (Secrets, ManagedSecrets, namespaces, stores, profiles).
pub const RUN_LABEL: &str = "bench.keyhaven.io/run";
/// Who made a native Secret: `keyhaven`, `limit` or `eso`.
pub const WHO_LABEL: &str = "bench.keyhaven.io/who";
const FIELD_MANAGER: &str = "keyhaven-bench";

/// Secret `i`'s path in OpenBao's KV v2 mount `secret`.
pub fn kv_path(run: &str, i: usize) -> String {
    format!("bench/{run}/s-{i}")
}

/// Secret `i`'s value at `generation`.
pub fn value(run: &str, i: usize, generation: u32) -> String {
    format!("{run}-value-{i}-g{generation}")
}

/// The namespace of secret `i` of `who` (`k`, `l` or `e`).
pub fn namespace(run: &str, who: &str, i: usize, namespaces: usize) -> String {
    format!("{run}-{who}-{}", i % namespaces)
}

/// Runs `f` over `items`, `concurrency` at a time; the first error stops it.
pub async fn concurrently<T, F, Fut>(items: Vec<T>, concurrency: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    stream::iter(items.into_iter().map(f))
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Server-side applies `object` as `name` (the bench's field manager, forced).
pub async fn apply<K, P>(api: &Api<K>, name: &str, object: P) -> anyhow::Result<()>
where
    K: Clone + DeserializeOwned + Debug,
    P: Serialize + Debug,
{
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

pub async fn create_namespaces(client: &Client, names: &[String], run: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    concurrently(names.to_vec(), 16, |name| {
        let api = api.clone();
        async move {
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {RUN_LABEL: run, "keyhaven.io/e2e": "true"}}
            }))?;
            match api.create(&PostParams::default(), &ns).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await
}

pub async fn delete_namespaces(client: &Client, names: &[String]) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = concurrently(names.to_vec(), 16, |name| {
        let api = api.clone();
        async move {
            let _ = api.delete(&name, &DeleteParams::default()).await;
            Ok(())
        }
    })
    .await;
}

/// Waits (up to `timeout`) until none of `names` exists.
pub async fn wait_namespaces_gone(client: &Client, names: &[String], timeout: Duration) -> bool {
    let api: Api<Namespace> = Api::all(client.clone());
    let start = Instant::now();
    while start.elapsed() < timeout {
        let mut left = 0;
        for n in names {
            if matches!(api.get_opt(n).await, Ok(Some(_))) {
                left += 1;
            }
        }
        if left == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    false
}

/// Installs keyhaven's CRDs as this build defines them: a bed that holds another build's
/// (an older bench run) is brought to this one, so the operator's fields are never pruned.
pub async fn ensure_crds(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in keyhaven::api::crds() {
        let name = crd.name_any();
        apply(&api, &name, &crd).await?;
    }
    Ok(())
}

/// A child token of `root` whose metadata `bench=<tag>` tells its requests apart in the
/// audit log.
pub async fn tagged_token(root: &VaultClient, tag: &str) -> anyhow::Result<String> {
    use vaultrs::api::token::requests::CreateTokenRequest;
    let auth = vaultrs::token::new(
        root,
        Some(
            CreateTokenRequest::builder()
                .policies(vec!["root".to_owned()])
                .ttl("4h")
                .renewable(true)
                .display_name(format!("bench-{tag}"))
                .meta(HashMap::from([("bench".to_owned(), tag.to_owned())])),
        ),
    )
    .await?;
    Ok(auth.client_token)
}

/// The Secret `bench-vault-token` (key `token`) in `namespace`, which a store reads.
pub async fn create_token_secret(
    client: &Client,
    namespace: &str,
    token: &str,
) -> anyhow::Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bench-vault-token", "namespace": namespace},
        "stringData": {"token": token}
    }))?;
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}
