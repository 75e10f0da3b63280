//! The soak (issue 20): `make soak` (ignored by `cargo test`; not part of CI). N pushed
//! ManagedSecrets at a short refresh, a writer changing them, for a given duration, with
//! faults drawn at random from the fault suite's list (tests/e2e_faults.rs), bounded in
//! count and length, each followed by the suite's end check. Prints syncs, errors, lost
//! (must be 0), the operator's RSS at the start and the end, and change latencies.
//!
//! Settings (environment): `SOAK_N` (1000), `SOAK_MINUTES` (30), `SOAK_REFRESH` ("10s"),
//! `SOAK_WRITE_MS` (100: one change every 100 ms), `SOAK_FAULTS` (at most 8 faults),
//! `SOAK_SEED` (replays a run's draws), `SOAK_FAULT_KINDS` (comma-separated names from
//! [`FAULTS`] to draw from, default all: `softhsm token gone,openbao restarted`).
//!
//! One operator process lives through the whole run, so that its RSS drift means something:
//! the faults are the servers' (OpenBao hung and restarted, kube-apiserver hung and
//! restarted, etcd restarted, the HSM token gone) and a store switch. The operator's own
//! SIGKILLs and leader failovers are the CI suite's tests.

mod e2e;

use e2e::faults::{self, Load, Paused, Stores, converge, percentile, testbed};
use e2e::fixture::Fixture;
use e2e::hsm::{TokenKeys, hsm_setup, hsm_store};
use keyhaven::api::VaultProfile;
use kube::Api;
use kube::api::{Patch, PatchParams};
use rand::{RngExt as _, SeedableRng as _};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The operator's resident set, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Versions each secret keeps (the profile's retention).
const KEPT: u32 = 3;

const FAULTS: [&str; 7] = [
    "openbao hung",
    "openbao restarted",
    "kube-apiserver hung",
    "kube-apiserver restarted",
    "etcd restarted",
    "softhsm token gone",
    "source switched",
];

#[tokio::test]
#[ignore = "the soak runs for minutes: make soak"]
async fn soak() {
    let n: usize = setting("SOAK_N", 1000);
    let minutes: f64 = setting("SOAK_MINUTES", 30.0);
    let refresh: String = setting("SOAK_REFRESH", "10s".to_owned());
    let write_ms: u64 = setting("SOAK_WRITE_MS", 100);
    let max_faults: usize = setting("SOAK_FAULTS", 8);
    let seed: u64 = setting("SOAK_SEED", rand::random());
    let kinds: Vec<&str> = match std::env::var("SOAK_FAULT_KINDS") {
        Ok(list) => FAULTS
            .into_iter()
            .filter(|f| list.split(',').any(|k| k.trim() == *f))
            .collect(),
        Err(_) => FAULTS.to_vec(),
    };
    assert!(
        !kinds.is_empty(),
        "SOAK_FAULT_KINDS names none of {FAULTS:?}"
    );
    println!(
        "soak: {n} secrets, {minutes} min, refresh {refresh}, a change every {write_ms} ms, at most {max_faults} faults, SOAK_SEED={seed}"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut keys = TokenKeys(vec![]);
    let fx = Fixture::new("soak").await;
    let (hsm, kek) = hsm_setup(&fx, &mut keys).await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    faults::operator_namespace(&fx).await;
    let bao = fx.bao_store("bao", "secret", "v2").await;
    // Three versions kept: the histories reach their bound in the warm-up below, so that
    // the RSS drift measures the operator, not histories growing to the default 20.
    let profile = fx
        .profile_spec(
            "p",
            json!({"source": bao, "syncTargets": [internal, hsm], "retention": {"versions": KEPT}}),
        )
        .await;
    let mut stores = Stores::new();
    stores.insert(bao.clone(), faults::bao_backend(&fx, &bao));
    stores.insert(
        internal.clone(),
        Arc::new(fx.internal_store(&internal).await),
    );
    stores.insert(hsm.clone(), Arc::new(hsm_store(&fx, &hsm, &kek)));
    let t0 = Instant::now();
    let mut load = Load::start(&fx, &profile, n, &refresh).await;
    println!("converged {n} in {:.0} s", t0.elapsed().as_secs_f64());
    for round in 1..=KEPT as u64 {
        load.write_all(fx.client.clone(), round).await;
        let (took, _) = converge(&fx, &load.names, &stores, Duration::from_secs(600)).await;
        println!("warm-up round {round}: every secret changed, converged {took:.0?} after");
    }
    let pid = fx.op.pid().expect("the operator runs");
    load.start_writes(fx.client.clone(), Duration::from_millis(write_ms));
    // A minute of load before the first RSS sample: caches and pools filled.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let rss_start = rss_mib(pid);
    let before = fx.op.metrics().await;
    let began = Instant::now();
    let length = Duration::from_secs_f64(minutes * 60.0);
    let profiles: Api<VaultProfile> = fx.cluster_api();
    let mut on_bao = true;
    let mut faults_done = vec![];
    let mut lost = 0usize;
    // Faults at random times, at most one a minute apart, never in the last 3 minutes.
    while began.elapsed() + Duration::from_secs(180) < length && faults_done.len() < max_faults {
        tokio::time::sleep(Duration::from_secs(rng.random_range(60..180))).await;
        if began.elapsed() + Duration::from_secs(180) >= length {
            break;
        }
        let fault = kinds[rng.random_range(0..kinds.len())];
        let start = Instant::now();
        match fault {
            "openbao hung" => {
                let _p = Paused::start("openbao");
                tokio::time::sleep(Duration::from_secs(rng.random_range(10..60))).await;
            }
            "kube-apiserver hung" => {
                let _p = Paused::start("kube-apiserver");
                tokio::time::sleep(Duration::from_secs(rng.random_range(5..20))).await;
            }
            "softhsm token gone" => {
                let _p = Paused::start("softhsm");
                tokio::time::sleep(Duration::from_secs(rng.random_range(5..20))).await;
            }
            "openbao restarted" => testbed("restart", "openbao"),
            "kube-apiserver restarted" => testbed("restart", "kube-apiserver"),
            "etcd restarted" => testbed("restart", "etcd"),
            _ => {
                // Back and forth between OpenBao and the internal store.
                let (source, targets) = match on_bao {
                    true => (&internal, vec![&bao, &hsm]),
                    false => (&bao, vec![&internal, &hsm]),
                };
                on_bao = !on_bao;
                let patch = json!({"spec": {"source": source, "syncTargets": targets}});
                profiles
                    .patch(&profile, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
            }
        }
        let lasted = start.elapsed();
        // The end check, while the writer goes on: a pass over every secret that finds a
        // native Secret wrong, deleted or behind is retried until writes pause.
        load.stop_writes();
        let (recovery, _) = converge(&fx, &load.names, &stores, Duration::from_secs(300)).await;
        load.start_writes(fx.client.clone(), Duration::from_millis(write_ms));
        lost += load.violations().len();
        println!(
            "[{:5.0} s] {fault}: lasted {:.0} s, recovered {:.1} s after; RSS {:.1} MiB",
            began.elapsed().as_secs_f64(),
            lasted.as_secs_f64(),
            recovery.as_secs_f64(),
            rss_mib(pid)
        );
        faults_done.push(fault);
    }
    let rest = length.saturating_sub(began.elapsed());
    tokio::time::sleep(rest).await;
    load.stop_writes();
    let (recovery, checked) = converge(&fx, &load.names, &stores, Duration::from_secs(300)).await;
    let after = fx.op.metrics().await;
    assert_eq!(
        after.pid,
        Some(pid),
        "the operator restarted during the soak"
    );
    let rss_end = rss_mib(pid);
    let count = |m: &e2e::operator::Metrics, name: &str| -> f64 {
        m.text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let syncs = count(&after, "keyhaven_reconciles_total{kind=\"ManagedSecret\"")
        - count(&before, "keyhaven_reconciles_total{kind=\"ManagedSecret\"");
    let errors = count(&after, "keyhaven_reconcile_errors_total")
        - count(&before, "keyhaven_reconcile_errors_total");
    let versions = count(&after, "keyhaven_versions_written_total")
        - count(&before, "keyhaven_versions_written_total");
    let (writes, write_errors) = load.writes();
    let mut all = load.latencies_since(began);
    lost += load.violations().len();
    let drift = (rss_end - rss_start) / rss_start * 100.0;
    println!(
        "soak done after {:.1} min (seed {seed}):",
        began.elapsed().as_secs_f64() / 60.0
    );
    println!(
        "  faults: {} ({})",
        faults_done.len(),
        faults_done.join(", ")
    );
    println!(
        "  reconciles {syncs:.0}, versions written {versions:.0}, reconcile errors {errors:.0}"
    );
    println!(
        "  changes written {writes} ({write_errors} failed or timed out), arrived {}",
        all.len()
    );
    println!(
        "  change latency p50 {:.2} s, p99 {:.2} s, max {:.1} s",
        percentile(&mut all, 50.0).as_secs_f64(),
        percentile(&mut all, 99.0).as_secs_f64(),
        percentile(&mut all, 100.0).as_secs_f64()
    );
    println!(
        "  lost {lost} (end check of {} secrets: {} versions, {} store reads; converged {:.1} s after the last write)",
        checked.secrets,
        checked.versions,
        checked.store_reads,
        recovery.as_secs_f64()
    );
    println!("  RSS start {rss_start:.1} MiB, end {rss_end:.1} MiB, drift {drift:+.1} %");
    assert_eq!(lost, 0, "lost values: {:?}", load.violations());
}
