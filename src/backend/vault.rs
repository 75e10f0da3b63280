//! The vault store: a HashiCorp Vault or OpenBao KV secrets engine, version 2 or 1.
//!
//! A path holds one secret object: its key/values are written and read as a whole, as JSON
//! strings (a value that is not UTF-8 is stored base64-encoded and flagged as such in the
//! bookkeeping). keyhaven's bookkeeping for a path — the stamp of the current value, the
//! versions it wrote and, for KV v2, the KV version of each — is a separate object under
//! the same mount at `keyhaven/objects/<id>`, so applications reading the path see only
//! their values. KV v1 keeps no versions: keyhaven keeps a copy of each version at
//! `keyhaven/history/<id>/v<N>`. The store's secret count is the number of bookkeeping
//! objects.
//!
//! One login per store ([`session`]) is shared by every operation; [`transport`] holds
//! the server to https:// and builds the HTTP client (CA bundles in memory).

mod errors;
mod prune;
mod session;
mod transport;

use super::{Backend, BackendError, Health, Owner, StoredVersion, VersionStamp, object_id};
use crate::api::{KvVersion, VaultProvider};
use crate::crypto::Fingerprint;
use crate::secret_data::SecretData;
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use errors::{classify, error_chain};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use session::Session;
pub use session::SessionSource;
use std::collections::{BTreeMap, HashMap};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

/// Where keyhaven keeps its bookkeeping under the mount.
const OBJECTS_PREFIX: &str = "keyhaven/objects";
const HISTORY_PREFIX: &str = "keyhaven/history";
/// Versions remembered per path in the bookkeeping object.
const MAX_REMEMBERED_VERSIONS: usize = 64;

/// A Vault / OpenBao KV store.
pub struct VaultStore {
    name: String,
    mount: String,
    kv: KvVersion,
    session: Session,
    /// KV v2: what this process last saw of each path ([`Known`]).
    known: std::sync::Mutex<HashMap<String, Known>>,
}

/// What the store last saw of a KV v2 path, as read or written.
///
/// A refresh uses `current` while the path's latest KV version is the one it describes, so
/// an unchanged value costs one OpenBao read, not two; any other KV version (a value
/// written by hand or by another writer) reads the bookkeeping again. A write shortly
/// after a read (the same reconcile) uses all of it, so adopting a value costs no second
/// read of the value or of the bookkeeping: keyhaven alone writes its bookkeeping, and the
/// KV version it records is immutable.
#[derive(Clone, Debug)]
struct Known {
    /// The bookkeeping's current entry; `None`: the path has no bookkeeping.
    current: Option<VersionEntry>,
    latest: Latest,
    seen: std::time::Instant,
}

/// The latest value seen at a KV v2 path.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Latest {
    Unknown,
    Absent,
    /// Its KV version, and a digest of its content.
    At(u64, [u8; 32]),
}

/// How long after a read a write trusts what that read saw.
const KNOWN_FRESH: std::time::Duration = std::time::Duration::from_secs(30);

impl Known {
    fn fresh(&self) -> bool {
        self.seen.elapsed() < KNOWN_FRESH
    }
}

/// A digest of a value's content (of its canonical serialization), to tell "the content
/// just read" from other content without keeping it.
fn digest(data: &SecretData) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(data.to_sealed_bytes().as_slice()).into()
}

/// keyhaven's bookkeeping for one path.
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Bookkeeping {
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current: Option<VersionEntry>,
    /// keyhaven version → what the store holds for it.
    #[serde(default)]
    versions: BTreeMap<u64, VersionEntry>,
    /// KV v2: the `max_versions` keyhaven set on the path's metadata ([`prune`]); `None`:
    /// never set, the mount's (assumed 10) applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_versions: Option<u64>,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
struct VersionEntry {
    version: u64,
    fingerprint: String,
    /// The KV v2 version holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store_version: Option<u64>,
    /// Keys whose values are stored base64-encoded (not UTF-8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    binary: Vec<String>,
    /// The ManagedSecret that wrote it (the path's owner, on the current entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<Owner>,
}

impl VersionEntry {
    fn stamp(&self) -> Option<VersionStamp> {
        Some(VersionStamp {
            version: self.version,
            fingerprint: Fingerprint::parse(&self.fingerprint)?,
            owner: self.owner.clone(),
        })
    }
}

/// A value as Vault holds it: JSON strings, and the keys that are base64-encoded bytes.
fn encode(data: &SecretData) -> (HashMap<String, String>, Vec<String>) {
    let mut binary = Vec::new();
    let values = data
        .iter()
        .map(|(k, v)| match std::str::from_utf8(v) {
            Ok(text) => (k.to_owned(), text.to_owned()),
            Err(_) => {
                binary.push(k.to_owned());
                (k.to_owned(), B64.encode(v))
            }
        })
        .collect();
    (values, binary)
}

/// The value Vault returned. Non-string JSON values (written by other tools) become their
/// JSON text; keys flagged `binary` are base64-decoded.
fn decode(values: &serde_json::Map<String, Value>, binary: &[String]) -> SecretData {
    let mut data = SecretData::new();
    for (k, v) in values {
        let bytes = match v {
            Value::String(s) if binary.contains(k) => {
                B64.decode(s).unwrap_or_else(|_| s.clone().into_bytes())
            }
            Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        data.insert(k.clone(), bytes);
    }
    data
}

impl VaultStore {
    pub fn new(
        name: &str,
        spec: &VaultProvider,
        source: SessionSource,
    ) -> Result<Self, BackendError> {
        Ok(VaultStore {
            name: name.to_owned(),
            mount: spec.mount.clone().unwrap_or_else(|| "secret".into()),
            kv: spec.version.unwrap_or_default(),
            session: Session::new(name, spec, source)?,
            known: Default::default(),
        })
    }

    /// How many times this store logged in (for tests and metrics).
    pub fn logins(&self) -> u64 {
        self.session.logins()
    }

    fn error(&self, path: &str, e: ClientError) -> BackendError {
        classify(&self.name, path, e)
    }

    fn object_path(path: &str) -> String {
        format!("{OBJECTS_PREFIX}/{}", object_id(path))
    }

    fn history_path(path: &str, version: u64) -> String {
        format!("{HISTORY_PREFIX}/{}/v{version}", object_id(path))
    }

    /// Reads a JSON object at `path` of the mount; `None` when absent.
    async fn get_object(
        &self,
        client: &VaultClient,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<(serde_json::Map<String, Value>, Option<u64>)>, ClientError> {
        let result = match self.kv {
            KvVersion::V2 => {
                let mut req = vaultrs::api::kv2::requests::ReadSecretRequest::builder();
                req.mount(&self.mount).path(path);
                if let Some(v) = version {
                    req.version(Some(v));
                }
                let endpoint = req.build().expect("all fields set");
                vaultrs::api::exec_with_result(client, endpoint)
                    .await
                    .map(|r| (r.data, Some(r.metadata.version)))
            }
            KvVersion::V1 => vaultrs::kv1::get::<Value>(client, &self.mount, path)
                .await
                .map(|v| (v, None)),
        };
        match result {
            Ok((Value::Object(map), v)) => Ok(Some((map, v))),
            // KV v2 answers a deleted or destroyed version with null data.
            Ok((_, _)) => Ok(None),
            Err(ClientError::APIError { code: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a JSON object at `path`; returns the KV v2 version made.
    async fn put_object<T: Serialize>(
        &self,
        client: &VaultClient,
        path: &str,
        value: &T,
    ) -> Result<Option<u64>, ClientError> {
        match self.kv {
            KvVersion::V2 => {
                let meta = vaultrs::kv2::set(client, &self.mount, path, value).await?;
                Ok(Some(meta.version))
            }
            KvVersion::V1 => {
                let value = serde_json::to_value(value)
                    .map_err(|source| ClientError::JsonParseError { source })?;
                let map: HashMap<String, Value> = serde_json::from_value(value)
                    .map_err(|source| ClientError::JsonParseError { source })?;
                let map: HashMap<&str, &Value> = map.iter().map(|(k, v)| (k.as_str(), v)).collect();
                vaultrs::kv1::set(client, &self.mount, path, &map).await?;
                Ok(None)
            }
        }
    }

    /// Removes `path` entirely (every KV v2 version and its metadata).
    async fn remove_object(&self, client: &VaultClient, path: &str) -> Result<(), ClientError> {
        let result = match self.kv {
            KvVersion::V2 => vaultrs::kv2::delete_metadata(client, &self.mount, path).await,
            KvVersion::V1 => vaultrs::kv1::delete(client, &self.mount, path).await,
        };
        match result {
            Err(ClientError::APIError { code: 404, .. }) => Ok(()),
            other => other,
        }
    }

    async fn bookkeeping(
        &self,
        client: &VaultClient,
        path: &str,
    ) -> Result<Option<Bookkeeping>, BackendError> {
        let object = Self::object_path(path);
        match self
            .get_object(client, &object, None)
            .await
            .map_err(|e| self.error(path, e))?
        {
            None => Ok(None),
            Some((map, _)) => serde_json::from_value(Value::Object(map))
                .map(Some)
                .map_err(|e| BackendError::Corrupt {
                    store: self.name.clone(),
                    path: path.to_owned(),
                    message: format!("keyhaven's bookkeeping at {}/{object}: {e}", self.mount),
                }),
        }
    }

    async fn read_with(
        &self,
        client: &VaultClient,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<StoredVersion>, BackendError> {
        let Some(version) = version else {
            let known = self.known(path);
            // Nothing known of the path (its first read here, or KV v1): the value and the
            // bookkeeping are read at once.
            let (value, mut book) = if known.is_none() {
                let (value, book) = tokio::join!(
                    self.get_object(client, path, None),
                    self.bookkeeping(client, path)
                );
                (value, Some(book?))
            } else {
                (self.get_object(client, path, None).await, None)
            };
            let Some((values, store_version)) = value.map_err(|e| self.error(path, e))? else {
                match book {
                    // What a write of the first version needs to know.
                    Some(book) => self.remember(path, book.and_then(|b| b.current), Latest::Absent),
                    None => self.forget(path),
                }
                return Ok(None);
            };
            let current = match known
                .and_then(|k| k.current)
                .filter(|c| store_version.is_some() && c.store_version == store_version)
            {
                Some(c) => Some(c),
                None => {
                    let book = match book.take() {
                        Some(book) => book,
                        None => self.bookkeeping(client, path).await?,
                    };
                    book.and_then(|b| b.current)
                }
            };
            // Binary flags apply to the value keyhaven wrote, not to one written since by hand.
            let binary = match &current {
                Some(c) if self.kv == KvVersion::V1 || c.store_version == store_version => {
                    c.binary.clone()
                }
                _ => Vec::new(),
            };
            let data = decode(&values, &binary);
            let latest = store_version.map_or(Latest::Unknown, |v| Latest::At(v, digest(&data)));
            self.remember(path, current.clone(), latest);
            return Ok(Some(StoredVersion {
                data,
                stamp: current.and_then(|c| c.stamp()),
                store_version,
            }));
        };
        let book = self.bookkeeping(client, path).await?;
        let Some(entry) = book.and_then(|b| b.versions.get(&version).cloned()) else {
            return Ok(None);
        };
        let found = match self.kv {
            KvVersion::V2 => self.get_object(client, path, entry.store_version).await,
            KvVersion::V1 => {
                self.get_object(client, &Self::history_path(path, version), None)
                    .await
            }
        }
        .map_err(|e| self.error(path, e))?;
        Ok(found.map(|(values, store_version)| StoredVersion {
            data: decode(&values, &entry.binary),
            stamp: entry.stamp(),
            store_version,
        }))
    }

    async fn write_with(
        &self,
        client: &VaultClient,
        path: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<Option<u64>, BackendError> {
        let err = |e| self.error(path, e);
        // What a read of this reconcile just saw (KV v2 only).
        let known = self.known(path).filter(Known::fresh);
        let book = match &known {
            Some(Known { current: None, .. }) => None,
            _ => self.bookkeeping(client, path).await?,
        };
        let mut book = book.unwrap_or_else(|| Bookkeeping {
            path: path.to_owned(),
            ..Bookkeeping::default()
        });
        let (values, binary) = encode(data);
        if let Some(newer) = book.current.clone().filter(|c| c.version > stamp.version) {
            return self
                .write_older(client, path, book, newer, stamp, values, binary)
                .await;
        }
        // The value first. Unchanged content (a value written by hand, adopted as a
        // version) is not written again: only the bookkeeping changes.
        let latest = match known.map_or(Latest::Unknown, |k| k.latest) {
            Latest::At(v, seen) if seen == digest(data) => Err(Some(v)),
            Latest::At(v, _) => Ok(Some(v)),
            Latest::Absent => Ok(None),
            Latest::Unknown => match self.get_object(client, path, None).await.map_err(err)? {
                Some((old, v)) if decode(&old, &binary) == *data => Err(v),
                found => Ok(found.and_then(|(_, v)| v)),
            },
        };
        // Ok: a new KV version is written over the latest one; Err: the latest one holds it.
        let store_version = match latest {
            Err(unchanged) => unchanged,
            Ok(latest) => {
                self.make_room(client, path, &mut book, latest, 1).await?;
                self.put_object(client, path, &values).await.map_err(err)?
            }
        };
        if self.kv == KvVersion::V1 {
            self.put_object(client, &Self::history_path(path, stamp.version), &values)
                .await
                .map_err(err)?;
        }
        let entry = VersionEntry {
            version: stamp.version,
            fingerprint: stamp.fingerprint.to_string(),
            store_version,
            binary,
            owner: stamp.owner.clone(),
        };
        book.current = Some(entry.clone());
        book.versions.insert(stamp.version, entry.clone());
        while book.versions.len() > MAX_REMEMBERED_VERSIONS {
            let oldest = *book.versions.keys().next().expect("not empty");
            book.versions.remove(&oldest);
            if self.kv == KvVersion::V1 {
                self.remove_object(client, &Self::history_path(path, oldest))
                    .await
                    .map_err(err)?;
            }
        }
        self.put_object(client, &Self::object_path(path), &book)
            .await
            .map_err(err)?;
        let latest = store_version.map_or(Latest::Unknown, |v| Latest::At(v, digest(data)));
        self.remember(path, Some(entry), latest);
        Ok(store_version)
    }

    /// What this process last saw of `path` (KV v2 only).
    fn known(&self, path: &str) -> Option<Known> {
        if self.kv != KvVersion::V2 {
            return None;
        }
        let cache = self.known.lock().expect("bookkeeping cache lock");
        cache.get(path).cloned()
    }

    fn remember(&self, path: &str, current: Option<VersionEntry>, latest: Latest) {
        if self.kv != KvVersion::V2 {
            return;
        }
        let known = Known {
            current,
            latest,
            seen: std::time::Instant::now(),
        };
        let mut cache = self.known.lock().expect("bookkeeping cache lock");
        cache.insert(path.to_owned(), known);
    }

    fn forget(&self, path: &str) {
        let mut cache = self.known.lock().expect("bookkeeping cache lock");
        cache.remove(path);
    }

    /// Writes a version older than the current one (a migration copies history after a
    /// source switch wrote newer versions): it is kept, and the current value stays the
    /// latest. KV v2: the old value becomes a KV version, then the current value is written
    /// again on top; KV v1: only the history copy is written.
    #[allow(clippy::too_many_arguments)]
    async fn write_older(
        &self,
        client: &VaultClient,
        path: &str,
        mut book: Bookkeeping,
        mut newer: VersionEntry,
        stamp: &VersionStamp,
        values: HashMap<String, String>,
        binary: Vec<String>,
    ) -> Result<Option<u64>, BackendError> {
        let err = |e| self.error(path, e);
        if let Some(kept) = book.versions.get(&stamp.version)
            && kept.fingerprint == stamp.fingerprint.to_string()
        {
            return Ok(kept.store_version);
        }
        let store_version = match self.kv {
            KvVersion::V2 => {
                let (current, latest) = self
                    .get_object(client, path, None)
                    .await
                    .map_err(err)?
                    .ok_or_else(|| BackendError::Conflict {
                        store: self.name.clone(),
                        path: path.to_owned(),
                        message: "the current value disappeared while an older version was written"
                            .into(),
                    })?;
                self.make_room(client, path, &mut book, latest, 2).await?;
                let old = self.put_object(client, path, &values).await.map_err(err)?;
                newer.store_version = self.put_object(client, path, &current).await.map_err(err)?;
                book.versions.insert(newer.version, newer.clone());
                book.current = Some(newer);
                old
            }
            KvVersion::V1 => {
                self.put_object(client, &Self::history_path(path, stamp.version), &values)
                    .await
                    .map_err(err)?;
                None
            }
        };
        book.versions.insert(
            stamp.version,
            VersionEntry {
                version: stamp.version,
                fingerprint: stamp.fingerprint.to_string(),
                store_version,
                binary,
                owner: stamp.owner.clone(),
            },
        );
        self.put_object(client, &Self::object_path(path), &book)
            .await
            .map_err(err)?;
        // The latest KV version now holds the current value again, unread here.
        self.remember(path, book.current, Latest::Unknown);
        Ok(store_version)
    }

    async fn delete_with(&self, client: &VaultClient, path: &str) -> Result<(), BackendError> {
        let err = |e| self.error(path, e);
        self.forget(path);
        let book = self.bookkeeping(client, path).await?;
        self.remove_object(client, path).await.map_err(err)?;
        if self.kv == KvVersion::V1
            && let Some(book) = &book
        {
            for v in book.versions.keys() {
                self.remove_object(client, &Self::history_path(path, *v))
                    .await
                    .map_err(err)?;
            }
        }
        self.remove_object(client, &Self::object_path(path))
            .await
            .map_err(err)
    }

    async fn count_with(&self, client: &VaultClient) -> Result<u64, BackendError> {
        let listed = match self.kv {
            KvVersion::V2 => vaultrs::kv2::list(client, &self.mount, OBJECTS_PREFIX).await,
            KvVersion::V1 => vaultrs::kv1::list(client, &self.mount, OBJECTS_PREFIX)
                .await
                .map(|r| r.data.keys),
        };
        match listed {
            Ok(keys) => Ok(keys.iter().filter(|k| !k.ends_with('/')).count() as u64),
            Err(ClientError::APIError { code: 404, .. }) => Ok(0),
            Err(e) => Err(self.error(OBJECTS_PREFIX, e)),
        }
    }
}

/// Runs `op` with the store's session; when Vault refuses the token (it was revoked or
/// expired early), logs in again once and retries.
macro_rules! with_session {
    ($self:ident, |$client:ident| $op:expr) => {{
        let $client = $self.session.client().await?;
        match $op {
            Err(BackendError::Invalid { .. })
                if $self.session.token_was_revoked(&$client).await =>
            {
                let $client = $self.session.client().await?;
                $op
            }
            other => other,
        }
    }};
}

#[async_trait]
impl Backend for VaultStore {
    fn store(&self) -> &str {
        &self.name
    }

    async fn read(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<StoredVersion>, BackendError> {
        with_session!(self, |client| self.read_with(&client, path, version).await)
    }

    async fn write(
        &self,
        path: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<Option<u64>, BackendError> {
        with_session!(self, |client| self
            .write_with(&client, path, stamp, data)
            .await)
    }

    async fn list_versions(&self, path: &str) -> Result<Vec<u64>, BackendError> {
        let book = with_session!(self, |client| self.bookkeeping(&client, path).await)?;
        Ok(book
            .map(|b| b.versions.keys().copied().collect())
            .unwrap_or_default())
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        with_session!(self, |client| self.delete_with(&client, path).await)
    }

    async fn prune(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>, BackendError> {
        if versions.is_empty() {
            return Ok(Vec::new());
        }
        with_session!(self, |client| self
            .prune_with(&client, path, versions)
            .await)
    }

    async fn health(&self) -> Health {
        let server = match self.session.server_health().await {
            Ok(server) => server,
            Err(e) => return Health::failed(&e),
        };
        if let Err(e) = self.session.client().await {
            return Health::failed(&e);
        }
        let kv = match self.kv {
            KvVersion::V1 => "KV v1",
            KvVersion::V2 => "KV v2",
        };
        Health::active(format!(
            "{server}, {kv} at {}/, logged in with {}",
            self.mount,
            self.session.method()
        ))
    }

    async fn count(&self) -> Result<u64, BackendError> {
        with_session!(self, |client| self.count_with(&client).await)
    }

    async fn shutdown(&self) {
        self.session.revoke().await;
    }
}

#[cfg(test)]
mod tests;
