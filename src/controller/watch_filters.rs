//! The stateful filters on the controllers' watch streams: which change of one kind
//! reconciles which objects of another, decided without the API server, each with its tests.

use crate::api::{ManagedSecret, SecretStore, StorePhase, VaultProfile};
use futures::channel::mpsc::UnboundedSender;
use kube::api::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Drops the field sets of `managedFields` from a cached object: keyhaven reads only who
/// changed an object and when (a version's author), and the field sets are often the
/// largest part of a cached object's metadata.
pub fn trim_managed_fields(meta: &mut ObjectMeta) {
    for entry in meta.managed_fields.iter_mut().flatten() {
        entry.fields_v1 = None;
    }
}

/// What a reconcile reads of an object's own metadata and spec: generation, labels,
/// annotations (rotate, force-delete), finalizers, deletion. Not its status: without this
/// filter, every status write of our own would reconcile the object a second time.
pub fn reconcile_inputs<K: Resource>(obj: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let m = obj.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        m.generation,
        &m.labels,
        &m.annotations,
        &m.finalizers,
        m.deletion_timestamp.is_some(),
    )
        .hash(&mut h);
    Some(h.finish())
}

/// Every profile change (not a status write) reaches the ManagedSecret controller and
/// re-checks every profile's conflicts. A profile's status (its counts) changes as its
/// ManagedSecrets sync; fanning each of those out to every ManagedSecret of the profile
/// made the work of a sync of N secrets grow as N².
pub struct ProfileChanges {
    inputs: HashMap<String, Option<u64>>,
    changed: UnboundedSender<VaultProfile>,
    recheck: UnboundedSender<()>,
}

impl ProfileChanges {
    pub fn new(changed: UnboundedSender<VaultProfile>, recheck: UnboundedSender<()>) -> Self {
        ProfileChanges {
            inputs: HashMap::new(),
            changed,
            recheck,
        }
    }

    pub fn see(&mut self, event: &watcher::Event<VaultProfile>) {
        let changed = match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                let now = reconcile_inputs(p);
                (self.inputs.insert(p.name_any(), now) != Some(now)).then_some(p)
            }
            watcher::Event::Delete(p) => {
                self.inputs.remove(&p.name_any());
                Some(p)
            }
            _ => None,
        };
        if let Some(p) = changed {
            let _ = self.changed.unbounded_send(p.clone());
            let _ = self.recheck.unbounded_send(());
        }
    }
}

/// A store that is Active again after it was Sealed, Unreachable or Invalid wakes the
/// ManagedSecrets of every profile that uses it: they failed on it and would otherwise wait
/// out their retry (30 s after a sealed store). The fault suite measured 23 s of recovery
/// after OpenBao restarted (sealed for a moment) and 26 s after the HSM token came back.
pub struct StoreRecoveries {
    phases: HashMap<String, Option<StorePhase>>,
    recovered: UnboundedSender<SecretStore>,
}

impl StoreRecoveries {
    pub fn new(recovered: UnboundedSender<SecretStore>) -> Self {
        StoreRecoveries {
            phases: HashMap::new(),
            recovered,
        }
    }

    pub fn see(&mut self, event: &watcher::Event<SecretStore>) {
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                let now = s.status.as_ref().and_then(|st| st.phase);
                let before = self.phases.insert(s.name_any(), now).flatten();
                // A relist after a watch gap (InitApply) counts too: the change happened.
                if recovered(before, now) {
                    let _ = self.recovered.unbounded_send(s.clone());
                }
            }
            watcher::Event::Delete(s) => {
                self.phases.remove(&s.name_any());
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

/// Whether a store's phase went from unusable (Sealed, Unreachable, Invalid) to Active.
pub fn recovered(before: Option<StorePhase>, now: Option<StorePhase>) -> bool {
    now == Some(StorePhase::Active)
        && matches!(
            before,
            Some(StorePhase::Sealed | StorePhase::Unreachable | StorePhase::Invalid)
        )
}

/// The ManagedSecrets that use `store`: those whose profile (named in the spec, or the one
/// the status says it resolved to) reads or writes it.
pub fn using_store(
    store: &str,
    profiles: &[Arc<VaultProfile>],
    managed: &[Arc<ManagedSecret>],
) -> Vec<ObjectRef<ManagedSecret>> {
    let using: HashSet<String> = profiles
        .iter()
        .filter(|p| p.spec.stores().any(|s| s == store))
        .map(|p| p.name_any())
        .collect();
    managed
        .iter()
        .filter(|m| {
            let resolved = m.status.as_ref().and_then(|s| s.profile.as_deref());
            m.spec
                .profile
                .as_deref()
                .into_iter()
                .chain(resolved)
                .any(|p| using.contains(p))
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// How a watch that failed waits before its next try: 250 ms, doubling to at most 5 s
/// (±20 % jitter), from the start again after any event. kube's default (800 ms doubling to
/// 30 s, reset only after two quiet minutes) kept the ManagedSecret cache a minute behind
/// after an API server restart (the fault suite: 76 s to recover, 8 s before); no backoff
/// at all retries a refused connection in a hot loop.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(250);
    const MOST: std::time::Duration = std::time::Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MOST);
        Some(wait.mul_f64(0.8 + rand::random::<f64>() * 0.4))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The ManagedSecrets that push Secret `name` of `namespace` (`content.fromSecret`): only
/// those of its own namespace, whatever another namespace's secrets name.
pub fn pushing(
    namespace: &str,
    name: &str,
    managed: &[Arc<ManagedSecret>],
) -> Vec<ObjectRef<ManagedSecret>> {
    managed
        .iter()
        .filter(|m| m.namespace().as_deref() == Some(namespace))
        .filter(|m| {
            m.spec
                .content
                .from_secret
                .as_ref()
                .is_some_and(|f| f.name == name)
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// A ManagedSecret that comes, goes or changes profile changes its profiles' counts: those
/// re-check. The first full list marks the ManagedSecret cache listed.
pub struct ProfileCounts {
    profiles: HashMap<(String, String), Option<String>>,
    listed: Arc<AtomicBool>,
    recheck: UnboundedSender<()>,
}

impl ProfileCounts {
    pub fn new(listed: Arc<AtomicBool>, recheck: UnboundedSender<()>) -> Self {
        ProfileCounts {
            profiles: HashMap::new(),
            listed,
            recheck,
        }
    }

    pub fn see(&mut self, event: &watcher::Event<ManagedSecret>) {
        if matches!(event, watcher::Event::InitDone) {
            self.listed.store(true, Ordering::SeqCst);
            let _ = self.recheck.unbounded_send(());
        }
        let (ms, deleted, init) = match event {
            watcher::Event::Apply(ms) => (ms, false, false),
            watcher::Event::InitApply(ms) => (ms, false, true),
            watcher::Event::Delete(ms) => (ms, true, false),
            _ => return,
        };
        let key = (ms.namespace().unwrap_or_default(), ms.name_any());
        let changed = if deleted {
            self.profiles.remove(&key).is_some()
        } else {
            let profile = ms
                .spec
                .profile
                .clone()
                .or_else(|| ms.status.as_ref().and_then(|s| s.profile.clone()));
            self.profiles.insert(key, profile.clone()) != Some(profile)
        };
        if changed && !init {
            let _ = self.recheck.unbounded_send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str, generation: i64) -> VaultProfile {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
            "metadata": {"name": name, "generation": generation},
            "spec": {"source": "s"},
        }))
        .unwrap()
    }

    fn drain<T>(rx: &mut futures::channel::mpsc::UnboundedReceiver<T>) -> usize {
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    #[test]
    fn a_profile_status_write_reaches_no_managed_secret() {
        let (changed, mut changes) = futures::channel::mpsc::unbounded();
        let (recheck, mut rechecks) = futures::channel::mpsc::unbounded();
        let mut tap = ProfileChanges::new(changed, recheck);
        tap.see(&watcher::Event::InitApply(profile("p", 1)));
        assert_eq!((drain(&mut changes), drain(&mut rechecks)), (1, 1));
        let mut counted = profile("p", 1);
        counted.status = Some(Default::default());
        tap.see(&watcher::Event::Apply(counted));
        assert_eq!(drain(&mut changes), 0, "a status write is no change");
        tap.see(&watcher::Event::Apply(profile("p", 2)));
        assert_eq!(drain(&mut changes), 1, "a spec change is");
        tap.see(&watcher::Event::Delete(profile("p", 2)));
        assert_eq!((drain(&mut changes), drain(&mut rechecks)), (1, 2));
    }

    fn store(name: &str, phase: Option<&str>) -> SecretStore {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretStore",
            "metadata": {"name": name},
            "spec": {"provider": {"internal": {}}},
            "status": phase.map(|p| serde_json::json!({"phase": p})),
        }))
        .unwrap()
    }

    #[test]
    fn a_store_active_again_after_a_failure_wakes_its_secrets_once() {
        use StorePhase::*;
        assert!(recovered(Some(Sealed), Some(Active)));
        assert!(recovered(Some(Unreachable), Some(Active)));
        assert!(recovered(Some(Invalid), Some(Active)));
        assert!(!recovered(None, Some(Active)), "a new store failed nothing");
        assert!(!recovered(Some(Draining), Some(Active)));
        assert!(!recovered(Some(Active), Some(Active)));
        assert!(!recovered(Some(Active), Some(Sealed)));
        let (tx, mut rx) = futures::channel::mpsc::unbounded();
        let mut tap = StoreRecoveries::new(tx);
        tap.see(&watcher::Event::InitApply(store("a", Some("Active"))));
        tap.see(&watcher::Event::Apply(store("a", Some("Sealed"))));
        tap.see(&watcher::Event::Apply(store("b", Some("Unreachable"))));
        assert_eq!(drain(&mut rx), 0);
        tap.see(&watcher::Event::Apply(store("a", Some("Active"))));
        tap.see(&watcher::Event::Apply(store("a", Some("Active"))));
        assert_eq!(drain(&mut rx), 1, "once, on the change");
        tap.see(&watcher::Event::Delete(store("b", Some("Unreachable"))));
        tap.see(&watcher::Event::Apply(store("b", Some("Active"))));
        assert_eq!(drain(&mut rx), 0, "a deleted store's past is forgotten");
    }

    #[test]
    fn a_recovered_store_wakes_the_secrets_of_the_profiles_using_it_only() {
        let mut uses_a = profile("p", 1);
        uses_a.spec.source = "other".into();
        uses_a.spec.sync_targets = vec!["a".into()];
        let mut not_a = profile("q", 1);
        not_a.spec.source = "b".into();
        let profiles = [Arc::new(uses_a), Arc::new(not_a)];
        let mut resolved = ms("resolved", None);
        resolved.status =
            Some(serde_json::from_value(serde_json::json!({"profile": "p"})).unwrap());
        let managed = [
            Arc::new(ms("named", Some("p"))),
            Arc::new(resolved),
            Arc::new(ms("elsewhere", Some("q"))),
            Arc::new(ms("unresolved", None)),
        ];
        let woken: Vec<String> = using_store("a", &profiles, &managed)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(woken, ["named", "resolved"]);
        assert!(using_store("c", &profiles, &managed).is_empty());
    }

    fn ms(name: &str, profile: Option<&str>) -> ManagedSecret {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": name, "namespace": "n"},
            "spec": {"type": "generic", "content": {"fromStore": {}}, "profile": profile},
        }))
        .unwrap()
    }

    #[test]
    fn counts_recheck_when_a_secret_comes_goes_or_changes_profile() {
        let listed = Arc::new(AtomicBool::new(false));
        let (recheck, mut rechecks) = futures::channel::mpsc::unbounded();
        let mut tap = ProfileCounts::new(listed.clone(), recheck);
        tap.see(&watcher::Event::InitApply(ms("a", Some("p"))));
        assert_eq!(
            drain(&mut rechecks),
            0,
            "the first list re-checks once, at its end"
        );
        tap.see(&watcher::Event::InitDone);
        assert!(listed.load(Ordering::SeqCst));
        assert_eq!(drain(&mut rechecks), 1);
        tap.see(&watcher::Event::Apply(ms("a", Some("p"))));
        assert_eq!(drain(&mut rechecks), 0, "same profile");
        tap.see(&watcher::Event::Apply(ms("a", Some("q"))));
        tap.see(&watcher::Event::Apply(ms("b", None)));
        tap.see(&watcher::Event::Delete(ms("a", None)));
        assert_eq!(drain(&mut rechecks), 3);
    }

    #[test]
    fn a_source_secret_wakes_the_secrets_of_its_namespace_that_push_it_only() {
        let pushes = |name: &str, ns: &str, from: &str| -> Arc<ManagedSecret> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"type": "generic", "content": {"fromSecret": {"name": from}}},
                }))
                .unwrap(),
            )
        };
        let managed = [
            pushes("a", "team-a", "db"),
            pushes("b", "team-a", "db"),
            pushes("c", "team-a", "api"),
            // Another tenant's secret naming a Secret of the same name.
            pushes("d", "team-b", "db"),
            Arc::new(ms("e", None)),
        ];
        let woken = |ns: &str, name: &str| -> Vec<String> {
            pushing(ns, name, &managed)
                .into_iter()
                .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
                .collect()
        };
        assert_eq!(woken("team-a", "db"), ["team-a/a", "team-a/b"]);
        assert_eq!(woken("team-b", "db"), ["team-b/d"]);
        assert_eq!(woken("team-a", "unrelated"), Vec::<String>::new());
        assert_eq!(woken("n", "db"), Vec::<String>::new());
    }

    #[test]
    fn a_failing_watch_retries_soon_never_in_a_hot_loop_and_starts_over_after_an_event() {
        use kube::runtime::utils::Backoff as _;
        let mut b = WatchBackoff::default();
        let waits: Vec<f64> = b.by_ref().take(8).map(|d| d.as_secs_f64()).collect();
        assert!(waits[0] >= 0.2 && waits[0] <= 0.3, "{waits:?}");
        assert!(waits.iter().all(|w| *w >= 0.2 && *w <= 6.0), "{waits:?}");
        assert!(waits[7] >= 4.0, "capped near 5 s: {waits:?}");
        b.reset();
        assert!(b.next().unwrap().as_secs_f64() <= 0.3);
    }
}
