//! The audit log: one JSON line per operation on a secret — who, what, which secret, where,
//! which version (by fingerprint), why, and how it ended — on a stream of its own
//! (`--audit-log PATH`, or `-` for stdout), each line MACed in a chain under the audit key
//! ([`chain`]). Never a value, nor anything derived from one but its fingerprint.
//!
//! A record is on disk (written and synced) before the operation it describes is reported
//! done; while the stream cannot be written, nothing writes values ([`Audit::writable`]):
//! ManagedSecrets show `AuditUnavailable`.

pub mod chain;
mod key;
mod writer;

pub use chain::{AuditKey, ChainState, Finding, Verified, verify};
pub use key::{AUDIT_KEY, AUDIT_KEY_SECRET, key_from_file, key_of, load_or_create_key, read_key};
pub use writer::Target;

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What was done; written in kebab-case (`secret-written`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// The audit stream was opened by a starting operator.
    AuditStarted,
    /// A ManagedSecret's first version was written to its source store.
    Create,
    /// A new version (push, refresh, rotation, rollback, generation) was written to the
    /// source store; `reason` says which.
    Version,
    /// A version was written to a sync target.
    Sync,
    /// A version was read from a store to be materialized into the native Secret.
    Read,
    /// The native Secret was written with a version.
    SecretWritten,
    /// The native Secret (or keyhaven's keys in it) was removed, or released.
    SecretRemoved,
    /// A change started waiting for approval.
    ApprovalRequested,
    /// A decision on a pending change counted (`outcome`: success = approved, denied =
    /// rejected), or the request expired.
    ApprovalDecided,
    /// The compliance verdict of the current value changed.
    ComplianceChanged,
    /// A version was moved (written, verified, deleted) out of the profile's `migrateFrom`.
    Migrate,
    /// The secret's source store changed: new versions go to another store.
    Switch,
    /// The ManagedSecret's deletion was asked for (admitted by the webhook) or carried out.
    Delete,
    /// A change was refused: tenancy, admission, compliance, quota.
    Refused,
    /// Versions were removed from a store by the profile's retention.
    Prune,
}

impl Action {
    /// As written in a record.
    pub fn as_str(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// How the operation ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
    /// Refused (by admission, tenancy, compliance, quota, or an approver).
    Denied,
}

/// One audit record. Every text is bounded (a reason is cut at 1,024 bytes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Record {
    /// RFC 3339, UTC.
    pub time: String,
    /// The user recorded at admission for a user's change; `system:keyhaven` for what
    /// keyhaven does on its own.
    pub actor: String,
    pub action: Action,
    /// The kind of the object acted on (ManagedSecret, SecretApproval, VaultProfile…).
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub outcome: Outcome,
}

/// The actor of what keyhaven does on its own (scheduled work, repairs, migrations).
pub const SYSTEM_ACTOR: &str = "system:keyhaven";

/// The longest `reason` recorded.
const MAX_REASON: usize = 1024;

impl Record {
    /// A record of `action` on the ManagedSecret `namespace/name`, now, successful.
    pub fn new(action: Action, actor: &str, namespace: &str, name: &str) -> Self {
        Record {
            time: jiff::Timestamp::now().to_string(),
            actor: actor.to_owned(),
            action,
            kind: "ManagedSecret".into(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            path: None,
            store: None,
            version: None,
            fingerprint: None,
            reason: None,
            outcome: Outcome::Success,
        }
    }

    pub fn kind(mut self, kind: &str) -> Self {
        self.kind = kind.to_owned();
        self
    }

    pub fn path(mut self, path: &str) -> Self {
        self.path = Some(path.to_owned());
        self
    }

    pub fn store(mut self, store: &str) -> Self {
        self.store = Some(store.to_owned());
        self
    }

    pub fn version(mut self, version: u64, fingerprint: Option<&str>) -> Self {
        self.version = Some(version);
        self.fingerprint = fingerprint.map(str::to_owned);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        self.reason = Some(reason);
        self
    }

    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    pub fn at(mut self, time: jiff::Timestamp) -> Self {
        self.time = time.to_string();
        self
    }
}

/// The audit stream could not be written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the audit log cannot be written: {0}")]
pub struct AuditError(pub String);

/// The handle every part of the operator records through; cheap to clone. Disabled (no
/// `--audit-log`): records go nowhere and everything is writable.
#[derive(Clone, Default)]
pub struct Audit {
    writer: Option<Arc<writer::Writer>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl Audit {
    pub fn disabled() -> Self {
        Audit { writer: None }
    }

    /// Opens the stream (continuing the chain of the file's last record) and records
    /// `audit-started` by `actor`. A stream that cannot be opened now is not an error: the
    /// writer retries, and [`writable`](Self::writable) says why not meanwhile.
    pub fn open(target: Target, key: AuditKey, actor: &str) -> Self {
        let writer = writer::Writer::start(target, key);
        let audit = Audit {
            writer: Some(Arc::new(writer)),
        };
        let started = Record::new(Action::AuditStarted, actor, "", "").kind("Operator");
        audit.submit(vec![started]);
        audit
    }

    pub fn enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Writes `records` (in order) and waits until they are on disk.
    pub async fn record(&self, records: Vec<Record>) -> Result<(), AuditError> {
        match &self.writer {
            None => Ok(()),
            Some(_) if records.is_empty() => Ok(()),
            Some(w) => w.write(records).await,
        }
    }

    /// Queues `records` without waiting (for what reports nothing after: the webhook's
    /// refusals, the stream's start).
    pub fn submit(&self, records: Vec<Record>) {
        if let Some(w) = &self.writer
            && !records.is_empty()
        {
            w.submit(records);
        }
    }

    /// Whether the stream can be written now (checked by opening it), and why not.
    pub async fn writable(&self) -> Result<(), AuditError> {
        match &self.writer {
            None => Ok(()),
            Some(w) => w.probe().await,
        }
    }

    /// Whether the last write or check succeeded (for metrics; no I/O).
    pub fn available(&self) -> bool {
        self.writer.as_ref().is_none_or(|w| w.available())
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.written())
    }
}

/// `kubectl keyhaven audit verify FILE`: the line to print, and whether FILE verified.
pub fn verify_file(
    file: &std::path::Path,
    key: &AuditKey,
    continues: bool,
) -> Result<(String, bool), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(match verify(key, &text, continues) {
        Ok(v) => {
            let range = match (v.first_seq, v.last_seq) {
                (Some(a), Some(b)) => format!(" (records {a}-{b})"),
                _ => String::new(),
            };
            (
                format!("{}: {} records verified{range}", file.display(), v.records),
                true,
            )
        }
        Err(finding) => (format!("{}: {finding}", file.display()), false),
    })
}

#[cfg(test)]
mod tests;
