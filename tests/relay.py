"""A delaying TCP relay: a userspace stand-in for ``tc netem delay ... loss ...``, used by the
network fault tests only where the kernel lacks sch_netem (netem stays the first choice).

It is an emulation, and approximates rather than reproduces the real thing. The relay runs inside
the coordinator's namespace (``python relay.py ...`` under ``ip netns exec``), listens on
addresses of that namespace and forwards each accepted connection to an address of the same
namespace (the coordinator's loopback port): nodes dial the relay instead of the coordinator,
and no byte leaves the namespaces the test made. While *impaired* it delays every chunk of bytes
(whatever one read returned: often several packets, sometimes part of one), in each direction:

* by a uniformly random 150-250 ms, standing in for ``netem delay 200ms 50ms`` on each end;
* and 5 % of chunks by a further 200-400 ms, standing in for ``netem loss 5%``: on TCP a lost
  segment costs its stream about one retransmission timeout (200 ms at least on Linux), during
  which nothing behind it is delivered.

Byte order is kept: a chunk is never released before the one read before it (so a long hold also
holds what follows, as a retransmission does). What it does not model: real packet drops (the
kernels' TCP stacks see a clean, lossless loopback and never retransmit), per-packet timing,
reordering on the wire, congestion control reacting to loss. While *calm* chunks pass at once.
The randomness is seeded: each direction of each connection draws from ``Random`` seeded by
(seed, route, connection number, direction).

Control, one command per line on stdin, one JSON reply per line on stdout: ``impair``, ``calm``,
``stats``. The first line out is ``{"ready": [...]}`` once every route listens; EOF on stdin
closes every connection and exits. :class:`RelayProcess` runs and drives it from the test.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import queue
import random
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

DELAY_S = (0.150, 0.250)
"""Every chunk, each way, while impaired: uniform in this range (netem ``delay 200ms 50ms``)."""
HOLD_P = 0.05
"""The share of chunks held longer (netem ``loss 5%``)."""
HOLD_S = (0.200, 0.400)
"""How much longer: about one TCP retransmission timeout."""
DESCRIPTION = (f"a userspace TCP relay emulating netem: every chunk of bytes delayed "
               f"{DELAY_S[0] * 1000:.0f}-{DELAY_S[1] * 1000:.0f} ms each way, {HOLD_P:.0%} of chunks held "
               f"{HOLD_S[0] * 1000:.0f}-{HOLD_S[1] * 1000:.0f} ms more in place of {HOLD_P:.0%} packet loss, "
               f"byte order kept, no packet really lost")
"""What the relay does, in one line, for the tests' output."""
_ALLOWED = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("127.0.0.0/8"))
_CHUNK = 65536
_QUEUE_CHUNKS = 256  # per direction; a full queue stops reading (TCP's window does the rest)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not any(ipaddress.ip_address(host) in net for net in _ALLOWED):
        raise argparse.ArgumentTypeError(f"{host} is outside 198.18.0.0/15 and loopback")
    return host, int(port)


def _route(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, sep, target = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: want LISTEN_HOST:PORT=TARGET_HOST:PORT")
    return _address(listen), _address(target)


@dataclass
class Stats:
    connections: int = 0
    chunks: int = 0
    bytes: int = 0
    delayed: int = 0  # chunks that got a delay (read while impaired)
    held: int = 0  # of those, held the extra retransmission-like time
    delay_s: float = 0.0  # sum of the delays drawn (before waiting behind earlier chunks)
    max_wait_s: float = 0.0  # longest a chunk really stayed in the relay, including that waiting


class Relay:
    """The relay itself (runs inside the coordinator's namespace); see the module docstring."""

    def __init__(self, routes: list[tuple[tuple[str, int], tuple[str, int]]], seed: int) -> None:
        self.routes, self.seed = routes, seed
        self.impaired = False
        self.stats = Stats()
        self._conns: set[asyncio.Task] = set()

    async def serve(self) -> list[asyncio.AbstractServer]:
        servers = []
        for index, (listen, target) in enumerate(self.routes):
            count = iter(range(1 << 62))

            async def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                               index: int = index, target: tuple[str, int] = target, count=count) -> None:
                task = asyncio.current_task()
                assert task is not None
                self._conns.add(task)
                try:
                    await self._connection(r, w, target, f"{self.seed}:{index}:{next(count)}")
                except asyncio.CancelledError:  # shutting down; asyncio would log it as an error
                    pass
                finally:
                    self._conns.discard(task)

            servers.append(await asyncio.start_server(accepted, *listen, reuse_address=True))
        return servers

    async def _connection(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter,
                          target: tuple[str, int], key: str) -> None:
        self.stats.connections += 1
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*target), 5)
        except (OSError, asyncio.TimeoutError):
            down_w.transport.abort()
            return
        pumps = [asyncio.create_task(self._pump(down_r, up_w, random.Random(f"{key}:up"))),
                 asyncio.create_task(self._pump(up_r, down_w, random.Random(f"{key}:down")))]
        try:
            # Both directions to their end (EOF passed on); a reset or error on either ends both.
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.exception() for t in done):
                down_w.transport.abort()
                up_w.transport.abort()
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (down_w, up_w):
                w.close()

    def _delay(self, rng: random.Random) -> float:
        if not self.impaired:
            return 0.0
        delay = rng.uniform(*DELAY_S)
        self.stats.delayed += 1
        if rng.random() < HOLD_P:
            delay += rng.uniform(*HOLD_S)
            self.stats.held += 1
        self.stats.delay_s += delay
        return delay

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rng: random.Random) -> None:
        """Bytes from ``reader`` to ``writer``, each chunk released at its time, in order; EOF is
        passed on after the last chunk; a read error (a reset) is raised here in its turn."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, float, bytes | OSError]] = asyncio.Queue(_QUEUE_CHUNKS)

        async def read() -> None:
            last = 0.0
            while True:
                try:
                    data: bytes | OSError = await reader.read(_CHUNK)
                except OSError as exc:
                    data = exc
                now = loop.time()
                delay = self._delay(rng) if isinstance(data, bytes) and data else 0.0
                last = max(last, now + delay)  # never released before the chunk before it
                await chunks.put((now, last, data))
                if not data or isinstance(data, OSError):
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                arrived, release, data = await chunks.get()
                await asyncio.sleep(max(0.0, release - loop.time()))
                if isinstance(data, OSError):
                    raise data
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                self.stats.chunks += 1
                self.stats.bytes += len(data)
                self.stats.max_wait_s = max(self.stats.max_wait_s, loop.time() - arrived)
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    def command(self, line: str) -> dict[str, object]:
        word = line.strip()
        if word == "impair":
            self.impaired = True
        elif word == "calm":
            self.impaired = False
        elif word != "stats":
            return {"ok": False, "error": f"unknown command {word!r}"}
        return {"ok": True, "impaired": self.impaired, **asdict(self.stats)}


async def _main(routes: list[tuple[tuple[str, int], tuple[str, int]]], seed: int) -> None:
    relay = Relay(routes, seed)
    servers = await relay.serve()
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def stdin_reader() -> None:  # a thread: stdin is a pipe the loop need not own
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=stdin_reader, name="relay-stdin", daemon=True).start()
    print(json.dumps({"ready": [f"{l[0]}:{l[1]}->{t[0]}:{t[1]}" for l, t in routes], "seed": seed,
                      "what": DESCRIPTION}), flush=True)
    while line := await lines.get():
        print(json.dumps(relay.command(line)), flush=True)
    for server in servers:
        server.close()
    for task in list(relay._conns):
        task.cancel()
    await asyncio.gather(*relay._conns, return_exceptions=True)


class RelayProcess:
    """Runs the relay as ``argv_prefix + [python, relay.py, ...]`` (e.g. ``ip netns exec NS``)
    and drives it; every wait is bounded. Call :meth:`stop` in a ``finally``."""

    def __init__(self, argv_prefix: list[str], routes: list[str], seed: int, log: Path) -> None:
        self._log = log.open("ab")
        argv = [*argv_prefix, sys.executable, "-u", str(Path(__file__).resolve()), "--seed", str(seed), *routes]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="relay-reader", daemon=True)
        self._reader.start()
        try:
            self.ready = self._reply(20)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no reply from the relay within {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"the relay exited ({self.proc.wait(5)}); see {self._log.name}")
        return json.loads(line)

    def _command(self, word: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        reply = self._reply(10)
        if not reply.get("ok"):
            raise RuntimeError(f"relay {word}: {reply}")
        return reply

    def impair(self) -> dict:
        return self._command("impair")

    def calm(self) -> dict:
        return self._command("calm")

    def stats(self) -> dict:
        return self._command("stats")

    def stop(self) -> None:
        """EOF (the relay closes its connections and exits), then SIGTERM, then SIGKILL."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(5)
        except (subprocess.TimeoutExpired, OSError):
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        self._log.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("routes", nargs="+", type=_route, metavar="LISTEN_HOST:PORT=TARGET_HOST:PORT")
    args = parser.parse_args()
    asyncio.run(_main(args.routes, args.seed))
