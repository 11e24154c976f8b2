"""PyJWT (with `cryptography`) verifying meshca JWT-SVIDs against a JWKS it
builds itself from the keys the CA publishes (TrustBundle.jwt_authorities:
kid + DER SubjectPublicKeyInfo), as a relying party would.

Usage: jwt_svid_pyjwt.py < input.json
  input:  {"keys": [{"kid": ..., "spki": base64}],
           "tokens": [{"token": ..., "audience": ...}]}
Prints one JSON object (the last stdout line):
  {"jwks": [...public JWKs...],
   "results": [{"ok": bool, "kid": ..., "alg": ..., "typ": ..., "claims": {...}, "error": ...}]}
Each token is verified with the key its `kid` names, for the given audience,
with exp/iat required; a token whose kid is not in the set is an error.
"""

import base64
import json
import sys

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key


def to_jwk(kid, spki_b64):
    key = load_der_public_key(base64.b64decode(spki_b64))
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
        jwk["alg"] = "ES256"
    elif isinstance(key, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
        jwk["alg"] = "RS256"
    else:
        raise ValueError("unexpected key type %r" % type(key))
    jwk["kid"] = kid
    jwk["use"] = "jwt-svid"
    return jwk


def verify(jwks, item):
    out = {"ok": False}
    try:
        header = jwt.get_unverified_header(item["token"])
        out.update(kid=header.get("kid"), alg=header.get("alg"), typ=header.get("typ"))
        key = jwks[header["kid"]]
        claims = jwt.decode(
            item["token"],
            key=key.key,
            algorithms=[key.algorithm_name],
            audience=item["audience"],
            options={"require": ["exp", "iat", "sub", "aud"]},
        )
        out["ok"] = True
        out["claims"] = claims
    except Exception as e:  # the test reads the reason
        out["error"] = "%s: %s" % (type(e).__name__, e)
    return out


def main():
    data = json.load(sys.stdin)
    jwks_doc = {"keys": [to_jwk(k["kid"], k["spki"]) for k in data["keys"]]}
    keyset = jwt.PyJWKSet.from_dict(jwks_doc)
    by_kid = {k.key_id: k for k in keyset.keys}
    results = [verify(by_kid, t) for t in data["tokens"]]
    print(json.dumps({"jwks": jwks_doc["keys"], "results": results}))


if __name__ == "__main__":
    main()
