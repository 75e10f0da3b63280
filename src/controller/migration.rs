//! Moving one ManagedSecret's versions out of its profile's `migrateFrom` store into the
//! profile's source: every version the old store holds (and every version the status says
//! it holds) is written to the source, read back and compared by fingerprint; the status
//! then records the new store of each version; only after that is the old copy deleted.
//! Each step is idempotent, so a restart anywhere resumes: a version the source already
//! holds with the right fingerprint is not written again, and a secret whose status already
//! points at the source only has its old copy deleted.

use super::Context;
use crate::api::{
    ManagedSecret, ManagedSecretStatus, VaultProfile, VersionRecord, condition, set_condition,
};
use crate::backend::{Backend, VersionStamp};
use crate::crypto::Fingerprint;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use tracing::info;

/// The condition a migrating ManagedSecret carries.
pub const CONDITION: &str = "Migrated";

/// What to do with one version, from what each store holds (fingerprints) and what the
/// status recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum VersionMove {
    /// Write it to the new store (then verify).
    Write,
    /// The new store already holds it (a resumed migration).
    AlreadyThere,
    /// Stop: moving would lose or corrupt something.
    Refuse {
        reason: &'static str,
        message: String,
    },
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
            reason: "MigrationMismatch",
            message: format!(
                "store {from} holds content for version {n} other than its recorded fingerprint"
            ),
        };
    }
    let expected = recorded.or(in_old);
    match (in_new, expected) {
        (Some(new), Some(want)) if new == want => VersionMove::AlreadyThere,
        (Some(_), _) => VersionMove::Refuse {
            reason: "MigrationConflict",
            message: format!("store {to} already holds other content as version {n}"),
        },
        (None, _) if in_old.is_some() => VersionMove::Write,
        (None, _) => VersionMove::Refuse {
            reason: "MigrationVersionMissing",
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

/// One migration step for `ms` under `profile`: None when there is nothing to do, else
/// the ManagedSecret with the status now stored (persisted before anything is deleted),
/// and whether it failed (to be retried soon).
pub async fn step(
    ms: &ManagedSecret,
    ctx: &Context,
    profile: &VaultProfile,
) -> Result<Option<(ManagedSecret, bool)>> {
    let Some(from) = profile.spec.migrate_from.as_deref() else {
        return clear(ms, ctx).await;
    };
    if !pending(ms.status.as_ref(), from) {
        return Ok(None);
    }
    // Decide on the stored status: the cache may predate our own last write.
    let mut status = super::managed_secret::stored_status(ms, ctx).await?;
    if !pending(Some(&status), from) {
        return Ok(Some((with_status(ms, status), false)));
    }
    let to = profile.spec.source.as_str();
    let generation = ms.metadata.generation;
    let mut base = ms.clone();
    let failed = match move_versions(ms, ctx, &status, from, to).await {
        Ok((moved, old)) => {
            record_moves(&mut status.versions, &moved, from, to);
            set_condition(
                &mut status.conditions,
                condition(
                    CONDITION,
                    false,
                    "Moving",
                    format!(
                        "{} version(s) written to store {to} and verified by fingerprint; deleting them from store {from}",
                        moved.len()
                    ),
                    generation,
                ),
            );
            // Recorded before anything is deleted: a restart from here on finds every
            // version in the new store.
            super::managed_secret::patch_status(&base, ctx, status.clone()).await?;
            base = with_status(ms, status.clone());
            match old.delete(&ms.store_path()).await {
                Ok(()) => {
                    info!(from, to, versions = moved.len(), "migrated");
                    status.migrated_from = Some(from.to_owned());
                    set_condition(
                        &mut status.conditions,
                        condition(
                            CONDITION,
                            true,
                            "Moved",
                            format!(
                                "{} version(s) moved from store {from} to store {to}, verified by fingerprint",
                                moved.len()
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
                            CONDITION,
                            false,
                            "MigrationDeleteFailed",
                            format!(
                                "every version is in store {to}, but deleting them from store {from} failed: {e}"
                            ),
                            generation,
                        ),
                    );
                    true
                }
            }
        }
        Err(e) => {
            set_condition(
                &mut status.conditions,
                condition(CONDITION, false, e.reason(), e.to_string(), generation),
            );
            true
        }
    };
    super::managed_secret::patch_status(&base, ctx, status.clone()).await?;
    if failed {
        ctx.recheck_stores();
    }
    Ok(Some((with_status(ms, status), failed)))
}

/// Copies and verifies every version at the path into `to`; returns the versions moved
/// (with the new store's version numbers) and the old backend.
async fn move_versions(
    ms: &ManagedSecret,
    ctx: &Context,
    status: &ManagedSecretStatus,
    from: &str,
    to: &str,
) -> Result<(BTreeMap<u64, Option<u64>>, std::sync::Arc<dyn Backend>)> {
    let old = ctx.backend(from).await?;
    let new = ctx.backend(to).await?;
    let path = ms.store_path();
    let fingerprint = |data: &crate::secret_data::SecretData| -> Fingerprint {
        ctx.keys
            .fingerprinter
            .fingerprint(ms.spec.type_.as_str(), data)
    };
    let recorded: BTreeMap<u64, &str> = status
        .versions
        .iter()
        .filter(|r| r.store == from)
        .map(|r| (r.version, r.fingerprint.as_str()))
        .collect();
    let listed = old.list_versions(&path).await?;
    let all: BTreeSet<u64> = listed
        .iter()
        .copied()
        .chain(recorded.keys().copied())
        .collect();
    let mut moved = BTreeMap::new();
    for n in all {
        let in_old = match listed.contains(&n) {
            true => old.read(&path, Some(n)).await?,
            false => None,
        };
        let old_fp = in_old.as_ref().map(|v| fingerprint(&v.data));
        let in_new = new.read(&path, Some(n)).await?;
        let new_fp = in_new.as_ref().map(|v| fingerprint(&v.data));
        match plan_version(
            n,
            from,
            to,
            recorded.get(&n).copied(),
            old_fp.as_ref().map(Fingerprint::as_str),
            new_fp.as_ref().map(Fingerprint::as_str),
        ) {
            VersionMove::AlreadyThere => {
                moved.insert(n, in_new.and_then(|v| v.store_version));
            }
            VersionMove::Refuse { reason, message } => {
                return Err(Error::config(reason, message));
            }
            VersionMove::Write => {
                let (value, fp) = (
                    in_old.expect("Write means the old store holds it"),
                    old_fp.expect("read"),
                );
                let stamp = VersionStamp {
                    version: n,
                    fingerprint: fp.clone(),
                };
                new.write(&path, &stamp, &value.data).await?;
                let back = new.read(&path, Some(n)).await?;
                let verified = back.filter(|v| fingerprint(&v.data) == fp).ok_or_else(|| {
                    Error::config(
                        "MigrationVerifyFailed",
                        format!(
                            "version {n} read back from store {to} does not match its fingerprint"
                        ),
                    )
                })?;
                moved.insert(n, verified.store_version);
            }
        }
    }
    Ok((moved, old))
}

/// Without `migrateFrom`, a leftover marker and condition go.
async fn clear(ms: &ManagedSecret, ctx: &Context) -> Result<Option<(ManagedSecret, bool)>> {
    let Some(status) = ms.status.as_ref() else {
        return Ok(None);
    };
    if status.migrated_from.is_none() && !status.conditions.iter().any(|c| c.type_ == CONDITION) {
        return Ok(None);
    }
    let mut status = super::managed_secret::stored_status(ms, ctx).await?;
    status.migrated_from = None;
    status.conditions.retain(|c| c.type_ != CONDITION);
    super::managed_secret::patch_status(ms, ctx, status.clone()).await?;
    Ok(Some((with_status(ms, status), false)))
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
                reason: "MigrationMismatch",
                ..
            }
        ));
        assert!(matches!(
            plan(Some("x"), Some("x"), Some("y")),
            VersionMove::Refuse {
                reason: "MigrationConflict",
                ..
            }
        ));
        assert!(matches!(
            plan(Some("x"), None, None),
            VersionMove::Refuse {
                reason: "MigrationVersionMissing",
                ..
            }
        ));
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
}
