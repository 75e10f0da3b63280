//! Encrypt+store throughput of the pkcs11 store against the internal store, on the test bed.
//!
//! ```sh
//! e2e/testbed up && . e2e/.testbed/env
//! cargo run --release --example bench_stores -- [versions per run, default 400]
//! ```
//!
//! For each store and each concurrency (1 and 16 operations in flight) it measures:
//! - `seal`: envelope encryption alone (fresh data key, AES-256-GCM, data key wrapped by
//!   the KEK: in memory for the internal store, `C_Encrypt` on the token for pkcs11);
//! - `open`: the reverse, unwrap the data key + decrypt, on one sealed envelope;
//! - `write`: what a sync does, seal + create the record Secret in the API server;
//! - `read`: get the record + unwrap + decrypt.
//!
//! Records go to a namespace of their own, deleted at the end, and the KEK made on the
//! token is destroyed: nothing is left behind.

use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use keyhaven::api::Pkcs11Provider;
use keyhaven::backend::{Backend, InternalStore, ModuleAllowList, Pkcs11Store, VersionStamp};
use keyhaven::crypto::{Fingerprinter, KeyWrapper, SoftwareKek, open, seal};
use keyhaven::secret_data::SecretData;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use zeroize::Zeroizing;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keyhaven::install_crypto_provider();
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(400);
    let env = |k: &str| {
        std::env::var(k).map_err(|_| anyhow::anyhow!("{k} is not set: . e2e/.testbed/env"))
    };
    let (module, token, pin) = (
        env("KEYHAVEN_PKCS11_MODULE")?,
        env("KEYHAVEN_PKCS11_TOKEN")?,
        env("KEYHAVEN_PKCS11_PIN")?,
    );
    env("SOFTHSM2_CONF")?;
    let client = Client::try_default().await?;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let ns = format!("keyhaven-bench-{suffix}");
    let kek_label = format!("bench-{suffix}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "pin"}, "stringData": {"pin": pin}}),
            )?,
        )
        .await?;

    let mut master = Zeroizing::new([0u8; 32]);
    rand::fill(&mut master[..]);
    let software: Arc<dyn KeyWrapper> = Arc::new(SoftwareKek::new(master));
    let internal = InternalStore::new("bench-internal", client.clone(), &ns, software.clone());
    let spec: Pkcs11Provider = serde_json::from_value(json!({
        "module": module, "tokenLabel": token, "kekLabel": kek_label,
        "pinSecretRef": {"name": "pin", "key": "pin"}, "maxSessions": 16,
    }))?;
    let modules = ModuleAllowList::parse(&[&module]).map_err(anyhow::Error::msg)?;
    let hsm = Pkcs11Store::new("bench-hsm", client.clone(), &ns, &spec, &modules)?;
    let health = hsm.health().await;
    anyhow::ensure!(
        health.phase == keyhaven::api::StorePhase::Active,
        "{}",
        health.message
    );
    let hsm_kek = hsm.key_wrapper();

    let mut key = [0u8; 32];
    rand::fill(&mut key[..]);
    let fingerprinter = Fingerprinter::new(Zeroizing::new(key));
    let value: SecretData = [("password", "a-benchmark-password-of-32-bytes")]
        .into_iter()
        .collect();
    let stamp = VersionStamp {
        version: 1,
        fingerprint: fingerprinter
            .content("bench", "password", &value)
            .current()
            .clone(),
        owner: None,
    };
    let plaintext = value.to_sealed_bytes();

    println!("{n} operations per run; ops/s (higher is better)");
    println!(
        "{:<10} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "store", "in flight", "seal", "open", "write", "read"
    );
    let stores: [(&str, &dyn Backend, &Arc<dyn KeyWrapper>); 2] = [
        ("internal", &internal, &software),
        ("pkcs11", &hsm, &hsm_kek),
    ];
    for (run, concurrency) in [1usize, 16].into_iter().enumerate() {
        for (name, store, kek) in stores {
            let aad = b"keyhaven bench\0store\0path\x001";
            let seal_rate = rate(n, concurrency, |_| async {
                seal(kek.as_ref(), &plaintext, aad).await.map(|_| ())
            })
            .await?;
            let sealed = seal(kek.as_ref(), &plaintext, aad).await?;
            let open_rate = rate(n, concurrency, |_| async {
                open(kek.as_ref(), &sealed, aad).await.map(|_| ())
            })
            .await?;
            let path = |i: usize| format!("bench/{run}/{i}");
            let write_rate = rate(n, concurrency, |i| {
                let (stamp, value) = (&stamp, &value);
                async move { store.write(&path(i), stamp, value).await.map(|_| ()) }
            })
            .await?;
            let read_rate = rate(n, concurrency, |i| async move {
                let v = store.read(&path(i), Some(1)).await?;
                anyhow::ensure!(v.is_some(), "record {i} missing");
                Ok(())
            })
            .await?;
            println!(
                "{name:<10} {concurrency:>9} {seal_rate:>10.0} {open_rate:>10.0} {write_rate:>10.0} {read_rate:>10.0}"
            );
        }
    }

    namespaces.delete(&ns, &DeleteParams::background()).await?;
    destroy_kek(&module, &token, &pin, &kek_label)?;
    Ok(())
}

/// Operations per second of `op` run `n` times, `concurrency` at once.
async fn rate<'a, F, Fut, E>(n: usize, concurrency: usize, op: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), E>> + 'a,
    E: Into<anyhow::Error>,
{
    let start = Instant::now();
    let results: Vec<Result<(), E>> = futures::stream::iter(0..n)
        .map(&op)
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    for r in results {
        r.map_err(Into::into)?;
    }
    Ok(n as f64 / elapsed)
}

/// Removes the benchmark's KEK from the token (keyhaven itself never deletes a key).
fn destroy_kek(module: &str, token: &str, pin: &str, label: &str) -> anyhow::Result<()> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let pkcs11 = Pkcs11::new(module)?;
    let _ = pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = pkcs11
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token)
        })
        .ok_or_else(|| anyhow::anyhow!("no token {token:?}"))?;
    let session = pkcs11.open_rw_session(slot)?;
    let _ = session.login(UserType::User, Some(&AuthPin::new(pin.into())));
    for key in session.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])? {
        session.destroy_object(key)?;
    }
    Ok(())
}
