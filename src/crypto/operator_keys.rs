//! The operator's own keys, kept in one Secret of its namespace and created on first start:
//! the internal store's master key (a KEK) and the fingerprint key.

use super::{Fingerprinter, SoftwareKek};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Name of the Secret holding the operator's keys.
pub const KEYS_SECRET: &str = "keyhaven-keys";
const MASTER_KEY: &str = "master-key";
const FINGERPRINT_KEY: &str = "fingerprint-key";

/// The operator's keys, loaded once at start.
#[derive(Clone)]
pub struct OperatorKeys {
    pub master: Arc<SoftwareKek>,
    pub fingerprinter: Arc<Fingerprinter>,
}

impl OperatorKeys {
    /// Reads the keys Secret in `namespace`, creating it with fresh random keys when absent.
    /// Two operators starting at once race on create; the loser reads the winner's keys.
    pub async fn load_or_create(client: Client, namespace: &str) -> Result<Self, kube::Error> {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let secret = match api.get_opt(KEYS_SECRET).await? {
            Some(s) => s,
            None => match api.create(&PostParams::default(), &new_keys_secret()).await {
                Ok(s) => s,
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(KEYS_SECRET).await?,
                Err(e) => return Err(e),
            },
        };
        let data = secret.data.unwrap_or_default();
        let key = |name: &str| -> Result<Zeroizing<[u8; 32]>, kube::Error> {
            let bytes = data.get(name).map(|b| b.0.as_slice()).unwrap_or_default();
            let arr: [u8; 32] = bytes.try_into().map_err(|_| {
                kube::Error::Service(
                    format!("Secret {namespace}/{KEYS_SECRET} key {name:?} is not 32 bytes").into(),
                )
            })?;
            Ok(Zeroizing::new(arr))
        };
        Ok(OperatorKeys {
            master: Arc::new(SoftwareKek::new(key(MASTER_KEY)?)),
            fingerprinter: Arc::new(Fingerprinter::new(key(FINGERPRINT_KEY)?)),
        })
    }
}

fn new_keys_secret() -> Secret {
    let random = || {
        let mut k = vec![0u8; 32];
        rand::fill(&mut k[..]);
        ByteString(k)
    };
    Secret {
        metadata: ObjectMeta {
            name: Some(KEYS_SECRET.into()),
            labels: Some(BTreeMap::from([(crate::labels::MANAGED_BY.into(), crate::labels::MANAGED_BY_VALUE.into())])),
            annotations: Some(BTreeMap::from([(
                crate::labels::DESCRIPTION_ANNOTATION.into(),
                "keyhaven's master key (wraps the internal store's data keys) and fingerprint key. Losing it makes the internal store unreadable: back it up.".into(),
            )])),
            ..Default::default()
        },
        immutable: Some(true),
        data: Some(BTreeMap::from([(MASTER_KEY.into(), random()), (FINGERPRINT_KEY.into(), random())])),
        ..Default::default()
    }
}
