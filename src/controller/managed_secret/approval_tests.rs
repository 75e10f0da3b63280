//! The approval gate: which change waits, how decisions count, what binds a request.

use super::approval::*;
use super::plan_tests::{ms, now};
use crate::api::{
    ApprovalOperation as Op, ApprovalPolicy, ApprovalRequest, Decision, ManagedSecretPhase,
    ManagedSecretStatus, RequestState, VersionRecord,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn policy(ops: &[Op], required: u32) -> ApprovalPolicy {
    ApprovalPolicy {
        operations: ops.to_vec(),
        required_approvals: Some(required),
        expiry: Some("1h".into()),
    }
}

fn input(requester: &str) -> GateInput<'_> {
    GateInput {
        uid: "u-1",
        generation: Some(2),
        requester,
        now: now(),
        verified: true,
        current_version: Some(3),
    }
}

fn create() -> Vec<Change> {
    vec![Change {
        op: Op::Create,
        binding: "hmac-sha256-ns:aa".into(),
        summary: "create: pushed".into(),
    }]
}

fn decided(name: &str, request: &str, decision: Decision, by: &str, may: bool) -> Decided {
    Decided {
        name: name.into(),
        request: request.into(),
        decision,
        by: Some(by.into()),
        at: now(),
        comment: Some("ok".into()),
        may_approve: may,
    }
}

/// The request a first gate makes for `changes`.
fn opened(p: &ApprovalPolicy, changes: &[Change]) -> ApprovalRequest {
    match gate(Some(p), None, changes, &[], &input("alice")) {
        Gate::Hold(h) => {
            assert_eq!(h.phase, ManagedSecretPhase::PendingApproval);
            assert_eq!(h.record.state, RequestState::Pending);
            assert_eq!(h.record.requested_by, "alice");
            h.record
        }
        other => panic!("expected a hold, got {other:?}"),
    }
}

#[test]
fn no_policy_or_an_uncovered_change_proceeds() {
    assert!(matches!(
        gate(None, None, &create(), &[], &input("alice")),
        Gate::Proceed { record: None, .. }
    ));
    let p = policy(&[Op::Update], 1);
    assert!(matches!(
        gate(Some(&p), None, &create(), &[], &input("alice")),
        Gate::Proceed { record: None, .. }
    ));
}

#[test]
fn a_create_waits_and_the_requester_cannot_approve_it() {
    let p = policy(&[Op::Create], 1);
    let r = opened(&p, &create());
    let own = [decided("a1", &r.id, Decision::Approve, "alice", true)];
    match gate(Some(&p), Some(&r), &create(), &own, &input("alice")) {
        Gate::Hold(h) => {
            assert_eq!(h.record.state, RequestState::Pending);
            assert!(h.record.decisions.is_empty());
            assert!(h.message.contains("requester"), "{}", h.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_approver_without_rbac_does_not_count_one_with_it_does() {
    let p = policy(&[Op::Create], 1);
    let r = opened(&p, &create());
    let carol = [decided("c1", &r.id, Decision::Approve, "carol", false)];
    assert!(matches!(
        gate(Some(&p), Some(&r), &create(), &carol, &input("alice")),
        Gate::Hold(_)
    ));
    let bob = [decided("b1", &r.id, Decision::Approve, "bob", true)];
    match gate(Some(&p), Some(&r), &create(), &bob, &input("alice")) {
        Gate::Proceed { record, notes } => {
            let record = record.unwrap();
            assert_eq!(record.state, RequestState::Approved);
            assert_eq!(record.decisions[0].by, "bob");
            assert_eq!(notes.len(), 1, "one Event per decision");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn two_approvals_need_two_different_approvers() {
    let p = policy(&[Op::Create], 2);
    let r = opened(&p, &create());
    let twice = [
        decided("b1", &r.id, Decision::Approve, "bob", true),
        decided("b2", &r.id, Decision::Approve, "bob", true),
    ];
    assert!(matches!(
        gate(Some(&p), Some(&r), &create(), &twice, &input("alice")),
        Gate::Hold(_)
    ));
    let two = [
        decided("b1", &r.id, Decision::Approve, "bob", true),
        decided("d1", &r.id, Decision::Approve, "dave", true),
    ];
    assert!(matches!(
        gate(Some(&p), Some(&r), &create(), &two, &input("alice")),
        Gate::Proceed { .. }
    ));
}

#[test]
fn one_rejection_closes_the_request_until_the_spec_changes() {
    let p = policy(&[Op::Create], 2);
    let r = opened(&p, &create());
    let d = [
        decided("b1", &r.id, Decision::Approve, "bob", true),
        decided("d1", &r.id, Decision::Reject, "dave", true),
    ];
    let rejected = match gate(Some(&p), Some(&r), &create(), &d, &input("alice")) {
        Gate::Hold(h) => {
            assert_eq!(h.phase, ManagedSecretPhase::Rejected);
            h.record
        }
        other => panic!("{other:?}"),
    };
    // Same spec: still rejected, even with a later approval.
    let more = [decided("e1", &r.id, Decision::Approve, "erin", true)];
    assert!(matches!(
        gate(Some(&p), Some(&rejected), &create(), &more, &input("alice")),
        Gate::Hold(h) if h.phase == ManagedSecretPhase::Rejected
    ));
    // A later spec asks again.
    let mut later = input("alice");
    later.generation = Some(3);
    assert!(matches!(
        gate(Some(&p), Some(&rejected), &create(), &[], &later),
        Gate::Hold(h) if h.record.state == RequestState::Pending && h.record.id != r.id
    ));
}

#[test]
fn a_request_expires_and_late_decisions_do_not_count() {
    let p = policy(&[Op::Create], 1);
    let r = opened(&p, &create());
    let mut late = input("alice");
    late.now = now() + jiff::SignedDuration::from_hours(2);
    let mut d = decided("b1", &r.id, Decision::Approve, "bob", true);
    d.at = late.now;
    match gate(Some(&p), Some(&r), &create(), &[d], &late) {
        Gate::Hold(h) => {
            assert_eq!(h.phase, ManagedSecretPhase::ApprovalExpired);
            assert_eq!(h.record.state, RequestState::Expired);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_further_change_after_approval_needs_approval_again() {
    let p = policy(&[Op::Create], 1);
    let r = opened(&p, &create());
    let bob = [decided("b1", &r.id, Decision::Approve, "bob", true)];
    let Gate::Proceed {
        record: Some(approved),
        ..
    } = gate(Some(&p), Some(&r), &create(), &bob, &input("alice"))
    else {
        panic!("not approved")
    };
    let other = vec![Change {
        binding: "hmac-sha256-ns:bb".into(),
        ..create()[0].clone()
    }];
    // Bob's decision answers the old request only.
    match gate(Some(&p), Some(&approved), &other, &bob, &input("alice")) {
        Gate::Hold(h) => {
            assert_ne!(h.record.id, approved.id);
            assert!(h.record.decisions.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn decisions_count_only_with_the_webhooks_identity() {
    let p = policy(&[Op::Create], 1);
    let r = opened(&p, &create());
    let mut unverified = input("alice");
    unverified.verified = false;
    let bob = [decided("b1", &r.id, Decision::Approve, "bob", true)];
    assert!(matches!(
        gate(Some(&p), Some(&r), &create(), &bob, &unverified),
        Gate::Hold(_)
    ));
}

fn with_version(source: &str, profile: &str) -> ManagedSecretStatus {
    ManagedSecretStatus {
        versions: vec![VersionRecord {
            version: 3,
            fingerprint: "hmac-sha256-ns:aa".into(),
            store: "src".into(),
            created_at: Time(now()),
            created_by: "alice".into(),
            reason: None,
            store_version: None,
            moved_from: None,
        }],
        profile: Some(profile.into()),
        source: Some(source.into()),
        ..Default::default()
    }
}

#[test]
fn changes_name_create_change_source_and_update() {
    let pushed = ms(serde_json::json!({"content": {"fromSecret": {"name": "src2"}}}));
    let none = ManagedSecretStatus::default();
    let ops = |c: Vec<Change>| c.into_iter().map(|c| c.op).collect::<Vec<_>>();
    assert_eq!(
        ops(changes(&pushed, &none, "p", true, false, "fp", "x")),
        [Op::Create]
    );
    let same = with_version("fromSecret/src2", "p");
    assert_eq!(
        ops(changes(&pushed, &same, "p", true, false, "fp", "x")),
        [Op::Update]
    );
    assert!(changes(&pushed, &same, "p", false, false, "fp", "x").is_empty());
    // A scheduled rotation is not a user's update.
    assert!(changes(&pushed, &same, "p", true, true, "fp", "x").is_empty());
    let moved = with_version("fromSecret/src1", "p");
    assert_eq!(
        ops(changes(&pushed, &moved, "p", true, false, "fp", "x")),
        [Op::ChangeSource, Op::Update]
    );
    let other_profile = with_version("fromSecret/src2", "old");
    assert_eq!(
        ops(changes(
            &pushed,
            &other_profile,
            "p",
            false,
            false,
            "fp",
            "x"
        )),
        [Op::ChangeSource]
    );
}

#[test]
fn leaving_a_profile_keeps_its_approval_policy() {
    let a = policy(&[Op::Update], 1);
    let b = policy(&[Op::ChangeSource], 2);
    let joined = effective_policy(Some(&a), Some(&b)).unwrap();
    assert!(joined.covers(Op::Update) && joined.covers(Op::ChangeSource));
    assert_eq!(joined.required(), 2);
    assert_eq!(effective_policy(None, Some(&b)), Some(b));
}

#[test]
fn generate_bindings_follow_parameters_and_rotate_requests() {
    let status = with_version("generate", "p");
    let a = ms(serde_json::json!({"content": {"generate": {"length": 20}}}));
    let b = ms(serde_json::json!({"content": {"generate": {"length": 24}}}));
    assert_ne!(generate_binding(&a, &status), generate_binding(&b, &status));
    let mut rotated = a.clone();
    rotated
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(crate::labels::ROTATE_ANNOTATION.into(), "1".into());
    assert_ne!(
        generate_binding(&a, &status),
        generate_binding(&rotated, &status)
    );
    assert_eq!(generate_binding(&a, &status), generate_binding(&a, &status));
}
