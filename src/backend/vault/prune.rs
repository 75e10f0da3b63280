//! Retention at a vault path: pruning versions ([`VaultStore::prune_with`]) and, on KV v2,
//! keeping the path's `max_versions` above the KV versions keyhaven still needs there
//! ([`VaultStore::make_room`]), so Vault itself never drops a version keyhaven lists.

use super::{Bookkeeping, KvVersion, VaultStore};
use crate::backend::{BackendError, prune_plan};
use std::collections::BTreeSet;
use vaultrs::api::kv2::requests::SetSecretMetadataRequest;
use vaultrs::client::VaultClient;

/// The KV versions a KV v2 mount keeps per key unless told otherwise (its `max_versions`
/// 0 means 10).
pub(super) const DEFAULT_MAX_VERSIONS: u64 = 10;
/// The least `max_versions` a raise sets.
const MIN_RAISED_MAX_VERSIONS: u64 = 32;

/// The KV v2 versions to destroy when the keyhaven versions `pruned` leave `book`: those
/// holding a pruned version, less any that also holds a kept one (or the current value).
pub(super) fn kv_versions_to_destroy(book: &Bookkeeping, pruned: &[u64]) -> Vec<u64> {
    let kept: BTreeSet<u64> = book
        .versions
        .iter()
        .filter(|(v, _)| !pruned.contains(v))
        .filter_map(|(_, e)| e.store_version)
        .chain(book.current.as_ref().and_then(|c| c.store_version))
        .collect();
    let destroyed: BTreeSet<u64> = pruned
        .iter()
        .filter_map(|v| book.versions.get(v)?.store_version)
        .filter(|sv| !kept.contains(sv))
        .collect();
    destroyed.into_iter().collect()
}

/// The `max_versions` to set at a KV v2 path before `writes` new KV versions go on top of
/// its `latest` one, or `None` when the path keeps enough already: the KV versions keyhaven
/// needs run from the oldest its bookkeeping records to the last one written. A raise sets
/// twice what is needed, at least [`MIN_RAISED_MAX_VERSIONS`], and never less than before.
pub(super) fn raised_max_versions(
    book: &Bookkeeping,
    latest: Option<u64>,
    writes: u64,
) -> Option<u64> {
    let recorded = book.versions.values().filter_map(|e| e.store_version);
    let oldest = recorded.clone().min()?;
    let top = recorded
        .max()
        .into_iter()
        .chain(latest)
        .max()
        .unwrap_or(oldest)
        .saturating_add(writes);
    let needed = top.saturating_sub(oldest).saturating_add(1);
    let keeps = book.max_versions.unwrap_or(DEFAULT_MAX_VERSIONS);
    (needed > keeps).then(|| {
        needed
            .saturating_mul(2)
            .max(MIN_RAISED_MAX_VERSIONS)
            .max(keeps)
    })
}

impl VaultStore {
    /// KV v2: before `writes` KV versions are written at `path` over its `latest` one,
    /// raises the path's `max_versions` when they would push out a KV version `book`
    /// records ([`raised_max_versions`]), and notes the new value in `book` (written after
    /// the value, as every write writes it). One request, only when the history outgrows
    /// what was set; none on KV v1.
    pub(super) async fn make_room(
        &self,
        client: &VaultClient,
        path: &str,
        book: &mut Bookkeeping,
        latest: Option<u64>,
        writes: u64,
    ) -> Result<(), BackendError> {
        if self.kv != KvVersion::V2 {
            return Ok(());
        }
        let Some(max) = raised_max_versions(book, latest, writes) else {
            return Ok(());
        };
        let mut opts = SetSecretMetadataRequest::builder();
        opts.max_versions(max);
        vaultrs::kv2::set_metadata(client, &self.mount, path, Some(&mut opts))
            .await
            .map_err(|e| self.error(path, e))?;
        tracing::debug!(store = %self.name, path, max_versions = max,
            "raised the path's max_versions to keep its history");
        book.max_versions = Some(max);
        Ok(())
    }

    /// Removes `versions` at `path` for good: KV v2 destroys the KV versions holding them
    /// ([`kv_versions_to_destroy`]), KV v1 deletes their history copies; then the
    /// bookkeeping forgets them. Requests: the bookkeeping read, then (when something is
    /// pruned) KV v2 one destroy, KV v1 one delete per version, and the bookkeeping write.
    pub(super) async fn prune_with(
        &self,
        client: &VaultClient,
        path: &str,
        versions: &[u64],
    ) -> Result<Vec<u64>, BackendError> {
        let err = |e| self.error(path, e);
        self.forget(path);
        let Some(mut book) = self.bookkeeping(client, path).await? else {
            return Ok(Vec::new());
        };
        let held: Vec<u64> = book.versions.keys().copied().collect();
        let current = book.current.as_ref().map(|c| c.version);
        let plan = prune_plan(&self.name, path, current, &held, versions)?;
        if plan.is_empty() {
            return Ok(plan);
        }
        match self.kv {
            KvVersion::V2 => {
                let destroyed = kv_versions_to_destroy(&book, &plan);
                if !destroyed.is_empty() {
                    vaultrs::kv2::destroy_versions(client, &self.mount, path, destroyed)
                        .await
                        .map_err(err)?;
                }
            }
            KvVersion::V1 => {
                for v in &plan {
                    self.remove_object(client, &Self::history_path(path, *v))
                        .await
                        .map_err(err)?;
                }
            }
        }
        for v in &plan {
            book.versions.remove(v);
        }
        self.put_object(client, &Self::object_path(path), &book)
            .await
            .map_err(err)?;
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::super::VersionEntry;
    use super::*;

    /// A bookkeeping whose entries are (keyhaven version, KV version); the last is current.
    fn book(entries: &[(u64, Option<u64>)], max_versions: Option<u64>) -> Bookkeeping {
        let entry = |&(version, store_version): &(u64, Option<u64>)| VersionEntry {
            version,
            fingerprint: "hmac-sha256:00".into(),
            store_version,
            ..Default::default()
        };
        Bookkeeping {
            path: "a/b".into(),
            current: entries.last().map(entry),
            versions: entries.iter().map(|e| (e.0, entry(e))).collect(),
            max_versions,
        }
    }

    #[test]
    fn pruning_destroys_the_kv_versions_of_the_pruned_versions_only() {
        let b = book(
            &[(1, Some(1)), (2, Some(2)), (3, Some(4)), (4, Some(5))],
            None,
        );
        assert_eq!(kv_versions_to_destroy(&b, &[1, 3]), vec![1, 4]);
        assert_eq!(kv_versions_to_destroy(&b, &[]), Vec::<u64>::new());
        // Not in the bookkeeping: nothing to destroy.
        assert_eq!(kv_versions_to_destroy(&b, &[9]), Vec::<u64>::new());
    }

    #[test]
    fn a_kv_version_that_also_holds_a_kept_version_is_not_destroyed() {
        // Versions 2 and 3 were adopted from the same value: one KV version holds both.
        let b = book(
            &[(1, Some(1)), (2, Some(2)), (3, Some(2)), (4, Some(3))],
            None,
        );
        assert_eq!(kv_versions_to_destroy(&b, &[1, 2]), vec![1]);
        assert_eq!(kv_versions_to_destroy(&b, &[1, 2, 3]), vec![1, 2]);
        // Nor the current value's, even if an old entry records it too.
        let b = book(&[(1, Some(7)), (2, Some(7))], None);
        assert_eq!(kv_versions_to_destroy(&b, &[1]), Vec::<u64>::new());
        // An entry without a KV version has nothing to destroy.
        let b = book(&[(1, None), (2, Some(2))], None);
        assert_eq!(kv_versions_to_destroy(&b, &[1]), Vec::<u64>::new());
    }

    #[test]
    fn max_versions_is_raised_only_when_the_history_outgrows_it() {
        // A new path, and a short history: nothing to do.
        assert_eq!(raised_max_versions(&book(&[], None), None, 1), None);
        assert_eq!(raised_max_versions(&book(&[], None), Some(40), 1), None);
        let nine: Vec<(u64, Option<u64>)> = (1..=9).map(|v| (v, Some(v))).collect();
        assert_eq!(raised_max_versions(&book(&nine, None), Some(9), 1), None);
        // The 11th KV version would push out the 1st: raised to at least 32.
        let ten: Vec<(u64, Option<u64>)> = (1..=10).map(|v| (v, Some(v))).collect();
        assert_eq!(
            raised_max_versions(&book(&ten, None), Some(10), 1),
            Some(32)
        );
        // What was set is what the path keeps.
        assert_eq!(
            raised_max_versions(&book(&ten, Some(32)), Some(10), 1),
            None
        );
        // A latest KV version beyond the bookkeeping's (written by hand) counts too.
        let two = book(&[(1, Some(1)), (2, Some(2))], None);
        assert_eq!(raised_max_versions(&two, Some(10), 1), Some(32));
        assert_eq!(raised_max_versions(&two, Some(9), 2), Some(32));
        assert_eq!(raised_max_versions(&two, Some(8), 2), None);
        assert_eq!(raised_max_versions(&two, Some(8), 1), None);
        // Twice what is needed, and never lower than before.
        let long: Vec<(u64, Option<u64>)> = (1..=40).map(|v| (v, Some(v))).collect();
        assert_eq!(
            raised_max_versions(&book(&long, Some(32)), None, 1),
            Some(82)
        );
        let pruned: Vec<(u64, Option<u64>)> = (30..=40).map(|v| (v, Some(v))).collect();
        assert_eq!(
            raised_max_versions(&book(&pruned, Some(100)), None, 1),
            None
        );
        assert_eq!(
            raised_max_versions(&book(&long, Some(40)), None, 1),
            Some(82)
        );
    }

    #[test]
    fn max_versions_set_is_kept_in_the_bookkeeping_and_absent_until_set() {
        let json = serde_json::to_value(book(&[(1, Some(1))], None)).unwrap();
        assert!(json.get("maxVersions").is_none(), "{json}");
        let set = book(&[(1, Some(1))], Some(32));
        let json = serde_json::to_value(&set).unwrap();
        assert_eq!(json["maxVersions"], 32);
        assert_eq!(serde_json::from_value::<Bookkeeping>(json).unwrap(), set);
    }
}
