//! The keyhaven phase: a scoped `keyhaven run` (the release binary), a vault SecretStore with
//! token auth, a VaultProfile and N ManagedSecrets (fromStore).

use crate::observe::{http_get, metric_sum};
use crate::operator::Operator;
use crate::phase::{Contender, Names};
use crate::run::{Figures, Run};
use crate::setup::{
    RUN_LABEL, WHO_LABEL, apply, delete_namespaces, kv_path, namespace, wait_namespaces_gone,
};
use keyhaven::api::{ManagedSecret, SecretStore, VaultProfile};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::fmt::Debug;
use std::process::Command;
use std::time::Duration;

/// keyhaven, reading the run's SecretStore `<run>-vault` through the VaultProfile `<run>`.
pub struct Keyhaven {
    store: String,
}

impl Keyhaven {
    pub fn new(run: &Run) -> Keyhaven {
        Keyhaven {
            store: format!("{}-vault", run.id),
        }
    }
}

/// Server-side applies the cluster-scoped keyhaven object `name` with `spec` and the run's
/// label.
async fn apply_labelled<K>(run: &Run, name: &str, spec: Value) -> anyhow::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let object = json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "metadata": {"name": name, "labels": {RUN_LABEL: run.id}},
        "spec": spec
    });
    apply(&Api::<K>::all(run.client.clone()), name, object).await
}

impl Contender for Keyhaven {
    const NAMES: Names = Names::new("keyhaven", "keyhaven", "k", "op", "ManagedSecrets");

    async fn install(&self, run: &Run, op_ns: &str) -> anyhow::Result<()> {
        let store = &self.store;
        let vault = json!({
            "server": run.bed.vault_addr, "mount": "secret", "version": "v2",
            "requestTimeout": "30s", "insecureHTTP": true,
            "auth": {"tokenSecretRef": {"name": "bench-vault-token", "namespace": op_ns, "key": "token"}}});
        apply_labelled::<SecretStore>(run, store, json!({"provider": {"vault": vault}})).await?;
        // The values live where ESO and the limit read them too (`bench/<run>/s-<i>`), not
        // in per-namespace spaces: this single-tenant run turns isolation off.
        let profile = json!({"source": store, "syncTargets": [],
            "secretSpace": {"isolation": "Disabled"}});
        apply_labelled::<VaultProfile>(run, &run.id, profile).await
    }

    async fn start(&self, run: &Run) -> anyhow::Result<(Operator, String)> {
        let (id, args) = (&run.id, &run.args);
        let bin = match &args.operator_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?.with_file_name("keyhaven"),
        };
        let log = std::env::temp_dir().join(format!("keyhaven-bench-{id}.log"));
        let selector = format!("{RUN_LABEL}={id}");
        let mut command = Command::new(&bin);
        command
            .args(["run", "--namespace", &format!("{id}-op")])
            .args(["--store-selector", &selector])
            .args(["--managed-selector", &selector])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--concurrency", &args.concurrency.to_string()])
            .env("KUBECONFIG", &run.bed.kubeconfig)
            .env_remove("KEYHAVEN_LOG");
        let mut op = Operator::spawn(command, &bin, log)?;
        // Its /metrics address, once it listens and reports ready.
        let wait = Duration::from_millis(100);
        let addr = op
            .wait_for("the operator", Duration::from_secs(120), wait, async |op| {
                let text = op.log_text();
                let addr = text
                    .lines()
                    .rev()
                    .find(|l| l.contains("metrics and probes listening"))
                    .and_then(|l| l.split("address=").nth(1))
                    .and_then(|a| a.split_whitespace().next())
                    .map(|a| a.trim_matches('"').to_owned());
                if let Some(addr) = addr
                    && let Some((200, _)) = http_get(&addr, "/readyz").await
                {
                    return Ok(Ok(addr));
                }
                Ok(Err("the operator is not ready".to_owned()))
            })
            .await?;
        Ok((op, addr))
    }

    async fn apply(&self, run: &Run, i: usize) -> anyhow::Result<()> {
        let (id, args) = (&run.id, &run.args);
        let ns = namespace(id, Self::NAMES.letter, i, args.namespaces);
        let name = format!("s-{i}");
        apply(
            &Api::<ManagedSecret>::namespaced(run.client.clone(), &ns),
            &name,
            json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                "metadata": {"name": name, "namespace": ns, "labels": {RUN_LABEL: id}},
                "spec": {"profile": id, "type": "generic", "path": kv_path(id, i),
                    "content": {"fromStore": {}}, "refreshInterval": format!("{}s", args.refresh),
                    "target": {"labels": {RUN_LABEL: id, WHO_LABEL: Self::NAMES.who}}}
            }),
        )
        .await
    }

    /// Waits until every ManagedSecret of the run records the version its value has (2 for
    /// `updated`, else 1).
    async fn wait_synced(
        &self,
        run: &Run,
        updated: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let api: Api<ManagedSecret> = Api::all(run.client.clone());
        let lp = ListParams::default().labels(&format!("{RUN_LABEL}={}", run.id));
        let what = "ManagedSecrets record their version";
        run.wait_all_done(timeout, what, async || {
            let list = api.list(&lp).await?;
            let done = list
                .items
                .iter()
                .filter(|m| {
                    let i: usize = m
                        .name_any()
                        .trim_start_matches("s-")
                        .parse()
                        .unwrap_or(usize::MAX);
                    let want = if updated.contains(&i) { 2 } else { 1 };
                    m.status.as_ref().is_some_and(|s| {
                        s.current_version == Some(want) && s.phase.is_some_and(|p| p == "Synced")
                    })
                })
                .count();
            Ok(done)
        })
        .await
    }

    async fn finish(&self, f: &mut Figures, op: &Operator, metrics: &str) {
        // Logins: the audit log (token lookups), else the operator's log.
        let log_logins = op.log_text().matches("logged in to Vault").count() as u64;
        f.logins = f.logins.or(Some(log_logins));
        if let Some((200, text)) = http_get(metrics, "/metrics").await {
            let reconciles =
                metric_sum(&text, "keyhaven_reconciles_total", "kind=\"ManagedSecret\"");
            let errors = metric_sum(
                &text,
                "keyhaven_reconcile_errors_total",
                "kind=\"ManagedSecret\"",
            );
            f.note = format!(
                "{reconciles} ManagedSecret reconciles, {errors} errors; {log_logins} login(s) in its log",
                reconciles = reconciles as u64,
                errors = errors as u64
            );
        }
    }

    /// The namespaces, then the profile and store, while the operator runs: it releases
    /// its finalizers on them.
    async fn release(&self, run: &Run, namespaces: &[String]) {
        let client = &run.client;
        delete_namespaces(client, namespaces).await;
        if !wait_namespaces_gone(client, namespaces, Duration::from_secs(600)).await {
            eprintln!("keyhaven: some bench namespaces are still terminating");
        }
        let _ = Api::<VaultProfile>::all(client.clone())
            .delete(&run.id, &DeleteParams::default())
            .await;
        let _ = Api::<SecretStore>::all(client.clone())
            .delete(&self.store, &DeleteParams::default())
            .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    async fn remove(&self, _run: &Run, _namespaces: &[String]) {}
}
