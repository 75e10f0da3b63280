//! End-to-end: the specs that once crashed the operator or made it spin (issue 17, item 5)
//! fail their own ManagedSecret with a reason naming the field, and the process goes on.

mod e2e;

use e2e::fixture::{Fixture, versions};
use e2e::operator::Work;
use keyhaven::api::ManagedSecret;
use serde_json::json;
use std::time::Duration;

fn ready_message(ms: &ManagedSecret) -> String {
    ms.status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn hostile_durations_fail_their_secret_and_never_the_process() {
    let mut fx = Fixture::new("crashproof").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[]).await;
    // Once: a date overflow, a panic on every reconcile, the process crash-looping.
    fx.managed_secret(
        "cert",
        json!({"profile": profile, "type": "certificate",
            "content": {"generate": {"validity": "1000000000000h"}}}),
    )
    .await;
    // Once: a Duration overflow.
    fx.managed_secret(
        "refresh",
        json!({"profile": profile, "type": "password", "refreshInterval": "18446744073709551615s",
            "content": {"generate": {}}}),
    )
    .await;
    // Once: a requeue at once, forever, and a new version every millisecond.
    fx.managed_secret(
        "spin",
        json!({"profile": profile, "type": "password", "refreshInterval": "0s",
            "rotation": {"interval": "1ms"}, "content": {"generate": {}}}),
    )
    .await;

    let cert = fx.wait_not_ready("cert", "InvalidContent").await;
    assert!(
        ready_message(&cert).contains("generate.validity"),
        "{}",
        ready_message(&cert)
    );
    let refresh = fx.wait_not_ready("refresh", "InvalidSpec").await;
    assert!(
        ready_message(&refresh).starts_with("spec.refreshInterval: "),
        "{}",
        ready_message(&refresh)
    );
    fx.wait_synced("spin", 1).await;

    // Six seconds: the refresh floor (1 s) and the failures' retry (30 s) bound the work;
    // the rotation floor (10 s) makes no second version.
    let before = fx.op.metrics().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = fx.op.metrics().await;
    assert_eq!(after.pid, before.pid, "the operator restarted");
    let reconciles = after.count(&Work::reconciles("ManagedSecret"))
        - before.count(&Work::reconciles("ManagedSecret"));
    assert!(
        (1.0..=20.0).contains(&reconciles),
        "{reconciles} reconciles in 6 s"
    );
    let spin = fx
        .ns_api::<ManagedSecret>(&fx.ns)
        .get("spin")
        .await
        .unwrap();
    assert_eq!(versions(&spin), [1], "a rotation interval of 1ms is 10 s");
    assert_eq!(
        after
            .sample(r#"keyhaven_reconcile_panics_total{kind="ManagedSecret"}"#)
            .unwrap_or(0.0),
        0.0
    );
    assert!(fx.op.is_running(), "the operator exited");
}
