//! Wire types and gRPC stubs for the Apache RocketMQ 5 protocol
//! (`apache.rocketmq.v2`), as spoken by the official RocketMQ 5 client SDKs.
//!
//! The `.proto` files under `proto/apache/rocketmq/v2/` are txmq's own
//! rendition of the public protocol. Message, enum, service and RPC names,
//! field numbers, field types, labels (`repeated` / `optional` / `map` /
//! `oneof`) and enum values follow the public
//! [apache/rocketmq-apis](https://github.com/apache/rocketmq-apis) definitions
//! at the post-2.1.x state of its `main` branch. That state was read from
//! verbatim copies of the upstream files (apache/rocketmq-clients
//! `python/rocketmq/grpc_protocol/proto/service.proto` @ `829a196b`,
//! `nodejs/protos/apache/rocketmq/v2/definition.proto` @ `e8a93b91`, and a
//! copy of upstream `definition.proto` that already includes `priority`),
//! because no single rocketmq-apis commit with every newer field was
//! available. It includes `RecallMessage`, the pull-consumer RPCs
//! (`PullMessage`, `UpdateOffset`, `GetOffset`, `QueryOffset`), lite topics
//! (`SyncLiteSubscription`, `SystemProperties.lite_topic` = 21,
//! `OffsetOption`) and priority messages (`SystemProperties.priority` = 22,
//! `MessageType::Priority` = 6). Of the `Admin` service only `ChangeLogLevel`
//! (unchanged since rocketmq-apis 2.0) is included.
//!
//! Code is generated at build time by `protox` (a pure-Rust protobuf compiler,
//! so no system `protoc` is needed) and `tonic-prost-build`:
//!
//! * [`v2`] holds the prost message/enum types, the server side
//!   (`v2::messaging_service_server`, `v2::admin_server`) and the client side
//!   (`v2::messaging_service_client`, `v2::admin_client`).
//! * [`txmq::v1`] holds txmq's own additions (`proto/txmq/v1/`), which reuse the
//!   RocketMQ types: `Transactions.EndTransactions` ends several transactions in one
//!   call. Official clients never call them.
//! * [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set of all four files
//!   plus their well-known imports, e.g. for gRPC server reflection.

pub mod digest;

/// Generated code for protobuf package `apache.rocketmq.v2`.
pub mod v2 {
    #![allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        clippy::nursery,
        rustdoc::all
    )]

    tonic::include_proto!("apache.rocketmq.v2");
}

/// Generated code for protobuf package `txmq.v1`: txmq's own additions to the protocol
/// (`proto/txmq/v1/`), which only the txmq client calls.
pub mod txmq {
    /// The `txmq.v1` package.
    pub mod v1 {
        #![allow(
            missing_docs,
            clippy::all,
            clippy::pedantic,
            clippy::nursery,
            rustdoc::all
        )]

        tonic::include_proto!("txmq.v1");

        /// The most entries an `EndTransactions` call may carry; a server refuses more
        /// with `BAD_REQUEST`.
        pub const MAX_END_TRANSACTIONS: usize = 1024;
    }
}

/// The generated code of `txmq.v1` names the RocketMQ types by their package path.
mod apache {
    pub mod rocketmq {
        pub use crate::v2;
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` covering
/// `apache/rocketmq/v2/{definition,service,admin}.proto`, `txmq/v1/transactions.proto`
/// and the well-known types they import.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/txmq_proto_descriptor.bin"));

/// Fully qualified protobuf package name of the protocol.
pub const PACKAGE: &str = "apache.rocketmq.v2";
