//! Observing: native Secrets through a watch, the operators through /proc, OpenBao through
//! its audit log, the API server through its /metrics and the objects' resourceVersions.

use crate::bed::Bed;
use crate::eso::eso_resource;
use crate::setup::{RUN_LABEL, WHO_LABEL};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Secret};
use keyhaven::api::ManagedSecret;
use kube::api::{DynamicObject, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Secrets by (namespace, name), each with its `value` key.
pub type Values = HashMap<(String, String), String>;

/// A Secret's (namespace, name) and its `value` key (empty when it has none).
fn secret_value(s: &Secret) -> ((String, String), String) {
    let v = s
        .data
        .as_ref()
        .and_then(|d| d.get("value"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default();
    ((s.namespace().unwrap_or_default(), s.name_any()), v)
}

/// The `value` key of every Secret labelled `selector`, kept current by a watch.
pub struct SecretWatch {
    seen: Arc<Mutex<Values>>,
    task: tokio::task::JoinHandle<()>,
}

impl SecretWatch {
    pub async fn start(client: &Client, selector: &str) -> SecretWatch {
        let seen: Arc<Mutex<Values>> = Arc::default();
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
                        let (key, v) = secret_value(&s);
                        map.lock().unwrap().insert(key, v);
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        map.lock().unwrap().remove(&secret_value(&s).0);
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
    fn matching(&self, expected: &Values) -> usize {
        let seen = self.seen.lock().unwrap();
        expected
            .iter()
            .filter(|(k, v)| seen.get(*k) == Some(*v))
            .count()
    }

    /// Waits until every Secret of `expected` holds its value; the time since `start`.
    pub async fn wait_all(
        &self,
        expected: &Values,
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
pub async fn verify_by_list(
    client: &Client,
    selector: &str,
    expected: &Values,
) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::all(client.clone());
    let mut found = HashMap::new();
    let mut lp = ListParams::default().labels(selector).limit(2000);
    loop {
        let page = api.list(&lp).await?;
        found.extend(page.items.iter().map(secret_value));
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
pub struct ProcStats {
    pub hwm_kib: u64,
    pub rss_kib: u64,
    pub cpu_secs: f64,
}

pub fn proc_stats(pid: u32) -> ProcStats {
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

/// OpenBao's audit log: requests made with tokens whose metadata `bench` is a tag.
pub struct Audit {
    pub path: Option<PathBuf>,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct AuditCount {
    pub requests: u64,
    pub logins: u64,
}

impl Audit {
    pub fn mark(&self) -> u64 {
        self.path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len())
    }

    /// Requests since `mark` by the token tagged `tag`; logins are token lookups (how a
    /// token-auth session logs in) and `auth/*/login` calls.
    pub fn count(&self, mark: u64, tag: &str) -> Option<AuditCount> {
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
pub fn apiserver_requests(bed: &Bed) -> Option<(u64, u64)> {
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
pub async fn resource_versions(
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
pub fn writes_between(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> usize {
    after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .count()
}

/// A GET over plain HTTP (the operator's /metrics and /readyz).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
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
pub fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}
