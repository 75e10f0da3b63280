//! `SecretStore`: a backend the platform team configures (cluster-scoped).

// Several `printcolumn(..)` in one `#[kube(..)]` repeat `type_ = ..`; clippy reads that as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use super::common::conditions_schema;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A configured secret backend. Exactly one provider is set.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyhaven.io",
    version = "v1alpha1",
    kind = "SecretStore",
    doc = "A configured secret backend (internal, kubernetes) with its health and the number of secrets it holds.",
    status = "SecretStoreStatus",
    shortname = "khstore",
    category = "keyhaven",
    printcolumn(name = "Type", type_ = "string", json_path = ".status.type"),
    printcolumn(name = "Secrets", type_ = "integer", json_path = ".status.secrets"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63").message("a SecretStore name has at most 63 characters (it is used as a label value)"),
)]
#[serde(rename_all = "camelCase")]
pub struct SecretStoreSpec {
    /// The backend. Exactly one of its fields is set.
    pub provider: Provider,
}

/// The backend of a store: exactly one of `internal` or `kubernetes`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.internal), has(self.kubernetes)].filter(x, x).size() == 1").message("exactly one provider must be set"),
)]
pub struct Provider {
    /// keyhaven's own software-encrypted store, the zero-dependency default: every version
    /// is encrypted with AES-256-GCM under a fresh data key, which a master key held in a
    /// Secret of the operator's namespace wraps; ciphertexts are kept in Secrets there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal: Option<InternalProvider>,
    /// Plain Kubernetes Secrets in a namespace of the operator's cluster. The current
    /// value of a path lives in a Secret named after the path (`/` becomes `.`), each
    /// version in an immutable copy named `<name>.v<N>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesProvider>,
}

/// Settings of the internal store (none yet).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
pub struct InternalProvider {}

/// Settings of the kubernetes store.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesProvider {
    /// The namespace holding the store's Secrets. It must exist.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 63").message("must be a namespace name"))]
    pub namespace: String,
}

/// The store's health, as `juju secret-backends` shows it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StorePhase {
    /// Reachable and usable.
    Active,
    /// Being emptied by a migration; still readable.
    Draining,
    /// Reachable but locked (a sealed Vault, an HSM token that refuses the PIN).
    Sealed,
    /// Does not answer.
    Unreachable,
    /// Misconfigured: the spec or the credentials are wrong.
    Invalid,
}

impl StorePhase {
    /// The phase's name as it appears in status.
    pub fn as_str(self) -> &'static str {
        match self {
            StorePhase::Active => "Active",
            StorePhase::Draining => "Draining",
            StorePhase::Sealed => "Sealed",
            StorePhase::Unreachable => "Unreachable",
            StorePhase::Invalid => "Invalid",
        }
    }
}

/// Observed state of a SecretStore.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretStoreStatus {
    /// Active, Draining, Sealed, Unreachable or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<StorePhase>,
    /// The provider kind: internal or kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub type_: Option<String>,
    /// How many secret objects (paths) the store holds for keyhaven.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<u64>,
    /// Why the store is in its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the health was last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<Time>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` is True when the store is Active.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

impl SecretStoreSpec {
    /// The provider kind's name, as shown in the TYPE column.
    pub fn provider_type(&self) -> &'static str {
        match &self.provider {
            Provider {
                internal: Some(_), ..
            } => "internal",
            Provider {
                kubernetes: Some(_),
                ..
            } => "kubernetes",
            _ => "none",
        }
    }
}
