//! Encrypted versions kept as Secrets in the operator's namespace: one Secret per
//! (store, path, version) holding an [`Envelope`]. Shared by every store whose values are
//! sealed by a key-encryption key (the internal store; the pkcs11 store), through
//! [`SealedStore`](super::sealed_store::SealedStore).
//!
//! A record's value never changes once written, but its Secret is not marked immutable:
//! a KEK rotation replaces the wrapped data key in place ([`SealedRecords::rewrap`]), one
//! atomic update per record, so a crash mid-rotation leaves every record whole under one
//! key or the other. Integrity does not rest on the flag: each envelope is authenticated
//! and bound to its store, path and version.

use super::labels::*;
use super::{
    BackendError, StoredVersion, VERSIONS_PER_SELECTOR, VersionStamp, annotated_owner,
    labelled_version, labelled_versions, object_id, object_labels, object_selector, prune_plan,
    with_versions,
};
use crate::crypto::{CryptoError, Envelope, Fingerprint, KeyWrapper, open, rewrap, seal};
use crate::secret_data::SecretData;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::{Api, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const ROLE_SEALED: &str = "sealed-version";
use crate::labels::KEK_ID_ANNOTATION;

/// The sealed versions of one store.
pub struct SealedRecords {
    store: String,
    api: Api<Secret>,
    kek: Arc<dyn KeyWrapper>,
}

impl SealedRecords {
    pub fn new(store: &str, api: Api<Secret>, kek: Arc<dyn KeyWrapper>) -> Self {
        SealedRecords {
            store: store.to_owned(),
            api,
            kek,
        }
    }

    fn record_name(&self, path: &str, version: u64) -> String {
        format!("kh-{}-{}-v{version}", self.store, object_id(path))
    }

    /// Additional data bound into each envelope: a record moved to another store, path or
    /// version does not decrypt.
    fn aad(&self, path: &str, version: u64) -> Vec<u8> {
        format!("keyhaven sealed v1\0{}\0{path}\0{version}", self.store).into_bytes()
    }

    /// A failure of the KEK: [`CryptoError::KekUnavailable`] makes the store Sealed (the
    /// data may be fine); anything else is about this record.
    fn crypto_err(&self, path: &str) -> impl Fn(CryptoError) -> BackendError + '_ {
        let path = path.to_owned();
        move |source| match source {
            CryptoError::KekUnavailable(message) => BackendError::Sealed {
                store: self.store.clone(),
                message,
            },
            source => BackendError::Crypto {
                store: self.store.clone(),
                path: path.clone(),
                source,
            },
        }
    }

    fn kube_err(&self, what: &str) -> impl Fn(kube::Error) -> BackendError + '_ {
        let what = what.to_owned();
        move |e| BackendError::from_kube(&self.store, &what, e)
    }

    pub async fn read(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<StoredVersion>, BackendError> {
        let version = match version {
            Some(v) => Some(v),
            None => self.list_versions(path).await?.last().copied(),
        };
        let Some(version) = version else {
            return Ok(None);
        };
        let Some(secret) = self.get(&self.record_name(path, version)).await? else {
            return Ok(None);
        };
        self.decode(path, &secret).await.map(Some)
    }

    /// The record's Secret `name`; `None` when absent.
    async fn get(&self, name: &str) -> Result<Option<Secret>, BackendError> {
        self.api
            .get_opt(name)
            .await
            .map_err(self.kube_err("reading a sealed version"))
    }

    fn corrupt(&self, path: &str, message: &str) -> BackendError {
        BackendError::Corrupt {
            store: self.store.clone(),
            path: path.to_owned(),
            message: message.to_owned(),
        }
    }

    /// The version and envelope a record's Secret holds.
    fn envelope(&self, path: &str, secret: &Secret) -> Result<(u64, Envelope), BackendError> {
        let corrupt = |message: &str| self.corrupt(path, message);
        let version =
            labelled_version(secret.labels()).ok_or_else(|| corrupt("no version label"))?;
        let data = secret.data.as_ref().ok_or_else(|| corrupt("no data"))?;
        let field = |k: &str| {
            data.get(k)
                .map(|b| b.0.clone())
                .ok_or_else(|| corrupt(&format!("no {k:?}")))
        };
        let envelope = Envelope {
            kek_id: secret
                .annotations()
                .get(KEK_ID_ANNOTATION)
                .cloned()
                .ok_or_else(|| corrupt("no KEK id"))?,
            wrapped_key: field("wrapped-key")?,
            nonce: field("nonce")?,
            ciphertext: field("ciphertext")?,
        };
        Ok((version, envelope))
    }

    async fn decode(&self, path: &str, secret: &Secret) -> Result<StoredVersion, BackendError> {
        let (version, envelope) = self.envelope(path, secret)?;
        let plaintext = open(self.kek.as_ref(), &envelope, &self.aad(path, version))
            .await
            .map_err(self.crypto_err(path))?;
        let data = SecretData::from_sealed_bytes(&plaintext).map_err(|m| self.corrupt(path, &m))?;
        let fingerprint = secret
            .annotations()
            .get(FINGERPRINT_ANNOTATION)
            .and_then(|f| Fingerprint::parse(f));
        Ok(StoredVersion {
            data,
            stamp: fingerprint.map(|fingerprint| VersionStamp {
                version,
                fingerprint,
                owner: annotated_owner(secret.annotations()),
            }),
            store_version: None,
        })
    }

    pub async fn write(
        &self,
        path: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<(), BackendError> {
        let name = self.record_name(path, stamp.version);
        if let Some(existing) = self.get(&name).await? {
            return match self.decode(path, &existing).await {
                Ok(stored) if &stored.data == data => self.claim(&name, &stored, stamp).await,
                Ok(_) => Err(BackendError::Conflict {
                    store: self.store.clone(),
                    path: path.to_owned(),
                    message: format!("version {} exists with other content", stamp.version),
                }),
                // A KEK that cannot be used now says nothing about the record: keep it.
                Err(e @ BackendError::Sealed { .. }) => Err(e),
                // Unreadable (tampered with, or sealed by a lost key): replace it.
                Err(_) => {
                    self.api
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map_err(self.kube_err("replacing a corrupt version"))?;
                    self.create(path, &name, stamp, data).await
                }
            };
        }
        self.create(path, &name, stamp, data).await
    }

    /// Records `stamp`'s owner on an existing record of the same content (a writer taking
    /// over a path whose record names no owner, or one that is gone).
    async fn claim(
        &self,
        name: &str,
        stored: &StoredVersion,
        stamp: &VersionStamp,
    ) -> Result<(), BackendError> {
        let Some(owner) = &stamp.owner else {
            return Ok(());
        };
        if stored.stamp.as_ref().and_then(|s| s.owner.as_ref()) == Some(owner) {
            return Ok(());
        }
        let patch = serde_json::json!({"metadata": {"annotations": {
            OWNER_ANNOTATION: owner.to_annotation(),
        }}});
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(self.kube_err("recording a sealed version's owner"))?;
        Ok(())
    }

    async fn create(
        &self,
        path: &str,
        name: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<(), BackendError> {
        let envelope = seal(
            self.kek.as_ref(),
            &data.to_sealed_bytes(),
            &self.aad(path, stamp.version),
        )
        .await
        .map_err(self.crypto_err(path))?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(object_labels(
                    &self.store,
                    path,
                    ROLE_SEALED,
                    Some(stamp.version),
                )),
                annotations: Some(
                    BTreeMap::from([
                        (PATH_ANNOTATION.into(), path.to_owned()),
                        (FINGERPRINT_ANNOTATION.into(), stamp.fingerprint.to_string()),
                        (KEK_ID_ANNOTATION.into(), envelope.kek_id.clone()),
                    ])
                    .into_iter()
                    .chain(
                        stamp
                            .owner
                            .as_ref()
                            .map(|o| (OWNER_ANNOTATION.into(), o.to_annotation())),
                    )
                    .collect(),
                ),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                ("ciphertext".into(), ByteString(envelope.ciphertext)),
                ("nonce".into(), ByteString(envelope.nonce)),
                ("wrapped-key".into(), ByteString(envelope.wrapped_key)),
            ])),
            ..Default::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(()),
            // Another writer won a race to the same version; the caller re-reads and compares.
            Err(kube::Error::Api(e)) if e.code == 409 => Err(BackendError::Conflict {
                store: self.store.clone(),
                path: path.to_owned(),
                message: format!("version {} was written concurrently", stamp.version),
            }),
            Err(e) => Err(BackendError::from_kube(
                &self.store,
                "writing a sealed version",
                e,
            )),
        }
    }

    pub async fn list_versions(&self, path: &str) -> Result<Vec<u64>, BackendError> {
        let list = self
            .api
            .list_metadata(&object_selector(&self.store, ROLE_SEALED, Some(path)))
            .await
            .map_err(self.kube_err("listing sealed versions"))?;
        Ok(labelled_versions(&list.items))
    }

    pub async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.api
            .delete_collection(
                &DeleteParams::default(),
                &object_selector(&self.store, ROLE_SEALED, Some(path)),
            )
            .await
            .map_err(self.kube_err("deleting sealed versions"))?;
        Ok(())
    }

    /// Deletes the records of `versions` at `path` (retention). The current version is the
    /// latest record ([`read`](Self::read)), never deleted; versions without a record are
    /// skipped. One list, then one delete of a collection (per 100 versions). Returns the
    /// versions deleted, ascending.
    pub async fn prune(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>, BackendError> {
        if versions.is_empty() {
            return Ok(Vec::new());
        }
        let held = self.list_versions(path).await?;
        let plan = prune_plan(&self.store, path, held.last().copied(), &held, versions)?;
        for chunk in plan.chunks(VERSIONS_PER_SELECTOR) {
            let lp = with_versions(object_selector(&self.store, ROLE_SEALED, Some(path)), chunk);
            self.api
                .delete_collection(&DeleteParams::default(), &lp)
                .await
                .map_err(self.kube_err("pruning sealed versions"))?;
        }
        Ok(plan)
    }

    /// The metadata of every sealed version of the store.
    async fn all_records(
        &self,
        what: &str,
    ) -> Result<Vec<PartialObjectMeta<Secret>>, BackendError> {
        let lp = object_selector(&self.store, ROLE_SEALED, None);
        let list = self
            .api
            .list_metadata(&lp)
            .await
            .map_err(self.kube_err(what))?;
        Ok(list.items)
    }

    pub async fn count(&self) -> Result<u64, BackendError> {
        let records = self.all_records("counting sealed versions").await?;
        let objects: BTreeSet<&str> = records
            .iter()
            .filter_map(|m| m.labels().get(OBJECT).map(String::as_str))
            .collect();
        Ok(objects.len() as u64)
    }

    /// Whether the namespace holding the records answers and may be listed.
    pub async fn probe(&self) -> Result<(), BackendError> {
        let lp = ListParams::default()
            .labels(&format!("{STORE}={}", self.store))
            .limit(1);
        self.api
            .list_metadata(&lp)
            .await
            .map_err(self.kube_err("listing the operator namespace"))?;
        Ok(())
    }
}

/// A sealed version as a KEK rotation sees it: which record, under which key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordKek {
    /// The record's Secret.
    pub name: String,
    /// The KEK that wraps its data key.
    pub kek_id: String,
}

/// What [`SealedRecords::rewrap`] did to one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewrapped {
    /// Its data key is now wrapped by the current KEK.
    Moved,
    /// It already was (a re-run after a crash, or a record written since).
    AlreadyCurrent,
    /// It no longer exists (its path was deleted meanwhile).
    Gone,
}

impl SealedRecords {
    /// The KEK id of every sealed version of the store, from metadata alone.
    pub async fn census(&self) -> Result<Vec<RecordKek>, BackendError> {
        let records = self.all_records("listing sealed versions").await?;
        Ok(records
            .iter()
            .map(|m| RecordKek {
                name: m.name_any(),
                kek_id: m
                    .annotations()
                    .get(KEK_ID_ANNOTATION)
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// Re-wraps the data key of the record `name` under the current KEK, in one update
    /// guarded by the record's resourceVersion: the record is whole under the old key or
    /// under the new one, never neither. Idempotent.
    pub async fn rewrap(&self, name: &str) -> Result<Rewrapped, BackendError> {
        let Some(mut secret) = self.get(name).await? else {
            return Ok(Rewrapped::Gone);
        };
        let annotations = secret.annotations();
        let path = annotations
            .get(PATH_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        let kek_id = annotations
            .get(KEK_ID_ANNOTATION)
            .ok_or_else(|| self.corrupt(&path, "no KEK id"))?;
        // Checked before the rest is parsed: a current record is left alone whatever it holds.
        if *kek_id == self.kek.kek_id() {
            return Ok(Rewrapped::AlreadyCurrent);
        }
        let (version, envelope) = self.envelope(&path, &secret)?;
        let moved = rewrap(self.kek.as_ref(), &envelope, &self.aad(&path, version))
            .await
            .map_err(self.crypto_err(&path))?;
        secret
            .data
            .get_or_insert_default()
            .insert("wrapped-key".into(), ByteString(moved.wrapped_key));
        secret
            .annotations_mut()
            .insert(KEK_ID_ANNOTATION.into(), moved.kek_id);
        // `secret` carries the resourceVersion read above: a concurrent change is a 409.
        match self
            .api
            .replace(name, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => Ok(Rewrapped::Moved),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Rewrapped::Gone),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(BackendError::Conflict {
                store: self.store.clone(),
                path,
                message: format!("version {version} changed while its key was re-wrapped"),
            }),
            Err(e) => Err(BackendError::from_kube(
                &self.store,
                "re-wrapping a sealed version",
                e,
            )),
        }
    }
}
