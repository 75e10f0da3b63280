//! Runs `keyhaven run` as a real process for an end-to-end test, scoped to the test's
//! namespace and stores, so tests run in parallel without reconciling each other's objects.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
}

impl Operator {
    /// Starts an operator for the test namespace `scope`, keeping its state in `<scope>-op`.
    pub fn start(kubeconfig: &Path, scope: &str) -> Operator {
        Operator::start_with(kubeconfig, scope, "", &[])
    }

    /// Like [`Operator::start`], with a log of its own (`name` tells several operators of one
    /// scope apart) and `extra_args` appended to the command line.
    pub fn start_with(kubeconfig: &Path, scope: &str, name: &str, extra_args: &[&str]) -> Operator {
        let log = std::env::temp_dir().join(format!("keyhaven-e2e-{scope}{name}.log"));
        let _ = std::fs::remove_file(&log);
        let mut op = Operator {
            child: None,
            kubeconfig: kubeconfig.to_owned(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            scope: scope.to_owned(),
            namespace: format!("{scope}-op"),
            log,
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
        let child = Command::new(env!("CARGO_BIN_EXE_keyhaven"))
            .args([
                "run",
                "--namespace",
                &self.namespace,
                "--watch-namespace",
                &self.scope,
            ])
            .args(["--store-selector", &format!("{SCOPE_LABEL}={}", self.scope)])
            // Operators run side by side: each takes a free port, and logs which.
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(&self.extra_args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KEYHAVEN_LOG", "info,keyhaven=debug,kube=warn")
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

    /// The address of its /metrics, /healthz and /readyz, from its log (the latest start's),
    /// once it listens.
    pub fn metrics_addr(&self) -> Option<String> {
        let log = self.log_text();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("metrics and probes listening"))?;
        let addr = line.split("address=").nth(1)?;
        Some(addr.split_whitespace().next()?.trim_matches('"').to_owned())
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
