//! Compiles the `.proto` files in `proto/` with protox (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/meshca/v1/meshca.proto",
        "proto/io/linkerd/proxy/identity/identity.proto",
        "proto/istio/v1/auth/ca.proto",
        "proto/spiffe/workload.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
