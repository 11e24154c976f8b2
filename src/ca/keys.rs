//! CA private keys: generation, loading and the signing seam.
//!
//! Owns: [`CaKey`], the only type that holds a CA private key in memory. It
//! zeroizes its serialized form on drop and never prints key bytes. Signing
//! goes through rcgen's `SigningKey` trait, the seam where an HSM or KMS key
//! can plug in later. Must not: touch files (see `ca::store`).

use std::fmt;

use rcgen::{KeyPair, PublicKeyData, SigningKey, PKCS_ECDSA_P256_SHA256};
use zeroize::Zeroize;

use crate::secret::SecretBytes;

/// A CA signing key.
pub struct CaKey(KeyPair);

impl CaKey {
    /// Generates a fresh ECDSA P-256 key.
    pub fn generate_p256() -> Result<Self, rcgen::Error> {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map(Self)
    }

    /// Loads a PEM private key (PKCS#8, or SEC1/PKCS#1 where rcgen accepts it).
    pub fn from_pem(pem: &SecretBytes) -> Result<Self, rcgen::Error> {
        let s = std::str::from_utf8(pem.expose())
            .map_err(|_| rcgen::Error::PemError("key file is not UTF-8 PEM".into()))?;
        KeyPair::from_pem(s).map(Self)
    }

    /// The PKCS#8 PEM encoding, in zeroizing memory.
    pub fn to_pem(&self) -> SecretBytes {
        SecretBytes::new(self.0.serialize_pem().into_bytes())
    }

    /// The PKCS#8 DER encoding, in zeroizing memory.
    pub fn to_pkcs8_der(&self) -> SecretBytes {
        SecretBytes::new(self.0.serialize_der())
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        self.0.subject_public_key_info()
    }
}

impl Drop for CaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CaKey").field(&"...").finish()
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        PublicKeyData::algorithm(&self.0)
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}
