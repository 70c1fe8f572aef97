#!/usr/bin/env python3
"""Benchmark what gopdater's users feel: reply latency, downtime, bursts, floods and start-up.

Run: python3 bench/bench_gopdater.py [--quick] [--json]

It starts gopdater.py as a subprocess on a free loopback port with a fake `docker` (fake_docker.py)
first on PATH. The fake records every call with timestamps, answers gopdater's discovery calls, and
sleeps for a pull (2 s; 0.5 s with --quick) and for stop, rm, up and rmi (0.2 s; 0.1 s with --quick).
Standard library only.
"""

import argparse
import json
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fake_docker  # noqa: E402

GOPDATER = HERE.parent / "gopdater.py"
SECRET = secrets.token_urlsafe(24)
HOOK = json.dumps({"repository": {"repo_name": "acme/site"}, "push_data": {"tag": "latest"}}).encode()
WORKERS = 4


def raw_request(port, data, timeout=10.0):
    """Send bytes, read the answer until the server closes; return (status, seconds)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    status = int(answer[9:12]) if answer.startswith(b"HTTP/") else 0
    return status, time.perf_counter() - started


def post(path, body, headers=""):
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class Bench:
    """One gopdater process against the fake docker, and the measurements taken on it."""

    def __init__(self, quick):
        self.quick = quick
        self.pull_seconds = 0.5 if quick else 2.0
        self.command_seconds = 0.1 if quick else 0.2
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="gopdater-bench-"))
        (self.tmp / "bin").mkdir()
        shim = self.tmp / "bin" / "docker"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "fake_docker.py"}" "$@"\n')
        shim.chmod(0o755)
        self.state, self.log = self.tmp / "state.json", self.tmp / "calls.jsonl"
        self.state.write_text(json.dumps(fake_docker.initial_state(self.pull_seconds, self.command_seconds)))
        self.log.touch()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.env = {**os.environ, "PATH": f"{self.tmp / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FAKE_DOCKER_STATE": str(self.state), "FAKE_DOCKER_LOG": str(self.log),
                    "OWNER": "acme", "WEBHOOK_SECRET": SECRET, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "WORKERS": str(WORKERS), "COMPOSE_COMMAND": "auto"}
        for name in ("COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "SERVICES", "DRY_RUN", "DOCKER_HOST"):
            self.env.pop(name, None)
        self.process = None

    # -- process and fake helpers -------------------------------------------------------------

    def start(self):
        """Start gopdater; return seconds to the first /healthz answer and the idle RSS."""
        started = time.perf_counter()
        self.output = open(self.tmp / "gopdater.log", "wb")
        self.process = subprocess.Popen([sys.executable, str(GOPDATER)], env=self.env, cwd=self.tmp,
                                        stdout=self.output, stderr=subprocess.STDOUT)
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"gopdater exited: {(self.tmp / 'gopdater.log').read_text()}")
            try:
                if raw_request(self.port, b"GET /healthz HTTP/1.0\r\n\r\n", 1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.01)
        startup = time.perf_counter() - started
        time.sleep(0.5)
        return {"seconds": round(startup, 3), "idle_rss_mib": round(self.status("VmRSS") / 1024, 1)}

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        if self.process:
            self.output.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def status(self, field):
        """A number from /proc/<pid>/status (kB for memory fields)."""
        for line in pathlib.Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def calls(self, since=0):
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines[since:]]

    def hook(self):
        status, seconds = raw_request(self.port, post(f"/hooks/{SECRET}", HOOK))
        return status, seconds

    def deployments(self):
        data = f"GET /deployments HTTP/1.0\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(data)
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
        state = json.loads(self.state.read_text())
        state["pull_seconds"] = seconds
        self.state.write_text(json.dumps(state))

    # -- the measurements -----------------------------------------------------------------------

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
        mark = len(self.calls())
        self.hook()
        time.sleep(0.05)
        self.wait_idle()
        ours = self.window(self.calls(mark))
        mark = len(self.calls())
        name = fake_docker.PROJECT + "-site-1"
        for argv in (["stop", "-t", "10", name], ["rm", name], ["compose", "pull", "site"],
                     ["compose", "up", "-d", "--no-deps", "site"]):
            subprocess.run(["docker", *argv], env=self.env, capture_output=True, check=True)
        seed = self.window(self.calls(mark))
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
        mark = len(self.calls())
        started = time.perf_counter()
        statuses = [self.hook()[0] for _ in range(count)]
        spread = time.perf_counter() - started
        time.sleep(0.05)
        self.wait_idle()
        pulls = sum(c["argv"][:2] == ["compose", "pull"] for c in self.calls(mark))
        return {"hooks": count, "sent_within_ms": round(spread * 1000, 1), "accepted": statuses.count(202),
                "deployments": pulls}

    def sample(self, stop, peak):
        while not stop.is_set():
            peak["threads"] = max(peak["threads"], self.status("Threads"))
            time.sleep(0.02)

    def rejected(self, total, clients=4):
        """Wrong-secret requests from several clients: rate, peak RSS and peak threads."""
        request = post("/hooks/" + "x" * 32, HOOK)
        counts = [0] * clients
        peak, stop = {"threads": 0}, threading.Event()
        sampler = threading.Thread(target=self.sample, args=(stop, peak))
        sampler.start()

        def client(n):
            for _ in range(total // clients):
                if raw_request(self.port, request)[0] == 403:
                    counts[n] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join()
        return {"requests": total, "refused_403": sum(counts), "per_second": round(sum(counts) / elapsed),
                "rss_mib": round(self.status("VmRSS") / 1024, 1), "peak_rss_mib": round(self.status("VmHWM") / 1024, 1),
                "peak_threads": peak["threads"], "thread_bound": WORKERS + 2}

    def flood(self, seconds, idle_count=200, clients=3):
        """Junk flood plus idle slow connections: is a valid hook still accepted fast, and deployed?"""
        self.wait_idle()
        stop = threading.Event()
        idle = []
        for _ in range(idle_count):
            sock = socket.create_connection(("127.0.0.1", self.port))
            sock.sendall(b"POST /hooks/slow HTTP/1.1\r\n")
            idle.append(sock)
        junk = [b"\x16\x03\x01\x02\x00garbage\r\n\r\n", post("/hooks/" + "y" * 40, b"{}"),
                b"POST /hooks HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", b"GET /nope HTTP/1.1\r\n\r\n",
                post("/hooks/" + "z" * 40, b"{" * 5000)]
        sent = [0]

        def flooder(n):
            while not stop.is_set():
                try:
                    raw_request(self.port, junk[sent[0] % len(junk)], timeout=5)
                except OSError:
                    pass
                sent[0] += 1

        def trickle():
            while not stop.wait(0.5):
                for sock in idle:
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass

        threads = [threading.Thread(target=flooder, args=(n,)) for n in range(clients)]
        threads.append(threading.Thread(target=trickle))
        mark = len(self.calls())
        for thread in threads:
            thread.start()
        time.sleep(seconds / 2)
        status, latency = self.hook()
        time.sleep(seconds / 2)
        stop.set()
        for thread in threads:
            thread.join()
        for sock in idle:
            sock.close()
        self.wait_idle()
        deployed = any(c["argv"][:2] == ["compose", "up"] for c in self.calls(mark))
        return {"seconds": seconds, "junk_requests": sent[0], "idle_connections": idle_count,
                "valid_hook_status": status, "valid_hook_ms": round(latency * 1000, 1), "deployed": deployed}


def run(quick):
    """Run every measurement; return the results as a dict."""
    bench = Bench(quick)
    try:
        results = {"quick": quick, "fake_pull_s": bench.pull_seconds, "fake_command_s": bench.command_seconds,
                   "startup": bench.start()}
        results["latency"] = bench.reply_latency(200 if quick else 1000)
        results["downtime"] = bench.downtime()
        results["burst"] = bench.burst(20)
        results["rejected"] = bench.rejected(2000 if quick else 20000)
        results["flood"] = bench.flood(2 if quick else 5)
    finally:
        bench.stop()
    return results


def table(r):
    """The results as a short table with each target and whether it was met."""
    lat, down, burst, rej, flood = r["latency"], r["downtime"], r["burst"], r["rejected"], r["flood"]
    ok = lambda met: "met" if met else "MISSED"  # noqa: E731
    rows = [
        ("start-up to first /healthz", f"{r['startup']['seconds']:.2f} s", "", ""),
        ("idle RSS", f"{r['startup']['idle_rss_mib']} MiB", "", ""),
        (f"reply latency p50/p99/max (n={lat['requests']}, during a deployment: {lat['all_during_a_deployment']})",
         f"{lat['p50_ms']}/{lat['p99_ms']}/{lat['max_ms']} ms", "p99 < 20 ms", ok(lat["p99_ms"] < 20)),
        ("downtime window, gopdater (stop -> up done)", f"{down['gopdater']['window_s']:.2f} s",
         "pull outside it", ok(not down["gopdater"]["pull_inside_window"])),
        ("pull time beside it", f"{down['gopdater']['pull_s']:.2f} s", "", ""),
        ("downtime window, seed order (stop, rm, pull, up)", f"{down['seed_order']['window_s']:.2f} s",
         "(baseline)", ""),
        (f"burst: {burst['hooks']} hooks in {burst['sent_within_ms']} ms", f"{burst['deployments']} deployments",
         "<= 2", ok(burst["deployments"] <= 2)),
        (f"rejected requests, {rej['requests']} from 4 clients", f"{rej['per_second']}/s", ">= 1000/s",
         ok(rej["per_second"] >= 1000)),
        ("RSS after them (peak)", f"{rej['rss_mib']} MiB ({rej['peak_rss_mib']})", "< 40 MiB",
         ok(rej["peak_rss_mib"] < 40)),
        ("peak threads", f"{rej['peak_threads']}", f"<= {rej['thread_bound']} (WORKERS+2)",
         ok(rej["peak_threads"] <= rej["thread_bound"])),
        (f"valid hook during {flood['seconds']} s flood ({flood['junk_requests']} junk, "
         f"{flood['idle_connections']} idle)", f"{flood['valid_hook_status']} in {flood['valid_hook_ms']} ms",
         "202 < 100 ms, deployed", ok(flood["valid_hook_status"] == 202 and flood["valid_hook_ms"] < 100
                                      and flood["deployed"])),
    ]
    width = max(len(row[0]) for row in rows)
    lines = [f"gopdater benchmark{' (--quick)' if r['quick'] else ''}: fake docker pull {r['fake_pull_s']} s, "
             f"other commands {r['fake_command_s']} s", ""]
    lines += [f"{name:<{width}}  {value:<16} {target:<24} {verdict}".rstrip() for name, value, target, verdict in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and shorter phases (under 20 s)")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    args = parser.parse_args(argv)
    results = run(args.quick)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
