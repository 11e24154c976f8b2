"""The Python SPIFFE library (PyPI `spiffe`) reading federated bundles from a
Workload API socket: fetch_x509_context (X509SVIDResponse.federated_bundles
merged with the SVID's own bundle) and fetch_x509_bundles.

Usage: spiffe_federated.py SOCKET
Prints one JSON object (the last stdout line): for each method, every trust
domain the library holds and the SHA-256 fingerprints of its authorities.
The Rust test compares it with the roots it served. Exits non-zero on any
failure.
"""

import hashlib
import json
import sys

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient


def fp(cert):
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def describe(bundle_set):
    return {
        b.trust_domain.name: sorted(fp(c) for c in b.x509_authorities)
        for b in bundle_set.bundles
    }


def main():
    socket = sys.argv[1]
    with WorkloadApiClient("unix://" + socket, default_timeout=10) as client:
        ctx = client.fetch_x509_context()
        out = {
            "spiffe_id": str(ctx.default_svid.spiffe_id),
            "fetch_x509_context": describe(ctx.x509_bundle_set),
            "fetch_x509_bundles": describe(client.fetch_x509_bundles()),
        }
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
