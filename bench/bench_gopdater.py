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
import py_compile
import re
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
THREAD_BOUND = 3  # the main thread (the asyncio front), the deployer, and one passing helper


def raw_request(port, data, timeout=10.0):
    """Send bytes and read one answer (by its Content-Length, or to the close); return (status, seconds)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if not chunk or (sep and length and len(body) >= int(length.group(1))):
                break
    status = int(answer[9:12]) if answer.startswith(b"HTTP/") else 0
    return status, time.perf_counter() - started


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, process, timeout=30):
    """Poll predicate every 2 ms until true; return the perf_counter time it became true."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if process.poll() is not None:
            raise SystemExit(f"a benchmark process exited with code {process.returncode}")
        if predicate():
            return time.perf_counter()
        time.sleep(0.002)
    raise SystemExit("timed out waiting for a benchmark process")


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
        self.port = free_port()
        self.env = {**os.environ, "PATH": f"{self.tmp / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FAKE_DOCKER_STATE": str(self.state), "FAKE_DOCKER_LOG": str(self.log),
                    "OWNER": "acme", "WEBHOOK_SECRET": SECRET, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "COMPOSE_COMMAND": "auto"}
        for name in ("COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "SERVICES", "DRY_RUN", "DOCKER_HOST"):
            self.env.pop(name, None)
        self.process = None

    # -- process and fake helpers -------------------------------------------------------------

    def start(self):
        """Start gopdater and the bare baseline server; return start-up times and both idle RSS figures."""
        started = time.perf_counter()
        self.output = open(self.tmp / "gopdater.log", "wb")
        self.process = self.launch(from_source=False)
        port_open = wait_until(lambda: self.connects(self.port), self.process) - started
        healthz = wait_until(lambda: self.answers(b"GET /healthz HTTP/1.0\r\n\r\n"), self.process) - started
        deployments = f"GET /deployments HTTP/1.0\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode()
        ready = wait_until(lambda: self.answers(deployments), self.process) - started
        # The baseline starts only now, so that it does not compete with gopdater's start for the CPU.
        self.bare_port = free_port()
        self.bare = subprocess.Popen([sys.executable, str(HERE / "bare_server.py"), str(self.bare_port)])
        wait_until(lambda: self.connects(self.bare_port), self.bare)
        time.sleep(0.5)
        return {"port_open_ms": round(port_open * 1000, 1), "seconds": round(healthz, 3),
                "ready_seconds": round(ready, 3), "idle_rss_mib": round(self.status("VmRSS") / 1024, 1),
                "bare_idle_rss_mib": round(self.status("VmRSS", self.bare.pid) / 1024, 1),
                "from_source_idle_rss_mib": self.source_rss()}

    def launch(self, from_source):
        """Start gopdater as the container does (python3 -m gopdater, from bytecode compiled at build), or
        from source as `python3 gopdater.py` does; return the process."""
        app = self.tmp / "app"
        if not app.exists():
            app.mkdir()
            shutil.copy(GOPDATER, app / "gopdater.py")
            py_compile.compile(str(app / "gopdater.py"), cfile=None, doraise=True)
        argv = [sys.executable, str(GOPDATER)] if from_source else [sys.executable, "-m", "gopdater"]
        env = self.env if from_source else {**self.env, "PYTHONPATH": str(app)}
        return subprocess.Popen(argv, env=env, cwd=self.tmp, stdout=self.output, stderr=subprocess.STDOUT)

    def source_rss(self):
        """Idle RSS of gopdater started from source, on another port, for comparison."""
        port, self.env["PORT"] = self.env["PORT"], str(free_port())
        process = self.launch(from_source=True)
        try:
            deployments = f"GET /deployments HTTP/1.0\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode()
            wait_until(lambda: self.answers(deployments, int(self.env["PORT"])), process)
            time.sleep(0.5)
            return round(self.status("VmRSS", process.pid) / 1024, 1)
        finally:
            process.terminate()
            process.wait(30)
            self.env["PORT"] = port

    @staticmethod
    def connects(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def answers(self, request, port=None):
        try:
            return raw_request(port or self.port, request, 1)[0] == 200
        except OSError:
            return False

    def stop(self):
        if getattr(self, "bare", None) and self.bare.poll() is None:
            self.bare.terminate()
            self.bare.wait(10)
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        if self.process:
            self.output.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def status(self, field, pid=None):
        """A number from /proc/<pid>/status (kB for memory fields)."""
        for line in pathlib.Path(f"/proc/{pid or self.process.pid}/status").read_text().splitlines():
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

    def wrk(self, port, path, body, seconds, close=False, distinct=False):
        """Requests per second that wrk (2 threads, 32 connections) gets answered 403 on one path; with
        distinct, every request has a path of its own, so no two heads are alike."""
        script = self.tmp / "post.lua"
        script.write_text("wrk.method = 'POST'\nwrk.body = [[" + body.decode() + "]]\n"
                          "wrk.headers['Content-Type'] = 'application/json'\n"
                          + ("wrk.headers['Connection'] = 'close'\n" if close else "")
                          + ("n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(nil, "
                             f"'{path}' .. n)\nend\n" if distinct else ""))
        out = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", "-s", str(script),
                              f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=60).stdout
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {"per_second": round(rate), "requests": total, "all_403": bool(refused) and
                int(refused.group(1)) == total}

    def rejected(self, seconds):
        """Rejected requests/s from wrk, gopdater beside the bare ThreadingHTTPServer, keep-alive and close."""
        if not shutil.which("wrk"):
            raise SystemExit("wrk is not installed: apt-get install wrk (.ci/run does)")
        evil = json.dumps({"repository": {"repo_name": "evil/site"}, "push_data": {"tag": "latest"}}).encode()
        cases = {"wrong_secret": ("/hooks/" + "x" * 32, HOOK), "wrong_owner": (f"/hooks/{SECRET}", evil)}
        peak, stop = {"threads": 0}, threading.Event()
        sampler = threading.Thread(target=self.sample, args=(stop, peak))
        sampler.start()
        results = {}
        for connection in ("keep_alive", "close"):
            close = connection == "close"
            bare = self.wrk(self.bare_port, "/hooks/" + "x" * 32, HOOK, seconds, close)
            for case, (path, body) in cases.items():
                ours = self.wrk(self.port, path, body, seconds, close)
                results[f"{case}_{connection}"] = {"gopdater": ours, "bare": bare, "ratio": round(
                    ours["per_second"] / bare["per_second"], 2)}
        bare = self.wrk(self.bare_port, "/hooks/" + "x" * 32, HOOK, seconds, distinct=True)
        ours = self.wrk(self.port, "/hooks/" + "x" * 32, HOOK, seconds, distinct=True)
        results["wrong_secret_every_head_new_keep_alive"] = {"gopdater": ours, "bare": bare, "ratio": round(
            ours["per_second"] / bare["per_second"], 2)}
        stop.set()
        sampler.join()
        results.update({"rss_mib": round(self.status("VmRSS") / 1024, 1),
                        "peak_rss_mib": round(self.status("VmHWM") / 1024, 1),
                        "peak_threads": peak["threads"], "thread_bound": THREAD_BOUND})
        return results

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
        results["rejected"] = bench.rejected(1 if quick else 5)
        results["flood"] = bench.flood(2 if quick else 5)
    finally:
        bench.stop()
    return results


def table(r):
    """The results as a short table with each target and whether it was met."""
    start, lat, down, burst, rej, flood = (r["startup"], r["latency"], r["downtime"], r["burst"], r["rejected"],
                                           r["flood"])
    ok = lambda met: "met" if met else "MISSED"  # noqa: E731
    rows = [
        ("start to port open", f"{start['port_open_ms']} ms", "< 100 ms", ok(start["port_open_ms"] < 100)),
        ("start to first /healthz; to the project read", f"{start['seconds']:.2f} s; {start['ready_seconds']:.2f} s",
         "", ""),
        ("idle RSS, gopdater (python3 -m, bytecode) vs bare ThreadingHTTPServer",
         f"{start['idle_rss_mib']} vs {start['bare_idle_rss_mib']} MiB", "<= bare + 2 MiB",
         ok(start["idle_rss_mib"] <= start["bare_idle_rss_mib"] + 2)),
        ("idle RSS, gopdater started from source (python3 gopdater.py)", f"{start['from_source_idle_rss_mib']} MiB",
         "(printed)", ""),
        (f"reply latency p50/p99/max (n={lat['requests']}, during a deployment: {lat['all_during_a_deployment']})",
         f"{lat['p50_ms']}/{lat['p99_ms']}/{lat['max_ms']} ms", "p99 < 20 ms", ok(lat["p99_ms"] < 20)),
        ("downtime window, gopdater (stop -> up done)", f"{down['gopdater']['window_s']:.2f} s",
         "pull outside it", ok(not down["gopdater"]["pull_inside_window"])),
        ("pull time beside it", f"{down['gopdater']['pull_s']:.2f} s", "", ""),
        ("downtime window, seed order (stop, rm, pull, up)", f"{down['seed_order']['window_s']:.2f} s",
         "(baseline)", ""),
        (f"burst: {burst['hooks']} hooks in {burst['sent_within_ms']} ms", f"{burst['deployments']} deployments",
         "<= 2", ok(burst["deployments"] <= 2)),
    ]
    for name, row in ((k, v) for k, v in rej.items() if isinstance(v, dict)):
        targeted = name in ("wrong_secret_keep_alive", "wrong_owner_keep_alive")
        target = ">= 2.5x bare" if targeted else "(printed)"
        rows.append((f"rejected/s, {name.replace('_', ' ')} (wrk -t2 -c32): gopdater vs bare",
                     f"{row['gopdater']['per_second']} vs {row['bare']['per_second']} = {row['ratio']}x", target,
                     ok(row["ratio"] >= 2.5 and row["gopdater"]["all_403"]) if targeted else ""))
    rows += [
        ("RSS after them (peak)", f"{rej['rss_mib']} MiB ({rej['peak_rss_mib']})", "< 40 MiB",
         ok(rej["peak_rss_mib"] < 40)),
        ("peak threads", f"{rej['peak_threads']}", f"<= {rej['thread_bound']}",
         ok(rej["peak_threads"] <= rej["thread_bound"])),
        (f"valid hook during {flood['seconds']} s flood ({flood['junk_requests']} junk, "
         f"{flood['idle_connections']} idle)", f"{flood['valid_hook_status']} in {flood['valid_hook_ms']} ms",
         "202 < 100 ms, deployed", ok(flood["valid_hook_status"] == 202 and flood["valid_hook_ms"] < 100
                                      and flood["deployed"])),
    ]
    width = max(len(row[0]) for row in rows)
    lines = [f"gopdater benchmark{' (--quick)' if r['quick'] else ''}: fake docker pull {r['fake_pull_s']} s, "
             f"other commands {r['fake_command_s']} s", ""]
    lines += [f"{name:<{width}}  {value:<24} {target:<24} {verdict}".rstrip() for name, value, target, verdict in rows]
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
