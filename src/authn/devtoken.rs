//! The development token signer behind `meshca token`.
//!
//! Owns: minting JWTs shaped exactly like Kubernetes projected
//! service-account tokens, signed ES256 by `token-signer.key` in the data
//! directory, and the JWKS that verifies them. `serve` trusts this signer
//! only when no other token source is configured. Must not: be used for
//! anything but development and tests.

use std::time::{Duration, SystemTime};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::jwt::{K8sClaims, K8sInfo, NameUid};
use crate::ca::CaKey;
use crate::identity::Workload;
use crate::util::clock::unix_secs;
use crate::util::secret::SecretBytes;

/// The issuer the development signer uses (the Kubernetes default).
pub const DEV_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// What to put in a minted token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// The service account.
    pub workload: Workload,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Lifetime.
    pub ttl: Duration,
    /// Issuer.
    pub issuer: String,
    /// Pod name to bind, if any.
    pub pod: Option<String>,
}

/// The ES256 development signer.
pub struct DevSigner {
    encoding: EncodingKey,
    kid: String,
    jwks: String,
}

impl std::fmt::Debug for DevSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevSigner {
    /// Loads the signer from its PKCS#8 PEM.
    pub fn from_pem(pem: &SecretBytes) -> Result<Self, String> {
        let key = CaKey::from_pem(pem).map_err(|e| format!("token signer key: {e}"))?;
        let encoding =
            EncodingKey::from_ec_pem(pem.expose()).map_err(|e| format!("token signer key: {e}"))?;
        let spki = key.spki_der();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let kid = b64.encode(&ring::digest::digest(&ring::digest::SHA256, &spki).as_ref()[..16]);
        // An uncompressed P-256 point is the last 65 bytes of the SPKI: 0x04 || x || y.
        let point = &spki[spki.len() - 65..];
        if point[0] != 4 {
            return Err("token signer key is not an uncompressed P-256 key".into());
        }
        let jwks = serde_json::json!({
            "keys": [{
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
            }]
        })
        .to_string();
        Ok(Self {
            encoding,
            kid,
            jwks,
        })
    }

    /// The JWKS (JSON) with the signer's public key.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// Mints a token.
    pub fn mint(&self, spec: &TokenSpec, now: SystemTime) -> Result<String, String> {
        let iat = unix_secs(now);
        let uid = |kind: &str, name: &str| {
            // Stable, UUID-shaped identifiers derived from the names, so
            // repeated tokens for one pod carry the same uid.
            let d =
                ring::digest::digest(&ring::digest::SHA256, format!("{kind}/{name}").as_bytes());
            let h = hex::encode(&d.as_ref()[..16]);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            )
        };
        let ns = spec.workload.namespace.as_str();
        let sa = spec.workload.service_account.as_str();
        let claims = K8sClaims {
            iss: spec.issuer.clone(),
            sub: spec.workload.username(),
            aud: spec.audiences.clone(),
            exp: iat + spec.ttl.as_secs(),
            iat: Some(iat),
            nbf: Some(iat),
            kubernetes: Some(K8sInfo {
                namespace: ns.to_string(),
                serviceaccount: NameUid {
                    name: sa.to_string(),
                    uid: uid("sa", &format!("{ns}/{sa}")),
                },
                pod: spec.pod.as_ref().map(|p| NameUid {
                    name: p.clone(),
                    uid: uid("pod", &format!("{ns}/{p}")),
                }),
            }),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn minted_tokens_have_the_kubernetes_shape_and_verify() {
        let key = CaKey::generate_p256().unwrap().to_pem();
        let signer = DevSigner::from_pem(&key).unwrap();
        let now = SystemTime::now();
        let t = signer
            .mint(
                &TokenSpec {
                    workload: Workload::new("shop", "web").unwrap(),
                    audiences: vec!["meshca".into()],
                    ttl: Duration::from_secs(600),
                    issuer: DEV_ISSUER.into(),
                    pod: Some("web-1".into()),
                },
                now,
            )
            .unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert!(header["kid"].is_string());
        let c: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(c["iss"], DEV_ISSUER);
        assert_eq!(c["sub"], "system:serviceaccount:shop:web");
        assert_eq!(c["aud"], serde_json::json!(["meshca"]));
        let iat = c["iat"].as_u64().unwrap();
        assert_eq!(c["nbf"].as_u64().unwrap(), iat);
        assert_eq!(c["exp"].as_u64().unwrap(), iat + 600);
        let k = &c["kubernetes.io"];
        assert_eq!(k["namespace"], "shop");
        assert_eq!(k["serviceaccount"]["name"], "web");
        assert_eq!(k["pod"]["name"], "web-1");
        for uid in [&k["serviceaccount"]["uid"], &k["pod"]["uid"]] {
            assert_eq!(uid.as_str().unwrap().len(), 36, "UUID-shaped uid");
        }
        // And the JWKS the signer publishes verifies it.
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(signer.jwks()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&set.keys[0]).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
        v.set_audience(&["meshca"]);
        jsonwebtoken::decode::<serde_json::Value>(&t, &key, &v).unwrap();
    }
}
