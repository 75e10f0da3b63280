//! The audit stream's line format and its verification (pure).
//!
//! Each line is one JSON object: the record's fields, `seq` (1, 2, … across the stream's
//! whole life, continued over restarts), `prev` (the previous line's `mac`; 64 zeros before
//! the first) and last `mac`: HMAC-SHA256, under the audit key, of the line's text up to
//! `,"mac":` with the closing brace. Changing a byte of a line breaks its `mac`; dropping or
//! reordering lines breaks `seq` and `prev`.

use super::Record;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// `prev` of the first record of a stream.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// What precedes a line's MAC.
const MAC_FIELD: &str = ",\"mac\":\"";
/// Domain separation: the key MACs nothing but audit lines.
const DOMAIN: &[u8] = b"keyhaven audit v1\n";

/// The audit key: 32 bytes, kept in the operator's namespace (Secret `keyhaven-audit-key`).
#[derive(Clone)]
pub struct AuditKey(zeroize::Zeroizing<[u8; 32]>);

impl AuditKey {
    pub fn new(key: [u8; 32]) -> Self {
        AuditKey(zeroize::Zeroizing::new(key))
    }

    fn mac(&self) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.0.as_slice()).expect("any key length");
        mac.update(DOMAIN);
        mac
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

/// Where the chain stands: the last line's `seq` and `mac`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainState {
    pub seq: u64,
    pub mac: String,
}

impl Default for ChainState {
    fn default() -> Self {
        ChainState {
            seq: 0,
            mac: GENESIS.to_owned(),
        }
    }
}

/// A line without its MAC: the record and its place in the chain.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Body {
    seq: u64,
    #[serde(flatten)]
    record: Record,
    prev: String,
}

/// The line (with its newline) of `record` after `state`, and the state after it.
pub fn seal(key: &AuditKey, state: &ChainState, record: &Record) -> (String, ChainState) {
    let body = Body {
        seq: state.seq + 1,
        record: record.clone(),
        prev: state.mac.clone(),
    };
    let text = serde_json::to_string(&body).expect("a record serializes");
    let mut mac = key.mac();
    mac.update(text.as_bytes());
    let mac = hex::encode(mac.finalize().into_bytes());
    let line = format!("{}{MAC_FIELD}{mac}\"}}\n", &text[..text.len() - 1]);
    (line, ChainState { seq: body.seq, mac })
}

/// One line read back: its body's text and its MAC, if it has the shape of a record.
fn split(line: &str) -> Option<(String, &str)> {
    let at = line.rfind(MAC_FIELD)?;
    let mac = line[at + MAC_FIELD.len()..].strip_suffix("\"}")?;
    Some((format!("{}}}", &line[..at]), mac))
}

/// The chain state a line ends in, without checking its MAC (to continue a stream).
pub fn state_of(line: &str) -> Option<ChainState> {
    let (body, mac) = split(line)?;
    let body: Body = serde_json::from_str(&body).ok()?;
    (mac.len() == 64).then(|| ChainState {
        seq: body.seq,
        mac: mac.to_owned(),
    })
}

/// What `verify` found wrong first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The line is not a record, or its MAC does not match its content.
    Changed { line: usize },
    /// Records before this line are missing (their `seq`s).
    Dropped { line: usize, from: u64, to: u64 },
    /// This line's record comes before or at the previous line's.
    Reordered { line: usize, seq: u64, after: u64 },
    /// The line follows in `seq` but not in the chain (the previous line was replaced).
    Broken { line: usize },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Changed { line } => write!(
                f,
                "line {line}: record changed (its MAC does not match its content)"
            ),
            Finding::Dropped { line, from, to } if from == to => {
                write!(f, "line {line}: record {from} dropped before it")
            }
            Finding::Dropped { line, from, to } => {
                write!(f, "line {line}: records {from}-{to} dropped before it")
            }
            Finding::Reordered { line, seq, after } => write!(
                f,
                "line {line}: record {seq} comes after record {after} (reordered or repeated)"
            ),
            Finding::Broken { line } => write!(
                f,
                "line {line}: does not chain to the line before it (that line was replaced)"
            ),
        }
    }
}

/// A verified stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: usize,
    /// The first record's `seq` (above 1: the file continues an earlier one).
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// Checks every line of `text` in order; the first finding, or what was verified. Empty
/// lines are ignored. Unless `continues` (the text continues an earlier file, rotated
/// away), it must start at the stream's first record.
pub fn verify(key: &AuditKey, text: &str, continues: bool) -> Result<Verified, Finding> {
    let mut last: Option<ChainState> = None;
    let mut verified = Verified {
        records: 0,
        first_seq: None,
        last_seq: None,
    };
    for (i, line) in text.split('\n').enumerate() {
        let number = i + 1;
        if line.is_empty() {
            continue;
        }
        let (body_text, mac) = split(line).ok_or(Finding::Changed { line: number })?;
        let mut expected = key.mac();
        expected.update(body_text.as_bytes());
        let mac_bytes = hex::decode(mac).map_err(|_| Finding::Changed { line: number })?;
        expected
            .verify_slice(&mac_bytes)
            .map_err(|_| Finding::Changed { line: number })?;
        let body: Body =
            serde_json::from_str(&body_text).map_err(|_| Finding::Changed { line: number })?;
        if let Some(last) = &last {
            if body.seq <= last.seq {
                return Err(Finding::Reordered {
                    line: number,
                    seq: body.seq,
                    after: last.seq,
                });
            }
            if body.seq > last.seq + 1 {
                return Err(Finding::Dropped {
                    line: number,
                    from: last.seq + 1,
                    to: body.seq - 1,
                });
            }
            if body.prev != last.mac {
                return Err(Finding::Broken { line: number });
            }
        } else if body.seq == 1 && body.prev != GENESIS {
            return Err(Finding::Broken { line: number });
        } else if body.seq > 1 && !continues {
            return Err(Finding::Dropped {
                line: number,
                from: 1,
                to: body.seq - 1,
            });
        }
        verified.records += 1;
        verified.first_seq.get_or_insert(body.seq);
        verified.last_seq = Some(body.seq);
        last = Some(ChainState {
            seq: body.seq,
            mac: mac.to_owned(),
        });
    }
    Ok(verified)
}
