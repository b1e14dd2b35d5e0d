# One publisher filling the embedded store's budget (issue 21), against a
# crier already running on HOST:PORT (127.0.0.1 only) with --publish-rate 0:
# 4 threads post as fast as they can for DURATION seconds (default 30),
# while one publisher posts 1 KiB every 100 ms; prints the share of that
# publisher's events stored. MODE `bytes` (default): 64 KiB events to 64
# topics, the other publisher to one topic. MODE `topics`: batches of 1,000
# one-byte events each to a new topic, the other publisher to a new topic
# each time.
#
#   crier serve --listen 127.0.0.1:18731 --publish-rate 0 &
#   python3 bench/budget_flood.py 127.0.0.1 18731 30 bytes
import http.client, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
DURATION = float(sys.argv[3]) if len(sys.argv) > 3 else 30
TOPICS = len(sys.argv) > 4 and sys.argv[4] == "topics"
stop = time.time() + DURATION
flood = {"ok": 0, "other": 0, "bytes": 0}
lock = threading.Lock()
def flooder(n):
    c = http.client.HTTPConnection(host, port, timeout=10)
    body = b"f" * (64 * 1024 - 64)
    i = 0
    while time.time() < stop:
        i += 1
        if TOPICS:
            items = ",".join(f'{{"topic":"x-{n}-{i}-{k}","data":"e"}}' for k in range(1000))
            c.request("POST", "/events", f"[{items}]".encode())
            stored, size = 1000, 1000
        else:
            c.request("POST", f"/topics/flood-{n}-{i % 16}", body)
            stored, size = 1, len(body)
        r = c.getresponse(); r.read()
        with lock:
            if r.status == 201:
                flood["ok"] += stored; flood["bytes"] += size
            else:
                flood["other"] += stored
threads = [threading.Thread(target=flooder, args=(n,)) for n in range(4)]
for t in threads: t.start()
c = http.client.HTTPConnection(host, port, timeout=10)
body = b"v" * 1024
ok = tried = 0
statuses = {}
next_at = time.time()
while time.time() < stop:
    next_at += 0.1
    tried += 1
    c.request("POST", f"/topics/victim-{tried}" if TOPICS else "/topics/victim", body)
    r = c.getresponse(); r.read()
    statuses[r.status] = statuses.get(r.status, 0) + 1
    ok += r.status == 201
    time.sleep(max(0, next_at - time.time()))
for t in threads: t.join()
print(f"victim: {ok}/{tried} stored ({100*ok/tried:.1f} %), statuses {statuses}; "
      f"flood: {flood['ok']} events stored ({flood['bytes']/2**20:.0f} MiB), {flood['other']} refused")
