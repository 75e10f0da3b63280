//! CPU-heavy work — generating keys and certificates, parsing uploaded keys, certificates
//! and keystores, running their KDFs — on tokio's blocking threads, at most one per CPU at
//! a time (a process-wide semaphore), so that the async workers keep serving `/healthz`,
//! the Lease renewal and the other reconciles while an RSA key is made or a PBKDF2 runs.
//!
//! CPUs bound the threads, not the memory: a KDF running on one of them also takes its
//! memory out of the process-wide KDF budget (`kdf::reserve`, 64 MiB in all), inside the
//! blocking work, right before it derives. A thread holding a CPU permit may wait there for
//! memory; nothing holding memory waits for a CPU, so the two never deadlock.

use super::ContentError;
use crate::api::{Generate, SecretType};
use crate::secret_data::SecretData;
use std::sync::{Arc, LazyLock};
use tokio::sync::Semaphore;

/// One permit per CPU (at least one).
static PERMITS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(permits())));

/// How many CPU-heavy tasks run at once: the CPUs this process may use, at least 1.
pub fn permits() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().max(1))
}

/// Runs `work` on a blocking thread once a permit is free. The permit goes with the work:
/// a reconcile dropped while it runs does not free a CPU that is still busy. A panic in
/// `work` goes on unwinding in the caller (where the reconcile's guard catches it).
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let permit = PERMITS
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    });
    match task.await {
        Ok(out) => out,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => panic!("a blocking task was cancelled"),
        },
    }
}

/// Whether validating or rendering a value of `secret_type` parses keys or certificates
/// (and may run a KDF): such work goes to [`blocking`].
pub fn is_heavy(secret_type: SecretType) -> bool {
    matches!(
        secret_type,
        SecretType::PrivateKey
            | SecretType::Certificate
            | SecretType::SshKey
            | SecretType::Keystore
    )
}

/// [`super::generate_with`], on a blocking thread for the types that make keys.
pub async fn generate(
    secret_type: SecretType,
    spec: &Generate,
    name: &str,
    issuer: Option<SecretData>,
) -> Result<SecretData, ContentError> {
    let makes_keys = matches!(
        secret_type,
        SecretType::PrivateKey | SecretType::Certificate | SecretType::SshKey
    );
    if !makes_keys {
        return super::generate_with(secret_type, spec, name, issuer.as_ref());
    }
    let (spec, name) = (spec.clone(), name.to_owned());
    blocking(move || super::generate_with(secret_type, &spec, &name, issuer.as_ref())).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heavy_work_runs_at_most_one_per_cpu() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        let tasks: Vec<_> = (0..permits() * 3)
            .map(|_| {
                tokio::spawn(blocking(|| {
                    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
                    MOST.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    RUNNING.fetch_sub(1, Ordering::SeqCst);
                }))
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let most = MOST.load(Ordering::SeqCst);
        assert!(most >= 1 && most <= permits(), "{most} at once");
    }

    #[tokio::test]
    async fn a_panic_on_a_blocking_thread_reaches_the_reconcile_guard() {
        let m = crate::metrics::Metrics::new();
        let e = m
            .reconcile::<()>("ManagedSecret", "a/b".into(), async {
                blocking(|| panic!("boom")).await;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(e, crate::error::Error::Panicked { .. }));
    }

    #[tokio::test]
    async fn keys_are_generated_off_the_async_workers() {
        let spec = Generate::default();
        let cert = generate(SecretType::Certificate, &spec, "n", None)
            .await
            .unwrap();
        super::super::validate(SecretType::Certificate, &cert).unwrap();
        let pw = generate(SecretType::Password, &spec, "n", None)
            .await
            .unwrap();
        assert!(pw.get("password").is_some());
    }
}
