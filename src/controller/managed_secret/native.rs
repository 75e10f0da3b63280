//! The native Secret pods consume: what keyhaven sees of it, what it applies, and what a
//! ManagedSecret's deletion does to it. Pure functions of the objects.

use super::decide::NativeObservation;
use crate::api::{CreationPolicy, DeletionPolicy, ManagedSecret};
use crate::content::native_secret_labels;
use crate::crypto::Fingerprint;
use crate::labels::{FINGERPRINT_ANNOTATION, MANAGED_SECRET_LABEL, VERSION_ANNOTATION};
use crate::secret_data::SecretData;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// What the plan needs to know of the native Secret as it is, against the rendered data.
pub fn observe_native(
    ms: &ManagedSecret,
    secret: Option<&Secret>,
    rendered: &SecretData,
) -> NativeObservation {
    let Some(secret) = secret else {
        return NativeObservation::default();
    };
    let annotations = secret.annotations();
    let data = secret.data.clone().unwrap_or_default();
    NativeObservation {
        exists: true,
        managed_by_us: is_managed_by(secret, ms),
        type_: secret.type_.clone(),
        fingerprint: annotations.get(FINGERPRINT_ANNOTATION).cloned(),
        version: annotations
            .get(VERSION_ANNOTATION)
            .and_then(|v| v.parse().ok()),
        data_matches: rendered
            .iter()
            .all(|(k, v)| data.get(k).is_some_and(|b| b.0 == v)),
        owned_by_us: secret
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == ms.metadata.uid.as_ref() && o.controller == Some(true)),
    }
}

/// Whether `secret` carries the label naming `ms`: keyhaven made it for `ms` (or adopted it
/// under Merge).
pub fn is_managed_by(secret: &Secret, ms: &ManagedSecret) -> bool {
    secret.labels().get(MANAGED_SECRET_LABEL) == Some(&ms.name_any())
}

/// The native Secret as keyhaven applies it. Under Merge, only keyhaven's keys, labels and
/// annotations (the Secret and its type belong to someone else).
pub fn desired_secret(
    ms: &ManagedSecret,
    name: &str,
    type_: &str,
    data: &SecretData,
    version: u64,
    fp: &Fingerprint,
) -> Secret {
    let spec = &ms.spec.target;
    let mut labels = spec.labels.clone();
    labels.extend(native_secret_labels(&ms.name_any()));
    let mut annotations = spec.annotations.clone();
    annotations.insert(VERSION_ANNOTATION.into(), version.to_string());
    annotations.insert(FINGERPRINT_ANNOTATION.into(), fp.to_string());
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: ms.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: (spec.creation_policy == CreationPolicy::Owner)
                .then(|| ms.controller_owner_ref(&()).into_iter().collect()),
            ..Default::default()
        },
        type_: (spec.creation_policy != CreationPolicy::Merge).then(|| type_.to_owned()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_owned(), ByteString(v.to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    }
}

/// What deleting a ManagedSecret does to its native Secret. The stores keep every version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Orphan + Delete: delete the Secret.
    Delete,
    /// Merge + Delete: remove keyhaven's keys, labels and annotations from it.
    RemoveKeys,
    /// Owner + Retain: drop keyhaven's owner reference, so the garbage collector leaves it.
    Release,
}

/// The cleanup a ManagedSecret's target policies ask keyhaven for, if any. Owner + Delete
/// is the garbage collector's (the Secret is owned); Retain of a Secret keyhaven does not
/// own needs nothing.
pub fn cleanup(ms: &ManagedSecret) -> Option<Cleanup> {
    let target = &ms.spec.target;
    match (target.deletion_policy, target.creation_policy) {
        (DeletionPolicy::Delete, CreationPolicy::Orphan) => Some(Cleanup::Delete),
        (DeletionPolicy::Delete, CreationPolicy::Merge) => Some(Cleanup::RemoveKeys),
        (DeletionPolicy::Retain, CreationPolicy::Owner) => Some(Cleanup::Release),
        (DeletionPolicy::Delete, CreationPolicy::Owner) | (DeletionPolicy::Retain, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(policies: serde_json::Value) -> ManagedSecret {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": "db", "namespace": "n", "uid": "u-1"},
            "spec": {"type": "password", "content": {"fromStore": {}}, "target": policies},
        }))
        .unwrap()
    }

    fn fp() -> Fingerprint {
        Fingerprint::parse(&format!("hmac-sha256:{}", hex::encode([7; 32]))).unwrap()
    }

    fn data() -> SecretData {
        let mut d = SecretData::new();
        d.insert("password", "pw");
        d
    }

    #[test]
    fn deletion_asks_keyhaven_only_for_what_the_garbage_collector_does_not_do() {
        let with = |c: &str, d: &str| {
            cleanup(&ms(
                serde_json::json!({"creationPolicy": c, "deletionPolicy": d}),
            ))
        };
        assert_eq!(
            with("Owner", "Delete"),
            None,
            "the garbage collector deletes it"
        );
        assert_eq!(with("Orphan", "Delete"), Some(Cleanup::Delete));
        assert_eq!(with("Merge", "Delete"), Some(Cleanup::RemoveKeys));
        assert_eq!(with("Owner", "Retain"), Some(Cleanup::Release));
        assert_eq!(with("Orphan", "Retain"), None);
        assert_eq!(with("Merge", "Retain"), None);
        assert_eq!(
            cleanup(&ms(serde_json::json!({}))),
            None,
            "the defaults: Owner + Delete"
        );
    }

    #[test]
    fn the_applied_secret_is_owned_labelled_and_stamped() {
        let ms = ms(serde_json::json!({"labels": {"team": "a"}}));
        let s = desired_secret(&ms, "db", "Opaque", &data(), 3, &fp());
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "a");
        assert_eq!(labels[MANAGED_SECRET_LABEL], "db");
        let annotations = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[VERSION_ANNOTATION], "3");
        assert_eq!(annotations[FINGERPRINT_ANNOTATION], fp().to_string());
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u-1", Some(true)));
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
        assert_eq!(s.data.unwrap()["password"].0, b"pw");
    }

    #[test]
    fn under_merge_only_keyhaven_keys_are_applied() {
        let ms = ms(serde_json::json!({"creationPolicy": "Merge"}));
        let s = desired_secret(&ms, "db", "Opaque", &data(), 1, &fp());
        assert_eq!(s.type_, None, "the type belongs to the Secret's owner");
        assert_eq!(s.metadata.owner_references, None);
    }

    #[test]
    fn observes_what_the_secret_holds() {
        let ms = ms(serde_json::json!({}));
        assert!(!observe_native(&ms, None, &data()).exists);
        let ours = desired_secret(&ms, "db", "Opaque", &data(), 2, &fp());
        let seen = observe_native(&ms, Some(&ours), &data());
        assert!(seen.exists && seen.managed_by_us && seen.owned_by_us && seen.data_matches);
        assert_eq!(seen.version, Some(2));
        assert_eq!(seen.fingerprint, Some(fp().to_string()));
        let mut other = data();
        other.insert("password", "changed");
        assert!(!observe_native(&ms, Some(&ours), &other).data_matches);
        let mut foreign = ours.clone();
        foreign.metadata.labels = None;
        foreign.metadata.owner_references = None;
        let seen = observe_native(&ms, Some(&foreign), &data());
        assert!(!seen.managed_by_us && !seen.owned_by_us);
    }
}
