//! Checkpoints in the C2SP `signed-note` / `tlog-checkpoint` formats, signed
//! with Ed25519.
//!
//! Owns: the checkpoint body (`<origin>\n<size>\n<base64 root>\n`), the note
//! signature line (`— <name> <base64(key hash || signature)>`), the key hash
//! (first 4 bytes of `SHA-256(name || "\n" || 0x01 || public key)`), and the
//! verifier-key string `<name>+<hex key hash>+<base64(0x01 || public key)>`.
//! Must not: touch storage or decide when to sign.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use super::merkle::Hash;
use crate::util::secret::SecretBytes;

/// The em dash that starts every signature line.
const DASH: &str = "\u{2014}";
const ALG_ED25519: u8 = 0x01;

/// A parsed checkpoint body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: Hash,
}

impl Checkpoint {
    /// The note text (what is signed).
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// Parses the body of a note.
    pub fn parse_body(text: &str) -> Result<Self, String> {
        let mut lines = text.split('\n');
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or("no origin line")?;
        let size = lines
            .next()
            .and_then(|l| l.parse::<u64>().ok())
            .ok_or("bad tree size line")?;
        let root = lines
            .next()
            .and_then(|l| B64.decode(l).ok())
            .filter(|r| r.len() == 32)
            .ok_or("bad root hash line")?;
        let mut r = [0u8; 32];
        r.copy_from_slice(&root);
        Ok(Self {
            origin: origin.to_string(),
            size,
            root: r,
        })
    }
}

fn key_hash(name: &str, public: &[u8]) -> [u8; 4] {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    c.update(name.as_bytes());
    c.update(b"\n");
    c.update(&[ALG_ED25519]);
    c.update(public);
    let d = c.finish();
    let mut out = [0u8; 4];
    out.copy_from_slice(&d.as_ref()[..4]);
    out
}

/// The log's signing key.
pub struct NoteSigner {
    name: String,
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NoteSigner {
    /// A fresh PKCS#8 Ed25519 key.
    pub fn generate_pkcs8() -> Result<SecretBytes, String> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| SecretBytes::new(d.as_ref().to_vec()))
            .map_err(|_| "cannot generate an Ed25519 key".to_string())
    }

    /// Loads a PKCS#8 Ed25519 key; `name` is the signer name in notes.
    pub fn from_pkcs8(name: &str, pkcs8: &SecretBytes) -> Result<Self, String> {
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.expose())
            .map_err(|e| format!("audit signing key: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            key,
        })
    }

    /// The verifier key string auditors use.
    pub fn verifier_key(&self) -> String {
        let public = self.key.public_key().as_ref();
        let mut enc = vec![ALG_ED25519];
        enc.extend_from_slice(public);
        format!(
            "{}+{}+{}",
            self.name,
            hex::encode(key_hash(&self.name, public)),
            B64.encode(enc)
        )
    }

    /// Signs a checkpoint, returning the whole note text.
    pub fn sign(&self, cp: &Checkpoint) -> String {
        let body = cp.body();
        let sig = self.key.sign(body.as_bytes());
        let mut blob = key_hash(&self.name, self.key.public_key().as_ref()).to_vec();
        blob.extend_from_slice(sig.as_ref());
        format!("{body}\n{DASH} {} {}\n", self.name, B64.encode(blob))
    }
}

/// A verifier built from a verifier-key string.
#[derive(Debug, Clone)]
pub struct NoteVerifier {
    name: String,
    hash: [u8; 4],
    public: Vec<u8>,
}

impl NoteVerifier {
    /// Parses `<name>+<hex hash>+<base64(0x01 || key)>`.
    pub fn parse(vkey: &str) -> Result<Self, String> {
        let mut parts = vkey.trim().splitn(3, '+');
        let (Some(name), Some(h), Some(k)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("verifier key must be <name>+<hash>+<key>".into());
        };
        let key = B64.decode(k).map_err(|_| "verifier key: bad base64")?;
        if key.len() != 33 || key[0] != ALG_ED25519 {
            return Err("verifier key: not an Ed25519 key".into());
        }
        let public = key[1..].to_vec();
        let hash = key_hash(name, &public);
        if hex::encode(hash) != h {
            return Err("verifier key: key hash does not match".into());
        }
        Ok(Self {
            name: name.to_string(),
            hash,
            public,
        })
    }

    /// Verifies a note signed by this key and returns its checkpoint.
    pub fn verify(&self, note: &str) -> Result<Checkpoint, String> {
        let (body, sigs) = note
            .split_once("\n\n")
            .ok_or("not a signed note (no blank line)")?;
        let body = format!("{body}\n");
        let mut good = false;
        for line in sigs.lines() {
            let Some(rest) = line.strip_prefix(&format!("{DASH} ")) else {
                return Err(format!("malformed signature line {line:?}"));
            };
            let Some((name, b64)) = rest.split_once(' ') else {
                return Err(format!("malformed signature line {line:?}"));
            };
            if name != self.name {
                continue;
            }
            let blob = B64.decode(b64).map_err(|_| "signature: bad base64")?;
            if blob.len() != 68 || blob[..4] != self.hash {
                continue;
            }
            UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(body.as_bytes(), &blob[4..])
                .map_err(|_| "the checkpoint signature does not verify".to_string())?;
            good = true;
        }
        if !good {
            return Err(format!("no signature by {} on the checkpoint", self.name));
        }
        Checkpoint::parse_body(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_forgeries() {
        let key = NoteSigner::generate_pkcs8().unwrap();
        let s = NoteSigner::from_pkcs8("meshca/cluster.local", &key).unwrap();
        let cp = Checkpoint {
            origin: "meshca/cluster.local".into(),
            size: 42,
            root: [7u8; 32],
        };
        let note = s.sign(&cp);
        assert!(note.starts_with("meshca/cluster.local\n42\n"));
        assert!(note.contains("\n\n\u{2014} meshca/cluster.local "));
        let v = NoteVerifier::parse(&s.verifier_key()).unwrap();
        assert_eq!(v.verify(&note).unwrap(), cp);
        // A changed size or root breaks the signature.
        let forged = note.replacen("\n42\n", "\n43\n", 1);
        assert!(v.verify(&forged).is_err());
        // Another key's signature is not accepted.
        let other = NoteSigner::from_pkcs8(
            "meshca/cluster.local",
            &NoteSigner::generate_pkcs8().unwrap(),
        )
        .unwrap();
        assert!(v.verify(&other.sign(&cp)).is_err());
        assert!(NoteVerifier::parse("x+00000000+AAAA").is_err());
    }
}
