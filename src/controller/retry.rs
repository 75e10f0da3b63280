//! How soon a failed reconcile runs again. A transient failure (a store or the API server
//! briefly away, a conflict) is retried soon, a spec the operator cannot use at the
//! controller's usual pace; a failure the API server will repeat as long as nothing
//! changes (4xx: too large, invalid, forbidden, bad request) and a panic back off
//! exponentially per object, [`FIRST`] doubling to [`CAP`], until the object reconciles
//! again. A change to the object reconciles it at once whatever the backoff.

use crate::error::Error;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The first retry after a repeated failure.
pub const FIRST: Duration = Duration::from_secs(5);
/// The longest wait between retries of a repeated failure.
pub const CAP: Duration = Duration::from_secs(300);
/// Objects tracked at most; past that the backoff of every object starts again (from
/// [`FIRST`]): bounded memory, whatever fails.
const MAX_TRACKED: usize = 100_000;

/// The repeated failures of each object, by `Kind namespace/name`; an object that
/// reconciles is forgotten.
#[derive(Debug, Default)]
pub struct Retries {
    failures: Mutex<HashMap<String, u32>>,
}

impl Retries {
    /// How long to wait before reconciling `object` again after `error`; `otherwise` for a
    /// failure that is not repeated (which restarts the backoff).
    pub fn after(&self, object: &str, error: &Error, otherwise: Duration) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !error.is_repeated() {
            failures.remove(object);
            return otherwise;
        }
        if failures.len() >= MAX_TRACKED && !failures.contains_key(object) {
            failures.clear();
        }
        let n = failures.entry(object.to_owned()).or_default();
        let delay = FIRST
            .checked_mul(1u32.checked_shl(*n).unwrap_or(u32::MAX))
            .unwrap_or(CAP)
            .min(CAP);
        *n = n.saturating_add(1);
        delay
    }

    /// `object` reconciled: its next failure starts the backoff again.
    pub fn succeeded(&self, object: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !failures.is_empty() {
            failures.remove(object);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Reason;
    use crate::error::Verb;

    fn api(code: u16) -> Error {
        let status = kube::core::Status::failure("refused", "Refused").with_code(code);
        Error::kube(Verb::ApplyStatus, "ManagedSecret a/b")(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn errors_the_api_server_repeats_back_off_to_a_cap() {
        let r = Retries::default();
        let soon = Duration::from_secs(5);
        let waits: Vec<u64> = (0..9)
            .map(|_| r.after("ManagedSecret a/b", &api(413), soon).as_secs())
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        // Another object has its own backoff.
        assert_eq!(r.after("ManagedSecret a/c", &api(422), soon), FIRST);
        // A success forgets it.
        r.succeeded("ManagedSecret a/b");
        assert_eq!(r.after("ManagedSecret a/b", &api(403), soon), FIRST);
        let waits: Vec<Duration> = (0..100)
            .map(|_| r.after("ManagedSecret a/b", &api(400), soon))
            .collect();
        assert!(
            waits[7..].iter().all(|w| *w == CAP),
            "no overflow: {waits:?}"
        );
    }

    #[test]
    fn transient_and_spec_failures_keep_their_pace_and_reset_the_backoff() {
        let r = Retries::default();
        let soon = Duration::from_secs(5);
        for code in [500, 503, 504, 409, 429, 404] {
            assert_eq!(r.after("o", &api(code), soon), soon, "{code}");
        }
        r.after("o", &api(413), soon);
        r.after("o", &api(413), soon);
        let spec = Error::config(Reason::StoreNotFound, "no such store");
        assert_eq!(r.after("o", &spec, Duration::from_secs(30)).as_secs(), 30);
        assert_eq!(r.tracked(), 0);
        assert_eq!(r.after("o", &api(413), soon), FIRST);
    }

    #[test]
    fn a_panic_backs_off() {
        let r = Retries::default();
        let panicked = Error::Panicked {
            kind: "ManagedSecret",
            object: "a/b".into(),
        };
        assert_eq!(r.after("o", &panicked, Duration::from_secs(30)), FIRST);
        assert_eq!(r.after("o", &panicked, Duration::from_secs(30)), FIRST * 2);
    }
}
