//! The External Secrets Operator phase: ESO out of cluster, in namespaces of its own
//! (`<run>-e-*`), with a ClusterSecretStore (vault, token auth with a token tagged
//! `<run>-eso`) and N ExternalSecrets; measured as the keyhaven phase is.

mod files;

pub use files::{ESO_VERSION, EsoFiles, eso_files};

use crate::observe::{http_get, metric_sum};
use crate::operator::Operator;
use crate::phase::{Contender, Names};
use crate::run::{Figures, Run};
use crate::setup::{RUN_LABEL, WHO_LABEL, apply, delete_namespaces, kv_path, namespace};
use files::ensure_eso_crds;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::{Api, Client};
use serde_json::json;
use std::process::Command;
use std::time::Duration;

/// An external-secrets.io/v1 kind.
pub fn eso_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("external-secrets.io", "v1", kind),
        plural,
    )
}

fn cluster_secret_stores(client: &Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &eso_resource("ClusterSecretStore", "clustersecretstores"),
    )
}

/// Deletes the ClusterSecretStore `name`, if there.
pub async fn delete_store(client: &Client, name: &str) {
    let _ = cluster_secret_stores(client)
        .delete(name, &DeleteParams::default())
        .await;
}

/// Whether an ESO object's status has the condition `Ready=True`.
fn eso_ready(o: &DynamicObject) -> bool {
    o.data["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// A free TCP port on loopback (for ESO's metrics, which logs only the address it was given).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// ESO, reading the run's ClusterSecretStore `<run>-eso`.
pub struct Eso<'a> {
    files: &'a EsoFiles,
    store: String,
}

impl Eso<'_> {
    pub fn new<'a>(run: &Run, files: &'a EsoFiles) -> Eso<'a> {
        Eso {
            files,
            store: format!("{}-eso", run.id),
        }
    }

    /// ESO's controller (its root command) with the bench's concurrency and no client-side
    /// rate limit (like kube-rs); the reconcilers the bench does not use are off.
    fn command(&self, run: &Run, metrics_addr: &str) -> Command {
        let mut command = Command::new(&self.files.bin);
        command
            .arg(format!("--concurrent={}", run.args.concurrency))
            .arg(format!("--metrics-addr={metrics_addr}"))
            .arg("--enable-leader-election=false")
            .arg("--enable-cluster-external-secret-reconciler=false")
            .arg("--enable-push-secret-reconciler=false")
            .arg("--enable-cluster-push-secret-reconciler=false")
            // client-go builds no rate limiter when QPS <= 0: no client-side throttling, as
            // kube-rs has none (ESO's defaults are QPS 50, burst 100).
            .arg("--client-qps=-1")
            .arg("--client-burst=1000")
            .arg("--loglevel=info")
            // A clean environment: Vault's Go client would otherwise take the bed's
            // VAULT_TOKEN (root) and use it instead of the store's tagged token.
            .env_clear()
            .env("KUBECONFIG", &run.bed.kubeconfig)
            .env(
                "HOME",
                std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
            )
            .env("PATH", "/usr/local/bin:/usr/bin:/bin");
        command
    }
}

impl Contender for Eso<'_> {
    const NAMES: Names = Names::new("eso", "ESO", "e", "eso", "ExternalSecrets");

    async fn install(&self, run: &Run, op_ns: &str) -> anyhow::Result<()> {
        ensure_eso_crds(&run.client, &self.files.crds).await?;
        apply(
            &cluster_secret_stores(&run.client),
            &self.store,
            json!({
                "apiVersion": "external-secrets.io/v1", "kind": "ClusterSecretStore",
                "metadata": {"name": self.store, "labels": {RUN_LABEL: run.id}},
                "spec": {"provider": {"vault": {
                    "server": run.bed.vault_addr, "path": "secret", "version": "v2",
                    "auth": {"tokenSecretRef": {"name": "bench-vault-token", "namespace": op_ns, "key": "token"}}}}}
            }),
        )
        .await
    }

    /// Starts ESO and waits until it serves its metrics and reports the store Ready, i.e.
    /// its caches are synced and it validated the store against OpenBao.
    async fn start(&self, run: &Run) -> anyhow::Result<(Operator, String)> {
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let log = std::env::temp_dir().join(format!("keyhaven-bench-{}-eso.log", run.id));
        let command = self.command(run, &metrics_addr);
        let mut op = Operator::spawn(command, &self.files.bin, log)?;
        let stores = cluster_secret_stores(&run.client);
        let (store, addr) = (&self.store, &metrics_addr);
        let wait = Duration::from_millis(250);
        op.wait_for("ESO", Duration::from_secs(300), wait, async |op| {
            let ready = stores.get_opt(store).await?.is_some_and(|s| eso_ready(&s));
            if ready && let Some((200, _)) = http_get(addr, "/metrics").await {
                return Ok(Ok(()));
            }
            Ok(Err(format!(
                "ESO is not ready (ClusterSecretStore {store} Ready: {ready}); its log: {}",
                op.log().display()
            )))
        })
        .await?;
        Ok((op, metrics_addr))
    }

    async fn apply(&self, run: &Run, i: usize) -> anyhow::Result<()> {
        let (id, args) = (&run.id, &run.args);
        let ns = namespace(id, Self::NAMES.letter, i, args.namespaces);
        let external_secrets = eso_resource("ExternalSecret", "externalsecrets");
        let name = format!("s-{i}");
        apply(
            &Api::<DynamicObject>::namespaced_with(run.client.clone(), &ns, &external_secrets),
            &name,
            json!({
                "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
                "metadata": {"name": name, "namespace": ns, "labels": {RUN_LABEL: id}},
                "spec": {
                    "refreshInterval": format!("{}s", args.refresh),
                    "secretStoreRef": {"kind": "ClusterSecretStore", "name": self.store},
                    "target": {"name": name, "template": {"metadata": {
                        "labels": {RUN_LABEL: id, WHO_LABEL: Self::NAMES.who}}}},
                    "data": [{"secretKey": "value",
                        "remoteRef": {"key": kv_path(id, i), "property": "value"}}]}
            }),
        )
        .await
    }

    /// Waits until every ExternalSecret of the run reports `Ready=True` (ESO's equivalent
    /// of keyhaven's recorded version).
    async fn wait_synced(
        &self,
        run: &Run,
        _updated: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let api: Api<DynamicObject> = Api::all_with(
            run.client.clone(),
            &eso_resource("ExternalSecret", "externalsecrets"),
        );
        let lp = ListParams::default().labels(&format!("{RUN_LABEL}={}", run.id));
        run.wait_all_done(timeout, "ExternalSecrets are Ready", async || {
            let list = api.list(&lp).await?;
            Ok(list.items.iter().filter(|e| eso_ready(e)).count())
        })
        .await
    }

    async fn finish(&self, f: &mut Figures, _op: &Operator, metrics: &str) {
        if let Some((200, text)) = http_get(metrics, "/metrics").await {
            // Counters: whole numbers (and never "-0" when a family has no sample yet).
            let count = |name: &str, filter: &str| metric_sum(&text, name, filter) as u64;
            let syncs = count("externalsecret_sync_calls_total", "");
            let errors = count("externalsecret_sync_calls_error", "");
            let vault = count(
                "externalsecret_provider_api_calls_count",
                "provider=\"HashiCorp/Vault\"",
            );
            let api = count("rest_client_requests_total", "");
            f.note = format!(
                "{syncs} ExternalSecret reconciles, {errors} errors; {vault} Vault provider calls; \
                 {api} API requests of its own over the run (rest_client_requests_total)"
            );
        }
    }

    /// Nothing while ESO runs: it puts no finalizers on ExternalSecrets or stores, and
    /// running it would only recreate Secrets in terminating namespaces.
    async fn release(&self, _run: &Run, _namespaces: &[String]) {}

    async fn remove(&self, run: &Run, namespaces: &[String]) {
        delete_namespaces(&run.client, namespaces).await;
        delete_store(&run.client, &self.store).await;
    }
}
