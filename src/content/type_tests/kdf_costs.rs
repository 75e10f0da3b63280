//! What an uploaded value's KDF may cost: absurd costs refused, a KDF run once per value.

use super::*;

#[test]
fn encrypted_keys_with_absurd_kdf_costs_are_refused() {
    use pkcs8::der::Encode as _;
    let params =
        pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(50_000_000, &[1; 16], &[2; 16])
            .unwrap();
    let info = pkcs8::EncryptedPrivateKeyInfo {
        encryption_algorithm: pkcs8::pkcs5::EncryptionScheme::Pbes2(params),
        encrypted_data: &[0; 48],
    };
    let der = info.to_der().unwrap();
    let pem =
        pkcs8::der::pem::encode_string("ENCRYPTED PRIVATE KEY", LineEnding::LF, &der).unwrap();
    let p = problem(validate(
        SecretType::PrivateKey,
        &data(&[("private-key", pem.as_bytes()), ("passphrase", b"x")]),
    ));
    assert!(p.contains("PBKDF2 iterations"), "{p}");
}

#[test]
fn a_kdf_runs_once_for_validation_rendering_and_refreshes() {
    let derived = || super::kdf::DERIVED.with(std::cell::Cell::get);
    let mut rng = TestRng::new("a_kdf_runs_once_for_validation_rendering_and_refreshes");
    let ec = p256::SecretKey::random(&mut rng);
    let salt: [u8; 16] = rng.rand().random();
    let params = pkcs8::pkcs5::pbes2::Parameters::scrypt_aes256cbc(
        pkcs8::pkcs5::scrypt::Params::new(10, 8, 1, 32).unwrap(),
        &salt,
        &[9; 16],
    )
    .unwrap();
    let encrypted = pkcs8::PrivateKeyInfo::try_from(ec.to_pkcs8_der().unwrap().as_bytes())
        .unwrap()
        .encrypt_with_params(params, b"pw")
        .unwrap()
        .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .unwrap();
    let value = |pw: &[u8]| data(&[("private-key", encrypted.as_bytes()), ("passphrase", pw)]);
    let before = derived();
    // A reconcile validates, then renders; a refresh does both again.
    for _ in 0..3 {
        validate(SecretType::PrivateKey, &value(b"pw")).unwrap();
        let r = render(SecretType::PrivateKey, &value(b"pw"));
        assert!(r.data.get("public-key").is_some());
    }
    assert_eq!(derived() - before, 1);
    // Another passphrase is another input (and its failure is remembered as well).
    for _ in 0..3 {
        assert!(
            problem(validate(SecretType::PrivateKey, &value(b"no")))
                .contains("cannot be decrypted")
        );
    }
    assert_eq!(derived() - before, 2);
    // A keystore: opened once.
    let store = p12(&mut rng, "changeit");
    let ks = data(&[("keystore.p12", &store), ("password", b"changeit")]);
    let before = derived();
    for _ in 0..3 {
        validate(SecretType::Keystore, &ks).unwrap();
    }
    assert_eq!(derived() - before, 1);
}
