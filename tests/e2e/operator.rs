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
        let log = std::env::temp_dir().join(format!("keyhaven-e2e-{scope}.log"));
        let _ = std::fs::remove_file(&log);
        let mut op = Operator {
            child: None,
            kubeconfig: kubeconfig.to_owned(),
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
