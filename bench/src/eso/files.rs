//! Where External Secrets Operator's binary and CRDs are, and installing the CRDs.

use crate::args::Args;
use crate::bed::Bed;
use crate::setup::apply;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The External Secrets Operator release the test bed builds (`e2e/testbed build-eso`, from
/// the wrapper module `e2e/gomod/external-secrets`).
pub const ESO_VERSION: &str = "v0.16.2";

/// ESO's binary and CRD directory, found.
pub struct EsoFiles {
    pub bin: PathBuf,
    pub crds: PathBuf,
}

/// The path an environment variable holds, unless unset or empty.
fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The test bed's binary cache, as `e2e/testbed` computes it.
fn keyhaven_cache() -> PathBuf {
    env_path("KEYHAVEN_CACHE")
        .or_else(|| env_path("XDG_CACHE_HOME").map(|d| d.join("keyhaven")))
        .unwrap_or_else(|| {
            env_path("HOME")
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
    env_path("GOMODCACHE")
        .or_else(|| {
            std::env::var("GOPATH").ok().and_then(|p| {
                p.split(':')
                    .find(|d| !d.is_empty())
                    .map(|d| Path::new(d).join("pkg/mod"))
            })
        })
        .or_else(|| env_path("HOME").map(|h| h.join("go/pkg/mod")))
}

/// ESO's binary and CRDs, or why the ESO phase cannot run (and how to fix it).
pub fn eso_files(args: &Args, bed: &Bed) -> Result<EsoFiles, String> {
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
pub async fn ensure_eso_crds(client: &Client, dir: &Path) -> anyhow::Result<()> {
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
                apply(&api, &name, &crd).await?;
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
