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

use super::error::{kube_err, Error};

/// The Secret's data key.
pub(crate) const DATA_KEY: &str = "audit-signer.key";

/// What [`sync`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The Secret existed; its key is now the local one.
    Loaded,
    /// There was no Secret; this replica's key is now shared.
    Created,
}

fn check(bytes: &[u8]) -> Result<SecretBytes, String> {
    let k = SecretBytes::new(bytes.to_vec());
    NoteSigner::from_pkcs8("check", &k).map_err(|e| e.to_string())?;
    Ok(k)
}

/// Installs `key` as the data directory's signing key, keeping a different
/// existing key beside it.
fn install(data_dir: &Path, key: &SecretBytes, now_unix: u64) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let path = data_dir.join(KEY_FILE);
    if let Ok(cur) = crate::util::secret::read_private(&path) {
        if cur.expose() == key.expose() {
            return Ok(());
        }
        let kept = data_dir.join(format!("{KEY_FILE}.replaced-{now_unix}"));
        crate::util::secret::write_private(&kept, cur.expose()).map_err(io(&kept))?;
        if let Ok(p) = std::fs::read(data_dir.join(PUB_FILE)) {
            let kept_pub = data_dir.join(format!("{PUB_FILE}.replaced-{now_unix}"));
            crate::util::secret::write_public(&kept_pub, &p).map_err(io(&kept_pub))?;
        }
        tracing::warn!(kept = %kept.display(), "this replica's audit signing key differs from the shared one: the old key is kept for verifying what it signed");
    }
    crate::util::secret::write_private(&path, key.expose()).map_err(io(&path))
}

/// Makes the local signing key the one in Secret `name`.
pub(crate) async fn sync(
    client: kube::Client,
    namespace: &str,
    name: &str,
    data_dir: &Path,
) -> Result<Outcome, Error> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let now = crate::util::clock::unix_secs(std::time::SystemTime::now());
    let secret = format!("Secret {namespace}/{name}");
    let from_secret = |s: Secret| -> Result<SecretBytes, Error> {
        let s = super::KeySecret(s);
        let bytes =
            s.0.data
                .as_ref()
                .and_then(|d| d.get(DATA_KEY))
                .ok_or_else(|| Error::invalid(&secret, format_args!("has no {DATA_KEY}")))?;
        check(&bytes.0).map_err(|e| Error::invalid(&secret, e))
    };
    let get = || kube_err(format!("reading {secret}"));
    if let Some(s) = api.get_opt(name).await.map_err(get())? {
        install(data_dir, &from_secret(s)?, now)?;
        return Ok(Outcome::Loaded);
    }
    std::fs::create_dir_all(data_dir).map_err(|source| Error::Io {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let key_file = data_dir.join(KEY_FILE);
    let local = match crate::util::secret::read_private(&key_file) {
        Ok(k) => {
            check(k.expose()).map_err(|e| Error::invalid(key_file.display().to_string(), e))?
        }
        Err(_) => NoteSigner::generate_pkcs8()
            .map_err(|e| Error::invalid("a new audit signing key", e))?,
    };
    let new = super::KeySecret(Secret {
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
    let created = api
        .create(&PostParams::default(), &new.0)
        .await
        .map_err(kube_err(format!("creating {secret}")));
    match created {
        Ok(created) => {
            drop(super::KeySecret(created));
            install(data_dir, &local, now)?;
            Ok(Outcome::Created)
        }
        // Another replica created it first: theirs is the shared key.
        Err(e) if e.is_conflict() => {
            let s = api.get(name).await.map_err(get())?;
            install(data_dir, &from_secret(s)?, now)?;
            Ok(Outcome::Loaded)
        }
        Err(e) => Err(e),
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
