"""JWT-SVIDs through clients we did not write: the Python SPIFFE library
(PyPI `spiffe`: fetch_jwt_svid, fetch_jwt_bundles, validate_jwt_svid, and its
own local JwtSvid.parse_and_validate), and PyJWT verifying the fetched token
against the raw JWKS that FetchJWTBundles sends (read with raw grpcio).

Usage: spiffe_jwt.py SOCKET TRUST_DOMAIN AUDIENCE
Prints one JSON object (the last stdout line) with what it saw; the Rust test
compares it with its own view. The token itself is never printed (its SHA-256
is). Exits non-zero on any failure.
"""

import hashlib
import json
import sys

import grpc
import jwt
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient


def raw_jwt_bundles(socket):
    """The first FetchJWTBundles message, as sent: trust domain -> JWKS bytes."""
    # The library's own compiled copy of the public proto: compiling ours
    # too would register the same (package-less) messages twice.
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    with grpc.insecure_channel("unix:" + socket) as ch:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
        stream = stub.FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(),
            metadata=[("workload.spiffe.io", "true")],
            timeout=10,
        )
        first = next(iter(stream))
        stream.cancel()
        return dict(first.bundles)


def pyjwt_verify(token, jwks_bytes, audience):
    """PyJWT's own JWK parsing and verification (not the SPIFFE library's)."""
    keys = jwt.PyJWKSet.from_json(jwks_bytes.decode())
    header = jwt.get_unverified_header(token)
    key = next((k for k in keys.keys if k.key_id == header["kid"]), None)
    if key is None:
        raise SystemExit("kid %r not in the JWKS from FetchJWTBundles" % header["kid"])
    claims = jwt.decode(
        token,
        key=key.key,
        algorithms=[key.algorithm_name],
        audience=audience,
        options={"require": ["exp", "aud", "sub"]},
    )
    try:
        jwt.decode(token, key=key.key, algorithms=[key.algorithm_name], audience="not-" + audience)
        wrong_refused = False
    except jwt.InvalidAudienceError:
        wrong_refused = True
    return {
        "sub": claims["sub"],
        "aud": claims["aud"],
        "alg": header["alg"],
        "kid": header["kid"],
        "use": json.loads(jwks_bytes)["keys"][0].get("use"),
        "wrong_audience_refused": wrong_refused,
    }


def main():
    socket, td_name, audience = sys.argv[1], sys.argv[2], sys.argv[3]
    td = TrustDomain(td_name)
    out = {}
    with WorkloadApiClient("unix://" + socket, default_timeout=10) as client:
        svid = client.fetch_jwt_svid({audience})
        token = svid.token
        out["fetch_jwt_svid"] = {
            "spiffe_id": str(svid.spiffe_id),
            "audience": sorted(svid.audience),
            "expiry": svid.expiry,
            "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
        }
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(td)
        if bundle is None:
            raise SystemExit("no JWT bundle for %s in fetch_jwt_bundles" % td_name)
        out["fetch_jwt_bundles"] = sorted(bundle.jwt_authorities.keys())
        checked = client.validate_jwt_svid(token, audience)
        out["validate_jwt_svid"] = str(checked.spiffe_id)
        # The attack: replaying the token to another audience.
        try:
            client.validate_jwt_svid(token, "not-" + audience)
            out["wrong_audience"] = {"refused": False}
        except Exception as e:  # the library's ValidateJwtSvidError
            out["wrong_audience"] = {"refused": True, "type": type(e).__name__, "error": str(e)}
        # The library's own local validation against the fetched bundle.
        local = JwtSvid.parse_and_validate(token, bundle, {audience})
        out["parse_and_validate"] = str(local.spiffe_id)
    raw = raw_jwt_bundles(socket)
    out["raw_bundle_keys"] = sorted(raw.keys())
    out["pyjwt"] = pyjwt_verify(token, raw["spiffe://" + td_name], audience)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
