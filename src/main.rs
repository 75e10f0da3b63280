//! `keyhaven run` runs the controllers; `keyhaven crds` prints the CRDs.

use clap::{Parser, Subcommand, ValueEnum};
use keyhaven::api::{crd_file_name, crd_yaml, crds};
use keyhaven::controller::{self, Config};
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "keyhaven",
    version,
    about = "Typed, versioned secrets across Vault/OpenBao, HSMs, Kubernetes and an encrypted internal store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers against the cluster KUBECONFIG names (or the one the pod is in).
    Run(RunArgs),
    /// Print every CRD as YAML (or write one file per CRD into --out-dir).
    Crds {
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The operator's namespace: its keys and the internal store's records live there.
    #[arg(long, env = "KEYHAVEN_NAMESPACE", default_value = "keyhaven-system")]
    namespace: String,
    /// Reconcile ManagedSecrets of this namespace only.
    #[arg(long, env = "KEYHAVEN_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Manage only SecretStores and VaultProfiles matching this label selector.
    #[arg(long, env = "KEYHAVEN_STORE_SELECTOR")]
    store_selector: Option<String>,
    /// Reconciles of one kind running at once.
    #[arg(long, env = "KEYHAVEN_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Field manager of keyhaven's server-side applies.
    #[arg(long, env = "KEYHAVEN_FIELD_MANAGER", default_value = "keyhaven")]
    field_manager: String,
    /// The operator's ServiceAccount, in --namespace: Vault's kubernetes auth logs in with
    /// a token of it (TokenRequest) unless a SecretStore names another.
    #[arg(long, env = "KEYHAVEN_SERVICE_ACCOUNT", default_value = "keyhaven")]
    service_account: String,
    /// Log format.
    #[arg(long, env = "KEYHAVEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keyhaven::install_crypto_provider();
    match Cli::parse().command {
        Command::Crds { out_dir: None } => {
            for crd in crds() {
                print!("---\n{}", crd_yaml(&crd));
            }
        }
        Command::Crds { out_dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            for crd in crds() {
                std::fs::write(dir.join(crd_file_name(&crd)), crd_yaml(&crd))?;
            }
        }
        Command::Run(args) => {
            init_tracing(args.log_format);
            let client = kube::Client::try_default().await?;
            let config = Config {
                operator_namespace: args.namespace,
                watch_namespace: args.watch_namespace,
                store_selector: args.store_selector,
                field_manager: args.field_manager,
                concurrency: args.concurrency,
                service_account: args.service_account,
            };
            controller::run(client, config).await?;
        }
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KEYHAVEN_LOG")
        // vaultrs and rustify log every non-2xx answer (a 404 for an absent path is normal
        // here) at ERROR; keyhaven reports what matters itself.
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,vaultrs=off,rustify=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
