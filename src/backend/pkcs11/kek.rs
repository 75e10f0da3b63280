//! The HSM-held key-encryption key: a [`KeyWrapper`] whose AES-256 key never leaves the
//! token.
//!
//! # Why AES-GCM on the token, not `CKM_AES_KEY_WRAP_PAD`
//!
//! SoftHSM2 supports both. Key wrap with padding (RFC 5649) would mean importing each data
//! key as an extractable, non-sensitive key object (`C_CreateObject`), `C_WrapKey`, and on
//! the way back `C_UnwrapKey` into an extractable object, `C_GetAttributeValue(CKA_VALUE)`
//! and `C_DestroyObject`: four or five calls per operation, transient key objects on the
//! token (left behind by a crash between calls), and an HSM policy that must allow
//! unwrapping into extractable, non-sensitive keys — which FIPS-mode HSMs and
//! `CKA_UNWRAP_TEMPLATE` policies commonly forbid. Key wrap also has no associated data.
//!
//! `C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM` takes one call each way, creates no
//! objects, and authenticates the same associated data as the data layer (store, path,
//! version), so a wrapped key copied to another record is refused by the HSM itself
//! before any data key is released. The wrapped key has the software KEK's layout
//! (`nonce ‖ ciphertext ‖ tag`, 60 bytes), so [`SealedRecords`] treats both alike.
//! The 96-bit nonce is random: NIST SP 800-38D allows 2^32 random-nonce encryptions
//! per key, and a KEK rotation starts a new key long before that. The associated data is
//! never empty (SoftHSM2 2.6 crashes on GCM with empty AAD, SoftHSMv2#605).
//!
//! [`SealedRecords`]: crate::backend::sealed_records::SealedRecords

use super::token::{Call, HsmError, Pin, PinDigest, Token, TokenSelector, token};
use crate::api::SecretKeyRef;
use crate::crypto::{CryptoError, DataKey, KeyWrapper};
use async_trait::async_trait;
use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::SessionState;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Object handles of keys by label, with the login epoch they were found in.
type KekHandles = Mutex<HashMap<String, (u64, Vec<ObjectHandle>)>>;

/// The prefix of the KEK ids this wrapper writes: `pkcs11:<label>`.
const KEK_ID_PREFIX: &str = "pkcs11:";
const NONCE_LEN: usize = 12;
const TAG_BITS: u64 = 128;
/// A PIN read from its Secret is used this long before it is read again, so a changed
/// PIN takes effect within this delay without a Secret read per operation.
const PIN_TTL: Duration = Duration::from_secs(10);

/// The KEK id of the key labelled `label`.
pub fn kek_id(label: &str) -> String {
    format!("{KEK_ID_PREFIX}{label}")
}

/// The label of the key a KEK id names, if this wrapper wrote the id.
pub fn kek_label(kek_id: &str) -> Option<&str> {
    kek_id.strip_prefix(KEK_ID_PREFIX)
}

/// Where the store's KEK lives and how to log in.
pub(super) struct KekConfig {
    pub module: PathBuf,
    pub selector: TokenSelector,
    pub label: String,
    pub sessions: usize,
    pub pin: SecretKeyRef,
    pub operator_namespace: String,
}

/// A store's view of its token: the current KEK by label, the keys it rotated away from
/// (found by the label in each envelope's KEK id), the PIN.
pub struct Pkcs11Kek {
    module: PathBuf,
    selector: TokenSelector,
    label: String,
    id: String,
    sessions: usize,
    pin: PinSource,
    /// Resolved on first use; forgotten when the token goes away.
    token: Mutex<Option<Arc<Token>>>,
    /// Handles of the keys by label, valid for one login epoch of the token.
    handles: Arc<KekHandles>,
    /// The PIN the token refused: not tried again until the Secret holds another, so a
    /// wrong PIN cannot lock the token (HSMs lock a user PIN after a few failures).
    refused: Mutex<Option<PinDigest>>,
}

impl Pkcs11Kek {
    pub(super) fn new(client: Client, config: KekConfig) -> Self {
        let namespace = config
            .pin
            .namespace
            .clone()
            .unwrap_or(config.operator_namespace);
        Pkcs11Kek {
            id: kek_id(&config.label),
            module: config.module,
            selector: config.selector,
            label: config.label,
            sessions: config.sessions,
            pin: PinSource {
                api: Api::namespaced(client, &namespace),
                describe: format!("{namespace}/{} key {}", config.pin.name, config.pin.key),
                reference: config.pin,
                cached: tokio::sync::Mutex::default(),
            },
            token: Mutex::default(),
            handles: Arc::default(),
            refused: Mutex::default(),
        }
    }

    /// The label of the current KEK.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Logs in with a freshly read PIN (a changed PIN is verified), checks on the token
    /// that the session is logged in, and looks the current KEK up afresh, creating it when
    /// no key has its label. Returns a description of the token and key for the status.
    pub(super) async fn check(&self) -> Result<String, HsmError> {
        let label = self.label.clone();
        let handles = self.handles.clone();
        let (token, count) = self
            .call(true, move |token, call| {
                let info = call
                    .session
                    .get_session_info()
                    .map_err(|e| token.call_error(e))?;
                if !matches!(
                    info.session_state(),
                    SessionState::RwUser | SessionState::RoUser
                ) {
                    // The token forgot the login (all sessions closed, token reset):
                    // log in again and retry.
                    return Err(token.call_error(CkError::Pkcs11(
                        RvError::UserNotLoggedIn,
                        Function::GetSessionInfo,
                    )));
                }
                handles.lock().expect("kek handles").remove(&label);
                let found = kek_handles(token, call, &handles, &label, true)?;
                Ok(found.len())
            })
            .await?;
        let duplicates = if count > 1 {
            format!(" ({count} keys share this label: the one with the lowest CKA_ID wraps)")
        } else {
            String::new()
        };
        Ok(format!(
            "{}: logged in; key-encryption key {:?} is a sensitive, non-extractable AES-256 key{duplicates}",
            token.name, self.label
        ))
    }

    /// Runs `f` on a logged-in session of the token. `fresh_pin` re-reads the PIN Secret.
    async fn call<T, F>(&self, fresh_pin: bool, f: F) -> Result<(Arc<Token>, T), HsmError>
    where
        T: Send + 'static,
        F: FnMut(&Token, &Call<'_>) -> Result<T, HsmError> + Send + 'static,
    {
        let pin = self.pin.get(fresh_pin).await?;
        if *self.refused.lock().expect("refused pin") == Some(pin.digest()) {
            return Err(HsmError::PinRefused {
                token: self.selector.to_string(),
                secret: self.pin.describe.clone(),
                reason: "refused before".into(),
            });
        }
        let token = self.token().await?;
        let digest = pin.digest();
        let t = token.clone();
        let mut f = f;
        let result = token
            .run(pin, self.pin.describe.clone(), move |call| f(&t, call))
            .await;
        match &result {
            Err(HsmError::PinRefused { .. }) => {
                *self.refused.lock().expect("refused pin") = Some(digest);
            }
            Err(e) if e.phase() == crate::api::StorePhase::Sealed => {
                // The token may have moved to another slot: find it again next time.
                *self.token.lock().expect("pkcs11 token") = None;
            }
            _ => {}
        }
        result.map(|v| (token, v))
    }

    async fn token(&self) -> Result<Arc<Token>, HsmError> {
        if let Some(t) = self.token.lock().expect("pkcs11 token").clone() {
            return Ok(t);
        }
        let (module, selector, sessions) =
            (self.module.clone(), self.selector.clone(), self.sessions);
        let token = tokio::task::spawn_blocking(move || {
            let token = token(&module, &selector)?;
            token.reserve(sessions);
            Ok::<_, HsmError>(token)
        })
        .await
        .map_err(|e| HsmError::Worker(e.to_string()))??;
        *self.token.lock().expect("pkcs11 token") = Some(token.clone());
        Ok(token)
    }

    fn unavailable(&self, e: HsmError) -> CryptoError {
        CryptoError::KekUnavailable(e.to_string())
    }
}

#[async_trait]
impl KeyWrapper for Pkcs11Kek {
    fn kek_id(&self) -> &str {
        &self.id
    }

    async fn wrap(&self, key: &DataKey, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if aad.is_empty() {
            return Err(CryptoError::Wrap("associated data is required".into()));
        }
        let key = Zeroizing::new(*key.as_bytes());
        let aad = aad.to_vec();
        let label = self.label.clone();
        let handles = self.handles.clone();
        let (_, wrapped) = self
            .call(false, move |token, call| {
                let kek = kek_handles(token, call, &handles, &label, true)?[0];
                let mut nonce = [0u8; NONCE_LEN];
                rand::fill(&mut nonce[..]);
                let mut iv = nonce;
                let gcm = GcmParams::new(&mut iv, &aad, TAG_BITS.into())
                    .map_err(|e| token.call_error(e))?;
                let sealed = call
                    .session
                    .encrypt(&Mechanism::AesGcm(gcm), kek, &key[..])
                    .map_err(|e| token.call_error(e))?;
                let mut out = nonce.to_vec();
                out.extend_from_slice(&sealed);
                Ok(out)
            })
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(wrapped)
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<DataKey, CryptoError> {
        let id = self.id.clone();
        self.unwrap_with(&id, wrapped, aad).await
    }

    /// Unwraps under the key the envelope names, current or rotated-out: records
    /// mid-rotation stay readable.
    async fn unwrap_with(
        &self,
        kek_id: &str,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<DataKey, CryptoError> {
        let Some(label) = kek_label(kek_id) else {
            return Err(CryptoError::WrongKek {
                expected: self.id.clone(),
                found: kek_id.to_owned(),
            });
        };
        if wrapped.len() <= NONCE_LEN || aad.is_empty() {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let (nonce, sealed, aad) = (nonce.to_vec(), sealed.to_vec(), aad.to_vec());
        let label = label.to_owned();
        let handles = self.handles.clone();
        let (_, key) = self
            .call(false, move |token, call| {
                // Never created here: a data key claims to be wrapped by this key, so a
                // missing one is lost (Sealed), not made anew.
                for kek in kek_handles(token, call, &handles, &label, false)? {
                    let mut iv: [u8; NONCE_LEN] = nonce.as_slice().try_into().expect("length");
                    let gcm = GcmParams::new(&mut iv, &aad, TAG_BITS.into())
                        .map_err(|e| token.call_error(e))?;
                    match call.session.decrypt(&Mechanism::AesGcm(gcm), kek, &sealed) {
                        Ok(key) => return Ok(Some(Zeroizing::new(key))),
                        Err(e) if is_authentication_failure(call, &e) => continue,
                        Err(e) => return Err(token.call_error(e)),
                    }
                }
                Ok(None)
            })
            .await
            .map_err(|e| self.unavailable(e))?;
        match key {
            Some(key) => DataKey::from_bytes(&key),
            None => Err(CryptoError::Decrypt),
        }
    }
}

/// Whether a failed `C_Decrypt` means the tag did not verify (altered, misplaced, or
/// another key), as opposed to a session or device failure. SoftHSM2 reports a bad tag as
/// `CKR_GENERAL_ERROR`, so that one counts as a bad tag only while the session still works.
fn is_authentication_failure(call: &Call<'_>, e: &CkError) -> bool {
    match e {
        CkError::Pkcs11(RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange, _) => true,
        CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _) => {
            call.session.get_session_info().is_ok()
        }
        _ => false,
    }
}

/// The handles of the keys labelled `label`, lowest CKA_ID first, from the cache when it
/// is of the token's current login epoch. With `create`, a missing key is generated.
fn kek_handles(
    token: &Token,
    call: &Call<'_>,
    cache: &KekHandles,
    label: &str,
    create: bool,
) -> Result<Vec<ObjectHandle>, HsmError> {
    if let Some((epoch, handles)) = cache.lock().expect("kek handles").get(label)
        && *epoch == call.epoch
    {
        return Ok(handles.clone());
    }
    let mut found = find_keks(token, call, label)?;
    if found.is_empty() && create {
        // Serialised within the process; see `find_keks` for two processes racing.
        let _creating = token.create.lock().expect("kek creation lock");
        found = find_keks(token, call, label)?;
        if found.is_empty() {
            found = vec![create_kek(token, call, label)?];
            tracing::info!(token = %token.name, label, "created the key-encryption key");
        }
    }
    if found.is_empty() {
        return Err(HsmError::KekMissing {
            token: token.name.clone(),
            label: label.to_owned(),
        });
    }
    cache
        .lock()
        .expect("kek handles")
        .insert(label.to_owned(), (call.epoch, found.clone()));
    Ok(found)
}

/// Every usable key labelled `label`, lowest CKA_ID first. Two operator processes that
/// both found no key may each create one; both then wrap with the same one (the lowest
/// id), and unwrapping tries each, so what either wrapped meanwhile stays readable.
fn find_keks(token: &Token, call: &Call<'_>, label: &str) -> Result<Vec<ObjectHandle>, HsmError> {
    let err = |e| token.call_error(e);
    let handles = call
        .session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(err)?;
    let mut keys = vec![];
    for handle in handles {
        let attrs = call
            .session
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Id,
                ],
            )
            .map_err(err)?;
        let problem = kek_problem(&attrs);
        if let Some(problem) = problem {
            return Err(HsmError::KekUnusable {
                token: token.name.clone(),
                label: label.to_owned(),
                problem: problem.into(),
            });
        }
        let id = attrs
            .iter()
            .find_map(|a| match a {
                Attribute::Id(id) => Some(id.clone()),
                _ => None,
            })
            .unwrap_or_default();
        keys.push((id, handle));
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys.into_iter().map(|(_, h)| h).collect())
}

/// Why a key with these attributes may not be a KEK, if it may not.
fn kek_problem(attrs: &[Attribute]) -> Option<&'static str> {
    let flag = |want: AttributeType| {
        attrs.iter().any(|a| {
            a.attribute_type() == want
                && matches!(
                    a,
                    Attribute::Sensitive(b) | Attribute::Extractable(b) | Attribute::Encrypt(b) | Attribute::Decrypt(b)
                    if *b
                )
        })
    };
    let key_type = attrs.iter().find_map(|a| match a {
        Attribute::KeyType(t) => Some(*t),
        _ => None,
    });
    let len = attrs.iter().find_map(|a| match a {
        Attribute::ValueLen(l) => Some(u64::from(*l)),
        _ => None,
    });
    if key_type != Some(KeyType::AES) || len != Some(32) {
        Some("it is not an AES-256 key")
    } else if !flag(AttributeType::Sensitive) || flag(AttributeType::Extractable) {
        Some("it is extractable or not sensitive, so its value could leave the token")
    } else if !flag(AttributeType::Encrypt) || !flag(AttributeType::Decrypt) {
        Some("it does not allow CKA_ENCRYPT and CKA_DECRYPT (AES-GCM wrapping)")
    } else {
        None
    }
}

/// Generates the KEK on the token: a token object, private, sensitive, never
/// extractable, usable only to encrypt and decrypt (it cannot wrap or be wrapped out).
fn create_kek(token: &Token, call: &Call<'_>, label: &str) -> Result<ObjectHandle, HsmError> {
    let mut id = vec![0u8; 16];
    rand::fill(&mut id[..]);
    call.session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id),
            ],
        )
        .map_err(|e| token.call_error(e))
}

/// The PIN, from its Secret, cached for [`PIN_TTL`].
struct PinSource {
    api: Api<Secret>,
    reference: SecretKeyRef,
    /// `namespace/name key k`, for messages.
    describe: String,
    cached: tokio::sync::Mutex<Option<(Instant, Pin)>>,
}

impl PinSource {
    async fn get(&self, fresh: bool) -> Result<Pin, HsmError> {
        let mut cached = self.cached.lock().await;
        if !fresh
            && let Some((at, pin)) = cached.as_ref()
            && at.elapsed() < PIN_TTL
        {
            return Ok(pin.clone());
        }
        let failed = |message: String| HsmError::PinSecret {
            secret: self.describe.clone(),
            message,
        };
        let secret = self
            .api
            .get_opt(&self.reference.name)
            .await
            .map_err(|e| failed(e.to_string()))?
            .ok_or_else(|| failed("not found".into()))?;
        let bytes = secret
            .data
            .and_then(|mut d| d.remove(&self.reference.key))
            .ok_or_else(|| failed("no such key".into()))?;
        let text = Zeroizing::new(
            String::from_utf8(bytes.0).map_err(|_| failed("the PIN is not UTF-8 text".into()))?,
        );
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(failed("the PIN is empty".into()));
        }
        let pin = Pin::new(Zeroizing::new(trimmed.to_owned()));
        *cached = Some((Instant::now(), pin.clone()));
        Ok(pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_ids_name_the_label() {
        assert_eq!(kek_id("prod-kek-2"), "pkcs11:prod-kek-2");
        assert_eq!(kek_label("pkcs11:prod-kek-2"), Some("prod-kek-2"));
        assert_eq!(kek_label("sw-0123456789abcdef"), None);
    }

    #[test]
    fn only_sensitive_non_extractable_aes_256_keys_are_keks() {
        let good = vec![
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ];
        assert_eq!(kek_problem(&good), None);
        let with = |i: usize, a: Attribute| {
            let mut v = good.clone();
            v[i] = a;
            v
        };
        assert!(kek_problem(&with(0, Attribute::KeyType(KeyType::DES3))).is_some());
        assert!(kek_problem(&with(1, Attribute::ValueLen(16.into()))).is_some());
        assert!(
            kek_problem(&with(2, Attribute::Sensitive(false)))
                .unwrap()
                .contains("extractable")
        );
        assert!(kek_problem(&with(3, Attribute::Extractable(true))).is_some());
        assert!(kek_problem(&with(5, Attribute::Decrypt(false))).is_some());
        // A token that hides an attribute does not get the benefit of the doubt.
        assert!(kek_problem(&good[..5]).is_some());
    }
}
