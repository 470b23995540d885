//! Wire-level facts about the generated `apache.rocketmq.v2` types.
//!
//! Expected field numbers, wire types and enum values below are taken from
//! the public apache/rocketmq-apis definitions; if one of these tests fails
//! the generated code is no longer wire compatible with official clients.

use std::collections::HashMap;

use prost::Message as _;
use prost_types::{
    Duration, FileDescriptorSet, Timestamp, field_descriptor_proto::Label,
    field_descriptor_proto::Type,
};
use txmq_proto::v2::{
    self, ClientType, Code, Encoding, EndTransactionRequest, Language, LiteSubscriptionAction,
    Message, MessageType, Permission, QueryOffsetPolicy, ReceiveMessageResponse,
    RecoverOrphanedTransactionCommand, Resource, SendMessageRequest, SendResultEntry,
    SystemProperties, TelemetryCommand, TransactionResolution, TransactionSource,
    receive_message_response, telemetry_command,
};

// ---------------------------------------------------------------------------
// A tiny, independent protobuf wire reader used to inspect encoded bytes.
// ---------------------------------------------------------------------------

const VARINT: u8 = 0;
const LEN: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field<'a> {
    number: u32,
    wire_type: u8,
    value: Value<'a>,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut out = 0u64;
    let mut shift = 0;
    loop {
        let byte = buf[*pos];
        *pos += 1;
        out |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return out;
        }
        shift += 7;
        assert!(shift < 64, "varint too long");
    }
}

/// Splits one encoded message into its top-level fields, in wire order.
fn fields(buf: &[u8]) -> Vec<Field<'_>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos);
        let number = u32::try_from(key >> 3).expect("field number fits u32");
        let wire_type = (key & 7) as u8;
        let value = match wire_type {
            VARINT => Value::Varint(read_varint(buf, &mut pos)),
            LEN => {
                let len = usize::try_from(read_varint(buf, &mut pos)).unwrap();
                let bytes = &buf[pos..pos + len];
                pos += len;
                Value::Bytes(bytes)
            }
            other => panic!("unexpected wire type {other} for field {number}"),
        };
        out.push(Field {
            number,
            wire_type,
            value,
        });
    }
    out
}

/// (field number, wire type) pairs of an encoded message.
fn layout(buf: &[u8]) -> Vec<(u32, u8)> {
    fields(buf)
        .iter()
        .map(|f| (f.number, f.wire_type))
        .collect()
}

fn only_bytes(buf: &[u8], number: u32) -> &[u8] {
    let matching: Vec<_> = fields(buf)
        .into_iter()
        .filter(|f| f.number == number)
        .collect();
    assert_eq!(matching.len(), 1, "expected exactly one field {number}");
    match matching[0].value {
        Value::Bytes(b) => b,
        Value::Varint(_) => panic!("field {number} is a varint"),
    }
}

fn only_varint(buf: &[u8], number: u32) -> u64 {
    let matching: Vec<_> = fields(buf)
        .into_iter()
        .filter(|f| f.number == number)
        .collect();
    assert_eq!(matching.len(), 1, "expected exactly one field {number}");
    match matching[0].value {
        Value::Varint(v) => v,
        Value::Bytes(_) => panic!("field {number} is length-delimited"),
    }
}

/// Protobuf key bytes (varint of `(number << 3) | wire_type`).
fn key(number: u32, wire_type: u8) -> Vec<u8> {
    let mut v = (u64::from(number) << 3) | u64::from(wire_type);
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn transactional_message() -> Message {
    Message {
        topic: Some(Resource {
            resource_namespace: String::new(),
            name: "orders".to_owned(),
        }),
        user_properties: HashMap::from([("region".to_owned(), "eu".to_owned())]),
        system_properties: Some(SystemProperties {
            tag: Some("created".to_owned()),
            keys: vec!["order-1".to_owned(), "customer-9".to_owned()],
            message_id: "01J9Z0000000000000000000AB".to_owned(),
            body_encoding: Encoding::Identity as i32,
            message_type: MessageType::Transaction as i32,
            born_timestamp: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            }),
            born_host: "10.0.0.7".to_owned(),
            delivery_timestamp: Some(Timestamp {
                seconds: 1_700_000_060,
                nanos: 0,
            }),
            message_group: Some("customer-9".to_owned()),
            orphaned_transaction_recovery_duration: Some(Duration {
                seconds: 30,
                nanos: 0,
            }),
            ..Default::default()
        }),
        body: b"{\"order\":1}".to_vec().into(),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn send_message_request_uses_public_field_numbers() {
    let request = SendMessageRequest {
        messages: vec![transactional_message()],
    };
    let bytes = request.encode_to_vec();

    // SendMessageRequest.messages = 1 (repeated Message).
    assert_eq!(bytes[0], (1 << 3) | 2);
    assert_eq!(layout(&bytes), vec![(1, LEN)]);

    // Message: topic = 1, user_properties = 2 (map entry), system_properties
    // = 3, body = 4; all length-delimited.
    let message = only_bytes(&bytes, 1);
    assert_eq!(
        layout(message),
        vec![(1, LEN), (2, LEN), (3, LEN), (4, LEN)]
    );
    assert_eq!(only_bytes(message, 4), b"{\"order\":1}");

    // Resource: resource_namespace = 1 (empty, so omitted), name = 2.
    let topic = only_bytes(message, 1);
    assert_eq!(layout(topic), vec![(2, LEN)]);
    assert_eq!(only_bytes(topic, 2), b"orders");

    // A map<string, string> entry is a nested message with key = 1, value = 2.
    let entry = only_bytes(message, 2);
    assert_eq!(layout(entry), vec![(1, LEN), (2, LEN)]);
    assert_eq!(only_bytes(entry, 1), b"region");
    assert_eq!(only_bytes(entry, 2), b"eu");

    // SystemProperties field numbers and wire types.
    let props = only_bytes(message, 3);
    assert_eq!(
        layout(props),
        vec![
            (1, LEN),    // tag
            (2, LEN),    // keys[0]
            (2, LEN),    // keys[1]
            (3, LEN),    // message_id
            (5, VARINT), // body_encoding
            (6, VARINT), // message_type
            (7, LEN),    // born_timestamp
            (8, LEN),    // born_host
            (11, LEN),   // delivery_timestamp
            (17, LEN),   // message_group
            (19, LEN),   // orphaned_transaction_recovery_duration
        ]
    );
    assert_eq!(only_bytes(props, 1), b"created");
    assert_eq!(only_bytes(props, 3), b"01J9Z0000000000000000000AB");
    assert_eq!(only_varint(props, 5), 1, "Encoding.IDENTITY");
    assert_eq!(only_varint(props, 6), 4, "MessageType.TRANSACTION");
    assert_eq!(only_bytes(props, 17), b"customer-9");

    // Raw key bytes, computed as (N << 3) | wire_type, varint encoded.
    assert_eq!(props[0], 0x0a, "tag: (1 << 3) | 2");
    assert!(contains(props, &[0x28, 0x01]), "body_encoding = IDENTITY");
    assert!(contains(props, &[0x30, 0x04]), "message_type = TRANSACTION");
    assert_eq!(key(17, LEN), [0x8a, 0x01]);
    assert!(
        contains(props, &[0x8a, 0x01, 10]),
        "message_group key + len"
    );
    assert_eq!(key(19, LEN), [0x9a, 0x01]);
    assert!(contains(props, &key(19, LEN)));

    // google.protobuf.Timestamp: seconds = 1, nanos = 2 (both varints).
    let born = only_bytes(props, 7);
    assert_eq!(only_varint(born, 1), 1_700_000_000);
    assert_eq!(only_varint(born, 2), 5_000_000);
    // google.protobuf.Duration: seconds = 1.
    let orphan = only_bytes(props, 19);
    assert_eq!(layout(orphan), vec![(1, VARINT)]);
    assert_eq!(only_varint(orphan, 1), 30);

    // Round trip.
    let decoded = SendMessageRequest::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded, request);
}

#[test]
fn proto3_optional_fields_are_sent_even_when_zero() {
    // `optional` scalars carry presence: Some(0) must still hit the wire,
    // while plain proto3 scalars at their default are omitted.
    let props = SystemProperties {
        queue_id: 0,
        queue_offset: Some(0),
        delivery_attempt: Some(0),
        ..Default::default()
    };
    let bytes = props.encode_to_vec();
    assert_eq!(layout(&bytes), vec![(14, VARINT), (16, VARINT)]);

    let decoded = SystemProperties::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded.queue_offset, Some(0));
    assert_eq!(decoded.delivery_attempt, Some(0));
    assert_eq!(decoded.receipt_handle, None);
}

#[test]
fn lite_topic_and_priority_use_fields_21_and_22() {
    let props = SystemProperties {
        dead_letter_queue: Some(v2::DeadLetterQueue {
            topic: "orders".to_owned(),
            message_id: "m1".to_owned(),
        }),
        lite_topic: Some("chat-42".to_owned()),
        priority: Some(7),
        ..Default::default()
    };
    let bytes = props.encode_to_vec();
    assert_eq!(layout(&bytes), vec![(20, LEN), (21, LEN), (22, VARINT)]);
    assert!(contains(&bytes, &[0xaa, 0x01, 7]), "lite_topic key + len");
    assert!(contains(&bytes, &[0xb0, 0x01, 7]), "priority key + value");
}

#[test]
fn end_transaction_request_uses_public_field_numbers() {
    let request = EndTransactionRequest {
        topic: Some(Resource {
            resource_namespace: "ns".to_owned(),
            name: "orders".to_owned(),
        }),
        message_id: "m1".to_owned(),
        transaction_id: "tx1".to_owned(),
        resolution: TransactionResolution::Rollback as i32,
        source: TransactionSource::SourceServerCheck as i32,
        trace_context: "trace".to_owned(),
    };
    let bytes = request.encode_to_vec();
    assert_eq!(
        layout(&bytes),
        vec![
            (1, LEN),
            (2, LEN),
            (3, LEN),
            (4, VARINT),
            (5, VARINT),
            (6, LEN)
        ]
    );
    assert_eq!(only_bytes(&bytes, 3), b"tx1");
    assert_eq!(only_varint(&bytes, 4), 2, "ROLLBACK");
    assert_eq!(only_varint(&bytes, 5), 2, "SOURCE_SERVER_CHECK");
    assert_eq!(
        EndTransactionRequest::decode(bytes.as_slice()).unwrap(),
        request
    );
}

#[test]
fn send_result_entry_carries_recall_handle_as_field_5() {
    let entry = SendResultEntry {
        status: Some(v2::Status {
            code: Code::Ok as i32,
            message: "OK".to_owned(),
        }),
        message_id: "m1".to_owned(),
        transaction_id: "tx1".to_owned(),
        offset: 42,
        recall_handle: "handle".to_owned(),
    };
    let bytes = entry.encode_to_vec();
    assert_eq!(
        layout(&bytes),
        vec![(1, LEN), (2, LEN), (3, LEN), (4, VARINT), (5, LEN)]
    );
    // Status.code = 1 holds the numeric Code.
    assert_eq!(only_varint(only_bytes(&bytes, 1), 1), 20000);
    assert_eq!(only_varint(&bytes, 4), 42);
}

#[test]
fn telemetry_and_receive_oneofs_use_public_field_numbers() {
    let recover = TelemetryCommand {
        status: None,
        command: Some(
            telemetry_command::Command::RecoverOrphanedTransactionCommand(
                RecoverOrphanedTransactionCommand {
                    message: Some(transactional_message()),
                    transaction_id: "tx1".to_owned(),
                },
            ),
        ),
    };
    let bytes = recover.encode_to_vec();
    assert_eq!(layout(&bytes), vec![(5, LEN)]);
    assert_eq!(
        layout(only_bytes(&bytes, 5)),
        vec![(1, LEN), (2, LEN)],
        "RecoverOrphanedTransactionCommand: message = 1, transaction_id = 2"
    );
    assert_eq!(TelemetryCommand::decode(bytes.as_slice()).unwrap(), recover);

    let settings = TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(v2::Settings {
            client_type: Some(ClientType::Producer as i32),
            ..Default::default()
        })),
    };
    let bytes = settings.encode_to_vec();
    assert_eq!(layout(&bytes), vec![(2, LEN)]);
    assert_eq!(only_varint(only_bytes(&bytes, 2), 1), 1, "PRODUCER");

    let reconnect = TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::ReconnectEndpointsCommand(
            v2::ReconnectEndpointsCommand {
                nonce: "n".to_owned(),
            },
        )),
    };
    assert_eq!(layout(&reconnect.encode_to_vec()), vec![(8, LEN)]);

    let delivery = ReceiveMessageResponse {
        content: Some(receive_message_response::Content::DeliveryTimestamp(
            Timestamp {
                seconds: 1,
                nanos: 0,
            },
        )),
    };
    assert_eq!(layout(&delivery.encode_to_vec()), vec![(3, LEN)]);
}

#[test]
fn code_values_match_public_definition() {
    let expected = [
        (Code::Unspecified, 0, "CODE_UNSPECIFIED"),
        (Code::Ok, 20000, "OK"),
        (Code::MultipleResults, 30000, "MULTIPLE_RESULTS"),
        (Code::BadRequest, 40000, "BAD_REQUEST"),
        (Code::IllegalTopic, 40002, "ILLEGAL_TOPIC"),
        (Code::IllegalConsumerGroup, 40003, "ILLEGAL_CONSUMER_GROUP"),
        (Code::InvalidTransactionId, 40008, "INVALID_TRANSACTION_ID"),
        (Code::IllegalInvisibleTime, 40011, "ILLEGAL_INVISIBLE_TIME"),
        (Code::IllegalDeliveryTime, 40012, "ILLEGAL_DELIVERY_TIME"),
        (Code::InvalidReceiptHandle, 40013, "INVALID_RECEIPT_HANDLE"),
        (
            Code::MessagePropertyConflictWithType,
            40014,
            "MESSAGE_PROPERTY_CONFLICT_WITH_TYPE",
        ),
        (
            Code::UnrecognizedClientType,
            40015,
            "UNRECOGNIZED_CLIENT_TYPE",
        ),
        (Code::ClientIdRequired, 40017, "CLIENT_ID_REQUIRED"),
        (Code::IllegalLiteTopic, 40020, "ILLEGAL_LITE_TOPIC"),
        (Code::Unauthorized, 40100, "UNAUTHORIZED"),
        (Code::Forbidden, 40300, "FORBIDDEN"),
        (Code::NotFound, 40400, "NOT_FOUND"),
        (Code::MessageNotFound, 40401, "MESSAGE_NOT_FOUND"),
        (Code::TopicNotFound, 40402, "TOPIC_NOT_FOUND"),
        (
            Code::ConsumerGroupNotFound,
            40403,
            "CONSUMER_GROUP_NOT_FOUND",
        ),
        (Code::OffsetNotFound, 40404, "OFFSET_NOT_FOUND"),
        (Code::RequestTimeout, 40800, "REQUEST_TIMEOUT"),
        (Code::MessageBodyTooLarge, 41301, "MESSAGE_BODY_TOO_LARGE"),
        (Code::MessageBodyEmpty, 41302, "MESSAGE_BODY_EMPTY"),
        (Code::PreconditionFailed, 42800, "PRECONDITION_FAILED"),
        (Code::TooManyRequests, 42900, "TOO_MANY_REQUESTS"),
        (
            Code::MessagePropertiesTooLarge,
            43101,
            "MESSAGE_PROPERTIES_TOO_LARGE",
        ),
        (Code::InternalError, 50000, "INTERNAL_ERROR"),
        (Code::InternalServerError, 50001, "INTERNAL_SERVER_ERROR"),
        (Code::HaNotAvailable, 50002, "HA_NOT_AVAILABLE"),
        (Code::NotImplemented, 50100, "NOT_IMPLEMENTED"),
        (Code::ProxyTimeout, 50400, "PROXY_TIMEOUT"),
        (
            Code::MasterPersistenceTimeout,
            50401,
            "MASTER_PERSISTENCE_TIMEOUT",
        ),
        (
            Code::SlavePersistenceTimeout,
            50402,
            "SLAVE_PERSISTENCE_TIMEOUT",
        ),
        (Code::Unsupported, 50500, "UNSUPPORTED"),
        (Code::VersionUnsupported, 50501, "VERSION_UNSUPPORTED"),
        (
            Code::VerifyFifoMessageUnsupported,
            50502,
            "VERIFY_FIFO_MESSAGE_UNSUPPORTED",
        ),
        (
            Code::FailedToConsumeMessage,
            60000,
            "FAILED_TO_CONSUME_MESSAGE",
        ),
    ];
    for (code, value, name) in expected {
        assert_eq!(code as i32, value, "{name}");
        assert_eq!(code.as_str_name(), name);
        assert_eq!(Code::try_from(value), Ok(code));
    }
}

#[test]
fn message_and_transaction_enums_match_public_definition() {
    assert_eq!(MessageType::Unspecified as i32, 0);
    assert_eq!(MessageType::Normal as i32, 1);
    assert_eq!(MessageType::Fifo as i32, 2);
    assert_eq!(MessageType::Delay as i32, 3);
    assert_eq!(MessageType::Transaction as i32, 4);
    assert_eq!(MessageType::Lite as i32, 5);
    assert_eq!(MessageType::Priority as i32, 6);
    assert_eq!(MessageType::Transaction.as_str_name(), "TRANSACTION");

    assert_eq!(TransactionResolution::Unspecified as i32, 0);
    assert_eq!(TransactionResolution::Commit as i32, 1);
    assert_eq!(TransactionResolution::Rollback as i32, 2);
    assert_eq!(
        TransactionResolution::Unspecified.as_str_name(),
        "TRANSACTION_RESOLUTION_UNSPECIFIED"
    );

    assert_eq!(TransactionSource::SourceUnspecified as i32, 0);
    assert_eq!(TransactionSource::SourceClient as i32, 1);
    assert_eq!(TransactionSource::SourceServerCheck as i32, 2);

    assert_eq!(Encoding::Identity as i32, 1);
    assert_eq!(Encoding::Gzip as i32, 2);

    assert_eq!(Permission::None as i32, 1);
    assert_eq!(Permission::ReadWrite as i32, 4);

    assert_eq!(QueryOffsetPolicy::Beginning as i32, 0);
    assert_eq!(QueryOffsetPolicy::End as i32, 1);
    assert_eq!(QueryOffsetPolicy::Timestamp as i32, 2);

    assert_eq!(LiteSubscriptionAction::PartialAdd as i32, 0);
    assert_eq!(LiteSubscriptionAction::CompleteRemove as i32, 3);
}

#[test]
fn client_type_and_language_values_match_public_definition() {
    assert_eq!(ClientType::Unspecified as i32, 0);
    assert_eq!(ClientType::Producer as i32, 1);
    assert_eq!(ClientType::PushConsumer as i32, 2);
    assert_eq!(ClientType::SimpleConsumer as i32, 3);
    assert_eq!(ClientType::PullConsumer as i32, 4);
    assert_eq!(ClientType::LitePushConsumer as i32, 5);
    assert_eq!(ClientType::LiteSimpleConsumer as i32, 6);
    assert_eq!(ClientType::SimpleConsumer.as_str_name(), "SIMPLE_CONSUMER");

    assert_eq!(Language::Java as i32, 1);
    assert_eq!(Language::Golang as i32, 4);
    assert_eq!(Language::Rust as i32, 5);
    assert_eq!(Language::Kotlin as i32, 12);
}

// ---------------------------------------------------------------------------
// Descriptor-level checks (FILE_DESCRIPTOR_SET)
// ---------------------------------------------------------------------------

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(txmq_proto::FILE_DESCRIPTOR_SET).expect("valid descriptor set")
}

#[test]
fn file_descriptor_set_lists_messaging_service_rpcs() {
    let fds = descriptor_set();
    let names: Vec<_> = fds.file.iter().map(|f| f.name()).collect();
    for expected in [
        "apache/rocketmq/v2/definition.proto",
        "apache/rocketmq/v2/service.proto",
        "apache/rocketmq/v2/admin.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/duration.proto",
    ] {
        assert!(names.contains(&expected), "missing {expected} in {names:?}");
    }

    let service_file = fds
        .file
        .iter()
        .find(|f| f.name() == "apache/rocketmq/v2/service.proto")
        .unwrap();
    assert_eq!(service_file.package(), txmq_proto::PACKAGE);
    let service = service_file
        .service
        .iter()
        .find(|s| s.name() == "MessagingService")
        .expect("MessagingService");

    // (rpc, request, response, client streaming, server streaming)
    let expected = [
        (
            "QueryRoute",
            "QueryRouteRequest",
            "QueryRouteResponse",
            false,
            false,
        ),
        (
            "Heartbeat",
            "HeartbeatRequest",
            "HeartbeatResponse",
            false,
            false,
        ),
        (
            "SendMessage",
            "SendMessageRequest",
            "SendMessageResponse",
            false,
            false,
        ),
        (
            "QueryAssignment",
            "QueryAssignmentRequest",
            "QueryAssignmentResponse",
            false,
            false,
        ),
        (
            "ReceiveMessage",
            "ReceiveMessageRequest",
            "ReceiveMessageResponse",
            false,
            true,
        ),
        (
            "AckMessage",
            "AckMessageRequest",
            "AckMessageResponse",
            false,
            false,
        ),
        (
            "ForwardMessageToDeadLetterQueue",
            "ForwardMessageToDeadLetterQueueRequest",
            "ForwardMessageToDeadLetterQueueResponse",
            false,
            false,
        ),
        (
            "PullMessage",
            "PullMessageRequest",
            "PullMessageResponse",
            false,
            true,
        ),
        (
            "UpdateOffset",
            "UpdateOffsetRequest",
            "UpdateOffsetResponse",
            false,
            false,
        ),
        (
            "GetOffset",
            "GetOffsetRequest",
            "GetOffsetResponse",
            false,
            false,
        ),
        (
            "QueryOffset",
            "QueryOffsetRequest",
            "QueryOffsetResponse",
            false,
            false,
        ),
        (
            "EndTransaction",
            "EndTransactionRequest",
            "EndTransactionResponse",
            false,
            false,
        ),
        (
            "Telemetry",
            "TelemetryCommand",
            "TelemetryCommand",
            true,
            true,
        ),
        (
            "NotifyClientTermination",
            "NotifyClientTerminationRequest",
            "NotifyClientTerminationResponse",
            false,
            false,
        ),
        (
            "ChangeInvisibleDuration",
            "ChangeInvisibleDurationRequest",
            "ChangeInvisibleDurationResponse",
            false,
            false,
        ),
        (
            "RecallMessage",
            "RecallMessageRequest",
            "RecallMessageResponse",
            false,
            false,
        ),
        (
            "SyncLiteSubscription",
            "SyncLiteSubscriptionRequest",
            "SyncLiteSubscriptionResponse",
            false,
            false,
        ),
    ];
    assert_eq!(service.method.len(), expected.len());
    for (method, (name, input, output, client_streaming, server_streaming)) in
        service.method.iter().zip(expected)
    {
        assert_eq!(method.name(), name);
        assert_eq!(method.input_type(), format!(".apache.rocketmq.v2.{input}"));
        assert_eq!(
            method.output_type(),
            format!(".apache.rocketmq.v2.{output}")
        );
        assert_eq!(method.client_streaming(), client_streaming, "{name}");
        assert_eq!(method.server_streaming(), server_streaming, "{name}");
    }

    let admin = fds
        .file
        .iter()
        .flat_map(|f| f.service.iter())
        .find(|s| s.name() == "Admin")
        .expect("Admin service");
    let admin_methods: Vec<_> = admin.method.iter().map(|m| m.name()).collect();
    assert_eq!(admin_methods, ["ChangeLogLevel"]);
}

#[test]
fn file_descriptor_set_records_public_labels_for_system_properties() {
    let fds = descriptor_set();
    let system_properties = fds
        .file
        .iter()
        .flat_map(|f| f.message_type.iter())
        .find(|m| m.name() == "SystemProperties")
        .expect("SystemProperties");

    // (name, number, type, label, proto3 optional)
    let expected = [
        ("tag", 1, Type::String, Label::Optional, true),
        ("keys", 2, Type::String, Label::Repeated, false),
        ("message_id", 3, Type::String, Label::Optional, false),
        ("body_digest", 4, Type::Message, Label::Optional, false),
        ("body_encoding", 5, Type::Enum, Label::Optional, false),
        ("message_type", 6, Type::Enum, Label::Optional, false),
        ("born_timestamp", 7, Type::Message, Label::Optional, false),
        ("born_host", 8, Type::String, Label::Optional, false),
        ("store_timestamp", 9, Type::Message, Label::Optional, true),
        ("store_host", 10, Type::String, Label::Optional, false),
        (
            "delivery_timestamp",
            11,
            Type::Message,
            Label::Optional,
            true,
        ),
        ("receipt_handle", 12, Type::String, Label::Optional, true),
        ("queue_id", 13, Type::Int32, Label::Optional, false),
        ("queue_offset", 14, Type::Int64, Label::Optional, true),
        (
            "invisible_duration",
            15,
            Type::Message,
            Label::Optional,
            true,
        ),
        ("delivery_attempt", 16, Type::Int32, Label::Optional, true),
        ("message_group", 17, Type::String, Label::Optional, true),
        ("trace_context", 18, Type::String, Label::Optional, true),
        (
            "orphaned_transaction_recovery_duration",
            19,
            Type::Message,
            Label::Optional,
            true,
        ),
        (
            "dead_letter_queue",
            20,
            Type::Message,
            Label::Optional,
            true,
        ),
        ("lite_topic", 21, Type::String, Label::Optional, true),
        ("priority", 22, Type::Int32, Label::Optional, true),
    ];
    assert_eq!(system_properties.field.len(), expected.len());
    for (field, (name, number, ty, label, proto3_optional)) in
        system_properties.field.iter().zip(expected)
    {
        assert_eq!(field.name(), name);
        assert_eq!(field.number(), number, "{name}");
        assert_eq!(field.r#type(), ty, "{name}");
        assert_eq!(field.label(), label, "{name}");
        assert_eq!(field.proto3_optional(), proto3_optional, "{name}");
    }
}

#[test]
fn server_and_client_stubs_are_named_after_public_services() {
    assert_eq!(
        v2::messaging_service_server::SERVICE_NAME,
        "apache.rocketmq.v2.MessagingService"
    );
    assert_eq!(v2::admin_server::SERVICE_NAME, "apache.rocketmq.v2.Admin");

    // Type-level check that both sides of both services were generated.
    fn _stubs<S, A>(messaging: S, admin: A)
    where
        S: v2::messaging_service_server::MessagingService,
        A: v2::admin_server::Admin,
    {
        let _ = v2::messaging_service_server::MessagingServiceServer::new(messaging);
        let _ = v2::admin_server::AdminServer::new(admin);
        let _ =
            v2::messaging_service_client::MessagingServiceClient::<tonic::transport::Channel>::new;
        let _ = v2::admin_client::AdminClient::<tonic::transport::Channel>::new;
    }
}
