//! The RocketMQ 5 gRPC service (`apache.rocketmq.v2.MessagingService`).

pub mod convert;
mod service;
mod telemetry;

pub use service::Messaging;
