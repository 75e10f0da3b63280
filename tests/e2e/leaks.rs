//! The leak check every e2e test runs at its end (issue 20): every value a test writes or
//! reads back is registered in its fixture's [`Leaks`]; when the fixture drops (the test
//! passed), the operator's log, the Events of the test's namespaces, the status of every
//! keyhaven object of the test and the operator's metrics page are scanned for each value,
//! and any hit fails the test.
//!
//! What is looked for, for each value ([`candidates`]):
//! - the value itself, and the value escaped as Rust's `Debug` and JSON escape it (a value
//!   with a newline or a quote logged through `{:?}`);
//! - each line of a multi-line value (a PEM key cut short in a 1024-character message),
//!   when the line is long enough and not a PEM armour line (`-----BEGIN ...`), which every
//!   key of a kind shares;
//! - its base64: standard with padding, standard without, URL-safe with and without.
//!
//! Known gaps, accepted:
//! - Values shorter than [`MIN_LEN`] bytes are skipped: a 5-byte value matches by chance in
//!   a long log (a timestamp, a uid). Tests that care keep their values longer.
//! - The base64 of a value embedded in a longer base64 string (a whole JSON document
//!   encoded) is found only when the value starts at a multiple of 3 bytes in that string:
//!   at another offset its characters differ. Nor is any other encoding looked for (hex,
//!   a hash).
//! - A value that is not UTF-8 is looked for only through its base64 forms.
//! - The harness does not register the values of a Secret's [`PUBLIC_KEYS`] (certificates,
//!   public keys, an expiry): they may be shown.
//!
//! A finding names where it was and the value's length and first 2 characters, never the
//! value: the report lands in CI logs.

use super::fixture::Fixture;
use super::operator::{SCOPE_LABEL, http_get};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use k8s_openapi::api::core::v1::Event;
use keyhaven::api::{ManagedSecret, SecretApproval, SecretStore, VaultProfile};
use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Values shorter than this are not looked for (too likely to match by chance).
pub const MIN_LEN: usize = 8;

/// Lines of a multi-line value shorter than this are not looked for on their own.
const MIN_LINE_LEN: usize = 16;

/// Keys of a Secret whose values are public by design, not registered by the harness: a
/// certificate, a public key, the expiry an api-key's status shows (`status.expiresAt`, and
/// the messages that say when it expires).
pub const PUBLIC_KEYS: &[&str] = &[
    "expires-at",
    "tls.crt",
    "ca.crt",
    "ssh-publickey",
    "public-key",
];

/// The values one test wrote or read: cheap to clone, shared between threads.
#[derive(Clone, Debug, Default)]
pub struct Leaks(Arc<Mutex<BTreeSet<Vec<u8>>>>);

impl Leaks {
    /// Looks for `value` at the end of the test (when it is at least [`MIN_LEN`] bytes).
    pub fn register(&self, value: impl AsRef<[u8]>) {
        self.0.lock().unwrap().insert(value.as_ref().to_vec());
    }

    /// Registers the value of the key `key` of a Secret, unless it is one of [`PUBLIC_KEYS`].
    pub fn register_data(&self, key: &str, value: impl AsRef<[u8]>) {
        if !PUBLIC_KEYS.contains(&key) {
            self.register(value);
        }
    }

    /// Stops looking for `value`.
    pub fn unregister(&self, value: impl AsRef<[u8]>) {
        self.0.lock().unwrap().remove(value.as_ref());
    }

    /// Every registered value.
    pub fn values(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().iter().cloned().collect()
    }
}

/// A registered value found where it must not be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Where: "operator log line 12", "Event ns/name reason Synced", "metrics page line 3",
    /// "ManagedSecret ns/name status.conditions[0].message".
    pub place: String,
    /// How it appeared: "as is", "escaped", "a line of it", "base64", "base64 unpadded",
    /// "base64url", "base64url unpadded".
    pub encoding: &'static str,
    /// The value's length in bytes.
    pub len: usize,
    /// Its first 2 characters (escaped), to tell values apart without revealing them.
    pub prefix: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: a registered value ({} bytes, starting {:?}) {}",
            self.place, self.len, self.prefix, self.encoding
        )
    }
}

/// The strings that betray `value`, each with how ("as is", "base64", ...); none for a
/// value shorter than [`MIN_LEN`]. Duplicates (a base64 without padding to add) are left
/// out, the first label kept.
pub fn candidates(value: &[u8]) -> Vec<(&'static str, String)> {
    if value.len() < MIN_LEN {
        return vec![];
    }
    let mut out: Vec<(&'static str, String)> = vec![];
    let mut push = |label, text: String| {
        if !text.is_empty() && !out.iter().any(|(_, t)| *t == text) {
            out.push((label, text));
        }
    };
    if let Ok(text) = std::str::from_utf8(value) {
        push("as is", text.to_owned());
        push("escaped", text.escape_debug().to_string());
        push(
            "escaped",
            serde_json::to_string(text)
                .unwrap()
                .trim_matches('"')
                .to_owned(),
        );
        if text.contains('\n') {
            for line in text.lines().map(str::trim) {
                if line.len() >= MIN_LINE_LEN && !line.starts_with("-----") {
                    push("a line of it", line.to_owned());
                }
            }
        }
    }
    push("base64", STANDARD.encode(value));
    push("base64 unpadded", STANDARD_NO_PAD.encode(value));
    push("base64url", URL_SAFE.encode(value));
    push("base64url unpadded", URL_SAFE_NO_PAD.encode(value));
    out
}

/// Every place in `haystacks` (where, text) that holds one of `values` in a form of
/// [`candidates`]. A multi-line text's findings name their line ("operator log line 12");
/// one finding per value and line, with the first form (in [`candidates`]' order) that
/// matched there. One Aho-Corasick pass per haystack: the fault tests register tens of
/// thousands of values and their operator logs run to megabytes.
pub fn scan<W: AsRef<str>, T: AsRef<str>>(
    values: &[Vec<u8>],
    haystacks: &[(W, T)],
) -> Vec<Finding> {
    // Every form of every value, with (value index, form index, encoding).
    let mut patterns: Vec<String> = vec![];
    let mut owners: Vec<(usize, usize, &'static str)> = vec![];
    for (v, value) in values.iter().enumerate() {
        for (f, (encoding, form)) in candidates(value).into_iter().enumerate() {
            patterns.push(form);
            owners.push((v, f, encoding));
        }
    }
    if patterns.is_empty() {
        return vec![];
    }
    let matcher = aho_corasick::AhoCorasick::new(&patterns).expect("leak check patterns");
    // (value, haystack, form, offset, line, encoding), sorted as the findings are listed.
    let mut hits: Vec<(usize, usize, usize, usize, usize, &'static str)> = vec![];
    for (h, (_, text)) in haystacks.iter().enumerate() {
        let text = text.as_ref();
        let newlines: Vec<usize> = text.match_indices('\n').map(|(i, _)| i).collect();
        for m in matcher.find_overlapping_iter(text) {
            let (v, f, encoding) = owners[m.pattern().as_usize()];
            let line = newlines.partition_point(|&i| i < m.start()) + 1;
            hits.push((v, h, f, m.start(), line, encoding));
        }
    }
    hits.sort();
    let mut seen: BTreeSet<(usize, usize, usize)> = BTreeSet::new();
    let mut findings = vec![];
    for (v, h, _, _, line, encoding) in hits {
        if !seen.insert((v, h, line)) {
            continue;
        }
        let (place, text) = (haystacks[h].0.as_ref(), haystacks[h].1.as_ref());
        let value = &values[v];
        findings.push(Finding {
            place: match text.contains('\n') {
                true => format!("{place} line {line}"),
                false => place.to_owned(),
            },
            encoding,
            len: value.len(),
            prefix: String::from_utf8_lossy(value)
                .chars()
                .take(2)
                .flat_map(char::escape_debug)
                .collect(),
        });
    }
    findings
}

/// The findings as a test failure's message (the first 30, and how many more).
pub fn report(findings: &[Finding], log: &std::path::Path) -> String {
    let mut lines: Vec<String> = findings.iter().take(30).map(|f| format!("  {f}")).collect();
    if findings.len() > 30 {
        lines.push(format!("  ... and {} more", findings.len() - 30));
    }
    format!(
        "leak check: {} registered secret value(s) found where they must not be (operator log {}):\n{}",
        findings.len(),
        log.display(),
        lines.join("\n")
    )
}

/// What a fixture's leak check scans, taken from the fixture without the API server.
#[derive(Clone, Debug)]
pub struct Sources {
    /// The namespaces whose Events, ManagedSecrets and SecretApprovals are scanned.
    pub namespaces: Vec<String>,
    /// The value of [`SCOPE_LABEL`] on the test's SecretStores and VaultProfiles; also the
    /// prefix of the names of the objects whose Events land in `default`.
    pub scope: String,
    /// The operator's log, every start of it.
    pub log: String,
    /// The operator's metrics address, when it runs.
    pub metrics_addr: Option<String>,
    pub kubeconfig: PathBuf,
}

impl Sources {
    /// The places of `fx` to scan.
    pub fn of(fx: &Fixture) -> Sources {
        Sources {
            namespaces: fx.namespaces(),
            scope: fx.ns.clone(),
            log: fx.op.log_text(),
            metrics_addr: fx.op.pid().and(fx.op.metrics_addr()),
            kubeconfig: fx.kubeconfig.clone(),
        }
    }

    /// Every (where, text) to scan: the log, the Events, the statuses, the metrics page.
    /// What cannot be read is said on stderr and skipped.
    pub async fn gather(&self, client: &Client) -> Vec<(String, String)> {
        let mut out = vec![("operator log".to_owned(), self.log.clone())];
        let mut event_nss = self.namespaces.clone();
        event_nss.push("default".to_owned());
        for ns in &event_nss {
            let api: Api<Event> = Api::namespaced(client.clone(), ns);
            let events = match api.list(&ListParams::default()).await {
                Ok(list) => list.items,
                Err(e) => {
                    eprintln!("leak check: list Events of {ns}: {e}");
                    continue;
                }
            };
            for e in events {
                let about = e.involved_object.name.clone().unwrap_or_default();
                if ns == "default" && !about.starts_with(&self.scope) {
                    continue;
                }
                let place = format!(
                    "Event {ns}/{} reason {}",
                    e.name_any(),
                    e.reason.as_deref().unwrap_or("-")
                );
                // An events.k8s.io/v1 Event's `note` is core/v1's `message`.
                out.push((place, e.message.unwrap_or_default()));
            }
        }
        for ns in &self.namespaces {
            statuses::<ManagedSecret>(Api::namespaced(client.clone(), ns), None, &mut out).await;
            statuses::<SecretApproval>(Api::namespaced(client.clone(), ns), None, &mut out).await;
        }
        let scoped = format!("{SCOPE_LABEL}={}", self.scope);
        statuses::<SecretStore>(Api::all(client.clone()), Some(&scoped), &mut out).await;
        statuses::<VaultProfile>(Api::all(client.clone()), Some(&scoped), &mut out).await;
        if let Some(addr) = &self.metrics_addr {
            match http_get(addr, "/metrics").await {
                Some((200, text)) => out.push(("metrics page".to_owned(), text)),
                other => eprintln!("leak check: GET {addr}/metrics: {other:?}"),
            }
        }
        out
    }
}

/// The string leaves of the `status` of every object of `api` (those labelled `selector`),
/// each as a haystack "<Kind> <ns>/<name> status.<path>".
async fn statuses<K>(api: Api<K>, selector: Option<&str>, out: &mut Vec<(String, String)>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
{
    let lp = match selector {
        Some(s) => ListParams::default().labels(s),
        None => ListParams::default(),
    };
    let kind = K::kind(&());
    let list = match api.list(&lp).await {
        Ok(list) => list.items,
        Err(e) => {
            eprintln!("leak check: list {kind}: {e}");
            return;
        }
    };
    for obj in list {
        let name = match obj.namespace() {
            Some(ns) => format!("{ns}/{}", obj.name_any()),
            None => obj.name_any(),
        };
        let json = serde_json::to_value(&obj).unwrap_or_default();
        string_leaves(
            &json["status"],
            &format!("{kind} {name} status"),
            &mut |place, text| out.push((place, text.to_owned())),
        );
    }
}

/// Calls `f` with the path and text of every string in `v` (object keys included: a map
/// keyed by a value would show it).
fn string_leaves(v: &Value, path: &str, f: &mut impl FnMut(String, &str)) {
    match v {
        Value::String(s) => f(path.to_owned(), s),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                string_leaves(item, &format!("{path}[{i}]"), f);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                f(format!("{path} (a key)"), k);
                string_leaves(item, &format!("{path}.{k}"), f);
            }
        }
        _ => {}
    }
}

/// The leak check of `fx` now, with its client (from a test; the fixture's Drop runs
/// [`check_blocking`]).
pub async fn check(fx: &Fixture) -> Vec<Finding> {
    let haystacks = Sources::of(fx).gather(&fx.client).await;
    scan(&fx.leaks.values(), &haystacks)
}

/// The leak check of `fx` from synchronous code (a Drop), on a runtime and client of its
/// own (see [`super::cleanup_blocking`]). When the places cannot be gathered at all, only
/// the operator's log is scanned, and stderr says why.
pub fn check_blocking(fx: &Fixture) -> Vec<Finding> {
    let sources = Sources::of(fx);
    let log = sources.log.clone();
    let kubeconfig = sources.kubeconfig.clone();
    let haystacks = super::blocking(&kubeconfig, move |client| async move {
        Ok(sources.gather(&client).await)
    })
    .unwrap_or_else(|e| {
        eprintln!("leak check: {e}: scanning the operator log only");
        vec![("operator log".to_owned(), log)]
    });
    scan(&fx.leaks.values(), &haystacks)
}
