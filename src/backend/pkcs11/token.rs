//! PKCS#11 plumbing: one initialised module per path per process, one shared [`Token`]
//! per (module, slot) with its login state and a bounded pool of logged-in sessions, and
//! [`Token::run`], which runs PKCS#11 calls on tokio's blocking threads.
//!
//! Login is per application and token in PKCS#11, not per session: one `C_Login` logs in
//! every session this process has on the token, and `C_Logout` logs them all out. So the
//! login state lives with the token, shared by every store that uses it, behind a
//! read-write lock: calls hold it shared, a (re-)login holds it exclusively, and no call
//! is ever in flight while the token is logged out under it.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// A token user PIN. Never printed; wiped on drop.
#[derive(Clone)]
pub(super) struct Pin {
    text: Zeroizing<String>,
    digest: PinDigest,
}

/// Identifies a PIN without holding it: compared to tell a changed PIN from the one in use.
pub(super) type PinDigest = [u8; 32];

impl Pin {
    pub(super) fn new(text: Zeroizing<String>) -> Self {
        let digest = Sha256::new()
            .chain_update(b"keyhaven pkcs11 pin\0")
            .chain_update(text.as_bytes())
            .finalize()
            .into();
        Pin { text, digest }
    }

    pub(super) fn digest(&self) -> PinDigest {
        self.digest
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// How a token is found in its module.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum TokenSelector {
    Label(String),
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token {l:?}"),
            TokenSelector::Slot(s) => write!(f, "the token in slot {s}"),
        }
    }
}

/// A PKCS#11 failure. Says what failed and where; never carries a PIN or key material.
#[derive(Debug, thiserror::Error)]
pub(super) enum HsmError {
    #[error("PKCS#11 module {module} cannot be loaded: {message}")]
    Module { module: String, message: String },
    #[error("PKCS#11 module {module} has no {selector}")]
    NoToken {
        module: String,
        selector: TokenSelector,
    },
    #[error("PKCS#11 module {module} has {count} tokens labelled {label:?}: set slotId")]
    AmbiguousToken {
        module: String,
        label: String,
        count: usize,
    },
    #[error(
        "{token} refused the PIN from Secret {secret} ({reason}); keyhaven does not try it again until that Secret changes"
    )]
    PinRefused {
        token: String,
        secret: String,
        reason: String,
    },
    #[error("PIN Secret {secret}: {message}")]
    PinSecret { secret: String, message: String },
    #[error("{token} has no key-encryption key labelled {label:?}")]
    KekMissing { token: String, label: String },
    #[error("{token}: the key labelled {label:?} cannot be a key-encryption key: {problem}")]
    KekUnusable {
        token: String,
        label: String,
        problem: String,
    },
    #[error("{token}: {call}")]
    Call { token: String, call: CallError },
    #[error("a PKCS#11 worker thread failed: {0}")]
    Worker(String),
}

impl HsmError {
    /// The store phase this failure puts a store in.
    pub(super) fn phase(&self) -> crate::api::StorePhase {
        use crate::api::StorePhase;
        match self {
            HsmError::Module { .. }
            | HsmError::NoToken { .. }
            | HsmError::PinRefused { .. }
            | HsmError::KekMissing { .. } => StorePhase::Sealed,
            HsmError::AmbiguousToken { .. }
            | HsmError::PinSecret { .. }
            | HsmError::KekUnusable { .. } => StorePhase::Invalid,
            HsmError::Call { call, .. } if call.token_gone() => StorePhase::Sealed,
            HsmError::Call { .. } | HsmError::Worker(_) => StorePhase::Unreachable,
        }
    }
}

/// A failed PKCS#11 call, shown as `C_Function: ReturnValue`.
#[derive(Debug)]
pub(super) struct CallError(pub(super) CkError);

impl CallError {
    pub(super) fn rv(&self) -> Option<RvError> {
        match self.0 {
            CkError::Pkcs11(rv, _) => Some(rv),
            _ => None,
        }
    }

    /// The token went away (removed, or the slot changed).
    fn token_gone(&self) -> bool {
        matches!(
            self.rv(),
            Some(
                RvError::TokenNotPresent
                    | RvError::TokenNotRecognized
                    | RvError::DeviceRemoved
                    | RvError::SlotIdInvalid
            )
        )
    }

    /// The session is no longer usable: it is closed rather than pooled.
    fn session_broken(&self) -> bool {
        self.token_gone()
            || matches!(
                self.rv(),
                Some(
                    RvError::SessionHandleInvalid
                        | RvError::SessionClosed
                        | RvError::DeviceError
                        | RvError::GeneralError
                        | RvError::CryptokiNotInitialized
                        | RvError::UserNotLoggedIn
                )
            )
    }

    /// Worth one more try after a fresh login and fresh object handles.
    fn retry_after_relogin(&self) -> bool {
        matches!(
            self.rv(),
            Some(
                RvError::UserNotLoggedIn
                    | RvError::ObjectHandleInvalid
                    | RvError::KeyHandleInvalid
                    | RvError::SessionHandleInvalid
                    | RvError::SessionClosed
            )
        )
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            CkError::Pkcs11(rv, function) => write!(f, "C_{function:?}: {rv:?}"),
            other => write!(f, "{other}"),
        }
    }
}

impl From<CkError> for CallError {
    fn from(e: CkError) -> Self {
        CallError(e)
    }
}

/// The initialised module at `path`, loaded and `C_Initialize`d on first use. Finalised
/// only by [`reinitialize`], while none of its tokens is in use: `C_Finalize` would close
/// the sessions of every store using it.
/// Blocking (dlopen, C_Initialize): call it on a blocking thread.
static MODULES: LazyLock<Mutex<HashMap<PathBuf, Pkcs11>>> = LazyLock::new(Default::default);

fn module(path: &Path) -> Result<Pkcs11, HsmError> {
    let mut modules = MODULES.lock().expect("pkcs11 module registry");
    if let Some(m) = modules.get(path) {
        return Ok(m.clone());
    }
    let failed = |message: String| HsmError::Module {
        module: path.display().to_string(),
        message,
    };
    let pkcs11 = Pkcs11::new(path).map_err(|e| failed(e.to_string()))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another user of the module in this process initialised it: share it.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(failed(CallError(e).to_string())),
    }
    modules.insert(path.to_owned(), pkcs11.clone());
    Ok(pkcs11)
}

/// Whether this process loaded the module at `path`.
#[cfg(test)]
pub(super) fn is_loaded(path: &Path) -> bool {
    MODULES
        .lock()
        .expect("pkcs11 module registry")
        .contains_key(path)
}

/// Tokens by module and slot id.
type Tokens = Mutex<HashMap<(PathBuf, u64), Arc<Token>>>;
static TOKENS: LazyLock<Tokens> = LazyLock::new(Default::default);

/// The token `selector` names in the module at `path`, shared by every store using it.
/// Blocking: call it on a blocking thread.
///
/// A module may list its tokens once, at `C_Initialize` (SoftHSM2 reads its token
/// directory then, and skips a token whose files another process is writing at that
/// moment). So when the token is not found and no store of this process uses the module
/// yet, the module is finalised, initialised again and asked once more before the token
/// is reported missing.
pub(super) fn token(path: &Path, selector: &TokenSelector) -> Result<Arc<Token>, HsmError> {
    // One lookup at a time: a lookup may finalise the module under another.
    static LOOKUP: Mutex<()> = Mutex::new(());
    let _lookup = LOOKUP.lock().expect("pkcs11 token lookup");
    match find_token(path, selector) {
        Err(HsmError::NoToken { .. }) if reinitialize(path) => find_token(path, selector),
        found => found,
    }
}

/// Finalises the module at `path` so that its next use initialises it again, unless a
/// token of it is in use (finalising would close that token's sessions). Says whether it
/// did.
///
/// A token this process used that the module no longer lists (SoftHSM2 after its token
/// directory went away; an HSM that was reset) is not in use any more: its sessions are
/// dead. It is forgotten, so that a token that comes back is found by initialising the
/// module again (the fault suite found the store Sealed for good once its token had been
/// away). Its idle sessions are leaked, not closed: after `C_Finalize` their handles may
/// name the new sessions of the re-initialised module.
fn reinitialize(path: &Path) -> bool {
    let mut tokens = TOKENS.lock().expect("pkcs11 token registry");
    let mut modules = MODULES.lock().expect("pkcs11 module registry");
    let Some(pkcs11) = modules.get(path) else {
        return false;
    };
    let listed: Vec<u64> = match pkcs11.get_slots_with_token() {
        Ok(slots) => slots.iter().map(|s| s.id()).collect(),
        Err(_) => vec![],
    };
    tokens.retain(|(module, slot), token| {
        // SoftHSM2 keeps listing the slot of a token whose directory went away, and fails
        // C_GetTokenInfo on it.
        let keep =
            module != path || (listed.contains(slot) && pkcs11.get_token_info(token.slot).is_ok());
        if !keep {
            let idle = std::mem::take(&mut *token.idle.lock().unwrap_or_else(|p| p.into_inner()));
            std::mem::forget(idle);
        }
        keep
    });
    if tokens.keys().any(|(module, _)| module == path) {
        return false;
    }
    match modules.remove(path) {
        Some(pkcs11) => {
            if let Err(e) = pkcs11.finalize() {
                tracing::debug!(module = %path.display(), error = %CallError(e), "C_Finalize");
            }
            true
        }
        None => false,
    }
}

fn find_token(path: &Path, selector: &TokenSelector) -> Result<Arc<Token>, HsmError> {
    let pkcs11 = module(path)?;
    let call = |e: CkError| HsmError::Call {
        token: format!("PKCS#11 module {}", path.display()),
        call: CallError(e),
    };
    let no_token = || HsmError::NoToken {
        module: path.display().to_string(),
        selector: selector.clone(),
    };
    let slots = pkcs11.get_slots_with_token().map_err(call)?;
    let (slot, label) = match selector {
        TokenSelector::Slot(id) => {
            let slot = slots
                .into_iter()
                .find(|s| s.id() == *id)
                .ok_or_else(no_token)?;
            let info = pkcs11.get_token_info(slot).map_err(call)?;
            (slot, info.label().trim_end().to_owned())
        }
        TokenSelector::Label(label) => {
            let mut found = vec![];
            for slot in slots {
                // A slot whose token vanished meanwhile is simply not a match.
                if let Ok(info) = pkcs11.get_token_info(slot)
                    && info.label().trim_end() == label
                {
                    found.push(slot);
                }
            }
            match found[..] {
                [] => return Err(no_token()),
                [slot] => (slot, label.clone()),
                _ => {
                    return Err(HsmError::AmbiguousToken {
                        module: path.display().to_string(),
                        label: label.clone(),
                        count: found.len(),
                    });
                }
            }
        }
    };
    let mut tokens = TOKENS.lock().expect("pkcs11 token registry");
    let token = tokens
        .entry((path.to_owned(), slot.id()))
        .or_insert_with(|| {
            Arc::new(Token {
                pkcs11,
                slot,
                name: format!("token {label:?} (slot {})", slot.id()),
                login: RwLock::new(Login::default()),
                idle: Mutex::default(),
                permits: Arc::new(Semaphore::new(0)),
                capacity: Mutex::new(0),
                create: Mutex::default(),
            })
        });
    Ok(token.clone())
}

/// A token as this process uses it.
pub(super) struct Token {
    pkcs11: Pkcs11,
    slot: Slot,
    /// `token "label" (slot N)`, for messages.
    pub(super) name: String,
    login: RwLock<Login>,
    /// Open, logged-in sessions not in use.
    idle: Mutex<Vec<Session>>,
    /// One permit per session that may be in use at once.
    permits: Arc<Semaphore>,
    capacity: Mutex<usize>,
    /// Held while a key is looked up and created, so two stores of this process never
    /// create two keys with one label.
    pub(super) create: Mutex<()>,
}

/// Who this process is logged in as on a token.
#[derive(Default)]
struct Login {
    /// The PIN this process logged in with, if it is logged in.
    pin: Option<PinDigest>,
    /// Bumped on every login and logout: object handles found under an older epoch may
    /// be stale (a logout invalidates the handles of private objects).
    epoch: u64,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// What a call on a session may use: the session and the epoch of the object handles.
pub(super) struct Call<'a> {
    pub(super) session: &'a Session,
    pub(super) epoch: u64,
}

impl Token {
    /// Lets up to `sessions` sessions be used at once (the largest request wins).
    pub(super) fn reserve(&self, sessions: usize) {
        let mut capacity = self.capacity.lock().expect("pkcs11 capacity");
        if sessions > *capacity {
            self.permits.add_permits(sessions - *capacity);
            *capacity = sessions;
        }
    }

    /// Runs `f` with a logged-in session of the pool, on a blocking thread, once a session
    /// is free. Logs in with `pin` first when this process is not logged in with it; a
    /// session that broke is closed, and `f` is retried once after a fresh login when the
    /// failure says the login or the object handles went stale.
    pub(super) async fn run<T, F>(
        self: &Arc<Self>,
        pin: Pin,
        secret: String,
        f: F,
    ) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnMut(&Call<'_>) -> Result<T, HsmError> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| HsmError::Worker(e.to_string()))?;
        let token = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            token.run_blocking(&pin, &secret, f)
        })
        .await
        .map_err(|e| HsmError::Worker(e.to_string()))?
    }

    fn run_blocking<T, F>(&self, pin: &Pin, secret: &str, mut f: F) -> Result<T, HsmError>
    where
        F: FnMut(&Call<'_>) -> Result<T, HsmError>,
    {
        let mut retried = false;
        let mut contended = 0;
        loop {
            self.login(pin, secret)?;
            let login = self.login.read().expect("pkcs11 login lock");
            if login.pin != Some(pin.digest()) {
                // Another store logged in with another PIN in between: log in again.
                drop(login);
                contended += 1;
                if contended > 3 {
                    return Err(HsmError::Worker(format!(
                        "{}: stores using different PINs keep logging each other out",
                        self.name
                    )));
                }
                continue;
            }
            let session = self.session()?;
            let result = f(&Call {
                session: &session,
                epoch: login.epoch,
            });
            drop(login);
            let (broken, retry, logged_out) = match &result {
                Err(HsmError::Call { call, .. }) => (
                    call.session_broken(),
                    call.retry_after_relogin(),
                    call.rv() == Some(RvError::UserNotLoggedIn),
                ),
                _ => (false, false, false),
            };
            if broken {
                drop(session); // C_CloseSession
            } else {
                self.idle.lock().expect("pkcs11 pool").push(session);
            }
            if broken || retry {
                self.forget_login(logged_out);
            }
            if retry && !retried {
                retried = true;
                continue;
            }
            return result;
        }
    }

    /// Forgets what may be stale: object handles always, the login when `logged_out`.
    fn forget_login(&self, logged_out: bool) {
        let mut login = self.login.write().expect("pkcs11 login lock");
        if logged_out {
            login.pin = None;
        }
        login.epoch += 1;
    }

    /// A pooled session, or a new one.
    fn session(&self) -> Result<Session, HsmError> {
        if let Some(s) = self.idle.lock().expect("pkcs11 pool").pop() {
            return Ok(s);
        }
        self.pkcs11
            .open_rw_session(self.slot)
            .map_err(|e| self.call_error(e))
    }

    pub(super) fn call_error(&self, e: CkError) -> HsmError {
        HsmError::Call {
            token: self.name.clone(),
            call: CallError(e),
        }
    }

    /// Makes sure this process is logged in with `pin`. A PIN other than the one logged
    /// in with is verified: log out, log in with it. The exclusive lock means no call is in
    /// flight meanwhile.
    fn login(&self, pin: &Pin, secret: &str) -> Result<(), HsmError> {
        if self.login.read().expect("pkcs11 login lock").pin == Some(pin.digest()) {
            return Ok(());
        }
        let mut login = self.login.write().expect("pkcs11 login lock");
        if login.pin == Some(pin.digest()) {
            return Ok(());
        }
        let session = self.session()?;
        if login.pin.take().is_some() {
            match session.logout() {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) => {}
                Err(e) => return Err(self.call_error(e)),
            }
        }
        login.epoch += 1;
        let auth = AuthPin::new(pin.text.as_str().into());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) => {}
            // Logged in by another user of the module in this process (this one never
            // leaves a login it does not track): the PIN cannot be checked without logging
            // that user out, so it is taken as given.
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinExpired
                | RvError::PinLocked
                | RvError::UserPinNotInitialized),
                Function::Login,
            )) => {
                self.idle.lock().expect("pkcs11 pool").push(session);
                return Err(HsmError::PinRefused {
                    token: self.name.clone(),
                    secret: secret.to_owned(),
                    reason: format!("C_Login: {rv:?}"),
                });
            }
            Err(e) => return Err(self.call_error(e)),
        }
        self.idle.lock().expect("pkcs11 pool").push(session);
        login.pin = Some(pin.digest());
        login.epoch += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_never_print_and_compare_by_digest() {
        let a = Pin::new(Zeroizing::new("123456".into()));
        let b = Pin::new(Zeroizing::new("123456".into()));
        let c = Pin::new(Zeroizing::new("654321".into()));
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        assert!(!format!("{a:?}").contains("123456"));
    }

    #[test]
    fn call_errors_name_the_function_and_return_value() {
        let e = CallError(CkError::Pkcs11(RvError::PinIncorrect, Function::Login));
        assert_eq!(e.to_string(), "C_Login: PinIncorrect");
        assert!(!e.session_broken());
        let gone = CallError(CkError::Pkcs11(RvError::DeviceRemoved, Function::Encrypt));
        assert!(gone.session_broken() && gone.token_gone());
        let stale = CallError(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            Function::EncryptInit,
        ));
        assert!(stale.retry_after_relogin() && !stale.session_broken());
    }

    #[test]
    fn a_missing_module_is_a_sealed_store_with_a_clear_message() {
        let e = token(
            Path::new("/nonexistent/libnothing.so"),
            &TokenSelector::Label("x".into()),
        )
        .unwrap_err();
        assert_eq!(e.phase(), crate::api::StorePhase::Sealed);
        let text = e.to_string();
        assert!(
            text.contains("PKCS#11 module /nonexistent/libnothing.so cannot be loaded"),
            "{text}"
        );
    }
}
