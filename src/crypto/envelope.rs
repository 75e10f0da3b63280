//! Envelope encryption: each version is sealed with AES-256-GCM under a fresh data key,
//! and the data key is wrapped by a key-encryption key (KEK): a software key for the
//! internal store, an HSM-held key for the pkcs11 store.

use super::CryptoError;
use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// A 256-bit data-encryption key, wiped on drop.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::fill(&mut key[..]);
        DataKey(key)
    }

    /// Takes ownership of key bytes (e.g. unwrapped from a KEK).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::Decrypt)?;
        Ok(DataKey(Zeroizing::new(arr)))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Wraps and unwraps data keys under a key-encryption key.
#[async_trait]
pub trait KeyWrapper: Send + Sync {
    /// Identifies the KEK; stored beside every key it wraps.
    fn kek_id(&self) -> &str;
    /// Encrypts `key`, binding it to `aad`.
    async fn wrap(&self, key: &DataKey, aad: &[u8]) -> Result<Vec<u8>, CryptoError>;
    /// Decrypts a key [`KeyWrapper::wrap`] produced with the same `aad`.
    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<DataKey, CryptoError>;
    /// Decrypts a key wrapped by the KEK `kek_id`, which may be a key this wrapper held
    /// before (a rotated-out HSM key) rather than its current one. By default only the
    /// current KEK is held.
    async fn unwrap_with(
        &self,
        kek_id: &str,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<DataKey, CryptoError> {
        if kek_id != self.kek_id() {
            return Err(CryptoError::WrongKek {
                expected: self.kek_id().to_owned(),
                found: kek_id.to_owned(),
            });
        }
        self.unwrap(wrapped, aad).await
    }
}

/// A sealed version: what is stored at rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The KEK that wrapped `wrapped_key`.
    pub kek_id: String,
    pub wrapped_key: Vec<u8>,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// Seals `plaintext` under a fresh data key wrapped by `kek`. `aad` binds the envelope to
/// its place (store, path, version) so a ciphertext cannot be moved elsewhere unnoticed.
pub async fn seal(
    kek: &dyn KeyWrapper,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Envelope, CryptoError> {
    let key = DataKey::generate();
    let (nonce, ciphertext) = aes_gcm_encrypt(key.as_bytes(), plaintext, aad)?;
    let wrapped_key = kek.wrap(&key, aad).await?;
    Ok(Envelope {
        kek_id: kek.kek_id().to_owned(),
        wrapped_key,
        nonce,
        ciphertext,
    })
}

/// Opens an envelope sealed by [`seal`] with the same `aad`, by a KEK `kek` holds (see
/// [`KeyWrapper::unwrap_with`]).
pub async fn open(
    kek: &dyn KeyWrapper,
    envelope: &Envelope,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    unseal(kek, envelope, aad)
        .await
        .map(|(_, plaintext)| plaintext)
}

/// The same envelope with its data key wrapped by `kek`'s current KEK: the ciphertext
/// and nonce are kept, only the wrapped key and the KEK id change. The data key is
/// checked against the ciphertext first, so a damaged envelope is never re-wrapped into
/// one that looks sound.
pub async fn rewrap(
    kek: &dyn KeyWrapper,
    envelope: &Envelope,
    aad: &[u8],
) -> Result<Envelope, CryptoError> {
    let (key, _) = unseal(kek, envelope, aad).await?;
    let wrapped_key = kek.wrap(&key, aad).await?;
    Ok(Envelope {
        kek_id: kek.kek_id().to_owned(),
        wrapped_key,
        nonce: envelope.nonce.clone(),
        ciphertext: envelope.ciphertext.clone(),
    })
}

/// The envelope's data key, unwrapped by the KEK the envelope names, and the plaintext it
/// decrypts (which authenticates the key against the ciphertext).
async fn unseal(
    kek: &dyn KeyWrapper,
    envelope: &Envelope,
    aad: &[u8],
) -> Result<(DataKey, Zeroizing<Vec<u8>>), CryptoError> {
    let key = kek
        .unwrap_with(&envelope.kek_id, &envelope.wrapped_key, aad)
        .await?;
    let plaintext = aes_gcm_decrypt(key.as_bytes(), &envelope.nonce, &envelope.ciphertext, aad)?;
    Ok((key, plaintext))
}

/// An AES-256-GCM cipher for `key`. The key copy it is built from is wiped here; the
/// cipher's own state (round keys, GHASH key) is wiped when it drops (aes-gcm's `zeroize`).
fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    let mut key = Key::<Aes256Gcm>::from(*key);
    let cipher = Aes256Gcm::new(&key);
    key.as_mut_slice().zeroize();
    cipher
}

fn aes_gcm_encrypt(
    key: &[u8; 32],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
    let cipher = cipher(key);
    let nonce = Nonce::generate();
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Encrypt)?;
    Ok((nonce.to_vec(), ciphertext))
}

fn aes_gcm_decrypt(
    key: &[u8; 32],
    nonce: &[u8],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let cipher = cipher(key);
    let nonce = Nonce::try_from(nonce).map_err(|_| CryptoError::Decrypt)?;
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Decrypt)
}

/// A KEK held in memory (the internal store's master key). Wrapping is AES-256-GCM:
/// `nonce || ciphertext+tag`.
pub struct SoftwareKek {
    id: String,
    key: Zeroizing<[u8; 32]>,
}

impl SoftwareKek {
    /// A KEK from 32 key bytes; its id is derived from a hash of the key, so a wrong
    /// master key is told apart from corrupted data.
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        let digest = Sha256::new()
            .chain_update(b"keyhaven kek id\0")
            .chain_update(&key[..])
            .finalize();
        SoftwareKek {
            id: format!("sw-{}", hex::encode(&digest[..8])),
            key,
        }
    }
}

#[async_trait]
impl KeyWrapper for SoftwareKek {
    fn kek_id(&self) -> &str {
        &self.id
    }

    async fn wrap(&self, key: &DataKey, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (mut out, ciphertext) = aes_gcm_encrypt(&self.key, key.as_bytes(), aad)?;
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<DataKey, CryptoError> {
        if wrapped.len() < 12 {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ciphertext) = wrapped.split_at(12);
        let key = aes_gcm_decrypt(&self.key, nonce, ciphertext, aad)?;
        DataKey::from_bytes(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_kek(byte: u8) -> SoftwareKek {
        SoftwareKek::new(Zeroizing::new([byte; 32]))
    }

    #[tokio::test]
    async fn round_trip() {
        let kek = test_kek(7);
        let env = seal(&kek, b"the plaintext", b"store/path/1").await.unwrap();
        assert_eq!(
            &open(&kek, &env, b"store/path/1").await.unwrap()[..],
            b"the plaintext"
        );
        assert!(!env.ciphertext.windows(5).any(|w| w == b"plain"));
    }

    #[tokio::test]
    async fn fresh_data_key_and_nonce_per_seal() {
        let kek = test_kek(7);
        let a = seal(&kek, b"same", b"aad").await.unwrap();
        let b = seal(&kek, b"same", b"aad").await.unwrap();
        assert_ne!(a.wrapped_key, b.wrapped_key);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[tokio::test]
    async fn tampering_and_misplacement_are_detected() {
        let kek = test_kek(7);
        let env = seal(&kek, b"value", b"store/a/1").await.unwrap();
        assert!(
            open(&kek, &env, b"store/b/1").await.is_err(),
            "moved to another path"
        );
        let mut bad = env.clone();
        bad.ciphertext[0] ^= 1;
        assert!(
            open(&kek, &bad, b"store/a/1").await.is_err(),
            "altered ciphertext"
        );
        let mut bad = env.clone();
        bad.wrapped_key[20] ^= 1;
        assert!(
            open(&kek, &bad, b"store/a/1").await.is_err(),
            "altered wrapped key"
        );
        assert!(matches!(
            open(&test_kek(8), &env, b"store/a/1").await,
            Err(CryptoError::WrongKek { .. })
        ));
    }

    /// A KEK that also holds the keys it rotated away from, as an HSM store does.
    struct RotatedKek {
        current: SoftwareKek,
        old: Vec<SoftwareKek>,
    }

    #[async_trait]
    impl KeyWrapper for RotatedKek {
        fn kek_id(&self) -> &str {
            self.current.kek_id()
        }
        async fn wrap(&self, key: &DataKey, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
            self.current.wrap(key, aad).await
        }
        async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<DataKey, CryptoError> {
            self.current.unwrap(wrapped, aad).await
        }
        async fn unwrap_with(
            &self,
            kek_id: &str,
            wrapped: &[u8],
            aad: &[u8],
        ) -> Result<DataKey, CryptoError> {
            match self.old.iter().find(|k| k.kek_id() == kek_id) {
                Some(old) => old.unwrap(wrapped, aad).await,
                None => self.current.unwrap_with(kek_id, wrapped, aad).await,
            }
        }
    }

    #[tokio::test]
    async fn rewrap_moves_the_data_key_and_keeps_the_ciphertext() {
        let env = seal(&test_kek(1), b"value", b"store/a/1").await.unwrap();
        let kek = RotatedKek {
            current: test_kek(2),
            old: vec![test_kek(1)],
        };
        // Readable before the move, through the old key the envelope names.
        assert_eq!(&open(&kek, &env, b"store/a/1").await.unwrap()[..], b"value");
        let moved = rewrap(&kek, &env, b"store/a/1").await.unwrap();
        assert_eq!(moved.kek_id, test_kek(2).kek_id());
        assert_eq!(
            (&moved.nonce, &moved.ciphertext),
            (&env.nonce, &env.ciphertext)
        );
        assert_ne!(moved.wrapped_key, env.wrapped_key);
        assert_eq!(
            &open(&test_kek(2), &moved, b"store/a/1").await.unwrap()[..],
            b"value"
        );
        // A damaged ciphertext is refused, not re-wrapped.
        let mut bad = env.clone();
        bad.ciphertext[0] ^= 1;
        assert!(matches!(
            rewrap(&kek, &bad, b"store/a/1").await,
            Err(CryptoError::Decrypt)
        ));
        // So is an envelope bound to another place.
        assert!(rewrap(&kek, &env, b"store/b/1").await.is_err());
    }
}
