#!/usr/bin/env python3
"""How long a Redis failover interrupts crier: a primary is killed (SIGKILL)
under load, and this measures, from the kill, when the sentinels or the
cluster named the new primary, when each crier node first had a publish
acknowledged again, and when each node's SSE subscriber first received an
event published after the kill. Then what --redis-wait-replicas 1 costs per
publish (median and p99 latency, sequential publishes, before any kill).
With --wait-replicas, the killed server is started again as soon as the new
primary is named (it rejoins as a replica): publishes wait for a replica.

    python3 bench/failover.py sentinel|cluster [--wait-replicas N] [--crier PATH]

Prints one JSON line per run. Every process it starts (redis-server,
redis-sentinel, crier) is stopped by its PID on exit; all traffic is to
127.0.0.1; Redis keeps nothing on disk. Standard library only.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCS = []
TOPIC = "failover"


def free_port():
    # Below 55536: a cluster node also listens on its port + 10000.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55536:
            return port


def spawn(args, **kw):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    PROCS.append(proc)
    return proc


def cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True)
    return out.stdout.strip()


def wait_until(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    sys.exit(f"timed out waiting for {what}")


def redis(tmp, port, *extra):
    d = os.path.join(tmp, str(port))
    os.makedirs(d, exist_ok=True)
    proc = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--dir", d, *extra])
    wait_until(f"redis-server on {port}", lambda: cli(port, "PING") == "PONG")
    return proc


class Sentinel:
    MASTER = "bench-primary"

    def __init__(self, tmp):
        self.primary_port, self.replica_port = free_port(), free_port()
        self.primary = redis(tmp, self.primary_port)
        redis(tmp, self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port),
              "--replica-announce-ip", "127.0.0.1")
        self.sentinels = []
        for _ in range(3):
            port = free_port()
            conf = os.path.join(tmp, f"sentinel-{port}.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {tmp}\n"
                        f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary_port} 2\n"
                        f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                        f"sentinel failover-timeout {self.MASTER} 2000\n")
            spawn(["redis-sentinel", conf])
            wait_until("redis-sentinel", lambda: cli(port, "PING") == "PONG")
            self.sentinels.append(port)
        wait_until("the replica in sync",
                   lambda: "master_link_status:up" in cli(self.replica_port, "info", "replication"))
        wait_until("the sentinels to know the replica", lambda: all(
            str(self.replica_port) in cli(s, "sentinel", "replicas", self.MASTER) for s in self.sentinels))

    def flags(self):
        urls = ",".join(f"redis://127.0.0.1:{p}" for p in self.sentinels)
        return ["--redis-sentinel", urls, "--redis-master", self.MASTER]

    def kill(self):
        self.primary.send_signal(signal.SIGKILL)
        self.primary.wait()

    def rejoin(self, tmp):
        """The old primary back, as a replica of the new one."""
        self.primary = redis(tmp, self.primary_port, "--replicaof", "127.0.0.1",
                             str(self.replica_port), "--replica-announce-ip", "127.0.0.1")

    def promoted(self):
        named = cli(self.sentinels[0], "sentinel", "get-master-addr-by-name", self.MASTER)
        return named.splitlines()[-1:] == [str(self.replica_port)]


class Cluster:
    def __init__(self, tmp):
        self.ports = [free_port() for _ in range(6)]
        self.procs = [redis(tmp, p, "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                            "--cluster-require-full-coverage", "no",
                            "--cluster-config-file", os.path.join(tmp, str(p), "nodes.conf"))
                      for p in self.ports]
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", "1", "--cluster-yes"],
                       capture_output=True, check=True)
        wait_until("the cluster", lambda: all(
            "cluster_state:ok" in cli(p, "cluster", "info") for p in self.ports))
        wait_until("the replicas in sync", lambda: all(
            "role:master" in r or "master_link_status:up" in r
            for r in (cli(p, "info", "replication") for p in self.ports)))

    def flags(self):
        return ["--redis-cluster", ",".join(f"redis://127.0.0.1:{p}" for p in self.ports[:3])]

    def kill(self):
        # The primary that holds the topic.
        for port, proc in zip(self.ports, self.procs):
            if ("role:master" in cli(port, "info", "replication")
                    and cli(port, "--scan", "--pattern", f"*{{{TOPIC}}}:meta")):
                self.killed = port
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
        sys.exit("no primary holds the topic")

    def rejoin(self, tmp):
        """The killed node back: the cluster makes it a replica."""
        redis(tmp, self.killed, "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
              "--cluster-require-full-coverage", "no",
              "--cluster-config-file", os.path.join(tmp, str(self.killed), "nodes.conf"))

    def promoted(self):
        live = [p for p in self.ports if p != self.killed]
        masters = [p for p in live if "role:master" in cli(p, "info", "replication")]
        return len(masters) == 3


def crier(path, port, flags, wait_replicas):
    proc = spawn([path, "--listen", f"127.0.0.1:{port}", "--publish-rate", "0",
                  "--redis-wait-replicas", str(wait_replicas), "--redis-timeout", "1s",
                  "--drain-delay", "0", "--drain-window", "0", *flags],
                 env={**os.environ, "RUST_LOG": "warn"})

    def ready():
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/readyz")
            return c.getresponse().status == 200
        except OSError:
            return False
    wait_until("crier ready", ready)
    return proc


def publish(conn, data):
    """One publish on a keep-alive connection: (status, seconds)."""
    started = time.monotonic()
    try:
        conn.request("POST", f"/topics/{TOPIC}", body=data)
        response = conn.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    except (OSError, http.client.HTTPException):
        conn.close()
        return 0, time.monotonic() - started


def subscribe(port, arrivals, stop):
    """Records when each event's data arrives on an SSE stream of `port`."""
    while not stop.is_set():
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("GET", f"/topics/{TOPIC}")
            r = c.getresponse()
            for raw in r:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    arrivals.append((time.monotonic(), line[6:]))
                if stop.is_set():
                    return
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("topology", choices=["sentinel", "cluster"])
    parser.add_argument("--wait-replicas", type=int, default=0)
    parser.add_argument("--crier", default=os.path.join(ROOT, "target", "release", "crier"))
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    try:
        group = Sentinel(tmp) if args.topology == "sentinel" else Cluster(tmp)
        ports = [free_port(), free_port()]
        for port in ports:
            crier(args.crier, port, group.flags(), args.wait_replicas)
        conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=5) for p in ports]
        # The publish cost, sequential, before any failover.
        latencies = [publish(conns[i % 2], f"warm-{i}")[1] for i in range(400)]
        stop = threading.Event()
        arrivals = [[], []]
        for port, log in zip(ports, arrivals):
            threading.Thread(target=subscribe, args=(port, log, stop), daemon=True).start()
        time.sleep(0.5)
        group.kill()
        killed = time.monotonic()
        acked = [None, None]
        first_after = {}
        elected = None
        n = 0
        while time.monotonic() - killed < 30 and (None in acked or elected is None):
            if elected is None and group.promoted():
                elected = time.monotonic() - killed
                if args.wait_replicas > 0:
                    # Publishes wait for a replica: the old primary rejoins.
                    group.rejoin(tmp)
            for i, conn in enumerate(conns):
                data = f"after-{n}"
                n += 1
                status, _ = publish(conn, data)
                if status == 201:
                    first_after[data] = time.monotonic()
                    if acked[i] is None:
                        acked[i] = time.monotonic() - killed
                elif status == 0:
                    conns[i] = http.client.HTTPConnection("127.0.0.1", ports[i], timeout=5)
            time.sleep(0.02)
        # Until each subscriber has one event published after the kill.
        deadline = time.monotonic() + 30
        delivered = [None, None]
        while time.monotonic() < deadline and None in delivered:
            for i, log in enumerate(arrivals):
                if delivered[i] is None:
                    times = [t for t, d in list(log) if d in first_after]
                    if times:
                        delivered[i] = min(times) - killed
            time.sleep(0.05)
        stop.set()
        r = lambda x: None if x is None else round(x, 2)
        print(json.dumps({
            "topology": args.topology,
            "wait_replicas": args.wait_replicas,
            "publish_latency_ms": {"p50": r(percentile(latencies, 0.5) * 1000),
                                   "p99": r(percentile(latencies, 0.99) * 1000)},
            "seconds_from_kill": {"new_primary_named": r(elected),
                                  "first_ack": [r(x) for x in acked],
                                  "first_delivery": [r(x) for x in delivered]},
            "load": open("/proc/loadavg").read().split()[:3],
        }))
    finally:
        for proc in reversed(PROCS):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
