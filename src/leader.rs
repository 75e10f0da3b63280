//! Leader election on a `coordination.k8s.io/v1` Lease, with `kube-lease-manager`
//! (server-side apply, so two candidates can never both hold it).
//!
//! Only the holder runs the controllers. A holder that loses the Lease (it could not renew
//! in time) stops reconciling and exits, so it restarts as a candidate, as client-go's
//! leader election does. On a graceful shutdown the holder releases the Lease, so a standby
//! takes over at once instead of after the lease duration.

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How to elect.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// The Lease's name.
    pub lease_name: String,
    /// The Lease's namespace.
    pub namespace: String,
    /// This candidate's identity (the pod name in a cluster).
    pub identity: String,
    /// How long a Lease stays valid after its holder's last renewal.
    pub lease_duration: Duration,
    /// The holder renews this long before the Lease would expire.
    pub renew_margin: Duration,
}

impl LeaderElection {
    /// A default identity: `$POD_NAME`, else `<hostname>-<pid>`.
    pub fn default_identity() -> String {
        std::env::var("POD_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "keyhaven".into());
                format!("{host}-{}", std::process::id())
            })
    }

    /// Joins the election. The Lease is created when missing.
    pub async fn join(&self, client: Client) -> Result<Candidate, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client.clone(), &self.lease_name)
            .with_namespace(&self.namespace)
            .with_identity(&self.identity)
            .with_duration(self.lease_duration.as_secs().max(2))
            .with_grace(
                self.renew_margin
                    .as_secs()
                    .clamp(1, self.lease_duration.as_secs().max(2) - 1),
            )
            .build()
            .await?;
        let (state, task) = manager.watch().await;
        info!(lease = %self.lease_name, namespace = %self.namespace, identity = %self.identity, "joined the leader election");
        let (expired_tx, expired) = watch::channel(false);
        let watchdog = tokio::spawn(watchdog(
            Api::namespaced(client, &self.namespace),
            self.clone(),
            state.clone(),
            expired_tx,
        ));
        Ok(Candidate {
            state,
            task,
            expired,
            watchdog,
        })
    }
}

/// Sets `expired` when this process leads by its own account but the Lease no longer says
/// so: another holder is named, or our last renewal is older than the lease duration (the
/// renewals failed, e.g. the API server was unreachable; a standby may lead by now).
/// kube-lease-manager keeps retrying in that case without reporting the loss.
async fn watchdog(
    api: Api<Lease>,
    election: LeaderElection,
    state: watch::Receiver<bool>,
    expired: watch::Sender<bool>,
) {
    let period = (election.lease_duration / 4).max(Duration::from_millis(500));
    let mut confirmed = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        if !*state.borrow() {
            confirmed = Instant::now();
            continue;
        }
        match api.get(&election.lease_name).await {
            Ok(lease) => {
                let spec = lease.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
                    warn!(holder = ?spec.holder_identity, "the leader Lease names another holder");
                    let _ = expired.send(true);
                    return;
                }
                // renewTime is ours, written with this process's clock.
                let renewed_ago = spec.renew_time.map(|t| {
                    let ago = jiff::Timestamp::now().duration_since(t.0);
                    Duration::try_from(ago).unwrap_or_default()
                });
                if renewed_ago.is_some_and(|ago| ago < election.lease_duration) {
                    confirmed = Instant::now();
                }
            }
            Err(e) => warn!(error = %e, "could not read the leader Lease"),
        }
        if confirmed.elapsed() >= election.lease_duration {
            warn!("the leader Lease was not renewed within its duration");
            let _ = expired.send(true);
            return;
        }
    }
}

/// A process taking part in the election.
pub struct Candidate {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
    expired: watch::Receiver<bool>,
    watchdog: JoinHandle<()>,
}

impl Candidate {
    /// Waits until this process holds the Lease. `None` if the election task ended.
    pub async fn leading(&mut self) -> Option<()> {
        self.state.wait_for(|leader| *leader).await.ok().map(|_| ())
    }

    /// A future that completes when the Lease is lost: the election says so, the
    /// watchdog saw it expire or pass to another holder, or the election task ended.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut state = self.state.clone();
        let mut expired = self.expired.clone();
        async move {
            tokio::select! {
                _ = state.wait_for(|leader| !*leader) => {}
                _ = expired.wait_for(|expired| *expired) => {}
            }
        }
    }

    /// Whether this process holds the Lease now.
    pub fn is_leader(&self) -> bool {
        *self.state.borrow()
    }

    /// Leaves the election, releasing the Lease if held.
    pub async fn release(self) {
        self.watchdog.abort();
        drop(self.state); // the manager's task releases the Lease when its channel closes
        match self.task.await {
            Ok(Ok(_)) => info!("left the leader election (the Lease is released if it was held)"),
            Ok(Err(e)) => warn!(error = %e, "could not release the leader Lease"),
            Err(e) => warn!(error = %e, "leader election task failed"),
        }
    }
}
