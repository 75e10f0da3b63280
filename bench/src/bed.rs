//! The test bed: its kubeconfig, OpenBao, audit log and servers, from the environment or
//! `e2e/.testbed/env`.

use crate::observe::proc_stats;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// The test bed, from the environment or `e2e/.testbed/env`.
#[derive(Clone, Debug)]
pub struct Bed {
    pub kubeconfig: PathBuf,
    pub vault_addr: String,
    pub vault_token: String,
    pub audit_log: Option<PathBuf>,
    /// Directories the env file puts on PATH (kubectl).
    pub path: String,
    /// The bed's state directory (its servers' pid files).
    dir: PathBuf,
}

impl Bed {
    pub fn load() -> anyhow::Result<Bed> {
        let dir = std::env::var_os("KEYHAVEN_TESTBED_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("e2e/.testbed"));
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
    pub fn servers_cpu(&self) -> ServersCpu {
        let cpu = |name: &str| {
            std::fs::read_to_string(self.dir.join(format!("pids/{name}.pid")))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .map(|pid| proc_stats(pid).cpu_secs)
        };
        ServersCpu([cpu("kube-apiserver"), cpu("etcd"), cpu("openbao")])
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        // Thousands of requests in flight: no client-side throttling beyond the semaphore.
        config.read_timeout = Some(Duration::from_secs(60));
        Ok(Client::try_from(config)?)
    }

    pub fn vault(&self, token: &str) -> anyhow::Result<VaultClient> {
        let settings = VaultClientSettingsBuilder::default()
            .address(&self.vault_addr)
            .token(token)
            .build()?;
        Ok(VaultClient::new(settings)?)
    }
}

/// The keyhaven checkout this bench was built in (the parent of `bench/`).
fn workspace_root() -> PathBuf {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench.parent().unwrap_or(bench).to_owned()
}

/// CPU seconds of kube-apiserver, etcd and OpenBao.
#[derive(Default, Debug, Clone, Copy)]
pub struct ServersCpu([Option<f64>; 3]);

impl ServersCpu {
    /// What the servers used since `before`.
    pub fn since(self, before: ServersCpu) -> ServersCpu {
        let mut d = [None; 3];
        for (i, slot) in d.iter_mut().enumerate() {
            if let (Some(a), Some(b)) = (self.0[i], before.0[i]) {
                *slot = Some(a - b);
            }
        }
        ServersCpu(d)
    }

    pub fn show(&self) -> String {
        let c = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.1}"));
        format!("{} / {} / {}", c(self.0[0]), c(self.0[1]), c(self.0[2]))
    }
}
