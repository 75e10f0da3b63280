//! `VaultProfile`: one source store, N sync targets and the rules of the secrets under it
//! (cluster-scoped).

// Several `printcolumn(..)` in one `#[kube(..)]` repeat `type_ = ..`; clippy reads that as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use super::common::{
    ClampToSchema, DURATION_PATTERN, MAX_DURATION_TEXT, MAX_MESSAGE, MAX_STORE_NAME,
    clamp_conditions, clamp_opt, clamp_text, conditions_schema, label_selector_schema, named_enum,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Binds a source SecretStore to the stores that receive a copy of every version.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyhaven.io",
    version = "v1alpha1",
    kind = "VaultProfile",
    doc = "Binds one source SecretStore to N sync-target stores, with the rules of the secrets under it.",
    status = "VaultProfileStatus",
    shortname = "khprofile",
    category = "keyhaven",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(name = "Default", type_ = "boolean", json_path = ".spec.default"),
    printcolumn(
        name = "Targets",
        type_ = "string",
        json_path = ".spec.syncTargets",
        priority = 1
    ),
    printcolumn(name = "Secrets", type_ = "integer", json_path = ".status.secrets"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.syncTargets) || !(self.source in self.syncTargets)").message("the source store cannot also be a sync target"))]
#[x_kube(validation = Rule::new("!has(self.migrateFrom) || self.migrateFrom != self.source").message("migrateFrom names the store versions move out of: it cannot be the source they move to"))]
#[x_kube(validation = Rule::new("!has(self.default) || !self.default || has(self.namespaceSelector)").message("default: true needs a namespaceSelector (fallback: true makes a profile the one of every namespace no default selects)"))]
pub struct VaultProfileSpec {
    /// The SecretStore that holds the authoritative copy: values are read from it
    /// (`content.fromStore`) or written to it first (`fromSecret`).
    #[x_kube(validation = Rule::new("size(self) > 0").message("source must name a SecretStore"))]
    #[schemars(length(max = MAX_STORE_NAME))]
    pub source: String,
    /// SecretStores that receive every version written to or read from the source (at
    /// most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        extend("x-kubernetes-list-type" = "set"),
        length(max = 32),
        inner(length(max = MAX_STORE_NAME))
    )]
    pub sync_targets: Vec<String>,
    /// Move every version of every ManagedSecret of this profile out of this SecretStore
    /// into `source`: each version is written to the source, read back and compared by
    /// fingerprint, recorded in the ManagedSecret's status, and only then deleted here.
    /// Resumable (a restart picks up where it stopped); progress in `status.migration`;
    /// the store shows `Draining` until it is done. Remove it once `Complete`, or leave it.
    /// Without it, changing `source` moves nothing: old versions stay readable where they
    /// were written, new ones go to the new source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_STORE_NAME))]
    pub migrate_from: Option<String>,
    /// Namespaces whose ManagedSecrets may use this profile (by `spec.profile`, the
    /// namespace annotation `keyhaven.io/profile`, as their default or as the fallback).
    /// Not set: every namespace. A ManagedSecret of a namespace it does not select is
    /// refused (`ProfileNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "label_selector_schema::<Option<LabelSelector>>")]
    pub namespace_selector: Option<LabelSelector>,
    /// The preferred profile of every namespace `namespaceSelector` selects: ManagedSecrets
    /// there without `spec.profile` (and without the namespace annotation
    /// `keyhaven.io/profile`) use it. Needs a namespaceSelector. Two defaults selecting one
    /// namespace are a conflict, reported on both profiles; such ManagedSecrets are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// The cluster-wide fallback: the profile of ManagedSecrets without `spec.profile` in
    /// namespaces no default profile selects (its own namespaceSelector, when set, still
    /// applies). At most one profile may be the fallback; two are a conflict.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
    /// History kept in each ManagedSecret's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryPolicy>,
    /// How strong the `password` of every `password` ManagedSecret under this profile must
    /// be, whether pushed, read or generated. A weaker one is refused before anything is
    /// stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_policy: Option<PasswordPolicy>,
    /// Where in this profile's stores each namespace's secrets live: its secret space. A
    /// ManagedSecret reads, writes, rolls back, migrates and issues from paths in its
    /// namespace's space only. Default: `{namespace}/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_space: Option<SecretSpace>,
    /// Paths outside their own space that selected namespaces may read (`content.fromStore`
    /// only: never written, rolled back or migrated by them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub shared_paths: Vec<SharedPath>,
    /// Allow `certificate` ManagedSecrets under this profile to be intermediate CAs (`isCA`
    /// with `issuerRef`): each can then issue certificates chained to its issuer. Default
    /// false.
    #[serde(
        default,
        rename = "allowIntermediateCAs",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub allow_intermediate_cas: bool,
    /// Lower minimums than the admission webhook's defaults for the ManagedSecrets under
    /// this profile (a test or a fast-rotating environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ProfileLimits>,
    /// Changes of the ManagedSecrets under this profile that wait for approval (four
    /// eyes): see `SecretApproval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<super::ApprovalPolicy>,
    /// Rules every ManagedSecret under this profile is checked against (condition
    /// `Compliant`); `enforcement: Deny` refuses a new version that breaks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance: Option<super::CompliancePolicy>,
    /// How many versions of each ManagedSecret the stores keep (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<super::RetentionPolicy>,
    /// Limits on the versions of each ManagedSecret (the number of ManagedSecrets is
    /// limited by a ResourceQuota on `count/managedsecrets.keyhaven.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<super::VersionQuota>,
}

/// Minimums the admission webhook holds the ManagedSecrets of a profile to.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProfileLimits {
    /// The shortest `refreshInterval` (Go duration; default 10s, at least 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub min_refresh_interval: Option<String>,
    /// The shortest `rotation.interval` (Go duration; default 1h, at least 1m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub min_rotation_interval: Option<String>,
}

/// A namespace's secret space in a profile's stores.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretSpace {
    /// The path prefix of a namespace's space: slash-terminated segments (letters, digits,
    /// '_', '.', '-'; at most 120 characters), one of which is `{namespace}` (replaced by the
    /// namespace's name), e.g. `apps/{namespace}/` for an existing Vault layout.
    /// `{namespace}` being a whole segment keeps every namespace's space apart from every
    /// other's.
    #[serde(default = "default_prefix")]
    #[schemars(
        regex(
            pattern = r"^([A-Za-z0-9_][A-Za-z0-9_.-]*/)*[{]namespace[}]/([A-Za-z0-9_][A-Za-z0-9_.-]*/)*$"
        ),
        length(max = 120)
    )]
    pub prefix: String,
    /// `Enforced` (the default): paths outside the space are refused. `Disabled`: any path
    /// of the stores is open to every namespace the profile selects — for a single-tenant
    /// cluster only; the profile's condition `Isolated` says so.
    #[serde(default)]
    pub isolation: Isolation,
}

/// The default secret space: `{namespace}/`.
pub fn default_prefix() -> String {
    "{namespace}/".into()
}

impl Default for SecretSpace {
    fn default() -> Self {
        SecretSpace {
            prefix: default_prefix(),
            isolation: Isolation::Enforced,
        }
    }
}

/// Whether a profile keeps namespaces in their own secret spaces.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Isolation {
    #[default]
    Enforced,
    Disabled,
}

/// A path (or, ending with `/`, every path under it) that the namespaces a selector picks
/// may read.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SharedPath {
    /// The path, or a prefix ending with `/`: slash-separated segments of letters, digits,
    /// '_', '.' and '-' (a segment may not start with '.' or '-'), at most 200 characters.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*/?$"),
        length(max = 200)
    )]
    pub path: String,
    /// The namespaces that may read it (required: sharing is granted explicitly).
    #[schemars(schema_with = "label_selector_schema::<LabelSelector>")]
    pub namespace_selector: LabelSelector,
}

/// The strength a profile asks of passwords.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PasswordPolicy {
    /// At least this many characters.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1024").message("minLength must be between 1 and 1024"))]
    pub min_length: u32,
    /// At least this many of the four classes: lower-case letters, upper-case letters,
    /// digits, other characters. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4").message("minClasses must be between 1 and 4"))]
    pub min_classes: Option<u8>,
}

/// How much version history a ManagedSecret's status keeps.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPolicy {
    /// Number of versions listed in `status.versions` (the stores keep every version).
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("keep must be between 1 and 100"))]
    pub keep: u32,
}

/// Default number of versions a ManagedSecret's status lists.
pub const DEFAULT_HISTORY_KEEP: usize = 10;

impl VaultProfileSpec {
    /// How many versions a ManagedSecret under this profile lists in its status.
    pub fn history_keep(&self) -> usize {
        self.history
            .as_ref()
            .map_or(DEFAULT_HISTORY_KEEP, |h| h.keep as usize)
    }

    /// How many versions of each ManagedSecret the stores keep.
    pub fn retention_versions(&self) -> u32 {
        self.retention
            .as_ref()
            .map_or(super::DEFAULT_RETENTION, |r| r.versions)
    }

    /// The source followed by the sync targets.
    pub fn stores(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.source.as_str()).chain(self.sync_targets.iter().map(String::as_str))
    }
}

/// Observed state of a VaultProfile.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultProfileStatus {
    /// Ready when the source and every sync target exist and are Active; NotReady otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProfilePhase>,
    /// Why the profile is in its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_MESSAGE))]
    pub message: Option<String>,
    /// ManagedSecrets using this profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<u64>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The migration `spec.migrateFrom` asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// How many of the profile's ManagedSecrets meet its compliance rules (with
    /// `spec.compliance` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance: Option<super::ComplianceSummary>,
    /// `Ready`, and `Conflict` (True while this profile is a default or fallback together
    /// with another one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

impl ClampToSchema for VaultProfileStatus {
    fn clamp_to_schema(&mut self) {
        clamp_opt(&mut self.message, MAX_MESSAGE);
        clamp_conditions(&mut self.conditions);
        if let Some(m) = &mut self.migration {
            clamp_text(&mut m.from, MAX_STORE_NAME);
            clamp_text(&mut m.to, MAX_STORE_NAME);
        }
    }
}

/// Progress of a profile's migration out of `spec.migrateFrom`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// The store versions move out of.
    #[schemars(length(max = MAX_STORE_NAME))]
    pub from: String,
    /// The store they move to (the source).
    #[schemars(length(max = MAX_STORE_NAME))]
    pub to: String,
    /// Migrating, Complete, or Failed (some secrets could not be moved; they are retried).
    pub phase: MigrationPhase,
    /// ManagedSecrets of the profile.
    pub total: u64,
    /// ManagedSecrets whose every version is in `to` and none is left in `from`.
    pub moved: u64,
    /// ManagedSecrets whose last attempt failed (condition `Migrated` says why).
    pub failed: u64,
    /// Versions moved so far.
    #[serde(default)]
    pub versions_moved: u64,
}

named_enum! {
    /// Whether a VaultProfile can be used: Ready (the source and every sync target exist
    /// and are Active or Draining) or NotReady (a store is missing or not Active: the
    /// message says which).
    pub enum ProfilePhase {
        Ready,
        NotReady,
    }
}

named_enum! {
    /// Where a profile's migration out of `spec.migrateFrom` stands: Migrating (secrets
    /// are being moved), Complete (every secret's versions are in the source; the old store
    /// holds none of them) or Failed (the secrets left could not be moved: their condition
    /// Migrated says why; they are retried).
    pub enum MigrationPhase {
        Migrating,
        Complete,
        Failed,
    }
}
