//! The audit log's signing key, shared by replicas through a Secret.
//!
//! Owns: making the data directory's `audit-signer.key` the key held in one
//! Opaque Secret (key `audit-signer.key`, PKCS#8 Ed25519), so every
//! replica's log — each with its own tree and checkpoints — is signed by one
//! key auditors trust. The first replica creates the Secret from its key
//! (or a new one); a replica that loses the creation race (409) adopts the
//! winner's. A local key that differs is kept beside it
//! (`audit-signer.key.replaced-<unix>`), never deleted, because checkpoints
//! it signed must stay verifiable. A Secret whose key does not parse is
//! refused (start-up fails closed with the reason). Must not: open the log.

use std::path::Path;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

use crate::audit::note::NoteSigner;
use crate::audit::{KEY_FILE, PUB_FILE};
use crate::util::secret::SecretBytes;

/// The Secret's data key.
pub const DATA_KEY: &str = "audit-signer.key";

/// What [`sync`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The Secret existed; its key is now the local one.
    Loaded,
    /// There was no Secret; this replica's key is now shared.
    Created,
}

fn check(bytes: &[u8]) -> Result<SecretBytes, String> {
    let k = SecretBytes::new(bytes.to_vec());
    NoteSigner::from_pkcs8("check", &k)?;
    Ok(k)
}

/// Installs `key` as the data directory's signing key, keeping a different
/// existing key beside it.
fn install(data_dir: &Path, key: &SecretBytes, now_unix: u64) -> Result<(), String> {
    let path = data_dir.join(KEY_FILE);
    if let Ok(cur) = crate::util::secret::read_private(&path) {
        if cur.expose() == key.expose() {
            return Ok(());
        }
        let kept = data_dir.join(format!("{KEY_FILE}.replaced-{now_unix}"));
        crate::util::secret::write_private(&kept, cur.expose())
            .map_err(|e| format!("{}: {e}", kept.display()))?;
        if let Ok(p) = std::fs::read(data_dir.join(PUB_FILE)) {
            let kept_pub = data_dir.join(format!("{PUB_FILE}.replaced-{now_unix}"));
            crate::util::secret::write_public(&kept_pub, &p)
                .map_err(|e| format!("{}: {e}", kept_pub.display()))?;
        }
        tracing::warn!(kept = %kept.display(), "this replica's audit signing key differs from the shared one: the old key is kept for verifying what it signed");
    }
    crate::util::secret::write_private(&path, key.expose())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Makes the local signing key the one in Secret `name`.
pub async fn sync(
    client: kube::Client,
    namespace: &str,
    name: &str,
    data_dir: &Path,
) -> Result<Outcome, String> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let now = crate::util::clock::unix_secs(std::time::SystemTime::now());
    let from_secret = |s: Secret| -> Result<SecretBytes, String> {
        let s = super::KeySecret(s);
        let bytes =
            s.0.data
                .as_ref()
                .and_then(|d| d.get(DATA_KEY))
                .ok_or_else(|| format!("Secret {namespace}/{name} has no {DATA_KEY}"))?;
        check(&bytes.0).map_err(|e| format!("Secret {namespace}/{name}: {e}"))
    };
    let get = |e: kube::Error| format!("reading Secret {namespace}/{name}: {e}");
    if let Some(s) = api.get_opt(name).await.map_err(get)? {
        install(data_dir, &from_secret(s)?, now)?;
        return Ok(Outcome::Loaded);
    }
    std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let local = match crate::util::secret::read_private(&data_dir.join(KEY_FILE)) {
        Ok(k) => {
            check(k.expose()).map_err(|e| format!("{}: {e}", data_dir.join(KEY_FILE).display()))?
        }
        Err(_) => NoteSigner::generate_pkcs8()?,
    };
    let secret = super::KeySecret(Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(super::managed_by()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [(DATA_KEY.to_string(), ByteString(local.expose().to_vec()))]
                .into_iter()
                .collect(),
        ),
        ..Default::default()
    });
    match api.create(&PostParams::default(), &secret.0).await {
        Ok(created) => {
            drop(super::KeySecret(created));
            install(data_dir, &local, now)?;
            Ok(Outcome::Created)
        }
        // Another replica created it first: theirs is the shared key.
        Err(kube::Error::Api(st)) if st.code == 409 => {
            let s = api.get(name).await.map_err(get)?;
            install(data_dir, &from_secret(s)?, now)?;
            Ok(Outcome::Loaded)
        }
        Err(e) => Err(format!("creating Secret {namespace}/{name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_key_is_kept_beside_the_shared_one() {
        let d = tempfile::tempdir().unwrap();
        let mine = NoteSigner::generate_pkcs8().unwrap();
        crate::util::secret::write_private(&d.path().join(KEY_FILE), mine.expose()).unwrap();
        let shared = NoteSigner::generate_pkcs8().unwrap();
        install(d.path(), &shared, 42).unwrap();
        assert_eq!(
            crate::audit::read_key(d.path()).unwrap().expose(),
            shared.expose()
        );
        let kept = std::fs::read(d.path().join(format!("{KEY_FILE}.replaced-42"))).unwrap();
        assert_eq!(kept, mine.expose());
        // Installing the same key again changes nothing.
        install(d.path(), &shared, 43).unwrap();
        assert!(!d.path().join(format!("{KEY_FILE}.replaced-43")).exists());
        assert!(check(b"not a key").is_err());
    }
}
