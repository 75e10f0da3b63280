//! One run of the bench: its id, the bed and clients it uses, the values it expects, and
//! the figures a phase records.

use crate::args::Args;
use crate::bed::{Bed, ServersCpu};
use crate::observe::{
    Audit, Values, apiserver_requests, proc_stats, resource_versions, writes_between,
};
use crate::setup::{RUN_LABEL, WHO_LABEL, concurrently, kv_path, namespace, value};
use keyhaven::backend::object_id;
use kube::Client;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use vaultrs::client::VaultClient;

/// What one phase measured (`None`: not measured).
#[derive(Default, Debug, Clone)]
pub struct Figures {
    pub converge: Option<Duration>,
    pub update: Option<Duration>,
    pub quiet_api_writes: Option<usize>,
    pub quiet_vault_requests: Option<u64>,
    pub converge_vault_requests: Option<u64>,
    pub logins: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    pub steady_rss_kib: Option<u64>,
    pub converge_cpu: Option<f64>,
    /// The bed's servers' CPU seconds while converging.
    pub servers_cpu: ServersCpu,
    pub total_cpu: Option<f64>,
    pub api_requests_per_secret: Option<f64>,
    pub note: String,
}

pub struct Run {
    pub args: Args,
    pub bed: Bed,
    pub client: Client,
    /// OpenBao with the bed's root token.
    pub root: VaultClient,
    /// `kb` and six hex digits: the prefix of everything the run makes.
    pub id: String,
    pub audit: Audit,
}

impl Run {
    pub async fn new(args: Args) -> anyhow::Result<Run> {
        let bed = Bed::load()?;
        let client = bed.client().await?;
        let root = bed.vault(&bed.vault_token)?;
        Ok(Run {
            audit: Audit {
                path: bed.audit_log.clone(),
            },
            id: format!("kb{:06x}", rand::random::<u32>() & 0xff_ffff),
            args,
            bed,
            client,
            root,
        })
    }

    /// The secrets a phase changes: every tenth.
    pub fn updated(&self) -> Vec<usize> {
        (0..self.args.n).step_by(10).collect()
    }

    /// The values in OpenBao when every value of `updated` is at `generation`, the others
    /// at 1, by the (namespace, name) of `who`'s Secrets.
    pub fn expected_at(&self, who: &str, updated: &[usize], generation: u32) -> Values {
        (0..self.args.n)
            .map(|i| {
                let generation = if updated.contains(&i) { generation } else { 1 };
                (
                    (
                        namespace(&self.id, who, i, self.args.namespaces),
                        format!("s-{i}"),
                    ),
                    value(&self.id, i, generation),
                )
            })
            .collect()
    }

    /// The namespaces of `who` (`k`, `l` or `e`).
    pub fn namespaces(&self, who: &str) -> Vec<String> {
        (0..self.args.namespaces.min(self.args.n))
            .map(|k| format!("{}-{who}-{k}", self.id))
            .collect()
    }

    /// The label selector of the native Secrets `who` makes.
    pub fn selector(&self, who: &str) -> String {
        format!("{RUN_LABEL}={},{WHO_LABEL}={who}", self.id)
    }

    pub async fn seed(&self) -> anyhow::Result<()> {
        self.write_values((0..self.args.n).collect(), 1).await
    }

    /// Writes `generation` of the values of secrets `indices` in OpenBao, 32 at a time.
    pub async fn write_values(&self, indices: Vec<usize>, generation: u32) -> anyhow::Result<()> {
        let (root, id) = (&self.root, &self.id);
        concurrently(indices, 32, |i| async move {
            let data = HashMap::from([("value", value(id, i, generation))]);
            vaultrs::kv2::set(root, "secret", &kv_path(id, i), &data).await?;
            Ok(())
        })
        .await
    }

    /// API requests per Secret since `before` (`apiserver_request_total`), minus the
    /// bench's own N applies.
    pub fn api_requests_per_secret(&self, before: Option<(u64, u64)>) -> Option<f64> {
        let (r0, w0) = before?;
        let (r1, w1) = apiserver_requests(&self.bed)?;
        let n = self.args.n as u64;
        let total = (r1 + w1).saturating_sub(r0 + w0).saturating_sub(n);
        Some(total as f64 / n as f64)
    }

    /// The quiet phase: --quiet-intervals refresh intervals with nothing changed; the API
    /// writes of `who`, the OpenBao requests of its token `tag`, then its RSS and CPU.
    pub async fn quiet(
        &self,
        f: &mut Figures,
        who: &str,
        tag: &str,
        namespaces: &[String],
        pid: u32,
    ) -> anyhow::Result<()> {
        let (run, client) = (&self.id, &self.client);
        let quiet = Duration::from_secs(self.args.refresh * self.args.quiet_intervals as u64);
        eprintln!(
            "{who}: watching {}s of unchanged refreshes",
            quiet.as_secs()
        );
        let before = resource_versions(client, run, who, namespaces).await?;
        let mark = self.audit.mark();
        tokio::time::sleep(quiet).await;
        let after = resource_versions(client, run, who, namespaces).await?;
        f.quiet_api_writes = Some(writes_between(&before, &after));
        f.quiet_vault_requests = self.audit.count(mark, tag).map(|c| c.requests);
        let stats = proc_stats(pid);
        f.peak_rss_kib = Some(stats.hwm_kib);
        f.steady_rss_kib = Some(stats.rss_kib);
        f.total_cpu = Some(stats.cpu_secs);
        Ok(())
    }

    /// Polls `done` every second until it counts all N objects; after `timeout`, fails
    /// with "only <done> of N <what>".
    pub async fn wait_all_done(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl AsyncFnMut() -> anyhow::Result<usize>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let done = done().await?;
            if done == self.args.n {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "only {done} of {} {what}",
                self.args.n
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Deletes the seeded values and keyhaven's bookkeeping of them from OpenBao.
    pub async fn cleanup_vault(&self) {
        let (root, id) = (&self.root, &self.id);
        let _ = concurrently((0..self.args.n).collect(), 32, |i| async move {
            let path = kv_path(id, i);
            let _ = vaultrs::kv2::delete_metadata(root, "secret", &path).await;
            let book = format!("keyhaven/objects/{}", object_id(&path));
            let _ = vaultrs::kv2::delete_metadata(root, "secret", &book).await;
            Ok(())
        })
        .await;
    }
}
