# syntax=docker/dockerfile:1
# keyhaven's image: the operator binary on distroless/cc (glibc, CA certificates, tzdata,
# user 65532, no shell). glibc rather than a static musl binary because the pkcs11 store
# dlopen()s the HSM vendor's PKCS#11 module, which is built against glibc.
#
#   docker build -t keyhaven:0.1.0 .
#
# Expected size: ~23 MB base + ~23 MB stripped binary = ~46 MB uncompressed (README, "Image").

FROM docker.io/library/rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace member bench/ (keyhaven-bench): cargo reads its manifest, builds nothing of it.
COPY bench ./bench
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keyhaven \
 && cp target/release/keyhaven /keyhaven

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /keyhaven /usr/local/bin/keyhaven
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keyhaven"]
CMD ["run"]
