//! The backlog: ManagedSecrets not synced at their current generation yet (new, or their
//! spec changed). Periodic refreshes yield to them, so that thousands of refreshes falling
//! due at once never starve a new secret.

use crate::api::ManagedSecret;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a new or changed ManagedSecret counts as waiting for its first sync. The window
/// bounds the deferral: one that never manages to record a status (a bug, an API server
/// refusing it) stops holding refreshes back after it.
const WINDOW: Duration = Duration::from_secs(600);

/// How often the backlog is counted again (a count walks the whole cache).
const RECOUNT: Duration = Duration::from_secs(1);

/// Whether `ms` has not been synced at its current generation yet, and was created or
/// changed within [`WINDOW`] of `now`.
pub fn awaits_sync(ms: &ManagedSecret, now: jiff::Timestamp) -> bool {
    let changed = ms
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.is_none())
        .filter_map(|f| f.time.as_ref().map(|t| t.0))
        .chain(ms.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .max();
    ms.metadata.deletion_timestamp.is_none()
        && ms.status.as_ref().and_then(|s| s.observed_generation) != ms.metadata.generation
        && changed.is_some_and(|t| now.duration_since(t).unsigned_abs() < WINDOW)
}

/// The backlog's size, counted at most once a [`RECOUNT`].
#[derive(Default)]
pub struct Backlog {
    counted: Mutex<Option<(Instant, usize)>>,
}

impl Backlog {
    /// How many of `all` await their sync; `all` is walked only when the last count is
    /// older than [`RECOUNT`].
    pub fn size<I>(&self, all: impl FnOnce() -> I) -> usize
    where
        I: IntoIterator,
        I::Item: AsRef<ManagedSecret>,
    {
        let mut counted = self.counted.lock().expect("backlog lock");
        match *counted {
            Some((at, n)) if at.elapsed() < RECOUNT => n,
            _ => {
                let now = jiff::Timestamp::now();
                let n = all()
                    .into_iter()
                    .filter(|m| awaits_sync(m.as_ref(), now))
                    .count();
                *counted = Some((Instant::now(), n));
                n
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ManagedSecretStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ms(generation: i64, observed: Option<i64>, deleting: bool) -> ManagedSecret {
        let mut ms: ManagedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": "a", "namespace": "n", "generation": generation,
                         "creationTimestamp": "2026-11-25T10:00:00Z"},
            "spec": {"type": "generic", "content": {"fromStore": {}}},
        }))
        .unwrap();
        if deleting {
            ms.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        }
        ms.status = observed.map(|g| ManagedSecretStatus {
            observed_generation: Some(g),
            ..Default::default()
        });
        ms
    }

    #[test]
    fn new_and_changed_objects_await_their_sync() {
        let soon: jiff::Timestamp = "2026-11-25T10:01:00Z".parse().unwrap();
        let later: jiff::Timestamp = "2026-11-25T11:00:00Z".parse().unwrap();
        assert!(awaits_sync(&ms(1, None, false), soon), "never synced");
        assert!(awaits_sync(&ms(2, Some(1), false), soon), "spec changed");
        assert!(
            !awaits_sync(&ms(2, Some(2), false), soon),
            "synced: a refresh"
        );
        assert!(!awaits_sync(&ms(1, None, true), soon), "being deleted");
        assert!(
            !awaits_sync(&ms(1, None, false), later),
            "never synced for an hour: it no longer holds refreshes back"
        );
    }

    #[test]
    fn the_count_is_reused_within_a_second() {
        let fresh = || {
            let mut m = ms(1, None, false);
            m.metadata.creation_timestamp = Some(Time(jiff::Timestamp::now()));
            std::sync::Arc::new(m)
        };
        let backlog = Backlog::default();
        assert_eq!(backlog.size(|| vec![fresh(), fresh()]), 2);
        let mut walked = false;
        let n = backlog.size(|| {
            walked = true;
            Vec::<std::sync::Arc<ManagedSecret>>::new()
        });
        assert_eq!((n, walked), (2, false), "counted again too soon");
    }
}
