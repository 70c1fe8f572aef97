#!/usr/bin/env python3
"""A fake `docker` CLI for the benchmark: it records every call with timestamps and answers what
gopdater asks of a one-service Compose project ("site", image acme/site:latest).

It reads and writes its state in $FAKE_DOCKER_STATE (JSON) and appends one JSON line per call to
$FAKE_DOCKER_LOG: {"argv": [...], "start": t, "end": t} with time.monotonic() times, which are
comparable across processes on Linux. A pull sleeps state["pull_seconds"] and yields a new image;
stop, rm, up and rmi sleep state["command_seconds"]; queries answer at once.
"""

import fcntl
import json
import os
import sys
import time

REF = "acme/site:latest"
PROJECT = "bench"


def image_id(n):
    return "sha256:" + f"{n:064x}"


def initial_state(pull_seconds=2.0, command_seconds=0.2):
    """The state of a project whose one container runs image 1."""
    return {"pull_seconds": pull_seconds, "command_seconds": command_seconds, "images": 1,
            "ref": image_id(1), "serial": 1,
            "containers": {f"{1:064x}": {"name": f"{PROJECT}-site-1", "image": image_id(1), "running": True}}}


def inspect(cid, container):
    return {"Id": cid, "Name": "/" + container["name"], "Image": container["image"], "RestartCount": 0,
            "State": {"Status": "running" if container["running"] else "exited", "Restarting": False,
                      "ExitCode": 0, "StartedAt": "2026-01-01T00:00:00Z", "Health": {"Status": "healthy"}},
            "Config": {"Image": REF, "Healthcheck": {"Test": ["CMD", "true"]}, "Labels": {
                "com.docker.compose.project": PROJECT, "com.docker.compose.service": "site",
                "com.docker.compose.oneoff": "False"}}}


def answer(state, args):
    """Return (stdout, seconds to sleep, exit code) for one call, changing state as Docker would."""
    slow = state["command_seconds"]
    containers = state["containers"]
    if args[:1] == ["compose"]:
        args = args[1:]
        if args == ["version", "--short"]:
            return "2.29.1\n", 0, 0
        if args == ["config", "--services"]:
            return "site\n", 0, 0
        if args == ["config", "--format", "json"]:
            return json.dumps({"name": PROJECT, "services": {"site": {"image": REF}}}), 0, 0
        if args[:3] == ["ps", "-a", "-q"]:
            return "".join(cid + "\n" for cid in containers), 0, 0
        if args[:1] == ["pull"]:
            state["images"] += 1
            state["ref"] = image_id(state["images"])
            return "", state["pull_seconds"], 0
        if args[:3] == ["up", "-d", "--no-deps"]:
            if not containers:
                state["serial"] += 1
                containers[f"{state['serial']:064x}"] = {"name": f"{PROJECT}-site-1", "image": state["ref"],
                                                         "running": True}
            return "", slow, 0
    elif args[:1] == ["version"]:
        return "20.10.24\n", 0, 0
    elif args[:1] == ["info"]:
        return json.dumps({"LocalNodeState": "inactive"}) + "\n", 0, 0
    elif args[:1] == ["inspect"]:
        found = [inspect(cid, containers[cid]) for cid in args[1:] if cid in containers]
        return json.dumps(found), 0, 0 if len(found) == len(args) - 1 else 1
    elif args[:2] == ["image", "inspect"]:
        return state["ref"] + "\n", 0, 0
    elif args[:1] in (["stop"], ["rm"]):
        for cid, container in list(containers.items()):
            if container["name"] == args[-1]:
                if args[0] == "stop":
                    container["running"] = False
                else:
                    del containers[cid]
        return "", slow, 0
    elif args[:1] in (["rmi"], ["tag"], ["logs"]):
        return "", slow if args[0] == "rmi" else 0, 0
    return "", 0, 125


def main(argv):
    started = time.monotonic()
    with open(os.environ["FAKE_DOCKER_STATE"] + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(os.environ["FAKE_DOCKER_STATE"]) as handle:
            state = json.load(handle)
        out, seconds, code = answer(state, argv)
        with open(os.environ["FAKE_DOCKER_STATE"], "w") as handle:
            json.dump(state, handle)
    time.sleep(seconds)
    sys.stdout.write(out)
    line = json.dumps({"argv": argv, "start": started, "end": time.monotonic(), "code": code}) + "\n"
    with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
        log.write(line)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
