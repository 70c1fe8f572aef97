"""End-to-end tests of gopdater on the real Docker engine, a local registry and Compose v1 and v2.

Everything is made here and removed here, even when a test fails: images built FROM scratch with
Debian's static busybox, two Distribution registries (docker-registry) on 127.0.0.1 sharing one
storage folder (the second one sends webhooks), a Compose project in a temp folder, and gopdater
started as a user starts it. Names carry a unique prefix so cleanup is exact.

These tests skip, saying why, only when no Docker engine answers. Missing tools are errors that
say what to install (.ci/run installs them).
"""

import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
PREFIX = "gopdtest" + secrets.token_hex(3)
SECRET = secrets.token_urlsafe(24)
MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json", "application/vnd.oci.image.index.v1+json"])


def run(argv, check=True, timeout=120, **kwargs):
    """Run a command for the test; return stdout; raise with its stderr on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=5):
    """One HTTP request; returns (status, body bytes, headers); never raises for an HTTP status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def wait_for(predicate, timeout, what):
    """Poll predicate (every 50 ms) until it returns a true value; fail naming what was awaited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def is_static_elf(path):
    """True for an ELF executable with no program interpreter (statically linked)."""
    with open(path, "rb") as handle:
        head = handle.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        size, count = struct.unpack_from("<HH", head, 0x36)
        handle.seek(phoff)
        table = handle.read(size * count)
    return all(struct.unpack_from("<I", table, i * size)[0] != 3 for i in range(count))


def engine_answers():
    try:
        subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                       timeout=20, check=True)
        return None
    except (OSError, subprocess.SubprocessError) as error:
        return f"no Docker engine answers ({type(error).__name__}); the real-engine tests need one"


def compose_commands():
    """{"v2": argv, "v1": argv} for the Compose flavours installed here."""
    found = {}
    try:
        if run(["docker", "compose", "version", "--short"], timeout=20).strip():
            found["v2"] = ["docker", "compose"]
    except (AssertionError, OSError):
        pass
    for folder in os.get_exec_path():
        candidate = os.path.join(folder, "docker-compose")
        if os.access(candidate, os.X_OK):
            version = run([candidate, "version", "--short"], check=False, timeout=20).strip().lstrip("v")
            flavour = "v1" if version.startswith("1.") else "v2"
            found.setdefault(flavour, [candidate])
    return found


SKIP_REASON = engine_answers()
COMPOSE = {} if SKIP_REASON else compose_commands()


def setUpModule():
    if SKIP_REASON:
        print(f"\ntest_engine: skipped: {SKIP_REASON}", file=sys.stderr)
        raise unittest.SkipTest(SKIP_REASON)
    print("\ntest_engine: Compose flavours here: "
          + ", ".join(f"{k} ({' '.join(v)})" for k, v in sorted(COMPOSE.items())), file=sys.stderr)
    missing = [what for what, ok in [
        ("busybox-static (a static /bin/busybox)", os.path.exists("/bin/busybox") and is_static_elf("/bin/busybox")),
        ("docker-registry", shutil.which("docker-registry"))] if not ok]
    if missing:
        raise AssertionError(f"missing: {', '.join(missing)}; install with "
                             "apt-get install -y busybox-static docker-registry (.ci/run does)")


def build_site_images(folder, tag_prefix):
    """Build v1, v2 and a broken v3 of a tiny web site FROM scratch; return {version: image id}."""
    images = {}
    shutil.copy("/bin/busybox", folder / "busybox")
    (folder / "www").mkdir()
    for version in ("v1", "v2", "v3"):
        (folder / "www" / "index.html").write_text(f"acme site {version}\n")
        command = '["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"]' if version != "v3" else \
            '["/bin/busybox", "sh", "-c", "echo v3 is broken >&2; exit 3"]'
        (folder / "Dockerfile").write_text(
            f"FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nLABEL {PREFIX}={version}\nCMD {command}\n")
        tag = f"{tag_prefix}:{version}"
        run(["docker", "build", "-q", "-t", tag, str(folder)], timeout=300)
        images[version] = run(["docker", "image", "inspect", "--format", "{{.Id}}", tag]).strip()
    return images


class Registry:
    """A docker-registry process on 127.0.0.1 with storage in a temp folder."""

    def __init__(self, folder, storage, port, notify_url=None):
        self.port, self.folder = port, folder
        config = {"version": 0.1, "log": {"level": "warn"}, "storage": {"filesystem": {"rootdirectory": str(storage)}},
                  "http": {"addr": f"127.0.0.1:{port}"}}
        if notify_url:
            config["notifications"] = {"endpoints": [{
                "name": "gopdater", "url": notify_url, "headers": {"Authorization": [f"Bearer {SECRET}"]},
                "timeout": "5s", "threshold": 3, "backoff": "1s"}]}
        self.config = folder / f"registry-{port}.yml"
        self.config.write_text(json.dumps(config))  # YAML is a superset of JSON
        self.process = None

    def start(self):
        log = open(self.folder / f"registry-{self.port}.log", "ab")
        self.process = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=log, stderr=log)
        log.close()
        wait_for(lambda: self.answers(), 20, f"the registry on port {self.port}")

    def answers(self):
        try:
            return http("GET", f"http://127.0.0.1:{self.port}/v2/", timeout=1)[0] == 200
        except OSError:
            return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def retag(self, source, target="latest"):
        """Point acme/site:<target> at the manifest of :<source>: a push, as the registry sees it."""
        base = f"http://127.0.0.1:{self.port}/v2/acme/site/manifests/"
        status, manifest, headers = http("GET", base + source, headers={"Accept": MANIFEST_TYPES})
        assert status == 200, f"manifest {source}: {status}"
        status, _, _ = http("PUT", base + target, body=manifest,
                            headers={"Content-Type": headers["Content-Type"]})
        assert status == 201, f"manifest put {target}: {status}"


class Poller(threading.Thread):
    """Fetches the site every 20 ms and records when it answered."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.running, self.ok, self.failed = url, True, [], 0

    def run(self):
        while self.running:
            try:
                status = http("GET", self.url, timeout=0.5)[0]
            except OSError:
                status = 0
            if status == 200:
                self.ok.append(time.monotonic())
            else:
                self.failed += 1
            time.sleep(0.02)

    def stop(self):
        self.running = False
        self.join(5)
        gaps = [b - a for a, b in zip(self.ok, self.ok[1:])]
        return max(gaps) if gaps else float("inf")


class EngineScenario:
    """One Compose flavour, end to end; the numbered tests run in order and build on each other."""

    flavour = None
    from_elsewhere = False  # start gopdater outside the project folder, pointing COMPOSE_FILE at it

    @classmethod
    def setUpClass(cls):
        if cls.flavour not in COMPOSE:
            other = ", ".join(sorted(COMPOSE)) or "none"
            print(f"\ntest_engine: Compose {cls.flavour} is not installed here; tested: {other}", file=sys.stderr)
            raise unittest.SkipTest(f"Compose {cls.flavour} is not installed (tested here: {other})")
        cls.compose = COMPOSE[cls.flavour]
        cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix=PREFIX))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        cls.project = f"{PREFIX}{cls.flavour}"
        cls.folder = cls.tmp / cls.project
        (cls.folder / "data").mkdir(parents=True)
        cls.port, cls.notify_port, cls.site_port, cls.gp_port = (free_port() for _ in range(4))
        storage = cls.tmp / "storage"
        cls.registry = Registry(cls.tmp, storage, cls.port)
        cls.notifier = Registry(cls.tmp, storage, cls.notify_port,
                                notify_url=f"http://127.0.0.1:{cls.gp_port}/hooks/registry")
        cls.addClassCleanup(cls.cleanup)
        cls.registry.start()
        cls.notifier.start()
        cls.repo = f"127.0.0.1:{cls.port}/acme/site"
        (cls.tmp / "build").mkdir()
        cls.images = build_site_images(cls.tmp / "build", f"{cls.project}-site")
        for version, image_id in cls.images.items():
            run(["docker", "tag", image_id, f"{cls.repo}:{version}"])
            run(["docker", "push", f"{cls.repo}:{version}"], timeout=300)
            run(["docker", "rmi", f"{cls.repo}:{version}", f"{cls.project}-site:{version}"])
        # Only the registry holds the versions now, so a pull really fetches and an old image can go.
        cls.registry.retag("v1")
        (cls.folder / "docker-compose.yml").write_text(f"""\
version: "3.8"
services:
  site:
    image: {cls.repo}:latest
    init: true
    restart: unless-stopped
    ports: ["127.0.0.1:{cls.site_port}:80"]
    volumes:
      - ./data:/data
      - ${{PWD}}/data:/data2
    healthcheck:
      test: ["CMD", "/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]
      interval: 1s
      timeout: 1s
      retries: 3
""")
        run([*cls.compose, "up", "-d"], cwd=cls.folder, timeout=300, env={**os.environ, "PWD": str(cls.folder)})
        wait_for(lambda: cls.site() == "acme site v1", 30, "the site to serve v1")
        cls.first_container = cls.container()
        cls.start_gopdater()

    @classmethod
    def start_gopdater(cls):
        env = {**os.environ, "OWNER": f"acme,127.0.0.1:{cls.notify_port}/acme", "WEBHOOK_SECRET": SECRET,
               "HOST": "127.0.0.1", "PORT": str(cls.gp_port), "HEALTH_TIMEOUT": "30", "STOP_TIMEOUT": "5",
               "SERVICES": f"acme/site=site,127.0.0.1:{cls.notify_port}/acme/site=site",
               "COMPOSE_COMMAND": " ".join(cls.compose), "REFRESH_INTERVAL": "3600"}
        cwd = cls.folder
        if cls.from_elsewhere:
            cwd = cls.tmp / "elsewhere"
            cwd.mkdir()
            env["COMPOSE_FILE"] = os.path.relpath(cls.folder / "docker-compose.yml", cwd)
        env.pop("COMPOSE_PROJECT_NAME", None)
        cls.gp_log = cls.tmp / "gopdater.log"
        with open(cls.gp_log, "wb") as log:
            cls.gopdater = subprocess.Popen([sys.executable, str(HERE / "gopdater.py")], cwd=cwd, env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: cls.gopdater.poll() is not None or cls.gp_answers(), 60, "gopdater to answer /healthz")
        assert cls.gopdater.poll() is None, f"gopdater exited: {cls.gp_log.read_text()}"

    @classmethod
    def cleanup(cls):
        if getattr(cls, "gopdater", None) and cls.gopdater.poll() is None:
            cls.gopdater.kill()
            cls.gopdater.wait(10)
        ids = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={cls.project}"],
                  check=False).split()
        if ids:
            run(["docker", "rm", "-f", *ids], check=False)
        run(["docker", "network", "rm", f"{cls.project}_default"], check=False)
        for line in run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], check=False).split():
            if line.startswith((f"127.0.0.1:{cls.port}/", f"127.0.0.1:{cls.notify_port}/", PREFIX)):
                run(["docker", "rmi", "-f", line], check=False)
        if getattr(cls, "images", None):
            run(["docker", "rmi", "-f", *cls.images.values()], check=False)
        cls.registry.stop()
        cls.notifier.stop()

    # -- helpers --------------------------------------------------------------------------------

    @classmethod
    def site(cls):
        try:
            status, body, _ = http("GET", f"http://127.0.0.1:{cls.site_port}/", timeout=1)
        except OSError:
            return None
        return body.decode().strip() if status == 200 else None

    @classmethod
    def gp_answers(cls):
        try:
            return http("GET", f"http://127.0.0.1:{cls.gp_port}/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    @classmethod
    def container(cls):
        """The site's container, as docker inspect shows it."""
        ids = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={cls.project}",
                   "--filter", "label=com.docker.compose.service=site"]).split()
        assert len(ids) == 1, f"expected one site container, found {ids}"
        return json.loads(run(["docker", "inspect", ids[0]]))[0]

    def hook(self, repo_name="acme/site", secret=SECRET, tag="latest"):
        body = json.dumps({"repository": {"repo_name": repo_name}, "push_data": {"tag": tag}}).encode()
        status, reply, _ = http("POST", f"http://127.0.0.1:{self.gp_port}/hooks/{secret}", body,
                                {"Content-Type": "application/json"})
        return status, json.loads(reply)

    def deployments(self):
        status, reply, _ = http("GET", f"http://127.0.0.1:{self.gp_port}/deployments",
                                headers={"Authorization": f"Bearer {SECRET}"})
        self.assertEqual(status, 200)
        return json.loads(reply)["deployments"]

    def finished(self, deployment_id, timeout=90):
        """Wait until the deployment has ended; return its record."""
        def done():
            found = [d for d in self.deployments() if d["id"] == deployment_id]
            return found[0] if found and found[0]["state"] not in ("queued", "running") else None
        try:
            return wait_for(done, timeout, f"deployment {deployment_id} to end")
        except AssertionError:
            raise AssertionError(f"deployment did not end; gopdater log:\n{self.gp_log.read_text()[-4000:]}")

    def image_exists(self, image_id):
        return subprocess.run(["docker", "image", "inspect", image_id], capture_output=True).returncode == 0

    def deploy_and_watch(self, retag=None, notifier=False):
        """Optionally move latest, send the hook, wait for the end; return (record, longest gap, poller)."""
        poller = Poller(f"http://127.0.0.1:{self.site_port}/")
        poller.start()
        time.sleep(0.1)  # a few polls before the hook, so the gap measure covers the whole window
        if retag:
            self.registry.retag(retag)
        status, reply = self.hook()
        self.assertEqual(status, 202, reply)
        record = self.finished(reply["id"])
        time.sleep(0.1)
        return record, poller.stop(), poller

    # -- the scenario ---------------------------------------------------------------------------

    def test_1_forged_and_replayed_hooks_change_nothing(self):
        """Wrong secret and wrong owner are refused; a replay with no new image restarts nothing."""
        before = self.container()["Id"]
        poller = Poller(f"http://127.0.0.1:{self.site_port}/")
        poller.start()
        self.assertEqual(self.hook(secret="x" * 30)[0], 403)
        self.assertEqual(self.hook(repo_name="evil/site")[0], 403)
        status, reply = self.hook()
        self.assertEqual(status, 202)
        record = self.finished(reply["id"])
        gap = poller.stop()
        self.assertEqual(record["state"], "up-to-date", record)
        self.assertEqual(self.container()["Id"], before)
        self.assertEqual(poller.failed, 0, "zero downtime")
        print(f"\n[{self.flavour}] replayed hook: state up-to-date, longest gap between polls {gap * 1000:.0f} ms",
              file=sys.stderr)

    def test_2_push_updates_the_service_in_place(self):
        """A push of v2 is served within the bound, in the same project, same bind mounts; v1 is removed."""
        old = self.container()
        started = time.monotonic()
        record, gap, _ = self.deploy_and_watch(retag="v2")
        elapsed = time.monotonic() - started
        self.assertEqual(record["state"], "updated", record)
        self.assertEqual(self.site(), "acme site v2")
        self.assertLess(elapsed, 60)
        new = self.container()
        self.assertNotEqual(new["Id"], old["Id"])
        self.assertEqual(new["Image"], self.images["v2"])
        labels = new["Config"]["Labels"]
        self.assertEqual(labels["com.docker.compose.project"], self.project)
        self.assertEqual(labels["com.docker.compose.project.working_dir"],
                         old["Config"]["Labels"]["com.docker.compose.project.working_dir"])
        sources = sorted(m["Source"] for m in new["Mounts"] if m["Type"] == "bind")
        self.assertEqual(sources, [str(self.folder / "data")] * 2)
        self.assertFalse(self.image_exists(self.images["v1"]), "the replaced v1 image is removed")
        downtime = next(s["seconds"] for s in record["steps"] if s["step"] == "downtime")
        print(f"\n[{self.flavour}] update v1 -> v2: {elapsed:.1f} s from push to done; recorded downtime "
              f"{downtime:.2f} s; longest gap seen by a 20 ms poller {gap * 1000:.0f} ms", file=sys.stderr)

    def test_3_burst_of_hooks_gives_at_most_two_deployments(self):
        """Ten hooks for one push give at most two deployments, and the site ends on that push."""
        self.registry.retag("v1")
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(self.hook())) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual([s for s, _ in replies], [202] * 10)
        ids = {reply["id"] for _, reply in replies}
        self.assertLessEqual(len(ids), 2)
        records = [self.finished(i) for i in ids]
        self.assertEqual(self.site(), "acme site v1")
        self.assertIn("updated", [r["state"] for r in records])
        print(f"\n[{self.flavour}] burst of 10 hooks: {len(ids)} deployment(s): "
              f"{', '.join(r['state'] for r in records)}", file=sys.stderr)

    def test_4_failed_pull_keeps_the_old_container_serving(self):
        """With the registry down the pull fails, the deployment is failed and the site never stops."""
        before = self.container()["Id"]
        self.registry.stop()
        try:
            record, gap, poller = self.deploy_and_watch()
        finally:
            self.registry.start()
        self.assertEqual(record["state"], "failed", record)
        self.assertIn("pull failed", record["error"])
        self.assertEqual(self.container()["Id"], before)
        self.assertEqual(poller.failed, 0, "the site served throughout")
        self.assertEqual(self.site(), "acme site v1")

    def test_5_broken_image_is_rolled_back(self):
        """A v3 whose process exits at once is rolled back; v1 serves again from the previous image."""
        before = self.container()["Image"]
        record, _, _ = self.deploy_and_watch(retag="v3")
        self.assertEqual(record["state"], "rolled-back", record)
        self.assertTrue(any("v3 is broken" in line for line in record["logs"]), record["logs"])
        self.assertEqual(self.site(), "acme site v1")
        self.assertEqual(self.container()["Image"], before)
        self.assertTrue(self.image_exists(self.images["v3"]), "the failed image is kept for inspection")
        print(f"\n[{self.flavour}] broken v3: {record['state']}: {record['error']}", file=sys.stderr)

    def test_6_registry_notification_alone_updates_the_service(self):
        """A push to the registry, whose notifications reach /hooks/registry, updates the site unaided."""
        known = {d["id"] for d in self.deployments()}
        self.notifier.retag("v2")
        new = wait_for(lambda: [d for d in self.deployments() if d["id"] not in known], 60,
                       "a deployment started by the registry's own notification")
        record = self.finished(new[0]["id"])
        self.assertEqual((record["sender"], record["state"]), ("registry", "updated"), record)
        self.assertTrue(record["digest"].startswith("sha256:"))
        self.assertEqual(self.site(), "acme site v2")

    def test_9_sigterm_stops_cleanly_and_the_log_holds_no_secret(self):
        """SIGTERM ends gopdater with exit code 0; no log line ever held the secret."""
        self.gopdater.send_signal(signal.SIGTERM)
        self.assertEqual(self.gopdater.wait(30), 0)
        log = self.gp_log.read_text()
        self.assertNotIn(SECRET, log)
        self.assertIn("/hooks/***", log)
        self.assertIn("stopped", log)


class ComposeV2Test(EngineScenario, unittest.TestCase):
    """Compose v2 (`docker compose`), with gopdater started outside the project folder (COMPOSE_FILE)."""

    flavour = "v2"
    from_elsewhere = True


class ComposeV1Test(EngineScenario, unittest.TestCase):
    """Compose v1 (`docker-compose` 1.x), with gopdater started in the project folder."""

    flavour = "v1"


if __name__ == "__main__":
    unittest.main()
