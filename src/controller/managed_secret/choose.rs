//! Which content a sync brings every store to (pure): the rollback's version, the stored or
//! a freshly generated value, the source's, or the pushed Secret's — with where it came from
//! and the reason a new version records.

use super::decide::{GenerateDecision, rollback_source};
use super::observe::{Content, Gathered, Read};
use super::plan::generate_decision;
use crate::api::{ManagedSecret, ManagedSecretStatus, Reason};
use crate::backend::VersionStamp;
use crate::error::Error;

/// The content to bring every store to, where it came from, and the reason to record
/// whatever `spec.reason` says (rotations, rollbacks).
pub(super) struct Chosen {
    pub value: Read,
    pub origin: String,
    pub forced_reason: Option<String>,
    pub rotate_request: Option<String>,
    /// What the current value (the source's, or the one kept after a switch) is stamped
    /// with, and its store's own version number.
    pub current_stamp: Option<VersionStamp>,
    pub current_store_version: Option<u64>,
    /// The store the content was read from (None: generated, or pushed).
    pub read_from: Option<String>,
}

/// Version `n` as read for a rollback, checked against its recorded fingerprint.
fn rolled_back(
    status: &ManagedSecretStatus,
    source: &str,
    path: &str,
    n: u64,
    store: &str,
    found: Option<Read>,
) -> Result<Read, Error> {
    let found = found.ok_or_else(|| {
        Error::config(
            Reason::RollbackVersionNotFound,
            format!("rollbackTo: version {n} does not exist in store {store} at {path}"),
        )
    })?;
    if let (_, Some(recorded)) = rollback_source(&status.versions, n, source)
        && !found.fingerprint.matches(recorded)
    {
        return Err(Error::config(
            Reason::RollbackVersionMismatch,
            format!(
                "rollbackTo: store {store} holds content for version {n} other than its recorded fingerprint"
            ),
        ));
    }
    Ok(found)
}

pub(super) fn choose_content(
    ms: &ManagedSecret,
    g: &mut Gathered,
    status: &ManagedSecretStatus,
    now: jiff::Timestamp,
) -> Result<Chosen, Error> {
    let path = ms.store_path();
    let source = g.profile.spec.source.clone();
    let last = status.versions.last();
    // After a switch the current version is read from the store it was written to.
    let current_store = match (&g.carried, last) {
        (Some(Some(_)), Some(last)) => last.store.clone(),
        _ => source.clone(),
    };
    let (current, origin) = match (g.carried.take(), last) {
        (Some(Some(kept)), Some(last)) => {
            if !kept.fingerprint.matches(&last.fingerprint) {
                return Err(Error::config(
                    Reason::VersionMismatch,
                    format!(
                        "store {} holds content for version {} other than its recorded fingerprint",
                        last.store, last.version
                    ),
                ));
            }
            let origin = format!(
                "read from store {} (version {}, kept there after the source changed)",
                last.store, last.version
            );
            (Some(kept), origin)
        }
        _ => (g.source.clone(), format!("read from store {source}")),
    };
    let current_stamp = current.as_ref().and_then(|c| c.stamp.clone());
    let current_store_version = current.as_ref().and_then(|c| c.store_version);
    let chosen = |value, origin| Chosen {
        value,
        origin,
        forced_reason: None,
        rotate_request: None,
        current_stamp: current_stamp.clone(),
        current_store_version,
        read_from: Some(current_store.clone()),
    };
    match std::mem::replace(&mut g.content, Content::Unset) {
        Content::Rollback {
            version: n,
            store,
            found,
        } => {
            let found = rolled_back(status, &source, &path, n, &store, found)?;
            let reason = format!("rollback to version {n}");
            Ok(Chosen {
                forced_reason: Some(ms.spec.reason.clone().unwrap_or_else(|| reason.clone())),
                read_from: Some(store.clone()),
                ..chosen(found, reason)
            })
        }
        Content::Generate { fresh } => {
            let decision = generate_decision(ms, &g.profile, status, current.as_ref(), now);
            let rotate_request = ms.rotate_request();
            match (decision, current, fresh) {
                (GenerateDecision::UseStored, Some(current), _) => Ok(Chosen {
                    rotate_request,
                    ..chosen(current, origin)
                }),
                (GenerateDecision::Generate { reason }, current, Some(fresh)) => Ok(Chosen {
                    forced_reason: current.is_some().then(|| reason.clone()),
                    rotate_request,
                    read_from: None,
                    ..chosen(fresh, reason)
                }),
                // The observation generated exactly when this rule says so.
                _ => Err(Error::config(
                    Reason::NoContentSource,
                    "content.generate: the observation and the plan disagree on generating",
                )),
            }
        }
        Content::FromStore => match current {
            Some(current) => Ok(chosen(current, origin)),
            None => Err(Error::config(
                Reason::NotFoundInStore,
                format!("path {path} does not exist in store {source}"),
            )),
        },
        Content::Pushed { from, value } => Ok(Chosen {
            read_from: None,
            ..chosen(value, format!("pushed from Secret {from}"))
        }),
        Content::Unset => Err(Error::config(
            Reason::NoContentSource,
            "spec.content sets no source",
        )),
    }
}
