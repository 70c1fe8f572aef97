#!/usr/bin/env python3
"""Benchmark what gopdater's users feel: start-up, memory, reply latency, downtime, bursts, refusal
rates against a bare ThreadingHTTPServer, and the front under attack.

Run: python3 bench/bench_gopdater.py [--quick] [--json]

The scale figures start gopdater with PROJECTS=* over 10, 50 and 200 fake one-service projects (the fake
answers reads as slowly as the real engine did here) and push one project's image, then one image that 20
projects run, at PARALLEL=4 and 1.

gopdater is started as the quick start starts it (`python3 gopdater.py`) with a fake `docker`
(fake_docker.py) first on PATH: it records every call with timestamps and sleeps for a pull (2 s;
0.5 s with --quick) and for stop, rm, up and rmi (0.2 s; 0.1 s). Request rates come from wrk against
gopdater and the bare server in alternating rounds (the median ratio is kept: this machine is noisy),
each request with a header of its own, so no cache of heads could help. Standard library only.
"""

import argparse
import contextlib
import json
import pathlib
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fake_docker  # noqa: E402
import harness  # noqa: E402
from harness import HOOK, SECRET, post, raw_request  # noqa: E402

THREAD_BOUND = 6  # the main thread (the asyncio front), PARALLEL (4) workers, and one passing helper
DISTINCT_HEADS = 4096  # each wrk connection cycles through this many requests, each with its own header
PIPELINER = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
batch = b"GET /x HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n" * 500
while True:
    sock.sendall(batch)
    got = 0
    while got < 500 * 100:
        got += len(sock.recv(1 << 20))
"""


def flood_script(body, close=False):
    """wrk's Lua for a flood of POSTs of this body, each with an X-Request header of its own."""
    extra = ', ["Connection"] = "close"' if close else ""
    return (f"wrk.method = 'POST'\nwrk.body = [[{body.decode()}]]\nrequests = {{}}\n"
            f"for i = 1, {DISTINCT_HEADS} do requests[i] = wrk.format(nil, nil, "
            f'{{["Content-Type"] = "application/json", ["X-Request"] = tostring(i){extra}}}) end\n'
            f"n = 0\nrequest = function()\n  n = n % {DISTINCT_HEADS} + 1\n  return requests[n]\nend\n")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def median(values):
    return percentile(values, 0.5)


def make_certificate(folder):
    """A self-signed certificate and key for 127.0.0.1, made by openssl."""
    cert, key = folder / "bench.crt", folder / "bench.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class Bench:
    """gopdater (plain and TLS) and the bare server (plain and TLS) against the fake docker."""

    def __init__(self, quick):
        self.quick = quick
        self.pull_seconds = 0.5 if quick else 2.0
        self.command_seconds = 0.1 if quick else 0.2
        self.host = harness.FakeHost(self.pull_seconds, self.command_seconds)
        self.tmp = self.host.tmp
        self.cert, self.key = make_certificate(self.tmp)
        self.tls_client = ssl.create_default_context(cafile=str(self.cert))
        self.port, self.tls_port = harness.free_port(), harness.free_port()
        self.bare_port, self.bare_tls_port = harness.free_port(), harness.free_port()
        self.process = self.bare = None

    # -- processes ------------------------------------------------------------------------------

    def start(self):
        """Start gopdater and the bare servers; return start-up times and idle RSS figures."""
        started = time.perf_counter()
        self.process = self.host.launch(self.port)
        port_open = harness.wait_until(lambda: self.connects(self.port), self.process) - started
        healthz = harness.wait_until(lambda: harness.answers(self.port, b"GET /healthz HTTP/1.0\r\n\r\n"),
                                     self.process) - started
        ready = harness.wait_until(lambda: harness.answers(self.port, harness.deployments_request()),
                                   self.process) - started
        time.sleep(0.5)
        idle = harness.rss_mib(self.process.pid)
        bytecode = self.idle_rss(from_source=False)
        self.tls = self.host.launch(self.tls_port, TLS_CERT=str(self.cert), TLS_KEY=str(self.key))
        harness.wait_until(lambda: harness.answers(self.tls_port, harness.deployments_request(), self.tls_client),
                           self.tls)
        # The baselines start only now, so that they do not compete with gopdater's start for the CPU.
        bare = [sys.executable, str(HERE / "bare_server.py")]
        self.bare = subprocess.Popen([*bare, str(self.bare_port)])
        self.bare_tls = subprocess.Popen([*bare, str(self.bare_tls_port), str(self.cert), str(self.key)])
        harness.wait_until(lambda: self.connects(self.bare_port) and self.connects(self.bare_tls_port), self.bare)
        time.sleep(0.5)
        return {"port_open_ms": round(port_open * 1000, 1), "seconds": round(healthz, 3),
                "ready_seconds": round(ready, 3), "idle_rss_mib": round(idle, 1),
                "bytecode_idle_rss_mib": bytecode, "bare_idle_rss_mib": round(harness.rss_mib(self.bare.pid), 1)}

    def idle_rss(self, from_source):
        """Idle RSS of another gopdater, started as the container starts it, for comparison."""
        port = harness.free_port()
        process = self.host.launch(port, from_source=from_source)
        try:
            harness.wait_until(lambda: harness.answers(port, harness.deployments_request()), process)
            time.sleep(0.5)
            return round(harness.rss_mib(process.pid), 1)
        finally:
            process.terminate()
            process.wait(30)

    @staticmethod
    def connects(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        for process in (self.bare, getattr(self, "bare_tls", None)):
            if process and process.poll() is None:
                process.terminate()
                process.wait(10)
        self.host.close()

    def hook(self):
        return raw_request(self.port, post(f"/hooks/{SECRET}", HOOK))

    def deployments(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(harness.deployments_request())
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        return json.loads(answer.split(b"\r\n\r\n", 1)[1])["deployments"]

    def wait_idle(self, timeout=120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(d["state"] not in ("queued", "running") for d in self.deployments()):
                return
            time.sleep(0.05)
        raise SystemExit("gopdater did not finish its deployments")

    def set_pull(self, seconds):
        fake_docker.change_state(str(self.host.state), lambda state: state.update(pull_seconds=seconds))

    # -- deployments ----------------------------------------------------------------------------

    def reply_latency(self, count):
        """Latency of valid hooks sent while a deployment is running."""
        self.set_pull(max(self.pull_seconds, count * 0.004 + 1))
        self.hook()
        while not any(d["state"] == "running" for d in self.deployments()):
            time.sleep(0.01)
        running = next(d["id"] for d in self.deployments() if d["state"] == "running")
        latencies = [self.hook()[1] for _ in range(count)]
        during = any(d["id"] == running and d["state"] == "running" for d in self.deployments())
        self.set_pull(self.pull_seconds)  # the follow-up deployment's pull
        self.wait_idle()
        ms = [x * 1000 for x in latencies]
        return {"requests": count, "all_during_a_deployment": during, "p50_ms": round(percentile(ms, 0.5), 2),
                "p99_ms": round(percentile(ms, 0.99), 2), "max_ms": round(max(ms), 2)}

    def downtime(self):
        """Stop-to-running window of a gopdater deployment and of the seed's order, from the fake's clock."""
        self.wait_idle()
        mark = len(self.host.calls())
        self.hook()
        time.sleep(0.05)
        self.wait_idle()
        ours = self.window(self.host.calls(mark))
        mark = len(self.host.calls())
        name = fake_docker.PROJECT + "-site-1"
        env = self.host.env(self.port)
        for argv in (["stop", "-t", "10", name], ["rm", name], ["compose", "pull", "site"],
                     ["compose", "up", "-d", "--no-deps", "site"]):
            subprocess.run(["docker", *argv], env=env, capture_output=True, check=True)
        seed = self.window(self.host.calls(mark))
        return {"gopdater": ours, "seed_order": seed}

    @staticmethod
    def window(calls):
        first = {}
        for call in calls:
            key = next((k for k in ("pull", "stop", "up") if k in call["argv"][:2]), None)
            if key and key not in first:
                first[key] = call
        stop, up, pull = first["stop"], first["up"], first["pull"]
        inside = pull["start"] < up["end"] and pull["end"] > stop["start"]
        return {"window_s": round(up["end"] - stop["start"], 3), "pull_s": round(pull["end"] - pull["start"], 3),
                "pull_inside_window": inside}

    def burst(self, count=20):
        """count identical hooks within 100 ms: how many deployments run."""
        self.wait_idle()
        mark = len(self.host.calls())
        started = time.perf_counter()
        statuses = [self.hook()[0] for _ in range(count)]
        spread = time.perf_counter() - started
        time.sleep(0.05)
        self.wait_idle()
        pulls = sum(c["argv"][:2] == ["compose", "pull"] for c in self.host.calls(mark))
        return {"hooks": count, "sent_within_ms": round(spread * 1000, 1), "accepted": statuses.count(202),
                "deployments": pulls}

    # -- refusal rates --------------------------------------------------------------------------

    def wrk(self, url, body, seconds, close=False):
        """Requests per second that wrk (2 threads, 32 connections) gets answered, every request with an
        X-Request header of its own."""
        script = self.tmp / "post.lua"
        script.write_text(flood_script(body, close))
        out = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", "-s", str(script), url], capture_output=True,
                             text=True, timeout=60).stdout
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {"per_second": round(rate), "requests": total, "all_403": bool(refused) and
                int(refused.group(1)) == total}

    def compare(self, ours, bare, body, bare_body, seconds, rounds, close=False):
        """Alternate rounds of wrk against gopdater and the bare server; the median of the ratios."""
        rows = []
        for _ in range(rounds):
            theirs = self.wrk(bare, bare_body, seconds, close)
            mine = self.wrk(ours, body, seconds, close)
            rows.append((mine["per_second"] / theirs["per_second"], mine, theirs))
        ratio, mine, theirs = sorted(rows, key=lambda row: row[0])[len(rows) // 2]
        return {"gopdater": mine, "bare": theirs, "ratio": round(ratio, 2),
                "ratios": [round(row[0], 2) for row in rows]}

    def rejected(self, seconds, rounds):
        """Rejected requests/s, gopdater beside the bare ThreadingHTTPServer: keep-alive, close, TLS."""
        if not shutil.which("wrk"):
            raise SystemExit("wrk is not installed: apt-get install wrk (.ci/run does)")
        evil = json.dumps({"repository": {"repo_name": "evil/site"}, "push_data": {"tag": "latest"}}).encode()
        wrong = "/hooks/" + "x" * 32
        cases = {"wrong_secret": (wrong, HOOK), "wrong_owner": (f"/hooks/{SECRET}", evil)}
        peak, stop = {"threads": 0}, threading.Event()
        sampler = threading.Thread(target=self.sample, args=(stop, peak))
        sampler.start()
        results = {}
        for connection in ("keep_alive", "close", "tls"):
            port, bare = ((self.tls_port, self.bare_tls_port) if connection == "tls" else (self.port, self.bare_port))
            scheme = "https" if connection == "tls" else "http"
            for case, (path, body) in cases.items():
                results[f"{case}_{connection}"] = self.compare(
                    f"{scheme}://127.0.0.1:{port}{path}", f"{scheme}://127.0.0.1:{bare}{wrong}", body, HOOK,
                    seconds, rounds, close=connection == "close")
        stop.set()
        sampler.join()
        results.update({"rss_mib": round(harness.rss_mib(self.process.pid), 1),
                        "peak_rss_mib": round(harness.proc_status(self.process.pid, "VmHWM") / 1024, 1),
                        "peak_threads": peak["threads"], "thread_bound": THREAD_BOUND})
        return results

    def sample(self, stop, peak):
        while not stop.is_set():
            peak["threads"] = max(peak["threads"], harness.proc_status(self.process.pid, "Threads"))
            time.sleep(0.02)

    # -- under attack ---------------------------------------------------------------------------

    def healthz_latencies(self, seconds):
        """Milliseconds of /healthz on a new connection each, for this long."""
        latencies, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            latencies.append(raw_request(self.port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")[1] * 1000)
            time.sleep(0.005)
        return latencies

    def fairness(self, seconds):
        """/healthz latency of one client alone, then while another process pipelines requests as fast as it
        can (and reads the answers): the delay one pipelining client adds for the others."""
        alone = self.healthz_latencies(seconds)
        flooder = subprocess.Popen([sys.executable, "-c", PIPELINER, str(self.port)])
        try:
            harness.wait_until(lambda: True, flooder)
            time.sleep(0.3)
            latencies = self.healthz_latencies(seconds)
        finally:
            flooder.kill()
            flooder.wait(10)
        return {"requests": len(latencies), "p50_ms": round(median(latencies), 2),
                "p99_ms": round(percentile(latencies, 0.99), 2), "alone_p50_ms": round(median(alone), 2),
                "added_p50_ms": round(median(latencies) - median(alone), 2)}

    def attacks(self, seconds):
        """Every attack of the hostile suite at once; a valid hook from another client meanwhile."""
        self.wait_idle()
        idle = harness.rss_mib(self.process.pid)
        stop, held, counts = threading.Event(), [], {"junk": 0}
        pipeliner = socket.create_connection(("127.0.0.1", self.port))
        pipeliner.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(2000):
                pipeliner.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" * 2000)
        for path in ["/hooks/wrong-secret-0123456789abc"] * 192 + ["/hooks/ghcr"] * 64:
            sock = socket.create_connection(("127.0.0.1", self.port))
            with contextlib.suppress(OSError):
                sock.sendall(f"POST {path} HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n".encode() + b"x" * 500000)
            held.append(sock)
        junk = [b"GET /healthz HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n", b"GET http://[x?a HTTP/1.1\r\n\r\n",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET /healthz HTTP/1.1\r\nContent-Length: " + b"9" * 5000
                + b"\r\n\r\n", post("/hooks/" + "y" * 40, b"{}"), b"\x16\x03\x01\x02\x00garbage\r\n\r\n"]

        def flooder():
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    raw_request(self.port, junk[counts["junk"] % len(junk)], timeout=5)
                counts["junk"] += 1

        threads = [threading.Thread(target=flooder) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(seconds / 2)
        status, latency = self.hook()
        peak = harness.rss_mib(self.process.pid)
        time.sleep(seconds / 2)
        stop.set()
        for thread in threads:
            thread.join()
        for sock in [pipeliner, *held]:
            sock.close()
        self.wait_idle()
        return {"seconds": seconds, "junk_requests": counts["junk"], "held_bodies": len(held),
                "valid_hook_status": status, "valid_hook_ms": round(latency * 1000, 1),
                "rss_growth_mib": round(peak - idle, 1), "alive": self.process.poll() is None}

    def handshake_flood(self, count):
        """count connections to the HTTPS port, each held and never finishing a handshake (a third send the
        start of a ClientHello); a real TLS client asks /healthz all the while. RSS before, at the peak and
        after they close; the real client's answer times."""
        idle = harness.rss_mib(self.tls.pid)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 512)), hard))
        held, done, peak, times = [], threading.Event(), idle, []

        def flood():
            for n in range(count):
                with contextlib.suppress(OSError):
                    sock = socket.create_connection(("127.0.0.1", self.tls_port), timeout=5)
                    if n % 3 == 0:
                        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                    held.append(sock)
            done.set()

        flooder = threading.Thread(target=flood)
        started = time.perf_counter()
        flooder.start()
        try:
            while not done.is_set():
                status, seconds = raw_request(self.tls_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 5,
                                              self.tls_client)
                times.append(seconds if status == 200 else float("inf"))
                peak = max(peak, harness.rss_mib(self.tls.pid))
        finally:
            flooder.join()
            flood_seconds = time.perf_counter() - started
            for sock in held:
                sock.close()
        time.sleep(1)  # the closes are read and the connections freed
        return {"connections": count, "accepted": len(held), "seconds": round(flood_seconds, 2),
                "rss_idle_mib": round(idle, 1), "rss_peak_mib": round(peak, 1),
                "rss_after_mib": round(harness.rss_mib(self.tls.pid), 1), "client_requests": len(times),
                "client_p50_ms": round(percentile(times, 0.5) * 1000, 1),
                "client_max_ms": round(max(times) * 1000, 1), "alive": self.tls.poll() is None}

    def sigterm(self):
        """Seconds from SIGTERM to exit while a client holds a backlog of pipelined requests."""
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(2000):
                    sock.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" * 2000)
            started = time.perf_counter()
            self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(30)
        return {"seconds": round(time.perf_counter() - started, 3), "exit_code": code}


# -- a host with many projects ---------------------------------------------------------------------


def hook_for(ref):
    return post(f"/hooks/{SECRET}", json.dumps({"repository": {"repo_name": ref.split(":")[0]},
                                                "push_data": {"tag": "latest"}}).encode())


def views(port):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(harness.deployments_request())
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["deployments"]


def wait_ended(port, process, count, timeout=600):
    """Wait until count deployments have ended; return them."""
    found = []

    def ended():
        found[:] = [d for d in views(port) if d["state"] not in ("queued", "running")]
        return len(found) >= count and all(d["state"] not in ("queued", "running") for d in views(port))
    harness.wait_until(ended, process, timeout)
    return found


def scale(projects, pull_seconds, command_seconds, parallel=4):
    """PROJECTS=* over this many one-service projects, each on an image of its own (the fake's read times are
    real ones): start to ready, idle RSS, and one push of one project's image: its update, and the hook to idle
    (the update and the re-read after it)."""
    refs = {f"p{i:03d}": f"acme/app{i:03d}:latest" for i in range(projects)}
    host = harness.FakeHost(pull_seconds, command_seconds, refs, fake_docker.QUERY_SECONDS)
    port = harness.free_port()
    try:
        started = time.perf_counter()
        process = host.launch(port, PROJECTS="*", PARALLEL=str(parallel))
        ready = harness.wait_until(lambda: harness.answers(port, harness.deployments_request()), process, 120)
        time.sleep(1.0)
        idle = harness.rss_mib(process.pid)
        ref = refs[f"p{projects // 2:03d}"]
        host.push(ref)
        sent = time.perf_counter()
        status = raw_request(port, hook_for(ref))[0]
        view, = wait_ended(port, process, 1)
        idle_again = harness.wait_until(lambda: not [c for c in host.calls() if c["end"] > time.monotonic() - 0.3]
                                        and all(d["state"] != "running" for d in views(port)), process, 60)
        done = next(step["seconds"] for step in view["steps"] if step["step"] == "done")
        return {"projects": projects, "start_to_ready_s": round(ready - started, 2), "idle_rss_mib": round(idle, 1),
                "hook_status": status, "state": view["state"], "update_s": done,
                "hook_to_idle_s": round(idle_again - sent - 0.3, 2)}
    finally:
        host.close()


def fleet(projects, pull_seconds, command_seconds, parallel):
    """One push of the image all projects run: seconds until every one is updated, at PARALLEL."""
    host = harness.FakeHost(pull_seconds, command_seconds, {f"f{i:03d}": "acme/fleet:latest" for i in range(projects)},
                            fake_docker.QUERY_SECONDS)
    port = harness.free_port()
    try:
        process = host.launch(port, PROJECTS="*", PARALLEL=str(parallel))
        harness.wait_until(lambda: harness.answers(port, harness.deployments_request()), process, 120)
        host.push("acme/fleet:latest")
        sent = time.perf_counter()
        status = raw_request(port, hook_for("acme/fleet:latest"))[0]
        ended = wait_ended(port, process, projects)
        return {"projects": projects, "parallel": parallel, "hook_status": status,
                "updated": sum(d["state"] == "updated" for d in ended), "seconds": round(time.perf_counter() - sent, 1)}
    finally:
        host.close()


def many_projects(quick):
    """The scale figures: the cost of one update at 10, 50 and 200 projects, and a fleet push."""
    sizes = (10,) if quick else (10, 50, 200)
    pull, command = (0.5, 0.1) if quick else (2.0, 0.2)
    fleet_size = 4 if quick else 20
    return {"sizes": [scale(n, pull, command) for n in sizes],
            "fleet": [fleet(fleet_size, pull, command, parallel) for parallel in ((4,) if quick else (4, 1))]}


def registry_standin(state_path):
    """A registry on 127.0.0.1 naming, for HEAD /v2/<name>/manifests/<tag>, what the fake's registry holds
    (image ids stand for digests) in the state file state_path[0], given once the fake exists; (its address,
    a function that stops it)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            name, _, tag = self.path[len("/v2/"):].partition("/manifests/")
            digest = fake_docker.change_state(state_path[0], lambda state: state["registry"].get(
                f"{registry}/{name}:{tag}"))  # under the fake's lock: it rewrites the file as it works
            self.send_response(200 if digest else 404)
            if digest:
                self.send_header("Docker-Content-Digest", digest)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    registry = f"127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return registry, lambda: (server.shutdown(), server.server_close())


QUICK_RECONCILE = (20, 10, 5)  # --quick: 20 services on 10 images, 5 of them behind (10 services to update)


def reconcile_round(services=50, images=20, behind=10):
    """gopdater started with PROJECTS=* over `services` one-service projects on `images` images of a local
    registry stand-in, `behind` images pushed while it was stopped: seconds from start to its first round's end
    and to caught up (every service behind updated); then one more round (POST /reconcile), nothing behind."""
    port, state = harness.free_port(), []
    registry, stop = registry_standin(state)
    host = harness.FakeHost(0.05, 0.02, {f"p{i:03d}": f"{registry}/acme/img{i % images:03d}:latest"
                                         for i in range(services)}, fake_docker.QUERY_SECONDS)
    state.append(str(host.state))
    try:
        for i in range(behind):
            host.push(f"{registry}/acme/img{i:03d}:latest")
        started = time.perf_counter()
        process = host.launch(port, PROJECTS="*", OWNER=f"{registry}/acme", RECONCILE_INTERVAL="3600",
                              PARALLEL="4")
        rounds = lambda: metric(port, "gopdater_reconcile_rounds_total")  # noqa: E731
        first = harness.wait_until(lambda: rounds() >= 1, process, 120) - started
        due = sum(i % images < behind for i in range(services))
        caught_up = harness.wait_until(lambda: sum(v["state"] == "updated" for v in views(port)) >= due, process,
                                       300) - started
        asked = time.perf_counter()
        raw_request(port, post("/reconcile", b"", f"Authorization: Bearer {SECRET}\r\n"))
        again = harness.wait_until(lambda: rounds() >= 2, process, 120) - asked
        return {"services": services, "images": images, "behind": due, "first_round_s": round(first, 2),
                "caught_up_s": round(caught_up, 2), "round_s": round(again, 2),
                "queued_again": sum(1 for v in views(port)) - due, "rss_mib": round(harness.rss_mib(process.pid), 1)}
    finally:
        stop()
        host.close()


def metric(port, name):
    """One unlabelled figure of /metrics, or -1."""
    request = f"GET /metrics HTTP/1.0\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    except OSError:  # not listening yet
        return -1
    found = re.search(rf"^{name} (\d+)$", text, re.MULTILINE)
    return int(found.group(1)) if found else -1


def run(quick):
    """Run every measurement; return the results as a dict."""
    bench = Bench(quick)
    try:
        results = {"quick": quick, "fake_pull_s": bench.pull_seconds, "fake_command_s": bench.command_seconds,
                   "startup": bench.start()}
        results["latency"] = bench.reply_latency(200 if quick else 1000)
        results["downtime"] = bench.downtime()
        results["burst"] = bench.burst(20)
        results["rejected"] = bench.rejected(1 if quick else 2, 1 if quick else 7)
        results["fairness"] = bench.fairness(1 if quick else 3)
        results["attacks"] = bench.attacks(2 if quick else 5)
        results["handshake_flood"] = bench.handshake_flood(1000 if quick else 3000)
        results["reconcile"] = reconcile_round(*QUICK_RECONCILE) if quick else reconcile_round()
        results["sigterm"] = bench.sigterm()
    finally:
        bench.stop()
    results["many_projects"] = many_projects(quick)
    return results


TARGETS = {"wrong_secret_keep_alive": 2.0, "wrong_owner_keep_alive": 1.6}


def table(r):
    """The results as a short table with each target and whether it was met."""
    start, lat, down, burst, rej = r["startup"], r["latency"], r["downtime"], r["burst"], r["rejected"]
    fair, attacks, term, flood = r["fairness"], r["attacks"], r["sigterm"], r["handshake_flood"]
    ok = lambda met: "met" if met else "MISSED"  # noqa: E731
    rows = [
        ("start to port open", f"{start['port_open_ms']} ms", "(printed)", ""),
        ("start to first /healthz; to the project read", f"{start['seconds']:.2f} s; {start['ready_seconds']:.2f} s",
         "", ""),
        ("idle RSS, python3 gopdater.py (the quick start)", f"{start['idle_rss_mib']} MiB", "<= 40 MiB",
         ok(start["idle_rss_mib"] <= 40)),
        ("idle RSS, python3 -m gopdater (the container, bytecode); bare server",
         f"{start['bytecode_idle_rss_mib']}; {start['bare_idle_rss_mib']} MiB", "(printed)", ""),
        (f"reply latency p50/p99/max (n={lat['requests']}, during a deployment: {lat['all_during_a_deployment']})",
         f"{lat['p50_ms']}/{lat['p99_ms']}/{lat['max_ms']} ms", "p99 < 20 ms", ok(lat["p99_ms"] < 20)),
        ("downtime window, gopdater (stop -> up done)", f"{down['gopdater']['window_s']:.2f} s",
         "pull outside it", ok(not down["gopdater"]["pull_inside_window"])),
        ("downtime window, seed order (stop, rm, pull, up)", f"{down['seed_order']['window_s']:.2f} s",
         "(baseline)", ""),
        (f"burst: {burst['hooks']} hooks in {burst['sent_within_ms']} ms", f"{burst['deployments']} deployments",
         "<= 2", ok(burst["deployments"] <= 2)),
    ]
    for name, row in ((k, v) for k, v in rej.items() if isinstance(v, dict)):
        target = TARGETS.get(name)
        rows.append((f"rejected/s, {name.replace('_', ' ')}: gopdater vs bare (median of {row['ratios']})",
                     f"{row['gopdater']['per_second']} vs {row['bare']['per_second']} = {row['ratio']}x",
                     f">= {target}x bare" if target else "(printed)",
                     ok(row["ratio"] >= target and row["gopdater"]["all_403"]) if target else ""))
    rows += [
        ("RSS after them (peak)", f"{rej['rss_mib']} MiB ({rej['peak_rss_mib']})", "(printed)", ""),
        ("peak threads", f"{rej['peak_threads']}", f"<= {rej['thread_bound']}",
         ok(rej["peak_threads"] <= rej["thread_bound"])),
        (f"/healthz p50 alone; p50/p99 while another process pipelines (n={fair['requests']})",
         f"{fair['alone_p50_ms']}; {fair['p50_ms']}/{fair['p99_ms']} ms", "adds <= 3 ms (p50)",
         ok(fair["added_p50_ms"] <= 3)),
        (f"every attack at once ({attacks['junk_requests']} junk, {attacks['held_bodies']} held bodies, a "
         "pipeliner not reading): valid hook", f"{attacks['valid_hook_status']} in {attacks['valid_hook_ms']} ms",
         "202 < 100 ms", ok(attacks["valid_hook_status"] == 202 and attacks["valid_hook_ms"] < 100)),
        ("  RSS growth meanwhile", f"{attacks['rss_growth_mib']} MiB", "<= 32 MiB",
         ok(attacks["rss_growth_mib"] <= 32 and attacks["alive"])),
        (f"HTTPS: {flood['connections']} connects never finishing a handshake ({flood['seconds']} s): RSS idle, "
         "peak, after", f"{flood['rss_idle_mib']}, {flood['rss_peak_mib']}, {flood['rss_after_mib']} MiB",
         "+64, +16 MiB", ok(flood["rss_peak_mib"] - flood["rss_idle_mib"] <= 64 and
                             flood["rss_after_mib"] - flood["rss_idle_mib"] <= 16 and flood["alive"])),
        (f"  a real TLS client meanwhile (n={flood['client_requests']}): /healthz p50, max",
         f"{flood['client_p50_ms']}, {flood['client_max_ms']} ms", "max < 1 s", ok(flood["client_max_ms"] < 1000)),
        ("SIGTERM to exit, a pipelined backlog queued", f"{term['seconds']} s (exit {term['exit_code']})", "< 1 s",
         ok(term["seconds"] < 1 and term["exit_code"] == 0)),
    ]
    rec = r["reconcile"]
    rows += [
        (f"reconcile: {rec['services']} services on {rec['images']} images, {rec['behind']} behind: start to the "
         "first round's end; to caught up", f"{rec['first_round_s']} s; {rec['caught_up_s']} s", "(printed)", ""),
        ("  one more round, nothing behind (POST /reconcile); deployments it queued", f"{rec['round_s']} s; "
         f"{rec['queued_again']}", "0 queued", ok(rec["queued_again"] == 0)),
        ("  RSS after it all (50 projects, 30 updates, 2 rounds)", f"{rec['rss_mib']} MiB", "(printed)", ""),
    ]
    many = r["many_projects"]
    for size in many["sizes"]:
        rows.append((f"{size['projects']} projects: start to ready; one push: its update, hook to idle",
                     f"{size['start_to_ready_s']} s; {size['update_s']} s, {size['hook_to_idle_s']} s",
                     "ready <= 5 s" if size["projects"] <= 50 else "(printed)",
                     ok(size["start_to_ready_s"] <= 5 and size["state"] == "updated") if size["projects"] <= 50
                     else ""))
        if size["projects"] == 50:
            rows.append(("  idle RSS with 50 projects", f"{size['idle_rss_mib']} MiB", "<= 40 MiB",
                         ok(size["idle_rss_mib"] <= 40)))
    for row in many["fleet"]:
        rows.append((f"one push, {row['projects']} projects on one image, PARALLEL={row['parallel']}: all updated",
                     f"{row['seconds']} s ({row['updated']} updated)", "(printed)", ""))
    width = max(len(row[0]) for row in rows)
    lines = [f"gopdater benchmark{' (--quick)' if r['quick'] else ''}: fake docker pull {r['fake_pull_s']} s, "
             f"other commands {r['fake_command_s']} s", ""]
    lines += [f"{name:<{width}}  {value:<26} {target:<16} {verdict}".rstrip() for name, value, target, verdict in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter phases (under a minute)")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    args = parser.parse_args(argv)
    results = run(args.quick)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
