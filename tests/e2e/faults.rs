//! Fault injection and the load and end check the fault suite runs (issue 20).
//!
//! A [`Load`] is N pushed ManagedSecrets whose source Secrets a writer task keeps changing,
//! and a watcher of their native Secrets that records how long each change took to arrive
//! and anything that must never happen (a native Secret deleted, emptied, or holding a
//! value nobody wrote). [`check`] is the end check every fault test ends with: each native
//! Secret holds its source's last value; each version history has no gap and no duplicate;
//! each store the status calls synced holds that version with that value.
//! Faults go through `e2e/testbed pause|resume|restart` so `make soak` uses the same ones.

use super::Testbed;
use super::fixture::Fixture;
use super::leaks::Leaks;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use keyhaven::api::ManagedSecret;
use keyhaven::backend::Backend;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One fault test at a time: they stop and restart servers every test shares.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Label on the load's source Secrets.
const SOURCE_LABEL: &str = "e2e.keyhaven.io/load-source";

/// Runs `e2e/testbed VERB COMPONENT` on the bed the tests use.
pub fn testbed(verb: &str, component: &str) {
    let bed = Testbed::load();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/testbed");
    let out = std::process::Command::new(script)
        .args([verb, component])
        .env("KEYHAVEN_TESTBED_DIR", &bed.dir)
        .output()
        .expect("run e2e/testbed");
    assert!(
        out.status.success(),
        "e2e/testbed {verb} {component}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bed's OpenBao as the operator's vault store `name` sees it (KV v2 at secret/).
pub fn bao_backend(fx: &Fixture, name: &str) -> Arc<dyn Backend> {
    let bed = Testbed::load();
    let provider: keyhaven::api::VaultProvider = serde_json::from_value(json!({
        "server": bed.vault_addr, "mount": "secret", "version": "v2", "insecureHTTP": true,
        "auth": {"tokenSecretRef": {"name": "bao-token", "key": "token"}}}))
    .unwrap();
    let source = keyhaven::backend::SessionSource {
        kube: fx.client.clone(),
        operator_namespace: fx.op.namespace.clone(),
        service_account: "keyhaven".into(),
    };
    Arc::new(keyhaven::backend::VaultStore::new(name, &provider, source).unwrap())
}

/// The operator's namespace, which it creates on start (this test may be quicker).
pub async fn operator_namespace(fx: &Fixture) {
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = fx.cluster_api();
    let obj = serde_json::from_value(
        json!({"metadata": {"name": fx.op.namespace, "labels": {"keyhaven.io/e2e": "true"}}}),
    )
    .unwrap();
    match ns.create(&Default::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {}: {e}", fx.op.namespace),
    }
}

/// Resumes what a test paused even when the test panics, so the next test finds a bed.
pub struct Paused(pub &'static str);

impl Paused {
    pub fn start(component: &'static str) -> Paused {
        testbed("pause", component);
        Paused(component)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        testbed("resume", self.0);
    }
}

/// What the load saw; shared between its tasks and the test.
#[derive(Default)]
struct Seen {
    /// Values written to each source Secret and not yet seen in the native Secret, with
    /// when each was written.
    pending: BTreeMap<String, Vec<(String, Instant)>>,
    /// Every value ever written per secret (what a native Secret may hold).
    written: BTreeMap<String, BTreeSet<String>>,
    /// (when written, how long until the native Secret held it).
    latencies: Vec<(Instant, Duration)>,
    /// What must never happen, as it happened.
    violations: Vec<String>,
    writes: u64,
    write_errors: u64,
}

/// N pushed ManagedSecrets under load.
pub struct Load {
    pub namespace: String,
    pub names: Vec<String>,
    seen: Arc<Mutex<Seen>>,
    writer: Option<tokio::task::JoinHandle<()>>,
    watcher: tokio::task::JoinHandle<()>,
    /// The fixture's leak check: every value the load writes is registered in it.
    leaks: Leaks,
}

/// The key each load Secret holds.
pub const KEY: &str = "value";

fn value_for(name: &str, n: u64) -> String {
    let noise: u64 = rand::random();
    format!("{name}-{n}-{noise:016x}")
}

/// Writes a new value `n` of `name`'s source Secret, recording it (written, pending since
/// now) and registering it with the leak check.
async fn write_one(secrets: &Api<Secret>, seen: &Mutex<Seen>, leaks: &Leaks, name: &str, n: u64) {
    let value = value_for(name, n);
    leaks.register(&value);
    {
        let mut s = seen.lock().unwrap();
        s.written
            .entry(name.to_owned())
            .or_default()
            .insert(value.clone());
        s.pending
            .entry(name.to_owned())
            .or_default()
            .push((value.clone(), Instant::now()));
        s.writes += 1;
    }
    let (src, src_name) = (source_secret(name, &value), format!("src-{name}"));
    let pp = PatchParams::apply("e2e-load").force();
    let patch = Patch::Apply(&src);
    let write = secrets.patch(&src_name, &pp, &patch);
    // A hung API server: the write may still land when it resumes; the end check reads
    // the source Secret, not this task's memory.
    match tokio::time::timeout(Duration::from_secs(2), write).await {
        Ok(Ok(_)) => {}
        _ => seen.lock().unwrap().write_errors += 1,
    }
}

impl Load {
    /// Creates `n` source Secrets `src-I` and ManagedSecrets `m-I` (type generic, pushed
    /// from them, refreshed every `refresh`) under `profile`, and waits until every one
    /// has synced version 1.
    pub async fn start(fx: &Fixture, profile: &str, n: usize, refresh: &str) -> Load {
        let names: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let secrets: Api<Secret> = fx.ns_api(&fx.ns);
        let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
        let pp = PatchParams::apply("e2e-load").force();
        futures::stream::iter(names.clone())
            .for_each_concurrent(16, |name| {
                let (secrets, managed, pp, seen) =
                    (secrets.clone(), managed.clone(), pp.clone(), seen.clone());
                let profile = profile.to_owned();
                let leaks = fx.leaks.clone();
                async move {
                    let value = value_for(&name, 0);
                    leaks.register(&value);
                    seen.lock()
                        .unwrap()
                        .written
                        .entry(name.clone())
                        .or_default()
                        .insert(value.clone());
                    let src = source_secret(&name, &value);
                    secrets
                        .patch(&format!("src-{name}"), &pp, &Patch::Apply(&src))
                        .await
                        .unwrap_or_else(|e| panic!("create src-{name}: {e}"));
                    let ms = json!({
                        "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                        "metadata": {"name": name},
                        "spec": {"profile": profile, "type": "generic", "refreshInterval": refresh,
                            "content": {"fromSecret": {"name": format!("src-{name}")}}}});
                    managed
                        .patch(&name, &pp, &Patch::Apply(&ms))
                        .await
                        .unwrap_or_else(|e| panic!("create ManagedSecret {name}: {e}"));
                }
            })
            .await;
        let watcher = tokio::spawn(watch_natives(secrets.clone(), seen.clone()));
        let load = Load {
            namespace: fx.ns.clone(),
            names,
            seen,
            writer: None,
            watcher,
            leaks: fx.leaks.clone(),
        };
        let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
        let deadline = Instant::now() + Duration::from_secs(30 + n as u64 / 5);
        loop {
            let list = managed.list(&ListParams::default()).await.unwrap();
            let synced = list
                .items
                .iter()
                .filter(|m| m.status.as_ref().and_then(|s| s.current_version) == Some(1))
                .count();
            if synced == n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{synced} of {n} ManagedSecrets synced version 1"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        load
    }

    /// Starts changing one random source Secret every `every`.
    pub fn start_writes(&mut self, client: kube::Client, every: Duration) {
        let secrets: Api<Secret> = Api::namespaced(client, &self.namespace);
        let (names, seen, leaks) = (self.names.clone(), self.seen.clone(), self.leaks.clone());
        self.writer = Some(tokio::spawn(async move {
            let mut n = 1u64;
            loop {
                tokio::time::sleep(every).await;
                let name = &names[rand::random_range(0..names.len())];
                write_one(&secrets, &seen, &leaks, name, n).await;
                n += 1;
            }
        }));
    }

    /// Changes every source Secret once (16 at a time), numbering the values from `round`'s
    /// own range so they never repeat the writer's.
    pub async fn write_all(&self, client: kube::Client, round: u64) {
        let secrets: Api<Secret> = Api::namespaced(client, &self.namespace);
        futures::stream::iter(&self.names)
            .for_each_concurrent(16, |name| {
                let (secrets, seen, leaks) = (&secrets, &self.seen, &self.leaks);
                async move { write_one(secrets, seen, leaks, name, u64::MAX - round).await }
            })
            .await;
    }

    /// Stops the writer (the end check needs the sources to hold still).
    pub fn stop_writes(&mut self) {
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }

    /// Latencies of the changes written since `since` that arrived (unsorted).
    pub fn latencies_since(&self, since: Instant) -> Vec<Duration> {
        let s = self.seen.lock().unwrap();
        s.latencies
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, d)| *d)
            .collect()
    }

    /// (writes, writes that failed or timed out).
    pub fn writes(&self) -> (u64, u64) {
        let s = self.seen.lock().unwrap();
        (s.writes, s.write_errors)
    }

    /// Every value the load wrote (for the leak check).
    pub fn values(&self) -> Vec<String> {
        let s = self.seen.lock().unwrap();
        s.written.values().flatten().cloned().collect()
    }

    /// What must never happen and did (a native Secret deleted, emptied, or wrong).
    pub fn violations(&self) -> Vec<String> {
        self.seen.lock().unwrap().violations.clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_writes();
        self.watcher.abort();
    }
}

fn source_secret(name: &str, value: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("src-{name}"), "labels": {SOURCE_LABEL: "true"}},
        "stringData": {KEY: value}})
}

/// Watches the native Secrets `m-*`: records latencies and violations.
async fn watch_natives(secrets: Api<Secret>, seen: Arc<Mutex<Seen>>) {
    let cfg = watcher::Config::default().labels(&format!("!{SOURCE_LABEL}"));
    let mut stream = watcher(secrets, cfg).boxed();
    while let Some(event) = stream.next().await {
        let (secret, deleted) = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => (s, false),
            Ok(watcher::Event::Delete(s)) => (s, true),
            _ => continue,
        };
        let name = secret.name_any();
        let mut s = seen.lock().unwrap();
        if !s.written.contains_key(&name) {
            continue;
        }
        if deleted {
            s.violations.push(format!("native Secret {name} deleted"));
            continue;
        }
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KEY))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned());
        let Some(value) = value else {
            s.violations
                .push(format!("native Secret {name} has no {KEY:?}"));
            continue;
        };
        if !s.written[&name].contains(&value) {
            s.violations
                .push(format!("native Secret {name} holds a value never written"));
            continue;
        }
        let now = Instant::now();
        let pending = s.pending.entry(name).or_default();
        if let Some(i) = pending.iter().position(|(v, _)| *v == value) {
            let (_, at) = pending[i];
            // Values written before this one and overtaken by it arrived with it.
            let arrived: Vec<Instant> = pending.drain(..=i).map(|(_, at)| at).collect();
            let _ = at;
            for at in arrived {
                s.latencies.push((at, now - at));
            }
        }
    }
}

/// The stores the end check reads, by SecretStore name.
pub type Stores = BTreeMap<String, Arc<dyn Backend>>;

/// Totals of a passing end check.
#[derive(Debug, Default)]
pub struct Checked {
    pub secrets: usize,
    pub versions: u64,
    pub store_reads: usize,
}

/// The end check. Problems are described without values.
pub async fn check(
    fx: &Fixture,
    names: &[String],
    stores: &Stores,
) -> Result<Checked, Vec<String>> {
    let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    let secrets: Api<Secret> = fx.ns_api(&fx.ns);
    let list = managed
        .list(&ListParams::default())
        .await
        .map_err(|e| vec![format!("list ManagedSecrets: {e}")])?;
    let by_name: BTreeMap<String, ManagedSecret> =
        list.items.into_iter().map(|m| (m.name_any(), m)).collect();
    let all = secrets
        .list(&ListParams::default())
        .await
        .map_err(|e| vec![format!("list Secrets: {e}")])?;
    let data: BTreeMap<String, BTreeMap<String, String>> = all
        .items
        .into_iter()
        .map(|s| {
            let name = s.name_any();
            let d = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    // Generated values too are looked for by the leak check.
                    fx.leaks.register_data(&k, &v.0);
                    (k, String::from_utf8_lossy(&v.0).into_owned())
                })
                .collect();
            (name, d)
        })
        .collect();
    // Sixteen secrets at a time: one pass over a thousand takes seconds, not minutes.
    let results: Vec<Result<(u64, usize), Vec<String>>> = futures::stream::iter(names)
        .map(|name| {
            let (by_name, data) = (&by_name, &data);
            async move {
                let Some(ms) = by_name.get(name) else {
                    return Err(vec![format!("{name}: ManagedSecret gone")]);
                };
                let native = data.get(name).filter(|d| !d.is_empty());
                let Some(native) = native else {
                    return Err(vec![format!("{name}: no native Secret, or an empty one")]);
                };
                let mut problems = vec![];
                // A pushed secret holds its source's last value; a generated one is
                // checked against its stores.
                if let Some(source) = data.get(&format!("src-{name}"))
                    && source != native
                {
                    problems.push(format!(
                        "{name}: native Secret is not the source's last value"
                    ));
                }
                match check_one(ms, native, stores).await {
                    Ok(done) if problems.is_empty() => Ok(done),
                    Ok(_) => Err(problems),
                    Err(p) => {
                        problems.extend(p.into_iter().map(|p| format!("{name}: {p}")));
                        Err(problems)
                    }
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut problems = vec![];
    let mut done = Checked::default();
    for r in results {
        match r {
            Ok((versions, reads)) => {
                done.secrets += 1;
                done.versions += versions;
                done.store_reads += reads;
            }
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok(done)
    } else {
        Err(problems)
    }
}

/// One ManagedSecret: its history and its stores. Returns (versions, store reads).
async fn check_one(
    ms: &ManagedSecret,
    want: &BTreeMap<String, String>,
    stores: &Stores,
) -> Result<(u64, usize), Vec<String>> {
    let mut problems = vec![];
    let Some(status) = &ms.status else {
        return Err(vec!["no status".into()]);
    };
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        problems.push("not Ready".into());
    }
    let history = &status.versions;
    for pair in history.windows(2) {
        if pair[1].version != pair[0].version + 1 {
            problems.push(format!(
                "history goes from version {} to {}",
                pair[0].version, pair[1].version
            ));
        }
        if pair[1].fingerprint == pair[0].fingerprint {
            problems.push(format!(
                "versions {} and {} hold the same value (written twice)",
                pair[0].version, pair[1].version
            ));
        }
    }
    let Some(current) = history.last() else {
        return Err(vec!["no version".into()]);
    };
    if status.current_version != Some(current.version) {
        problems.push(format!(
            "currentVersion {:?}, newest recorded {}",
            status.current_version, current.version
        ));
    }
    let path = ms.store_path();
    let mut reads = 0;
    // Where the current version was written, and every store the status calls synced.
    let mut claims: Vec<(String, u64)> = vec![(current.store.clone(), current.version)];
    for t in &status.targets {
        if t.state == "Synced" {
            claims.push((t.store.clone(), t.version.unwrap_or(0)));
        } else if t.state == "Pending" && t.store != current.store {
            // A switched source: the current version stays where it was written.
        } else {
            problems.push(format!("store {} is {}", t.store, t.state));
        }
    }
    for (store, version) in claims {
        let Some(backend) = stores.get(&store) else {
            continue;
        };
        if version != current.version {
            problems.push(format!(
                "store {store} is synced at version {version}, current is {}",
                current.version
            ));
        }
        reads += 1;
        match backend.read(&path, None).await {
            Ok(Some(read)) => {
                let got: BTreeMap<String, String> = read
                    .data
                    .iter()
                    .map(|(k, v)| (k.to_owned(), String::from_utf8_lossy(v).into_owned()))
                    .collect();
                if got != *want {
                    problems.push(format!("store {store} holds another value at {path}"));
                }
                match read.stamp {
                    Some(stamp) if stamp.version == current.version => {}
                    Some(stamp) => problems.push(format!(
                        "store {store}'s current version is {}, the status says {}",
                        stamp.version, current.version
                    )),
                    None => problems.push(format!("store {store} has no version stamp")),
                }
            }
            Ok(None) => problems.push(format!("store {store} has nothing at {path}")),
            Err(e) => problems.push(format!("store {store}: {e}")),
        }
        match backend.list_versions(&path).await {
            Ok(versions) => {
                if versions.iter().any(|v| *v > current.version) {
                    problems.push(format!(
                        "store {store} holds a version after the current one"
                    ));
                }
                if versions.windows(2).any(|w| w[0] >= w[1]) {
                    problems.push(format!("store {store} lists a version twice"));
                }
            }
            Err(e) => problems.push(format!("store {store}: list versions: {e}")),
        }
    }
    if problems.is_empty() {
        Ok((history.len() as u64, reads))
    } else {
        Err(problems)
    }
}

/// Polls [`check`] until it passes; how long until the passing check began (what it read
/// is the state of then). Panics with the problems (the
/// first 20) after `timeout`.
pub async fn converge(
    fx: &Fixture,
    names: &[String],
    stores: &Stores,
    timeout: Duration,
) -> (Duration, Checked) {
    let t0 = Instant::now();
    loop {
        let pass = t0.elapsed();
        match check(fx, names, stores).await {
            Ok(done) => return (pass, done),
            Err(problems) if t0.elapsed() > timeout => panic!(
                "not converged {timeout:?} after the fault: {} problems, first: {:#?}",
                problems.len(),
                &problems[..problems.len().min(20)]
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The p-th percentile (0-100) of `samples`, or zero when there are none.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// One fault's figures, printed and appended to `target/faults-report.txt`.
pub fn report(fault: &str, recovery: Duration, during: &mut [Duration], load: &Load) {
    let (writes, errors) = load.writes();
    let line = format!(
        "{fault}: recovery {:.1} s after the fault ended; change latency during it p50 {:.1} s p99 {:.1} s ({} changes); {writes} writes ({errors} failed or timed out)",
        recovery.as_secs_f64(),
        percentile(during, 50.0).as_secs_f64(),
        percentile(during, 99.0).as_secs_f64(),
        during.len(),
    );
    println!("FAULT {line}");
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults-report.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        use std::io::Write as _;
        let _ = writeln!(f, "{line}");
    }
}
