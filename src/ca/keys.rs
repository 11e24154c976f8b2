//! CA private keys: generation, loading and the signing seam.
//!
//! Owns: [`CaKey`], the only type that holds a CA private key in memory. It
//! zeroizes its serialized form on drop and never prints key bytes. Signing
//! goes through rcgen's `SigningKey` trait, the seam where an HSM or KMS key
//! can plug in later. Must not: touch files (see `ca::store`).

use std::fmt;

use rcgen::{KeyPair, PublicKeyData, SigningKey, PKCS_ECDSA_P256_SHA256};
use zeroize::{Zeroize, Zeroizing};

use crate::util::secret::SecretBytes;

/// A CA signing key.
pub struct CaKey(KeyPair);

impl CaKey {
    /// Generates a fresh ECDSA P-256 key.
    pub fn generate_p256() -> Result<Self, rcgen::Error> {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map(Self)
    }

    /// Loads a PEM private key: PKCS#8, or the traditional SEC1 (`EC PRIVATE
    /// KEY`, the form cert-manager and `openssl ecparam` write by default)
    /// and PKCS#1 (`RSA PRIVATE KEY`) forms, which are re-wrapped as PKCS#8
    /// because ring reads only that.
    pub fn from_pem(pem: &SecretBytes) -> Result<Self, rcgen::Error> {
        use rustls::pki_types::PrivateKeyDer;
        let s = std::str::from_utf8(pem.expose())
            .map_err(|_| rcgen::Error::PemError("key file is not UTF-8 PEM".into()))?;
        let pkcs8 = match crate::util::pem::private_key(pem.expose()) {
            Ok(Some(PrivateKeyDer::Sec1(k))) => sec1_to_pkcs8(k.secret_sec1_der()),
            Ok(Some(PrivateKeyDer::Pkcs1(k))) => pkcs1_to_pkcs8(k.secret_pkcs1_der()),
            _ => return KeyPair::from_pem(s).map(Self)?.signs(),
        };
        let pkcs8 = pkcs8.ok_or(rcgen::Error::CouldNotParseKeyPair)?;
        KeyPair::try_from(pkcs8.as_slice()).map(Self)?.signs()
    }

    /// Refuses a key that parses but cannot sign. ring accepts an RSA key
    /// whose CRT values (dP, dQ, qInv) were corrupted, and then fails every
    /// signature (it checks each one before returning it); the public half
    /// still matches the certificate, so without this a damaged issuer key
    /// in a Secret or file would be installed and stop all issuance.
    fn signs(self) -> Result<Self, rcgen::Error> {
        match self.0.sign(b"meshca: key check") {
            Ok(_) => Ok(self),
            Err(_) => Err(rcgen::Error::RingKeyRejected(
                "the private key is damaged: it parses but a test signature fails".into(),
            )),
        }
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

/// Generates a 2048-bit RSA key as PKCS#8 DER (for RS256 JWT-SVID keys).
/// ring cannot generate RSA keys; the `rsa` crate does only this, and ring
/// loads the result and does all signing.
pub(crate) fn generate_rsa_pkcs8() -> Result<SecretBytes, super::jwt::JwtKeyError> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
        .map_err(|e| super::jwt::JwtKeyError::new(format!("RSA key generation: {e}")))?;
    let doc = key
        .to_pkcs8_der()
        .map_err(|e| super::jwt::JwtKeyError::new(format!("RSA key encoding: {e}")))?;
    // `doc` and `key` zeroize themselves on drop.
    Ok(SecretBytes::new(doc.as_bytes().to_vec()))
}

/// One DER TLV: (tag, value, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |a, x| (a << 8) | usize::from(*x));
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// Appends one DER TLV (shortest length form) to `out`.
pub(crate) fn der(tag: u8, value: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    let n = value.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        // Long form with the fewest length bytes. (This used to stop at two
        // bytes and silently truncate lengths above 0xffff.)
        let be = n.to_be_bytes();
        let skip = be.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (be.len() - skip) as u8);
        out.extend_from_slice(&be[skip..]);
    }
    out.extend_from_slice(value);
}

/// RFC 5915 `ECPrivateKey` (SEC1) to RFC 5958 PKCS#8 `PrivateKeyInfo`, as
/// `openssl pkcs8 -topk8` writes it: the curve moves into the algorithm
/// identifier, the public key stays. P-256 and P-384 only; the public key
/// must be present (cert-manager and OpenSSL always write it).
fn sec1_to_pkcs8(sec1: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    let (0x30, mut body, []) = tlv(sec1)? else {
        return None;
    };
    let (mut private, mut curve, mut public) = (None, None, None);
    while !body.is_empty() {
        let (tag, value, rest) = tlv(body)?;
        match tag {
            0x02 if value != [1] => return None,
            0x04 => private = Some(value),
            0xa0 => match tlv(value)? {
                (0x06, oid, []) => curve = Some(oid),
                _ => return None,
            },
            0xa1 => public = Some(value),
            _ => {}
        }
        body = rest;
    }
    let private = private?;
    let curve = match curve {
        Some(c) => c,
        None if private.len() == 32 => P256,
        None if private.len() == 48 => P384,
        None => return None,
    };
    if curve != P256 && curve != P384 {
        return None;
    }
    let mut ec = Zeroizing::new(Vec::new());
    der(0x02, &[1], &mut ec);
    der(0x04, private, &mut ec);
    der(0xa1, public?, &mut ec);
    let mut ec_seq = Zeroizing::new(Vec::new());
    der(0x30, &ec, &mut ec_seq);
    let mut alg_body = Vec::new();
    der(0x06, EC_PUBLIC_KEY, &mut alg_body);
    der(0x06, curve, &mut alg_body);
    let mut info = Zeroizing::new(Vec::new());
    der(0x02, &[0], &mut info);
    der(0x30, &alg_body, &mut info);
    der(0x04, &ec_seq, &mut info);
    let mut out = Zeroizing::new(Vec::new());
    der(0x30, &info, &mut out);
    Some(out)
}

/// RFC 8017 `RSAPrivateKey` (PKCS#1) to RFC 5958 PKCS#8, as
/// `openssl pkcs8 -topk8` writes it.
fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    // Only wrap what parses as one SEQUENCE; ring checks the rest.
    let (0x30, _, []) = tlv(pkcs1)? else {
        return None;
    };
    let mut alg_body = Vec::new();
    der(0x06, RSA_ENCRYPTION, &mut alg_body);
    der(0x05, &[], &mut alg_body);
    let mut info = Zeroizing::new(Vec::new());
    der(0x02, &[0], &mut info);
    der(0x30, &alg_body, &mut info);
    der(0x04, pkcs1, &mut info);
    let mut out = Zeroizing::new(Vec::new());
    der(0x30, &info, &mut out);
    Some(out)
}

#[cfg(test)]
mod sec1_tests {
    use super::*;

    // Throwaway test keys made with `openssl ecparam -genkey -noout`, and the
    // same keys after `openssl pkcs8 -topk8 -nocrypt`.
    const SEC1_P256: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIEkZF+D1rjaGOoab7Vd08Wv0oWerY338uez4qUNgb4R5oAoGCCqGSM49
AwEHoUQDQgAEOpe9oCd01WPdG+TLNELpNKMRIcqaS0Mz9Qi7oROBM6oeQwJxu+9D
cxh8HfMTSNEY7IVur4SQsm0N/VHZ4Llvjw==
-----END EC PRIVATE KEY-----
";
    const PKCS8_P256: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSRkX4PWuNoY6hpvt
V3Txa/ShZ6tjffy57PipQ2BvhHmhRANCAAQ6l72gJ3TVY90b5Ms0Quk0oxEhyppL
QzP1CLuhE4Ezqh5DAnG770NzGHwd8xNI0RjshW6vhJCybQ39UdnguW+P
-----END PRIVATE KEY-----
";
    const SEC1_P384: &str = "-----BEGIN EC PRIVATE KEY-----
MIGkAgEBBDBkfpm0SLMPNcqb7Kk2pd1GZN9E9HuhPz55gkwaZ5Hdax8jptzRsSym
7kyeF6J9FfigBwYFK4EEACKhZANiAASzVvQfs003WS79UnqhEWscf7XW64oS96gt
xnInaP+xTfPydNHdjn3i7FL8TY6D6tvm0pMZzDcSk4CNW3HXV2m731Csl70P94gv
DkteDK///m5lpB25JeYx8dFY3BfcZPU=
-----END EC PRIVATE KEY-----
";
    const PKCS8_P384: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDBkfpm0SLMPNcqb7Kk2
pd1GZN9E9HuhPz55gkwaZ5Hdax8jptzRsSym7kyeF6J9FfihZANiAASzVvQfs003
WS79UnqhEWscf7XW64oS96gtxnInaP+xTfPydNHdjn3i7FL8TY6D6tvm0pMZzDcS
k4CNW3HXV2m731Csl70P94gvDkteDK///m5lpB25JeYx8dFY3BfcZPU=
-----END PRIVATE KEY-----
";

    fn der_of(pem: &str) -> Vec<u8> {
        match crate::util::pem::private_key(pem.as_bytes())
            .unwrap()
            .unwrap()
        {
            rustls::pki_types::PrivateKeyDer::Sec1(k) => k.secret_sec1_der().to_vec(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => panic!("unexpected key type"),
        }
    }

    #[test]
    fn sec1_keys_convert_to_the_pkcs8_openssl_writes_and_load() {
        for (sec1, pkcs8) in [(SEC1_P256, PKCS8_P256), (SEC1_P384, PKCS8_P384)] {
            assert_eq!(
                sec1_to_pkcs8(&der_of(sec1)).unwrap().as_slice(),
                der_of(pkcs8).as_slice()
            );
            let a = CaKey::from_pem(&SecretBytes::new(sec1.as_bytes().to_vec())).unwrap();
            let b = CaKey::from_pem(&SecretBytes::new(pkcs8.as_bytes().to_vec())).unwrap();
            assert_eq!(a.spki_der(), b.spki_der());
        }
        // Truncated or foreign input is refused, not a panic.
        let d = der_of(SEC1_P256);
        for n in 0..d.len() {
            assert!(sec1_to_pkcs8(&d[..n]).is_none());
        }
        assert!(sec1_to_pkcs8(b"\x30\x03\x02\x01\x02").is_none());
    }

    #[test]
    fn pkcs1_rsa_keys_convert_to_the_pkcs8_openssl_writes_and_load() {
        // A throwaway key from `openssl genrsa -traditional 2048`, and the
        // same after `openssl pkcs8 -topk8 -nocrypt`.
        let pkcs1 = include_str!("testdata/rsa2048-pkcs1.pem");
        let pkcs8 = include_str!("testdata/rsa2048-pkcs8.pem");
        let rustls::pki_types::PrivateKeyDer::Pkcs1(k) =
            crate::util::pem::private_key(pkcs1.as_bytes())
                .unwrap()
                .unwrap()
        else {
            panic!("not PKCS#1");
        };
        assert_eq!(
            pkcs1_to_pkcs8(k.secret_pkcs1_der()).unwrap().as_slice(),
            der_of(pkcs8).as_slice()
        );
        let a = CaKey::from_pem(&SecretBytes::new(pkcs1.as_bytes().to_vec())).unwrap();
        let b = CaKey::from_pem(&SecretBytes::new(pkcs8.as_bytes().to_vec())).unwrap();
        assert_eq!(a.spki_der(), b.spki_der());
        assert!(pkcs1_to_pkcs8(&k.secret_pkcs1_der()[..10]).is_none());
    }
}

/// Property tests of the DER reader and the SEC1/PKCS#1 → PKCS#8 re-wrapping
/// that sees imported (untrusted) key files (issue 11, part 8).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        ProptestConfig::with_cases(cases)
    }

    /// A value of `len` bytes, cheap to build even when long.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => vec(any::<u8>(), 0..300),
            1 => (0usize..200_000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// What `der` writes, `tlv` reads back unchanged, at every length
        /// (short form, 0x81, 0x82 and beyond: a key file's SEC1 body can be
        /// up to 64 KiB, so its PKCS#8 wrapping can pass 0xffff).
        #[test]
        fn der_then_tlv_round_trips(tag in any::<u8>(), v in value(), tail in vec(any::<u8>(), 0..8)) {
            let mut out = Vec::new();
            der(tag, &v, &mut out);
            out.extend_from_slice(&tail);
            prop_assert_eq!(tlv(&out), Some((tag, v.as_slice(), tail.as_slice())));
        }

        #[test]
        fn tlv_never_reads_past_its_input(b in vec(any::<u8>(), 0..600)) {
            if let Some((_, v, rest)) = tlv(&b) {
                prop_assert!(v.len() + rest.len() + 2 <= b.len());
            }
        }

        /// Arbitrary and mutated SEC1 / PKCS#1 bodies: no panic, and what
        /// comes out is one well-formed DER SEQUENCE (ring decides the rest).
        #[test]
        fn rewrapping_arbitrary_bytes_is_total(b in vec(any::<u8>(), 0..2000), big in 0usize..70_000) {
            for input in [b.clone(), {
                // A SEC1 shell whose private key is `big` bytes long.
                let mut ec = Vec::new();
                der(0x02, &[1], &mut ec);
                der(0x04, &vec![7u8; big.min(0xff00)], &mut ec);
                der(0xa1, &b, &mut ec);
                let mut seq = Vec::new();
                der(0x30, &ec, &mut seq);
                seq
            }] {
                for out in [sec1_to_pkcs8(&input), pkcs1_to_pkcs8(&input)].into_iter().flatten() {
                    let parsed = tlv(&out);
                    prop_assert!(matches!(parsed, Some((0x30, _, []))), "not one SEQUENCE");
                }
            }
        }
    }
}

#[cfg(test)]
mod regressions {
    use super::*;

    /// Found by `der_then_tlv_round_trips`: `der` wrote lengths above
    /// 0xffff with two length bytes, silently dropping the high ones.
    #[test]
    fn der_lengths_above_0xffff_round_trip() {
        let v = vec![0u8; 0x1_0005];
        let mut out = Vec::new();
        der(0x04, &v, &mut out);
        assert_eq!(&out[..5], &[0x04, 0x83, 0x01, 0x00, 0x05]);
        assert_eq!(tlv(&out), Some((0x04, v.as_slice(), &[][..])));
    }
}
