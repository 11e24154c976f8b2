# meshca container image: build with the Rust toolchain, run on distroless
# (glibc, CA certificates, no shell, no package manager) as a non-root user.
#   docker build -t meshca .
FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN cargo build --release --locked --bin meshca \
    && install -D -m 0755 target/release/meshca /out/meshca \
    && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/meshca /usr/local/bin/meshca
# The default data directory, writable by the runtime user.
COPY --from=build --chown=65532:65532 /out/data /var/lib/meshca
# 65532 is distroless's "nonroot".
USER 65532:65532
EXPOSE 8080 9990
# The binary has no health-check subcommand and the image no shell or curl;
# Kubernetes probes /live and /ready on the admin port instead.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/meshca"]
CMD ["serve", "--listen=0.0.0.0:8080", "--admin-listen=0.0.0.0:9990", "--data-dir=/var/lib/meshca"]
