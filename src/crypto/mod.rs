//! Cryptography: envelope encryption of stored versions and keyed fingerprints.

mod envelope;
mod fingerprint;
mod operator_keys;

pub use envelope::{DataKey, Envelope, KeyWrapper, SoftwareKek, open, rewrap, seal};
pub use fingerprint::{ContentFingerprint, Fingerprint, Fingerprinter, Scheme};
pub use operator_keys::OperatorKeys;

/// A cryptographic failure. Never carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "decryption failed: the ciphertext or its wrapped key was altered, or another key sealed it"
    )]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
    #[error("data key was wrapped by key {found:?}, but this store holds key {expected:?}")]
    WrongKek { expected: String, found: String },
    #[error("key wrapping failed: {0}")]
    Wrap(String),
    /// The KEK cannot be used now (an HSM that refuses the PIN, a missing token or key):
    /// nothing is known about the data, which must be left as it is.
    #[error("the key-encryption key is unavailable: {0}")]
    KekUnavailable(String),
}
