//! The pkcs11 store: the internal store's envelope encryption ([`SealedRecords`]), with
//! every data key wrapped by an AES-256 key-encryption key held on a PKCS#11 token (an
//! HSM) instead of a key in a Secret. Ciphertexts and wrapped keys are kept in Secrets of
//! the operator's namespace; the KEK never leaves the token.
//!
//! - [`token`]: modules, tokens, login state, the session pool; every PKCS#11 call runs on
//!   a blocking thread.
//! - [`kek`]: the KEK as a [`KeyWrapper`](crate::crypto::KeyWrapper), created on first use.
//! - [`rotation`]: KEK rotation status, planned from what the records hold.

mod kek;
mod rotation;
mod token;

use kek::{Pkcs11Kek, kek_label};
use rotation::plan as plan_rotation;

use super::BackendError;
use super::sealed_records::Rewrapped;
use super::sealed_store::{SealedStore, SealingKey};
use crate::api::{KekRotationPhase, KekRotationStatus, Pkcs11Provider, now};
use crate::crypto::KeyWrapper;
use async_trait::async_trait;
use futures::StreamExt;
use kube::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use token::TokenSelector;

/// Sessions a store may use at once unless its spec says otherwise: the operator's
/// default number of concurrent reconciles.
pub const DEFAULT_SESSIONS: u32 = 16;
/// Records re-wrapped per [`Pkcs11Store::rotate`] call, and how many at once: small
/// steps, so progress reaches the status often and the API server and HSM are not
/// flooded by a background task.
const REWRAP_BATCH: usize = 20;
const REWRAP_PARALLEL: usize = 4;

/// A store whose data keys an HSM wraps.
pub type Pkcs11Store = SealedStore<HsmKek>;

/// The longest allow-list `--pkcs11-modules` may give, and the longest path on it.
const MAX_MODULES: usize = 32;
const MAX_MODULE_PATH: usize = 4096;

/// The PKCS#11 modules the operator may load (`--pkcs11-modules`): whoever may write a
/// SecretStore chooses its `module`, so only the libraries the operator was started with
/// are ever loaded. Empty (the default): no pkcs11 store can be used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleAllowList(Vec<PathBuf>);

impl ModuleAllowList {
    /// The list from the flag's entries (comma-separated on the command line): each an
    /// absolute path of at most 4096 bytes, at most 32 of them; empty entries are skipped.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut modules: Vec<PathBuf> = vec![];
        for entry in entries.iter().map(|e| e.as_ref().trim()) {
            if entry.is_empty() {
                continue;
            }
            if entry.len() > MAX_MODULE_PATH {
                return Err(format!(
                    "--pkcs11-modules: a path is longer than {MAX_MODULE_PATH} bytes"
                ));
            }
            let path = PathBuf::from(entry);
            if !path.is_absolute() {
                return Err(format!(
                    "--pkcs11-modules: {entry:?} is not an absolute path"
                ));
            }
            if !modules.contains(&path) {
                modules.push(path);
            }
        }
        if modules.len() > MAX_MODULES {
            return Err(format!(
                "--pkcs11-modules: {} modules, at most {MAX_MODULES}",
                modules.len()
            ));
        }
        Ok(ModuleAllowList(modules))
    }

    /// The modules on the list.
    pub fn modules(&self) -> &[PathBuf] {
        &self.0
    }

    /// Whether a store may load `module`, and why not: the message names the module and
    /// the flag.
    pub fn check(&self, module: &str) -> Result<(), String> {
        if module.len() > MAX_MODULE_PATH {
            return Err(format!(
                "PKCS#11 module path longer than {MAX_MODULE_PATH} bytes; not loaded"
            ));
        }
        if self
            .0
            .iter()
            .any(|m| m.as_path() == std::path::Path::new(module))
        {
            return Ok(());
        }
        let allowed = if self.0.is_empty() {
            "the list is empty: no module is allowed".to_owned()
        } else {
            let names: Vec<_> = self.0.iter().map(|m| m.display().to_string()).collect();
            format!("allowed: {}", names.join(", "))
        };
        Err(format!(
            "PKCS#11 module {module} is not on the operator's allow-list \
             (--pkcs11-modules / KEYHAVEN_PKCS11_MODULES; {allowed}); it was not loaded"
        ))
    }
}

/// The pkcs11 store's key: the KEK on the token, and how moving records under it went.
pub struct HsmKek {
    kek: Arc<Pkcs11Kek>,
    /// Records whose re-wrap failed lately: tried after the others, so a damaged record
    /// does not hold back a rotation.
    failed_rewraps: Mutex<BTreeSet<String>>,
}

#[async_trait]
impl SealingKey for HsmKek {
    fn wrapper(&self) -> Arc<dyn KeyWrapper> {
        self.kek.clone()
    }

    /// Logs in with a freshly read PIN and finds (or creates) the KEK.
    async fn check(&self, store: &str) -> Result<String, BackendError> {
        self.kek
            .check()
            .await
            .map_err(|e| BackendError::from_hsm(store, e))
    }
}

/// What one step of a KEK rotation found and did.
#[derive(Debug)]
pub struct RotationStep {
    /// The rotation status to show (None: the store never rotated).
    pub status: Option<KekRotationStatus>,
    /// Whether data keys were re-wrapped in this step.
    pub progressed: bool,
}

impl Pkcs11Store {
    /// The store `store`, keeping its records in `operator_namespace`, its KEK on the
    /// token `spec` names. Nothing is loaded until first use; a module not on `modules` is
    /// refused here, so it is never loaded.
    pub fn new(
        store: &str,
        client: Client,
        operator_namespace: &str,
        spec: &Pkcs11Provider,
        modules: &ModuleAllowList,
    ) -> Result<Self, BackendError> {
        modules
            .check(&spec.module)
            .map_err(|message| BackendError::Invalid {
                store: store.to_owned(),
                message,
            })?;
        let selector = match (&spec.token_label, spec.slot_id) {
            (Some(label), None) => TokenSelector::Label(label.clone()),
            (None, Some(slot)) => TokenSelector::Slot(slot),
            _ => {
                return Err(BackendError::Invalid {
                    store: store.to_owned(),
                    message: "exactly one of tokenLabel and slotId must be set".into(),
                });
            }
        };
        let kek = Arc::new(Pkcs11Kek::new(
            client.clone(),
            kek::KekConfig {
                module: PathBuf::from(&spec.module),
                selector,
                label: spec.kek_label.clone(),
                sessions: spec.max_sessions.unwrap_or(DEFAULT_SESSIONS).max(1) as usize,
                pin: spec.pin_secret_ref.clone(),
                operator_namespace: operator_namespace.to_owned(),
            },
        ));
        let key = HsmKek {
            kek,
            failed_rewraps: Mutex::default(),
        };
        Ok(SealedStore::with_key(
            store,
            client,
            operator_namespace,
            key,
        ))
    }

    /// The label of the KEK new data keys are wrapped with.
    pub fn kek_label(&self) -> &str {
        self.key.kek.label()
    }

    /// The store's KEK as a key wrapper (benchmarks; tests).
    pub fn key_wrapper(&self) -> Arc<dyn KeyWrapper> {
        self.key.wrapper()
    }

    /// One step of moving every data key of the store under the current KEK: counts the
    /// records under other keys, re-wraps a small batch of them (each record is replaced
    /// in one update, so a crash loses nothing and a re-run skips what is done), and says
    /// what the rotation status is now. Call it until the status is `Complete`.
    pub async fn rotate(
        &self,
        previous_active: Option<&str>,
        previous: Option<&KekRotationStatus>,
    ) -> Result<RotationStep, BackendError> {
        let current = self.key.kek.label().to_owned();
        let mut pending = self.pending_rewraps().await?;
        let time = now();
        let before = plan_rotation(
            &current,
            previous_active,
            previous,
            &remaining(&pending),
            &time,
        );
        if pending.is_empty() {
            return Ok(RotationStep {
                status: before,
                progressed: false,
            });
        }

        let (moved, errors) = self.rewrap_batch(&mut pending).await;
        let mut after = plan_rotation(
            &current,
            previous_active,
            before.as_ref(),
            &remaining(&pending),
            &time,
        );
        if let (Some(status), Some(first)) = (after.as_mut(), errors.first()) {
            status.message = Some(format!(
                "{} data key(s) could not be re-wrapped yet, e.g. {first}",
                errors.len()
            ));
        }
        if moved > 0 {
            tracing::info!(store = %self.store, to = %current, moved, "re-wrapped data keys");
        }
        Ok(RotationStep {
            progressed: errors.is_empty() || moved > 0,
            status: after,
        })
    }

    /// The records whose data key another KEK wraps, by that KEK's label.
    async fn pending_rewraps(&self) -> Result<Pending, BackendError> {
        let mut pending = Pending::new();
        for record in self.records.census().await? {
            if record.kek_id != self.key.kek.kek_id() {
                let label = kek_label(&record.kek_id).unwrap_or(&record.kek_id);
                pending
                    .entry(label.to_owned())
                    .or_default()
                    .push(record.name);
            }
        }
        Ok(pending)
    }

    /// Re-wraps a batch of the `pending` records (those whose re-wrap failed lately last)
    /// and crosses off what is done. Returns how many moved, and the failures.
    async fn rewrap_batch(&self, pending: &mut Pending) -> (usize, Vec<BackendError>) {
        let batch: Vec<(String, String)> = {
            let failed = self.key.failed_rewraps.lock().expect("failed rewraps");
            let mut all: Vec<(String, String)> = pending
                .iter()
                .flat_map(|(l, names)| names.iter().map(move |n| (l.clone(), n.clone())))
                .collect();
            all.sort_by_key(|(_, name)| failed.contains(name));
            all.truncate(REWRAP_BATCH);
            all
        };
        let results: Vec<_> = futures::stream::iter(batch)
            .map(|(label, name)| async move {
                let result = self.records.rewrap(&name).await;
                (label, name, result)
            })
            .buffer_unordered(REWRAP_PARALLEL)
            .collect()
            .await;
        let mut errors = vec![];
        let mut moved = 0;
        for (label, name, result) in results {
            let mut failed = self.key.failed_rewraps.lock().expect("failed rewraps");
            match result {
                Ok(outcome) => {
                    failed.remove(&name);
                    if outcome == Rewrapped::Moved {
                        moved += 1;
                    }
                    if let Some(names) = pending.get_mut(&label) {
                        names.retain(|n| *n != name);
                    }
                }
                Err(e) => {
                    failed.insert(name);
                    errors.push(e);
                }
            }
        }
        (moved, errors)
    }
}

/// Records (Secret names) left to re-wrap, by the label of the KEK that wraps them.
type Pending = BTreeMap<String, Vec<String>>;

/// How many records each other KEK still wraps, for the rotation status.
fn remaining(pending: &Pending) -> BTreeMap<String, u64> {
    pending
        .iter()
        .map(|(l, names)| (l.clone(), names.len() as u64))
        .filter(|(_, n)| *n > 0)
        .collect()
}

impl RotationStep {
    /// Whether data keys are left to re-wrap.
    pub fn rotating(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.phase == KekRotationPhase::Rotating)
    }
}

impl BackendError {
    fn from_hsm(store: &str, e: token::HsmError) -> Self {
        let store = store.to_owned();
        let message = e.to_string();
        match e.phase() {
            crate::api::StorePhase::Sealed => BackendError::Sealed { store, message },
            crate::api::StorePhase::Invalid => BackendError::Invalid { store, message },
            _ => BackendError::Unreachable { store, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

    #[test]
    fn the_allow_list_takes_absolute_paths_and_skips_empty_entries() {
        let none = ModuleAllowList::parse::<&str>(&[]).unwrap();
        assert!(none.modules().is_empty());
        assert_eq!(ModuleAllowList::parse(&["", " "]).unwrap(), none);
        let list =
            ModuleAllowList::parse(&[SOFTHSM, "", "/opt/luna/libCryptoki2.so", SOFTHSM]).unwrap();
        assert_eq!(
            list.modules(),
            [
                PathBuf::from(SOFTHSM),
                PathBuf::from("/opt/luna/libCryptoki2.so")
            ]
        );
        let relative = ModuleAllowList::parse(&["libsofthsm2.so"]).unwrap_err();
        assert!(
            relative.contains("\"libsofthsm2.so\" is not an absolute path"),
            "{relative}"
        );
        let long = format!("/{}", "x".repeat(MAX_MODULE_PATH));
        assert!(ModuleAllowList::parse(&[long]).is_err());
        let many: Vec<String> = (0..=MAX_MODULES).map(|i| format!("/lib/m{i}.so")).collect();
        assert!(ModuleAllowList::parse(&many).is_err());
        let most: Vec<String> = (0..MAX_MODULES).map(|i| format!("/lib/m{i}.so")).collect();
        assert_eq!(
            ModuleAllowList::parse(&most).unwrap().modules().len(),
            MAX_MODULES
        );
    }

    #[test]
    fn only_modules_on_the_list_may_be_loaded() {
        let list = ModuleAllowList::parse(&[SOFTHSM]).unwrap();
        assert_eq!(list.check(SOFTHSM), Ok(()));
        assert_eq!(list.check("/usr/lib/softhsm//libsofthsm2.so"), Ok(()));
        for other in [
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/softhsm/../softhsm/libsofthsm2.so",
            "/tmp/keyhaven-ca-0123.pem",
        ] {
            let refused = list.check(other).unwrap_err();
            assert!(refused.contains(other), "{refused}");
            assert!(refused.contains("--pkcs11-modules"), "{refused}");
            assert!(refused.contains(SOFTHSM), "{refused}");
        }
        let empty = ModuleAllowList::default().check(SOFTHSM).unwrap_err();
        assert!(empty.contains("no module is allowed"), "{empty}");
        let long = format!("/{}", "x".repeat(MAX_MODULE_PATH));
        assert!(!list.check(&long).unwrap_err().contains(&long));
    }

    #[tokio::test]
    async fn a_store_naming_a_module_off_the_list_is_invalid_and_loads_nothing() {
        crate::install_crypto_provider();
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let module = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let spec: Pkcs11Provider = serde_json::from_value(serde_json::json!({
            "module": module, "tokenLabel": "keyhaven", "kekLabel": "kek",
            "pinSecretRef": {"name": "pin", "key": "pin"},
        }))
        .unwrap();
        let allowed = ModuleAllowList::parse(&[SOFTHSM]).unwrap();
        let Err(e) = Pkcs11Store::new("hsm", client, "keyhaven-system", &spec, &allowed) else {
            panic!("a module off the list was accepted");
        };
        assert_eq!(e.phase(), crate::api::StorePhase::Invalid);
        let text = e.to_string();
        assert!(text.starts_with("store hsm is misconfigured: PKCS#11 module /usr/lib/x86_64-linux-gnu/libc.so.6 is not on"), "{text}");
        assert!(!token::is_loaded(std::path::Path::new(module)));
    }
}
