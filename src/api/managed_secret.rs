//! `ManagedSecret`: one typed secret object, its versions and its Kubernetes Secret
//! (namespaced).

// Several `printcolumn(..)` in one `#[kube(..)]` repeat `type_ = ..`; clippy reads that as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use super::common::{DURATION_PATTERN, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A typed secret kept in a profile's stores and materialized as a native Secret.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyhaven.io",
    version = "v1alpha1",
    kind = "ManagedSecret",
    doc = "A typed secret under a VaultProfile: versioned in its stores and materialized as a native Secret.",
    namespaced,
    status = "ManagedSecretStatus",
    shortname = "khsecret",
    shortname = "ms",
    category = "keyhaven",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Profile", type_ = "string", json_path = ".spec.profile"),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.currentVersion"
    ),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ManagedSecretSpec {
    /// The VaultProfile whose stores hold this secret.
    pub profile: String,
    /// What the secret is; decides validation and the native Secret's type and keys.
    #[serde(rename = "type")]
    pub type_: SecretType,
    /// The secret object's name in the stores. Defaults to `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$') && size(self) <= 200").message("path is slash-separated segments of letters, digits, '_', '.' and '-' (a segment may not start with '.' or '-'), at most 200 characters"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("path is immutable"))]
    pub path: Option<String>,
    /// Where the value comes from.
    pub content: ContentSource,
    /// How often the source is read again (Go duration, e.g. `1h`). Default 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub refresh_interval: Option<String>,
    /// The native Secret pods consume.
    #[serde(default)]
    pub target: TargetSpec,
    /// Recorded in the version history as the reason of the next new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The secret types. Each decides what keys are required and how the native Secret looks.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SecretType {
    /// Any non-empty set of keys; an `Opaque` Secret with the same keys.
    KeyValue,
    /// Any set of keys, kept as-is; an `Opaque` Secret.
    Generic,
    /// `username` and `password`; a `kubernetes.io/basic-auth` Secret.
    BasicAuth,
    /// `password`; an `Opaque` Secret with key `password`.
    Password,
    /// `api-key` (and optionally `expires-at`, RFC 3339); an `Opaque` Secret.
    ApiKey,
}

impl SecretType {
    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretType::KeyValue => "key-value",
            SecretType::Generic => "generic",
            SecretType::BasicAuth => "basic-auth",
            SecretType::Password => "password",
            SecretType::ApiKey => "api-key",
        }
    }
}

/// Where a ManagedSecret's value comes from: exactly one field is set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.fromStore), has(self.fromSecret)].filter(x, x).size() == 1").message("exactly one content source must be set"))]
pub struct ContentSource {
    /// The value is already in the profile's source store at `path` (like an ExternalSecret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_store: Option<FromStore>,
    /// The value is pushed from a Secret in this namespace (like a PushSecret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_secret: Option<FromSecret>,
}

/// Read the value from the source store.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
pub struct FromStore {}

/// Push the value of a Secret of the ManagedSecret's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FromSecret {
    /// Name of the Secret.
    pub name: String,
}

/// The native Secret.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// Name of the Secret. Defaults to the ManagedSecret's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Extra labels on the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Owner (default): keyhaven creates the Secret and owns it. Merge: the Secret exists
    /// already; keyhaven adds its keys and owns only those. Orphan: keyhaven creates the
    /// Secret without an owner reference.
    #[serde(default)]
    pub creation_policy: CreationPolicy,
    /// What happens to the Secret when the ManagedSecret is deleted. Delete (default):
    /// it goes too (Merge: keyhaven's keys are removed). Retain: it stays, ownerless.
    /// The stores keep every version either way.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// How the native Secret is created and owned.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CreationPolicy {
    #[default]
    Owner,
    Merge,
    Orphan,
}

/// What deleting the ManagedSecret does to the native Secret.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// Observed state of a ManagedSecret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedSecretStatus {
    /// Synced or Error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The version the native Secret holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
    /// The newest versions, oldest first (the profile's `history.keep` of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionRecord>,
    /// Where each store of the profile stands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,
    /// The native Secret's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `Synced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// One version of a secret. Never rewritten once recorded.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionRecord {
    /// The version number, from 1.
    pub version: u64,
    /// HMAC-SHA256 of the type and the canonical key/values, keyed by an operator-held
    /// key: identifies the content without revealing it.
    pub fingerprint: String,
    /// The store the version was first written to or read from.
    pub store: String,
    /// When keyhaven recorded the version.
    pub created_at: Time,
    /// Who made the version.
    pub created_by: String,
    /// Why the version was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The store's own version number of this content, where the store has one (the KV v2
    /// version in Vault/OpenBao).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_version: Option<u64>,
}

/// Where one store of the profile stands for this secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// The SecretStore.
    pub store: String,
    /// Source or SyncTarget.
    pub role: String,
    /// The version it holds, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Synced or Error.
    pub state: String,
    /// When it was last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_at: Option<Time>,
    /// Why it is not Synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ManagedSecret {
    /// The secret object's path in the stores: `spec.path` or `<namespace>/<name>`.
    pub fn store_path(&self) -> String {
        match &self.spec.path {
            Some(p) => p.clone(),
            None => format!(
                "{}/{}",
                self.metadata.namespace.as_deref().unwrap_or_default(),
                self.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }

    /// The native Secret's name: `spec.target.name` or the ManagedSecret's name.
    pub fn secret_name(&self) -> String {
        self.spec
            .target
            .name
            .clone()
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }
}
