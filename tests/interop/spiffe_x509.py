"""The Python SPIFFE library (PyPI `spiffe`, on grpcio / gRPC C-core) against
a Workload API socket: fetch_x509_svid, fetch_x509_bundles, and an X509Source
that must receive a renewal.

Usage: spiffe_x509.py SOCKET TRUST_DOMAIN UPDATE_TIMEOUT_SECONDS
Prints one JSON object (the last stdout line) with what it saw; the Rust test
compares it with the CA's own view. Exits non-zero on any failure.
"""

import hashlib
import json
import sys
import threading
import time

from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient, X509Source


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def fp(cert):
    return hashlib.sha256(der(cert)).hexdigest()


def spki(obj):
    return obj.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def describe(svid):
    """The SVID's values a broken agent would get wrong."""
    leaf = svid.leaf
    return {
        "spiffe_id": str(svid.spiffe_id),
        "leaf": fp(leaf),
        "chain": [fp(c) for c in svid.cert_chain],
        # The private key belongs to the leaf's public key.
        "key_matches_cert": spki(svid.private_key.public_key()) == spki(leaf.public_key()),
        "key": hashlib.sha256(
            svid.private_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        ).hexdigest(),
    }


def main():
    socket, td_name, update_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    td = TrustDomain(td_name)
    out = {}
    with WorkloadApiClient("unix://" + socket, default_timeout=10) as client:
        out["fetch_x509_svid"] = describe(client.fetch_x509_svid())
        bundles = client.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(td)
        if bundle is None:
            raise SystemExit(f"no bundle for {td_name} in fetch_x509_bundles")
        out["fetch_x509_bundles"] = sorted(fp(c) for c in bundle.x509_authorities)

    # An X509Source follows the stream; it must see a renewed SVID.
    updated = threading.Event()
    source = X509Source(socket_path="unix://" + socket, timeout_in_seconds=10)
    try:
        first = describe(source.svid)
        source.subscribe_for_updates(updated.set)
        deadline = time.monotonic() + update_timeout
        second = first
        while second["leaf"] == first["leaf"]:
            left = deadline - time.monotonic()
            if left <= 0 or not updated.wait(left):
                raise SystemExit("X509Source saw no renewal within %ss" % update_timeout)
            updated.clear()
            second = describe(source.svid)
        src_bundle = source.get_bundle_for_trust_domain(td)
        out["x509_source"] = {
            "first": first,
            "renewed": second,
            "bundle": sorted(fp(c) for c in src_bundle.x509_authorities),
        }
    finally:
        source.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
