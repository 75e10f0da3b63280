//! What this process wrote, remembered so that its own writes coming back through a watch
//! are told apart from everyone else's changes: native Secrets (by resourceVersion) and
//! ManagedSecret statuses (by digest).

use crate::api::ManagedSecret;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// The resourceVersion of each native Secret keyhaven last wrote, by namespace and name,
/// until its watch event comes back.
#[derive(Default)]
pub struct SecretWrites {
    written: Mutex<HashMap<(String, String), String>>,
}

impl SecretWrites {
    /// Notes a native Secret keyhaven just wrote (as the API server returned it).
    pub fn wrote(&self, secret: &Secret) {
        let (Some(ns), Some(rv)) = (secret.namespace(), secret.resource_version()) else {
            return;
        };
        let mut written = self.written.lock().expect("secret writes lock");
        written.insert((ns, secret.name_any()), rv);
    }

    /// Whether this watch event of a native Secret is keyhaven's own last write coming
    /// back (forgotten then: the next event of it is someone's change).
    pub fn is_own(&self, secret: &PartialObjectMeta<Secret>) -> bool {
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        let mut written = self.written.lock().expect("secret writes lock");
        match written.get(&key) {
            Some(rv) if secret.resource_version().as_ref() == Some(rv) => {
                written.remove(&key);
                true
            }
            _ => false,
        }
    }
}

/// A digest of the status this process last wrote, by ManagedSecret uid: tells a cached
/// object that holds our last status write from one that predates it.
#[derive(Default)]
pub struct StatusWrites {
    written: Mutex<Digests>,
}

#[derive(Default)]
struct Digests {
    by_uid: HashMap<String, [u8; 32]>,
    /// The size at which records of deleted ManagedSecrets are dropped.
    prune_at: usize,
}

impl StatusWrites {
    /// Records the status the API server stored for `ms` after our write. `live` lists the
    /// uids of the ManagedSecrets that exist, asked for only when the records are pruned:
    /// ManagedSecrets deleted without a finalizer leave theirs, dropped whenever the map has
    /// doubled since the last time.
    pub fn wrote(&self, ms: &ManagedSecret, live: impl FnOnce() -> HashSet<String>) {
        let Some(uid) = ms.uid() else { return };
        let mut written = self.written.lock().expect("status record lock");
        written.by_uid.insert(uid, digest(ms));
        if written.by_uid.len() > written.prune_at {
            let live = live();
            written.by_uid.retain(|uid, _| live.contains(uid));
            written.prune_at = 1024 + 2 * written.by_uid.len();
        }
    }

    /// Forgets what was written for a ManagedSecret that is gone.
    pub fn forget(&self, ms: &ManagedSecret) {
        if let Some(uid) = ms.uid() {
            let mut written = self.written.lock().expect("status record lock");
            written.by_uid.remove(&uid);
        }
    }

    /// Whether the cached `ms` holds the last status this process wrote for it (true when
    /// it wrote none: the cache was listed after the process started, and no other writer
    /// changes the status).
    pub fn holds_last(&self, ms: &ManagedSecret) -> bool {
        let Some(uid) = ms.uid() else { return false };
        let written = self.written.lock().expect("status record lock");
        written.by_uid.get(&uid).is_none_or(|d| *d == digest(ms))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.written.lock().unwrap().by_uid.len()
    }
}

/// A digest of a ManagedSecret's status as the API server returned it.
fn digest(ms: &ManagedSecret) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(&ms.status).unwrap_or_default();
    Sha256::digest(&json).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ManagedSecretPhase, ManagedSecretStatus};

    fn secret(name: &str, rv: &str) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("n".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn meta(name: &str, rv: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: secret(name, rv).metadata,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_write_itself_coming_back_is_ours() {
        let writes = SecretWrites::default();
        writes.wrote(&secret("a", "10"));
        assert!(
            !writes.is_own(&meta("a", "9")),
            "an older event is not our write"
        );
        assert!(!writes.is_own(&meta("b", "10")), "another Secret");
        assert!(writes.is_own(&meta("a", "10")));
        assert!(
            !writes.is_own(&meta("a", "10")),
            "forgotten once seen: the next event is someone's change"
        );
    }

    fn ms(uid: &str, version: Option<u64>) -> ManagedSecret {
        let mut ms: ManagedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": uid, "namespace": "n", "uid": uid},
            "spec": {"type": "generic", "content": {"fromStore": {}}},
        }))
        .unwrap();
        ms.status = version.map(|v| ManagedSecretStatus {
            current_version: Some(v),
            phase: Some(ManagedSecretPhase::Synced),
            ..Default::default()
        });
        ms
    }

    #[test]
    fn a_cache_behind_our_last_status_write_is_told_apart() {
        let writes = StatusWrites::default();
        assert!(writes.holds_last(&ms("a", Some(1))), "nothing written yet");
        writes.wrote(&ms("a", Some(2)), || HashSet::from(["a".to_owned()]));
        assert!(
            !writes.holds_last(&ms("a", Some(1))),
            "the cache predates the write"
        );
        assert!(writes.holds_last(&ms("a", Some(2))));
        writes.forget(&ms("a", None));
        assert!(writes.holds_last(&ms("a", Some(1))));
    }

    #[test]
    fn records_of_deleted_objects_are_pruned() {
        let writes = StatusWrites::default();
        for i in 0..3000 {
            let uid = format!("u{i}");
            writes.wrote(&ms(&uid, Some(1)), || HashSet::from(["u0".to_owned()]));
        }
        assert!(writes.len() < 3000, "pruned: {}", writes.len());
        assert!(!writes.holds_last(&ms("u0", Some(9))), "a live one is kept");
    }
}
