//! Approvals: a profile's `approval` policy, the request a ManagedSecret's change makes
//! (`status.approval`), and `SecretApproval`, the namespaced decision that answers it.

// Several `printcolumn(..)` in one `#[kube(..)]` repeat `type_ = ..`; clippy reads that as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use super::common::{
    DURATION_PATTERN, MAX_DURATION_TEXT, MAX_NAME, MAX_REASON, MAX_TIME, MAX_USER, named_enum,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which changes of the ManagedSecrets under a profile wait for approval, how many, and how
/// long a request stays open. Who may approve: anyone the cluster's RBAC allows the verb
/// `approve` on `managedsecrets` (group `keyhaven.io`) in the secret's namespace — never
/// the requester.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPolicy {
    /// The changes that need approval: `create` (the first version), `update` (any new
    /// version a user asks for: new content, a rotate request, a rollback; a scheduled
    /// rotation does not), `delete` (deleting the ManagedSecret) and `changeSource` (its
    /// profile or its content source).
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(min = 1, max = 4))]
    pub operations: Vec<ApprovalOperation>,
    /// Approvals from different users a request needs (1 to 10, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub required_approvals: Option<u32>,
    /// How long a request stays open (Go duration, default 72h); after it, it is Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub expiry: Option<String>,
}

/// The default number of approvals a request needs.
pub const DEFAULT_REQUIRED_APPROVALS: u32 = 1;
/// The default lifetime of a request: 72 hours.
pub const DEFAULT_APPROVAL_EXPIRY: std::time::Duration = std::time::Duration::from_secs(72 * 3600);

impl ApprovalPolicy {
    /// Whether `op` needs approval.
    pub fn covers(&self, op: ApprovalOperation) -> bool {
        self.operations.contains(&op)
    }

    /// Approvals a request needs.
    pub fn required(&self) -> u32 {
        self.required_approvals
            .unwrap_or(DEFAULT_REQUIRED_APPROVALS)
            .clamp(1, 10)
    }

    /// How long a request stays open (an unreadable expiry counts as the default; the
    /// schema's pattern refuses most).
    pub fn expiry(&self) -> std::time::Duration {
        self.expiry
            .as_deref()
            .and_then(|e| super::parse_duration(e).ok())
            .unwrap_or(DEFAULT_APPROVAL_EXPIRY)
    }
}

/// A change that can need approval.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ApprovalOperation {
    Create,
    Update,
    Delete,
    ChangeSource,
}

impl ApprovalOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalOperation::Create => "create",
            ApprovalOperation::Update => "update",
            ApprovalOperation::Delete => "delete",
            ApprovalOperation::ChangeSource => "changeSource",
        }
    }
}

named_enum! {
    /// Where a request stands: Pending (it waits for approvals), Approved (the required
    /// count reached: the change is carried out), Rejected (one rejection closes it) or
    /// Expired (its expiry passed first).
    pub enum RequestState {
        Pending,
        Approved,
        Rejected,
        Expired,
    }
}

/// The change of a ManagedSecret that waits for (or got) approval (`status.approval`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequest {
    /// The request's id: a SecretApproval answers it by this id (`spec.request`).
    #[schemars(length(max = 64))]
    pub id: String,
    /// What waits: create, update, delete or changeSource.
    pub operation: ApprovalOperation,
    /// What exactly is asked for, so that a further change needs approval again: the
    /// fingerprint of the pending content, or a digest of the generate parameters, of the
    /// new source, or of the deletion (never the value).
    #[schemars(length(max = 128))]
    pub binding: String,
    /// A one-line description of the change (no value), e.g. `new content pushed from
    /// Secret app-src`.
    #[schemars(length(max = MAX_REASON))]
    pub summary: String,
    /// Who asked (the admission webhook's record of the spec's last writer).
    #[schemars(length(max = MAX_USER))]
    pub requested_by: String,
    /// When the request was made.
    #[schemars(length(max = MAX_TIME))]
    pub requested_at: Time,
    /// When it expires unless decided.
    #[schemars(length(max = MAX_TIME))]
    pub expires_at: Time,
    /// The ManagedSecret's generation when the request was made: once it is Rejected or
    /// Expired, a new request is made only for a later spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Approvals it needs.
    pub required: u32,
    /// Pending, Approved, Rejected or Expired.
    pub state: RequestState,
    /// The decisions counted, in order (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub decisions: Vec<DecisionRecord>,
}

/// A decision counted for a request.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    /// The SecretApproval that made it.
    #[schemars(length(max = MAX_NAME))]
    pub name: String,
    /// Approve or Reject.
    pub decision: Decision,
    /// Who decided (recorded by the admission webhook).
    #[schemars(length(max = MAX_USER))]
    pub by: String,
    /// When the SecretApproval was made.
    #[schemars(length(max = MAX_TIME))]
    pub at: Time,
    /// The decider's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_REASON))]
    pub comment: Option<String>,
}

/// An answer to a ManagedSecret's pending request: approve or reject it. Immutable; the
/// admission webhook records who made it (`keyhaven.io/decided-by`) and refuses it from the
/// requester, from a user without `approve` on the ManagedSecret, and for a request that is
/// not the secret's open one (decided, expired, or superseded by a later change).
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyhaven.io",
    version = "v1alpha1",
    kind = "SecretApproval",
    doc = "A decision on a ManagedSecret's pending change: Approve or Reject, with a comment.",
    namespaced,
    shortname = "khapproval",
    category = "keyhaven",
    printcolumn(name = "Secret", type_ = "string", json_path = ".spec.secretRef.name"),
    printcolumn(name = "Request", type_ = "string", json_path = ".spec.request"),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision"),
    printcolumn(
        name = "By",
        type_ = "string",
        json_path = ".metadata.annotations.keyhaven\\.io/decided-by"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a decision is immutable: make a new SecretApproval"))]
pub struct SecretApprovalSpec {
    /// The ManagedSecret, in this namespace.
    pub secret_ref: SecretRef,
    /// The id of the request it answers (`status.approval.id` of the ManagedSecret).
    #[schemars(length(max = 64))]
    pub request: String,
    /// Approve or Reject.
    pub decision: Decision,
    /// Why (at most 1024 characters); recorded in the ManagedSecret's status and Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_REASON))]
    pub comment: Option<String>,
}

/// A ManagedSecret of the same namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct SecretRef {
    /// Its name.
    #[schemars(length(max = MAX_NAME))]
    pub name: String,
}

/// A decision.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Decision {
    Approve,
    Reject,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "Approve",
            Decision::Reject => "Reject",
        }
    }
}
