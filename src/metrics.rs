//! Prometheus metrics: reconciles by kind, backend calls by store, versions written, and
//! gauges read from the caches at scrape time. Served on `/metrics` by [`crate::http`].
//!
//! One registry per process ([`Metrics::global`]): backends are wrapped where they are built
//! ([`metered`]), far from the [`Context`](crate::controller::Context) that holds the handle.

use crate::api::{ManagedSecret, SecretStore};
use crate::backend::{Backend, BackendError, Health, StoredVersion, VersionStamp};
use crate::secret_data::SecretData;
use async_trait::async_trait;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Instant;

/// Labels of the per-kind reconcile metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Labels of a failed reconcile: the kind and the error's reason (a CamelCase word).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
    reason: &'static str,
}

/// Labels of a backend call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    store: String,
    operation: &'static str,
    outcome: &'static str,
}

/// Labels of a backend call's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    store: String,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileLabels {
    profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    profile: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabels {
    namespace: String,
    name: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

type Latencies<L> = Family<L, Histogram>;

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_panics: Family<KindLabels, Counter>,
    reconcile_duration: Latencies<KindLabels>,
    backend_calls: Family<CallLabels, Counter>,
    backend_duration: Latencies<OperationLabels>,
    versions_written: Family<ProfileLabels, Counter>,
    refreshes_deferred: Counter,
    reconciles_waiting: Gauge,
    leader: Gauge,
    caches: Arc<CacheGauges>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every keyhaven metric (prefix `keyhaven_`).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyhaven");
        let reconciles = Family::<KindLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_panics = Family::<KindLabels, Counter>::default();
        let reconcile_duration = Latencies::<KindLabels>::new_with_constructor(latency_histogram);
        let backend_calls = Family::<CallLabels, Counter>::default();
        let backend_duration =
            Latencies::<OperationLabels>::new_with_constructor(latency_histogram);
        let versions_written = Family::<ProfileLabels, Counter>::default();
        let leader = Gauge::default();
        let caches = Arc::new(CacheGauges::default());
        registry.register("reconciles", "Reconciles run, by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_panics",
            "Reconciles that panicked (caught: that reconcile failed, the process went on), by kind",
            reconcile_panics.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile took, by kind",
            reconcile_duration.clone(),
        );
        registry.register(
            "backend_calls",
            "Calls to a store's backend, by store, operation and outcome (ok or the error kind)",
            backend_calls.clone(),
        );
        registry.register(
            "backend_call_duration_seconds",
            "Latency of calls to a store's backend, by store and operation",
            backend_duration.clone(),
        );
        registry.register(
            "versions_written",
            "New secret versions recorded, by profile",
            versions_written.clone(),
        );
        let refreshes_deferred = Counter::default();
        registry.register(
            "refreshes_deferred",
            "Periodic ManagedSecret refreshes postponed because new or changed ManagedSecrets were waiting",
            refreshes_deferred.clone(),
        );
        let reconciles_waiting = Gauge::default();
        registry.register(
            "reconciles_waiting",
            "ManagedSecret reconciles due and waiting for a free slot (--concurrency)",
            reconciles_waiting.clone(),
        );
        registry.register(
            "leader",
            "1 while this process holds the leader Lease (or runs without leader election)",
            leader.clone(),
        );
        registry.register_collector(Box::new(caches.clone()));
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_panics,
            reconcile_duration,
            backend_calls,
            backend_duration,
            versions_written,
            refreshes_deferred,
            reconciles_waiting,
            leader,
            caches,
        }
    }

    /// The process's metrics.
    pub fn global() -> Arc<Metrics> {
        static GLOBAL: LazyLock<Arc<Metrics>> = LazyLock::new(|| Arc::new(Metrics::new()));
        GLOBAL.clone()
    }

    /// Everything in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Runs a reconcile of `kind` on `object` (`namespace/name`, or the name), counting it,
    /// its failure reason and its duration. A panic in it fails this reconcile only: it
    /// becomes [`Error::Panicked`](crate::error::Error::Panicked), logged with the object's
    /// name (not the panic's message, which may quote a value) and counted.
    pub async fn reconcile<T>(
        &self,
        kind: &'static str,
        object: String,
        reconcile: impl Future<Output = crate::error::Result<T>>,
    ) -> crate::error::Result<T> {
        use futures::FutureExt as _;
        let start = Instant::now();
        let result = std::panic::AssertUnwindSafe(reconcile)
            .catch_unwind()
            .await
            .unwrap_or_else(|_panic| {
                tracing::error!(
                    kind,
                    object = %object,
                    "reconcile panicked: this reconcile failed and is retried with backoff"
                );
                self.reconcile_panics
                    .get_or_create(&KindLabels { kind })
                    .inc();
                Err(crate::error::Error::Panicked { kind, object })
            });
        let labels = KindLabels { kind };
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    kind,
                    reason: e.reason().as_str(),
                })
                .inc();
        }
        result
    }

    /// A new version was recorded for a ManagedSecret of `profile`.
    pub fn version_written(&self, profile: &str) {
        self.versions_written
            .get_or_create(&ProfileLabels {
                profile: profile.to_owned(),
            })
            .inc();
    }

    /// A periodic refresh stepped aside for new or changed ManagedSecrets.
    pub fn refresh_deferred(&self) {
        self.refreshes_deferred.inc();
    }

    /// How many ManagedSecret reconciles wait for a slot.
    pub fn set_reconciles_waiting(&self, n: usize) {
        self.reconciles_waiting
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Whether this process leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Reads the per-store and per-phase gauges from these caches at each scrape.
    pub fn watch_caches(&self, stores: Store<SecretStore>, managed: Store<ManagedSecret>) {
        let _ = self.caches.stores.set(stores);
        let _ = self.caches.managed.set(managed);
    }

    fn backend_call(&self, store: &str, operation: &'static str, outcome: &'static str, s: f64) {
        self.backend_calls
            .get_or_create(&CallLabels {
                store: store.to_owned(),
                operation,
                outcome,
            })
            .inc();
        self.backend_duration
            .get_or_create(&OperationLabels {
                store: store.to_owned(),
                operation,
            })
            .observe(s);
    }
}

/// Gauges computed from the controllers' caches when scraped: nothing to keep in step.
#[derive(Default)]
struct CacheGauges {
    stores: OnceLock<Store<SecretStore>>,
    managed: OnceLock<Store<ManagedSecret>>,
}

impl std::fmt::Debug for CacheGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheGauges").finish_non_exhaustive()
    }
}

impl Collector for CacheGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(stores) = self.stores.get() {
            encode_stores(&mut encoder, stores)?;
        }
        if let Some(managed) = self.managed.get() {
            encode_managed(&mut encoder, managed)?;
        }
        Ok(())
    }
}

/// Writes one metric with its name and help text.
fn emit(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

/// Per store: the secrets it holds and whether it is Active.
fn encode_stores(
    encoder: &mut DescriptorEncoder,
    stores: &Store<SecretStore>,
) -> Result<(), std::fmt::Error> {
    let secrets = Family::<StoreLabels, Gauge>::default();
    let active = Family::<StoreLabels, Gauge>::default();
    for store in stores.state() {
        let labels = StoreLabels {
            store: store.name_any(),
        };
        let status = store.status.as_ref();
        let count = status.and_then(|s| s.secrets).unwrap_or(0);
        secrets
            .get_or_create(&labels)
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        let is_active = status
            .and_then(|s| s.phase.as_ref())
            .is_some_and(|p| *p == crate::api::StorePhase::Active);
        active.get_or_create(&labels).set(i64::from(is_active));
    }
    emit(
        encoder,
        "store_secrets",
        "Secret objects a store holds for keyhaven (its status.secrets)",
        &secrets,
    )?;
    emit(
        encoder,
        "store_active",
        "1 when a store's phase is Active",
        &active,
    )
}

/// Of the ManagedSecrets: each one's expiry, how many are expiring, how many are in each
/// phase.
fn encode_managed(
    encoder: &mut DescriptorEncoder,
    managed: &Store<ManagedSecret>,
) -> Result<(), std::fmt::Error> {
    let mut by_phase: BTreeMap<String, i64> = BTreeMap::new();
    let expiry = Family::<ObjectLabels, Gauge>::default();
    let expiring = Gauge::<i64>::default();
    for ms in managed.state() {
        let status = ms.status.as_ref();
        // Not synced yet: no phase written.
        let phase = status
            .and_then(|s| s.phase)
            .map_or("Pending", |p| p.as_str())
            .to_owned();
        *by_phase.entry(phase).or_default() += 1;
        if let Some(at) = status.and_then(|s| s.expires_at.as_ref()) {
            expiry
                .get_or_create(&ObjectLabels {
                    namespace: ms.namespace().unwrap_or_default(),
                    name: ms.name_any(),
                })
                .set(at.0.as_second());
        }
        let is_expiring = status.is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == crate::api::ConditionType::Expiring.as_str() && c.status == "True"
            })
        });
        if is_expiring {
            expiring.inc();
        }
    }
    emit(
        encoder,
        "secret_expiry_timestamp_seconds",
        "When a ManagedSecret's current value expires (api-key expires-at, certificate notAfter, jwt exp), Unix time",
        &expiry,
    )?;
    emit(
        encoder,
        "managed_secrets_expiring",
        "ManagedSecrets whose value expires within their expiryWarning window (condition Expiring=True)",
        &expiring,
    )?;
    let noncompliant = Family::<RuleLabels, Gauge>::default();
    let all = managed.state();
    for ((profile, rule), n) in noncompliant_counts(all.iter().map(|m| m.as_ref())) {
        noncompliant
            .get_or_create(&RuleLabels { profile, rule })
            .set(n);
    }
    emit(
        encoder,
        "noncompliant_secrets",
        "ManagedSecrets breaking a compliance rule of their profile, by profile and rule",
        &noncompliant,
    )?;
    let family = Family::<PhaseLabels, Gauge>::default();
    for (phase, n) in by_phase {
        family.get_or_create(&PhaseLabels { phase }).set(n);
    }
    emit(
        encoder,
        "managed_secrets",
        "ManagedSecrets in the cache, by status phase",
        &family,
    )
}

/// Non-compliant ManagedSecrets per (profile, failing rule).
pub fn noncompliant_counts<'a>(
    managed: impl Iterator<Item = &'a ManagedSecret>,
) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    for ms in managed {
        let Some(status) = ms.status.as_ref() else {
            continue;
        };
        let (Some(profile), Some(c)) = (&status.profile, &status.compliance) else {
            continue;
        };
        if c.state != crate::api::ComplianceState::NonCompliant {
            continue;
        }
        for rule in &c.failing {
            *out.entry((profile.clone(), rule.clone())).or_default() += 1;
        }
    }
    out
}

/// Wraps a freshly built backend so that its calls are counted and timed (by store).
pub fn metered(backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
    Arc::new(MeteredBackend {
        inner: backend,
        metrics: Metrics::global(),
    })
}

/// A [`Backend`] that records each call's outcome and latency.
struct MeteredBackend {
    inner: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
}

impl MeteredBackend {
    /// Runs `call`, recording its latency and the outcome `outcome` reads from its result.
    async fn measured<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = T>,
        outcome: impl FnOnce(&T) -> &'static str,
    ) -> T {
        let start = Instant::now();
        let result = call.await;
        self.metrics.backend_call(
            self.inner.store(),
            operation,
            outcome(&result),
            start.elapsed().as_secs_f64(),
        );
        result
    }

    /// Runs a fallible `call`: its outcome is `ok` or the error's kind.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        self.measured(operation, call, |result| match result {
            Ok(_) => "ok",
            Err(e) => outcome(e),
        })
        .await
    }
}

/// The error's kind as a label value: a fixed word, never the message.
fn outcome(e: &BackendError) -> &'static str {
    match e {
        BackendError::Unreachable { .. } => "unreachable",
        BackendError::Sealed { .. } => "sealed",
        BackendError::Invalid { .. } => "invalid",
        BackendError::Conflict { .. } => "conflict",
        _ => "error",
    }
}

#[async_trait]
impl Backend for MeteredBackend {
    fn store(&self) -> &str {
        self.inner.store()
    }

    async fn read(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<StoredVersion>, BackendError> {
        self.timed("read", self.inner.read(path, version)).await
    }

    async fn write(
        &self,
        path: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<Option<u64>, BackendError> {
        self.timed("write", self.inner.write(path, stamp, data))
            .await
    }

    async fn list_versions(&self, path: &str) -> Result<Vec<u64>, BackendError> {
        self.timed("list_versions", self.inner.list_versions(path))
            .await
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.timed("delete", self.inner.delete(path)).await
    }

    async fn prune(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>, BackendError> {
        self.timed("prune", self.inner.prune(path, versions)).await
    }

    async fn health(&self) -> Health {
        self.measured("health", self.inner.health(), |health| {
            if health.phase == crate::api::StorePhase::Active {
                "ok"
            } else {
                "unhealthy"
            }
        })
        .await
    }

    async fn count(&self) -> Result<u64, BackendError> {
        self.timed("count", self.inner.count()).await
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reconciles_are_counted_by_kind_and_reason() {
        let m = Metrics::new();
        m.reconcile("SecretStore", "s".into(), async { Ok(()) })
            .await
            .unwrap();
        let _ = m
            .reconcile::<()>("ManagedSecret", "n/m".into(), async {
                Err(crate::error::Error::config(
                    crate::api::Reason::StoreNotFound,
                    "no such store",
                ))
            })
            .await;
        m.version_written("prod");
        m.set_leader(true);
        let text = m.encode();
        assert!(
            text.contains(r#"keyhaven_reconciles_total{kind="SecretStore"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"keyhaven_reconcile_errors_total{kind="ManagedSecret",reason="StoreNotFound"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"keyhaven_versions_written_total{profile="prod"} 1"#));
        assert!(text.contains("keyhaven_leader 1"));
        assert!(text.contains("keyhaven_reconcile_duration_seconds_bucket"));
        assert!(
            !text.contains("no such store"),
            "messages never become labels"
        );
    }

    #[tokio::test]
    async fn a_panicking_reconcile_fails_that_reconcile_and_is_counted() {
        let m = Metrics::new();
        let secret = "hunter2";
        let e = m
            .reconcile::<()>("ManagedSecret", "team-a/db".into(), async {
                if !secret.is_empty() {
                    panic!("index out of range near {secret}");
                }
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(
            &e,
            crate::error::Error::Panicked { kind: "ManagedSecret", object } if object == "team-a/db"
        ));
        assert_eq!(e.reason(), crate::api::Reason::ReconcilePanicked);
        assert!(!e.to_string().contains(secret), "{e}");
        // The process goes on: the next reconcile runs.
        m.reconcile("ManagedSecret", "team-a/db".into(), async { Ok(()) })
            .await
            .unwrap();
        let text = m.encode();
        assert!(
            text.contains(r#"keyhaven_reconcile_panics_total{kind="ManagedSecret"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"keyhaven_reconcile_errors_total{kind="ManagedSecret",reason="ReconcilePanicked"} 1"#
        ));
        assert!(!text.contains(secret));
    }

    #[test]
    fn noncompliant_secrets_count_per_profile_and_rule() {
        let ms = |state: &str, failing: &[&str]| -> ManagedSecret {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                "metadata": {"name": "x", "namespace": "n"},
                "spec": {"type": "password", "content": {"fromStore": {}}},
                "status": {"profile": "p", "compliance": {"state": state, "failing": failing,
                    "enforcement": "Warn", "checkedAt": "2026-12-01T00:00:00Z"}}}))
            .unwrap()
        };
        let all = [
            ms(
                "NonCompliant",
                &["password-min-length", "password-min-entropy"],
            ),
            ms("NonCompliant", &["password-min-length"]),
            ms("Compliant", &[]),
        ];
        let counts = noncompliant_counts(all.iter());
        assert_eq!(counts[&("p".into(), "password-min-length".into())], 2);
        assert_eq!(counts[&("p".into(), "password-min-entropy".into())], 1);
        assert_eq!(counts.len(), 2);
    }

    /// A panic is caught only when it unwinds: the release profile must not abort.
    #[test]
    fn no_profile_aborts_on_panic() {
        let manifest = include_str!("../Cargo.toml");
        assert!(
            !manifest.replace(' ', "").contains("panic=\"abort\""),
            "panic = \"abort\" would end the process on any reconcile's panic"
        );
    }
}
