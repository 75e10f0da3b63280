//! SecretApprovals at admission: `/mutate` records who decides (`keyhaven.io/decided-by`,
//! whatever the user wrote there; kept as it was on every update), `/validate` refuses a
//! decision from the requester, from a user the cluster's RBAC does not allow `approve` on
//! the ManagedSecret, one on a request that is not the secret's open one (decided,
//! expired, superseded), and a second one by the same user.

use crate::api::{ManagedSecret, RequestState, SecretApproval};
use crate::labels::{DECIDED_BY_ANNOTATION, DECIDED_GROUPS_ANNOTATION, MANAGED_SECRET_LABEL};
use k8s_openapi::api::authentication::v1::UserInfo;
use serde_json::Value;

/// `new` with the decider's identity: the requester's on create, the stored one (`old`'s)
/// on any update.
pub fn stamp(mut new: Value, old: Option<&Value>, user: &UserInfo) -> Value {
    let from_old = |key: &str| {
        old.and_then(|o| o.pointer(&format!("/metadata/annotations/{}", key.replace('/', "~1"))))
            .cloned()
    };
    let (by, groups) = match old {
        Some(_) => (
            from_old(DECIDED_BY_ANNOTATION),
            from_old(DECIDED_GROUPS_ANNOTATION),
        ),
        None => (
            user.username.clone().map(Value::String),
            Some(Value::String(
                user.groups.clone().unwrap_or_default().join(","),
            )),
        ),
    };
    let secret = new
        .pointer("/spec/secretRef/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) else {
        return new;
    };
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Default::default()));
    if !annotations.is_object() {
        *annotations = Value::Object(Default::default());
    }
    let a = annotations.as_object_mut().expect("an object");
    for (key, value) in [
        (DECIDED_BY_ANNOTATION, by),
        (DECIDED_GROUPS_ANNOTATION, groups),
    ] {
        match value {
            Some(v) => a.insert(key.to_owned(), v),
            None => a.remove(key),
        };
    }
    // The secret it answers, as a label (`kubectl get khapproval -l ...`).
    if old.is_none()
        && let Some(name) = secret.filter(|n| n.len() <= 63)
    {
        let labels = meta
            .entry("labels")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(l) = labels.as_object_mut() {
            l.insert(MANAGED_SECRET_LABEL.to_owned(), Value::String(name));
        }
    }
    new
}

/// Why a decision by `user` on `ms` is refused (pure; `may_approve` from a
/// SubjectAccessReview). None: admitted.
pub fn refusal(
    approval: &SecretApproval,
    ms: Option<&ManagedSecret>,
    user: &str,
    may_approve: bool,
    now: jiff::Timestamp,
) -> Option<String> {
    let name = &approval.spec.secret_ref.name;
    let Some(ms) = ms else {
        return Some(format!(
            "spec.secretRef.name: ManagedSecret {name} does not exist in this namespace"
        ));
    };
    let request = &approval.spec.request;
    let Some(open) = ms.status.as_ref().and_then(|s| s.approval.as_ref()) else {
        return Some(format!(
            "spec.request: ManagedSecret {name} has no request waiting for approval"
        ));
    };
    if open.id != *request {
        return Some(format!(
            "spec.request: {request} is not the open request of ManagedSecret {name} (that is {}, state {}): a later change superseded it",
            open.id,
            open.state.as_str()
        ));
    }
    if open.state != RequestState::Pending {
        return Some(format!(
            "spec.request: request {request} is already {}",
            open.state.as_str()
        ));
    }
    if now >= open.expires_at.0 {
        return Some(format!(
            "spec.request: request {request} expired at {}",
            open.expires_at.0
        ));
    }
    if open.requested_by == user {
        return Some(format!(
            "{user} asked for this change (request {request}): a requester cannot decide their own request"
        ));
    }
    if open.decisions.iter().any(|d| d.by == user) {
        return Some(format!("{user} has decided request {request} already"));
    }
    if !may_approve {
        return Some(format!(
            "{user} may not approve: RBAC allows no verb `approve` on managedsecrets.keyhaven.io {name} in this namespace"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(name: &str) -> UserInfo {
        UserInfo {
            username: Some(name.into()),
            groups: Some(vec!["devs".into()]),
            ..Default::default()
        }
    }

    #[test]
    fn the_decider_is_whoever_created_it_and_stays_so() {
        let forged = json!({"metadata": {"name": "a", "annotations": {DECIDED_BY_ANNOTATION: "bob"}},
            "spec": {"secretRef": {"name": "db"}}});
        let stamped = stamp(forged.clone(), None, &user("mallory"));
        assert_eq!(
            stamped["metadata"]["annotations"][DECIDED_BY_ANNOTATION],
            "mallory"
        );
        assert_eq!(stamped["metadata"]["labels"][MANAGED_SECRET_LABEL], "db");
        let again = stamp(forged, Some(&stamped), &user("eve"));
        assert_eq!(
            again["metadata"]["annotations"][DECIDED_BY_ANNOTATION],
            "mallory"
        );
    }

    fn approval(request: &str) -> SecretApproval {
        serde_json::from_value(
            json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretApproval",
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"secretRef": {"name": "db"}, "request": request, "decision": "Approve"}}),
        )
        .unwrap()
    }

    fn pending(id: &str, by: &str) -> ManagedSecret {
        serde_json::from_value(
            json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": "db", "namespace": "ns"},
            "spec": {"type": "password", "content": {"fromStore": {}}},
            "status": {"approval": {"id": id, "operation": "create", "binding": "b", "summary": "s",
                "requestedBy": by, "requestedAt": "2026-12-01T00:00:00Z",
                "expiresAt": "2026-12-02T00:00:00Z", "required": 1, "state": "Pending"}}}),
        )
        .unwrap()
    }

    #[test]
    fn decisions_are_refused_as_the_rules_say() {
        let now: jiff::Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let ms = pending("r1", "alice");
        assert!(refusal(&approval("r1"), Some(&ms), "bob", true, now).is_none());
        let own = refusal(&approval("r1"), Some(&ms), "alice", true, now).unwrap();
        assert!(own.contains("requester"), "{own}");
        let carol = refusal(&approval("r1"), Some(&ms), "carol", false, now).unwrap();
        assert!(carol.contains("approve"), "{carol}");
        assert!(
            refusal(&approval("r0"), Some(&ms), "bob", true, now)
                .unwrap()
                .contains("superseded")
        );
        let late: jiff::Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        assert!(
            refusal(&approval("r1"), Some(&ms), "bob", true, late)
                .unwrap()
                .contains("expired")
        );
        assert!(
            refusal(&approval("r1"), None, "bob", true, now)
                .unwrap()
                .contains("does not exist")
        );
    }
}
