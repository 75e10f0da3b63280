//! Runs `keyhaven run` as a real process for an end-to-end test, scoped to the test's
//! namespace and stores, so tests run in parallel without reconciling each other's objects.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The label that scopes SecretStores and VaultProfiles to one test's operator.
pub const SCOPE_LABEL: &str = "keyhaven.io/e2e-scope";

/// A running operator process. Killed when dropped.
pub struct Operator {
    child: Option<Child>,
    kubeconfig: PathBuf,
    /// Arguments after the scoping ones (e.g. leader election flags).
    extra_args: Vec<String>,
    /// The namespace whose ManagedSecrets it reconciles, and the value of [`SCOPE_LABEL`].
    pub scope: String,
    /// The operator's own namespace (keys, internal store records).
    pub namespace: String,
    /// Everything it logged, across restarts.
    pub log: PathBuf,
    /// Where in `log` the latest start's lines begin.
    log_start: u64,
    /// It watches every namespace, and reconciles the ManagedSecrets labelled with
    /// [`SCOPE_LABEL`] `= scope` (a multi-tenant install); else only those of `scope`.
    cluster_wide: bool,
}

impl Operator {
    /// Starts an operator for the test namespace `scope`, keeping its state in `<scope>-op`.
    pub fn start(kubeconfig: &Path, scope: &str) -> Operator {
        Operator::start_with(kubeconfig, scope, "", &[])
    }

    /// Like [`Operator::start`], with a log of its own (`name` tells several operators of one
    /// scope apart) and `extra_args` appended to the command line.
    pub fn start_with(kubeconfig: &Path, scope: &str, name: &str, extra_args: &[&str]) -> Operator {
        Operator::launch(kubeconfig, scope, name, extra_args, false)
    }

    /// Like [`Operator::start_with`], watching every namespace: it reconciles the
    /// ManagedSecrets of any namespace that carry [`SCOPE_LABEL`] `= scope`.
    pub fn start_cluster_wide(
        kubeconfig: &Path,
        scope: &str,
        name: &str,
        extra_args: &[&str],
    ) -> Operator {
        Operator::launch(kubeconfig, scope, name, extra_args, true)
    }

    fn launch(
        kubeconfig: &Path,
        scope: &str,
        name: &str,
        extra_args: &[&str],
        cluster_wide: bool,
    ) -> Operator {
        let log = std::env::temp_dir().join(format!("keyhaven-e2e-{scope}{name}.log"));
        let _ = std::fs::remove_file(&log);
        let mut op = Operator {
            child: None,
            kubeconfig: kubeconfig.to_owned(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            scope: scope.to_owned(),
            namespace: format!("{scope}-op"),
            log,
            log_start: 0,
            cluster_wide,
        };
        op.spawn();
        op
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("operator log file");
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(env!("CARGO_BIN_EXE_keyhaven"))
            .args(["run", "--namespace", &self.namespace])
            .args(match self.cluster_wide {
                false => ["--watch-namespace".to_owned(), self.scope.clone()],
                true => [
                    "--managed-selector".to_owned(),
                    format!("{SCOPE_LABEL}={}", self.scope),
                ],
            })
            .args(["--store-selector", &format!("{SCOPE_LABEL}={}", self.scope)])
            // Operators run side by side: each takes a free port, and logs which.
            .args(["--metrics-addr", "127.0.0.1:0"])
            // The bed's PKCS#11 module is the one pkcs11 stores may load.
            .arg("--pkcs11-modules")
            .arg(&super::Testbed::load().pkcs11_module)
            // Tests keep the stores' credentials (tokens, AppRole ids, CAs) in their own
            // namespace, besides the operator's.
            .args(["--credential-namespaces", &self.scope])
            .args(&self.extra_args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "KEYHAVEN_LOG",
                "info,keyhaven=debug,kube=warn,kube_client::client::builder=off,vaultrs=off,rustify=off",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start keyhaven run");
        self.child = Some(child);
    }

    /// SIGKILLs the process: no graceful shutdown, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (a pod being stopped) and waits up to `timeout` for the process to
    /// exit; returns its exit status, or None if it is still running.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        self.child.as_ref()?;
        self.signal("TERM");
        self.wait_exit(timeout)
    }

    /// Sends `signal` (a name `kill` knows: STOP, CONT, TERM, ...) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status();
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The address of its /metrics, /healthz and /readyz, from its log (the latest start's
    /// lines only: a restarted process listens elsewhere), once it listens.
    pub fn metrics_addr(&self) -> Option<String> {
        let log = self.log_text();
        let line = log
            .get(self.log_start as usize..)?
            .lines()
            .find(|l| l.contains("metrics and probes listening"))?;
        let addr = line.split("address=").nth(1)?;
        Some(addr.split_whitespace().next()?.trim_matches('"').to_owned())
    }

    /// The process id of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A scrape of its /metrics, once it answers (waits up to 30 s).
    pub async fn metrics(&self) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pid = self.pid();
            if let Some(addr) = self.metrics_addr()
                && let Some((200, text)) = http_get(&addr, "/metrics").await
            {
                return Metrics { pid, text };
            }
            if Instant::now() > deadline {
                panic!(
                    "the operator's /metrics did not answer in 30 s (address {:?}); log {}",
                    self.metrics_addr(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the operator has done at least `n` more of each `work` than the scrape
    /// `since` (of this same process) shows, and returns the scrape that showed it; panics
    /// after `timeout` saying what fell short.
    ///
    /// The proof a "nothing changed" window needs: the operator did reconcile in it, so
    /// the absence of writes means something.
    pub async fn wait_work(
        &self,
        since: &Metrics,
        work: &[(Work, u64)],
        timeout: Duration,
    ) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.metrics().await;
            assert_eq!(
                now.pid, since.pid,
                "the operator restarted since the scrape this window counts from"
            );
            let short: Vec<String> = work
                .iter()
                .filter(|(w, n)| now.count(w) < since.count(w) + *n as f64)
                .map(|(w, n)| format!("{w}: {} of {n}", now.count(w) - since.count(w)))
                .collect();
            if short.is_empty() {
                return now;
            }
            if Instant::now() > deadline {
                panic!(
                    "the operator did not do the work expected in {timeout:?}: {short:?}; log {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Kills and starts again with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The operator's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Something the operator counts on /metrics: a counter's name and labels its samples must
/// carry (a sample with more labels counts too: they are summed).
#[derive(Clone, Debug)]
pub struct Work {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
}

impl Work {
    /// Reconciles of `kind` (ManagedSecret, SecretStore, VaultProfile) that ran.
    pub fn reconciles(kind: &str) -> Work {
        Work {
            name: "keyhaven_reconciles_total",
            labels: vec![("kind", kind.to_owned())],
        }
    }

    /// Reconciles of `kind` that failed with `reason` (StoreSealed, StoreInvalid, ...).
    pub fn failed(kind: &str, reason: &str) -> Work {
        Work {
            name: "keyhaven_reconcile_errors_total",
            labels: vec![("kind", kind.to_owned()), ("reason", reason.to_owned())],
        }
    }

    /// Calls of `operation` (read, write, list_versions, delete, health, count) to the
    /// backend of the SecretStore `store`, whatever their outcome.
    pub fn store_calls(store: &str, operation: &str) -> Work {
        Work {
            name: "keyhaven_backend_calls_total",
            labels: vec![
                ("store", store.to_owned()),
                ("operation", operation.to_owned()),
            ],
        }
    }

    /// Reads from the backend of `store`: every sync reads its source and each sync target.
    pub fn store_reads(store: &str) -> Work {
        Work::store_calls(store, "read")
    }

    /// Only the calls with this outcome (ok, sealed, unreachable, invalid, conflict, error).
    pub fn outcome(mut self, outcome: &str) -> Work {
        self.labels.push(("outcome", outcome.to_owned()));
        self
    }
}

impl std::fmt::Display for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        write!(f, "{}{{{}}}", self.name, labels.join(","))
    }
}

/// One scrape of an operator's /metrics (Prometheus text format).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// The process scraped.
    pub pid: Option<u32>,
    pub text: String,
}

impl Metrics {
    /// The sum of the samples of `work`'s counter that carry its labels (0 when none).
    pub fn count(&self, work: &Work) -> f64 {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(parse_sample)
            .filter(|(name, labels, _)| {
                *name == work.name
                    && work
                        .labels
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    /// The value of the series `series` (name and labels exactly as exposed).
    pub fn sample(&self, series: &str) -> Option<f64> {
        sample(&self.text, series)
    }
}

/// One exposed sample: its series name, its labels and its value.
type Sample<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// `name{k="v",...} value` (or `name value`): its name, labels and value.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, labels)) = series.split_once('{') else {
        return Some((series, vec![], value));
    };
    let labels = labels
        .strip_suffix('}')?
        .split("\",")
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k, v.trim_start_matches('"').trim_end_matches('"')))
        })
        .collect();
    Some((name, labels, value))
}

/// The value of the series `series` (name and labels exactly as exposed) in `text`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `GET path` on `addr`: the status code and body, or None when nothing answers.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}
