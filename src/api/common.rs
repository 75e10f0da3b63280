//! Types shared by several resources.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The Go-style duration format accepted by every `*Interval` field: `90s`, `15m`, `1h30m`, `720h`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// The longest duration any field accepts: 100 years (`876000h`). Every time computed from
/// a duration (a certificate's notAfter, a rotation's due date, a requeue) stays in range.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses a duration in the [`DURATION_PATTERN`] format, refusing one longer than
/// [`MAX_DURATION`] (checked arithmetic: no input overflows or panics).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let too_long = || format!("duration {text:?} is longer than the maximum 876000h (100 years)");
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration {text:?}: expected a number"));
        }
        let number = &rest[..digits];
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        // More digits than a u64 holds is out of range whatever the unit.
        let n: u64 = number.parse().map_err(|_| too_long())?;
        let unit = match &rest[..unit_len] {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            other => return Err(format!("invalid duration {text:?}: unknown unit {other:?}")),
        };
        total = unit
            .and_then(|d| total.checked_add(d))
            .filter(|d| *d <= MAX_DURATION)
            .ok_or_else(too_long)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// The longest object name: a DNS subdomain (Secrets, ConfigMaps, ServiceAccounts,
/// workloads, VaultProfiles, ManagedSecrets).
pub const MAX_NAME: usize = 253;
/// The longest namespace name (a DNS label).
pub const MAX_NAMESPACE: usize = 63;
/// The longest SecretStore name (it is used as a label value).
pub const MAX_STORE_NAME: usize = 63;
/// The longest key of a Secret's or a ConfigMap's data.
pub const MAX_DATA_KEY: usize = 253;
/// The longest label or annotation key: a 253-character prefix, `/` and a 63-character name.
pub const MAX_LABEL_KEY: usize = 317;
/// The longest label value.
pub const MAX_LABEL_VALUE: usize = 63;
/// The longest secret path in the stores (and the longest store-side path: mounts, auth
/// mounts, Vault namespaces).
pub const MAX_PATH: usize = 200;
/// The longest Go duration text (`876000h` is 7 characters; `1h2m3s4ms` spelled out is 32).
pub const MAX_DURATION_TEXT: usize = 32;
/// The longest timestamp (`format: date-time`; RFC 3339 with nanoseconds and an offset is
/// 35 characters).
pub const MAX_TIME: usize = 64;
/// The longest free-text message in a status (a condition's, a store's, a target's).
pub const MAX_MESSAGE: usize = 4096;
/// The longest message of one store's entry in `ManagedSecret.status.targets`.
pub const MAX_TARGET_MESSAGE: usize = 1024;
/// The longest reason recorded with a version (`spec.reason`), and the longest condition
/// reason (as Kubernetes' own `Condition` has it).
pub const MAX_REASON: usize = 1024;
/// The longest user name recorded as a version's author (a ServiceAccount's
/// `system:serviceaccount:<namespace>:<name>` is at most 339).
pub const MAX_USER: usize = 512;
/// The most conditions one object's status lists (keyhaven writes at most 4 per kind).
pub const MAX_CONDITIONS: usize = 16;

/// The bytes `c` takes in the JSON the API server stores (Go's `encoding/json`, which
/// escapes `<`, `>`, `&`, U+2028, U+2029 and control characters as `\u00XX`).
fn stored_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' => 2,
        '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => 6,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The bytes `text` takes in the JSON the API server stores, quotes left out.
pub fn stored_text_len(text: &str) -> usize {
    text.chars().map(stored_len).sum()
}

/// Cuts `text` so that it takes at most `max` bytes in the JSON the API server stores
/// (hence also at most `max` characters, Kubernetes' `maxLength`), ending with `…` when
/// something was cut. Every free text keyhaven writes into a status (an error message, a
/// user name, a reason copied from a spec) goes through it, so the status's size is bounded
/// by its schema's `maxLength`s read as bytes, whatever characters the text has.
pub fn clamp_text(text: &mut String, max: usize) {
    if stored_text_len(text) <= max {
        return;
    }
    let budget = max.saturating_sub(stored_len('…'));
    let mut used = 0;
    let cut = text
        .char_indices()
        .find(|(_, c)| {
            used += stored_len(*c);
            used > budget
        })
        .map_or(text.len(), |(i, _)| i);
    text.truncate(cut);
    if max >= stored_len('…') {
        text.push('…');
    }
}

/// [`clamp_text`] on an optional text.
pub fn clamp_opt(text: &mut Option<String>, max: usize) {
    if let Some(t) = text {
        clamp_text(t, max);
    }
}

/// A status that can be brought within its CRD schema's bounds before it is written, so a
/// long error message or a long user name shortens the text instead of failing the write.
pub trait ClampToSchema {
    /// Cuts every text and list of the status to its schema's maximum.
    fn clamp_to_schema(&mut self);
}

/// Clamps the conditions of a status: at most [`MAX_CONDITIONS`] of them (the first), each
/// field within [`conditions_schema`]'s bounds.
pub fn clamp_conditions(conditions: &mut Vec<Condition>) {
    conditions.truncate(MAX_CONDITIONS);
    for c in conditions {
        clamp_text(&mut c.type_, MAX_CONDITION_TYPE);
        clamp_text(&mut c.reason, MAX_REASON);
        clamp_text(&mut c.message, MAX_MESSAGE);
    }
}

/// The longest condition type (`<prefix>/<CamelCase>`, as Kubernetes' own `Condition`).
const MAX_CONDITION_TYPE: usize = 316;

/// A reference to a key of a Kubernetes Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(max = MAX_NAME))]
    pub name: String,
    /// Namespace of the Secret; defaults to the operator's namespace for cluster-scoped resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAMESPACE))]
    pub namespace: Option<String>,
    /// Key within the Secret's data.
    #[schemars(length(max = MAX_DATA_KEY))]
    pub key: String,
}

/// Declares a fieldless enum whose variants appear in status, conditions and events under
/// their own names: `as_str`, `Display`, and `ALL` (every variant, for tests that hold the
/// CRD's text to what the code can write).
macro_rules! named_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every variant.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name written into status.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// Compares with the name written into status.
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}
pub(crate) use named_enum;

named_enum! {
    /// The types of the conditions keyhaven writes.
    pub enum ConditionType {
        /// The object does what its spec asks.
        Ready,
        /// ManagedSecret: every store of the profile holds the current version.
        Synced,
        /// ManagedSecret (api-key, certificate, jwt): the value expires soon, or has.
        Expiring,
        /// ManagedSecret: its versions were moved out of the profile's `migrateFrom`.
        Migrated,
        /// VaultProfile: a default or fallback together with another one.
        Conflict,
        /// SecretStore: its deletion waits until nothing uses it.
        DeletionBlocked,
        /// VaultProfile: each namespace's secrets are kept in its own secret space.
        Isolated,
        /// SecretStore: it talks to its backend without TLS (`insecureHTTP`).
        Insecure,
        /// ManagedSecret (profiles with `approval`): its last change is approved (False:
        /// it waits, was rejected or expired; the reason says which).
        Approved,
        /// ManagedSecret (profiles with `compliance`): its value meets every rule.
        Compliant,
        /// ManagedSecret: the audit log cannot be written, so nothing is (True while so).
        AuditUnavailable,
    }
}

/// Whether `conditions` has a condition of `type_` that is True.
pub fn condition_true(conditions: &[Condition], type_: ConditionType) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The condition of `type_` in `conditions`.
pub fn find_condition(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// Removes the condition of `type_`.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: ConditionType) {
    conditions.retain(|c| c.type_ != type_.as_str());
}

/// Sets `condition` in `conditions`, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) {
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        if existing.status == condition.status {
            condition.last_transition_time = existing.last_transition_time.clone();
        }
        *existing = condition;
    } else {
        conditions.push(condition);
    }
}

/// A condition of `type_` with the given truth, reason and message (cut to
/// [`MAX_MESSAGE`]), stamped now.
pub fn condition(
    type_: ConditionType,
    ok: bool,
    reason: super::Reason,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let mut message = message.into();
    clamp_text(&mut message, MAX_MESSAGE);
    Condition {
        type_: type_.as_str().into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.as_str().into(),
        message,
        observed_generation: generation,
        last_transition_time: now(),
    }
}

/// The current time as a Kubernetes timestamp.
pub fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Schema of a list of conditions: a list-map keyed by `type`, as Kubernetes' own APIs have
/// it, of at most [`MAX_CONDITIONS`], each text bounded: `type` 316 and `reason`
/// [`MAX_REASON`] characters (as Kubernetes' `Condition`), `status` 16, `message`
/// [`MAX_MESSAGE`], `lastTransitionTime` [`MAX_TIME`].
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema.insert("maxItems".into(), MAX_CONDITIONS.into());
    for (field, max) in [
        ("type", MAX_CONDITION_TYPE),
        ("status", 16),
        ("reason", MAX_REASON),
        ("message", MAX_MESSAGE),
        ("lastTransitionTime", MAX_TIME),
    ] {
        bound_at(
            &mut schema,
            &["items", "properties", field],
            "maxLength",
            max,
        );
    }
    schema
}

/// Sets `key: value` in the subschema at `path` (keys of nested JSON objects) of `schema`.
///
/// # Panics
/// When there is no subschema at `path`: a schema keyhaven bounds changed shape (caught by
/// every test that generates the CRDs).
fn bound_at(
    schema: &mut schemars::Schema,
    path: &[&str],
    key: &str,
    value: impl Into<serde_json::Value>,
) {
    let mut at = schema
        .as_object_mut()
        .unwrap_or_else(|| panic!("the schema is not an object"));
    for step in path {
        at = at
            .get_mut(*step)
            .and_then(serde_json::Value::as_object_mut)
            .unwrap_or_else(|| panic!("no object {step} in the schema at {path:?}"));
    }
    at.insert(key.into(), value.into());
}

/// Schema of a `map[string]string` with at most `KEYS` entries, each value at most `LEN`
/// characters, and each key at most `KEY_LEN` characters (a CEL rule: a structural schema
/// cannot bound the keys of a map itself).
pub fn string_map_schema<const KEYS: usize, const KEY_LEN: usize, const LEN: usize>(
    generator: &mut schemars::SchemaGenerator,
) -> schemars::Schema {
    let mut schema = generator.subschema_for::<std::collections::BTreeMap<String, String>>();
    schema.insert("maxProperties".into(), KEYS.into());
    bound_at(&mut schema, &["additionalProperties"], "maxLength", LEN);
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": format!("self.all(k, size(k) <= {KEY_LEN})"),
            "message": format!("a key has at most {KEY_LEN} characters"),
        }]),
    );
    schema
}

/// Schema of a `LabelSelector` (`T` is it or an `Option` of it), as k8s-openapi gives it,
/// with every list, map and text bounded: at most 32 `matchExpressions`, each `key` at
/// most 317 characters, `operator` 16, at most 64 `values` of at most 63; at most 64
/// `matchLabels`, each value at most 63 (keys 317, by a CEL rule).
pub fn label_selector_schema<T: JsonSchema>(
    generator: &mut schemars::SchemaGenerator,
) -> schemars::Schema {
    let mut schema = generator.subschema_for::<T>();
    let expressions = ["properties", "matchExpressions"];
    let requirement = ["properties", "matchExpressions", "items", "properties"];
    bound_at(&mut schema, &expressions, "maxItems", 32);
    for (field, max) in [("key", MAX_LABEL_KEY), ("operator", 16)] {
        bound_at(
            &mut schema,
            &[&requirement[..], &[field]].concat(),
            "maxLength",
            max,
        );
    }
    let values = [&requirement[..], &["values"]].concat();
    bound_at(&mut schema, &values, "maxItems", 64);
    bound_at(
        &mut schema,
        &[&values[..], &["items"]].concat(),
        "maxLength",
        MAX_LABEL_VALUE,
    );
    let labels = ["properties", "matchLabels"];
    bound_at(&mut schema, &labels, "maxProperties", 64);
    bound_at(
        &mut schema,
        &["properties", "matchLabels", "additionalProperties"],
        "maxLength",
        MAX_LABEL_VALUE,
    );
    bound_at(
        &mut schema,
        &labels,
        "x-kubernetes-validations",
        serde_json::json!([{
            "rule": format!("self.all(k, size(k) <= {MAX_LABEL_KEY})"),
            "message": format!("a label key has at most {MAX_LABEL_KEY} characters"),
        }]),
    );
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("720h").unwrap(),
            Duration::from_secs(720 * 3600)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "h", "10", "10d", "1.5h", "-1s", "1h 2m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn out_of_range_durations_are_refused_never_overflowed() {
        assert_eq!(parse_duration("876000h").unwrap(), MAX_DURATION);
        assert_eq!(
            parse_duration("5000000000ms").unwrap(),
            Duration::from_secs(5_000_000)
        );
        for huge in [
            "876001h",
            "1000000000000h",
            "18446744073709551615s",
            "18446744073709551616s",
            "99999999999999999999999h",
            "876000h1s",
            "307445734561825860m",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("longer than the maximum"), "{huge}: {e}");
        }
    }

    #[test]
    fn clamped_texts_fit_their_bound_in_stored_bytes() {
        let cut = |text: &str, max: usize| {
            let mut t = text.to_owned();
            clamp_text(&mut t, max);
            t
        };
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcdef", 5), "ab…");
        assert_eq!(cut("ééééé", 7), "éé…");
        assert_eq!(cut("<<<<", 12), "<…");
        assert_eq!(cut("<", 6), "<");
        assert_eq!(cut("abcdef", 2), "");
        for text in ["x".repeat(5000), "😀".repeat(5000), "<\u{1}\"".repeat(2000)] {
            for max in [0, 1, 3, 16, 1024, 4096] {
                let t = cut(&text, max);
                assert!(stored_text_len(&t) <= max, "{max}: {t:?}");
                assert!(t.chars().count() <= max);
                assert!(text.starts_with(t.trim_end_matches('…')));
            }
        }
    }

    #[test]
    fn pattern_agrees_with_parser() {
        let re = regex_lite::Regex::new(DURATION_PATTERN).unwrap();
        for text in ["90s", "1h30m", "720h", "250ms", "", "10", "10d", "1.5h"] {
            assert_eq!(re.is_match(text), parse_duration(text).is_ok(), "{text:?}");
        }
    }
}
