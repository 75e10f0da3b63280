//! Who may write and who asked, in the plan: a shared path is read and never written, a
//! writer records itself as a path's owner, and a version's `createdBy`.

use super::decide::VersionDecision;
use super::plan::author;
use super::plan_tests::*;
use super::report::report;
use crate::api::ManagedSecretStatus;

#[test]
fn the_author_is_the_requester_or_keyhaven_for_its_own_work() {
    let mut m = ms(serde_json::json!({}));
    let spec = serde_json::json!({"f:spec": {}});
    let meta = serde_json::json!({"f:metadata": {"f:finalizers": {}}});
    m.metadata.managed_fields = Some(serde_json::from_value(serde_json::json!([
        {"manager": "kubectl", "operation": "Update", "time": "2026-11-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": spec},
        {"manager": "argocd", "operation": "Apply", "time": "2026-11-02T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": spec},
        {"manager": "keyhaven", "operation": "Apply", "time": "2026-11-03T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": spec},
        {"manager": "finalizer-patch", "operation": "Update", "time": "2026-11-04T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": meta},
        {"manager": "status-writer", "operation": "Apply", "time": "2026-11-05T00:00:00Z", "subresource": "status", "fieldsType": "FieldsV1", "fieldsV1": spec},
    ])).unwrap());
    let first = ManagedSecretStatus::default();
    assert_eq!(
        author(&m, &first, true),
        "argocd",
        "no requester recorded: the newest writer of the spec"
    );
    // The webhook's record wins, when this operator's webhook wrote it.
    m.metadata.annotations =
        Some([("keyhaven.io/requested-by".to_owned(), "alice".to_owned())].into());
    assert_eq!(author(&m, &first, true), "alice");
    assert_eq!(
        author(&m, &first, false),
        "argocd",
        "without the webhook the annotation is anyone's to write"
    );
    // A refresh or scheduled rotation with nothing asked since the last sync: keyhaven's.
    let synced = ManagedSecretStatus {
        versions: vec![record(1, "pw", "vault")],
        observed_generation: m.metadata.generation,
        ..Default::default()
    };
    assert_eq!(author(&m, &synced, true), "system:keyhaven");
    // A rotate annotation on a secret that is not generated asks for nothing; removing
    // one that was acted on asks for nothing either.
    let mut pushed = m.clone();
    pushed
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("keyhaven.io/rotate".into(), "x".into());
    assert_eq!(author(&pushed, &synced, true), "system:keyhaven");
    // A spec change since: the requester again.
    m.metadata.generation = Some(m.metadata.generation.unwrap_or(1) + 1);
    assert_eq!(author(&m, &synced, true), "alice");
}

#[test]
fn a_shared_path_is_read_and_never_written() {
    let ms = ms(serde_json::json!({"path": "shared/ca"}));
    let mut g = gathered(
        profile(serde_json::json!({"syncTargets": ["dr"]})),
        Some(held("pw", None)),
    );
    g.writes = false;
    let p = sync_plan(&ms, observe(Default::default(), g));
    assert_eq!(
        p.decision,
        VersionDecision::New(1),
        "recorded in the reader's own status"
    );
    assert!(
        !p.source.write,
        "an unstamped shared value is not stamped by a reader"
    );
    assert!(p.targets.is_empty(), "the reader makes no copies");
    assert!(p.native.apply.is_some(), "its own native Secret is written");
}

#[test]
fn a_writer_records_itself_as_the_owner_of_a_path_in_sync() {
    let ms = ms(serde_json::json!({}));
    let status = {
        let p = first_sync(&ms);
        report(&ms, &p, &done(&p)).status
    };
    let me = crate::backend::Owner {
        namespace: "ns".into(),
        name: "db".into(),
        uid: "u1".into(),
    };
    // Version 1 in the source, stamped before owners were recorded.
    let mut g = gathered(profile(serde_json::json!({})), Some(held("pw", Some(1))));
    g.native = Some(native(&ms, "pw", 1));
    g.owner = Some(me.clone());
    let p = sync_plan(&ms, observe(status.clone(), g));
    assert_eq!(p.decision, VersionDecision::Unchanged(1));
    assert!(p.source.write, "the stamp is written again, with the owner");
    assert_eq!(p.stamp.owner.as_ref(), Some(&me));
    assert!(p.record.is_none(), "no new version");
    // Once it records the owner, the path is in sync.
    let mut owned = held("pw", Some(1));
    owned.stamp.as_mut().unwrap().owner = Some(me.clone());
    let mut g = gathered(profile(serde_json::json!({})), Some(owned));
    g.native = Some(native(&ms, "pw", 1));
    g.owner = Some(me);
    assert!(!sync_plan(&ms, observe(status, g)).source.write);
}
