"""Raw grpcio (gRPC C-core) against a Workload API socket, from the public
proto (proto/spiffe/workload.proto compiled here with grpcio-tools).

Usage: grpc_raw.py SOCKET TRUST_DOMAIN AUTHORITY UPDATE_TIMEOUT_SECONDS
AUTHORITY is `default` (what C-core sends for a unix: target: the socket
path, percent-encoded), `raw-path` (the path as grpc-java sends it), or any
literal value such as `localhost`.

Fetches an SVID and the bundles, reads the SVID stream until a renewal
arrives, and checks that a request without the security header gets
INVALID_ARGUMENT. Prints one JSON object (last stdout line).
"""

import hashlib
import importlib.resources
import json
import os
import sys
import tempfile
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_proto():
    """Generates workload_pb2(_grpc) from the public proto into a temp dir."""
    out = tempfile.mkdtemp(prefix="workload-proto-")
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main([
        "protoc",
        "-I" + os.path.join(REPO, "proto/spiffe"),
        "-I" + well_known,
        "--python_out=" + out,
        "--grpc_python_out=" + out,
        "workload.proto",
    ])
    if rc != 0:
        raise SystemExit("protoc failed on proto/spiffe/workload.proto")
    sys.path.insert(0, out)


def split_der(blob):
    """Splits concatenated DER certificates (the Workload API's encoding)."""
    certs = []
    while blob:
        if blob[0] != 0x30:
            raise SystemExit("not a DER SEQUENCE")
        first = blob[1]
        if first < 0x80:
            hdr, length = 2, first
        else:
            n = first & 0x7F
            hdr, length = 2 + n, int.from_bytes(blob[2:2 + n], "big")
        certs.append(x509.load_der_x509_certificate(blob[:hdr + length]))
        blob = blob[hdr + length:]
    return certs


def fp(cert):
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def spki(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def describe(svid):
    chain = split_der(svid.x509_svid)
    key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
    sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        "spiffe_id": svid.spiffe_id,
        "uri_sans": [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)],
        "leaf": fp(chain[0]),
        "chain": [fp(c) for c in chain],
        "key_matches_cert": spki(key.public_key()) == spki(chain[0].public_key()),
        "key": hashlib.sha256(svid.x509_svid_key).hexdigest(),
        "bundle": sorted(fp(c) for c in split_der(svid.bundle)),
    }


def main():
    socket, td, authority, update_timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    compile_proto()
    import workload_pb2
    import workload_pb2_grpc

    options = []
    if authority == "raw-path":
        options.append(("grpc.default_authority", socket))
    elif authority != "default":
        options.append(("grpc.default_authority", authority))
    header = [("workload.spiffe.io", "true")]
    out = {}
    with grpc.insecure_channel("unix:" + socket, options=options) as ch:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
        bundles = next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=header, timeout=10))
        out["bundles"] = {k: sorted(fp(c) for c in split_der(v)) for k, v in bundles.bundles.items()}

        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=header, timeout=update_timeout + 10)
        first = next(stream)
        out["svid"] = describe(first.svids[0])
        deadline = time.monotonic() + update_timeout
        for resp in stream:
            renewed = describe(resp.svids[0])
            if renewed["leaf"] != out["svid"]["leaf"]:
                out["renewed"] = renewed
                break
            if time.monotonic() > deadline:
                break
        stream.cancel()
        if "renewed" not in out:
            raise SystemExit("no renewal on the FetchX509SVID stream within %ss" % update_timeout)

        # The security header is still required through the adapter.
        try:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10))
            out["without_header"] = "OK"
        except grpc.RpcError as e:
            out["without_header"] = e.code().name
            out["without_header_message"] = e.details()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
