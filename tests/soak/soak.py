#!/usr/bin/env python3
"""tollgate's soak under faults, reconciled against the usage API.

Run it through ``tests/soak/run.sh`` (``DURATION=120 bash tests/soak/run.sh``), which builds the
binary and passes its path. Standard library only (Python 3.11): threads and ``http.client``.

What it does, in order:

1. starts its own processes, each on a free port of 127.0.0.1 in one temp dir: a redis-server
   (AOF with ``appendfsync always``, so a SIGKILL loses nothing Redis acknowledged; see
   ``REDIS_PERSIST``), an upstream (``soak.py upstream PORT``: echoes, answers its own 500/503,
   answers slowly, sends large bodies; every answer it makes carries ``X-Soak-Upstream: 1``),
   gateways ``redis-a`` and ``redis-b`` on that Redis (one master key, global limits, fail_open:
   config/redis.toml's values) and ``embedded`` on its own redb file;
2. creates accounts and keys through the admin API: keys with high limits, keys with low
   per-minute limits (so 429s happen) on each store, and a public route;
3. drives mixed traffic for DURATION seconds from WORKERS threads (GET/POST with bodies, large
   answers, slow answers, upstream 5xx, valid, unknown and malformed keys, low-limit keys, the
   public route, kept-alive and fresh connections, the three credential header forms) while the
   fault schedule (``schedule``) kills and restarts Redis, SIGSTOPs it, flaps the upstream and
   restarts gateways gracefully (SIGTERM, then start again on the same store and port);
4. records, per key, every request that got an HTTP answer, and separately those that got none
   (connection refused: never reached a gateway; cut: sent, then reset or timed out);
5. waits (bounded) for the gateways' usage flush to settle, reads each key's usage through the
   admin API (interval=minute, summed) and reconciles per key and in total; prints a table, writes
   the figures as JSON, and exits 1 when counts were lost or doubled beyond LOST_MAX/DOUBLED_MAX
   (default 0), a gateway 5xx fell outside a fault window of a fault that touches that gateway,
   or a valid key was refused as unknown. A Redis answer past the gateway's 50 ms deadline that
   the gateway logged outside the schedule counts as a fault window ("store_stall") for that
   gateway's 503 store_unavailable; more than STALL_MAX_S seconds of them (default 3) fails
   the run.

Every process it starts is killed on exit (normal, failure, Ctrl-C, SIGTERM); their pids are also
written to ``$WORKDIR/pids`` so that run.sh's trap can kill them if this process itself dies.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

# A fault's window stays open this long after the fault ends: the Redis store's call deadline is
# about 2.5 s, the global limiter retries Redis a second after a failure, and the connection
# manager reconnects with backoff. A gateway 5xx later than this is a finding.
RECOVERY_GRACE = 5.0
# Client socket timeout: longer than any answer the upstream is asked for (slow ≤ 1.5 s) plus a
# Redis pause, so a timeout is a stall worth reporting, not a slow answer.
CLIENT_TIMEOUT = 30.0
# An answer slower than this (other than /slow's, which are asked to be slow) is reported as a
# stall, by phase. Reported, not judged: the machine is shared and a debug build is measured.
STALL_SECONDS = 2.5
# A hang-up: the client sends a keyed request for a slow answer (HANGUP_SLOW_MS) and closes the
# connection after HANGUP_AFTER s, long after the key was identified and the request forwarded.
HANGUP_SLOW_MS = 1500
HANGUP_AFTER = 0.3
# How long a process may take to become ready / to stop before it is killed.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
# The usage flush is every second; after the traffic stops we poll until the totals hold still
# for SETTLE_POLLS polls a second apart, or FLUSH_DEADLINE seconds pass.
SETTLE_POLLS = 4
FLUSH_DEADLINE = 90.0
# Gateway error codes that come before a key is identified (so the request is not metered).
UNIDENTIFIED_CODES = {"missing_credential", "invalid_credential", "store_unavailable", "no_route"}
# Which faults can explain which gateway 5xx. A gateway restart explains none: its clients see
# refused connections, not errors, so a 5xx from a draining gateway is a finding.
CAUSES = {
    "upstream_unavailable": {"upstream_flap"},
    "upstream_timeout": {"upstream_flap"},
    "store_unavailable": {"redis_kill", "redis_pause", "store_stall"},
}
# A Redis answer later than the gateway's 50 ms deadline, which the gateway logs, outside any
# scheduled fault ("store_stall", read back from the gateways' logs by `observed_stalls`): on
# a loaded 2-core CI machine a Redis round trip now and then takes that long. An unknown key
# then gets 503 store_unavailable, by design; a valid key is still served from the cache.
STALL_ERROR = "no answer from redis"
# More than this many seconds of such stalls in a run is not the machine: it fails the run.
STALL_MAX_S = float(os.environ.get("STALL_MAX_S", "3"))
UPSTREAM_MARK = "X-Soak-Upstream"
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# The upstream (a separate process, so that a flap is a real stop and start)


class UpstreamHandler(BaseHTTPRequestHandler):
    """Echo server. Paths: /echo (echoes the body; ?size=N answers N bytes), /slow?ms=N,
    /status/N (its own 5xx). Every answer carries X-Soak-Upstream and the key id it was sent."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlparse(self.path)
        query = parse_qs(url.query)
        status = 200
        if url.path.startswith("/public/"):
            path = url.path[len("/public") :]
        else:
            path = url.path
        if path == "/slow":
            time.sleep(min(int(query.get("ms", ["500"])[0]), 5000) / 1000)
            body = b"slow"
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            body = json.dumps({"upstream": status}).encode()
        elif "size" in query:
            body = b"x" * min(int(query["size"][0]), 1 << 20)
        self.send_response(status)
        self.send_header(UPSTREAM_MARK, "1")
        self.send_header("X-Soak-Key-Id", self.headers.get("X-Tollgate-Key-Id", "-"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


def run_upstream(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), UpstreamHandler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


# ---------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Every child this run started, killed on exit by pid; the pids also go to a file."""

    def __init__(self, workdir: str):
        self.children: dict[str, subprocess.Popen] = {}
        self.pidfile = os.path.join(workdir, "pids")
        self.lock = threading.Lock()

    def spawn(self, name: str, argv: list[str], logfile: str, env: dict | None = None):
        out = open(logfile, "ab")
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
        )
        out.close()
        with self.lock:
            self.children[name] = proc
            self._write_pids()
        return proc

    def forget(self, name: str) -> None:
        with self.lock:
            self.children.pop(name, None)
            self._write_pids()

    def _write_pids(self) -> None:
        with open(self.pidfile, "w") as f:
            for p in self.children.values():
                f.write(f"{p.pid}\n")

    def kill_all(self) -> None:
        with self.lock:
            children = list(self.children.items())
        for _, proc in children:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)  # a paused Redis
                    proc.kill()
                except ProcessLookupError:
                    pass
        for name, proc in children:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {proc.pid}) did not exit after SIGKILL")
        with self.lock:
            self.children.clear()
            self._write_pids()


def wait_until(what: str, check, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {timeout:.0f}s")


def http_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


class Redis:
    def __init__(self, procs: Processes, workdir: str, persist: bool):
        self.procs, self.port = procs, free_port()
        self.dir = os.path.join(workdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def start(self) -> None:
        persistence = (
            ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--save", "", "--appendonly", "no"]
        )
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--protected-mode", "no", "--daemonize", "no", *persistence]
        self.proc = self.procs.spawn("redis", argv, os.path.join(self.dir, "redis.log"))
        wait_until("redis-server", self.ping)

    def kill(self) -> None:
        if self.proc:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.procs.forget("redis")
            self.proc = None

    def signal(self, sig: int) -> None:
        if self.proc:
            os.kill(self.proc.pid, sig)


class Upstream:
    def __init__(self, procs: Processes, workdir: str):
        self.procs, self.port, self.workdir = procs, free_port(), workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [sys.executable, os.path.abspath(__file__), "upstream", str(self.port)]
        self.proc = self.procs.spawn("upstream", argv, os.path.join(self.workdir, "upstream.log"))
        wait_until("upstream", lambda: http_status(self.port, "/echo") == 200)

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.procs.forget("upstream")
            self.proc = None


GATEWAY_TOML = """\
[proxy]
listen = "127.0.0.1:{proxy}"
[admin]
listen = "127.0.0.1:{admin}"
[store]
{store}
[limits]
mode = "{mode}"
on_store_error = "fail_open"
[metering]
flush_interval = "1s"
{durability}
[[routes]]
name = "public"
path_prefix = "/public"
upstreams = ["http://127.0.0.1:{upstream}"]
auth = "public"
[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["http://127.0.0.1:{upstream}"]
auth = "required"
timeout = "30s"
"""


class Gateway:
    """One `tollgate serve` process; restarted on the same ports, config and store."""

    def __init__(self, name, procs, workdir, binary, master, upstream_port, redis_url=None):
        self.name, self.procs, self.binary, self.master = name, procs, binary, master
        self.proxy_port, self.admin_port = free_port(), free_port()
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.redis = redis_url is not None
        if redis_url:
            store, mode = f'backend = "redis"\nredis_url = "{redis_url}"', "global"
        else:
            db = os.path.join(self.dir, "tollgate.db")
            store, mode = f'backend = "embedded"\npath = "{db}"', "local"
        self.config = os.path.join(self.dir, "tollgate.toml")
        # DURABILITY=wal: every gateway meters through its own usage log (docs/ARCHITECTURE.md,
        # "Durable metering"); with CRASH=1 the crash then loses at most the last few ms.
        durability = ""
        if os.environ.get("DURABILITY", "interval") == "wal":
            wal = os.path.join(self.dir, "usage-wal")
            durability = f'durability = "wal"\nwal_path = "{wal}"'
        with open(self.config, "w") as f:
            f.write(GATEWAY_TOML.format(proxy=self.proxy_port, admin=self.admin_port,
                                        store=store, mode=mode, upstream=upstream_port,
                                        durability=durability))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ, TOLLGATE_MASTER_KEY=self.master,
                   RUST_LOG=os.environ.get("SOAK_RUST_LOG", "info"))
        self.starts += 1
        argv = [self.binary, "--log-format", "json", "serve", "--config", self.config]
        self.proc = self.procs.spawn(self.name, argv, os.path.join(self.dir, "gateway.log"), env)
        wait_until(f"gateway {self.name}", self._ready)

    def _ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"gateway {self.name} exited ({self.proc.returncode}); "
                               f"see {self.dir}/gateway.log")
        return http_status(self.admin_port, "/healthz") == 200

    def stop(self) -> int | None:
        """SIGTERM (drain, flush), wait; SIGKILL after STOP_TIMEOUT. Returns the exit code."""
        if not self.proc:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"gateway {self.name} did not stop within {STOP_TIMEOUT:.0f}s; SIGKILL")
            self.proc.kill()
            code = self.proc.wait(timeout=5)
        self.procs.forget(self.name)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: a crash; whatever was not flushed is gone."""
        if self.proc:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.procs.forget(self.name)
            self.proc = None

    def admin(self, method: str, path: str, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            headers = {"Authorization": f"Bearer {self.master}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
            return resp.status, (json.loads(text) if text else None)
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------
# Keys


def fake_credential(kind: str = "tgsk_") -> str:
    """A well-formed credential (valid checksum) that no store holds."""
    body = kind + "".join(secrets.choice(BASE62) for _ in range(32))
    crc = zlib.crc32(body.encode())
    digits = ""
    while crc:
        crc, r = divmod(crc, 62)
        digits = BASE62[r] + digits
    return body + digits.rjust(6, "0")


@dataclass
class Key:
    label: str
    store: str  # "redis" or "embedded"
    raw: str
    account_id: str | None = None
    key_id: str | None = None
    low_limit: bool = False

    @property
    def valid(self) -> bool:
        return self.key_id is not None


def create_keys(admin_gw: Gateway, store: str, prefix: str) -> list[Key]:
    huge = {"per_minute": 1_000_000, "per_hour": 10_000_000, "per_day": 100_000_000}
    status, account = admin_gw.admin("POST", "/v1/accounts",
                                      {"name": f"soak-{prefix}", "rate_limit": huge})
    if status != 201:
        raise RuntimeError(f"create account on {admin_gw.name}: {status} {account}")
    acc = account["id"]
    specs = [("fast1", huge, False), ("fast2", huge, False),
             ("low30", {"per_minute": 30, "per_hour": 100_000, "per_day": 1_000_000}, True),
             ("low10", {"per_minute": 10, "per_hour": 100_000, "per_day": 1_000_000}, True)]
    keys = []
    for name, limit, low in specs:
        status, made = admin_gw.admin("POST", f"/v1/accounts/{acc}/keys",
                                      {"name": name, "rate_limit": limit})
        if status != 201:
            raise RuntimeError(f"create key {name} on {admin_gw.name}: {status} {made}")
        keys.append(Key(f"{prefix}/{name}", store, made["key"], acc, made["id"], low))
    keys.append(Key(f"{prefix}/unknown", store, fake_credential()))
    keys.append(Key(f"{prefix}/malformed", store, "tgsk_" + "A" * 38))
    return keys


# ---------------------------------------------------------------------------------------------
# Faults


@dataclass
class Fault:
    kind: str
    affects: tuple[str, ...]  # gateway names whose 5xx it explains
    start: float
    end: float | None = None
    note: str = ""

    def touches(self, gateway: str, t0: float, t1: float) -> bool:
        return gateway in self.affects and self.overlaps(t0, t1)

    def overlaps(self, t0: float, t1: float) -> bool:
        end = (self.end if self.end is not None else time.time()) + RECOVERY_GRACE
        return t0 <= end and t1 >= self.start

    def explains(self, gateway: str, code: str, t0: float, t1: float) -> bool:
        kind = self.kind.split(":", 1)[0]
        return (gateway in self.affects and kind in CAUSES.get(code, ())
                and self.overlaps(t0, t1))


def schedule(duration: float, crash: bool) -> list[tuple[float, str, float]]:
    """(offset s, fault, length s): one cycle per started 120 s, each cycle a quiet start, the
    five faults in turn, and a quiet tail; lengths scale with the cycle, clamped. With `crash`,
    each cycle also SIGKILLs redis-a (its unflushed counts are lost by design)."""
    cycles = max(1, int(duration // 120))
    span = duration / cycles
    plan = []
    for c in range(cycles):
        base = c * span

        def length(frac, lo, hi):
            return max(lo, min(hi, span * frac))

        plan += [
            (base + 0.10 * span, "redis_kill", length(0.05, 3, 20)),
            (base + 0.25 * span, "upstream_flap", length(0.04, 2, 15)),
            (base + 0.38 * span, "redis_pause", length(0.04, 3, 10)),
            (base + 0.52 * span, "restart:redis-a", 0),
            (base + 0.64 * span, "restart:embedded", 0),
            (base + 0.74 * span, "redis_kill", length(0.03, 2, 10)),
            (base + 0.80 * span, "restart:redis-b", 0),
        ]
        if crash:
            plan.append((base + 0.86 * span, "crash:redis-a", 0))
    return plan


class FaultInjector:
    def __init__(self, redis: Redis, upstream: Upstream, gateways: dict[str, Gateway]):
        self.redis, self.upstream, self.gateways = redis, upstream, gateways
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.fleet = tuple(n for n, g in gateways.items() if g.redis)

    def _open(self, kind, affects, note=""):
        fault = Fault(kind, affects, time.time(), note=note)
        with self.lock:
            self.faults.append(fault)
        log(f"fault: {kind} {note}".rstrip())
        return fault

    def _close(self, fault: Fault) -> None:
        fault.end = time.time()
        log(f"fault over: {fault.kind} ({fault.end - fault.start:.1f}s)")

    def run(self, kind: str, length: float) -> None:
        if kind == "redis_kill":
            f = self._open(kind, self.fleet, f"SIGKILL, restart after {length:.0f}s")
            self.redis.kill()
            time.sleep(length)
            self.redis.start()
            self._close(f)
        elif kind == "redis_pause":
            f = self._open(kind, self.fleet, f"SIGSTOP for {length:.0f}s")
            self.redis.signal(signal.SIGSTOP)
            time.sleep(length)
            self.redis.signal(signal.SIGCONT)
            self._close(f)
        elif kind == "upstream_flap":
            f = self._open(kind, tuple(self.gateways), f"down for {length:.0f}s")
            self.upstream.stop()
            time.sleep(length)
            self.upstream.start()
            self._close(f)
        elif kind.startswith("crash:"):
            gw = self.gateways[kind.split(":", 1)[1]]
            f = self._open(kind, (gw.name,), "SIGKILL, then start on the same store and port")
            gw.kill()
            gw.start()
            self._close(f)
        elif kind.startswith("restart:"):
            gw = self.gateways[kind.split(":", 1)[1]]
            f = self._open(kind, (gw.name,), "SIGTERM, then start on the same store and port")
            code = gw.stop()
            f.note += f" (exit {code})"
            if code != 0:
                log(f"gateway {gw.name} exited {code} on SIGTERM")
            gw.start()
            self._close(f)
        else:
            raise ValueError(kind)

    def explaining(self, gateway: str, code: str, t0: float, t1: float) -> Fault | None:
        """The fault that explains this 5xx: it touches the gateway, can cause the code, and
        its window (plus RECOVERY_GRACE) overlaps the request."""
        with self.lock:
            return next((f for f in self.faults if f.explains(gateway, code, t0, t1)), None)

    def touching(self, gateway: str, t0: float, t1: float) -> Fault | None:
        """A fault that touches the gateway while the request ran; a restart of that gateway
        first, as it explains a refused or dropped connection best."""
        with self.lock:
            ranked = sorted(self.faults, key=lambda f: not f.kind.startswith(("restart:",
                                                                              "crash:")))
        return next((f for f in ranked if f.touches(gateway, t0, t1)), None)

    def in_any(self, t0: float, t1: float) -> bool:
        with self.lock:
            return any(f.overlaps(t0, t1) for f in self.faults)

    def observed_stalls(self) -> list[Fault]:
        """Adds a "store_stall" fault for each time a Redis gateway logged its store calls
        failing on the deadline ("no answer from redis"), from that line until it logged them
        working again; returns them (each gateway's log holds every start of it)."""
        found = []
        for gw in self.gateways.values():
            if not gw.redis:
                continue
            opened: dict[str, Fault] = {}
            try:
                lines = open(os.path.join(gw.dir, "gateway.log"), encoding="utf-8",
                             errors="replace").read().splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    entry = json.loads(line)
                    fields = entry["fields"]
                    at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
                except (ValueError, KeyError, TypeError):
                    continue
                op, message = fields.get("op", ""), fields.get("message", "")
                if message.startswith("store calls failing") and STALL_ERROR in str(
                        fields.get("error", "")) and op not in opened:
                    opened[op] = Fault("store_stall", (gw.name,), at.timestamp(),
                                       note=f"{op}: {fields.get('error')}")
                elif message.startswith("store calls work again") and op in opened:
                    fault = opened.pop(op)
                    fault.end = at.timestamp()
                    found.append(fault)
            for fault in opened.values():
                fault.end = fault.start
                found.append(fault)
        with self.lock:
            self.faults.extend(found)
        return found


# ---------------------------------------------------------------------------------------------
# Traffic


@dataclass
class KeyStats:
    sent: int = 0
    answered: int = 0
    metered_expected: int = 0  # answered and identified to the key (every such request counts)
    success: int = 0  # of those, status < 400
    error: int = 0  # of those, status >= 400
    rate_limited: int = 0  # of those, 429
    statuses: Counter = field(default_factory=Counter)
    gateway_codes: Counter = field(default_factory=Counter)
    upstream_5xx: int = 0
    refused: int = 0  # no connection: never reached a gateway
    cut: int = 0  # sent, then reset / closed / timed out without an answer
    stale_keepalive: int = 0  # a kept-alive connection closed under the request
    hung_up: int = 0  # the client closed the connection before the answer (on purpose)
    body_mismatch: int = 0
    key_id_mismatch: int = 0


@dataclass
class Unanswered:
    gateway: str
    key: str
    kind: str  # refused | cut | stale_keepalive
    error: str
    after: str  # what the previous answer on this connection was, for stale connections
    t0: float
    t1: float


@dataclass
class HangUp:
    gateway: str
    key: str
    t0: float
    t1: float


@dataclass
class Gateway5xx:
    gateway: str
    key: str
    status: int
    code: str
    t0: float
    t1: float


class Recorder:
    def __init__(self, t_start: float):
        self.t_start = t_start
        # Per second of the run: answers by class and unanswered requests.
        self.timeline: dict[int, Counter] = defaultdict(Counter)
        self.lock = threading.Lock()
        self.keys: dict[str, KeyStats] = defaultdict(KeyStats)
        self.gateway_5xx: list[Gateway5xx] = []
        self.unanswered_events: list[Unanswered] = []
        self.hang_ups: list[HangUp] = []
        self.stalls: list[tuple[str, str, float, float]] = []  # gateway, what, t0, t1
        self.errors: Counter = Counter()  # client-side exception names

    def answered(self, key: Key | None, label, gw, status, code, upstream, t0, t1,
                 body_ok, key_id_ok) -> None:
        with self.lock:
            s = self.keys[label]
            s.sent += 1
            s.answered += 1
            s.statuses[status] += 1
            cls = ("5xx-gateway" if not upstream else "5xx-upstream") if status >= 500 else (
                "4xx" if status >= 400 else "ok")
            self.timeline[int(t1 - self.t_start)][cls] += 1
            if code:
                s.gateway_codes[code] += 1
            if upstream and status >= 500:
                s.upstream_5xx += 1
            if not upstream and status >= 500:
                self.gateway_5xx.append(Gateway5xx(gw, label, status, code or "-", t0, t1))
            if key is not None and key.valid and code not in UNIDENTIFIED_CODES:
                s.metered_expected += 1
                if status < 400:
                    s.success += 1
                else:
                    s.error += 1
                if status == 429:
                    s.rate_limited += 1
            s.body_mismatch += not body_ok
            s.key_id_mismatch += not key_id_ok

    def stall(self, gateway: str, what: str, t0: float, t1: float) -> None:
        with self.lock:
            self.stalls.append((gateway, what, t0, t1))
            self.timeline[int(t1 - self.t_start)]["stalled"] += 1

    def hung_up(self, label: str, gateway: str, t0: float) -> None:
        t1 = time.time()
        with self.lock:
            self.keys[label].sent += 1
            self.keys[label].hung_up += 1
            self.hang_ups.append(HangUp(gateway, label, t0, t1))
            self.timeline[int(t1 - self.t_start)]["hung_up"] += 1

    def unanswered(self, label, gw, kind, exc: BaseException, after: str, t0: float) -> None:
        t1 = time.time()
        with self.lock:
            s = self.keys[label]
            s.sent += 1
            setattr(s, kind, getattr(s, kind) + 1)
            self.timeline[int(t1 - self.t_start)]["unanswered"] += 1
            self.errors[f"{kind}:{type(exc).__name__}"] += 1
            self.unanswered_events.append(
                Unanswered(gw, label, kind, type(exc).__name__, after, t0, t1))


class Worker(threading.Thread):
    def __init__(self, n, stop, recorder, gateways, keys, seed):
        super().__init__(name=f"worker-{n}", daemon=True)
        self.stop, self.rec, self.gateways, self.keys = stop, recorder, gateways, keys
        self.rng = random.Random(seed)
        self.conns: dict[str, http.client.HTTPConnection] = {}
        # Per kept-alive connection: the answer it last carried (see Unanswered.after).
        self.last_answer: dict[str, str] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.one()

    def pick(self):
        rng = self.rng
        gw = rng.choices(["redis-a", "redis-b", "embedded"], [40, 30, 30])[0]
        store = "embedded" if gw == "embedded" else "redis"
        pool = [k for k in self.keys if k.store == store]
        kind = rng.choices(["fast", "low", "bad", "public"], [60, 20, 12, 8])[0]
        if kind == "fast":
            key = rng.choice([k for k in pool if k.valid and not k.low_limit])
        elif kind == "low":
            key = rng.choice([k for k in pool if k.low_limit])
        elif kind == "bad":
            key = rng.choice([k for k in pool if not k.valid])
        else:
            key = None
        return gw, key

    def request_shape(self):
        rng = self.rng
        shape = rng.choices(["get", "post", "big", "slow", "500", "503"], [45, 25, 15, 6, 5, 4])[0]
        body = None
        if shape == "get":
            return "GET", "/echo", None
        if shape == "post":
            body = rng.randbytes(rng.choice([1, 100, 4096, 65536]))
            return rng.choice(["POST", "PUT"]), "/echo", body
        if shape == "big":
            return "GET", f"/echo?size={rng.choice([10_000, 200_000])}", None
        if shape == "slow":
            return "GET", f"/slow?ms={rng.randint(200, 1500)}", None
        return "GET", f"/status/{shape}", None

    def headers_for(self, key: Key | None) -> dict:
        if key is None:
            return {}
        form = self.rng.randrange(3)
        if form == 0:
            return {"Authorization": f"Bearer {key.raw}"}
        if form == 1:
            return {"X-API-Key": key.raw}
        return {"Authorization": "Basic " + base64.b64encode(f"{key.raw}:".encode()).decode()}

    def hang_up(self, gw_name: str, gw: Gateway, key: Key) -> None:
        """A keyed request whose client closes the connection before the (slow) answer."""
        t0 = time.time()
        try:
            sock = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=CLIENT_TIMEOUT)
        except OSError as exc:
            self.rec.unanswered(key.label, gw_name, "refused", exc, "-", t0)
            time.sleep(0.05)
            return
        try:
            sock.sendall(f"GET /slow?ms={HANGUP_SLOW_MS} HTTP/1.1\r\nHost: soak\r\n"
                         f"X-API-Key: {key.raw}\r\n\r\n".encode())
            time.sleep(HANGUP_AFTER)
        except OSError as exc:
            self.rec.unanswered(key.label, gw_name, "cut", exc, "-", t0)
            return
        finally:
            sock.close()
        self.rec.hung_up(key.label, gw_name, t0)

    def one(self) -> None:
        gw_name, key = self.pick()
        gw = self.gateways[gw_name]
        if key is not None and key.valid and not key.low_limit and self.rng.random() < 0.04:
            self.hang_up(gw_name, gw, key)
            return
        method, path, body = self.request_shape()
        label = key.label if key else f"{'embedded' if gw_name == 'embedded' else 'redis'}/public"
        if key is None:
            path = "/public" + path
        headers = self.headers_for(key)
        fresh = self.rng.random() < 0.25
        if fresh:
            headers["Connection"] = "close"
        conn = self.conns.get(gw_name)
        reused = conn is not None and not fresh
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", gw.proxy_port, timeout=CLIENT_TIMEOUT)
            self.conns.pop(gw_name, None)
        t0 = time.time()
        stage = "refused"
        try:
            if conn.sock is None:
                conn.connect()
            stage = "cut"
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self.conns.pop(gw_name, None)
            kind = stage
            if stage == "cut" and reused and isinstance(
                exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
            ):
                kind = "stale_keepalive"
            after = self.last_answer.get(gw_name, "-") if kind == "stale_keepalive" else "-"
            self.rec.unanswered(label, gw_name, kind, exc, after, t0)
            if kind == "refused":
                time.sleep(0.05)  # a restarting gateway: no busy loop against a closed port
            return
        t1 = time.time()
        if t1 - t0 > STALL_SECONDS and "/slow" not in path:
            self.rec.stall(gw_name, f"{method} {path.split('?')[0]} {resp.status}", t0, t1)
        upstream = resp.getheader(UPSTREAM_MARK) == "1"
        code = None
        if not upstream and resp.status >= 400:
            try:
                code = json.loads(data)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "not-json"
        body_ok = True
        if upstream and resp.status == 200 and path.endswith("/echo") and body is not None:
            body_ok = data == body
        key_id_ok = True
        if upstream and key is not None and key.valid:
            key_id_ok = resp.getheader("X-Soak-Key-Id") == key.key_id
        self.rec.answered(key, label, gw_name, resp.status, code, upstream, t0, t1,
                          body_ok, key_id_ok)
        if fresh or resp.will_close:
            conn.close()
        else:
            self.conns[gw_name] = conn
            with_body = "with a body" if body else "without a body"
            self.last_answer[gw_name] = f"{resp.status} {code or ''} to a {method} {with_body}"


# ---------------------------------------------------------------------------------------------
# Reconciliation


def usage_of(gw: Gateway, key: Key, frm: float, to: float) -> dict:
    q = f"interval=minute&from={iso(frm)}&to={iso(to)}"
    status, body = gw.admin("GET", f"/v1/accounts/{key.account_id}/keys/{key.key_id}/usage?{q}")
    if status != 200:
        raise RuntimeError(f"usage of {key.label} on {gw.name}: {status} {body}")
    total = Counter()
    for b in body["buckets"]:
        for f in ("request_count", "success_count", "error_count", "rate_limited_count"):
            total[f] += b[f]
    return total


def read_usage(gateways, keys, frm, to) -> dict[str, Counter]:
    out = {}
    for key in keys:
        if key.valid:
            gw = gateways["embedded" if key.store == "embedded" else "redis-b"]
            out[key.label] = usage_of(gw, key, frm, to)
    return out


def settle_usage(gateways, keys, frm) -> tuple[dict[str, Counter], float]:
    """Polls until the totals hold still for SETTLE_POLLS polls; bounded by FLUSH_DEADLINE."""
    started = time.monotonic()
    last, still = None, 0
    while True:
        try:
            now = read_usage(gateways, keys, frm, time.time() + 120)
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            log(f"usage read failed (retrying): {e}")
            now = None
        if now is not None and now == last:
            still += 1
        else:
            still = 0
        last = now if now is not None else last
        waited = time.monotonic() - started
        if still >= SETTLE_POLLS and last is not None:
            return last, waited
        if waited > FLUSH_DEADLINE:
            if last is None:
                raise RuntimeError("the usage API never answered")
            log(f"usage still changing after {FLUSH_DEADLINE:.0f}s; reconciling what is there")
            return last, waited
        time.sleep(1)


def reconcile(rec: Recorder, keys: list[Key], usage: dict[str, Counter], faults: FaultInjector):
    # A hang-up outside any fault of its gateway must be counted (the key was identified and the
    # request forwarded before the client left); during one, the lookup itself may have been
    # what the client left, so it may or may not count.
    hung_clean, hung_fault = Counter(), Counter()
    for h in rec.hang_ups:
        if faults.touching(h.gateway, h.t0, h.t1):
            hung_fault[h.key] += 1
        else:
            hung_clean[h.key] += 1
    rows, totals = [], Counter()
    for key in keys:
        s = rec.keys.get(key.label, KeyStats())
        row = {"key": key.label, "sent": s.sent, "answered": s.answered,
               "metered_expected": s.metered_expected,
               "refused": s.refused, "cut": s.cut, "stale_keepalive": s.stale_keepalive,
               "hung_up": s.hung_up, "hung_up_outside_faults": hung_clean[key.label],
               "statuses": dict(sorted(s.statuses.items())),
               "gateway_codes": dict(sorted(s.gateway_codes.items())),
               "upstream_5xx": s.upstream_5xx, "body_mismatch": s.body_mismatch,
               "key_id_mismatch": s.key_id_mismatch}
        if key.valid:
            u = usage[key.label]
            counted = u["request_count"]
            # Sent, no answer: the gateway may have counted it, or not.
            maybe = s.cut + s.stale_keepalive + hung_fault[key.label]
            certain = s.metered_expected + hung_clean[key.label]
            row.update(
                counted=counted,
                must_count=certain,
                lost=max(0, certain - counted),
                # At least this many of the lost had an answer; the rest were hang-ups.
                lost_answered=max(0, s.metered_expected - counted),
                counted_twice=max(0, counted - certain - maybe),
                counted_unanswered_band=maybe,
                usage=dict(u),
                success_diff=u["success_count"] - s.success,
                error_diff=u["error_count"] - s.error,
                rate_limited_diff=u["rate_limited_count"] - s.rate_limited,
                valid_key_refused_unknown=s.gateway_codes.get("invalid_credential", 0),
                unidentified_store_down=s.gateway_codes.get("store_unavailable", 0),
            )
            for f in ("counted", "must_count", "lost", "lost_answered", "counted_twice",
                      "metered_expected",
                      "valid_key_refused_unknown"):
                totals[f] += row[f]
        for f in ("sent", "answered", "refused", "cut", "stale_keepalive", "hung_up",
                  "hung_up_outside_faults", "upstream_5xx",
                  "body_mismatch", "key_id_mismatch"):
            totals[f] += row[f]
        rows.append(row)
    during, outside, in_any = Counter(), [], 0
    for e in rec.gateway_5xx:
        in_any += faults.in_any(e.t0, e.t1)
        f = faults.explaining(e.gateway, e.code, e.t0, e.t1)
        if f:
            during[f"{e.code} during {f.kind}"] += 1
        else:
            outside.append({"gateway": e.gateway, "key": e.key, "status": e.status,
                            "code": e.code, "at": iso(e.t0), "took_s": round(e.t1 - e.t0, 3),
                            "t_offset_s": round(e.t0 - rec.t_start, 1)})
    unanswered_during, unanswered_outside = Counter(), Counter()
    for u in rec.unanswered_events:
        f = faults.touching(u.gateway, u.t0, u.t1)
        if f:
            unanswered_during[f"{u.kind} during {f.kind}"] += 1
        else:
            unanswered_outside[f"{u.kind} ({u.error}) on {u.gateway}, after {u.after}"] += 1
    totals["unanswered_outside_faults"] = sum(unanswered_outside.values())
    stalls = Counter()
    for gw, what, t0, t1 in rec.stalls:
        f = faults.touching(gw, t0, t1)
        stalls[f"during {f.kind}" if f else "outside faults"] += 1
    totals["stalls"] = len(rec.stalls)
    totals["stall_max_s"] = round(max((t1 - t0 for _, _, t0, t1 in rec.stalls), default=0), 2)
    totals["stalls_by_phase"] = dict(stalls)
    totals["gateway_5xx"] = len(rec.gateway_5xx)
    totals["gateway_5xx_during_faults"] = sum(during.values())
    totals["gateway_5xx_outside_faults"] = len(outside)
    totals["gateway_5xx_outside_any_fault_window"] = len(rec.gateway_5xx) - in_any
    return rows, dict(totals), dict(during), outside, dict(unanswered_during), dict(
        unanswered_outside)


def print_table(rows, totals, during, outside, u_during, u_outside) -> None:
    cols = ["key", "answered", "hung up", "must", "counted", "lost", "twice", "cut+stale",
            "refused", "429", "gw5xx codes"]
    fmt = "{:<18}{:>9}{:>8}{:>7}{:>8}{:>6}{:>6}{:>10}{:>8}{:>6}  {}"
    print(fmt.format(*cols))
    for r in rows:
        codes = ",".join(f"{c}={n}" for c, n in r["gateway_codes"].items())
        print(fmt.format(r["key"], r["answered"], r["hung_up"], r.get("must_count", "-"),
                         r.get("counted", "-"), r.get("lost", "-"), r.get("counted_twice", "-"),
                         r["cut"] + r["stale_keepalive"], r["refused"],
                         r["statuses"].get(429, 0), codes))
    print()
    print(f"answered: {totals['answered']}, counted: {totals['counted']} "
          f"(must count {totals['must_count']}: answered and identified "
          f"{totals['metered_expected']}, hung up outside faults "
          f"{totals['hung_up_outside_faults']}), lost: {totals['lost']} "
          f"(of answered requests: {totals['lost_answered']}, of hang-ups: "
          f"{totals['lost'] - totals['lost_answered']}), "
          f"counted twice: {totals['counted_twice']}, "
          f"gateway 5xx outside faults: {totals['gateway_5xx_outside_faults']}")
    print(f"gateway 5xx: {totals['gateway_5xx']}, explained by a fault in progress: "
          f"{totals['gateway_5xx_during_faults']}, outside any fault window: "
          f"{totals['gateway_5xx_outside_any_fault_window']}")
    print(f"unanswered: cut {totals['cut']}, stale keep-alive {totals['stale_keepalive']}, "
          f"refused {totals['refused']}; upstream 5xx passed through: {totals['upstream_5xx']}; "
          f"body mismatches: {totals['body_mismatch']}; "
          f"key id mismatches: {totals['key_id_mismatch']}")
    for what, n in sorted(during.items()):
        print(f"  gateway 5xx {what}: {n}")
    print(f"answers slower than {STALL_SECONDS}s (not /slow): {totals['stalls']}, "
          f"longest {totals['stall_max_s']}s, {totals['stalls_by_phase']}")
    for e in outside[:20]:
        print(f"  OUTSIDE a fault: {e}")
    print(f"no answer outside a fault of that gateway: {totals['unanswered_outside_faults']}")
    for what, n in sorted(u_during.items()):
        print(f"  no answer, {what}: {n}")
    for what, n in sorted(u_outside.items(), key=lambda x: -x[1])[:15]:
        print(f"  no answer OUTSIDE a fault, {what}: {n}")


# ---------------------------------------------------------------------------------------------
# Main


def soak(binary: str, workdir: str, procs: Processes) -> int:
    duration = env_int("DURATION", 120)
    workers = env_int("WORKERS", 6)
    lost_max = env_int("LOST_MAX", 0)
    doubled_max = env_int("DOUBLED_MAX", 0)
    seed = env_int("SEED", int(time.time()))
    persist = os.environ.get("REDIS_PERSIST", "1") != "0"
    results = os.environ.get("RESULTS") or os.path.join(
        tempfile.gettempdir(), f"tollgate-soak-{time.strftime('%Y%m%d-%H%M%S')}.json")
    log(f"DURATION={duration}s WORKERS={workers} SEED={seed} REDIS_PERSIST={int(persist)} "
        f"CRASH={os.environ.get('CRASH', '0')} "
        f"DURABILITY={os.environ.get('DURABILITY', 'interval')} "
        f"workdir {workdir}")

    master = subprocess.run([binary, "keygen", "--kind", "master"], check=True,
                            capture_output=True, text=True).stdout.strip()
    master_emb = subprocess.run([binary, "keygen", "--kind", "master"], check=True,
                                capture_output=True, text=True).stdout.strip()
    redis = Redis(procs, workdir, persist)
    redis.start()
    upstream = Upstream(procs, workdir)
    upstream.start()
    gateways = {
        "redis-a": Gateway("redis-a", procs, workdir, binary, master, upstream.port, redis.url()),
        "redis-b": Gateway("redis-b", procs, workdir, binary, master, upstream.port, redis.url()),
        "embedded": Gateway("embedded", procs, workdir, binary, master_emb, upstream.port),
    }
    for gw in gateways.values():
        gw.start()
    keys = create_keys(gateways["redis-a"], "redis", "redis") + create_keys(
        gateways["embedded"], "embedded", "embedded")
    log(f"{len(keys)} keys on two stores; gateways up: "
        + ", ".join(f"{g.name} proxy :{g.proxy_port} admin :{g.admin_port}"
                    for g in gateways.values()))

    injector = FaultInjector(redis, upstream, gateways)
    crash = os.environ.get("CRASH", "0") == "1"
    plan = schedule(duration, crash)
    stop = threading.Event()
    t_start = time.time()
    rec = Recorder(t_start)
    pool = [Worker(i, stop, rec, gateways, keys, seed * 1000 + i) for i in range(workers)]
    for w in pool:
        w.start()
    try:
        for offset, kind, length in plan:
            delay = t_start + offset - time.time()
            if delay > 0:
                time.sleep(delay)
            injector.run(kind, length)
        time.sleep(max(0.0, t_start + duration - time.time()))
    finally:
        stop.set()
        for w in pool:
            w.join(timeout=CLIENT_TIMEOUT + 5)
    t_end = time.time()
    log(f"traffic done: {sum(s.sent for s in rec.keys.values())} requests in "
        f"{t_end - t_start:.0f}s; waiting for the usage flush")

    usage, waited = settle_usage(gateways, keys, t_start - 120)
    scheduled = list(injector.faults)
    unscheduled_stall_s = 0.0
    for stall in injector.observed_stalls():
        if any(f.overlaps(stall.start, stall.end) for f in scheduled):
            continue
        unscheduled_stall_s += stall.end - stall.start
        log(f"store stall outside the schedule, logged by {stall.affects[0]}: "
            f"{stall.end - stall.start:.1f}s at {iso(stall.start)} ({stall.note})")
    public = [Key(f"{store}/public", store, "") for store in ("redis", "embedded")]
    rows, totals, during, outside, u_during, u_outside = reconcile(
        rec, keys + public, usage, injector)
    print_table(rows, totals, during, outside, u_during, u_outside)

    failures = []
    if totals["lost"] > lost_max:
        failures.append(f"lost {totals['lost']} > LOST_MAX {lost_max}")
    if totals["counted_twice"] > doubled_max:
        failures.append(f"counted twice {totals['counted_twice']} > DOUBLED_MAX {doubled_max}")
    if totals["gateway_5xx_outside_faults"]:
        failures.append(f"{totals['gateway_5xx_outside_faults']} gateway 5xx outside faults")
    if unscheduled_stall_s > STALL_MAX_S:
        failures.append(f"store stalls outside the schedule {unscheduled_stall_s:.1f}s > "
                        f"STALL_MAX_S {STALL_MAX_S}")
    if totals["valid_key_refused_unknown"]:
        failures.append(f"{totals['valid_key_refused_unknown']} valid-key requests refused "
                        "invalid_credential")
    if totals["body_mismatch"] or totals["key_id_mismatch"]:
        failures.append("answers that were not the request's (body or key id mismatch)")

    report = {
        "duration_s": duration, "workers": workers, "seed": seed, "redis_persist": persist,
        "started": iso(t_start), "ended": iso(t_end), "flush_settled_after_s": round(waited, 1),
        "recovery_grace_s": RECOVERY_GRACE,
        "unscheduled_store_stall_s": round(unscheduled_stall_s, 2),
        "faults": [{"kind": f.kind, "start": iso(f.start), "t_offset_s": round(f.start - t_start, 1),
                    "length_s": round((f.end or t_end) - f.start, 1), "note": f.note}
                   for f in injector.faults],
        "totals": totals, "gateway_5xx_during_faults": during,
        "gateway_5xx_outside_faults": outside, "client_errors": dict(rec.errors),
        "unanswered_during_faults": u_during, "unanswered_outside_faults": u_outside,
        "keys": rows, "failures": failures, "workdir": workdir,
        "timeline": {t: dict(c) for t, c in sorted(rec.timeline.items())},
    }
    with open(results, "w") as f:
        json.dump(report, f, indent=2, default=str)
    log(f"figures written to {results}")
    for gw in gateways.values():
        code = gw.stop()
        if code != 0:
            failures.append(f"gateway {gw.name} exited {code} on SIGTERM at the end")
    if failures:
        for f in failures:
            log(f"FAIL: {f}")
        return 1
    log("PASS")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "upstream":
        run_upstream(int(sys.argv[2]))
        return 0
    if len(sys.argv) != 2:
        print("usage: soak.py TOLLGATE_BINARY | soak.py upstream PORT", file=sys.stderr)
        return 2
    workdir = os.environ.get("WORKDIR") or tempfile.mkdtemp(prefix="tollgate-soak-")
    os.makedirs(workdir, exist_ok=True)
    procs = Processes(workdir)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    code = 1
    try:
        code = soak(os.path.abspath(sys.argv[1]), workdir, procs)
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    except Exception as e:  # report, then clean up below
        log(f"ERROR: {type(e).__name__}: {e}")
        code = 1
    finally:
        procs.kill_all()
    return code


if __name__ == "__main__":
    sys.exit(main())
