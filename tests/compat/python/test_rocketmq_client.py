"""The official RocketMQ 5 Python client (rocketmq-python-client 5.1.2) against `txmq serve`.

Each test starts its own clients against the session's broker (see conftest.py) on topics
and groups of its own, and is bounded in time by its receive loops' deadlines.

Client facts these tests rely on (read in the client's source):
- the client talks plaintext gRPC unless `tls_enable=True`; the endpoint is `host:port`;
- `SimpleConsumer.receive(n, invisible_seconds)` picks one queue of the route at random
  per call; `await_duration` (seconds) is the long-polling time;
- `Message.delivery_timestamp` is set in seconds and read back in milliseconds;
- the producer refuses bodies larger than the `max_body_size` the broker announced in its
  settings, before sending anything.
"""

import threading
import time

import grpc
import pytest
from rocketmq import (ClientConfiguration, ConsumeResult, Credentials, FilterExpression, Message,
                      MessageListener, Producer, PushConsumer, SimpleConsumer, TransactionChecker,
                      TransactionResolution)
from rocketmq.grpc_protocol import (Code, MessagingServiceStub, QueryRouteRequest,
                                    SendMessageRequest)
from rocketmq.v5.exception import ClientException

from conftest import unique

MIB = 1 << 20


def config(broker):
    return ClientConfiguration(broker.grpc, Credentials())


def message(topic, body: bytes, tag=None, keys=(), properties=None, group=None, deliver_at=None):
    m = Message()
    m.topic = topic
    m.body = body
    if tag:
        m.tag = tag
    for k in keys:
        m.keys = k
    for k, v in (properties or {}).items():
        m.add_property(k, v)
    if group:
        m.message_group = group
    if deliver_at:
        m.delivery_timestamp = deliver_at
    return m


def simple_consumer(clients, broker, group, topic, await_s=1):
    return clients(SimpleConsumer(config(broker), group, {topic: FilterExpression()}, await_duration=await_s))


def receive_until(consumer, want, seconds, invisible=30, ack=True):
    """Receives until `want` messages came or `seconds` passed; acks each unless told not to."""
    got = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        for m in consumer.receive(32, invisible):
            got.append(m)
            if ack:
                consumer.ack(m)
    return got


def receive_nothing_for(consumer, seconds, invisible=30):
    """Receives for `seconds` and returns whatever came (acked), expected to be nothing."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for m in consumer.receive(32, invisible):
            got.append(m)
            consumer.ack(m)
    return got


def tx_states(broker, state="all"):
    return {t["id"]: t for t in broker.cli_json("tx", "list", "--state", state)}


def wait_for(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


class Checker(TransactionChecker):
    """Answers every check-back with one resolution and counts the checks."""

    def __init__(self, answer):
        self.answer = answer
        self.checked = []

    def check(self, message):
        self.checked.append(message.message_id)
        return self.answer


# --- normal messages ------------------------------------------------------------------------


def test_normal_message_round_trips_body_tag_keys_and_properties_and_is_acked_once(broker, clients):
    topic = broker.topic("normal", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    body = bytes(range(256)) * 4  # every byte value, not only text
    receipt = producer.send(message(topic, body, tag="TagA", keys=("order-1", "order-2"),
                                    properties={"region": "eu", "trace": "x-1"}))
    assert receipt.message_id

    consumer = simple_consumer(clients, broker, group, topic)
    got = receive_until(consumer, 1, 10, ack=False)
    assert len(got) == 1, f"expected the message, got {len(got)}"
    m = got[0]
    assert m.message_id == receipt.message_id
    assert m.topic == topic
    assert m.body == body
    assert m.tag == "TagA"
    assert m.keys == {"order-1", "order-2"}
    assert m.properties == {"region": "eu", "trace": "x-1"}
    assert m.delivery_attempt == 1
    assert m.receipt_handle
    assert not m.corrupted
    consumer.ack(m)

    assert receive_nothing_for(consumer, 2) == [], "an acknowledged message came back"


def test_body_whose_crc32_starts_with_a_zero_digit_is_not_reported_corrupted(broker, clients):
    # The client checks the body digest the broker sends: a CRC32 digest must be 8 hex digits
    # for this client (zero-padded), while the Java client expects no padding; RocketMQ's
    # proxy sends an MD5 digest, which both read the same way.
    topic = broker.topic("normal", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    bodies = [b"m21", b"m25", b"m29"]  # CRC32 03E0D52A, 048D1133, 0D3B5D18
    for body in bodies:
        producer.send(message(topic, body))
    consumer = simple_consumer(clients, broker, group, topic)
    got = receive_until(consumer, len(bodies), 10)
    assert sorted(m.body for m in got) == sorted(bodies)
    corrupted = [m.body for m in got if m.corrupted]
    assert corrupted == [], f"the client found the body digest wrong for {corrupted}"


def test_tag_filter_delivers_only_matching_tags(broker, clients):
    topic = broker.topic("normal", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    for tag in ("A", "B", "C", "B"):
        producer.send(message(topic, f"tag {tag}".encode(), tag=tag))
    consumer = clients(SimpleConsumer(config(broker), group, {topic: FilterExpression("B||C")},
                                      await_duration=1))
    got = receive_until(consumer, 3, 10)
    assert sorted(m.tag for m in got) == ["B", "B", "C"]
    assert receive_nothing_for(consumer, 1.5) == []


def test_one_receive_returns_messages_from_every_queue_of_the_topic(broker, clients):
    # RocketMQ's proxy answers a simple consumer's ReceiveMessage from every queue of the
    # broker named in the request (ReceiveMessageQueueSelector -> the broker's "acting" queue,
    # id -1), whatever queue id the client put in it; the official clients pick a queue of
    # the route per receive and rely on that.
    topic = broker.topic("normal", queues=8)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    sent = {producer.send(message(topic, f"m{i}".encode())).message_id for i in range(8)}
    consumer = simple_consumer(clients, broker, group, topic, await_s=2)
    got = consumer.receive(32, 30)
    for m in got:
        consumer.ack(m)
    assert {m.message_id for m in got} == sent, (
        f"one receive (batch 32) returned {len(got)} of the 8 messages spread over the topic's 8 queues"
    )


# --- transactions ---------------------------------------------------------------------------


def test_committed_transaction_is_delivered(broker, clients):
    topic = broker.topic("transaction", queues=1)
    group = broker.group()
    # Open longer than the first check-back (1 s): answering "unknown" keeps it open.
    checker = Checker(TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED)
    producer = clients(Producer(config(broker), (topic,), checker))
    consumer = simple_consumer(clients, broker, group, topic)

    tx = producer.begin_transaction()
    receipt = producer.send(message(topic, b"paid", tag="order"), tx)
    assert receipt.transaction_id
    assert receive_nothing_for(consumer, 1.5) == [], "a half message was delivered before commit"
    assert tx_states(broker)[receipt.transaction_id]["state"] == "prepared"
    tx.commit()

    got = receive_until(consumer, 1, 10)
    assert [m.message_id for m in got] == [receipt.message_id]
    assert got[0].body == b"paid"
    assert got[0].tag == "order"
    assert tx_states(broker)[receipt.transaction_id]["state"] == "committed"
    assert receive_nothing_for(consumer, 1.5) == [], "a committed transaction was delivered twice"


def test_rolled_back_transaction_is_never_delivered(broker, clients):
    topic = broker.topic("transaction", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,), Checker(TransactionResolution.COMMIT)))
    consumer = simple_consumer(clients, broker, group, topic)

    tx = producer.begin_transaction()
    receipt = producer.send(message(topic, b"cancelled"), tx)
    tx.rollback()

    # Longer than the first check-back (1 s), so a wrongly answered check could not commit it.
    assert receive_nothing_for(consumer, 3) == []
    assert tx_states(broker)[receipt.transaction_id]["state"] == "rolled_back"


def test_check_back_answered_commit_delivers_the_message(broker, clients):
    topic = broker.topic("transaction", queues=1)
    group = broker.group()
    checker = Checker(TransactionResolution.COMMIT)
    producer = clients(Producer(config(broker), (topic,), checker))
    consumer = simple_consumer(clients, broker, group, topic)

    tx = producer.begin_transaction()
    receipt = producer.send(message(topic, b"decided later"), tx)
    # Neither commit nor rollback: the broker must ask the producer.

    got = receive_until(consumer, 1, 15)
    assert [m.message_id for m in got] == [receipt.message_id]
    assert checker.checked and checker.checked[0] == receipt.message_id
    state = wait_for(lambda: tx_states(broker).get(receipt.transaction_id), 5, "the transaction")
    assert state["state"] == "committed"


def test_check_back_answered_rollback_never_delivers_and_is_listed_rolled_back(broker, clients):
    topic = broker.topic("transaction", queues=1)
    group = broker.group()
    checker = Checker(TransactionResolution.ROLLBACK)
    producer = clients(Producer(config(broker), (topic,), checker))
    consumer = simple_consumer(clients, broker, group, topic)

    tx = producer.begin_transaction()
    receipt = producer.send(message(topic, b"decided later"), tx)

    state = wait_for(
        lambda: (t := tx_states(broker).get(receipt.transaction_id)) and t["state"] != "prepared" and t,
        15, "the check-back to resolve the transaction")
    assert state["state"] == "rolled_back", state
    assert checker.checked == [receipt.message_id]
    assert receive_nothing_for(consumer, 2) == []


def test_transaction_whose_checker_answers_unknown_becomes_unresolved_after_max_checks(broker, clients):
    topic = broker.topic("transaction", queues=1)
    group = broker.group()
    checker = Checker(TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED)
    producer = clients(Producer(config(broker), (topic,), checker))
    consumer = simple_consumer(clients, broker, group, topic)

    tx = producer.begin_transaction()
    receipt = producer.send(message(topic, b"nobody knows"), tx)

    # Checks at about 1 s, 1.5 s, 2.5 s; declared unresolved when the 4th would be due (4.5 s).
    unresolved = wait_for(
        lambda: tx_states(broker, "unresolved").get(receipt.transaction_id), 20,
        "the transaction to be listed unresolved")
    assert unresolved["checks"] == 3, unresolved
    assert unresolved["message_id"] == receipt.message_id
    assert unresolved["topic"] == topic
    assert checker.checked == [receipt.message_id] * 3
    assert receive_nothing_for(consumer, 1.5) == []


def test_transaction_whose_remaining_producer_has_no_checker_becomes_unresolved(broker, clients):
    topic = broker.topic("transaction", queues=1)
    sender = Producer(config(broker), (topic,), Checker(TransactionResolution.COMMIT))
    sender.startup()
    try:
        tx = sender.begin_transaction()
        receipt = sender.send(message(topic, b"orphan"), tx)
    finally:
        # The producer that knows the answer goes away before any check-back.
        sender.shutdown()
    # A producer of the same topic without a checker: it gets the check-backs and ignores them.
    clients(Producer(config(broker), (topic,)))

    unresolved = wait_for(
        lambda: tx_states(broker, "unresolved").get(receipt.transaction_id), 25,
        "the transaction to be listed unresolved")
    assert unresolved["checks"] == 3, unresolved


# --- redelivery and dead letters ------------------------------------------------------------


def test_unacked_message_is_redelivered_after_its_invisible_duration_with_attempt_2(broker, clients):
    topic = broker.topic("normal", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    receipt = producer.send(message(topic, b"retry me"))
    consumer = simple_consumer(clients, broker, group, topic)

    first = receive_until(consumer, 1, 10, invisible=2, ack=False)
    assert [m.message_id for m in first] == [receipt.message_id]
    assert first[0].delivery_attempt == 1
    received_at = time.monotonic()

    assert consumer.receive(32, 2) == [], "the message was visible again during its invisible time"

    second = receive_until(consumer, 1, 10, invisible=30, ack=False)
    assert [m.message_id for m in second] == [receipt.message_id]
    assert second[0].delivery_attempt == 2
    assert time.monotonic() - received_at >= 1.9
    assert second[0].receipt_handle != first[0].receipt_handle
    consumer.ack(second[0])
    assert receive_nothing_for(consumer, 3, invisible=1) == []


def test_change_invisible_duration_returns_a_handle_that_acks(broker, clients):
    topic = broker.topic("normal", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    receipt = producer.send(message(topic, b"slow work"))
    consumer = simple_consumer(clients, broker, group, topic)

    got = receive_until(consumer, 1, 10, invisible=2, ack=False)
    assert [m.message_id for m in got] == [receipt.message_id]
    old_handle = got[0].receipt_handle
    consumer.change_invisible_duration(got[0], 10)
    assert got[0].receipt_handle and got[0].receipt_handle != old_handle
    # Past the original 2 s the message stays invisible: the new duration counts.
    assert receive_nothing_for(consumer, 3) == []
    consumer.ack(got[0])


def test_message_never_acked_goes_to_the_dead_letter_queue_after_max_attempts(broker, clients):
    topic = broker.topic("normal", queues=1)
    group = broker.group(max_attempts=2)
    producer = clients(Producer(config(broker), (topic,)))
    receipt = producer.send(message(topic, b"poison", tag="bad"))
    consumer = simple_consumer(clients, broker, group, topic)

    attempts = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(attempts) < 3:
        for m in consumer.receive(32, 1):
            assert m.message_id == receipt.message_id
            attempts.append(m.delivery_attempt)
        dlq = broker.cli_json("dlq", "list", group)
        if dlq["count"] >= 1 and len(attempts) >= 2:
            break
    assert attempts == [1, 2], f"delivery attempts {attempts}"

    dlq = wait_for(lambda: (d := broker.cli_json("dlq", "list", group)) and d["count"] == 1 and d, 5,
                   "the message in the dead-letter queue")
    assert dlq["topic"] == f"%DLQ%{group}"
    [dead] = dlq["messages"]
    assert dead["message_id"] == receipt.message_id
    assert dead["topic"] == topic
    assert dead["tag"] == "bad"
    assert dead["body_bytes"] == len(b"poison")
    assert receive_nothing_for(consumer, 2, invisible=1) == [], "a dead-lettered message was delivered"
    stats = {g["name"]: g for g in broker.cli_json("group", "list")}[group]
    assert stats["dead_lettered"] == 1, stats


# --- FIFO and delay -------------------------------------------------------------------------


def test_fifo_group_receives_each_message_group_in_order(broker, clients):
    # One queue holding several interleaved message groups: the order within each group is
    # what is tested here (receiving from a many-queue topic is tested above).
    topic = broker.topic("fifo", queues=1)
    group = broker.group(fifo=True)
    producer = clients(Producer(config(broker), (topic,)))
    groups = [f"order-{i}" for i in range(4)]
    per_group = 6
    for seq in range(per_group):
        for g in groups:
            producer.send(message(topic, f"{g}:{seq}".encode(), group=g))

    consumer = simple_consumer(clients, broker, group, topic)
    seen = {g: [] for g in groups}
    deadline = time.monotonic() + 30
    while sum(map(len, seen.values())) < len(groups) * per_group and time.monotonic() < deadline:
        for m in consumer.receive(8, 10):
            g, seq = m.body.decode().split(":")
            assert m.message_group == g
            seen[g].append(int(seq))
            consumer.ack(m)
    for g in groups:
        assert seen[g] == list(range(per_group)), f"message group {g} arrived as {seen[g]}"


def test_fifo_group_holds_a_message_group_until_its_message_is_acked(broker, clients):
    topic = broker.topic("fifo", queues=1)
    group = broker.group(fifo=True)
    producer = clients(Producer(config(broker), (topic,)))
    for seq in range(3):
        producer.send(message(topic, f"{seq}".encode(), group="only"))
    consumer = simple_consumer(clients, broker, group, topic)

    first = receive_until(consumer, 1, 10, invisible=30, ack=False)
    assert first and first[0].body == b"0"
    held = {m.body for m in first[1:]}
    # Whatever came in the same batch is in order; nothing later may come while it is unacked.
    assert [m.body for m in first] == [b"0", b"1", b"2"][: len(first)]
    assert receive_nothing_for(consumer, 2) == [], f"message group delivered past an unacked message ({held})"
    for m in first:
        consumer.ack(m)
    rest = receive_until(consumer, 3 - len(first), 10)
    assert [m.body for m in first + rest] == [b"0", b"1", b"2"]


def test_delay_message_is_not_received_before_its_delivery_time(broker, clients):
    topic = broker.topic("delay", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    consumer = simple_consumer(clients, broker, group, topic)

    deliver_at = int(time.time()) + 4  # the client sends whole seconds
    receipt = producer.send(message(topic, b"later", deliver_at=deliver_at))

    early = []
    while time.time() < deliver_at - 1.5:  # each receive long-polls up to 1 s
        early += consumer.receive(32, 30)
    assert early == [], "a delay message came before its delivery time"

    got = receive_until(consumer, 1, 10)
    now = time.time()
    assert [m.message_id for m in got] == [receipt.message_id]
    assert now >= deliver_at - 0.05, f"received {deliver_at - now:.2f} s early"
    assert now <= deliver_at + 5, f"received {now - deliver_at:.2f} s late"
    assert got[0].delivery_timestamp == deliver_at * 1000


# --- push consumer --------------------------------------------------------------------------


class FailOnce(MessageListener):
    """Fails the first delivery of each message, then succeeds; records every call."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def consume(self, message):
        with self.lock:
            self.calls.append((message.message_id, message.delivery_attempt, time.monotonic()))
            first = sum(1 for c in self.calls if c[0] == message.message_id) == 1
        return ConsumeResult.FAILURE if first else ConsumeResult.SUCCESS


@pytest.mark.parametrize("client", ["as released", "tolerating no delivery timestamp"])
def test_push_consumer_retries_a_failed_message_once_and_then_not_again(broker, clients, client):
    topic = broker.topic("normal", queues=2)
    # 500 ms backoff; the client reads whole seconds of the policy, so it redelivers at once.
    group = broker.group(max_attempts=16, backoff_ms=[500])
    listener = FailOnce()
    consumer = PushConsumer(config(broker), group, listener, {topic: FilterExpression()})
    if client != "as released":
        # The released client computes a receive latency from the delivery timestamp that
        # RocketMQ's proxy sends at the end of every ReceiveMessage stream; without it the
        # push consumer drops every batch (TypeError). This variant skips that metric so the
        # retry behaviour is tested on its own; the plain variant and
        # test_received_messages_carry_the_transport_delivery_timestamp catch the gap.
        measure = consumer.client_metrics.receive_after
        consumer.client_metrics.receive_after = lambda group_, messages: (
            measure(group_, messages) if all(m.transport_delivery_timestamp for m in messages) else None)
    clients(consumer)
    producer = clients(Producer(config(broker), (topic,)))
    receipt = producer.send(message(topic, b"flaky"))

    wait_for(lambda: len(listener.calls) >= 2, 15, "the second delivery to the push consumer")
    (id1, attempt1, _), (id2, attempt2, _) = listener.calls[:2]
    assert id1 == id2 == receipt.message_id
    assert (attempt1, attempt2) == (1, 2)
    time.sleep(3)
    assert len(listener.calls) == 2, f"consumed again after success: {listener.calls}"
    stats = wait_for(lambda: (g := {g["name"]: g for g in broker.cli_json("group", "list")}[group])
                     and g["in_flight"] == 0 and g, 5, "the group to have nothing in flight")
    assert stats["lag"] == 0 and stats["dead_lettered"] == 0, stats


def test_received_messages_carry_the_transport_delivery_timestamp(broker, clients):
    # RocketMQ's proxy ends every ReceiveMessage stream with a `delivery_timestamp` response
    # (ReceiveMessageResponseStreamWriter.onComplete); the client stores it on each message
    # as transport_delivery_timestamp and its push consumer needs it (see above).
    topic = broker.topic("normal", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    producer.send(message(topic, b"when"))
    consumer = simple_consumer(clients, broker, group, topic)
    before = int(time.time() * 1000)
    got = receive_until(consumer, 1, 10)
    after = int(time.time() * 1000)
    assert len(got) == 1
    stamp = got[0].transport_delivery_timestamp
    assert stamp is not None, "the ReceiveMessage stream carried no delivery_timestamp"
    assert before - 1000 <= stamp <= after + 1000


# --- bad input ------------------------------------------------------------------------------


def test_body_larger_than_4_mib_is_refused(broker, clients):
    topic = broker.topic("normal", queues=1)
    group = broker.group()
    producer = clients(Producer(config(broker), (topic,)))
    with pytest.raises(ClientException):
        producer.send(message(topic, b"x" * (4 * MIB + 1)))
    # Exactly the limit is fine.
    ok = producer.send(message(topic, b"y" * (4 * MIB)))
    consumer = simple_consumer(clients, broker, group, topic)
    got = receive_until(consumer, 1, 10)
    assert [m.message_id for m in got] == [ok.message_id]
    assert len(got[0].body) == 4 * MIB


def test_broker_refuses_a_body_larger_than_its_limit_even_when_the_client_does_not_check(broker, clients):
    topic = broker.topic("normal", queues=1)
    producer = clients(Producer(config(broker), (topic,)))
    # The client checks against the limit the broker announced in its settings; once they
    # arrived, lift that check so the request reaches the broker.
    assert producer._init_settings_event.wait(10), "no settings from the broker"
    producer._Producer__max_body_size = 64 * MIB
    with pytest.raises(ClientException) as refused:
        producer.send(message(topic, b"x" * (4 * MIB + 1)))
    assert refused.value.code in (Code.MESSAGE_BODY_TOO_LARGE, Code.PAYLOAD_TOO_LARGE), repr(refused.value)
    topics = {t["name"]: t for t in broker.cli_json("topic", "list")}
    assert topics[topic]["messages"] == 0


def test_send_to_unknown_topic_is_refused_when_auto_creation_is_off(strict_broker, clients):
    known = strict_broker.topic("normal", queues=1)
    missing = unique("missing")
    producer = clients(Producer(config(strict_broker), (known,)))
    producer.send(message(known, b"fine"))

    with pytest.raises(Exception) as refused:
        producer.send(message(missing, b"nowhere"))
    assert missing in str(refused.value)
    assert missing not in {t["name"] for t in strict_broker.cli_json("topic", "list")}

    # What the broker answered, through the client's own stubs: the route and a send that
    # skips the route.
    with grpc.insecure_channel(strict_broker.grpc) as channel:
        stub = MessagingServiceStub(channel)
        md = (("x-mq-client-id", "compat-test"),)
        req = QueryRouteRequest()
        req.topic.name = missing
        req.endpoints.CopyFrom(config(strict_broker).rpc_endpoints.endpoints)
        route = stub.QueryRoute(req, metadata=md, timeout=5)
        assert route.status.code == Code.TOPIC_NOT_FOUND, route.status
        send = SendMessageRequest()
        m = send.messages.add()
        m.topic.name = missing
        m.body = b"nowhere"
        m.system_properties.message_id = "01" + "0" * 30
        m.system_properties.message_type = 1  # NORMAL
        m.system_properties.born_timestamp.GetCurrentTime()
        sent = stub.SendMessage(send, metadata=md, timeout=5)
        assert sent.status.code == Code.TOPIC_NOT_FOUND, sent.status
    assert missing not in {t["name"] for t in strict_broker.cli_json("topic", "list")}
