#!/usr/bin/env python3
"""A fake `docker` CLI for the benchmark: it records every call with timestamps and answers what
gopdater asks of one-service Compose projects (service "site"). By default there is one project,
"bench", running acme/site:latest, found from the folder gopdater runs in; initial_state(projects=...)
makes several, each with a folder of its own named by its containers' labels (PROJECTS=*).

It reads and writes its state in $FAKE_DOCKER_STATE (JSON, under a lock: see change_state) and appends
one JSON line per call to $FAKE_DOCKER_LOG: {"argv": [...], "start": t, "end": t, "project": p} with
time.monotonic() times, which are comparable across processes on Linux. A pull sleeps
state["pull_seconds"]; stop, rm, up and rmi sleep state["command_seconds"]; reads sleep what
QUERY_SECONDS says, as the real ones took here (less this script's own start, about 25 ms). With one
project every pull finds a new image (each hook is a push); with several, a pull finds what
push(state, ref) put in the registry.
"""

import fcntl
import functools
import json
import os
import sys
import time

REF = "acme/site:latest"
PROJECT = "bench"
# Seconds the real commands took on the test machine (Compose v2, Docker 28), beyond a process start.
QUERY_SECONDS = {"config": 0.09, "ps": 0.05, "inspect": 0.02, "image": 0.02}


def image_id(n):
    return "sha256:" + f"{n:064x}"


def initial_state(pull_seconds=2.0, command_seconds=0.2, projects=None, query_seconds=None):
    """One project "bench" on image 1, or projects: {name: (folder, image reference)}, each on image 1."""
    state = {"pull_seconds": pull_seconds, "command_seconds": command_seconds, "images": 1, "serial": 0,
             "query_seconds": query_seconds or {}, "push_on_pull": projects is None,
             "projects": {name: {"folder": folder, "ref": ref} for name, (folder, ref) in
                          (projects or {PROJECT: (None, REF)}).items()},
             "local": {}, "registry": {}, "containers": {}}
    for name, project in state["projects"].items():
        state["local"][project["ref"]] = state["registry"][project["ref"]] = image_id(1)
        add_container(state, name)
    return state


def add_container(state, project):
    state["serial"] += 1
    ref = state["projects"][project]["ref"]
    state["containers"][f"{state['serial']:064x}"] = {"name": f"{project}-site-1", "image": state["local"][ref],
                                                      "running": True, "project": project}


def push(state, ref):
    """A new image of ref in the registry (the next pull finds it)."""
    state["images"] += 1
    state["registry"][ref] = image_id(state["images"])


def inspect(state, cid, container):
    project = state["projects"][container["project"]]
    where = {"com.docker.compose.project.working_dir": project["folder"],
             "com.docker.compose.project.config_files": "compose.yaml"} if project["folder"] else {}
    return {"Id": cid, "Name": "/" + container["name"], "Image": container["image"], "RestartCount": 0,
            "State": {"Status": "running" if container["running"] else "exited", "Restarting": False,
                      "ExitCode": 0, "StartedAt": "2026-01-01T00:00:00Z", "Health": {"Status": "healthy"}},
            "Config": {"Image": project["ref"], "Healthcheck": {"Test": ["CMD", "true"]}, "Labels": {
                "com.docker.compose.project": container["project"], "com.docker.compose.service": "site",
                "com.docker.compose.oneoff": "False", **where}}}


def compose(state, args, project):
    """(stdout, seconds, exit code) of one `docker compose` call in a project."""
    if args == ["version", "--short"]:
        return "2.29.1\n", 0, 0
    if project not in state["projects"]:
        return "", 0, 1
    query, ref = state["query_seconds"], state["projects"][project]["ref"]
    mine = {cid: c for cid, c in state["containers"].items() if c["project"] == project}
    if args == ["config", "--services"]:
        return "site\n", query.get("config", 0), 0
    if args == ["config", "--format", "json"]:
        labels = {"labels": state["labels"]} if state.get("labels") else {}  # the service's, in its Compose file
        return json.dumps({"name": project, "services": {"site": {"image": ref, **labels}}}), query.get("config", 0), 0
    if args[:3] == ["ps", "-a", "-q"]:
        return "".join(cid + "\n" for cid in mine), query.get("ps", 0), 0
    if args[:1] == ["pull"]:
        if state["push_on_pull"]:
            push(state, ref)
        state["local"][ref] = state["registry"][ref]
        return "", state["pull_seconds"], 0
    if args[:3] == ["up", "-d", "--no-deps"]:
        if not mine:
            add_container(state, project)
        return "", state["command_seconds"], 0
    return "", 0, 125


def docker(state, args):
    """(stdout, seconds, exit code) of one other `docker` call."""
    slow, query, containers = state["command_seconds"], state["query_seconds"], state["containers"]
    if args[:1] == ["version"]:
        return "20.10.24\n", 0, 0
    if args[:1] == ["info"]:
        return json.dumps({"LocalNodeState": "inactive"}) + "\n", 0, 0
    if args[:1] == ["ps"]:
        wanted = [f[len("label="):].split("=", 1) for f in args[1:] if f.startswith("label=") and "=" in f[6:]]
        found = [cid for cid, c in containers.items() if all(
            value == {"com.docker.compose.project": c["project"], "com.docker.compose.service": "site"}.get(key)
            for key, value in wanted)]
        return "".join(cid + "\n" for cid in found), query.get("ps", 0), 0
    if args[:3] == ["inspect", "--type", "container"]:
        found = [inspect(state, cid, containers[cid]) for cid in args[3:] if cid in containers]
        return json.dumps(found), query.get("inspect", 0), 0 if len(found) == len(args) - 3 else 1
    if args[:4] == ["image", "inspect", "--format", "{{json .RepoDigests}}"]:  # as a pull records it
        return "".join(json.dumps([f"{ref.rsplit(':', 1)[0]}@{image}" for ref, image in state["local"].items()
                                   if image == wanted]) + "\n" for wanted in args[4:]), query.get("image", 0), 0
    if args[:4] == ["image", "inspect", "--format", "{{json .Config.Labels}}"]:
        return "null\n" * len(args[4:]), query.get("image", 0), 0
    if args[:2] == ["image", "inspect"]:
        return state["local"].get(args[-1], args[-1]) + "\n", query.get("image", 0), 0
    if args[:1] in (["stop"], ["rm"]):
        for cid, container in list(containers.items()):
            if container["name"] == args[-1]:
                if args[0] == "stop":
                    container["running"] = False
                else:
                    del containers[cid]
        return "", slow, 0
    if args[:1] == ["exec"]:  # a release step: it prints what state["exec_print"] says (see print_lots)
        spec = state.get("exec_print") or {}
        return functools.partial(print_lots, spec), 0, spec.get("code", 0)
    if args[:1] in (["rmi"], ["tag"], ["logs"]):
        return "", slow if args[0] == "rmi" else 0, 0
    return "", 0, 125


def print_lots(spec, stream):
    """What a hostile release step prints: spec["mib"] MiB of 1 KiB lines, then one line of spec["long"] bytes,
    then spec["last"]."""
    line = b"x" * 1023 + b"\n"
    for _ in range(spec.get("mib", 0) * 1024):
        stream.write(line)
    stream.write(b"y" * spec.get("long", 0) + b"\n" + spec.get("last", "").encode() + b"\n")


def answer(state, args, project):
    """Return (stdout, seconds to sleep, exit code) for one call, changing state as Docker would."""
    if args[:1] == ["compose"]:
        return compose(state, args[1:], project)
    return docker(state, args)


def change_state(path, change):
    """Apply change(state) to the state file under its lock; return what change returned."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as handle:
            state = json.load(handle)
        result = change(state)
        with open(path, "w") as handle:
            json.dump(state, handle)
    return result


def main(argv):
    started = time.monotonic()
    project = os.environ.get("COMPOSE_PROJECT_NAME") or PROJECT
    out, seconds, code = change_state(os.environ["FAKE_DOCKER_STATE"], lambda state: answer(state, argv, project))
    time.sleep(seconds)  # outside the lock: calls run side by side, as on a real engine
    if callable(out):
        out(sys.stdout.buffer)
    else:
        sys.stdout.write(out)
    line = json.dumps({"argv": argv, "start": started, "end": time.monotonic(), "code": code,
                       "project": project}) + "\n"
    with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
        log.write(line)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
