//! The plan and the report, tested the way linkerd2's policy index is: objects are built by
//! hand, observed as the observe stage would have seen them, and what the plan decides and
//! the status it leaves are checked. No API server, no store.

use super::decide::{RestartDecision, StoreAction, VersionDecision};
use super::native::desired_secret;
use super::observe::{Content, Gathered, Observation, Read};
use super::plan::{Plan, SyncPlan, TargetStep, defers, plan, reads_carried};
use super::report::{Outcome, expiring_condition, report};
use crate::api::{
    ConditionType, ManagedSecret, ManagedSecretPhase, ManagedSecretStatus, Reason, TargetState,
    VaultProfile, VersionRecord, find_condition,
};
use crate::backend::VersionStamp;
use crate::controller::migration;
use crate::crypto::{ContentFingerprint, Fingerprint, Fingerprinter};
use crate::error::Error;
use crate::profiles::Via;
use crate::secret_data::SecretData;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn now() -> jiff::Timestamp {
    "2026-12-01T12:00:00Z".parse().unwrap()
}

pub(super) fn ms(spec: serde_json::Value) -> ManagedSecret {
    let mut full = serde_json::json!({"type": "password", "content": {"fromStore": {}}});
    full.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    serde_json::from_value(serde_json::json!({
        "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
        "metadata": {"name": "db", "namespace": "team-a", "uid": "u-1", "generation": 2},
        "spec": full,
    }))
    .unwrap()
}

pub(super) fn profile(spec: serde_json::Value) -> Arc<VaultProfile> {
    let mut full = serde_json::json!({"source": "src"});
    full.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
            "metadata": {"name": "p"}, "spec": full,
        }))
        .unwrap(),
    )
}

pub(super) fn content(data: &SecretData) -> ContentFingerprint {
    Fingerprinter::new(zeroize::Zeroizing::new([3; 32])).content("ns", "password", data)
}

pub(super) fn fp(data: &SecretData) -> Fingerprint {
    content(data).current().clone()
}

pub(super) fn password(p: &str) -> SecretData {
    let mut d = SecretData::new();
    d.insert("password", p.as_bytes());
    d
}

/// A value as a store holds it, stamped with `version` when keyhaven wrote it.
pub(super) fn held(p: &str, version: Option<u64>) -> Read {
    let data = password(p);
    let fingerprint = content(&data);
    Read {
        stamp: version.map(|v| VersionStamp {
            version: v,
            fingerprint: fingerprint.current().clone(),
            owner: None,
        }),
        store_version: version,
        fingerprint,
        data,
    }
}

pub(super) fn record(version: u64, p: &str, store: &str) -> VersionRecord {
    VersionRecord {
        version,
        fingerprint: fp(&password(p)).to_string(),
        store: store.into(),
        created_at: Time("2026-11-01T00:00:00Z".parse().unwrap()),
        created_by: "alice".into(),
        reason: None,
        store_version: Some(version),
        moved_from: None,
    }
}

pub(super) fn gathered(profile: Arc<VaultProfile>, source: Option<Read>) -> Gathered {
    Gathered {
        profile,
        via: Via::Spec,
        approvals: Default::default(),
        writes: true,
        owner: None,
        identity_verified: true,
        migration: None,
        source,
        held: vec![],
        carried: None,
        content: Content::FromStore,
        targets: vec![],
        native: None,
    }
}

pub(super) fn observe(status: ManagedSecretStatus, g: Gathered) -> Observation {
    Observation {
        now: now(),
        jitter: 1.0,
        status,
        stale: false,
        gathered: Ok(g),
    }
}

pub(super) fn sync_plan(ms: &ManagedSecret, obs: Observation) -> Box<SyncPlan> {
    match plan(ms, obs) {
        Plan::Sync(p) => p,
        other => panic!("expected a sync, got {other:?}"),
    }
}

pub(super) fn failure(ms: &ManagedSecret, obs: Observation) -> (ManagedSecretStatus, Error) {
    match plan(ms, obs) {
        Plan::Fail(f) => (f.status, f.error),
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// The native Secret as keyhaven wrote it for `version` of `p`.
pub(super) fn native(ms: &ManagedSecret, p: &str, version: u64) -> Secret {
    desired_secret(ms, "db", "Opaque", &password(p), version, &fp(&password(p)))
}

pub(super) fn done(plan: &SyncPlan) -> Outcome {
    Outcome {
        source_version: plan.source.store_version.or(Some(plan.stamp.version)),
        targets: plan.targets.iter().map(|_| Ok(())).collect(),
        native_written: plan.native.apply.is_some(),
        ..Default::default()
    }
}

/// The first sync of `ms`: the source holds an unstamped "pw".
pub(super) fn first_sync(ms: &ManagedSecret) -> Box<SyncPlan> {
    let g = gathered(profile(serde_json::json!({})), Some(held("pw", None)));
    sync_plan(ms, observe(Default::default(), g))
}

#[test]
fn a_first_value_is_version_one_written_everywhere() {
    let ms = ms(serde_json::json!({}));
    let p = first_sync(&ms);
    assert_eq!(p.decision, VersionDecision::New(1));
    assert!(p.source.write, "an unstamped value gets its stamp");
    assert!(p.native.apply.is_some());
    let record = p.record.as_ref().unwrap();
    assert_eq!(record.reason.as_deref(), Some("read from store src"));
    assert_eq!(
        record.created_by, "system:keyhaven",
        "no requester recorded"
    );
    let r = report(&ms, &p, &done(&p));
    assert_eq!(r.status.phase, Some(ManagedSecretPhase::Synced));
    assert_eq!(r.status.current_version, Some(1));
    assert_eq!(r.status.versions.len(), 1);
    assert_eq!(r.status.observed_generation, Some(2));
    assert_eq!(r.notes[0].reason, Reason::VersionCreated);
    assert!(r.notes[0].text.contains("Secret db holds it"));
    assert!(
        !r.notes.iter().any(|n| n.text.contains("pw")),
        "no value in an Event"
    );
}

#[test]
fn an_idle_resync_writes_nothing_and_changes_no_status() {
    let ms = ms(serde_json::json!({}));
    let first = first_sync(&ms);
    let status = report(&ms, &first, &done(&first)).status;
    let mut g = gathered(profile(serde_json::json!({})), Some(held("pw", Some(1))));
    g.native = Some(native(&ms, "pw", 1));
    let again = sync_plan(&ms, observe(status.clone(), g));
    assert_eq!(again.decision, VersionDecision::Unchanged(1));
    assert!(!again.source.write && again.native.apply.is_none() && again.record.is_none());
    let r = report(&ms, &again, &done(&again));
    assert_eq!(r.status, status, "the same status: nothing to write");
    assert!(r.notes.is_empty());
    assert_eq!(
        r.requeue,
        Duration::from_secs(3600),
        "the default refresh, unjittered"
    );
}

#[test]
fn a_missing_value_fails_with_its_reason_and_keeps_the_history() {
    let ms = ms(serde_json::json!({}));
    let status = ManagedSecretStatus {
        versions: vec![record(1, "pw", "src")],
        current_version: Some(1),
        ..Default::default()
    };
    let (status, e) = failure(
        &ms,
        observe(status, gathered(profile(serde_json::json!({})), None)),
    );
    assert_eq!(e.reason(), Reason::NotFoundInStore);
    assert_eq!(status.phase, Some(ManagedSecretPhase::Error));
    assert_eq!(status.versions.len(), 1, "nothing recorded is lost");
    let ready = find_condition(&status.conditions, ConditionType::Ready).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NotFoundInStore")
    );
}

#[test]
fn a_profile_that_cannot_be_resolved_is_forgotten_in_status() {
    let ms = ms(serde_json::json!({}));
    let status = ManagedSecretStatus {
        profile: Some("p".into()),
        ..Default::default()
    };
    let failed = |reason| Observation {
        now: now(),
        jitter: 1.0,
        status: status.clone(),
        stale: false,
        gathered: Err(Error::config(reason, "cannot")),
    };
    assert_eq!(
        failure(&ms, failed(Reason::ProfileNotAllowed)).0.profile,
        None
    );
    assert_eq!(
        failure(&ms, failed(Reason::StoreNotFound))
            .0
            .profile
            .as_deref(),
        Some("p"),
        "a store failure keeps it"
    );
}

#[test]
fn a_rollback_makes_a_new_version_with_the_old_content() {
    let ms = ms(serde_json::json!({"rollbackTo": 1}));
    let status = ManagedSecretStatus {
        versions: vec![record(1, "one", "old"), record(2, "two", "src")],
        ..Default::default()
    };
    let mut g = gathered(profile(serde_json::json!({})), Some(held("two", Some(2))));
    g.content = Content::Rollback {
        version: 1,
        store: "old".into(),
        found: Some(held("one", Some(1))),
    };
    let p = sync_plan(&ms, observe(status.clone(), g));
    assert_eq!(p.decision, VersionDecision::New(3));
    assert_eq!(p.stamp.fingerprint, fp(&password("one")));
    assert_eq!(
        p.record.as_ref().unwrap().reason.as_deref(),
        Some("rollback to version 1")
    );
    // The store holds something else as version 1: refused, nothing written.
    let mut g = gathered(profile(serde_json::json!({})), Some(held("two", Some(2))));
    g.content = Content::Rollback {
        version: 1,
        store: "old".into(),
        found: Some(held("tampered", Some(1))),
    };
    let (_, e) = failure(&ms, observe(status.clone(), g));
    assert_eq!(e.reason(), Reason::RollbackVersionMismatch);
    let mut g = gathered(profile(serde_json::json!({})), Some(held("two", Some(2))));
    g.content = Content::Rollback {
        version: 1,
        store: "old".into(),
        found: None,
    };
    assert_eq!(
        failure(&ms, observe(status, g)).1.reason(),
        Reason::RollbackVersionNotFound
    );
}

#[test]
fn after_a_switch_the_version_stays_where_it_was_written() {
    let ms = ms(serde_json::json!({}));
    let last = record(1, "pw", "old");
    assert!(reads_carried("src", None, &last));
    assert!(
        reads_carried("src", Some(&held("x", Some(0))), &last),
        "an older version"
    );
    assert!(
        !reads_carried("src", Some(&held("x", None)), &last),
        "written by hand: new"
    );
    assert!(!reads_carried("old", None, &last), "no switch");
    let status = ManagedSecretStatus {
        versions: vec![last],
        ..Default::default()
    };
    let mut g = gathered(profile(serde_json::json!({})), None);
    g.carried = Some(Some(held("pw", Some(1))));
    g.native = Some(native(&ms, "pw", 1));
    let p = sync_plan(&ms, observe(status.clone(), g));
    assert_eq!(p.decision, VersionDecision::Unchanged(1));
    assert_eq!(p.source.kept_in.as_deref(), Some("old"));
    assert!(!p.source.write, "the new source waits for the next version");
    let r = report(&ms, &p, &done(&p));
    assert_eq!(r.status.targets[0].state, TargetState::Pending);
    assert_eq!(r.status.phase, Some(ManagedSecretPhase::Synced));
    let mut g = gathered(profile(serde_json::json!({})), None);
    g.carried = Some(Some(held("changed", Some(1))));
    assert_eq!(
        failure(&ms, observe(status, g)).1.reason(),
        Reason::VersionMismatch
    );
}

#[test]
fn a_generated_secret_rotates_on_request_once() {
    // A request too long for status.rotateRequest (recorded by its digest) is handled once too.
    for request in ["now".to_owned(), "x".repeat(1000)] {
        let recorded = crate::api::rotate_request_record(&request);
        let mut ms_rotating = ms(serde_json::json!({"content": {"generate": {"length": 24}}}));
        ms_rotating.metadata.annotations =
            Some([("keyhaven.io/rotate".to_owned(), request.clone())].into());
        let status = ManagedSecretStatus {
            versions: vec![record(1, "aaaaaaaaaaaaaaaaaaaaaaaa", "src")],
            ..Default::default()
        };
        let mut g = gathered(
            profile(serde_json::json!({})),
            Some(held("aaaaaaaaaaaaaaaaaaaaaaaa", Some(1))),
        );
        g.content = Content::Generate {
            fresh: Some(held("bbbbbbbbbbbbbbbbbbbbbbbb", None)),
        };
        let p = sync_plan(&ms_rotating, observe(status.clone(), g));
        assert_eq!(p.decision, VersionDecision::New(2));
        assert_eq!(p.rotate_request.as_ref(), Some(&recorded));
        let reason = p.record.as_ref().unwrap().reason.clone().unwrap();
        assert!(reason.contains("annotation"), "{reason}");
        // Handled: the same annotation value keeps the stored value.
        let handled = ManagedSecretStatus {
            rotate_request: Some(recorded),
            ..status
        };
        let mut g = gathered(
            profile(serde_json::json!({})),
            Some(held("aaaaaaaaaaaaaaaaaaaaaaaa", Some(1))),
        );
        g.content = Content::Generate { fresh: None };
        let p = sync_plan(&ms_rotating, observe(handled, g));
        assert_eq!(p.decision, VersionDecision::Unchanged(1));
    }
}

#[test]
fn a_migration_moves_first_or_reports_its_failure_and_syncs_on() {
    let ms = ms(serde_json::json!({}));
    let migrating = profile(serde_json::json!({"migrateFrom": "old"}));
    let status = ManagedSecretStatus {
        versions: vec![record(1, "pw", "old")],
        ..Default::default()
    };
    let mut g = gathered(migrating.clone(), None);
    g.migration = Some(Ok(migration::Observed {
        owner: None,
        from: "old".into(),
        to: "src".into(),
        versions: vec![],
    }));
    assert!(matches!(
        plan(&ms, observe(status.clone(), g)),
        Plan::Migrate { .. }
    ));
    let mut g = gathered(migrating, Some(held("pw", Some(1))));
    g.migration = Some(Err(Error::config(
        Reason::MigrationConflict,
        "other content",
    )));
    let p = sync_plan(&ms, observe(status, g));
    assert!(p.migration_failed);
    let migrated = find_condition(&p.base.conditions, ConditionType::Migrated).unwrap();
    assert_eq!(migrated.reason, "MigrationConflict");
    let r = report(&ms, &p, &done(&p));
    assert_eq!(r.requeue, Duration::from_secs(15), "retried soon");
    assert!(r.check_stores);
    // Without migrateFrom, a leftover marker goes.
    let mut g = gathered(profile(serde_json::json!({})), Some(held("pw", Some(1))));
    g.native = Some(native(&ms, "pw", 1));
    let leftover = ManagedSecretStatus {
        migrated_from: Some("old".into()),
        versions: vec![record(1, "pw", "src")],
        ..Default::default()
    };
    assert_eq!(
        sync_plan(&ms, observe(leftover, g)).base.migrated_from,
        None
    );
}

#[test]
fn a_secret_keyhaven_does_not_manage_is_never_taken_over() {
    let ms = ms(serde_json::json!({}));
    let mut foreign = native(&ms, "theirs", 1);
    foreign.metadata.labels = None;
    let mut g = gathered(profile(serde_json::json!({})), Some(held("pw", None)));
    g.native = Some(foreign);
    let (status, e) = failure(&ms, observe(Default::default(), g));
    assert_eq!(e.reason(), Reason::TargetSecretExists);
    assert!(
        status.versions.is_empty(),
        "refused before anything is written"
    );
}

#[test]
fn a_failing_sync_target_degrades_without_holding_back_the_others() {
    let ms = ms(serde_json::json!({}));
    let mut g = gathered(
        profile(serde_json::json!({"syncTargets": ["dr", "mirror", "down"]})),
        Some(held("pw", Some(1))),
    );
    g.targets = vec![
        ("dr".into(), Ok(Some(held("pw", Some(1))))),
        ("mirror".into(), Ok(Some(held("edited", Some(1))))),
        (
            "down".into(),
            Err(Error::config(
                Reason::StoreNotFound,
                "SecretStore down does not exist",
            )),
        ),
    ];
    g.native = Some(native(&ms, "pw", 1));
    let status = ManagedSecretStatus {
        versions: vec![record(1, "pw", "src")],
        ..Default::default()
    };
    let p = sync_plan(&ms, observe(status, g));
    assert!(matches!(p.targets[0], TargetStep::InSync { .. }));
    assert!(matches!(
        p.targets[1],
        TargetStep::Write {
            action: StoreAction::RepairDrift,
            ..
        }
    ));
    assert!(matches!(p.targets[2], TargetStep::Unreadable { .. }));
    let r = report(&ms, &p, &done(&p));
    assert_eq!(r.status.phase, Some(ManagedSecretPhase::Degraded));
    let reasons: Vec<Reason> = r.notes.iter().map(|n| n.reason).collect();
    assert_eq!(reasons, [Reason::DriftRepaired, Reason::TargetSyncFailed]);
    assert_eq!(r.requeue, Duration::from_secs(15));
    let synced = find_condition(&r.status.conditions, ConditionType::Synced).unwrap();
    assert!(synced.message.ends_with("down"), "{}", synced.message);
}

/// A sync of `ms` that changes the content its workloads last restarted for (version 1).
fn restarting(ms: &ManagedSecret) -> Box<SyncPlan> {
    let status = ManagedSecretStatus {
        versions: vec![record(1, "old", "src")],
        restarted_version: Some(1),
        ..Default::default()
    };
    let mut g = gathered(profile(serde_json::json!({})), Some(held("new", None)));
    g.native = Some(native(ms, "old", 1));
    sync_plan(ms, observe(status, g))
}

#[test]
fn workloads_restart_when_the_content_they_run_with_changes() {
    let ms =
        ms(serde_json::json!({"rolloutRestartTargets": [{"kind": "Deployment", "name": "api"}]}));
    let p = restarting(&ms);
    assert_eq!(p.restart, RestartDecision::Restart);
    let outcome = Outcome {
        restarted: vec!["Deployment/api".into()],
        ..done(&p)
    };
    let r = report(&ms, &p, &outcome);
    assert_eq!(r.status.restarted_version, Some(2));
    assert!(r.notes.iter().any(|n| n.reason == Reason::RolloutRestarted));
}

#[test]
fn a_restart_rbac_forbids_is_reported_and_the_version_recorded() {
    let ms = ms(serde_json::json!({"rolloutRestartTargets": [
        {"kind": "Deployment", "name": "api"}, {"kind": "StatefulSet", "name": "db"}]}));
    let p = restarting(&ms);
    assert_eq!(p.restart, RestartDecision::Restart);
    let outcome = Outcome {
        restarted: vec!["Deployment/api".into()],
        forbidden_workloads: vec!["StatefulSet/db".into()],
        ..done(&p)
    };
    let r = report(&ms, &p, &outcome);
    // The sync completes: version 2 recorded, restarts done for it, no retry on a timer.
    assert_eq!(r.status.current_version, Some(2));
    assert_eq!(r.status.restarted_version, Some(2));
    assert_eq!(r.status.phase, Some(ManagedSecretPhase::Synced));
    assert!(!r.check_stores);
    assert_eq!(r.requeue, super::report::wake_after(&ms, &p));
    let forbidden: Vec<_> = r
        .notes
        .iter()
        .filter(|n| n.reason == Reason::RolloutRestartForbidden)
        .collect();
    assert_eq!(forbidden.len(), 1, "{:?}", r.notes);
    assert_eq!(
        forbidden[0].type_,
        kube::runtime::events::EventType::Warning
    );
    assert!(
        forbidden[0].text.contains("StatefulSet/db") && forbidden[0].text.contains("RBAC"),
        "{}",
        forbidden[0].text
    );
    assert!(r.notes.iter().any(|n| n.reason == Reason::RolloutRestarted
        && n.text.contains("Deployment/api")
        && !n.text.contains("StatefulSet/db")));
}

#[test]
fn an_expiry_warns_once_and_wakes_the_reconcile_in_time() {
    let ms = ms(serde_json::json!({"type": "api-key", "expiryWarning": "24h"}));
    let soon = now()
        .checked_add(jiff::SignedDuration::from_hours(2))
        .unwrap();
    let c = expiring_condition(&ms, Some(soon), now()).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "ExpiresSoon")
    );
    let later = now()
        .checked_add(jiff::SignedDuration::from_hours(48))
        .unwrap();
    let c = expiring_condition(&ms, Some(later), now()).unwrap();
    assert_eq!(c.reason, "NotExpiring");
    assert_eq!(
        expiring_condition(&ms, None, now()).unwrap().reason,
        "NoExpiry"
    );
    let password = self::ms(serde_json::json!({}));
    assert!(
        expiring_condition(&password, Some(soon), now()).is_none(),
        "passwords do not expire"
    );
}

#[test]
fn a_refresh_yields_to_new_secrets_only_when_settled() {
    let mut settled = ms(serde_json::json!({}));
    settled.status = Some(ManagedSecretStatus {
        observed_generation: Some(2),
        phase: Some(ManagedSecretPhase::Synced),
        ..Default::default()
    });
    assert!(defers(&settled, || 3));
    assert!(!defers(&settled, || 0), "no backlog");
    let mut changed = settled.clone();
    changed.metadata.generation = Some(3);
    assert!(
        !defers(&changed, || 3),
        "its spec changed: it is backlog itself"
    );
    let mut rotate = settled.clone();
    rotate.metadata.annotations = Some([("keyhaven.io/rotate".to_owned(), "x".to_owned())].into());
    assert!(!defers(&rotate, || 3), "a rotation asked for");
}

#[test]
fn only_a_plan_that_acts_on_history_needs_the_stored_status() {
    let ms = ms(serde_json::json!({}));
    let first = first_sync(&ms);
    assert!(
        Plan::Sync(first).decides_on_history(),
        "a new version is recorded"
    );
    let status = {
        let p = first_sync(&ms);
        report(&ms, &p, &done(&p)).status
    };
    let mut g = gathered(profile(serde_json::json!({})), Some(held("pw", Some(1))));
    g.native = Some(native(&ms, "pw", 1));
    let idle = plan(&ms, observe(status, g));
    assert!(
        !idle.decides_on_history(),
        "an idle refresh decides on the cached status"
    );
    let obs = Observation {
        now: now(),
        jitter: 1.0,
        status: Default::default(),
        stale: true,
        gathered: Err(Error::config(Reason::StoreNotFound, "gone")),
    };
    assert!(
        plan(&ms, obs).decides_on_history(),
        "a failure must not drop a version"
    );
}
