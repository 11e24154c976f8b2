"""Raw grpcio over TLS to the CA's TCP gRPC port with a chosen `:authority`.

Usage: grpc_tcp_authority.py HOST:PORT SERVER_NAME BUNDLE_PEM AUTHORITY
Calls meshca.v1.Identity/GetTrustBundle (an empty request) and prints one
JSON object: the gRPC status code name and details. The TCP listener keeps
h2's full validation, so a malformed authority must be refused there.
"""

import json
import sys

import grpc


def main():
    addr, server_name, bundle, authority = sys.argv[1:5]
    with open(bundle, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", authority),
    ]
    with grpc.secure_channel(addr, creds, options=options) as ch:
        call = ch.unary_unary("/meshca.v1.Identity/GetTrustBundle")
        try:
            reply = call(b"", timeout=10)
            print(json.dumps({"code": "OK", "reply_bytes": len(reply)}))
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details()}))


if __name__ == "__main__":
    main()
