//! The durations of a ManagedSecret's spec: checked (a value out of range fails the sync
//! with a reason naming the field, never a panic downstream) and floored, so that no spec
//! makes the operator spin.
//!
//! - `refreshInterval`: at least [`MIN_REFRESH`] (`0s` does not requeue at once);
//! - `rotation.interval`: at least [`MIN_ROTATION`] (`1ms` does not make a version a second);
//! - every duration at most [`MAX_DURATION`] (100 years), as [`parse_duration`] refuses.
//!
//! The admission webhook refuses tighter ranges (refresh < 10 s, rotation < 1 h); these
//! floors are what the operator itself enforces without it.

use crate::api::{MAX_DURATION, ManagedSecret, Reason, parse_duration};
use crate::error::Error;
use std::time::Duration;

pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);
pub const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(720 * 3600);
/// The shortest refresh interval the operator uses.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The shortest rotation interval the operator uses.
pub const MIN_ROTATION: Duration = Duration::from_secs(10);

/// The duration fields of `ms`'s spec: `(field, value)`.
fn fields(ms: &ManagedSecret) -> [(&'static str, Option<&str>); 3] {
    [
        ("spec.refreshInterval", ms.spec.refresh_interval.as_deref()),
        ("spec.expiryWarning", ms.spec.expiry_warning.as_deref()),
        (
            "spec.rotation.interval",
            ms.spec
                .rotation
                .as_ref()
                .and_then(|r| r.interval.as_deref()),
        ),
    ]
}

/// Every duration of the spec parses and is in range; else an error naming the field.
/// (`content.generate.validity` is checked where the certificate is made.)
pub fn check(ms: &ManagedSecret) -> Result<(), Error> {
    for (field, value) in fields(ms) {
        if let Some(text) = value {
            parse_duration(text)
                .map_err(|e| Error::config(Reason::InvalidSpec, format!("{field}: {e}")))?;
        }
    }
    Ok(())
}

/// A duration field, or `default` when unset or unusable ([`check`] reports those).
fn duration_or(field: Option<&str>, default: Duration) -> Duration {
    field
        .and_then(|d| parse_duration(d).ok())
        .unwrap_or(default)
        .min(MAX_DURATION)
}

/// How often `ms` is refreshed: its `refreshInterval`, at least [`MIN_REFRESH`].
pub fn refresh_interval(ms: &ManagedSecret) -> Duration {
    duration_or(ms.spec.refresh_interval.as_deref(), DEFAULT_REFRESH).max(MIN_REFRESH)
}

/// The expiry warning window of `ms`.
pub fn expiry_warning(ms: &ManagedSecret) -> Duration {
    duration_or(ms.spec.expiry_warning.as_deref(), DEFAULT_EXPIRY_WARNING)
}

/// The scheduled rotation interval of `ms`, at least [`MIN_ROTATION`]; none when unset
/// (or unusable).
pub fn rotation_interval(ms: &ManagedSecret) -> Option<Duration> {
    ms.spec
        .rotation
        .as_ref()
        .and_then(|r| r.interval.as_deref())
        .and_then(|d| parse_duration(d).ok())
        .map(|d| d.max(MIN_ROTATION))
}

/// `d` scaled by `factor` (a jitter near 1), saturating at [`MAX_DURATION`]: never the
/// panic of `Duration::mul_f64` on overflow.
pub fn scaled(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor)
        .unwrap_or(MAX_DURATION)
        .min(MAX_DURATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(spec: serde_json::Value) -> ManagedSecret {
        let mut full = serde_json::json!({"type": "password", "content": {"generate": {}}});
        full.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": "m", "namespace": "n"}, "spec": full,
        }))
        .unwrap()
    }

    #[test]
    fn out_of_range_durations_fail_naming_the_field() {
        for (spec, field) in [
            (
                serde_json::json!({"refreshInterval": "18446744073709551615s"}),
                "spec.refreshInterval",
            ),
            (
                serde_json::json!({"expiryWarning": "1000000000000h"}),
                "spec.expiryWarning",
            ),
            (
                serde_json::json!({"rotation": {"interval": "99999999999999999999h"}}),
                "spec.rotation.interval",
            ),
        ] {
            let e = check(&ms(spec)).unwrap_err();
            assert_eq!(e.reason(), Reason::InvalidSpec);
            assert!(e.to_string().starts_with(field), "{e}");
            assert!(!e.is_transient());
        }
        check(&ms(
            serde_json::json!({"refreshInterval": "1h", "rotation": {"interval": "720h"}}),
        ))
        .unwrap();
    }

    #[test]
    fn floors_keep_the_operator_from_spinning() {
        let m = ms(serde_json::json!({"refreshInterval": "0s", "rotation": {"interval": "1ms"}}));
        assert_eq!(refresh_interval(&m), MIN_REFRESH);
        assert_eq!(rotation_interval(&m), Some(MIN_ROTATION));
        let m = ms(serde_json::json!({}));
        assert_eq!(refresh_interval(&m), DEFAULT_REFRESH);
        assert_eq!(rotation_interval(&m), None);
        assert_eq!(expiry_warning(&m), DEFAULT_EXPIRY_WARNING);
        // Unusable: the default, and `check` says why.
        let m = ms(serde_json::json!({"refreshInterval": "18446744073709551615s"}));
        assert_eq!(refresh_interval(&m), DEFAULT_REFRESH);
    }

    #[test]
    fn scaling_saturates() {
        assert_eq!(scaled(MAX_DURATION, 1.1), MAX_DURATION);
        assert_eq!(scaled(Duration::MAX, 1.1), MAX_DURATION);
        assert_eq!(scaled(Duration::from_secs(10), 0.5), Duration::from_secs(5));
    }
}
