"""Connects to a WebSocket echo server with nothing but the standard library,
sends one text message and checks it comes back unchanged, then closes 1000.

usage: python3 echo_check.py HOST PORT
"""
import base64
import os
import socket
import struct
import sys

host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), timeout=10)
key = base64.b64encode(os.urandom(16)).decode()
sock.sendall(
    (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
)
head = b""
while not head.endswith(b"\r\n\r\n"):
    chunk = sock.recv(1)
    if not chunk:
        sys.exit("echo_check: connection closed during the handshake")
    head += chunk
if not head.startswith(b"HTTP/1.1 101"):
    sys.exit(f"echo_check: not upgraded: {head!r}")


def send(opcode, payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)


def recv_exact(n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            sys.exit("echo_check: connection closed early")
        data += chunk
    return data


def read_frame():
    b0, b1 = recv_exact(2)
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", recv_exact(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", recv_exact(8))
    return b0 & 0x0F, recv_exact(length)


message = "héllo from python".encode()
send(0x1, message)
opcode, payload = read_frame()
while opcode in (0x9, 0xA):  # skip the server's pings (tungstenite is not here to answer)
    opcode, payload = read_frame()
if (opcode, payload) != (0x1, message):
    sys.exit(f"echo_check: got opcode {opcode} payload {payload!r}")
send(0x8, struct.pack("!H", 1000))
opcode, payload = read_frame()
while opcode in (0x9, 0xA):
    opcode, payload = read_frame()
if opcode != 0x8 or payload[:2] != struct.pack("!H", 1000):
    sys.exit(f"echo_check: expected Close 1000, got opcode {opcode} payload {payload!r}")
print("echo_check: ok")
