//! Moving one ManagedSecret's versions out of its profile's `migrateFrom` store into the
//! profile's source: every version the old store holds (and every version the status says
//! it holds) is written to the source, read back and compared by fingerprint; the status
//! then records the new store of each version; only after that is the old copy deleted.
//! Each step is idempotent, so a restart anywhere resumes: a version the source already
//! holds with the right fingerprint is not written again, and a secret whose status already
//! points at the source only has its old copy deleted.
//!
//! Three stages, like the sync: [`observe`] reads both stores, [`plan`] decides each
//! version's move (pure), [`apply`] writes, verifies, records and deletes.

use super::context::Context;
use crate::api::{
    ConditionType, ManagedSecret, ManagedSecretStatus, Reason, VersionRecord, condition,
    remove_condition, set_condition,
};
use crate::backend::{Backend, Owner, VersionStamp};
use crate::crypto::{ContentFingerprint, Fingerprint};
use crate::error::{Error, Result};
use crate::secret_data::SecretData;
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};
use tracing::{info, warn};

/// What to do with one version, from what each store holds (fingerprints) and what the
/// status recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum VersionMove {
    /// Write it to the new store (then verify).
    Write,
    /// The new store already holds it (a resumed migration).
    AlreadyThere,
    /// Stop: moving would lose or corrupt something.
    Refuse { reason: Reason, message: String },
}

/// Decides the move of version `n`.
pub fn plan_version(
    n: u64,
    from: &str,
    to: &str,
    recorded: Option<&str>,
    in_old: Option<&str>,
    in_new: Option<&str>,
) -> VersionMove {
    if let (Some(r), Some(o)) = (recorded, in_old)
        && r != o
    {
        return VersionMove::Refuse {
            reason: Reason::MigrationMismatch,
            message: format!(
                "store {from} holds content for version {n} other than its recorded fingerprint"
            ),
        };
    }
    let expected = recorded.or(in_old);
    match (in_new, expected) {
        (Some(new), Some(want)) if new == want => VersionMove::AlreadyThere,
        (Some(_), _) => VersionMove::Refuse {
            reason: Reason::MigrationConflict,
            message: format!("store {to} already holds other content as version {n}"),
        },
        (None, _) if in_old.is_some() => VersionMove::Write,
        (None, _) => VersionMove::Refuse {
            reason: Reason::MigrationVersionMissing,
            message: format!(
                "version {n}, recorded in store {from}, is in neither {from} nor {to}"
            ),
        },
    }
}

/// Records that the versions in `moved` (version → the new store's own version number)
/// now live in `to`.
pub fn record_moves(
    versions: &mut [VersionRecord],
    moved: &BTreeMap<u64, Option<u64>>,
    from: &str,
    to: &str,
) {
    for record in versions.iter_mut().filter(|r| r.store == from) {
        if let Some(store_version) = moved.get(&record.version) {
            record.store = to.to_owned();
            record.store_version = *store_version;
            record.moved_from = Some(from.to_owned());
        }
    }
}

/// Whether `status` still has something to move out of `from`.
pub fn pending(status: Option<&ManagedSecretStatus>, from: &str) -> bool {
    status.is_none_or(|s| {
        s.migrated_from.as_deref() != Some(from) || s.versions.iter().any(|r| r.store == from)
    })
}

/// Without `migrateFrom`, a leftover marker and condition go.
pub fn clear(status: &mut ManagedSecretStatus) {
    status.migrated_from = None;
    remove_condition(&mut status.conditions, ConditionType::Migrated);
}

/// One version as both stores hold it.
#[derive(Debug)]
pub struct VersionSeen {
    pub version: u64,
    /// The fingerprint the status recorded for it in the old store.
    pub recorded: Option<String>,
    /// Its content in the old store, and that content's fingerprint.
    pub in_old: Option<(SecretData, Fingerprint)>,
    /// The fingerprint of what the new store holds as this version, and its own number.
    pub in_new: Option<(Fingerprint, Option<u64>)>,
}

/// What a migration step decides on.
#[derive(Debug)]
pub struct Observed {
    pub from: String,
    pub to: String,
    pub versions: Vec<VersionSeen>,
    /// The owner the moved versions' stamps record (the migrating ManagedSecret).
    pub owner: Option<Owner>,
}

/// Reads every version at `path` that the old store holds or the status records there,
/// from both stores.
pub async fn observe(
    old: &dyn Backend,
    new: &dyn Backend,
    path: &str,
    status: &ManagedSecretStatus,
    fingerprint: impl Fn(&SecretData) -> ContentFingerprint,
) -> Result<Observed> {
    let (from, to) = (old.store().to_owned(), new.store().to_owned());
    let recorded: BTreeMap<u64, &str> = status
        .versions
        .iter()
        .filter(|r| r.store == from)
        .map(|r| (r.version, r.fingerprint.as_str()))
        .collect();
    let listed = old.list_versions(path).await?;
    let all: BTreeSet<u64> = listed
        .iter()
        .copied()
        .chain(recorded.keys().copied())
        .collect();
    let mut versions = Vec::with_capacity(all.len());
    for n in all {
        // Each store's content compared under the scheme the version was recorded with
        // (stamped with, for a version the status does not list).
        let old_read = match listed.contains(&n) {
            true => old.read(path, Some(n)).await?,
            false => None,
        };
        let scheme_of = recorded.get(&n).map(|r| r.to_string()).or_else(|| {
            old_read
                .as_ref()
                .and_then(|v| v.stamp.as_ref())
                .map(|s| s.fingerprint.to_string())
        });
        let as_recorded =
            |data: &SecretData| fingerprint(data).in_scheme_of(scheme_of.as_deref()).clone();
        let in_old = old_read.map(|v| {
            let fp = as_recorded(&v.data);
            (v.data, fp)
        });
        let in_new = new
            .read(path, Some(n))
            .await?
            .map(|v| (as_recorded(&v.data), v.store_version));
        versions.push(VersionSeen {
            version: n,
            recorded: recorded.get(&n).map(|r| r.to_string()),
            in_old,
            in_new,
        });
    }
    Ok(Observed {
        from,
        to,
        versions,
        owner: None,
    })
}

/// The moves of one migration step.
#[derive(Debug, PartialEq)]
pub struct Moves {
    pub from: String,
    pub to: String,
    /// Versions the new store already holds (a resumed migration), with its own numbers.
    pub already: BTreeMap<u64, Option<u64>>,
    /// Versions to write (then read back and verify).
    pub writes: Vec<(VersionStamp, SecretData)>,
}

/// Decides every version's move; the first refusal stops the step (nothing is written).
pub fn plan(observed: Observed) -> Result<Moves> {
    let Observed {
        from,
        to,
        versions,
        owner,
    } = observed;
    let mut moves = Moves {
        already: BTreeMap::new(),
        writes: Vec::new(),
        from,
        to,
    };
    for seen in versions {
        let old_fp = seen.in_old.as_ref().map(|(_, fp)| fp.as_str());
        let new_fp = seen.in_new.as_ref().map(|(fp, _)| fp.as_str());
        match plan_version(
            seen.version,
            &moves.from,
            &moves.to,
            seen.recorded.as_deref(),
            old_fp,
            new_fp,
        ) {
            VersionMove::AlreadyThere => {
                let store_version = seen.in_new.and_then(|(_, v)| v);
                moves.already.insert(seen.version, store_version);
            }
            VersionMove::Refuse { reason, message } => return Err(Error::config(reason, message)),
            VersionMove::Write => {
                let (data, fingerprint) = seen.in_old.expect("Write means the old store holds it");
                let stamp = VersionStamp {
                    version: seen.version,
                    fingerprint,
                    owner: owner.clone(),
                };
                moves.writes.push((stamp, data));
            }
        }
    }
    Ok(moves)
}

/// The condition of a step that failed before anything was recorded.
pub fn failed(status: &mut ManagedSecretStatus, error: &Error, generation: Option<i64>) {
    set_condition(
        &mut status.conditions,
        condition(
            ConditionType::Migrated,
            false,
            error.reason(),
            error.to_string(),
            generation,
        ),
    );
}

/// Carries out `moves` for `ms` and records them: the status (returned) says where every
/// version is, persisted before the old copy is deleted; `true` when the step failed (to be
/// retried soon).
pub async fn apply(
    ctx: &Context,
    ms: &ManagedSecret,
    mut status: ManagedSecretStatus,
    moves: Moves,
) -> Result<(ManagedSecretStatus, bool)> {
    let generation = ms.metadata.generation;
    let path = ms.store_path();
    let (from, to) = (moves.from.clone(), moves.to.clone());
    let written = match write_and_verify(ctx, ms, &path, moves).await {
        Ok(written) => written,
        Err(e) => {
            failed(&mut status, &e, generation);
            let stored = write_status(ctx, ms, &status).await?;
            ctx.health_checks.request();
            let status = stored.and_then(|s| s.status).unwrap_or(status);
            return Ok((status, true));
        }
    };
    record_moves(&mut status.versions, &written, &from, &to);
    let n = written.len();
    let records = written
        .keys()
        .map(|v| {
            let fingerprint = status
                .versions
                .iter()
                .find(|r| r.version == *v)
                .map(|r| r.fingerprint.clone());
            crate::audit::Record::new(
                crate::audit::Action::Migrate,
                crate::audit::SYSTEM_ACTOR,
                &ms.namespace().unwrap_or_default(),
                &ms.name_any(),
            )
            .path(&path)
            .store(&to)
            .version(*v, fingerprint.as_deref())
            .reason(format!("moved from store {from}, verified by fingerprint"))
        })
        .collect();
    if let Err(e) = ctx.config.audit.record(records).await {
        warn!(error = %e, "audit records of a migration step could not be written");
    }
    set_condition(
        &mut status.conditions,
        condition(
            ConditionType::Migrated,
            false,
            Reason::Moving,
            format!(
                "{n} version(s) written to store {to} and verified by fingerprint; deleting them from store {from}"
            ),
            generation,
        ),
    );
    // Recorded before anything is deleted: a restart from here on finds every version in
    // the new store.
    let recorded = write_status(ctx, ms, &status).await?;
    let base = recorded.unwrap_or_else(|| with_status(ms, status.clone()));
    // Nothing of this ManagedSecret's was moved (a value written by hand, or none): the old
    // store is left as it is — a migration deletes only what it copied and verified.
    let deleted = match (n, ctx.backend(&from).await) {
        (0, _) => Ok(()),
        (_, Ok(old)) => old.delete(&path).await.map_err(Error::from),
        (_, Err(e)) => Err(e),
    };
    let failed = match deleted {
        Ok(()) => {
            info!(from, to, versions = n, "migrated");
            status.migrated_from = Some(from.clone());
            set_condition(
                &mut status.conditions,
                condition(
                    ConditionType::Migrated,
                    true,
                    Reason::Moved,
                    format!(
                        "{n} version(s) moved from store {from} to store {to}, verified by fingerprint"
                    ),
                    generation,
                ),
            );
            false
        }
        Err(e) => {
            set_condition(
                &mut status.conditions,
                condition(
                    ConditionType::Migrated,
                    false,
                    Reason::MigrationDeleteFailed,
                    format!(
                        "every version is in store {to}, but deleting them from store {from} failed: {e}"
                    ),
                    generation,
                ),
            );
            true
        }
    };
    write_status(ctx, &base, &status).await?;
    if failed {
        ctx.health_checks.request();
    }
    Ok((status, failed))
}

/// Writes each planned version to the new store, reads it back and compares fingerprints;
/// returns every version now in the new store, with its own version numbers.
async fn write_and_verify(
    ctx: &Context,
    ms: &ManagedSecret,
    path: &str,
    moves: Moves,
) -> Result<BTreeMap<u64, Option<u64>>> {
    let mut moved = moves.already;
    if moves.writes.is_empty() {
        return Ok(moved);
    }
    let new = ctx.backend(&moves.to).await?;
    for (stamp, data) in moves.writes {
        new.write(path, &stamp, &data).await?;
        let back = new.read(path, Some(stamp.version)).await?;
        let namespace = ms.namespace().unwrap_or_default();
        let verified = back
            .filter(|v| {
                ctx.keys
                    .fingerprinter
                    .content(&namespace, ms.spec.type_.as_str(), &v.data)
                    .matches(stamp.fingerprint.as_str())
            })
            .ok_or_else(|| {
                Error::config(
                    Reason::MigrationVerifyFailed,
                    format!(
                        "version {} read back from store {} does not match its fingerprint",
                        stamp.version, moves.to
                    ),
                )
            })?;
        moved.insert(stamp.version, verified.store_version);
    }
    Ok(moved)
}

async fn write_status(
    ctx: &Context,
    ms: &ManagedSecret,
    status: &ManagedSecretStatus,
) -> Result<Option<ManagedSecret>> {
    let stored = ctx.apply_status(ms, status).await?;
    if let Some(stored) = &stored {
        ctx.status_written(stored);
    }
    Ok(stored)
}

fn with_status(ms: &ManagedSecret, status: ManagedSecretStatus) -> ManagedSecret {
    let mut ms = ms.clone();
    ms.status = Some(status);
    ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_each_version() {
        let plan = |r, o, n| plan_version(3, "a", "b", r, o, n);
        assert_eq!(plan(Some("x"), Some("x"), None), VersionMove::Write);
        assert_eq!(plan(None, Some("x"), None), VersionMove::Write);
        assert_eq!(
            plan(Some("x"), Some("x"), Some("x")),
            VersionMove::AlreadyThere
        );
        // Deleted from the old store after the status moved it: already there.
        assert_eq!(plan(Some("x"), None, Some("x")), VersionMove::AlreadyThere);
        assert!(matches!(
            plan(Some("x"), Some("y"), None),
            VersionMove::Refuse {
                reason: Reason::MigrationMismatch,
                ..
            }
        ));
        assert!(matches!(
            plan(Some("x"), Some("x"), Some("y")),
            VersionMove::Refuse {
                reason: Reason::MigrationConflict,
                ..
            }
        ));
        assert!(matches!(
            plan(Some("x"), None, None),
            VersionMove::Refuse {
                reason: Reason::MigrationVersionMissing,
                ..
            }
        ));
    }

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::parse(&format!("hmac-sha256:{}", hex::encode([n; 32]))).unwrap()
    }

    fn data(v: &str) -> SecretData {
        let mut d = SecretData::new();
        d.insert("password", v.as_bytes());
        d
    }

    /// Version `n` as recorded, in the old store and in the new one (by content label).
    fn seen(n: u64, recorded: Option<u8>, old: Option<u8>, new: Option<(u8, u64)>) -> VersionSeen {
        VersionSeen {
            version: n,
            recorded: recorded.map(|r| fp(r).to_string()),
            in_old: old.map(|o| (data(&format!("v{o}")), fp(o))),
            in_new: new.map(|(c, v)| (fp(c), Some(v))),
        }
    }

    #[test]
    fn a_step_writes_what_is_missing_and_keeps_what_is_there() {
        let observed = Observed {
            from: "a".into(),
            to: "b".into(),
            owner: None,
            versions: vec![
                seen(1, Some(1), Some(1), Some((1, 7))),
                seen(2, Some(2), Some(2), None),
            ],
        };
        let moves = plan(observed).unwrap();
        assert_eq!(moves.already, BTreeMap::from([(1, Some(7))]));
        assert_eq!(moves.writes.len(), 1);
        assert_eq!(moves.writes[0].0.version, 2);
        assert_eq!(moves.writes[0].0.fingerprint, fp(2));
    }

    #[test]
    fn one_refused_version_stops_the_whole_step() {
        let observed = Observed {
            owner: None,
            from: "a".into(),
            to: "b".into(),
            // Version 2's content in the old store is not what the status recorded.
            versions: vec![
                seen(1, None, Some(1), None),
                seen(2, Some(2), Some(9), None),
            ],
        };
        let e = plan(observed).unwrap_err();
        assert_eq!(e.reason(), Reason::MigrationMismatch);
        assert!(
            !e.to_string().contains("changed"),
            "no value in the message"
        );
    }

    #[test]
    fn records_moves_only_of_versions_moved_out_of_from() {
        let rec = |v, store: &str| VersionRecord {
            version: v,
            fingerprint: format!("f{v}"),
            store: store.into(),
            created_at: crate::api::now(),
            created_by: "t".into(),
            reason: None,
            store_version: None,
            moved_from: None,
        };
        let mut versions = vec![rec(1, "a"), rec(2, "a"), rec(3, "b"), rec(4, "c")];
        let moved = BTreeMap::from([(1, Some(7)), (2, Some(8)), (4, Some(9))]);
        record_moves(&mut versions, &moved, "a", "b");
        assert_eq!(versions[0].store, "b");
        assert_eq!(versions[0].store_version, Some(7));
        assert_eq!(versions[0].moved_from.as_deref(), Some("a"));
        assert_eq!(versions[1].store_version, Some(8));
        assert_eq!(versions[2].moved_from, None);
        // A version in another store is not touched.
        assert_eq!(versions[3].store, "c");
        assert!(!pending(
            Some(&ManagedSecretStatus {
                migrated_from: Some("a".into()),
                versions,
                ..Default::default()
            }),
            "a"
        ));
        assert!(pending(None, "a"));
    }

    #[test]
    fn clearing_drops_the_marker_and_the_condition() {
        let mut status = ManagedSecretStatus {
            migrated_from: Some("a".into()),
            ..Default::default()
        };
        failed(
            &mut status,
            &Error::config(Reason::MigrationConflict, "x"),
            Some(1),
        );
        assert_eq!(status.conditions.len(), 1);
        clear(&mut status);
        assert_eq!(status.migrated_from, None);
        assert!(status.conditions.is_empty());
    }
}
