//! `keyhaven run` runs the controllers; `keyhaven crds` prints the CRDs.

use clap::{Parser, Subcommand, ValueEnum};
use keyhaven::api::{crd_file_name, crd_yaml, crds};
use keyhaven::backend::ModuleAllowList;
use keyhaven::controller::{self, Config, CredentialNamespaces, Runtime, Stopped};
use keyhaven::http::{self, Probes};
use keyhaven::leader::LeaderElection;
use keyhaven::metrics::Metrics;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::info;
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
    Run(Box<RunArgs>),
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
    /// Reconcile only ManagedSecrets matching this label selector (shards a cluster between
    /// operators; with --store-selector, keeps one operator off another's objects).
    #[arg(long, env = "KEYHAVEN_MANAGED_SELECTOR")]
    managed_selector: Option<String>,
    /// Reconciles of one kind running at once (at least 1).
    #[arg(long, env = "KEYHAVEN_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Field manager of keyhaven's server-side applies.
    #[arg(long, env = "KEYHAVEN_FIELD_MANAGER", default_value = "keyhaven")]
    field_manager: String,
    /// The operator's ServiceAccount, in --namespace: Vault's kubernetes auth logs in with
    /// a token of it (TokenRequest) unless a SecretStore names another.
    #[arg(long, env = "KEYHAVEN_SERVICE_ACCOUNT", default_value = "keyhaven")]
    service_account: String,
    /// The PKCS#11 modules (absolute paths, comma-separated) pkcs11 SecretStores may load;
    /// a store naming another is Invalid and nothing is loaded. Default: none.
    #[arg(
        long,
        env = "KEYHAVEN_PKCS11_MODULES",
        value_delimiter = ',',
        value_name = "PATHS"
    )]
    pkcs11_modules: Vec<String>,
    /// Namespaces (comma-separated) besides --namespace that SecretStores may read
    /// credentials and CA bundles from (tokenSecretRef, appRole refs, caProvider,
    /// pinSecretRef, serviceAccountRef); a store naming another is Invalid. Default: none.
    #[arg(
        long,
        env = "KEYHAVEN_CREDENTIAL_NAMESPACES",
        value_delimiter = ',',
        value_name = "NAMESPACES"
    )]
    credential_namespaces: Vec<String>,
    /// Write the audit log (one HMAC-chained JSON line per operation on a secret) to this
    /// file, appended to, or `-` for standard output (the logs go to standard error).
    /// Unset: nothing is recorded.
    #[arg(long, env = "KEYHAVEN_AUDIT_LOG", value_name = "PATH")]
    audit_log: Option<String>,
    /// Log format.
    #[arg(long, env = "KEYHAVEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Where /metrics, /healthz and /readyz listen (port 0: any free port, logged).
    #[arg(long, env = "KEYHAVEN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Serve the admission webhook (TLS) here, e.g. 0.0.0.0:9443. Unset: no webhook.
    #[arg(long, env = "KEYHAVEN_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,
    /// The Service the API server reaches the webhook through (its DNS names go in the
    /// serving certificate).
    #[arg(long, env = "KEYHAVEN_WEBHOOK_SERVICE")]
    webhook_service: Option<String>,
    /// More names or IP addresses for the serving certificate (comma-separated), e.g.
    /// 127.0.0.1 when the API server calls the webhook by URL.
    #[arg(long, env = "KEYHAVEN_WEBHOOK_HOSTS", value_delimiter = ',')]
    webhook_hosts: Vec<String>,
    /// The Validating- and MutatingWebhookConfiguration whose caBundle keyhaven keeps
    /// current (unset: someone else does, e.g. cert-manager's CA injector).
    #[arg(long, env = "KEYHAVEN_WEBHOOK_CONFIG_NAME")]
    webhook_config_name: Option<String>,
    /// Serve the certificate another issuer (cert-manager) keeps in this Secret of
    /// `--namespace` instead of issuing one.
    #[arg(long, env = "KEYHAVEN_WEBHOOK_CERT_SECRET")]
    webhook_cert_secret: Option<String>,
    /// Elect a leader on a Lease before reconciling (for more than one replica).
    #[arg(long, env = "KEYHAVEN_LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    leader_elect: bool,
    /// The leader election's Lease.
    #[arg(
        long,
        env = "KEYHAVEN_LEADER_ELECTION_LEASE",
        default_value = "keyhaven-leader"
    )]
    leader_election_lease: String,
    /// The Lease's namespace (default: --namespace).
    #[arg(long, env = "KEYHAVEN_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// This candidate's identity (default: $POD_NAME, else <hostname>-<pid>).
    #[arg(long, env = "KEYHAVEN_LEADER_ELECTION_IDENTITY")]
    leader_election_identity: Option<String>,
    /// How long the Lease stays valid without renewal: a standby takes over at most this
    /// long after the leader dies (seconds, at least 2).
    #[arg(long, env = "KEYHAVEN_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// The leader renews this many seconds before its Lease would expire.
    #[arg(long, env = "KEYHAVEN_LEASE_RENEW_MARGIN", default_value_t = 5)]
    lease_renew_margin: u64,
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
            return run(*args).await;
        }
    }
    Ok(())
}

/// How long a connection to the API server may take to open. kube's default (30 s) makes a
/// request started while the API server hangs wait out TCP's SYN retransmissions (1, 3, 7,
/// 15, 31 s) after it is back: the fault suite measured 36 s of recovery after a 20 s hang.
/// Failing at 5 s retries the reconcile on a fresh connection instead (5 s later).
const KUBE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a request waits for the API server's answer. The API server holds a request
/// for up to 60 s when etcd is away (its own timeout); the fault suite measured 43 s of
/// recovery after an etcd restart, every reconcile slot held by such requests. Failing at
/// 15 s retries the reconcile instead; no request keyhaven makes (a page of 500 objects, a
/// status patch) takes more than a fraction of that.
const KUBE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The API server clients, from the environment (in-cluster or KUBECONFIG): one for
/// requests (connect and read timeouts), one for watches (connect timeout only: a quiet
/// watch answers nothing for minutes, and kube's watcher has an idle timeout of its own).
async fn kube_clients() -> anyhow::Result<(kube::Client, kube::Client)> {
    let mut config = kube::Config::infer().await?;
    config.connect_timeout = Some(KUBE_CONNECT_TIMEOUT);
    let watches = kube::Client::try_from(config.clone())?;
    config.read_timeout = Some(KUBE_READ_TIMEOUT);
    // kube's default retry of 429/503/504 waits up to 15 times, doubling from 5 ms (minutes
    // in all) inside one request, silently: after an etcd restart the fault suite saw the
    // operator idle, no error logged, for over a minute. A reconcile that fails is retried
    // by its controller (5 s for a transient failure) and says why; watches keep the retry.
    config.default_retry = false;
    // The timeout counts from when a request is sent, not from when its pooled connection
    // went idle.
    config.reset_reader_on_write = true;
    Ok((kube::Client::try_from(config)?, watches))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let pkcs11_modules =
        ModuleAllowList::parse(&args.pkcs11_modules).map_err(anyhow::Error::msg)?;
    if !pkcs11_modules.modules().is_empty() {
        info!(modules = ?pkcs11_modules.modules(), "PKCS#11 modules pkcs11 stores may load");
    }
    let credential_namespaces =
        CredentialNamespaces::parse(&args.credential_namespaces).map_err(anyhow::Error::msg)?;
    if !credential_namespaces.namespaces().is_empty() {
        info!(namespaces = ?credential_namespaces.namespaces(), "namespaces stores may read credentials from besides the operator's");
    }
    let metrics = Metrics::global();
    let probes = Arc::new(Probes::default());
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested: finishing reconciles in flight");
        let _ = shutdown_tx.send(true);
    });
    // The HTTP endpoint outlives the controllers: probes answer until the very end.
    let (server_stop_tx, server_stop) = tokio::sync::oneshot::channel::<()>();
    let (_, server) = http::serve(args.metrics_addr, metrics.clone(), probes.clone(), async {
        let _ = server_stop.await;
    })
    .await?;

    let (client, watch_client) = kube_clients().await?;
    let audit = match &args.audit_log {
        None => keyhaven::audit::Audit::disabled(),
        Some(target) => {
            // The audit key lives in the operator's namespace.
            keyhaven::controller::ensure_namespace(&client, &args.namespace).await?;
            let key = keyhaven::audit::load_or_create_key(client.clone(), &args.namespace).await?;
            let target = keyhaven::audit::Target::parse(target);
            info!(%target, "audit log");
            keyhaven::audit::Audit::open(target, key, "system:keyhaven")
        }
    };
    // The webhook serves on every replica, leader or not, until the very end.
    let (webhook_stop_tx, webhook_stop) = tokio::sync::oneshot::channel::<()>();
    let webhook = match args.webhook_addr {
        Some(addr) => {
            // Its certificate Secret lives in the operator's namespace.
            keyhaven::controller::ensure_namespace(&client, &args.namespace).await?;
            let config = keyhaven::webhook::WebhookConfig {
                addr,
                namespace: args.namespace.clone(),
                service: args.webhook_service.clone(),
                hosts: args.webhook_hosts.clone(),
                config_name: args.webhook_config_name.clone(),
                cert_secret: args.webhook_cert_secret.clone(),
            };
            let stop = async {
                let _ = webhook_stop.await;
            };
            Some(keyhaven::webhook::serve(config, client.clone(), audit.clone(), stop).await?)
        }
        None => None,
    };
    let leader_election = args.leader_elect.then(|| LeaderElection {
        lease_name: args.leader_election_lease.clone(),
        namespace: args
            .leader_election_namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone()),
        identity: args
            .leader_election_identity
            .clone()
            .unwrap_or_else(LeaderElection::default_identity),
        lease_duration: Duration::from_secs(args.lease_duration),
        renew_margin: Duration::from_secs(args.lease_renew_margin),
    });
    let config = Config {
        operator_namespace: args.namespace,
        watch_namespace: args.watch_namespace,
        store_selector: args.store_selector,
        managed_selector: args.managed_selector,
        field_manager: args.field_manager,
        concurrency: args.concurrency,
        service_account: args.service_account,
        pkcs11_modules,
        credential_namespaces,
        verified_identity: webhook.is_some(),
        audit,
    };
    let runtime = Runtime {
        metrics,
        probes,
        shutdown,
        leader_election,
        watch_client: Some(watch_client),
    };
    let stopped = controller::run(client, config, runtime).await;
    let _ = webhook_stop_tx.send(());
    if let Some(webhook) = webhook {
        let _ = webhook.await;
    }
    let _ = server_stop_tx.send(());
    let _ = server.await;
    match stopped? {
        Stopped::Shutdown => Ok(()),
        Stopped::LostLeadership => {
            anyhow::bail!("lost the leader Lease; exiting to rejoin the election")
        }
    }
}

/// SIGTERM (a pod being stopped) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The log filter when `KEYHAVEN_LOG` is not set.
const DEFAULT_LOG: &str = "info,kube=warn,kube_client=warn,kube_client::client::builder=off,kube_runtime=warn,vaultrs=off,rustify=off";

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("KEYHAVEN_LOG")
        // vaultrs and rustify log every non-2xx answer (a 404 for an absent path is normal
        // here) at ERROR, kube's client every failed request; keyhaven reports what matters
        // itself, saying which operation failed (the targets are the crates' own names).
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG))
        // Whatever KEYHAVEN_LOG says: at debug and trace these crates log requests and the
        // store's answers, which a value could travel in.
        .add_directive("vaultrs=off".parse().expect("a directive"))
        .add_directive("rustify=off".parse().expect("a directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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
