//! What the type tests share: the run's seed, seeded generators and keys, a small PKI.

use super::super::*;
use base64::Engine as _;
use pkcs8::{EncodePrivateKey as _, LineEnding};
use rand::{Rng as _, SeedableRng as _};
use std::sync::OnceLock;

/// The seed of this run's random test inputs: `KEYHAVEN_TEST_SEED` when set (to repeat a
/// failing run), else a fresh one. Each test derives its own generator from it and its name
/// ([`TestRng::new`]), so a test's inputs do not depend on which other tests run.
pub(crate) fn run_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("KEYHAVEN_TEST_SEED") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("KEYHAVEN_TEST_SEED={s:?} is not a u64: {e}")),
        _ => rand::random(),
    })
}

/// A test's seeded generator: every random input of the tests here comes from one (keys,
/// salts, fuzz choices). It implements the rand_core 0.6 traits the key crates (rsa, p256,
/// ed25519-dalek, ssh-key, pkcs8) take, and hands out the rand 0.10 generator for the rest.
///
/// Randomness the tests do not choose stays unseeded: the generators under test
/// ([`generate`]) and the PKCS#12 writer's salts draw their own.
pub(crate) struct TestRng(rand::rngs::StdRng);

impl TestRng {
    /// The generator of the test `name`. Prints the run's seed: `cargo test` shows it with
    /// the output of a failing test, and `KEYHAVEN_TEST_SEED=<seed>` repeats its inputs.
    pub(crate) fn new(name: &str) -> TestRng {
        let seed = run_seed();
        eprintln!("{name}: random inputs from KEYHAVEN_TEST_SEED={seed}");
        // FNV-1a of the name: stable across runs and Rust versions.
        let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        TestRng(rand::rngs::StdRng::seed_from_u64(seed ^ salt))
    }

    pub(crate) fn rand(&mut self) -> &mut rand::rngs::StdRng {
        &mut self.0
    }
}

impl rsa::rand_core::RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

// StdRng (ChaCha12) is a cryptographic generator; seeded, it is predictable, which is what a
// test wants.
impl rsa::rand_core::CryptoRng for TestRng {}

/// A P-256 key for rcgen drawn from a [`TestRng`], signing deterministically (RFC 6979)
/// so that a certificate made with it depends on the seed only.
pub(crate) struct SeededKey {
    pub(crate) key: p256::ecdsa::SigningKey,
    pub(crate) public: Vec<u8>,
}

impl SeededKey {
    pub(crate) fn new(rng: &mut TestRng) -> SeededKey {
        let key = p256::ecdsa::SigningKey::random(rng);
        let public = key
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec();
        SeededKey { key, public }
    }

    /// The private key as PKCS#8 PEM.
    pub(crate) fn pem(&self) -> String {
        p256::SecretKey::from(&self.key)
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap()
            .to_string()
    }

    /// The private key as PKCS#8 DER.
    pub(crate) fn der(&self) -> Vec<u8> {
        p256::SecretKey::from(&self.key)
            .to_pkcs8_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    }
}

impl rcgen::PublicKeyData for SeededKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for SeededKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        use p256::ecdsa::signature::Signer as _;
        let signature: p256::ecdsa::DerSignature = self.key.sign(msg);
        Ok(signature.as_bytes().to_vec())
    }
}

pub(crate) fn data(kv: &[(&str, &[u8])]) -> SecretData {
    kv.iter().map(|(k, v)| (*k, v.to_vec())).collect()
}

pub(crate) fn problem(r: Result<Inspected, ContentError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

pub(crate) fn p256_pkcs8(rng: &mut TestRng) -> String {
    p256::SecretKey::random(rng)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string()
}

/// A CA, an intermediate and a leaf (with its key), as PEM.
pub(crate) struct Pki {
    pub(crate) root: String,
    pub(crate) intermediate: String,
    pub(crate) leaf: String,
    pub(crate) leaf_key: String,
}

pub(crate) fn pki(rng: &mut TestRng) -> Pki {
    let ca = |cn: &str| {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p
    };
    let root_key = SeededKey::new(rng);
    let root = rcgen::CertifiedIssuer::self_signed(ca("root"), root_key).unwrap();
    let int_key = SeededKey::new(rng);
    let int = rcgen::CertifiedIssuer::signed_by(ca("intermediate"), int_key, &root).unwrap();
    let leaf_key = SeededKey::new(rng);
    let leaf = rcgen::CertificateParams::new(vec!["svc.example".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &int)
        .unwrap();
    Pki {
        root: root.pem(),
        intermediate: int.pem(),
        leaf: leaf.pem(),
        leaf_key: leaf_key.pem(),
    }
}

pub(crate) fn jwt(header: &str, claims: &str) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        b.encode(header),
        b.encode(claims),
        b.encode("sig")
    )
}
