//! Parsers that cannot be crashed (issue 11, part 8): property tests that
//! feed arbitrary bytes and mutations of valid encodings to every parser
//! that sees untrusted input, and assert no panic, a typed error (and the
//! right gRPC status where it matters), and bounded time and memory per
//! case (a counting allocator measures each case).
//!
//! CI runs the case counts given per property (a few thousand per parser;
//! fewer where a case is an HTTP round trip or writes a data directory).
//! The release run is `PROPTEST_CASES=100000 cargo test --release --test
//! fuzz_parsers` (docs/security.md, "Parsers"). proptest keeps any input
//! that fails in `tests/proptest-regressions/<module>.txt` (committed, and
//! replayed first on every run); the findings are also pinned as explicit
//! regression tests beside their parsers.

mod admin;
mod audit;
mod csr;
mod documents;
mod fixtures;
mod grpc;
mod harness;
mod pem;
mod spiffe_bundle;
#[path = "../support/mod.rs"]
mod support;
mod tokens;

#[global_allocator]
static ALLOC: harness::Counting = harness::Counting;
