//! The e2e leak check itself (issue 20): what it looks for, and that it does fail a test.

mod e2e;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use e2e::fixture::Fixture;
use e2e::leaks::{self, Finding, MIN_LEN};
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

fn finding(place: &str, encoding: &'static str, value: &str) -> Finding {
    Finding {
        place: place.to_owned(),
        encoding,
        len: value.len(),
        prefix: value.chars().take(2).collect(),
    }
}

#[test]
fn the_scan_finds_values_and_their_base64_and_skips_short_ones() {
    let value = "s3cr3t-e2e-lea~~?"; // 17 bytes: padded; "~~" makes base64url differ
    let short = "abc1234"; // MIN_LEN - 1 bytes
    assert_eq!(short.len(), MIN_LEN - 1);
    let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n";
    let values = vec![value.into(), short.into(), pem.into()];
    let b64 = STANDARD.encode(value);
    let b64url = URL_SAFE.encode(value);
    assert_ne!(b64, b64url);
    let log = format!(
        "line one {short} is fine\nline two {value}\nline three {b64}\nline four {}\n",
        b64.trim_end_matches('=')
    );
    let haystacks = vec![
        ("operator log".to_owned(), log),
        ("Event ns/e reason X".to_owned(), format!("note {b64url}")),
        ("metrics page".to_owned(), "nothing here".to_owned()),
        (
            "status".to_owned(),
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC".to_owned(),
        ),
        (
            "header".to_owned(),
            "-----BEGIN PRIVATE KEY-----".to_owned(),
        ),
        ("debug".to_owned(), format!("{:?}", pem)),
    ];
    let found = leaks::scan(&values, &haystacks);
    assert_eq!(
        found,
        vec![
            finding("operator log line 2", "as is", value),
            finding("operator log line 3", "base64", value),
            finding("operator log line 4", "base64 unpadded", value),
            finding("Event ns/e reason X", "base64url", value),
            finding("status", "a line of it", pem),
            finding("debug", "escaped", pem),
        ]
    );
    // Reports never carry the value.
    let report = leaks::report(&found, std::path::Path::new("op.log"));
    assert!(
        !report.contains(value) && !report.contains(&b64),
        "{report}"
    );
    assert!(report.contains("17 bytes, starting \"s3\""), "{report}");
    // Nothing registered, nothing found.
    assert!(leaks::scan(&[], &haystacks).is_empty());
}

#[tokio::test]
async fn a_value_in_an_event_fails_the_leak_check() {
    let fx = Fixture::new("leaks").await;
    let value = "e2e-leaks-planted-value";
    fx.register(value);
    let events: Api<Event> = fx.ns_api(&fx.ns);
    let name = "planted";
    let event = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": fx.ns},
        "involvedObject": {"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "namespace": fx.ns, "name": name},
        "reason": "Planted",
        "message": format!("the note carries {}", STANDARD.encode(value)),
        "type": "Normal",
    }))
    .unwrap();
    events
        .create(&PostParams::default(), &event)
        .await
        .expect("create Event");
    let found = leaks::check(&fx).await;
    assert_eq!(
        found,
        vec![finding(
            &format!("Event {}/{name} reason Planted", fx.ns),
            "base64",
            value
        )],
        "{}",
        leaks::report(&found, &fx.op.log)
    );
    // Gone, the fixture's own check at its drop passes.
    events
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete Event");
    assert!(leaks::check(&fx).await.is_empty());
}

/// The check the fixture runs when it drops fails the test, after the cleanup.
#[tokio::test]
#[should_panic(expected = "leak check: 1 registered secret value(s) found")]
async fn the_fixture_fails_a_test_that_leaked_when_it_drops() {
    let fx = Fixture::new("leaks-drop").await;
    let value = "e2e-leaks-dropped-value";
    fx.register(value);
    let event = serde_json::from_value(json!({
        "metadata": {"name": "planted", "namespace": fx.ns},
        "involvedObject": {"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "namespace": fx.ns, "name": "planted"},
        "reason": "Planted",
        "message": format!("the note carries {value}"),
        "type": "Normal",
    }))
    .unwrap();
    fx.ns_api::<Event>(&fx.ns)
        .create(&PostParams::default(), &event)
        .await
        .expect("create Event");
}
