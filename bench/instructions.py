#!/usr/bin/env python3
"""Instructions a refused request costs, counted by valgrind's callgrind: a figure a noisy host does not
move (the rates of bench_gopdater.py swing by a third with the host's other tenants).

Run: python3 bench/instructions.py   (needs valgrind and wrk; about three minutes)

Each server runs under callgrind until it has answered N requests of a wrk flood (every request with a
header of its own), once with N=300 and once with N=1300: the difference over 1,000 is what one request
costs, start-up excluded. gopdater's front is its HookServer with no docker behind it; the bare server is
bare_server.py. Kernel time (the send of each answer) is not counted: the bare server pays more of it.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_gopdater import flood_script  # noqa: E402
from harness import free_port  # noqa: E402

SECRET = "s" * 32
BODIES = {"wrong_owner": {"repository": {"repo_name": "evil/site"}, "push_data": {"tag": "latest"}},
          "wrong_secret": {"repository": {"repo_name": "acme/site"}, "push_data": {"tag": "latest"}}}
PATHS = {"wrong_owner": "/hooks/" + SECRET, "wrong_secret": "/hooks/" + "x" * 32}

# The server, run under callgrind: argv is (gopdater|bare, port, requests to answer, file to touch when up).
SERVER = r"""
import os, sys, threading
sys.path[:0] = [sys.argv[5], sys.argv[5] + "/bench"]
kind, port, limit, up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
count, lock = [0], threading.Lock()
def counted():
    with lock:
        count[0] += 1
        return count[0] == limit
if kind == "gopdater":
    import gopdater as g
    app = g.App(g.load_config([], {"WEBHOOK_SECRET": "s" * 32, "OWNER": "acme"}), type("Q", (), {"target": None})())
    server = g.HookServer(g.listen("127.0.0.1", port), app)
    log_request = server.log_request
    def counting(connection, status):
        log_request(connection, status)
        if counted():
            server.stop()
    server.log_request = counting
    open(up, "w").close()
    server.serve_forever()
else:
    import bare_server
    class Handler(bare_server.Handler):
        def do_POST(self):
            super().do_POST()
            if counted():
                os._exit(0)
    server = bare_server.Server(("127.0.0.1", port), Handler)
    open(up, "w").close()
    server.serve_forever()
"""


def instructions(kind, case, limit, tmp):
    """Instructions callgrind counts for a server that answers limit requests of the case's flood."""
    port, up = free_port(), tmp / f"up.{kind}.{case}.{limit}"
    script = tmp / f"wrk.{case}.lua"
    script.write_text(flood_script(json.dumps(BODIES[case]).encode()))
    server = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                               os.path.realpath(sys.executable), "-c", SERVER, kind, str(port), str(limit), str(up),
                               str(HERE.parent)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not up.exists():
            if server.poll() is not None:
                raise SystemExit(f"the server under valgrind ended: {server.stderr.read()[-500:]}")
            time.sleep(0.2)
        flood = subprocess.Popen(["wrk", "-t2", "-c32", "-d120s", "-s", str(script),
                                  f"http://127.0.0.1:{port}{PATHS[case]}"], stdout=subprocess.DEVNULL)
        try:
            report = server.communicate(timeout=300)[1]
        finally:
            flood.kill()
            flood.wait()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return int(re.search(r"I\s+refs:\s+([\d,]+)", report).group(1).replace(",", ""))


def main():
    rows = [("gopdater", "wrong_secret"), ("gopdater", "wrong_owner"), ("bare", "wrong_secret")]
    with tempfile.TemporaryDirectory() as folder:
        tmp = pathlib.Path(folder)
        for kind, case in rows:
            per = (instructions(kind, case, 1300, tmp) - instructions(kind, case, 300, tmp)) / 1000
            print(f"{kind:9} {case:13} {per / 1000:6.0f} k instructions a request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
