//! The KDF caps, the memory budget, the cache and the PKCS#12 inspection of [`super`].

use super::*;

/// A DER element of `tag` holding `content`.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match content.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(SEQUENCE, &parts.concat())
}

fn int(n: u64) -> Vec<u8> {
    let bytes: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    let mut content = if bytes.first().is_none_or(|b| b & 0x80 != 0) {
        vec![0]
    } else {
        vec![]
    };
    content.extend(bytes);
    tlv(INTEGER, &content)
}

fn oid(o: ObjectIdentifier) -> Vec<u8> {
    tlv(OID, o.as_bytes())
}

/// A PFX whose MAC uses `mac_iterations` and whose authSafe holds `inner` as a plain
/// (data) safe.
fn pfx(inner: Vec<u8>, mac_iterations: u64) -> Vec<u8> {
    let data = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
    let sha256 = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
    let safe = seq(&[oid(data), tlv(0xa0, &tlv(OCTET_STRING, &seq(&[inner])))]);
    let auth_safe = seq(&[oid(data), tlv(0xa0, &tlv(OCTET_STRING, &seq(&[safe])))]);
    let mac = seq(&[
        seq(&[
            seq(&[oid(sha256), tlv(0x05, &[])]),
            tlv(OCTET_STRING, &[0; 32]),
        ]),
        tlv(OCTET_STRING, &[1; 8]),
        int(mac_iterations),
    ]);
    seq(&[int(3), auth_safe, mac])
}

/// A shrouded key bag encrypted with PBES2 over `kdf`.
fn shrouded_key(kdf: Vec<u8>) -> Vec<u8> {
    let pbes2 = ObjectIdentifier::new_unwrap("1.2.840.113549.1.5.13");
    let aes = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.1.42");
    let scheme = seq(&[oid(aes), tlv(OCTET_STRING, &[0; 16])]);
    let epki = seq(&[
        seq(&[oid(pbes2), seq(&[kdf, scheme])]),
        tlv(OCTET_STRING, &[0; 48]),
    ]);
    let bag = ObjectIdentifier::new_unwrap("1.2.840.113549.1.12.10.1.2");
    seq(&[oid(bag), tlv(0xa0, &epki)])
}

fn scrypt(n: u64, r: u64, p: u64) -> Vec<u8> {
    seq(&[
        oid(OID_SCRYPT),
        seq(&[tlv(OCTET_STRING, &[2; 16]), int(n), int(r), int(p)]),
    ])
}

fn pbkdf2(iterations: u64) -> Vec<u8> {
    seq(&[
        oid(OID_PBKDF2),
        seq(&[tlv(OCTET_STRING, &[2; 16]), int(iterations)]),
    ])
}

#[test]
fn pkcs12_costs_are_capped_before_deriving() {
    check_pkcs12(&pfx(shrouded_key(scrypt(1 << 14, 8, 1)), 2048)).unwrap();
    check_pkcs12(&pfx(shrouded_key(pbkdf2(600_000)), 1_000_000)).unwrap();
    let e = check_pkcs12(&pfx(shrouded_key(scrypt(1 << 20, 8, 1)), 2048)).unwrap_err();
    assert!(e.contains("1024 MiB; at most 64 MiB"), "{e}");
    let e = check_pkcs12(&pfx(shrouded_key(scrypt(1 << 10, 8, 64)), 2048)).unwrap_err();
    assert!(e.contains("p <= 16"), "{e}");
    let e = check_pkcs12(&pfx(shrouded_key(pbkdf2(1_000_001)), 2048)).unwrap_err();
    assert!(e.contains("1000001 key derivation iterations"), "{e}");
    let e = check_pkcs12(&pfx(shrouded_key(pbkdf2(1)), 20_000_000)).unwrap_err();
    assert!(e.contains("20000000 MAC iterations"), "{e}");
    let huge = seq(&[
        oid(OID_PBKDF2),
        seq(&[tlv(OCTET_STRING, &[2]), tlv(INTEGER, &[0x7f; 40])]),
    ]);
    assert!(check_pkcs12(&pfx(shrouded_key(huge), 1)).is_err());
}

/// A PFX (MAC of 2048 iterations) whose authSafe holds `safes` (ContentInfos).
fn pfx_of(safes: &[Vec<u8>]) -> Vec<u8> {
    let data = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
    let auth_safe = seq(&[oid(data), tlv(0xa0, &tlv(OCTET_STRING, &seq(safes)))]);
    seq(&[int(3), auth_safe])
}

/// An encryptedData safe: `algorithm` (an AlgorithmIdentifier) over `ciphertext`.
fn encrypted_safe(algorithm: Vec<u8>, ciphertext: &[u8]) -> Vec<u8> {
    let eci = seq(&[oid(OID_DATA), algorithm, tlv(0x80, ciphertext)]);
    seq(&[oid(OID_ENCRYPTED_DATA), tlv(0xa0, &seq(&[int(0), eci]))])
}

/// `bags` (SafeContents), encrypted with PBES2 (PBKDF2, AES-256-CBC) under `password`.
fn pbes2_safe(bags: &[Vec<u8>], password: &str) -> Vec<u8> {
    use pkcs8::der::Encode as _;
    let params =
        pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(2048, &[3; 16], &[4; 16]).unwrap();
    let ciphertext = params.encrypt(password, &seq(bags)).unwrap();
    let algorithm = seq(&[oid(OID_PBES2), params.to_der().unwrap()]);
    encrypted_safe(algorithm, &ciphertext)
}

#[test]
fn keys_inside_an_encrypted_safe_are_checked_before_p12_keystore_opens_it() {
    // Within the caps: its largest scrypt (16 MiB) is what the parse reserves.
    let store = pfx_of(&[pbes2_safe(&[shrouded_key(scrypt(1 << 14, 8, 1))], "pw")]);
    assert_eq!(inspect_pkcs12(&store, "pw").unwrap(), 16 << 20);
    assert_eq!(
        inspect_pkcs12(&pfx_of(&[pbes2_safe(&[], "pw")]), "pw").unwrap(),
        MIB
    );
    // 1 GiB of scrypt (within p12-keystore's own cap) hidden in an encrypted safe.
    let hidden = pfx_of(&[pbes2_safe(&[shrouded_key(scrypt(1 << 20, 8, 1))], "pw")]);
    check_pkcs12(&hidden).unwrap(); // invisible from outside
    let e = inspect_pkcs12(&hidden, "pw").unwrap_err();
    assert!(e.contains("1024 MiB; at most 64 MiB"), "{e}");
    assert_eq!(inspect_pkcs12(&hidden, "wrong").unwrap_err(), DOES_NOT_OPEN);
    // A legacy PKCS#12 PBE (3DES): cannot be opened here, so it is not opened at all.
    let pbe_3des = ObjectIdentifier::new_unwrap("1.2.840.113549.1.12.1.3");
    let legacy = encrypted_safe(
        seq(&[oid(pbe_3des), seq(&[tlv(OCTET_STRING, &[5; 8]), int(2048)])]),
        &[0; 64],
    );
    let e = inspect_pkcs12(&pfx_of(&[legacy]), "pw").unwrap_err();
    assert!(e.contains("legacy PKCS#12 scheme (PBES1)"), "{e}");
    // Structure it cannot follow: refused too.
    let mut trailing = store.clone();
    trailing.push(0);
    assert_eq!(inspect_pkcs12(&trailing, "pw").unwrap_err(), NOT_PKCS12);
    let not_data = seq(&[int(3), seq(&[oid(OID_ENCRYPTED_DATA), tlv(0xa0, &[])])]);
    assert_eq!(inspect_pkcs12(&not_data, "pw").unwrap_err(), NOT_PKCS12);
}

#[test]
fn p12_keystore_files_pbes2_opens_pbes1_is_refused() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["a.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let chain = p12_keystore::PrivateKeyChain::new(
        vec![1u8; 20],
        p12_keystore::PrivateKey::from_der(&key.serialize_der()).unwrap(),
        [p12_keystore::Certificate::from_der(cert.der()).unwrap()],
    );
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("a", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    let modern = store.writer("pw").write().unwrap();
    assert_eq!(inspect_pkcs12(&modern, "pw").unwrap(), MIB);
    assert_eq!(inspect_pkcs12(&modern, "nope").unwrap_err(), DOES_NOT_OPEN);
    let legacy = store
        .writer("pw")
        .encryption_algorithm(p12_keystore::EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc)
        .write()
        .unwrap();
    let e = inspect_pkcs12(&legacy, "pw").unwrap_err();
    assert!(e.contains("legacy"), "{e}");
}

#[test]
fn a_keystore_value_is_checked_before_it_is_opened() {
    let store = pfx(shrouded_key(scrypt(1 << 20, 8, 1)), 2048);
    let value: crate::secret_data::SecretData =
        [("keystore.p12", store), ("password", b"pw".to_vec())]
            .into_iter()
            .collect();
    let e = super::super::validate(crate::api::SecretType::Keystore, &value)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 64 MiB"), "{e}");
}

#[test]
fn the_budget_bounds_the_kdf_memory_live_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    let budget = Budget::new(64 << 20);
    let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let _permit = budget.reserve(32 << 20);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(30));
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    assert_eq!(most.load(Ordering::SeqCst), 2);
    // A request above the whole budget takes all of it, and does not wait forever.
    let all = budget.reserve(1 << 30);
    assert_eq!(budget.permits.available_permits(), 0);
    drop(all);
    // Small ones count a MiB each.
    let _small = budget.reserve(1);
    assert_eq!(budget.permits.available_permits(), 63);
}

#[test]
fn a_derivation_runs_once_per_input_and_the_cache_is_bounded() {
    let runs = std::cell::Cell::new(0);
    let derive = |out: &'static str| {
        runs.set(runs.get() + 1);
        Ok(out.as_bytes().to_vec())
    };
    let salt = rand::random::<u64>().to_be_bytes();
    let a = once("test", &[&salt, b"a"], || derive("A")).unwrap();
    let again = once("test", &[&salt, b"a"], || derive("X")).unwrap();
    assert_eq!((a, again, runs.get()), (b"A".to_vec(), b"A".to_vec(), 1));
    // Fields are length-prefixed: ("ab", "") is not ("a", "b").
    once("test", &[&salt, b"ab", b""], || derive("B")).unwrap();
    once("test", &[&salt, b"a", b"b"], || derive("C")).unwrap();
    assert_eq!(runs.get(), 3);
    // Problems are remembered too (a wrong passphrase does not derive on every retry).
    let wrong = || Err::<Vec<u8>, _>("cannot be decrypted".to_owned());
    once("test", &[&salt, b"w"], wrong).unwrap_err();
    let e = once("test", &[&salt, b"w"], || derive("no")).unwrap_err();
    assert_eq!((e.as_str(), runs.get()), ("cannot be decrypted", 3));
    for i in 0..MAX_CACHED + 10 {
        once("test-fill", &[&salt, &i.to_be_bytes()], || Ok(vec![])).unwrap();
    }
    assert!(CACHE.lock().unwrap().entries.len() <= MAX_CACHED);
}

#[test]
fn anything_that_is_not_der_is_left_to_the_parser() {
    for junk in [
        &b""[..],
        b"\x30\x80\x00\x00",
        b"\x30\x05\x02",
        b"not der at all",
        &[0xff; 64],
    ] {
        check_pkcs12(junk).unwrap();
        // ... which does not open what this cannot follow.
        assert_eq!(inspect_pkcs12(junk, "pw").unwrap_err(), NOT_PKCS12);
    }
}
