//! The command line.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "keyhaven-bench",
    about = "keyhaven vs the limit (bare kube-rs + vaultrs) vs External Secrets Operator on the test bed"
)]
pub struct Args {
    /// Secrets (ManagedSecrets, OpenBao objects, native Secrets).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Namespaces the ManagedSecrets are spread across.
    #[arg(long, default_value_t = 100)]
    pub namespaces: usize,
    /// Reconciles at once (keyhaven --concurrency) and requests in flight (the limit).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// The ManagedSecrets' refreshInterval, in seconds.
    #[arg(long, default_value_t = 30)]
    pub refresh: u64,
    /// Unchanged refresh intervals to watch for writes.
    #[arg(long, default_value_t = 3)]
    pub quiet_intervals: u32,
    /// The operator binary (default: target/release/keyhaven next to this one).
    #[arg(long)]
    pub operator_bin: Option<PathBuf>,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Skip the limit run.
    #[arg(long)]
    pub no_limit: bool,
    /// Skip the keyhaven run.
    #[arg(long)]
    pub no_keyhaven: bool,
    /// Skip the External Secrets Operator run.
    #[arg(long)]
    pub no_eso: bool,
    /// The ESO binary (default: the test bed's cache,
    /// ~/.cache/keyhaven/bin/external-secrets-v0.16.2/external-secrets).
    #[arg(long)]
    pub eso_bin: Option<PathBuf>,
    /// ESO's CRD directory (default: config/crds/bases of the module in `go env GOMODCACHE`).
    #[arg(long)]
    pub eso_crds: Option<PathBuf>,
    /// Append the results (markdown) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Leave everything in place (no cleanup).
    #[arg(long)]
    pub keep: bool,
    /// Internal: run as the limit's worker for this run id.
    #[arg(long, hide = true)]
    pub limit_worker: Option<String>,
}
