//! Caps on the key derivation costs an uploaded value asks for, checked before anything
//! is derived: one value must not make the operator spend minutes of CPU or more memory
//! than its pod has.
//!
//! - scrypt: at most [`MAX_KDF_MEMORY`] (64 MiB: `N * r * 128` bytes) and `p <= 16`;
//! - PBKDF2 of an encrypted PKCS#8 key: at most [`MAX_PBKDF2_ITERATIONS`] (10,000,000);
//! - PKCS#12: every iteration count in the keystore (its MAC, PBES1/PBES2 schemes) at most
//!   [`MAX_PKCS12_ITERATIONS`] (1,000,000, the cap of the p12-keystore crate itself);
//! - bcrypt-pbkdf of an OpenSSH key: at most [`MAX_BCRYPT_ROUNDS`] (1000).
//!
//! A PKCS#12 is checked all the way down before p12-keystore (whose own scrypt cap is
//! 1 GiB) opens it: its MAC, the schemes of its encrypted safes and its shrouded keys
//! outside them as they are; the keys inside a PBES2-encrypted safe once keyhaven has
//! decrypted that safe itself; a safe encrypted with a legacy PKCS#12 scheme (PBES1), which
//! keyhaven cannot open, is refused ([`inspect_pkcs12`]).
//!
//! Caps per operation are not enough: the operator runs one CPU-heavy task per CPU, and
//! a value is decrypted more than once. Every KDF therefore also takes its memory out of a
//! process-wide [budget](reserve) of [`KDF_MEMORY_BUDGET`] (64 MiB) before it runs and
//! gives it back when it is done: at most 64 MiB of KDF memory is live at once, whatever
//! the number of CPUs or of tenants.

use pkcs8::ObjectIdentifier;
use std::sync::LazyLock;
use tokio::sync::{Semaphore, SemaphorePermit};

pub const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;
pub const MAX_PKCS12_ITERATIONS: u128 = 1_000_000;
pub const MAX_KDF_MEMORY: u128 = 64 << 20;
pub const MAX_SCRYPT_PARALLELISM: u128 = 16;
/// OpenSSH's default is 16 rounds; `ssh-keygen -a 100` is common.
pub const MAX_BCRYPT_ROUNDS: u32 = 1000;

/// The KDF memory the whole process may have live at once: all scrypt, PBKDF2,
/// bcrypt-pbkdf and PKCS#12 derivations together, on every blocking thread. A quarter of
/// the chart's 256 MiB memory limit, and no less than [`MAX_KDF_MEMORY`], so that a single
/// operation within the cap always fits.
pub const KDF_MEMORY_BUDGET: u128 = 64 << 20;
const _: () = assert!(MAX_KDF_MEMORY <= KDF_MEMORY_BUDGET);

/// The budget is counted in MiB; a KDF that needs little memory (PBKDF2, bcrypt-pbkdf, the
/// PKCS#12 KDF) counts as one, which also bounds how many run at once.
pub const MIB: u128 = 1 << 20;

/// A byte-counted budget, in MiB permits (FIFO: a large request is not starved by small
/// ones).
pub(crate) struct Budget {
    permits: Semaphore,
    total_mib: u32,
}

impl Budget {
    pub(crate) fn new(total: u128) -> Self {
        let total_mib = u32::try_from(total / MIB).unwrap_or(u32::MAX).max(1);
        Budget {
            permits: Semaphore::new(total_mib as usize),
            total_mib,
        }
    }

    /// Waits (blocking this thread: KDFs run on blocking threads) until `bytes` of the
    /// budget are free, and holds them until the permit is dropped. A request is rounded up
    /// to whole MiB, at least 1, and at most the whole budget: one request alone always
    /// fits, and no caller holds a permit while it waits for another, so this cannot
    /// deadlock.
    pub(crate) fn reserve(&self, bytes: u128) -> SemaphorePermit<'_> {
        let mib = bytes.div_ceil(MIB).clamp(1, u128::from(self.total_mib)) as u32;
        futures::executor::block_on(self.permits.acquire_many(mib))
            .expect("the budget is never closed")
    }
}

static BUDGET: LazyLock<Budget> = LazyLock::new(|| Budget::new(KDF_MEMORY_BUDGET));

/// Takes `bytes` out of the process-wide KDF memory budget until the permit is dropped:
/// call it right before a derivation, drop it right after, and never while holding another.
pub(crate) fn reserve(bytes: u128) -> SemaphorePermit<'static> {
    BUDGET.reserve(bytes)
}

/// The memory the KDF of an encrypted PKCS#8 key takes: `N * r * 128` bytes for scrypt,
/// a token MiB for the others.
pub(crate) fn pkcs8_memory(info: &pkcs8::EncryptedPrivateKeyInfo<'_>) -> u128 {
    use pkcs8::pkcs5::pbes2::Kdf;
    match info.encryption_algorithm.pbes2().map(|p| &p.kdf) {
        Some(Kdf::Scrypt(p)) => {
            scrypt_memory(u128::from(p.cost_parameter), u128::from(p.block_size))
        }
        _ => MIB,
    }
}

/// At most this many results are kept by [`once`] (least recently used out first).
pub const MAX_CACHED: usize = 1024;

/// What [`once`] remembers: by a keyed digest of the inputs, the outcome of a parse that ran
/// a KDF — `Ok` with what it derived that is public (a public key, an entry count), or the
/// problem (a fixed message, never a value). Never a private key, a passphrase or any
/// decrypted byte.
struct Cache {
    /// The HMAC key, random per process: the digests are not a fast oracle for guessing a
    /// passphrase (which the KDF exists to make slow).
    key: [u8; 32],
    /// By digest: when last used (a tick), and the outcome.
    entries: std::collections::HashMap<[u8; 32], (u64, Outcome)>,
    tick: u64,
}

type Outcome = Result<Vec<u8>, String>;

static CACHE: LazyLock<std::sync::Mutex<Cache>> = LazyLock::new(|| {
    let mut key = [0; 32];
    rand::fill(&mut key[..]);
    std::sync::Mutex::new(Cache {
        key,
        entries: Default::default(),
        tick: 0,
    })
});

#[cfg(test)]
thread_local! {
    /// How many times [`once`] ran its derivation on this thread (tests count KDF runs).
    pub(crate) static DERIVED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `derive()`, run once per distinct input: the outcome of a deterministic parse that runs
/// a KDF over `parts` (the encrypted bytes and the passphrase), remembered by a keyed digest
/// of `domain` and `parts`. Validating a value and rendering it, and every refresh of an
/// unchanged value, then cost one derivation, not one each. The lock is not held while
/// deriving (two threads missing the same input may both derive: the budget bounds them).
pub(crate) fn once(
    domain: &str,
    parts: &[&[u8]],
    derive: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    use hmac::{Hmac, KeyInit, Mac};
    let lock = || {
        CACHE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let digest: [u8; 32] = {
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&lock().key)
            .expect("HMAC takes any key length");
        mac.update(b"keyhaven kdf cache v1\0");
        for field in std::iter::once(domain.as_bytes()).chain(parts.iter().copied()) {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac.finalize().into_bytes().into()
    };
    {
        let mut cache = lock();
        cache.tick += 1;
        let tick = cache.tick;
        if let Some((used, outcome)) = cache.entries.get_mut(&digest) {
            *used = tick;
            return outcome.clone();
        }
    }
    #[cfg(test)]
    DERIVED.with(|n| n.set(n.get() + 1));
    let outcome = derive();
    let mut cache = lock();
    if cache.entries.len() >= MAX_CACHED
        && let Some(oldest) = cache
            .entries
            .iter()
            .min_by_key(|(_, (used, _))| *used)
            .map(|(k, _)| *k)
    {
        cache.entries.remove(&oldest);
    }
    cache.tick += 1;
    let tick = cache.tick;
    cache.entries.insert(digest, (tick, outcome.clone()));
    outcome
}

fn scrypt_memory(n: u128, r: u128) -> u128 {
    n.saturating_mul(r).saturating_mul(128)
}

const OID_PBKDF2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.5.12");
const OID_SCRYPT: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.11591.4.11");
/// PKCS#12 PBE schemes (pbeWithSHAAnd...): `1.2.840.113549.1.12.1.n`.
const OID_PKCS12_PBE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.12.1");
/// PKCS#5 PBES1 schemes: `1.2.840.113549.1.5.n`, n in 1, 3, 4, 6, 10, 11.
const OID_PKCS5: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.5");

/// Why scrypt parameters `n`, `r`, `p` are refused, if they are.
fn scrypt_problem(n: u128, r: u128, p: u128) -> Option<String> {
    let memory = scrypt_memory(n, r);
    (memory > MAX_KDF_MEMORY || p > MAX_SCRYPT_PARALLELISM).then(|| {
        format!(
            "uses scrypt parameters above the accepted cost (N*r*128 = {} MiB; at most 64 MiB, p <= 16)",
            memory >> 20
        )
    })
}

/// The KDF of an encrypted PKCS#8 key, within the caps.
pub fn check_pkcs8(info: &pkcs8::EncryptedPrivateKeyInfo<'_>) -> Result<(), String> {
    use pkcs8::pkcs5::pbes2::Kdf;
    let Some(pbes2) = info.encryption_algorithm.pbes2() else {
        return Ok(());
    };
    match &pbes2.kdf {
        Kdf::Pbkdf2(p) if p.iteration_count > MAX_PBKDF2_ITERATIONS => Err(format!(
            "uses {} PBKDF2 iterations; at most {MAX_PBKDF2_ITERATIONS} are accepted",
            p.iteration_count
        )),
        Kdf::Scrypt(p) => match scrypt_problem(
            u128::from(p.cost_parameter),
            u128::from(p.block_size),
            u128::from(p.parallelization),
        ) {
            Some(problem) => Err(problem),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// One DER element: its tag byte and contents; the bytes after it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags: not in these structures
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None; // indefinite (BER) or absurd lengths
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The elements `der` consists of, when it is nothing but well-formed DER elements.
fn elements(mut der: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = vec![];
    while !der.is_empty() {
        let (tag, content, rest) = element(der)?;
        out.push((tag, content));
        der = rest;
    }
    Some(out)
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;

/// An INTEGER's value (saturating; a negative one is 0).
fn integer((tag, content): (u8, &[u8])) -> Option<u128> {
    if tag != INTEGER || content.is_empty() {
        return None;
    }
    if content[0] & 0x80 != 0 {
        return Some(0);
    }
    let digits: Vec<u8> = content.iter().copied().skip_while(|b| *b == 0).collect();
    if digits.len() > 16 {
        return Some(u128::MAX);
    }
    Some(
        digits
            .iter()
            .fold(0u128, |acc, b| (acc << 8) | u128::from(*b)),
    )
}

/// Why the algorithm `oid` with `params` costs too much, if it does.
fn algorithm_problem(oid: &[u8], params: Option<(u8, &[u8])>) -> Option<String> {
    let fields = params
        .filter(|(tag, _)| *tag == SEQUENCE)
        .and_then(|(_, content)| elements(content))
        .unwrap_or_default();
    let int = |i: usize| fields.get(i).copied().and_then(integer);
    let iterations = |n: Option<u128>| {
        n.filter(|n| *n > MAX_PKCS12_ITERATIONS).map(|n| {
            format!("uses {n} key derivation iterations; at most {MAX_PKCS12_ITERATIONS} are accepted in a PKCS#12 keystore")
        })
    };
    let under = |arc: ObjectIdentifier| {
        oid.len() == arc.as_bytes().len() + 1 && oid.starts_with(arc.as_bytes())
    };
    if oid == OID_SCRYPT.as_bytes() {
        // salt, N, r, p [, keyLength]
        scrypt_problem(int(1)?, int(2)?, int(3)?)
    } else if oid == OID_PBKDF2.as_bytes() || under(OID_PKCS12_PBE) || under(OID_PKCS5) {
        // salt, iterationCount, ...
        iterations(int(1))
    } else {
        None
    }
}

/// The memory of the algorithm `oid` with `params`: `N * r * 128` for scrypt, else 0.
fn algorithm_memory(oid: &[u8], params: Option<(u8, &[u8])>) -> u128 {
    let fields = params
        .filter(|(tag, _)| *tag == SEQUENCE && oid == OID_SCRYPT.as_bytes())
        .and_then(|(_, content)| elements(content))
        .unwrap_or_default();
    let int = |i: usize| fields.get(i).copied().and_then(integer);
    match (int(1), int(2)) {
        (Some(n), Some(r)) => scrypt_memory(n, r),
        _ => 0,
    }
}

/// Walks `der` (at most `depth` levels more, into OCTET STRINGs that hold DER too),
/// checking every algorithm identifier it can see; `memory` becomes at least the largest
/// scrypt memory among them.
fn walk(der: &[u8], depth: u8, memory: &mut u128) -> Result<(), String> {
    let Some(items) = elements(der) else {
        return Ok(()); // not DER (ciphertext, text): nothing to see
    };
    if depth == 0 {
        return Ok(());
    }
    for (tag, content) in items {
        if tag & 0x20 != 0 {
            if tag == SEQUENCE
                && let Some(children) = elements(content)
                && let Some((OID, oid)) = children.first().copied()
            {
                if let Some(problem) = algorithm_problem(oid, children.get(1).copied()) {
                    return Err(problem);
                }
                *memory = (*memory).max(algorithm_memory(oid, children.get(1).copied()));
            }
            walk(content, depth - 1, memory)?;
        } else if tag == OCTET_STRING {
            walk(content, depth - 1, memory)?;
        }
    }
    Ok(())
}

/// The costs a PKCS#12 keystore asks for (as far as they can be read before decrypting),
/// within the caps; `Ok` with the largest scrypt memory among them.
pub fn check_pkcs12(der: &[u8]) -> Result<u128, String> {
    // PFX: version, authSafe, macData { mac, macSalt, iterations DEFAULT 1 }.
    if let Some((SEQUENCE, pfx, _)) = element(der)
        && let Some(fields) = elements(pfx)
        && let Some((SEQUENCE, mac_data)) = fields.get(2).copied()
        && let Some(mac) = elements(mac_data)
        && let Some(n) = mac.get(2).copied().and_then(integer)
        && n > MAX_PKCS12_ITERATIONS
    {
        return Err(format!(
            "uses {n} MAC iterations; at most {MAX_PKCS12_ITERATIONS} are accepted"
        ));
    }
    let mut memory = 0;
    walk(der, 24, &mut memory)?;
    Ok(memory)
}

const OID_PBES2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.5.13");
const OID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const OID_ENCRYPTED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.6");
/// `[0]`, constructed (an explicit tag) and primitive (`encryptedContent`, implicit).
const CONTEXT_0: u8 = 0xa0;
const CONTEXT_0_PRIMITIVE: u8 = 0x80;

const NOT_PKCS12: &str = "is not a PKCS#12 keystore (PFX, DER)";
const DOES_NOT_OPEN: &str = "is not a PKCS#12 keystore that opens with `password`";

/// A DER element: its tag, its contents and all of its bytes.
type Whole<'a> = (u8, &'a [u8], &'a [u8]);

/// Each DER element of `der`, whole.
fn elements_whole(mut der: &[u8]) -> Option<Vec<Whole<'_>>> {
    let mut out = vec![];
    while !der.is_empty() {
        let (tag, content, rest) = element(der)?;
        out.push((tag, content, &der[..der.len() - rest.len()]));
        der = rest;
    }
    Some(out)
}

/// What a PKCS#12 keystore costs to open with `password`, checked all the way down before
/// p12-keystore opens it: `Ok` with the largest memory one of its KDFs takes (at least a
/// MiB), which the caller reserves from the budget for the whole parse.
///
/// Why this way: the keys in an *encrypted* safe (OpenSSL and keytool put certificates
/// there, and may put shrouded keys) are invisible until the safe is decrypted, and
/// p12-keystore, which decrypts them, cannot be told a cap: its own allows scrypt of 1 GiB,
/// four times the pod's memory. Holding the whole budget while it runs would serialise
/// keystores but not make 1 GiB fit. So keyhaven opens each encrypted safe itself first, when
/// it is PBES2 (PBKDF2 or scrypt, within the caps, under the budget), and checks the keys
/// inside like the rest; a safe encrypted with a legacy PKCS#12 scheme (PBES1:
/// pbeWithSHAAnd3-KeyTripleDES-CBC, RC2-40, ...), which it cannot open, is refused rather than
/// opened blind. Such keystores re-export as PBES2 (`openssl pkcs12 -export` of OpenSSL 3
/// without `-legacy`, keytool of JDK 17+). The structure is read strictly: a keystore this
/// cannot follow is refused, so p12-keystore never opens anything not checked here. The cost:
/// each PBES2 safe is derived twice (here, then by p12-keystore), once per keystore and
/// password (the outcome is remembered).
pub fn inspect_pkcs12(der: &[u8], password: &str) -> Result<u128, String> {
    let mut memory = check_pkcs12(der)?;
    // PFX: version, authSafe ContentInfo { data, [0] OCTET STRING AuthenticatedSafe }, ...
    let pfx = match element(der) {
        Some((SEQUENCE, pfx, [])) => pfx,
        _ => return Err(NOT_PKCS12.into()),
    };
    let fields = elements(pfx).ok_or(NOT_PKCS12)?;
    let auth_safe = fields
        .get(1)
        .filter(|(tag, _)| *tag == SEQUENCE)
        .and_then(|(_, c)| elements(c))
        .ok_or(NOT_PKCS12)?;
    let safes = match auth_safe.as_slice() {
        [(OID, oid), (CONTEXT_0, explicit)] if *oid == OID_DATA.as_bytes() => {
            match elements(explicit).as_deref() {
                Some([(OCTET_STRING, octets)]) => match elements(octets).as_deref() {
                    Some([(SEQUENCE, safes)]) => elements(safes).ok_or(NOT_PKCS12)?,
                    _ => return Err(NOT_PKCS12.into()),
                },
                _ => return Err(NOT_PKCS12.into()),
            }
        }
        _ => return Err(NOT_PKCS12.into()),
    };
    for (tag, content_info) in safes {
        let info = (tag == SEQUENCE)
            .then(|| elements(content_info))
            .flatten()
            .ok_or(NOT_PKCS12)?;
        let Some(&(OID, kind)) = info.first() else {
            return Err(NOT_PKCS12.into());
        };
        if kind != OID_ENCRYPTED_DATA.as_bytes() {
            continue; // a data safe: walked above; any other, p12-keystore refuses
        }
        // [0] EncryptedData { version, EncryptedContentInfo { type, algorithm, [0] bytes } }
        let encrypted_content_info = match info.get(1) {
            Some((CONTEXT_0, explicit)) => match elements(explicit).as_deref() {
                Some([(SEQUENCE, data)]) => match elements(data).as_deref() {
                    Some([(INTEGER, _), (SEQUENCE, eci)]) => {
                        elements_whole(eci).ok_or(NOT_PKCS12)?
                    }
                    _ => return Err(NOT_PKCS12.into()),
                },
                _ => return Err(NOT_PKCS12.into()),
            },
            _ => return Err(NOT_PKCS12.into()),
        };
        let (algorithm, ciphertext) = match encrypted_content_info.as_slice() {
            [(OID, ..), (SEQUENCE, algorithm, _)] => (algorithm, None),
            [
                (OID, ..),
                (SEQUENCE, algorithm, _),
                (CONTEXT_0_PRIMITIVE, bytes, _),
            ] => (algorithm, Some(*bytes)),
            _ => return Err(NOT_PKCS12.into()),
        };
        let algorithm = elements_whole(algorithm).ok_or(NOT_PKCS12)?;
        let (oid, params) = match algorithm.as_slice() {
            [(OID, oid, _), (_, _, params)] => (*oid, *params),
            [(OID, oid, _)] => (*oid, &[][..]),
            _ => return Err(NOT_PKCS12.into()),
        };
        if oid != OID_PBES2.as_bytes() {
            return Err("has a safe encrypted with a legacy PKCS#12 scheme (PBES1), whose keys cannot be checked before they are decrypted: export it with PBES2 (AES-256-CBC; OpenSSL 3 without -legacy, keytool of JDK 17+)".into());
        }
        let Some(ciphertext) = ciphertext else {
            continue; // nothing encrypted: p12-keystore reads it as empty
        };
        use pkcs8::der::Decode as _;
        let params = pkcs8::pkcs5::pbes2::Parameters::from_der(params)
            .map_err(|_| "has an encrypted safe whose PBES2 parameters cannot be read")?;
        let cost = match &params.kdf {
            pkcs8::pkcs5::pbes2::Kdf::Scrypt(p) => {
                scrypt_memory(u128::from(p.cost_parameter), u128::from(p.block_size))
            }
            _ => MIB,
        };
        let plain = {
            let _memory = reserve(cost);
            params.decrypt(password.as_bytes(), ciphertext)
        }
        .map_err(|_| DOES_NOT_OPEN)?;
        walk(&plain, 24, &mut memory)?;
    }
    Ok(memory.max(MIB))
}

#[cfg(test)]
#[path = "kdf_tests.rs"]
mod tests;
