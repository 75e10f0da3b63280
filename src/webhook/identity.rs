//! Who asked (pure): the mutating webhook writes the requesting user into a ManagedSecret on
//! every create, spec change and new rotate request, overwriting whatever the request
//! carried there; any other update keeps what the stored object says, so the record can
//! neither be forged nor erased by a user.

use crate::labels::{REQUESTED_BY_ANNOTATION, REQUESTED_GROUPS_ANNOTATION, ROTATE_ANNOTATION};
use k8s_openapi::api::authentication::v1::UserInfo;
use serde_json::Value;

/// At most this much of a group list is recorded (an annotation is not a place for 10,000
/// groups).
const MAX_GROUPS_LEN: usize = 1024;

fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a Value> {
    object.get("metadata")?.get("annotations")?.get(key)
}

/// Whether the update from `old` to `new` asks for something: a create, a spec change, or a
/// rotate request.
pub fn is_request(new: &Value, old: Option<&Value>) -> bool {
    match old {
        None => true,
        Some(old) => {
            new.get("spec") != old.get("spec")
                || annotation(new, ROTATE_ANNOTATION) != annotation(old, ROTATE_ANNOTATION)
        }
    }
}

/// `new` with the identity annotations set: the requester's for a request, the stored
/// object's otherwise.
/// `new` with the deletion requester `old` recorded (whatever the user wrote): only the
/// operator records it.
pub fn keep_deletion_requester(mut new: Value, old: Option<&Value>) -> Value {
    let key = crate::labels::DELETION_REQUESTED_BY_ANNOTATION;
    let kept = old.and_then(|o| annotation(o, key)).cloned();
    if kept.is_none() && annotation(&new, key).is_none() {
        return new;
    }
    if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(a) = annotations.as_object_mut() {
            match kept {
                Some(v) => a.insert(key.to_owned(), v),
                None => a.remove(key),
            };
        }
    }
    new
}

/// Whether an update removes keyhaven's cleanup finalizer.
pub fn drops_finalizer(new: &Value, old: &Value) -> bool {
    let has = |v: &Value| {
        v.pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|f| f == crate::labels::CLEANUP_FINALIZER))
    };
    has(old) && !has(new)
}

pub fn stamp(mut new: Value, old: Option<&Value>, user: &UserInfo) -> Value {
    let (by, groups) = match is_request(&new, old) {
        true => {
            let mut groups = user.groups.clone().unwrap_or_default().join(",");
            if groups.len() > MAX_GROUPS_LEN {
                let cut = (0..=MAX_GROUPS_LEN)
                    .rev()
                    .find(|i| groups.is_char_boundary(*i))
                    .unwrap_or(0);
                groups.truncate(cut);
            }
            (
                Some(Value::String(user.username.clone().unwrap_or_default())),
                Some(Value::String(groups)),
            )
        }
        false => {
            let old = old.expect("not a request means an update");
            (
                annotation(old, REQUESTED_BY_ANNOTATION).cloned(),
                annotation(old, REQUESTED_GROUPS_ANNOTATION).cloned(),
            )
        }
    };
    let metadata = new.as_object_mut().map(|o| {
        o.entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()))
    });
    if let Some(Value::Object(metadata)) = metadata {
        let annotations = metadata
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if !annotations.is_object() {
            *annotations = Value::Object(Default::default());
        }
        let annotations = annotations.as_object_mut().expect("made an object above");
        for (key, value) in [
            (REQUESTED_BY_ANNOTATION, by),
            (REQUESTED_GROUPS_ANNOTATION, groups),
        ] {
            match value {
                Some(v) => annotations.insert(key.to_owned(), v),
                None => annotations.remove(key),
            };
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(name: &str) -> UserInfo {
        UserInfo {
            username: Some(name.into()),
            groups: Some(vec!["dev".into(), "system:authenticated".into()]),
            ..Default::default()
        }
    }

    fn by(v: &Value) -> Option<&str> {
        annotation(v, REQUESTED_BY_ANNOTATION)?.as_str()
    }

    #[test]
    fn a_create_records_the_requester_over_what_it_wrote() {
        let forged = json!({"metadata": {"name": "db", "annotations": {REQUESTED_BY_ANNOTATION: "root"}},
            "spec": {"type": "password"}});
        let out = stamp(forged, None, &user("alice"));
        assert_eq!(by(&out), Some("alice"));
        assert_eq!(
            annotation(&out, REQUESTED_GROUPS_ANNOTATION).and_then(Value::as_str),
            Some("dev,system:authenticated")
        );
        let bare = stamp(json!({"spec": {}}), None, &user("bob"));
        assert_eq!(by(&bare), Some("bob"));
    }

    #[test]
    fn a_spec_change_or_rotate_request_records_the_new_requester() {
        let old = json!({"metadata": {"annotations": {REQUESTED_BY_ANNOTATION: "alice"}},
            "spec": {"refreshInterval": "1h"}});
        let changed = json!({"metadata": {}, "spec": {"refreshInterval": "2h"}});
        assert_eq!(by(&stamp(changed, Some(&old), &user("bob"))), Some("bob"));
        let rotate = json!({"metadata": {"annotations": {ROTATE_ANNOTATION: "now"}},
            "spec": {"refreshInterval": "1h"}});
        assert_eq!(
            by(&stamp(rotate, Some(&old), &user("carol"))),
            Some("carol")
        );
    }

    #[test]
    fn other_updates_keep_the_stored_record() {
        let old = json!({"metadata": {"annotations": {REQUESTED_BY_ANNOTATION: "alice"}},
            "spec": {"refreshInterval": "1h"}});
        // A label or finalizer change (the operator's, or a user forging the record).
        let forged = json!({"metadata": {"labels": {"x": "y"},
            "annotations": {REQUESTED_BY_ANNOTATION: "root"}}, "spec": {"refreshInterval": "1h"}});
        let out = stamp(forged, Some(&old), &user("mallory"));
        assert_eq!(by(&out), Some("alice"));
        assert!(annotation(&out, REQUESTED_GROUPS_ANNOTATION).is_none());
        // A record the stored object lacks cannot be added without a request.
        let none = json!({"metadata": {}, "spec": {"refreshInterval": "1h"}});
        let added = json!({"metadata": {"annotations": {REQUESTED_BY_ANNOTATION: "root"}},
            "spec": {"refreshInterval": "1h"}});
        assert!(by(&stamp(added, Some(&none), &user("mallory"))).is_none());
    }
}
