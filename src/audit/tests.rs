use super::chain::{Finding, GENESIS, seal, state_of, verify};
use super::*;

fn key() -> AuditKey {
    AuditKey::new([7; 32])
}

fn record(i: u64) -> Record {
    Record::new(Action::Version, "alice", "team-a", "db")
        .path("team-a/db")
        .store("vault")
        .version(i, Some("hmac-sha256:abcd"))
        .reason("rotation")
}

fn stream(n: u64) -> Vec<String> {
    let mut state = ChainState::default();
    (1..=n)
        .map(|i| {
            let (line, next) = seal(&key(), &state, &record(i));
            state = next;
            line
        })
        .collect()
}

#[test]
fn a_sealed_stream_verifies_and_continues_from_its_last_line() {
    let lines = stream(5);
    let text = lines.concat();
    let verified = verify(&key(), &text, false).unwrap();
    assert_eq!(verified.records, 5);
    assert_eq!(verified.last_seq, Some(5));
    let state = state_of(lines[4].trim_end()).unwrap();
    assert_eq!(state.seq, 5);
    assert!(lines[0].contains(&format!("\"prev\":\"{GENESIS}\"")));
    assert!(lines[0].contains("\"action\":\"version\""));
    // Another key does not verify it.
    assert_eq!(
        verify(&AuditKey::new([8; 32]), &text, false),
        Err(Finding::Changed { line: 1 })
    );
}

#[test]
fn every_byte_flipped_is_reported_at_its_line() {
    let lines = stream(3);
    let text = lines.concat();
    let second = lines[0].len();
    for at in second..second + lines[1].len() - 1 {
        let mut bytes = text.clone().into_bytes();
        bytes[at] ^= 0x01;
        let changed = String::from_utf8_lossy(&bytes).into_owned();
        let found = verify(&key(), &changed, false);
        assert!(
            matches!(
                found,
                Err(Finding::Changed { line: 2 }) | Err(Finding::Broken { line: 2 })
            ),
            "flipping byte {at}: {found:?}"
        );
    }
}

#[test]
fn dropped_and_swapped_lines_are_reported() {
    let lines = stream(4);
    let dropped = [&lines[0], &lines[1], &lines[3]]
        .map(|s| s.as_str())
        .concat();
    assert_eq!(
        verify(&key(), &dropped, false),
        Err(Finding::Dropped {
            line: 3,
            from: 3,
            to: 3
        })
    );
    let first_dropped = lines[1..].concat();
    assert_eq!(
        verify(&key(), &first_dropped, false),
        Err(Finding::Dropped {
            line: 1,
            from: 1,
            to: 1
        })
    );
    assert!(
        verify(&key(), &first_dropped, true).is_ok(),
        "a continued file"
    );
    let swapped = [&lines[0], &lines[2], &lines[1], &lines[3]]
        .map(|s| s.as_str())
        .concat();
    assert_eq!(
        verify(&key(), &swapped, false),
        Err(Finding::Dropped {
            line: 2,
            from: 2,
            to: 2
        })
    );
    let last_swapped = [&lines[0], &lines[1], &lines[3], &lines[2]]
        .map(|s| s.as_str())
        .concat();
    assert_eq!(
        verify(&key(), &last_swapped, false),
        Err(Finding::Dropped {
            line: 3,
            from: 3,
            to: 3
        })
    );
    let repeated = [&lines[0], &lines[1], &lines[1]]
        .map(|s| s.as_str())
        .concat();
    assert_eq!(
        verify(&key(), &repeated, false),
        Err(Finding::Reordered {
            line: 3,
            seq: 2,
            after: 2
        })
    );
}

#[test]
fn a_replaced_line_breaks_the_chain_even_when_its_own_mac_is_valid() {
    // A line sealed under the right key but on another chain (an attacker with the key
    // writing a second stream cannot splice it in unnoticed without rewriting what follows).
    let lines = stream(3);
    let mut other = ChainState::default();
    let (fake1, next) = seal(&key(), &other, &record(99));
    other = next;
    let (fake2, _) = seal(&key(), &other, &record(98));
    let spliced = [&lines[0], &fake2, &lines[2]].map(|s| s.as_str()).concat();
    assert_eq!(
        verify(&key(), &spliced, false),
        Err(Finding::Broken { line: 2 })
    );
    let _ = fake1;
}

#[test]
fn reasons_are_bounded_and_actions_read_back() {
    let long = "x".repeat(5000);
    let r = Record::new(Action::SecretWritten, "bob", "ns", "n").reason(long);
    assert_eq!(r.reason.as_ref().unwrap().len(), 1024);
    assert_eq!(Action::SecretWritten.as_str(), "secret-written");
    let json = serde_json::to_string(&r).unwrap();
    let back: Record = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("keyhaven-audit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn the_writer_continues_the_chain_across_restarts_and_holds_records_while_unwritable() {
    let dir = temp_dir("writer");
    let path = dir.join("audit.log");
    let audit = Audit::open(Target::File(path.clone()), key(), "system:keyhaven");
    audit.record(vec![record(1), record(2)]).await.unwrap();
    drop(audit);
    // The first writer's thread lets go of its lock once its queue closes.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let audit = Audit::open(Target::File(path.clone()), key(), "system:keyhaven");
    audit.record(vec![record(3)]).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let verified = verify(&key(), &text, false).unwrap();
    assert_eq!(verified.records, 5, "{text}"); // two starts, three records
    // A second process on the same file is refused (the chain would fork).
    let second = Audit::open(Target::File(path.clone()), key(), "system:keyhaven");
    assert!(
        second
            .writable()
            .await
            .unwrap_err()
            .0
            .contains("another process")
    );
    drop(second);

    // Replaced by a directory: unwritable, said so; the record waits, then is written.
    std::fs::rename(&path, dir.join("rotated.log")).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert!(audit.record(vec![record(4)]).await.is_err());
    assert!(audit.writable().await.is_err());
    assert!(!audit.available());
    std::fs::remove_dir(&path).unwrap();
    audit.writable().await.unwrap();
    assert!(audit.available());
    let rotated = std::fs::read_to_string(dir.join("rotated.log")).unwrap();
    let continued = std::fs::read_to_string(&path).unwrap();
    assert!(
        continued.contains("\"version\":4"),
        "the held record is written first"
    );
    assert!(
        verify(&key(), &continued, false).is_err(),
        "starts mid-stream"
    );
    assert!(verify(&key(), &continued, true).is_ok());
    let whole = format!("{rotated}{continued}");
    assert_eq!(verify(&key(), &whole, false).unwrap().records, 6);
    let _ = std::fs::remove_dir_all(&dir);
}
