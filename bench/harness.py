"""What the benchmark and the hostile-client tests share: gopdater started as a user starts it, against
the fake `docker` of fake_docker.py, on a free 127.0.0.1 port, and small raw-socket clients.

Standard library only.
"""

import functools
import json
import os
import pathlib
import py_compile
import re
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fake_docker  # noqa: E402

GOPDATER = HERE.parent / "gopdater.py"
SECRET = secrets.token_urlsafe(24)
HOOK = json.dumps({"repository": {"repo_name": "acme/site"}, "push_data": {"tag": "latest"}}).encode()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(path, body, headers=""):
    """The bytes of a POST with a JSON body and its Content-Length."""
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_answer(sock):
    """Read one HTTP answer (by its Content-Length, or to the close); return its bytes."""
    answer = b""
    while True:
        chunk = sock.recv(65536)
        answer += chunk
        head, sep, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if not chunk or (sep and length and len(body) >= int(length.group(1))):
            return answer


def figure(text):
    """Keep one figure a test measured (latency, failed requests) for the end of the run, not the test output:
    test.sh prints them all together from the file GOPDATER_FIGURES names."""
    path = os.environ.get("GOPDATER_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text.replace("\n", " ") + "\n")


def raw_request(port, data, timeout=10.0, tls=None):
    """Send bytes on a new connection (TLS with this client context) and read one answer; return
    (status, seconds), status 0 when no HTTP answer came."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain:
        with tls.wrap_socket(plain, server_hostname="localhost") if tls else plain as sock:
            sock.sendall(data)
            answer = read_answer(sock)
    status = int(answer[9:12]) if answer.startswith(b"HTTP/") else 0
    return status, time.perf_counter() - started


def proc_status(pid, field):
    """A number from /proc/<pid>/status (kB for memory fields)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_mib(pid):
    return proc_status(pid, "VmRSS") / 1024


class FakeHost:
    """A folder with the fake `docker` first on PATH, its state and call log, and gopdater's environment."""

    def __init__(self, pull_seconds=0.5, command_seconds=0.1, projects=None, query_seconds=None):
        """projects: {name: image reference}, each a project with a folder here (for PROJECTS=*); None: one
        project found from gopdater's own folder."""
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="gopdater-bench-"))
        (self.tmp / "bin").mkdir()
        shim = self.tmp / "bin" / "docker"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "fake_docker.py"}" "$@"\n')
        shim.chmod(0o755)
        self.state, self.log = self.tmp / "state.json", self.tmp / "calls.jsonl"
        folders = {}
        for name, ref in (projects or {}).items():
            folder = self.tmp / "projects" / name
            folder.mkdir(parents=True)
            (folder / "compose.yaml").write_text(f"services:\n  site:\n    image: {ref}\n")
            folders[name] = (str(folder), ref)
        self.state.write_text(json.dumps(fake_docker.initial_state(pull_seconds, command_seconds, folders or None,
                                                                   query_seconds)))
        self.log.touch()
        self.processes = []

    def env(self, port, **settings):
        """gopdater's environment: only what a user would set, and the fake first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
        env.pop("SERVICES", None)
        env.pop("DRY_RUN", None)
        return {**env, "PATH": f"{self.tmp / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                "FAKE_DOCKER_STATE": str(self.state), "FAKE_DOCKER_LOG": str(self.log), "OWNER": "acme",
                "WEBHOOK_SECRET": SECRET, "HOST": "127.0.0.1", "PORT": str(port),
                "RECONCILE_INTERVAL": "0",  # the fake's images name Docker Hub: no round may ask it
                "COMPOSE_COMMAND": "docker compose",  # the fake's, never a real Compose found on PATH
                "PASS_ENV": "FAKE_DOCKER_STATE,FAKE_DOCKER_LOG",  # what the fake docker reads
                "STATE_DIR": str(self.tmp / f"state-{port}"), **settings}  # one gopdater per STATE_DIR

    def launch(self, port, from_source=True, nofile=None, **settings):
        """Start gopdater as `python3 gopdater.py` does, or as the container does (`python3 -m gopdater`
        from bytecode compiled once), with at most nofile file descriptors if given (soft and hard, as
        `ulimit -n` would set them); return the process (its output goes to gopdater-<port>.log)."""
        app = self.tmp / "app"
        if not from_source and not app.exists():
            app.mkdir()
            shutil.copy(GOPDATER, app / "gopdater.py")
            py_compile.compile(str(app / "gopdater.py"), cfile=None, doraise=True)
        argv = [sys.executable, str(GOPDATER)] if from_source else [sys.executable, "-m", "gopdater"]
        env = self.env(port, **settings)
        if not from_source:
            env["PYTHONPATH"] = str(app)
        with open(self.tmp / f"gopdater-{port}.log", "ab") as output:
            process = subprocess.Popen(argv, env=env, cwd=self.tmp, stdout=output, stderr=subprocess.STDOUT,
                                       preexec_fn=None if nofile is None else functools.partial(
                                           resource.setrlimit, resource.RLIMIT_NOFILE, (nofile, nofile)))
        self.processes.append(process)
        return process

    def output(self, port):
        return (self.tmp / f"gopdater-{port}.log").read_text(errors="replace")

    def push(self, ref):
        """A new image of ref in the fake registry."""
        fake_docker.change_state(str(self.state), lambda state: fake_docker.push(state, ref))

    def calls(self, since=0):
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines[since:]]

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(30)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_until(predicate, process, timeout=30):
    """Poll predicate every 2 ms until true; return the perf_counter time it became true."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if process.poll() is not None:
            raise AssertionError(f"a benchmark process exited with code {process.returncode}")
        if predicate():
            return time.perf_counter()
        time.sleep(0.002)
    raise AssertionError("timed out waiting for a benchmark process")


def answers(port, request, tls=None):
    """True when a request on a new connection gets 200."""
    try:
        return raw_request(port, request, 1, tls)[0] == 200
    except OSError:
        return False


def deployments_request():
    return f"GET /deployments HTTP/1.0\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode()
