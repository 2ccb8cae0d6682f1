#!/usr/bin/env python3
"""Redis CPU per publish, as docs/scaling.md measures it: a fresh redis-server (with a replica
when REPLICA=1), N pushhub nodes (the binary given) each following the topic with one SSE
reader, 20,000 publishes from 8 keep-alive client threads spread over the nodes; Redis's own
utime+stime from /proc over the publishes, per publish.

Usage: python3 tools/redis_cpu.py ./target/release/pushhub [NODES] [pushhub flags...]
LATENCY=1 measures publish latency instead (2,000 sequential publishes, p50 and p99).
REPLICA=1 attaches a replica to the Redis (for --redis-min-replicas).
STATS=1 prints Redis's INFO commandstats after the publishes."""
import os, socket, subprocess, sys, threading, time, http.client, tempfile, json

import ctypes, atexit

_libc = ctypes.CDLL(None)
def _die_with_parent():
    # Every process started here dies with this script, even if it is killed.
    _libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
_children = []
def _spawn(args, **kw):
    p = subprocess.Popen(args, preexec_fn=_die_with_parent, **kw)
    _children.append(p)
    return p
atexit.register(lambda: [c.kill() for c in _children])

binary = sys.argv[1]
nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
extra = sys.argv[3:]
PUBLISHES = 20000
THREADS = 8
tick = os.sysconf('SC_CLK_TCK')

def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p

def cpu(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick

rport = free_port()
d = tempfile.mkdtemp()
redis = _spawn(['redis-server', '--port', str(rport), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', d], stdout=subprocess.DEVNULL)
time.sleep(0.3)
if os.environ.get('REPLICA'):
    rp = free_port(); d2 = tempfile.mkdtemp()
    replica = _spawn(['redis-server', '--port', str(rp), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', d2, '--replicaof', '127.0.0.1', str(rport)], stdout=subprocess.DEVNULL)
    for _ in range(100):
        time.sleep(0.1)
        if 'master_link_status:up' in subprocess.run(['redis-cli','-p',str(rp),'info','replication'],capture_output=True,text=True).stdout: break
procs, ports = [], []
for i in range(nodes):
    port = free_port()
    p = _spawn([binary, '--listen', f'127.0.0.1:{port}', '--redis', f'redis://127.0.0.1:{rport}/', *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p); ports.append(port)
time.sleep(1.0 + nodes * 0.1)
received = [0] * nodes
def reader(i):
    s = socket.create_connection(('127.0.0.1', ports[i]))
    s.sendall(f'GET /topics/cpu/sse HTTP/1.1\r\nHost: x\r\n\r\n'.encode())
    while True:
        b = s.recv(65536)
        if not b: return
        received[i] += b.count(b'\nid: ')
for i in range(nodes):
    threading.Thread(target=reader, args=(i,), daemon=True).start()
time.sleep(1.0)
def publisher(k):
    c = http.client.HTTPConnection('127.0.0.1', ports[k % nodes])
    for n in range(PUBLISHES // THREADS):
        c.request('POST', '/topics/cpu', body=b'{"n":1}', headers={'content-type': 'application/json'})
        r = c.getresponse(); r.read()
        assert r.status == 201, r.status
if os.environ.get('LATENCY'):
    # Publish latency instead: 2,000 sequential publishes from one keep-alive connection.
    c = http.client.HTTPConnection('127.0.0.1', ports[0])
    took = []
    for n in range(2000):
        t = time.perf_counter()
        c.request('POST', '/topics/cpu', body=b'{"n":1}', headers={'content-type': 'application/json'})
        r = c.getresponse(); r.read()
        assert r.status == 201, r.status
        took.append((time.perf_counter() - t) * 1e6)
    took.sort()
    print(json.dumps({'nodes': nodes, 'extra': extra, 'replica': bool(os.environ.get('REPLICA')), 'publish_us_p50': round(took[1000]), 'publish_us_p99': round(took[1980])}))
    sys.exit(0)
before = cpu(redis.pid)
t0 = time.time()
ts = [threading.Thread(target=publisher, args=(k,)) for k in range(THREADS)]
[t.start() for t in ts]; [t.join() for t in ts]
elapsed = time.time() - t0
after = cpu(redis.pid)
time.sleep(0.5)
if os.environ.get('STATS'):
    # Which commands Redis ran, and how often: what a publish costs it, call by call.
    stats = subprocess.run(['redis-cli', '-p', str(rport), 'info', 'commandstats'], capture_output=True, text=True).stdout
    print(''.join(l for l in stats.splitlines(True) if l.startswith('cmdstat_')), file=sys.stderr)
print(json.dumps({'nodes': nodes, 'extra': extra, 'redis_us_per_publish': round((after - before) / PUBLISHES * 1e6, 1), 'publishes_per_s': round(PUBLISHES / elapsed), 'delivered': received}))
for p in procs: p.kill()
redis.kill()
if os.environ.get('REPLICA'): replica.kill()
