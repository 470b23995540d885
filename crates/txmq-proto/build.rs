//! Compiles the `.proto` files under `proto/` with the pure-Rust `protox`
//! compiler (no system `protoc` needed) and feeds the resulting descriptor set
//! to `tonic-prost-build`, which emits prost message types plus tonic server
//! and client stubs into `OUT_DIR`.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

/// Proto sources, relative to the `proto/` include root.
const PROTOS: &[&str] = &[
    "apache/rocketmq/v2/definition.proto",
    "apache/rocketmq/v2/service.proto",
    "apache/rocketmq/v2/admin.proto",
    "txmq/v1/transactions.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let include = manifest_dir.join("proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", include.display());

    // `protox::compile` resolves the google/protobuf well-known imports from
    // its bundled copies and includes imported files in the set.
    let fds = protox::compile(PROTOS, [&include])?;

    // Keep an encoded copy for gRPC reflection (see `FILE_DESCRIPTOR_SET`).
    fs::write(
        out_dir.join("txmq_proto_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Message bodies as `Bytes`: cloning a message (to send it again) shares its body,
        // and a received body is a slice of the buffer it arrived in.
        .bytes(".apache.rocketmq.v2.Message.body")
        .compile_fds(fds)?;

    Ok(())
}
