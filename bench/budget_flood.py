# One publisher filling the retained budget (issue 21), against a crier
# already running on HOST:PORT (127.0.0.1 only) with --publish-rate 0:
# 4 threads post 64 KiB events to 64 topics as fast as they can for
# DURATION seconds (default 30), while one publisher posts 1 KiB every
# 100 ms; prints the share of that publisher's events stored.
#
#   crier serve --listen 127.0.0.1:18731 --publish-rate 0 &
#   python3 bench/budget_flood.py 127.0.0.1 18731 30
import http.client, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
DURATION = float(sys.argv[3]) if len(sys.argv) > 3 else 30
stop = time.time() + DURATION
flood = {"ok": 0, "other": 0, "bytes": 0}
lock = threading.Lock()
def flooder(n):
    c = http.client.HTTPConnection(host, port, timeout=10)
    body = b"f" * (64 * 1024 - 64)
    i = 0
    while time.time() < stop:
        i += 1
        c.request("POST", f"/topics/flood-{n}-{i % 16}", body)
        r = c.getresponse(); r.read()
        with lock:
            if r.status == 201:
                flood["ok"] += 1; flood["bytes"] += len(body)
            else:
                flood["other"] += 1
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
    c.request("POST", "/topics/victim", body)
    r = c.getresponse(); r.read()
    statuses[r.status] = statuses.get(r.status, 0) + 1
    ok += r.status == 201
    time.sleep(max(0, next_at - time.time()))
for t in threads: t.join()
print(f"victim: {ok}/{tried} stored ({100*ok/tried:.1f} %), statuses {statuses}; "
      f"flood: {flood['ok']} stored ({flood['bytes']/2**20:.0f} MiB), {flood['other']} refused")
