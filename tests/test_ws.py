"""WebSocket: RFC 6455 by hand, checked with the RFC's vectors, a raw-socket client for the edge
cases, and the strict `websockets` client library for the real conversation."""

import base64
import email.message
import io
import json
import os
import socket
import struct
import threading
import time

import pytest
from websockets.sync.client import connect

import orchestra
from conftest import add_record, wait_for

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
MASK = b"\x37\xfa\x21\x3d"


def headers(*pairs):
    """Request headers as http.server parses them."""
    message = email.message.Message()
    for name, value in pairs:
        message[name] = value
    return message


def handshake_headers(**changes):
    base = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": RFC_KEY,
            "Sec-WebSocket-Version": "13"}  # fmt: skip
    base.update((k.replace("_", "-"), v) for k, v in changes.items())
    return headers(*((k, v) for k, v in base.items() if v is not None))


def client_frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
    """A client frame built independently of the server's code (section 5.2)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not mask:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def close_payload(code, reason=b""):
    return struct.pack("!H", code) + reason


# ---------------------------------------------------------------------------- pure functions


def test_handshake_accepts_the_rfc_sample_key():
    response = orchestra.websocket_accept(handshake_headers())
    assert response == {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": RFC_ACCEPT,
    }


def test_handshake_picks_the_orchestra_subprotocol_and_never_echoes_the_token():
    response = orchestra.websocket_accept(
        handshake_headers(Sec_WebSocket_Protocol="token.secret, orchestra")
    )
    assert response["Sec-WebSocket-Protocol"] == "orchestra"
    assert "secret" not in json.dumps(response)


@pytest.mark.parametrize(
    "changes, status",
    [
        ({"Upgrade": None}, 400),
        ({"Upgrade": "h2c"}, 400),
        ({"Connection": "keep-alive"}, 400),
        ({"Sec_WebSocket_Version": "8"}, 426),
        ({"Sec_WebSocket_Version": None}, 426),
        ({"Sec_WebSocket_Key": None}, 400),
        ({"Sec_WebSocket_Key": "not base64!"}, 400),
        ({"Sec_WebSocket_Key": base64.b64encode(b"fifteen bytes!!").decode()}, 400),
    ],
)
def test_handshake_rejects(changes, status):
    with pytest.raises(orchestra.HTTPRefusal) as refused:
        orchestra.websocket_accept(handshake_headers(**changes))
    assert refused.value.status == status
    if status == 426:
        assert refused.value.headers == {"Sec-WebSocket-Version": "13"}


def test_connection_header_may_list_several_tokens():
    response = orchestra.websocket_accept(
        handshake_headers(Connection="keep-alive, Upgrade", Upgrade="WebSocket")
    )
    assert response["Sec-WebSocket-Accept"] == RFC_ACCEPT


@pytest.mark.parametrize(
    "length, header",
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_frame_lengths_both_ways(length, header):
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    assert orchestra.encode_frame(TEXT, payload) == header + payload
    fin, opcode, data = orchestra.read_frame(
        io.BytesIO(client_frame(TEXT, payload)), orchestra.WS_MAX_MESSAGE
    )
    assert (fin, opcode, data) == (True, TEXT, payload)


def test_mask_matches_a_byte_by_byte_xor():
    data = os.urandom(1001)
    assert orchestra.apply_mask(data, MASK) == bytes(b ^ MASK[i % 4] for i, b in enumerate(data))
    assert orchestra.apply_mask(b"", MASK) == b""
    assert orchestra.apply_mask(orchestra.apply_mask(data, MASK), MASK) == data


@pytest.mark.parametrize(
    "frame, code",
    [
        (client_frame(TEXT, b"hi", mask=False), 1002),
        (client_frame(TEXT, b"hi", rsv=0x40), 1002),
        (client_frame(TEXT, b"hi", rsv=0x10), 1002),
        (client_frame(0x3, b"hi"), 1002),
        (client_frame(0xB, b"hi"), 1002),
        (client_frame(PING, b"x" * 126), 1002),
        (client_frame(PING, b"hi", fin=False), 1002),
        (client_frame(TEXT, b"", length=1 << 63)[:10], 1002),
        (client_frame(TEXT, b"", length=orchestra.WS_MAX_MESSAGE + 1)[:10], 1009),
    ],
)
def test_read_frame_refuses(frame, code):
    with pytest.raises(orchestra.WebSocketClose) as closed:
        orchestra.read_frame(io.BytesIO(frame), orchestra.WS_MAX_MESSAGE)
    assert closed.value.code == code


@pytest.mark.parametrize(
    "payload, result",
    [
        (b"", 1000),
        (close_payload(1000, b"bye"), 1000),
        (close_payload(1001), 1001),
        (close_payload(1011), 1011),
        (close_payload(3000), 3000),
        (close_payload(4999), 4999),
        (b"\x03", 1002),
        (close_payload(999), 1002),
        (close_payload(1004), 1002),
        (close_payload(1005), 1002),
        (close_payload(1006), 1002),
        (close_payload(1015), 1002),
        (close_payload(2999), 1002),
        (close_payload(5000), 1002),
        (close_payload(1000, b"\xff\xfe"), 1007),
    ],
)
def test_close_codes(payload, result):
    if result in (1002, 1007) and payload not in (b"",):
        with pytest.raises(orchestra.WebSocketClose) as closed:
            orchestra.close_code(payload)
        assert closed.value.code == result
    else:
        assert orchestra.close_code(payload) == result


# ---------------------------------------------------------------------------- a live server


def start(project, **options):
    """A server with its own WebSocket options."""
    return orchestra.start_web_server(
        project, "127.0.0.1", 0, log=io.StringIO(), revive=False, ws_options=options
    )


def address(server):
    return server.server_address[:2]


def token(server):
    return server.gate.token.decode()


def host(server):
    return "{}:{}".format(*address(server))


class RawClient:
    """A WebSocket client on a bare socket, for what a polite library will not send."""

    def __init__(self, server, extra=(), rcvbuf=None, handshake=True):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(address(server))
        self.buffer = b""
        if handshake:
            lines = ["GET /ws/status HTTP/1.1", f"Host: {host(server)}", "Upgrade: websocket",
                     "Connection: Upgrade", f"Sec-WebSocket-Key: {RFC_KEY}", "Sec-WebSocket-Version: 13",
                     f"Authorization: Bearer {token(server)}", *extra]  # fmt: skip
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            self.status, self.headers = self.read_response()

    def read_response(self):
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        return int(lines[0].split()[1]), dict(line.split(": ", 1) for line in lines[1:])

    def read(self, count):
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def frame(self):
        """(fin, opcode, payload) of the next server frame, which must not be masked."""
        first, second = self.read(2)
        assert not second & 0x80, "server frames are never masked"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self.read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self.read(8))
        return bool(first & 0x80), first & 0x0F, self.read(length)

    def next(self, wanted):
        """The payload of the next frame with opcode `wanted`, skipping status messages."""
        while True:
            _, opcode, payload = self.frame()
            if opcode == wanted:
                return payload
            assert opcode == TEXT, (opcode, payload)

    def close_code(self):
        payload = self.next(CLOSE)
        return struct.unpack("!H", payload[:2])[0]

    def send(self, data):
        self.sock.sendall(data)

    def at_eof(self, timeout=3):
        """True when the server closed the TCP connection (after anything still buffered)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


@pytest.fixture
def raw(server):
    clients = []

    def make(**kwargs):
        client = RawClient(server, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_the_websockets_library_gets_a_snapshot_then_updates(server, project):
    with connect(f"ws://{host(server)}/ws/status", subprotocols=["orchestra", f"token.{token(server)}"],
                 origin=f"http://{host(server)}", proxy=None, open_timeout=5) as ws:  # fmt: skip
        assert ws.subprotocol == "orchestra"
        snapshot = json.loads(ws.recv(timeout=5))
        assert snapshot["type"] == "snapshot"
        assert (
            snapshot["status"]["repo"] == str(project.repo) and snapshot["status"]["agents"] == []
        )
        written = time.monotonic()
        add_record(project, "alpha", state="running", activity="thinking")
        update = json.loads(ws.recv(timeout=5))
        assert time.monotonic() - written < 1.0
        assert update["type"] == "update" and update["removed"] == []
        assert [(a["id"], a["state"], a["activity"]) for a in update["agents"]] == [
            ("alpha", "running", "thinking")
        ]
        add_record(project, "alpha", state="done", cost_usd=0.5)
        update = json.loads(ws.recv(timeout=5))
        assert update["agents"][0]["state"] == "done" and update["agents"][0]["cost_usd"] == 0.5
        project.store.update(lambda state: state["agents"].pop("alpha"))
        assert json.loads(ws.recv(timeout=5))["removed"] == ["alpha"]
        ws.close()
        assert ws.close_code == 1000  # the server answered the close handshake


def test_server_pings_and_the_library_keeps_the_connection_alive(project):
    server = start(project, ping_interval=0.2, pong_timeout=0.3)
    try:
        with connect(f"ws://{host(server)}/ws/status", subprotocols=["orchestra", f"token.{token(server)}"],
                     proxy=None, ping_interval=None) as ws:  # fmt: skip
            ws.recv(timeout=5)
            time.sleep(1.5)  # several pings, each answered by the library's automatic pong
            add_record(project, "beta", state="running")
            assert json.loads(ws.recv(timeout=5))["agents"][0]["id"] == "beta"
    finally:
        server.stop()


def test_a_silent_peer_is_pinged_then_dropped(project):
    server = start(project, ping_interval=0.2, pong_timeout=0.3)
    try:
        client = RawClient(server)
        assert client.status == 101
        assert client.next(PING) == b""
        started = time.monotonic()
        assert client.at_eof(
            timeout=5
        )  # never answered: dropped after ping_interval + pong_timeout
        assert time.monotonic() - started < 2
        wait_for(lambda: not server.hub.clients, timeout=5, what="the hub to forget the client")
    finally:
        server.stop()


def upgrade(server, lines):
    """Send an upgrade request made of `lines` (Host added unless given); the raw reply."""
    if not any(line.startswith("Host:") for line in lines):
        lines = [f"Host: {host(server)}", *lines]
    sock = socket.create_connection(address(server), timeout=5)
    sock.sendall(("\r\n".join(["GET /ws/status HTTP/1.1", *lines]) + "\r\n\r\n").encode())
    reply = sock.recv(65536).decode("latin-1")
    sock.close()
    return reply


@pytest.mark.parametrize(
    "changes, status",
    [
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Upgrade": None}, 400),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400),
    ],
)
def test_handshake_rejects_over_the_wire(server, changes, status):
    fields = {"Authorization": f"Bearer {token(server)}", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": RFC_KEY, "Sec-WebSocket-Version": "13", **changes}  # fmt: skip
    reply = upgrade(server, [f"{k}: {v}" for k, v in fields.items() if v is not None])
    assert reply.startswith(f"HTTP/1.1 {status} "), reply
    assert "Sec-WebSocket-Accept" not in reply
    if status == 426:
        assert "Sec-WebSocket-Version: 13" in reply


@pytest.mark.parametrize(
    "extra, status",
    [
        (["Authorization: Bearer wrong"], 401),
        ([], 401),
        (["Origin: http://evil.example"], 403),
        (["Host: evil.example"], 403),
        (["Sec-WebSocket-Protocol: orchestra, token.{token}"], 101),
        (["Cookie: orchestra_token_{port}={token}", "Origin: http://{host}"], 401),
        (["Cookie: orchestra_token_{port}={token}"], 401),
    ],
)
def test_the_gate_decides_before_101(server, extra, status):
    values = {"token": token(server), "port": address(server)[1], "host": host(server)}
    reply = upgrade(server, ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {RFC_KEY}",
                             "Sec-WebSocket-Version: 13", *(line.format(**values) for line in extra)])  # fmt: skip
    assert reply.startswith(f"HTTP/1.1 {status} "), reply
    if status == 101:
        assert f"Sec-WebSocket-Accept: {RFC_ACCEPT}" in reply
    else:
        assert "Sec-WebSocket-Accept" not in reply


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_payload_lengths_keep_the_stream_in_step(raw, length):
    client = raw()
    client.send(client_frame(TEXT, b"a" * length))
    client.send(client_frame(PING, b"after %d" % length))
    assert client.next(PONG) == b"after %d" % length


def test_frames_split_into_single_bytes(raw):
    client = raw()
    data = client_frame(TEXT, "ünïcødé".encode() * 20) + client_frame(PING, b"one byte at a time")
    for i in range(len(data)):
        client.send(data[i : i + 1])
        if i % 16 == 0:
            time.sleep(0.001)
    assert client.next(PONG) == b"one byte at a time"


def test_ping_payload_is_echoed(raw):
    client = raw()
    client.send(client_frame(PING, bytes(range(125))))
    assert client.next(PONG) == bytes(range(125))
    client.send(client_frame(PONG, b"unsolicited"))  # allowed, and ignored
    client.send(client_frame(PING, b""))
    assert client.next(PONG) == b""


@pytest.mark.parametrize(
    "frames, code",
    [
        ([client_frame(TEXT, b"hi", mask=False)], 1002),
        ([client_frame(PING, b"x" * 126)], 1002),
        ([client_frame(PING, b"x", fin=False)], 1002),
        ([client_frame(TEXT, b"hi", rsv=0x40)], 1002),
        ([client_frame(TEXT, b"hi", rsv=0x20)], 1002),
        ([client_frame(0x3, b"hi")], 1002),
        ([client_frame(0xC, b"")], 1002),
        ([client_frame(CONTINUATION, b"no start")], 1002),
        ([client_frame(TEXT, b"one", fin=False), client_frame(TEXT, b"two")], 1002),
        ([client_frame(TEXT, b"", length=1 << 63)[:10]], 1002),
        ([client_frame(TEXT, b"\xc3\x28")], 1007),
        (
            [client_frame(TEXT, b"ok \xf0\x9f", fin=False), client_frame(CONTINUATION, b"\x28")],
            1007,
        ),
        ([client_frame(CLOSE, b"\x03")], 1002),
        ([client_frame(CLOSE, close_payload(1005))], 1002),
        ([client_frame(CLOSE, close_payload(1000, b"\xff"))], 1007),
    ],
)
def test_protocol_errors_close_with_the_right_code(raw, frames, code):
    client = raw()
    for frame in frames:
        client.send(frame)
    assert client.close_code() == code
    assert client.at_eof()


def test_fragmented_message_with_a_ping_in_the_middle(raw):
    client = raw()
    client.send(client_frame(TEXT, b"frag", fin=False))
    client.send(client_frame(PING, b"between"))
    assert client.next(PONG) == b"between"
    client.send(client_frame(CONTINUATION, "mént".encode(), fin=False))
    client.send(client_frame(CONTINUATION, b"ed", fin=True))
    client.send(client_frame(PING, b"still open"))
    assert client.next(PONG) == b"still open"


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
def test_close_handshake_echoes_the_code_then_hangs_up(raw, code):
    client = raw()
    client.send(client_frame(CLOSE, close_payload(code, b"bye")))
    assert client.close_code() == code
    assert client.at_eof()


def test_empty_close_is_answered_with_1000(raw):
    client = raw()
    client.send(client_frame(CLOSE))
    assert client.close_code() == 1000


def test_over_size_message_is_refused_before_its_payload_arrives(raw):
    client = raw()
    client.send(
        client_frame(TEXT, b"", length=orchestra.WS_MAX_MESSAGE + 1)[:14]
    )  # header and mask only
    started = time.monotonic()
    assert client.close_code() == 1009
    assert time.monotonic() - started < 1


def test_fragments_adding_up_past_the_limit_are_refused(raw):
    client = raw()
    half = b"x" * (orchestra.WS_MAX_MESSAGE // 2 + 1)
    client.send(client_frame(TEXT, half, fin=False))
    client.send(client_frame(CONTINUATION, half))
    assert client.close_code() == 1009


def test_half_sent_handshake_is_closed_by_the_deadline(server):
    sock = socket.create_connection(address(server), timeout=5)
    sock.sendall(f"GET /ws/status HTTP/1.1\r\nHost: {host(server)}\r\nUpgrade: webs".encode())
    started = time.monotonic()
    assert sock.recv(1024) == b""  # closed without an answer once the 1 s deadline passed
    assert 0.5 < time.monotonic() - started < 3
    sock.close()


def test_a_client_that_never_reads_does_not_delay_the_others(project):
    server = start(project, queue_limit=4)
    try:
        stuck = RawClient(server, rcvbuf=4096)
        assert stuck.status == 101
        with connect(f"ws://{host(server)}/ws/status", subprotocols=["orchestra", f"token.{token(server)}"],
                     proxy=None, max_size=None) as ws:  # fmt: skip
            ws.recv(timeout=5)
            delays = []
            for n in range(60):  # enough to fill any socket buffer, then the stuck client's queue
                written = time.monotonic()
                add_record(project, "big", state="running", result=f"{n} " + "x" * 500_000)
                update = json.loads(ws.recv(timeout=5))
                delays.append(time.monotonic() - written)
                assert update["agents"][0]["result"].startswith(f"{n} ")
                if len(server.hub.clients) == 1:
                    break
            assert len(server.hub.clients) == 1, "the stuck client was never dropped"
            assert max(delays) < 1.0, delays
        stuck.close()
    finally:
        server.stop()


def test_stopping_the_server_ends_websocket_connections(project):
    server = start(project)
    client = RawClient(server)
    assert client.status == 101
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive()
    assert client.at_eof()
    client.close()
