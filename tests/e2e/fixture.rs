//! A keyhaven test on the bed: the CRDs installed, a namespace of its own, an operator
//! process scoped to it, and helpers to make stores, profiles and ManagedSecrets and wait
//! for their status. Everything cluster-scoped it creates carries the scope label and is
//! deleted when the fixture drops.

use super::leaks::{self, Leaks};
use super::operator::{Metrics, Operator, SCOPE_LABEL, Work};
use futures::Future;
use k8s_openapi::api::core::v1::{Event, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keyhaven::api::{ManagedSecret, SecretStore, SecretStoreStatus, VaultProfile};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

pub struct Fixture {
    pub client: Client,
    /// The test's namespace: its ManagedSecrets and native Secrets live here.
    pub ns: String,
    pub op: Operator,
    pub kubeconfig: std::path::PathBuf,
    /// Extra namespaces the test made (kubernetes stores), deleted at the end.
    extra_namespaces: std::sync::Mutex<Vec<String>>,
    /// The values the test wrote or read, looked for when the fixture drops (see
    /// [`super::leaks`]): the harness registers what goes through it, tests what they write
    /// otherwise ([`Fixture::register`]).
    pub leaks: Leaks,
}

/// The version numbers a ManagedSecret's status lists, oldest first.
pub fn versions(ms: &ManagedSecret) -> Vec<u64> {
    ms.status
        .as_ref()
        .map(|s| s.versions.iter().map(|v| v.version).collect())
        .unwrap_or_default()
}

impl Fixture {
    /// The internal store `store` as the operator of this fixture sees it (same namespace,
    /// same keys).
    pub async fn internal_store(&self, store: &str) -> keyhaven::backend::InternalStore {
        let keys =
            keyhaven::crypto::OperatorKeys::load_or_create(self.client.clone(), &self.op.namespace)
                .await
                .unwrap();
        keyhaven::backend::InternalStore::new(
            store,
            self.client.clone(),
            &self.op.namespace,
            keys.master,
        )
    }

    /// Installs the CRDs, creates a namespace for the test and starts an operator for it.
    pub async fn new(name: &str) -> Fixture {
        Fixture::new_with(name, &[]).await
    }

    /// Like [`Fixture::new`], with `extra_args` appended to the operator's command line.
    pub async fn new_with(name: &str, extra_args: &[&str]) -> Fixture {
        keyhaven::install_crypto_provider();
        let bed = super::Testbed::load();
        let client = bed.client().await;
        install_crds(&client).await;
        let ns = format!("{name}-{}", super::unique_suffix());
        create_namespace(&client, &ns).await;
        let op = Operator::start_with(&bed.kubeconfig, &ns, "", extra_args);
        Fixture {
            client,
            ns,
            op,
            kubeconfig: bed.kubeconfig.clone(),
            extra_namespaces: Default::default(),
            leaks: Leaks::default(),
        }
    }

    /// Looks for `value` in the operator's log, the Events, the statuses and the metrics
    /// when the test ends: for what a test writes without the harness (vaultrs, its own
    /// Secrets).
    pub fn register(&self, value: impl AsRef<[u8]>) {
        self.leaks.register(value);
    }

    /// The test's namespace, the extra ones it made, and the operator's.
    pub fn namespaces(&self) -> Vec<String> {
        let mut out = vec![self.ns.clone()];
        out.extend(self.extra_namespaces.lock().unwrap().iter().cloned());
        out.push(self.op.namespace.clone());
        out
    }

    /// A name unique to this test for a cluster-scoped object.
    pub fn scoped(&self, name: &str) -> String {
        format!("{}-{name}", self.ns)
    }

    /// Creates a namespace deleted with the fixture.
    pub async fn namespace(&self, suffix: &str) -> String {
        let name = self.scoped(suffix);
        create_namespace(&self.client, &name).await;
        self.extra_namespaces.lock().unwrap().push(name.clone());
        name
    }

    /// A namespace `<ns>-<suffix>` set aside for kubernetes stores (labelled
    /// `keyhaven.io/store-namespace=true`): the ManagedSecrets of other namespaces may keep
    /// versions there.
    pub async fn store_namespace(&self, suffix: &str) -> String {
        let name = self.namespace(suffix).await;
        let patch = json!({"metadata": {"labels": {"keyhaven.io/store-namespace": "true"}}});
        self.cluster_api::<Namespace>()
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("label namespace {name}: {e}"));
        name
    }

    /// Server-side applies `obj` (a JSON manifest) through `api` as the test's field manager.
    pub async fn apply<K>(&self, api: Api<K>, obj: Value) -> K
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    {
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("manifest has a name")
            .to_owned();
        api.patch(
            &name,
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {} {name}: {e}", K::kind(&())))
    }

    /// The API of a namespaced kind in `namespace`.
    pub fn ns_api<K: Resource<DynamicType = (), Scope = NamespaceResourceScope>>(
        &self,
        namespace: &str,
    ) -> Api<K> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The API of a kind across the cluster.
    pub fn cluster_api<K: Resource<DynamicType = ()>>(&self) -> Api<K> {
        Api::all(self.client.clone())
    }

    /// A SecretStore named `<ns>-<name>` with `provider`, scoped to this test's operator.
    pub async fn store(&self, name: &str, provider: Value) -> String {
        let full = self.scoped(name);
        self.apply::<SecretStore>(
            self.cluster_api(),
            json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretStore",
                "metadata": {"name": full, "labels": {SCOPE_LABEL: self.ns}},
                "spec": {"provider": provider},
            }),
        )
        .await;
        full
    }

    /// A VaultProfile named `<ns>-<name>`.
    pub async fn profile(&self, name: &str, source: &str, targets: &[&str]) -> String {
        let full = self.scoped(name);
        self.apply::<VaultProfile>(
            self.cluster_api(),
            json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
                "metadata": {"name": full, "labels": {SCOPE_LABEL: self.ns}},
                "spec": {"source": source, "syncTargets": targets},
            }),
        )
        .await;
        full
    }

    /// A VaultProfile named `<ns>-<name>` with the whole `spec` given (namespaceSelector,
    /// default, fallback, ...), scoped to this test's operator.
    pub async fn profile_spec(&self, name: &str, spec: Value) -> String {
        let full = self.scoped(name);
        self.apply::<VaultProfile>(
            self.cluster_api(),
            json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
                "metadata": {"name": full, "labels": {SCOPE_LABEL: self.ns}},
                "spec": spec,
            }),
        )
        .await;
        full
    }

    /// Merge-patches the test namespace's labels and annotations (a null value removes one).
    pub async fn label_namespace(&self, labels: Value, annotations: Value) {
        let patch = json!({"metadata": {"labels": labels, "annotations": annotations}});
        self.cluster_api::<Namespace>()
            .patch(&self.ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("patch namespace {}: {e}", self.ns));
    }

    /// A ManagedSecret in the test namespace.
    pub async fn managed_secret(&self, name: &str, spec: Value) -> ManagedSecret {
        self.apply(
            self.ns_api(&self.ns),
            json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": spec,
            }),
        )
        .await
    }

    /// Bumps the annotation `e2e.keyhaven.io/poke` of the ManagedSecret `name`: annotations
    /// are reconcile inputs, so the operator reconciles it now, and this one means nothing
    /// to keyhaven.
    pub async fn poke_managed(&self, name: &str) {
        let patch = json!({"metadata": {"annotations": {POKE: next_poke()}}});
        self.ns_api::<ManagedSecret>(&self.ns)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("poke ManagedSecret {name}: {e}"));
    }

    /// Bumps the annotation `e2e.keyhaven.io/poke` of the SecretStore `name` (a health check
    /// now instead of at its next periodic one).
    pub async fn poke_store(&self, name: &str) {
        let patch = json!({"metadata": {"annotations": {POKE: next_poke()}}});
        self.cluster_api::<SecretStore>()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("poke SecretStore {name}: {e}"));
    }

    /// Makes the operator reconcile the ManagedSecret `name` `times` times, one after the
    /// other: each time a poke, then a wait (up to 30 s) until it counts one more
    /// ManagedSecret reconcile and one more of each of `also` (e.g. a read of the store
    /// `name` uses, or a failure with the reason its status shows). Returns the scrapes of
    /// before and after.
    ///
    /// For a window in which a test expects nothing to change while the ManagedSecret
    /// waits out a backoff (a failing store: 30 s) or a long refresh interval: without it,
    /// "nothing changed" could mean "nothing ran".
    pub async fn reconcile_managed(
        &self,
        name: &str,
        times: u64,
        also: &[Work],
    ) -> (Metrics, Metrics) {
        self.reconcile_times("ManagedSecret", name, times, also)
            .await
    }

    /// Like [`Fixture::reconcile_managed`], for the SecretStore `name`.
    pub async fn reconcile_store(
        &self,
        name: &str,
        times: u64,
        also: &[Work],
    ) -> (Metrics, Metrics) {
        self.reconcile_times("SecretStore", name, times, also).await
    }

    async fn reconcile_times(
        &self,
        kind: &str,
        name: &str,
        times: u64,
        also: &[Work],
    ) -> (Metrics, Metrics) {
        let first = self.op.metrics().await;
        let mut last = first.clone();
        let mut work = vec![(Work::reconciles(kind), 1)];
        work.extend(also.iter().cloned().map(|w| (w, 1)));
        for _ in 0..times {
            match kind {
                "ManagedSecret" => self.poke_managed(name).await,
                _ => self.poke_store(name).await,
            }
            last = self
                .op
                .wait_work(&last, &work, Duration::from_secs(30))
                .await;
        }
        (first, last)
    }

    /// A vault SecretStore `name` on the bed's OpenBao (KV `version` at `mount`), logged in
    /// with the bed's token (the Secret `bao-token` of the operator's namespace).
    pub async fn bao_store(&self, name: &str, mount: &str, version: &str) -> String {
        let bed = super::Testbed::load();
        self.secret(
            &self.op.namespace,
            "bao-token",
            &[("token", &bed.vault_token)],
        )
        .await;
        self.store(
            name,
            json!({"vault": {"server": bed.vault_addr, "mount": mount, "version": version,
                "insecureHTTP": true,
                "auth": {"tokenSecretRef": {"name": "bao-token", "key": "token"}}}}),
        )
        .await
    }

    /// A plain Secret with string values.
    pub async fn secret(&self, namespace: &str, name: &str, values: &[(&str, &str)]) -> Secret {
        self.secret_labelled(namespace, name, json!({}), values)
            .await
    }

    /// A plain Secret with string values and `labels`, replacing any Secret of that name.
    async fn secret_labelled(
        &self,
        namespace: &str,
        name: &str,
        labels: Value,
        values: &[(&str, &str)],
    ) -> Secret {
        let data: BTreeMap<&str, &str> = values.iter().copied().collect();
        data.iter()
            .for_each(|(k, v)| self.leaks.register_data(k, v));
        // Replace, not merge: keys absent from `values` go.
        let api = self.ns_api::<Secret>(namespace);
        let _ = api.delete(name, &DeleteParams::default()).await;
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "stringData": data,
            }))
            .unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("create Secret {namespace}/{name}: {e}"))
    }

    /// A plain Secret made by hand for the kubernetes store `store`: it carries the store's
    /// labels, without which the store ignores it.
    pub async fn store_secret(
        &self,
        store: &str,
        namespace: &str,
        name: &str,
        values: &[(&str, &str)],
    ) -> Secret {
        let labels =
            json!({"app.kubernetes.io/managed-by": "keyhaven", "keyhaven.io/store": store});
        self.secret_labelled(namespace, name, labels, values).await
    }

    /// Waits until the ManagedSecret `name` satisfies `ok`, or panics with its last status.
    pub async fn wait_managed(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&ManagedSecret) -> bool,
    ) -> ManagedSecret {
        self.wait_managed_in(&self.ns, name, what, ok).await
    }

    /// [`Fixture::wait_managed`] of a ManagedSecret in `namespace`.
    pub async fn wait_managed_in(
        &self,
        namespace: &str,
        name: &str,
        what: &str,
        ok: impl Fn(&ManagedSecret) -> bool,
    ) -> ManagedSecret {
        let api = self.ns_api::<ManagedSecret>(namespace);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = api.get_opt(name).await.ok().flatten();
            if let Some(ms) = last.as_ref().filter(|ms| ok(ms)) {
                return ms.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "ManagedSecret {name}: {what}: not reached in 60s; status: {:#?}",
                    last.and_then(|m| m.status)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the VaultProfile `profile` has condition `type_` with `status`; returns it
    /// and the profile's status message.
    pub async fn wait_profile_condition(
        &self,
        profile: &str,
        type_: &str,
        status: &str,
    ) -> (
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
        String,
    ) {
        let api: Api<VaultProfile> = self.cluster_api();
        let found = wait_until(Duration::from_secs(60), || async {
            let p = api.get(profile).await.ok()?;
            let st = p.status?;
            let c = st
                .conditions
                .into_iter()
                .find(|c| c.type_ == type_ && c.status == status)?;
            Some((c, st.message.unwrap_or_default()))
        })
        .await;
        match found {
            Some(found) => found,
            None => panic!(
                "VaultProfile {profile}: no {type_}={status} in 60s; status: {:#?}",
                api.get(profile).await.ok().and_then(|p| p.status)
            ),
        }
    }

    /// Waits until the ManagedSecret holds `version` and is Synced.
    pub async fn wait_synced(&self, name: &str, version: u64) -> ManagedSecret {
        self.wait_synced_in(&self.ns, name, version).await
    }

    /// [`Fixture::wait_synced`] of a ManagedSecret in `namespace`.
    pub async fn wait_synced_in(&self, namespace: &str, name: &str, version: u64) -> ManagedSecret {
        let what = format!("Synced at version {version}");
        self.wait_managed_in(namespace, name, &what, |ms| {
            ms.status.as_ref().is_some_and(|s| {
                s.phase.is_some_and(|p| p == "Synced") && s.current_version == Some(version)
            })
        })
        .await
    }

    /// Waits for a condition `Ready=False` with `reason`.
    pub async fn wait_not_ready(&self, name: &str, reason: &str) -> ManagedSecret {
        self.wait_managed(name, &format!("Ready=False/{reason}"), |ms| {
            ms.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == reason)
            })
        })
        .await
    }

    /// The data of a Secret as strings, or None when it does not exist.
    pub async fn secret_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<BTreeMap<String, String>> {
        let s = self
            .ns_api::<Secret>(namespace)
            .get_opt(name)
            .await
            .unwrap()?;
        Some(
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    self.leaks.register_data(&k, &v.0);
                    (k, String::from_utf8_lossy(&v.0).into_owned())
                })
                .collect(),
        )
    }

    /// Every Event about this test's objects (namespaced ones and the cluster-scoped stores
    /// and profiles, whose Events land in `default`), as "reason: note" lines.
    pub async fn events(&self) -> Vec<String> {
        let mut out = vec![];
        for ns in [self.ns.as_str(), "default"] {
            let list = self
                .ns_api::<Event>(ns)
                .list(&ListParams::default())
                .await
                .unwrap();
            for e in list.items {
                let name = e.involved_object.name.clone().unwrap_or_default();
                if ns == self.ns || name.starts_with(&self.ns) {
                    out.push(format!(
                        "{}: {}",
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default()
                    ));
                }
            }
        }
        out
    }

    /// Waits until an Event with `reason` (and a note containing `text`) exists.
    pub async fn wait_event(&self, reason: &str, text: &str) -> String {
        let prefix = format!("{reason}: ");
        let found = wait_until(Duration::from_secs(60), || async {
            self.events()
                .await
                .into_iter()
                .find(|e| e.starts_with(&prefix) && e.contains(text))
        })
        .await;
        match found {
            Some(e) => e,
            None => panic!(
                "no {reason} Event mentioning {text:?}; events: {:#?}",
                self.events().await
            ),
        }
    }

    /// Waits until the SecretStore's status satisfies `ok`, or panics with its last status.
    pub async fn wait_store(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&SecretStoreStatus) -> bool,
    ) -> SecretStoreStatus {
        let api: Api<SecretStore> = self.cluster_api();
        let found = wait_until(timeout, || async {
            api.get(name).await.ok()?.status.filter(|s| ok(s))
        })
        .await;
        match found {
            Some(s) => s,
            None => panic!(
                "SecretStore {name}: {what}: not reached in {timeout:?}; status: {:#?}",
                api.get(name).await.ok().and_then(|s| s.status)
            ),
        }
    }

    /// Secret values never reach the operator's log or any Event (any length); then the
    /// whole leak check, now, of these and every value registered so far.
    pub async fn assert_values_never_leaked(&self, values: &[&str]) {
        let log = self.op.log_text();
        assert!(
            !log.is_empty(),
            "the operator logged nothing at all: is it running?"
        );
        let events = self.events().await.join("\n");
        for v in values {
            assert!(
                !log.contains(v),
                "a secret value appears in the operator log {}",
                self.op.log.display()
            );
            assert!(!events.contains(v), "a secret value appears in an Event");
            self.register(v);
        }
        let findings = leaks::check(self).await;
        assert!(
            findings.is_empty(),
            "{}",
            leaks::report(&findings, &self.op.log)
        );
    }
}

impl Drop for Fixture {
    /// The leak check (unless the test failed already), then the cleanup; then fails the
    /// test if the check found anything.
    fn drop(&mut self) {
        let findings = match std::thread::panicking() {
            true => vec![],
            false => leaks::check_blocking(self),
        };
        self.op.kill();
        let mut namespaces = std::mem::take(&mut *self.extra_namespaces.lock().unwrap());
        namespaces.push(self.ns.clone());
        namespaces.push(self.op.namespace.clone());
        let scope = self.ns.clone();
        // A fresh client on its own runtime: this test's runtime is blocked in Drop.
        super::cleanup_blocking(&self.kubeconfig, move |client| async move {
            let lp = ListParams::default().labels(&format!("{SCOPE_LABEL}={scope}"));
            let dp = DeleteParams::default();
            // With the operator gone, finalizers are removed by hand so the namespace can go.
            let managed: Api<ManagedSecret> = Api::namespaced(client.clone(), &scope);
            if let Ok(list) = managed.list(&ListParams::default()).await {
                for ms in list.items {
                    let patch = Patch::Merge(json!({"metadata": {"finalizers": null}}));
                    let _ = managed
                        .patch(&ms.name_any(), &PatchParams::default(), &patch)
                        .await;
                }
            }
            // Stores carry the removal guard's finalizer, which only the operator removes.
            let stores: Api<SecretStore> = Api::all(client.clone());
            if let Ok(list) = stores.list(&lp).await {
                for store in list.items {
                    let patch = Patch::Merge(json!({"metadata": {"finalizers": null}}));
                    let _ = stores
                        .patch(&store.name_any(), &PatchParams::default(), &patch)
                        .await;
                }
            }
            let _ = Api::<VaultProfile>::all(client.clone())
                .delete_collection(&dp, &lp)
                .await;
            let _ = Api::<SecretStore>::all(client.clone())
                .delete_collection(&dp, &lp)
                .await;
            let nss: Api<Namespace> = Api::all(client.clone());
            for ns in namespaces {
                let _ = nss.delete(&ns, &dp).await;
            }
            Ok(())
        });
        if !findings.is_empty() {
            panic!("{}", leaks::report(&findings, &self.op.log));
        }
    }
}

/// The annotation [`Fixture::poke_managed`] and [`Fixture::poke_store`] bump.
const POKE: &str = "e2e.keyhaven.io/poke";

fn next_poke() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    n.to_string()
}

/// Polls `probe` every 250 ms until it returns Some, or `timeout` passes.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn create_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"keyhaven.io/e2e": "true"}}}),
    )
    .unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
}

/// Applies the CRDs generated from the Rust types and waits until they are Established.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in keyhaven::api::crds() {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
        let established = wait_until(Duration::from_secs(30), || async {
            let c = api.get(&name).await.ok()?;
            let conds = c.status?.conditions?;
            conds
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await;
        assert!(established.is_some(), "CRD {name} not Established");
    }
}
