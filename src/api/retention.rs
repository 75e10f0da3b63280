//! What a profile lets its secrets keep and grow by: `retention` (versions kept in the
//! stores) and `quota` (what Kubernetes' ResourceQuota cannot count: versions per secret,
//! new versions per hour). The number of ManagedSecrets per namespace is Kubernetes' own:
//! a ResourceQuota on `count/managedsecrets.keyhaven.io`.

use super::common::MAX_TIME;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How many versions of each secret its stores keep.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicy {
    /// Versions of each ManagedSecret kept in every store of the profile (default 20):
    /// older ones are removed from the stores for good after each new version, except the
    /// current one, the one `rollbackTo` names, and all of them while a migration still has
    /// to move them. Each removal is an audit record.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("versions must be between 1 and 1000"))]
    pub versions: u32,
}

/// Default `retention.versions`.
pub const DEFAULT_RETENTION: u32 = 20;

/// Limits on the versions of each ManagedSecret under a profile.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VersionQuota {
    /// The most versions one ManagedSecret may keep in its stores (after retention): a new
    /// version beyond it is refused (`QuotaExceeded`) and nothing is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100000").message("versions must be between 1 and 100000"))]
    pub versions: Option<u32>,
    /// The most new versions one ManagedSecret may get per hour (an hour counted from the
    /// first version after the last hour ended): a push or rotation storm is refused
    /// (`QuotaExceeded`) until the hour is over; the native Secret keeps the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600").message("versionsPerHour must be between 1 and 3600"))]
    pub versions_per_hour: Option<u32>,
}

/// The most versions `status.retention.pinned` lists.
pub const MAX_PINNED: usize = 16;

/// Which versions of a ManagedSecret its stores keep (`status.retention`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionStatus {
    /// The stores keep every version from this one to the newest...
    pub oldest: u64,
    /// ...and these older ones (the current version or `rollbackTo`'s when they were older).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PINNED))]
    pub pinned: Vec<u64>,
    /// The versions kept, e.g. `3, 42-61`.
    #[schemars(length(max = 256))]
    pub kept: String,
    /// How many versions retention has removed so far.
    #[serde(default)]
    pub pruned: u64,
}

/// New versions counted against `quota.versionsPerHour` (`status.versionRate`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionRate {
    /// When the hour counted began (the first new version after the last hour ended).
    #[schemars(length(max = MAX_TIME))]
    pub since: Time,
    /// New versions since then.
    pub versions: u32,
}
