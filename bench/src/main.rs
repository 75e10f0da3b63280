//! keyhaven-bench: keyhaven at scale on the test bed, beside "the limit" (a bare kube-rs +
//! vaultrs client doing the same work with the same concurrency, no operator) and External
//! Secrets Operator (ESO).
//!
//! ```sh
//! e2e/testbed up
//! cargo build --release -p keyhaven --bin keyhaven -p keyhaven-bench
//! cargo run --release -p keyhaven-bench -- --n 1000
//! ```
//!
//! For N secrets it seeds N objects in OpenBao KV v2 under a unique prefix, starts a scoped
//! `keyhaven run` (release binary), applies N ManagedSecrets (fromStore) across
//! `--namespaces` namespaces, and times until every native Secret holds the right value
//! (read back through a watch, then checked again with one LIST); changes 10 % of the values
//! in OpenBao and times until they are all materialized; lets `--quiet-intervals` refresh
//! intervals pass and counts what the operator wrote to the API server (resourceVersions
//! of its Secrets and ManagedSecrets, Events in the bench namespaces) and the requests and
//! logins it made to OpenBao (the audit log, by token metadata); records its peak and
//! steady RSS and CPU seconds from /proc. Then it runs the limit as a child process
//! (`--limit-worker`), then ESO v0.16.2 out of cluster (the binary `e2e/testbed build-eso`
//! caches; its CRDs from the Go module cache) with N ExternalSecrets measured the same way,
//! and prints one table. Everything it made is deleted at the end (ESO's CRDs stay).

use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Event, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keyhaven::api::{ManagedSecret, SecretStore, VaultProfile};
use keyhaven::backend::object_id;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// Label on everything a run makes (Secrets, ManagedSecrets, namespaces, stores, profiles).
const RUN_LABEL: &str = "bench.keyhaven.io/run";
/// Who made a native Secret: `keyhaven`, `limit` or `eso`.
const WHO_LABEL: &str = "bench.keyhaven.io/who";
const FIELD_MANAGER: &str = "keyhaven-bench";
/// The External Secrets Operator release the test bed builds (`e2e/testbed build-eso`, from
/// the wrapper module `e2e/gomod/external-secrets`).
const ESO_VERSION: &str = "v0.16.2";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "keyhaven-bench",
    about = "keyhaven vs the limit (bare kube-rs + vaultrs) vs External Secrets Operator on the test bed"
)]
struct Args {
    /// Secrets (ManagedSecrets, OpenBao objects, native Secrets).
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Namespaces the ManagedSecrets are spread across.
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Reconciles at once (keyhaven --concurrency) and requests in flight (the limit).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The ManagedSecrets' refreshInterval, in seconds.
    #[arg(long, default_value_t = 30)]
    refresh: u64,
    /// Unchanged refresh intervals to watch for writes.
    #[arg(long, default_value_t = 3)]
    quiet_intervals: u32,
    /// The operator binary (default: target/release/keyhaven next to this one).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Skip the limit run.
    #[arg(long)]
    no_limit: bool,
    /// Skip the keyhaven run.
    #[arg(long)]
    no_keyhaven: bool,
    /// Skip the External Secrets Operator run.
    #[arg(long)]
    no_eso: bool,
    /// The ESO binary (default: the test bed's cache,
    /// ~/.cache/keyhaven/bin/external-secrets-v0.16.2/external-secrets).
    #[arg(long)]
    eso_bin: Option<PathBuf>,
    /// ESO's CRD directory (default: config/crds/bases of the module in `go env GOMODCACHE`).
    #[arg(long)]
    eso_crds: Option<PathBuf>,
    /// Append the results (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Leave everything in place (no cleanup).
    #[arg(long)]
    keep: bool,
    /// Internal: run as the limit's worker for this run id.
    #[arg(long, hide = true)]
    limit_worker: Option<String>,
}

/// The test bed, from the environment or `e2e/.testbed/env`.
#[derive(Clone, Debug)]
struct Bed {
    kubeconfig: PathBuf,
    vault_addr: String,
    vault_token: String,
    audit_log: Option<PathBuf>,
    /// Directories the env file puts on PATH (kubectl).
    path: String,
    /// The bed's state directory (its servers' pid files).
    dir: PathBuf,
}

impl Bed {
    fn load() -> anyhow::Result<Bed> {
        let dir = std::env::var_os("KEYHAVEN_TESTBED_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                // The checkout: the parent of bench/.
                let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
                bench.parent().unwrap_or(bench).join("e2e/.testbed")
            });
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        let mut path_dirs = vec![];
        if let Ok(text) = std::fs::read_to_string(dir.join("env")) {
            for line in text.lines().map(str::trim) {
                let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('='))
                else {
                    continue;
                };
                let v = v.trim_matches(|c| c == '\'' || c == '"').to_owned();
                if k == "PATH" {
                    path_dirs.push(v.trim_end_matches(":$PATH").to_owned());
                } else {
                    vars.insert(k.to_owned(), v);
                }
            }
        }
        let get = |k: &str| std::env::var(k).ok().or_else(|| vars.get(k).cloned());
        let need = |k: &str| {
            get(k).ok_or_else(|| {
                anyhow::anyhow!(
                    "{k} is not set and {}/env does not say it: run e2e/testbed up",
                    dir.display()
                )
            })
        };
        path_dirs.push(std::env::var("PATH").unwrap_or_default());
        Ok(Bed {
            kubeconfig: need("KUBECONFIG")?.into(),
            vault_addr: need("VAULT_ADDR")?,
            vault_token: need("VAULT_TOKEN")?,
            audit_log: get("KEYHAVEN_OPENBAO_AUDIT_LOG").map(PathBuf::from),
            path: path_dirs.join(":"),
            dir,
        })
    }

    /// CPU seconds the bed's servers have used so far: kube-apiserver, etcd, OpenBao.
    fn servers_cpu(&self) -> ServersCpu {
        let cpu = |name: &str| {
            std::fs::read_to_string(self.dir.join(format!("pids/{name}.pid")))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .map(|pid| proc_stats(pid).cpu_secs)
        };
        ServersCpu([cpu("kube-apiserver"), cpu("etcd"), cpu("openbao")])
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        // Thousands of requests in flight: no client-side throttling beyond the semaphore.
        config.read_timeout = Some(Duration::from_secs(60));
        Ok(Client::try_from(config)?)
    }

    fn vault(&self, token: &str) -> anyhow::Result<VaultClient> {
        let settings = VaultClientSettingsBuilder::default()
            .address(&self.vault_addr)
            .token(token)
            .build()?;
        Ok(VaultClient::new(settings)?)
    }
}

fn kv_path(run: &str, i: usize) -> String {
    format!("bench/{run}/s-{i}")
}

fn value(run: &str, i: usize, generation: u32) -> String {
    format!("{run}-value-{i}-g{generation}")
}

fn namespace(run: &str, who: &str, i: usize, namespaces: usize) -> String {
    format!("{run}-{who}-{}", i % namespaces)
}

/// Runs `f` over `items`, `concurrency` at a time; the first error stops it.
async fn concurrently<T, F, Fut>(items: Vec<T>, concurrency: usize, f: F) -> anyhow::Result<()>
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

// ---------------------------------------------------------------------------------------
// Observing: native Secrets through a watch, the operator through /proc, OpenBao through
// its audit log, the API server through its /metrics.
// ---------------------------------------------------------------------------------------

/// The `value` key of every Secret labelled `selector`, kept current by a watch.
struct SecretWatch {
    seen: Arc<Mutex<HashMap<(String, String), String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SecretWatch {
    async fn start(client: &Client, selector: &str) -> SecretWatch {
        let seen: Arc<Mutex<HashMap<(String, String), String>>> = Arc::default();
        let api: Api<Secret> = Api::all(client.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let map = seen.clone();
        let stream = watcher(api, watcher::Config::default().labels(selector));
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream.default_backoff());
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        let v = s
                            .data
                            .as_ref()
                            .and_then(|d| d.get("value"))
                            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                            .unwrap_or_default();
                        map.lock()
                            .unwrap()
                            .insert((s.namespace().unwrap_or_default(), s.name_any()), v);
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        map.lock()
                            .unwrap()
                            .remove(&(s.namespace().unwrap_or_default(), s.name_any()));
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(watcher::Event::Init) => {}
                    Err(e) => eprintln!("  (secret watch: {e})"),
                }
            }
        });
        let _ = ready_rx.await;
        SecretWatch { seen, task }
    }

    /// How many of `expected` hold their value now.
    fn matching(&self, expected: &HashMap<(String, String), String>) -> usize {
        let seen = self.seen.lock().unwrap();
        expected
            .iter()
            .filter(|(k, v)| seen.get(*k) == Some(*v))
            .count()
    }

    /// Waits until every Secret of `expected` holds its value; the time since `start`.
    async fn wait_all(
        &self,
        expected: &HashMap<(String, String), String>,
        start: Instant,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<Duration> {
        let mut last_report = Instant::now();
        loop {
            let ok = self.matching(expected);
            if ok == expected.len() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "{what}: only {ok} of {} Secrets right after {timeout:?}",
                    expected.len()
                );
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!(
                    "  {what}: {ok}/{} after {:.0}s",
                    expected.len(),
                    start.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SecretWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads every Secret labelled `selector` once (one paged LIST) and checks `expected`.
async fn verify_by_list(
    client: &Client,
    selector: &str,
    expected: &HashMap<(String, String), String>,
) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::all(client.clone());
    let mut found = HashMap::new();
    let mut lp = ListParams::default().labels(selector).limit(2000);
    loop {
        let page = api.list(&lp).await?;
        for s in page.items {
            let v = s
                .data
                .as_ref()
                .and_then(|d| d.get("value"))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default();
            found.insert((s.namespace().unwrap_or_default(), s.name_any()), v);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    let wrong = expected
        .iter()
        .filter(|(k, v)| found.get(*k) != Some(*v))
        .count();
    anyhow::ensure!(
        wrong == 0,
        "{wrong} of {} Secrets do not hold the expected value",
        expected.len()
    );
    Ok(())
}

/// Memory and CPU of a process, from /proc.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
struct ProcStats {
    hwm_kib: u64,
    rss_kib: u64,
    cpu_secs: f64,
}

fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    ProcStats {
        hwm_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
        cpu_secs: (ticks(11) + ticks(12)) as f64 / 100.0,
    }
}

/// CPU seconds of kube-apiserver, etcd and OpenBao.
#[derive(Default, Debug, Clone, Copy)]
struct ServersCpu([Option<f64>; 3]);

impl ServersCpu {
    /// What the servers used since `before`.
    fn since(self, before: ServersCpu) -> ServersCpu {
        let mut d = [None; 3];
        for (i, slot) in d.iter_mut().enumerate() {
            if let (Some(a), Some(b)) = (self.0[i], before.0[i]) {
                *slot = Some(a - b);
            }
        }
        ServersCpu(d)
    }

    fn show(&self) -> String {
        let c = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.1}"));
        format!("{} / {} / {}", c(self.0[0]), c(self.0[1]), c(self.0[2]))
    }
}

/// OpenBao's audit log: requests made with tokens whose metadata `bench` is a tag.
struct Audit {
    path: Option<PathBuf>,
}

#[derive(Default, Debug, Clone, Copy)]
struct AuditCount {
    requests: u64,
    logins: u64,
}

impl Audit {
    fn mark(&self) -> u64 {
        self.path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len())
    }

    /// Requests since `mark` by the token tagged `tag`; logins are token lookups (how a
    /// token-auth session logs in) and `auth/*/login` calls.
    fn count(&self, mark: u64, tag: &str) -> Option<AuditCount> {
        let path = self.path.as_ref()?;
        let mut file = std::fs::File::open(path).ok()?;
        file.seek(SeekFrom::Start(mark)).ok()?;
        let mut bytes = vec![];
        file.read_to_end(&mut bytes).ok()?;
        let mut c = AuditCount::default();
        for line in String::from_utf8_lossy(&bytes).lines() {
            let Ok(e) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if e["type"] != "request" || e["auth"]["metadata"]["bench"] != tag {
                continue;
            }
            c.requests += 1;
            let p = e["request"]["path"].as_str().unwrap_or_default();
            if p == "auth/token/lookup-self" || (p.starts_with("auth/") && p.ends_with("/login")) {
                c.logins += 1;
            }
        }
        Some(c)
    }
}

/// The API server's request counters (from `kubectl get --raw /metrics`): (reads, writes)
/// summed over every client, WATCH excluded.
fn apiserver_requests(bed: &Bed) -> Option<(u64, u64)> {
    let out = Command::new("kubectl")
        .args(["get", "--raw", "/metrics"])
        .env("KUBECONFIG", &bed.kubeconfig)
        .env("PATH", &bed.path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let (mut reads, mut writes) = (0u64, 0u64);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, n)) = rest.rsplit_once("} ") else {
            continue;
        };
        let n: f64 = n.trim().parse().unwrap_or(0.0);
        let verb = labels
            .split(',')
            .find_map(|l| l.strip_prefix("verb=\""))
            .map(|v| v.trim_end_matches('"'))
            .unwrap_or_default();
        match verb {
            "GET" | "LIST" => reads += n as u64,
            "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION" => {
                writes += n as u64
            }
            _ => {}
        }
    }
    Some((reads, writes))
}

/// resourceVersions of the objects a run's operator (`who`: keyhaven or eso) writes: its
/// native Secrets, its own kind (ManagedSecrets or ExternalSecrets: a status rewrite
/// counts) and the Events of its namespaces.
async fn resource_versions(
    client: &Client,
    run: &str,
    who: &str,
    namespaces: &[String],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let secrets = ListParams::default().labels(&format!("{RUN_LABEL}={run},{WHO_LABEL}={who}"));
    let owned = ListParams::default().labels(&format!("{RUN_LABEL}={run}"));
    record_versions(
        &mut out,
        "Secret",
        Api::<Secret>::all(client.clone())
            .list_metadata(&secrets)
            .await?,
    );
    if who == "eso" {
        let ar = eso_resource("ExternalSecret", "externalsecrets");
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        record_versions(&mut out, "ExternalSecret", api.list_metadata(&owned).await?);
    } else {
        let api = Api::<ManagedSecret>::all(client.clone());
        record_versions(&mut out, "ManagedSecret", api.list_metadata(&owned).await?);
    }
    for ns in namespaces {
        let api = Api::<Event>::namespaced(client.clone(), ns);
        record_versions(
            &mut out,
            "Event",
            api.list_metadata(&ListParams::default()).await?,
        );
    }
    Ok(out)
}

/// Adds `kind/namespace/name → resourceVersion` of each object to `out`.
fn record_versions<K: kube::Resource>(
    out: &mut BTreeMap<String, String>,
    kind: &str,
    objects: impl IntoIterator<Item = K>,
) {
    for o in objects {
        out.insert(
            format!(
                "{kind}/{}/{}",
                o.namespace().unwrap_or_default(),
                o.name_any()
            ),
            o.resource_version().unwrap_or_default(),
        );
    }
}

/// Objects created or changed between two snapshots.
fn writes_between(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> usize {
    after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .count()
}

/// A GET over plain HTTP (the operator's /metrics and /readyz).
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = vec![];
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// The sum of a Prometheus counter family's samples whose line contains `filter`.
fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

// ---------------------------------------------------------------------------------------
// Set-up and clean-up
// ---------------------------------------------------------------------------------------

async fn create_namespaces(client: &Client, names: &[String], run: &str) -> anyhow::Result<()> {
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

async fn delete_namespaces(client: &Client, names: &[String]) {
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
async fn wait_namespaces_gone(client: &Client, names: &[String], timeout: Duration) -> bool {
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

/// Installs keyhaven's CRDs when the bed does not have them yet.
async fn ensure_crds(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in keyhaven::api::crds() {
        let name = crd.name_any();
        if api.get_opt(&name).await?.is_none() {
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await?;
        }
    }
    Ok(())
}

/// A child token of `root` whose metadata `bench=<tag>` tells its requests apart in the
/// audit log.
async fn tagged_token(root: &VaultClient, tag: &str) -> anyhow::Result<String> {
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

// ---------------------------------------------------------------------------------------
// External Secrets Operator: where its binary and CRDs are, its objects
// ---------------------------------------------------------------------------------------

/// An external-secrets.io/v1 kind.
fn eso_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("external-secrets.io", "v1", kind),
        plural,
    )
}

/// ESO's binary and CRD directory, found.
struct EsoFiles {
    bin: PathBuf,
    crds: PathBuf,
}

/// The test bed's binary cache, as `e2e/testbed` computes it.
fn keyhaven_cache() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("KEYHAVEN_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("keyhaven")))
        .unwrap_or_else(|| {
            var("HOME")
                .unwrap_or_else(|| PathBuf::from("/root"))
                .join(".cache/keyhaven")
        })
}

/// The Go module cache: `go env GOMODCACHE`, else $GOMODCACHE, $GOPATH/pkg/mod, ~/go/pkg/mod.
fn go_mod_cache(bed: &Bed) -> Option<PathBuf> {
    let out = Command::new("go")
        .args(["env", "GOMODCACHE"])
        .env("PATH", &bed.path)
        .env("GOTOOLCHAIN", "local")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = out
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !dir.is_empty() {
            return Some(dir.into());
        }
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("GOMODCACHE")
        .or_else(|| {
            std::env::var("GOPATH").ok().and_then(|p| {
                p.split(':')
                    .find(|d| !d.is_empty())
                    .map(|d| Path::new(d).join("pkg/mod"))
            })
        })
        .or_else(|| var("HOME").map(|h| h.join("go/pkg/mod")))
}

/// ESO's binary and CRDs, or why the ESO phase cannot run (and how to fix it).
fn eso_files(args: &Args, bed: &Bed) -> Result<EsoFiles, String> {
    let bin = args.eso_bin.clone().unwrap_or_else(|| {
        keyhaven_cache().join(format!(
            "bin/external-secrets-{ESO_VERSION}/external-secrets"
        ))
    });
    if !bin.is_file() {
        return Err(format!(
            "no ESO binary at {}: build it once with `e2e/testbed build-eso` (about 30 min on \
             2 cores; cached afterwards) or pass --eso-bin",
            bin.display()
        ));
    }
    let crds = args.eso_crds.clone().or_else(|| {
        go_mod_cache(bed).map(|m| {
            m.join(format!(
                "github.com/external-secrets/external-secrets@{ESO_VERSION}/config/crds/bases"
            ))
        })
    });
    match crds {
        Some(crds)
            if crds
                .join("external-secrets.io_externalsecrets.yaml")
                .is_file() =>
        {
            Ok(EsoFiles { bin, crds })
        }
        other => Err(format!(
            "ESO's CRDs are not at {}: `e2e/testbed build-eso` downloads them into the Go \
             module cache (or pass --eso-crds DIR)",
            other.map_or("<no Go module cache>".into(), |d| d.display().to_string())
        )),
    }
}

/// Installs ESO's CRDs (every `*.yaml` CustomResourceDefinition in `dir`) with server-side
/// apply when the bed does not have them, and waits until all are Established.
async fn ensure_eso_crds(client: &Client, dir: &Path) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut names = vec![];
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let crd =
                Value::deserialize(doc).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if crd["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let name = crd["metadata"]["name"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("{}: a CRD without a name", file.display()))?
                .to_owned();
            if api.get_opt(&name).await?.is_none() {
                eprintln!("ESO: installing CRD {name}");
                api.patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&crd),
                )
                .await?;
            }
            names.push(name);
        }
    }
    anyhow::ensure!(!names.is_empty(), "no CRDs in {}", dir.display());
    let start = Instant::now();
    for name in &names {
        loop {
            let established = api.get_opt(name).await?.is_some_and(|c| {
                c.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "CRD {name} is not Established"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
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

/// The operator process, killed when dropped.
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn start(bed: &Bed, bin: &Path, run: &str, concurrency: usize) -> anyhow::Result<Operator> {
        let log = std::env::temp_dir().join(format!("keyhaven-bench-{run}.log"));
        let file = std::fs::File::create(&log)?;
        let selector = format!("{RUN_LABEL}={run}");
        let child = Command::new(bin)
            .args(["run", "--namespace", &format!("{run}-op")])
            .args(["--store-selector", &selector])
            .args(["--managed-selector", &selector])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--concurrency", &concurrency.to_string()])
            .env("KUBECONFIG", &bed.kubeconfig)
            .env_remove("KEYHAVEN_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| anyhow::anyhow!("start {}: {e}", bin.display()))?;
        Ok(Operator { child, log })
    }

    /// External Secrets Operator's controller (its root command), out of cluster, with the
    /// bench's concurrency and no client-side rate limit (like kube-rs); the reconcilers the
    /// bench does not use are off.
    fn start_eso(
        bed: &Bed,
        bin: &Path,
        run: &str,
        concurrency: usize,
        metrics_addr: &str,
    ) -> anyhow::Result<Operator> {
        let log = std::env::temp_dir().join(format!("keyhaven-bench-{run}-eso.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg(format!("--concurrent={concurrency}"))
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
            .env("KUBECONFIG", &bed.kubeconfig)
            .env(
                "HOME",
                std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
            )
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| anyhow::anyhow!("start {}: {e}", bin.display()))?;
        Ok(Operator { child, log })
    }

    /// Waits until ESO serves its metrics and reports `store` (a ClusterSecretStore) Ready,
    /// i.e. its caches are synced and it validated the store against OpenBao.
    async fn wait_eso_ready(
        &mut self,
        stores: &Api<DynamicObject>,
        store: &str,
        metrics_addr: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!(
                    "ESO exited ({status}); its log {}:\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
            let ready = stores.get_opt(store).await?.is_some_and(|s| eso_ready(&s));
            if ready && let Some((200, _)) = http_get(metrics_addr, "/metrics").await {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "ESO is not ready (ClusterSecretStore {store} Ready: {ready}); its log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its /metrics address, once it listens and reports ready.
    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!(
                    "the operator exited ({status}); its log {}:\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
            let text = self.log_text();
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
                return Ok(addr);
            }
            anyhow::ensure!(start.elapsed() < timeout, "the operator is not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The runs
// ---------------------------------------------------------------------------------------

#[derive(Default, Debug, Clone)]
struct Figures {
    converge: Option<Duration>,
    update: Option<Duration>,
    quiet_api_writes: Option<usize>,
    quiet_vault_requests: Option<u64>,
    converge_vault_requests: Option<u64>,
    logins: Option<u64>,
    peak_rss_kib: Option<u64>,
    steady_rss_kib: Option<u64>,
    converge_cpu: Option<f64>,
    /// The bed's servers' CPU seconds while converging.
    servers_cpu: ServersCpu,
    total_cpu: Option<f64>,
    api_requests_per_secret: Option<f64>,
    note: String,
}

struct Run {
    args: Args,
    bed: Bed,
    client: Client,
    root: VaultClient,
    id: String,
    audit: Audit,
}

impl Run {
    fn expected(&self, who: &str, updated: &[usize]) -> HashMap<(String, String), String> {
        self.expected_at(who, updated, 2)
    }

    /// The values in OpenBao when every value of `updated` is at `generation`, the others at 1.
    fn expected_at(
        &self,
        who: &str,
        updated: &[usize],
        generation: u32,
    ) -> HashMap<(String, String), String> {
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

    fn namespaces(&self, who: &str) -> Vec<String> {
        (0..self.args.namespaces.min(self.args.n))
            .map(|k| format!("{}-{who}-{k}", self.id))
            .collect()
    }

    async fn seed(&self) -> anyhow::Result<()> {
        self.write_values((0..self.args.n).collect(), 1).await
    }

    /// Writes `generation` of the values of secrets `indices` in OpenBao, 32 at a time.
    async fn write_values(&self, indices: Vec<usize>, generation: u32) -> anyhow::Result<()> {
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
    fn api_requests_per_secret(&self, before: Option<(u64, u64)>) -> Option<f64> {
        let (r0, w0) = before?;
        let (r1, w1) = apiserver_requests(&self.bed)?;
        let n = self.args.n as u64;
        let total = (r1 + w1).saturating_sub(r0 + w0).saturating_sub(n);
        Some(total as f64 / n as f64)
    }

    /// The quiet phase: --quiet-intervals refresh intervals with nothing changed; the API
    /// writes of `who`, the OpenBao requests of its token `tag`, then its RSS and CPU.
    async fn quiet(
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

    async fn keyhaven(&self) -> anyhow::Result<Figures> {
        let mut f = Figures::default();
        let (run, client, args) = (&self.id, &self.client, &self.args);
        let op_ns = format!("{run}-op");
        let namespaces = self.namespaces("k");
        create_namespaces(
            client,
            &[vec![op_ns.clone()], namespaces.clone()].concat(),
            run,
        )
        .await?;
        let token = tagged_token(&self.root, &format!("{run}-op")).await?;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "bench-vault-token", "namespace": op_ns},
            "stringData": {"token": token}
        }))?;
        Api::<Secret>::namespaced(client.clone(), &op_ns)
            .create(&PostParams::default(), &secret)
            .await?;
        let store = format!("{run}-vault");
        let labels = json!({RUN_LABEL: run});
        Api::<SecretStore>::all(client.clone())
            .patch(
                &store,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretStore",
                    "metadata": {"name": store, "labels": labels},
                    "spec": {"provider": {"vault": {
                        "server": self.bed.vault_addr, "mount": "secret", "version": "v2",
                        "requestTimeout": "30s",
                        "auth": {"tokenSecretRef": {"name": "bench-vault-token", "namespace": op_ns, "key": "token"}}}}}
                })),
            )
            .await?;
        Api::<VaultProfile>::all(client.clone())
            .patch(
                run,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
                    "metadata": {"name": run, "labels": labels},
                    "spec": {"source": store, "syncTargets": []}
                })),
            )
            .await?;

        let bin = match &args.operator_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?.with_file_name("keyhaven"),
        };
        let run_mark = self.audit.mark();
        let mut op = Operator::start(&self.bed, &bin, run, args.concurrency)?;
        let metrics_addr = op.wait_ready(Duration::from_secs(120)).await?;
        eprintln!(
            "keyhaven: operator pid {} ready (log {}), {} ManagedSecrets across {} namespaces",
            op.pid(),
            op.log.display(),
            args.n,
            namespaces.len()
        );

        // Converge.
        let selector = format!("{RUN_LABEL}={run},{WHO_LABEL}=keyhaven");
        let watch = SecretWatch::start(client, &selector).await;
        let expected = self.expected("k", &[]);
        let api_before = apiserver_requests(&self.bed);
        let mark = self.audit.mark();
        let cpu0 = proc_stats(op.pid()).cpu_secs;
        let servers0 = self.bed.servers_cpu();
        let start = Instant::now();
        let refresh = format!("{}s", args.refresh);
        concurrently((0..args.n).collect(), args.concurrency, |i| {
            let ns = namespace(run, "k", i, args.namespaces);
            let client = client.clone();
            let refresh = refresh.clone();
            async move {
                let name = format!("s-{i}");
                Api::<ManagedSecret>::namespaced(client, &ns)
                    .patch(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(json!({
                            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                            "metadata": {"name": name, "namespace": ns, "labels": {RUN_LABEL: run}},
                            "spec": {"profile": run, "type": "generic", "path": kv_path(run, i),
                                "content": {"fromStore": {}}, "refreshInterval": refresh,
                                "target": {"labels": {RUN_LABEL: run, WHO_LABEL: "keyhaven"}}}
                        })),
                    )
                    .await?;
                Ok(())
            }
        })
        .await?;
        let applied = start.elapsed();
        let timeout = Duration::from_secs(args.timeout);
        f.converge = Some(
            watch
                .wait_all(&expected, start, timeout, "keyhaven converge")
                .await?,
        );
        f.converge_cpu = Some(proc_stats(op.pid()).cpu_secs - cpu0);
        f.servers_cpu = self.bed.servers_cpu().since(servers0);
        verify_by_list(client, &selector, &expected).await?;
        eprintln!(
            "keyhaven: {} Secrets right after {:.2}s (ManagedSecrets applied in {:.2}s)",
            args.n,
            f.converge.unwrap().as_secs_f64(),
            applied.as_secs_f64()
        );
        // Every status recorded (version 1) before anything changes.
        self.wait_statuses(&[], timeout).await?;
        f.api_requests_per_secret = self.api_requests_per_secret(api_before);
        f.converge_vault_requests = self
            .audit
            .count(mark, &format!("{run}-op"))
            .map(|c| c.requests);

        // Update 10 %.
        let updated: Vec<usize> = (0..args.n).step_by(10).collect();
        let expected = self.expected("k", &updated);
        let start = Instant::now();
        self.write_values(updated.clone(), 2).await?;
        f.update = Some(
            watch
                .wait_all(&expected, start, timeout, "keyhaven update")
                .await?,
        );
        verify_by_list(client, &selector, &expected).await?;
        self.wait_statuses(&updated, timeout).await?;
        eprintln!(
            "keyhaven: {} changed values materialized after {:.2}s",
            updated.len(),
            f.update.unwrap().as_secs_f64()
        );
        drop(watch);

        self.quiet(
            &mut f,
            "keyhaven",
            &format!("{run}-op"),
            &namespaces,
            op.pid(),
        )
        .await?;
        // Logins over the whole run: the audit log (token lookups), and the operator's log.
        let log_logins = op.log_text().matches("logged in to Vault").count() as u64;
        let audit_logins = self
            .audit
            .count(run_mark, &format!("{run}-op"))
            .map(|c| c.logins);
        f.logins = audit_logins.or(Some(log_logins));
        if let Some((200, text)) = http_get(&metrics_addr, "/metrics").await {
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

        // Clean-up while the operator runs (it releases its finalizers).
        if !args.keep {
            delete_namespaces(client, &namespaces).await;
            if !wait_namespaces_gone(client, &namespaces, Duration::from_secs(600)).await {
                eprintln!("keyhaven: some bench namespaces are still terminating");
            }
        }
        if !args.keep {
            // The profile and store too, while the operator runs: it holds finalizers on them.
            let _ = Api::<VaultProfile>::all(client.clone())
                .delete(run, &DeleteParams::default())
                .await;
            let _ = Api::<SecretStore>::all(client.clone())
                .delete(&store, &DeleteParams::default())
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        op.stop();
        if !args.keep {
            delete_namespaces(client, &[op_ns]).await;
            let _ = vaultrs::token::revoke(&self.root, &token).await;
        }
        Ok(f)
    }

    /// Waits until every ManagedSecret of the run records the version its value has.
    async fn wait_statuses(&self, updated: &[usize], timeout: Duration) -> anyhow::Result<()> {
        let api: Api<ManagedSecret> = Api::all(self.client.clone());
        let lp = ListParams::default().labels(&format!("{RUN_LABEL}={}", self.id));
        let start = Instant::now();
        loop {
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
                        s.current_version == Some(want) && s.phase.as_deref() == Some("Synced")
                    })
                })
                .count();
            if done == self.args.n {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "only {done} of {} ManagedSecrets record their version",
                self.args.n
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn limit(&self) -> anyhow::Result<Figures> {
        let mut f = Figures::default();
        let (run, client, args) = (&self.id, &self.client, &self.args);
        let namespaces = self.namespaces("l");
        create_namespaces(client, &namespaces, run).await?;
        let token = tagged_token(&self.root, &format!("{run}-limit")).await?;
        let selector = format!("{RUN_LABEL}={run},{WHO_LABEL}=limit");
        let watch = SecretWatch::start(client, &selector).await;
        // The keyhaven run changed every tenth value in OpenBao.
        let updated: Vec<usize> = if args.no_keyhaven {
            vec![]
        } else {
            (0..args.n).step_by(10).collect()
        };
        let expected = self.expected("l", &updated);
        let mark = self.audit.mark();
        let servers0 = self.bed.servers_cpu();
        let start = Instant::now();
        let child = Command::new(std::env::current_exe()?)
            .args(["--limit-worker", run])
            .args(["--n", &args.n.to_string()])
            .args(["--namespaces", &args.namespaces.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .env("KUBECONFIG", &self.bed.kubeconfig)
            .env("VAULT_ADDR", &self.bed.vault_addr)
            .env("VAULT_TOKEN", &token)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .stdout(Stdio::piped())
            .spawn()?;
        let timeout = Duration::from_secs(args.timeout);
        f.converge = Some(
            watch
                .wait_all(&expected, start, timeout, "limit converge")
                .await?,
        );
        f.servers_cpu = self.bed.servers_cpu().since(servers0);
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        anyhow::ensure!(out.status.success(), "the limit worker failed");
        verify_by_list(client, &selector, &expected).await?;
        let stats: ProcStats = serde_json::from_slice(&out.stdout)?;
        f.peak_rss_kib = Some(stats.hwm_kib);
        f.steady_rss_kib = None;
        f.converge_cpu = Some(stats.cpu_secs);
        f.total_cpu = Some(stats.cpu_secs);
        f.api_requests_per_secret = Some(1.0);
        let audit = self.audit.count(mark, &format!("{run}-limit"));
        f.converge_vault_requests = audit.map(|c| c.requests);
        f.logins = Some(0);
        eprintln!(
            "limit: {} Secrets right after {:.2}s",
            args.n,
            f.converge.unwrap().as_secs_f64()
        );
        if !args.keep {
            delete_namespaces(client, &namespaces).await;
            let _ = vaultrs::token::revoke(&self.root, &token).await;
        }
        Ok(f)
    }

    /// External Secrets Operator, out of cluster, in namespaces of its own (`<run>-e-*`), with
    /// a ClusterSecretStore (vault, token auth with a token tagged `<run>-eso`) and N
    /// ExternalSecrets; measured as the keyhaven phase is. `base` is the generation every
    /// tenth value has in OpenBao when it starts (2 after the keyhaven phase); its own 10 %
    /// change moves them to `base + 1`.
    async fn eso(&self, files: &EsoFiles, base: u32) -> anyhow::Result<Figures> {
        let mut f = Figures::default();
        let (run, client, args) = (&self.id, &self.client, &self.args);
        let tag = format!("{run}-eso");
        let op_ns = format!("{run}-eso");
        let namespaces = self.namespaces("e");
        ensure_eso_crds(client, &files.crds).await?;
        create_namespaces(
            client,
            &[vec![op_ns.clone()], namespaces.clone()].concat(),
            run,
        )
        .await?;
        let token = tagged_token(&self.root, &tag).await?;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "bench-vault-token", "namespace": op_ns},
            "stringData": {"token": token}
        }))?;
        Api::<Secret>::namespaced(client.clone(), &op_ns)
            .create(&PostParams::default(), &secret)
            .await?;
        let store = format!("{run}-eso");
        let stores: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &eso_resource("ClusterSecretStore", "clustersecretstores"),
        );
        stores
            .patch(
                &store,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "external-secrets.io/v1", "kind": "ClusterSecretStore",
                    "metadata": {"name": store, "labels": {RUN_LABEL: run}},
                    "spec": {"provider": {"vault": {
                        "server": self.bed.vault_addr, "path": "secret", "version": "v2",
                        "auth": {"tokenSecretRef": {"name": "bench-vault-token", "namespace": op_ns, "key": "token"}}}}}
                })),
            )
            .await?;

        let run_mark = self.audit.mark();
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let mut op =
            Operator::start_eso(&self.bed, &files.bin, run, args.concurrency, &metrics_addr)?;
        op.wait_eso_ready(&stores, &store, &metrics_addr, Duration::from_secs(300))
            .await?;
        eprintln!(
            "ESO: pid {} ready (log {}), {} ExternalSecrets across {} namespaces",
            op.pid(),
            op.log.display(),
            args.n,
            namespaces.len()
        );

        // Converge: the values OpenBao holds now (every tenth at `base`).
        let selector = format!("{RUN_LABEL}={run},{WHO_LABEL}=eso");
        let watch = SecretWatch::start(client, &selector).await;
        let updated: Vec<usize> = (0..args.n).step_by(10).collect();
        let expected = self.expected_at("e", &updated, base);
        let api_before = apiserver_requests(&self.bed);
        let mark = self.audit.mark();
        let cpu0 = proc_stats(op.pid()).cpu_secs;
        let servers0 = self.bed.servers_cpu();
        let start = Instant::now();
        let refresh = format!("{}s", args.refresh);
        let external_secrets = eso_resource("ExternalSecret", "externalsecrets");
        concurrently((0..args.n).collect(), args.concurrency, |i| {
            let ns = namespace(run, "e", i, args.namespaces);
            let api = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &external_secrets);
            let (refresh, store) = (refresh.clone(), store.clone());
            async move {
                let name = format!("s-{i}");
                api.patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(json!({
                        "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
                        "metadata": {"name": name, "namespace": ns, "labels": {RUN_LABEL: run}},
                        "spec": {
                            "refreshInterval": refresh,
                            "secretStoreRef": {"kind": "ClusterSecretStore", "name": store},
                            "target": {"name": name, "template": {"metadata": {
                                "labels": {RUN_LABEL: run, WHO_LABEL: "eso"}}}},
                            "data": [{"secretKey": "value",
                                "remoteRef": {"key": kv_path(run, i), "property": "value"}}]}
                    })),
                )
                .await?;
                Ok(())
            }
        })
        .await?;
        let applied = start.elapsed();
        let timeout = Duration::from_secs(args.timeout);
        f.converge = Some(
            watch
                .wait_all(&expected, start, timeout, "ESO converge")
                .await?,
        );
        f.converge_cpu = Some(proc_stats(op.pid()).cpu_secs - cpu0);
        f.servers_cpu = self.bed.servers_cpu().since(servers0);
        verify_by_list(client, &selector, &expected).await?;
        eprintln!(
            "ESO: {} Secrets right after {:.2}s (ExternalSecrets applied in {:.2}s)",
            args.n,
            f.converge.unwrap().as_secs_f64(),
            applied.as_secs_f64()
        );
        // Every status Ready (ESO's equivalent of keyhaven's recorded version).
        self.wait_eso_synced(timeout).await?;
        f.api_requests_per_secret = self.api_requests_per_secret(api_before);
        f.converge_vault_requests = self.audit.count(mark, &tag).map(|c| c.requests);

        // Update 10 %: every tenth value to the next generation; ESO sees it when it refreshes.
        let generation = base + 1;
        let expected = self.expected_at("e", &updated, generation);
        let start = Instant::now();
        self.write_values(updated.clone(), generation).await?;
        f.update = Some(
            watch
                .wait_all(&expected, start, timeout, "ESO update")
                .await?,
        );
        verify_by_list(client, &selector, &expected).await?;
        self.wait_eso_synced(timeout).await?;
        eprintln!(
            "ESO: {} changed values materialized after {:.2}s",
            updated.len(),
            f.update.unwrap().as_secs_f64()
        );
        drop(watch);

        self.quiet(&mut f, "eso", &tag, &namespaces, op.pid())
            .await?;
        // Logins over the whole run: token lookups and auth/*/login calls of its token.
        f.logins = self.audit.count(run_mark, &tag).map(|c| c.logins);
        if let Some((200, text)) = http_get(&metrics_addr, "/metrics").await {
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

        // Clean-up after ESO stops: it puts no finalizers on ExternalSecrets or stores, and
        // running it would only recreate Secrets in terminating namespaces.
        op.stop();
        if !args.keep {
            delete_namespaces(client, &[namespaces, vec![op_ns]].concat()).await;
            let _ = stores.delete(&store, &DeleteParams::default()).await;
            let _ = vaultrs::token::revoke(&self.root, &token).await;
        }
        Ok(f)
    }

    /// Waits until every ExternalSecret of the run reports `Ready=True`.
    async fn wait_eso_synced(&self, timeout: Duration) -> anyhow::Result<()> {
        let api: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &eso_resource("ExternalSecret", "externalsecrets"),
        );
        let lp = ListParams::default().labels(&format!("{RUN_LABEL}={}", self.id));
        let start = Instant::now();
        loop {
            let done = api
                .list(&lp)
                .await?
                .items
                .iter()
                .filter(|e| eso_ready(e))
                .count();
            if done == self.args.n {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < timeout,
                "only {done} of {} ExternalSecrets are Ready",
                self.args.n
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn cleanup_vault(&self) {
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

/// The limit: read N values from OpenBao and create N Secrets, `--concurrency` at a time.
/// Prints its own /proc figures as JSON on stdout.
async fn limit_worker(args: &Args, run: &str) -> anyhow::Result<()> {
    let bed = Bed::load()?;
    let client = bed.client().await?;
    let vault = bed.vault(&bed.vault_token)?;
    let (client, vault) = (&client, &vault);
    concurrently((0..args.n).collect(), args.concurrency, |i| async move {
        let data: HashMap<String, String> =
            vaultrs::kv2::read(vault, "secret", &kv_path(run, i)).await?;
        let ns = namespace(run, "l", i, args.namespaces);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("s-{i}"), "namespace": ns,
                "labels": {RUN_LABEL: run, WHO_LABEL: "limit"}},
            "stringData": data,
        }))?;
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    })
    .await?;
    let stats = proc_stats(std::process::id());
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------

fn secs(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn mib(k: Option<u64>) -> String {
    k.map_or("–".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn num<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("–".into(), |v| v.to_string())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// One markdown table: keyhaven, the limit, ESO, and keyhaven's ratios to both. `e` is
/// None when ESO did not run (`not_run` says why in one or two words).
fn table(args: &Args, k: &Figures, l: &Figures, e: Option<&Figures>, not_run: &str) -> String {
    let d = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let kf = |v: Option<u64>| v.map(|v| v as f64);
    let uf = |v: Option<usize>| v.map(|v| v as f64);
    let o = e.cloned().unwrap_or_default();
    let cpu = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.2}"));
    let per = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
    // [what, keyhaven, limit, keyhaven / limit, ESO, keyhaven / ESO, target]
    let rows: Vec<[String; 7]> = vec![
        [
            format!("time to converge {} Secrets", args.n),
            secs(k.converge),
            secs(l.converge),
            ratio(d(k.converge), d(l.converge)),
            secs(o.converge),
            ratio(d(k.converge), d(o.converge)),
            "≤ 1.3× the limit; ≤ 0.2× ESO (≥ 5× faster)".into(),
        ],
        [
            format!("time to materialize {} changed values", args.n / 10),
            secs(k.update),
            "–".into(),
            "–".into(),
            secs(o.update),
            ratio(d(k.update), d(o.update)),
            format!("(refreshInterval {}s ±10 %)", args.refresh),
        ],
        [
            "API requests per Secret (converge)".into(),
            per(k.api_requests_per_secret),
            per(l.api_requests_per_secret),
            ratio(k.api_requests_per_secret, l.api_requests_per_secret),
            per(o.api_requests_per_secret),
            ratio(k.api_requests_per_secret, o.api_requests_per_secret),
            "".into(),
        ],
        [
            "OpenBao requests (converge)".into(),
            num(k.converge_vault_requests),
            num(l.converge_vault_requests),
            ratio(kf(k.converge_vault_requests), kf(l.converge_vault_requests)),
            num(o.converge_vault_requests),
            ratio(kf(k.converge_vault_requests), kf(o.converge_vault_requests)),
            "".into(),
        ],
        [
            format!(
                "API writes in {} unchanged refresh intervals",
                args.quiet_intervals
            ),
            num(k.quiet_api_writes),
            "–".into(),
            "–".into(),
            num(o.quiet_api_writes),
            ratio(uf(k.quiet_api_writes), uf(o.quiet_api_writes)),
            "0".into(),
        ],
        [
            format!(
                "OpenBao requests in {} unchanged refresh intervals",
                args.quiet_intervals
            ),
            num(k.quiet_vault_requests),
            "–".into(),
            "–".into(),
            num(o.quiet_vault_requests),
            ratio(kf(k.quiet_vault_requests), kf(o.quiet_vault_requests)),
            "".into(),
        ],
        [
            "OpenBao logins".into(),
            num(k.logins),
            num(l.logins),
            "–".into(),
            num(o.logins),
            "–".into(),
            "1 per store".into(),
        ],
        [
            "peak RSS (VmHWM)".into(),
            mib(k.peak_rss_kib),
            mib(l.peak_rss_kib),
            ratio(kf(k.peak_rss_kib), kf(l.peak_rss_kib)),
            mib(o.peak_rss_kib),
            ratio(kf(k.peak_rss_kib), kf(o.peak_rss_kib)),
            "≤ 0.25× ESO".into(),
        ],
        [
            "steady RSS (VmRSS, after the quiet intervals)".into(),
            mib(k.steady_rss_kib),
            "–".into(),
            "–".into(),
            mib(o.steady_rss_kib),
            ratio(kf(k.steady_rss_kib), kf(o.steady_rss_kib)),
            "≤ 48 MiB at 10,000; ≤ 0.25× ESO".into(),
        ],
        [
            "CPU seconds (converge)".into(),
            cpu(k.converge_cpu),
            cpu(l.converge_cpu),
            ratio(k.converge_cpu, l.converge_cpu),
            cpu(o.converge_cpu),
            ratio(k.converge_cpu, o.converge_cpu),
            "".into(),
        ],
        [
            "server CPU s (converge): apiserver / etcd / OpenBao".into(),
            k.servers_cpu.show(),
            l.servers_cpu.show(),
            "–".into(),
            o.servers_cpu.show(),
            "–".into(),
            "".into(),
        ],
        [
            "CPU seconds (whole run)".into(),
            cpu(k.total_cpu),
            cpu(l.total_cpu),
            "–".into(),
            cpu(o.total_cpu),
            ratio(k.total_cpu, o.total_cpu),
            "".into(),
        ],
    ];
    let mut out = format!(
        "| N = {}, concurrency {} | keyhaven | limit | keyhaven / limit | ESO {ESO_VERSION} | keyhaven / ESO | target |\n|---|---|---|---|---|---|---|\n",
        args.n, args.concurrency
    );
    for [what, kv, lv, rl, ev, re, target] in rows {
        let (ev, re) = if e.is_some() {
            (ev, re)
        } else {
            (not_run.to_owned(), "–".to_owned())
        };
        out.push_str(&format!(
            "| {what} | {kv} | {lv} | {rl} | {ev} | {re} | {target} |\n"
        ));
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keyhaven::install_crypto_provider();
    let args = Args::parse();
    if let Some(run) = args.limit_worker.clone() {
        return limit_worker(&args, &run).await;
    }
    anyhow::ensure!(
        args.n > 0 && args.namespaces > 0,
        "--n and --namespaces must be > 0"
    );
    let bed = Bed::load()?;
    let client = bed.client().await?;
    let root = bed.vault(&bed.vault_token)?;
    let id = format!("kb{:06x}", rand::random::<u32>() & 0xff_ffff);
    let run = Run {
        audit: Audit {
            path: bed.audit_log.clone(),
        },
        args: args.clone(),
        bed,
        client,
        root,
        id,
    };
    eprintln!(
        "run {}: N={}, {} namespaces, concurrency {}, refresh {}s",
        run.id, args.n, args.namespaces, args.concurrency, args.refresh
    );
    ensure_crds(&run.client).await?;
    let eso_files = if args.no_eso {
        Err("not run (--no-eso)".to_owned())
    } else {
        eso_files(&args, &run.bed)
    };
    if let Err(why) = &eso_files
        && !args.no_eso
    {
        eprintln!("ESO: not run: {why}");
    }
    let t = Instant::now();
    run.seed().await?;
    eprintln!(
        "seeded {} values in OpenBao in {:.1}s",
        args.n,
        t.elapsed().as_secs_f64()
    );
    let result = async {
        let k = if args.no_keyhaven {
            Figures::default()
        } else {
            run.keyhaven().await?
        };
        eprintln!("keyhaven figures: {k:?}");
        let l = if args.no_limit {
            Figures::default()
        } else {
            run.limit().await?
        };
        eprintln!("limit figures: {l:?}");
        // ESO last, in its own namespaces. Its failure does not lose the other figures: the
        // table is printed, then the bench exits with the error.
        let e: Result<Figures, String> = match &eso_files {
            Err(why) if args.no_eso => Err(why.clone()),
            Err(why) => Err(format!("not run: {why}")),
            Ok(files) => {
                // The keyhaven phase moved every tenth value to generation 2.
                let base = if args.no_keyhaven { 1 } else { 2 };
                run.eso(files, base).await.map_err(|err| {
                    eprintln!("ESO phase failed: {err:#}");
                    format!("failed: {err:#}")
                })
            }
        };
        if let Ok(e) = &e {
            eprintln!("ESO figures: {e:?}");
        }
        anyhow::Ok((k, l, e))
    }
    .await;
    if !args.keep {
        run.cleanup_vault().await;
        let all: Vec<String> = [
            run.namespaces("k"),
            run.namespaces("l"),
            run.namespaces("e"),
        ]
        .concat();
        let ops = vec![format!("{}-op", run.id), format!("{}-eso", run.id)];
        delete_namespaces(&run.client, &[all, ops].concat()).await;
        if eso_files.is_ok() {
            let _ = Api::<DynamicObject>::all_with(
                run.client.clone(),
                &eso_resource("ClusterSecretStore", "clustersecretstores"),
            )
            .delete(&format!("{}-eso", run.id), &DeleteParams::default())
            .await;
        }
    }
    let (k, l, e) = result?;
    let skipped: String = [
        (args.no_keyhaven, " --no-keyhaven"),
        (args.no_limit, " --no-limit"),
        (args.no_eso, " --no-eso"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, flag)| *flag)
    .collect();
    let command = format!(
        "cargo run --release -p keyhaven-bench -- --n {} --namespaces {} --concurrency {} --refresh {} --quiet-intervals {}{skipped}",
        args.n, args.namespaces, args.concurrency, args.refresh, args.quiet_intervals
    );
    let (eso_figures, not_run) = match &e {
        Ok(f) => (Some(f), ""),
        Err(why) if why.starts_with("failed") => (None, "failed"),
        Err(_) => (None, "not run"),
    };
    let mut notes = vec![];
    if !k.note.is_empty() {
        notes.push(format!("keyhaven: {}.\n", k.note));
    }
    match &e {
        Ok(f) if !f.note.is_empty() => notes.push(format!("ESO: {}.\n", f.note)),
        Ok(_) => {}
        Err(why) => notes.push(format!("ESO: {why}.\n")),
    }
    let notes = notes.join("\n");
    let text = format!(
        "### N = {} (run {}, {})\n\n`{command}`\n\n{}\n{notes}\n",
        args.n,
        run.id,
        jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC"),
        table(&args, &k, &l, eso_figures, not_run),
    );
    println!("{text}");
    if let Some(out) = &args.out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?;
        file.write_all(text.as_bytes())?;
    }
    if let Err(why) = e
        && why.starts_with("failed")
    {
        anyhow::bail!("the ESO phase {why}");
    }
    Ok(())
}
