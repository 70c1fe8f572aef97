#!/usr/bin/env python3
"""gopdater: update Docker Compose services when their registry reports a push.

A registry (Docker Hub, GHCR, Quay, Harbor, Gitea/Forgejo, Azure or a self-hosted Distribution
registry) POSTs a webhook when an image is pushed. gopdater checks it, finds the services on this
server that run that image and tag, and updates them one at a time: pull while the old container
serves, replace it through Compose, wait until the new one is healthy, roll back if it is not,
and only then remove the old image.

The file reads in the order a webhook flows: image references, settings, senders, the request
pipeline, the work queue, the journal, update targets, docker commands, notifications, the HTTP
transport, --check and main(). `--help` lists the settings; README.md explains them.

The journal, plainly: before every step of an update, journal.json in STATE_DIR is rewritten
(atomically) with that update's Record: its procedure (replace, start-first, swarm), the stage it
is at, and the image ids and containers recovery needs. At the next start (or once an engine that
stopped answering is back) plan() decides from the record and from whether the service's containers
all run: leave it, judge what runs, bring it up on the new image, finish a rollback, settle a
start-first switch, or follow Swarm. RECOVERY is that decision as a table; a stage without a row
cannot be journalled.

Version channels, plainly: a service labelled gopdater.track (patch, minor, major) whose tag is a
variable in the project's env file takes a newer semantic version within its channel: the variable
is rewritten atomically before the switch and written back by a rollback, and the journal holds
both tags, so the env file always names what runs. YAML is never edited.

Security, plainly: Docker Hub signs nothing, so the long secret in the webhook URL is the
credential. Every request is size-checked, then authenticated in constant time, and only then is
its body parsed. The pushed namespace must be one of OWNER. Names from a payload never reach a
command: only names that Compose and Docker reported do, always as argv lists (no shell).

Standard library only; Python 3.9 or newer.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import enum
import functools
import hashlib
import html
import hmac
import io
import itertools
import json
import logging
import os
import re
import selectors
import shlex
import signal
import stat
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
from datetime import datetime, time as dtime, timedelta, timezone
from http import HTTPStatus
from typing import (Callable, Dict, FrozenSet, Hashable, Iterable, List, Mapping, NamedTuple, Optional, Protocol,
                    Sequence, Tuple, Union)

__version__ = "1.4.0"

log = logging.getLogger("gopdater")

# The seams: what main, --check and the tests may touch of an object besides its methods, properties and NamedTuple
# fields. Every other attribute is the object's own; test_gopdater's house rules keep the tests to these.
PUBLIC_SEAMS: Mapping[str, Tuple[str, ...]] = {
    "App": ("config", "queue", "reconciler", "metrics", "desk", "clock"),  # main hands it the queue, the desk and
    # the reconciler once they run; clock is wall time, for the forms' tokens
    "CommandError": ("argv", "code", "tail", "output"),
    "EngineUnreachable": ("argv", "code", "tail"),
    "Deployment": ("id", "sender", "key", "digest", "ref", "state", "hooks", "created", "started", "finished", "steps",
                   "error", "logs", "old_tag", "new_tag", "recovery", "lane", "refs", "members"),  # as /deployments
    "HookServer": ("server_address", "rejects"),
    "Journal": ("directory", "journal_path", "history_path"),
    "Reconciler": ("report",),
    "StepLog": ("deployment", "key", "label", "clock", "sleep"),
    "TLSFiles": ("current",),  # the context in force: a reload that fails keeps it
    "WorkQueue": ("config", "target"),
}

# ==========================================================================================
# Image references: Docker's names, normalised so a push and a running service compare equal
# ==========================================================================================

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

# Docker's reference grammar (github.com/distribution/reference, regexp.go).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
DOMAIN_RE = re.compile(_DOMAIN, re.ASCII)
REPOSITORY_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}", re.ASCII)
NAME_MAX = 255


class ImageKey(collections.namedtuple("ImageKey", "registry repository tag")):
    """A normalised image name and tag, as registries and Compose both spell it."""

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def split_registry(name: str) -> Tuple[str, str]:
    """Split a name into (registry, rest) the way Docker does; Docker Hub's aliases become docker.io."""
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost" and first == first.lower()):
        return DOCKER_HUB, name
    registry = first.lower()
    return (DOCKER_HUB if registry in DOCKER_HUB_ALIASES else registry), rest


def parse_name(name: str) -> Optional[Tuple[str, str]]:
    """Validate an image name (no tag) against Docker's grammar; return (registry, repository)."""
    if not isinstance(name, str) or len(name) > NAME_MAX:
        return None
    registry, repository = split_registry(name)
    if registry == DOCKER_HUB and "/" not in repository:
        repository = "library/" + repository
    if (registry != DOCKER_HUB and not DOMAIN_RE.fullmatch(registry)) or not REPOSITORY_RE.fullmatch(repository):
        return None
    return registry, repository


def parse_reference(reference: str) -> Optional[ImageKey]:
    """Parse NAME[:TAG] into an ImageKey (tag defaults to latest); None if invalid or pinned by digest."""
    if "@" in reference:
        return None
    name, tag = reference, "latest"
    slash, colon = reference.rfind("/"), reference.rfind(":")
    if colon > slash:
        name, tag = reference[:colon], reference[colon + 1:]
    parsed = parse_name(name)
    if parsed is None or not TAG_RE.fullmatch(tag):
        return None
    return ImageKey(parsed[0], parsed[1], tag)


def owner_allowed(owners: Sequence[Tuple[str, str]], image: ImageKey) -> bool:
    """True when the image's registry and namespace are one of OWNER."""
    for registry, namespace in owners:
        if image.registry == registry and image.repository.startswith(namespace + "/"):
            return True
    return False


# -- version channels: which pushed tag a tracked service takes, and where its tag is kept -----

# Semantic versioning 2.0.0, with the leading v many tags carry. Docker tags cannot hold +, but a
# label or an env file can: build metadata is read and ignored, as semver says.
VERSION_RE = re.compile(r"v?(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
                        r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?", re.ASCII)


class Version(NamedTuple):
    """A semantic version, ordered by semver's precedence rules (a pre-release before its release)."""

    major: int
    minor: int
    patch: int
    pre: Tuple[str, ...] = ()

    def precedence(self) -> tuple:
        # A release outranks its pre-releases; numeric identifiers rank below alphanumeric ones and by value.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.pre)
        return self.major, self.minor, self.patch, not self.pre, pre


def parse_version(tag: str) -> Optional[Version]:
    """A tag as a semantic version (1.4.3, v1.4.3, 1.5.0-rc.1; build metadata ignored), or None. Pure."""
    match = VERSION_RE.fullmatch(tag or "")
    if not match:
        return None
    pre = tuple(match.group(4).split(".")) if match.group(4) else ()
    if any(p.isdigit() and len(p) > 1 and p.startswith("0") for p in pre):
        return None  # semver forbids leading zeros in numeric pre-release identifiers
    return Version(int(match.group(1)), int(match.group(2)), int(match.group(3)), pre)


class Channel(str, enum.Enum):
    """How far a tracked service follows pushed versions: the label gopdater.track."""

    PATCH = "patch"  # keeps major.minor
    MINOR = "minor"  # keeps major
    MAJOR = "major"  # takes any newer release


CHANNEL_KEEPS = {Channel.PATCH: 2, Channel.MINOR: 1, Channel.MAJOR: 0}  # leading fields that must stay


def channel_verdict(channel: Channel, current: str, pushed: str) -> Optional[str]:
    """None if a service tracking channel, now on tag current, takes the pushed tag; else why not. Pure."""
    new, now = parse_version(pushed), parse_version(current)
    if new is None:
        return f"{pushed} is not a semantic version"
    if now is None:
        return f"its tag {current} is not a semantic version"
    if new.pre:
        return f"{pushed} is a pre-release"
    if new.precedence() <= now.precedence():
        return f"{pushed} is not newer than {current}"
    keeps = CHANNEL_KEEPS[channel]
    if new[:keeps] != now[:keeps]:
        return f"{pushed} is outside its {channel.value} channel from {current}"
    return None


def newer_tag(first: str, second: str) -> str:
    """The later of two versions (the first if either is not one): what a burst of pushes coalesces to."""
    a, b = parse_version(first), parse_version(second)
    return second if a and b and b.precedence() > a.precedence() else first


TRACK_LABEL = "gopdater.track"
# The tag of a raw image (`compose config --no-interpolate`) as one variable: ${X}, ${X:-d}, ${X-d}, ${X:?e}, $X.
TAG_VARIABLE_RE = re.compile(r"(?P<name>.+?):(?:\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}|"
                             r"\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*))", re.ASCII)


class Tracking(NamedTuple):
    """A service that follows pushed versions (gopdater.track), and where its tag lives."""

    channel: Optional[Channel]  # None where the label names none (problem says so)
    variable: Optional[str] = None  # Compose: the variable its image's tag is, in env_file
    env_file: Optional[str] = None
    problem: Optional[str] = None  # why it cannot follow versions: it is then left alone


class TagMove(NamedTuple):
    """One tracked update: the env file's variable moves from old_tag to new_tag (a Swarm service has no file)."""

    old_tag: str
    new_tag: str
    env_file: Optional[str] = None
    variable: Optional[str] = None


def tracking_words(tracking: Tracking, where: str = "") -> "Finding":
    """What a tracked service follows (where: its variable, as the caller shows it), or why its label is
    ignored: the words of --check and the status page. Pure."""
    if tracking.problem:
        return False, f"{TRACK_LABEL} is ignored, it is left alone: {tracking.problem}"
    return True, f"follows {tracking.channel.value} releases{where}"


def tracking_finding(ref: "ServiceRef", tracking: Tracking) -> "Finding":
    """One line for --check and the start-up log: what a tracked service follows, or how to fix it."""
    follows, words = tracking_words(tracking, f" ({tracking.variable} in {tracking.env_file})"
                                    if tracking.env_file else "")
    return follows, f"service {ref}: {words}"


def shared_variable(service: str, tracking: Tracking, tracked: Mapping[str, Tracking], raw: Mapping[str, str]
                    ) -> Optional[str]:
    """Why a tracked service's variable must not be rewritten: it is also the tag of a service that does not
    follow the same channel (rewriting it would move that one at its next `compose up`), or None. Pure."""
    for other, image in sorted(raw.items()):
        if other != service and tracking.variable and tag_variable(image, other)[0] == tracking.variable and (
                other not in tracked or tracked[other].channel != tracking.channel):
            return (f"{tracking.variable} is also the tag of {other}, which does not follow the same channel: label "
                    f"it {TRACK_LABEL}: {tracking.channel.value} too, or give it a variable of its own")
    return None


def label_tracking(value: str) -> Tracking:
    """The channel a gopdater.track label names, or (as its problem) why it names none. Pure."""
    try:
        return Tracking(Channel(value.strip().lower()))
    except ValueError:
        return Tracking(None, problem=f"{TRACK_LABEL} must be patch, minor or major, not {value.strip()[:40]!r}")


def move_to(tracking: Optional[Tracking], current: Optional[ImageKey], pushed: str) -> Union[None, TagMove, str]:
    """None for a service that does not follow versions; else its move from the tag it runs to the pushed one,
    or (a string) why it does not take that now: the run-time twin of push_verdict, for every target. Pure."""
    if tracking is None:
        return None
    why = tracking.problem or ("no running container of it has a tag" if current is None else
                               channel_verdict(tracking.channel, current.tag, pushed))
    return why or TagMove(current.tag, pushed, tracking.env_file, tracking.variable)


def tag_variable(raw: Optional[str], service: str) -> Tuple[Optional[str], Optional[str]]:
    """The variable that is a service's whole tag in its raw image (repo:${SITE_TAG}), or None and how to
    fix the Compose file. Pure."""
    if not raw:
        return None, "its image is not named in the Compose file"
    if "@" in raw:
        return None, f"its image {raw[:80]} is pinned by digest"
    match = TAG_VARIABLE_RE.fullmatch(raw)
    if match:
        return match.group("braced") or match.group("bare"), None
    name, _, tag = raw.rpartition(":") if ":" in raw.rpartition("/")[2] else (raw, "", "latest")
    variable = re.sub(r"[^A-Z0-9_]", "_", service.upper()) + "_TAG"
    return None, (f"its tag is written in the Compose file ({raw[:80]}); gopdater never edits YAML: write "
                  f"image: {name[:80]}:${{{variable}}} and put {variable}={tag[:40]} in the project's .env")


def with_tag(image: str, tag: str) -> str:
    """An image reference, as the service spells it, with another tag."""
    name = image.partition("@")[0]
    if ":" in name.rpartition("/")[2]:
        name = name.rpartition(":")[0]
    return f"{name}:{tag}"


# ==========================================================================================
# Docker's vocabulary: services, results, command errors, the one command runner, containers
# ==========================================================================================
#
# The words every later section speaks: which service (ServiceRef), how an update of it ended (State,
# Outcome), why a command failed (CommandError; EngineUnreachable is not one: no engine answered), the one
# subprocess wrapper (run_command: argv lists, a timeout, a given environment, bounded output, never a
# shell), and a container as `docker inspect` shows it.

# -- services and what became of their updates -------------------------------------------------

PROJECT_RE = re.compile(r"[a-z0-9][a-z0-9_-]*", re.ASCII)
SERVICE_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]*", re.ASCII)
CONTAINER_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", re.ASCII)


Finding = Tuple[bool, str]  # (ok, one line), for the start-up log and --check


def default_project_name(folder: str) -> str:
    """The name Compose gives a project by default: its folder's, in lower case, letters and digits kept."""
    name = re.sub(r"[^a-z0-9_-]", "", os.path.basename(folder.rstrip("/")).lower()).lstrip("_-")
    return name or "default"


class ServiceRef(NamedTuple):
    """Which service: its kind (compose), its project (a Compose project), its name."""

    kind: str
    project: str
    name: str

    def __str__(self) -> str:
        return f"{self.project}/{self.name}" if self.project else self.name


class Running(NamedTuple):
    """One service a target could update, as it runs now: what the matcher decides from."""

    ref: ServiceRef
    image: Optional[ImageKey]  # the tagged reference it runs; None if none (not started, or pinned by digest)
    labels: Tuple[Mapping[str, str], ...] = ()  # the service's labels, or each of its containers'
    image_id: Optional[str] = None  # the image it runs (an id, or Swarm's digest), for the status page
    tracking: Optional[Tracking] = None  # it follows pushed versions (gopdater.track)


class State(str, enum.Enum):
    """Where a deployment stands; from FAILED on, also the outcome of one service."""

    QUEUED = "queued"
    WAITING = "waiting"  # for its update window, or for an operator's approval
    RUNNING = "running"
    CANCELLED = "cancelled"
    REJECTED = "rejected"  # an operator rejected it while it waited
    EXPIRED = "expired"  # it waited APPROVE_TIMEOUT for approval
    HELD = "held"  # an operator held the service (its entry in the history)
    RESUMED = "resumed"  # an operator resumed it
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    UPDATED = "updated"
    RECOVERED = "recovered"
    DRY_RUN = "dry-run"
    UP_TO_DATE = "up-to-date"
    SKIPPED = "skipped"  # the pushed image failed here before (rolled back): a replay does not try it again


CHANGED = frozenset({State.UPDATED, State.RECOVERED, State.ROLLED_BACK, State.FAILED})
PENDING = frozenset({State.QUEUED, State.WAITING, State.RUNNING})  # not ended yet


class Action(str, enum.Enum):
    """What an operator asks for (POST /services/<project>/<service>/<action>, /deployments/<id>/<action>); a
    deployment's own is UPDATE, or ROLLBACK when an operator asked for one."""

    HOLD = "hold"
    RESUME = "resume"
    UPDATE = "update"
    ROLLBACK = "rollback"
    APPROVE = "approve"
    REJECT = "reject"


SERVICE_ACTIONS = (Action.HOLD, Action.RESUME, Action.UPDATE, Action.ROLLBACK)
DEPLOYMENT_ACTIONS = (Action.APPROVE, Action.REJECT)


class Acted(NamedTuple):
    """How an operator's action was taken: its HTTP status, a short reason, the deployment it queued or changed."""

    status: HTTPStatus
    reason: str
    deployment: Optional[str] = None


class Previous(NamedTuple):
    """The image a service ran before its last update, kept for an operator's rollback (with its tag, for a service
    that follows versions)."""

    image: str
    tag: Optional[str] = None
STATE_VALUES = frozenset(state.value for state in State)


class Outcome(NamedTuple):
    """How the update of one service ended."""

    result: State = State.FAILED
    old_image: Optional[str] = None
    new_image: Optional[str] = None
    reason: Optional[str] = None
    resume: bool = False  # cut off for now (the engine stayed away): its journal record stays for the next start
    old_tag: Optional[str] = None  # a tracked service (gopdater.track): the tag it ran, and the tag it moved to
    new_tag: Optional[str] = None


class Step(NamedTuple):
    """One timed step of a deployment, as logged and shown in the view."""

    step: str
    result: str
    seconds: float
    service: str = ""  # in a deployment of several services, the one it belongs to


BEFORE_SWITCH, AFTER_SWITCH = "before the switch", "after the switch"
IN_OLD, IN_ONE_OFF, IN_NEW = "in the old container", "in a one-off container of the new image", "in each new container"


class ReleaseStage(NamedTuple):
    """One release step as declared data: its stage's name (and its label's, gopdater.<name>), when it runs,
    where, and what its failure does. Parsing, scheduling, running, recovery and the Swarm warning all read this
    table: a new release step is one row."""

    name: str
    when: str  # BEFORE_SWITCH or AFTER_SWITCH
    where: str  # IN_OLD, IN_ONE_OFF or IN_NEW
    failure: str  # what a failure does, in words

    @property
    def stage(self) -> "Stage":
        return Stage(self.name)


RELEASE_STAGES = (
    ReleaseStage("pre-update", BEFORE_SWITCH, IN_OLD, "nothing is switched"),
    ReleaseStage("migrate", BEFORE_SWITCH, IN_ONE_OFF, "nothing is switched"),
    ReleaseStage("post-update", AFTER_SWITCH, IN_NEW, "the update is rolled back"),
)
# The steps an update journals, each also the name of its timed step in the view and the log: start (the record
# is open; nothing has run yet; for start-first: the new container starts), those of the procedures, set-tag (a
# version channel's new tag written into the project's env file), dependents (those following a service are
# recreated or restarted), and one per release step. Stage.PRE_UPDATE is
# "pre-update": built from both lists, so that RELEASE_STAGES alone declares a release step.
UPDATE_STAGES = ("start", "inspect", "pull", "compare", "stop", "remove", "up", "recover-tag", "rollback-tag",
                 "rollback-stop", "rollback-remove", "rollback-up", "create", "isolate", "connect", "discard", "update",
                 "rollback", "set-tag", "dependents")
Stage = enum.Enum("Stage", [(name.upper().replace("-", "_"), name)
                            for name in (*UPDATE_STAGES, *(row.name for row in RELEASE_STAGES))], type=str)


# Timed steps a deployment shows that are not journalled stages, and how a timed step ended.
WAIT, DOWNTIME, SWITCH, CLEANUP, DONE = "wait", "downtime", "switch", "cleanup", "done"
STEP_OK, STEP_FAILED, STEP_KEPT = "ok", "failed", "kept"  # kept: cleanup left an image in place
RECREATED, RESTARTED = "recreated", "restarted"  # how a dependent (`dependent <name>`) followed its service


class DeployFailed(Exception):
    """A step of a deployment failed; the message is the reason."""


# -- command errors, and the one command runner ------------------------------------------------

STDERR_TAIL_CHARS = 300
LOG_TAIL_LINES = 20
DRY_RUN_IMAGE = "(dry run: the image a pull would fetch)"


class CommandError(Exception):
    """A command failed: its exit code (None on timeout) and a short stderr tail."""

    def __init__(self, argv: Sequence[str], code: Optional[int], tail: str, output: Sequence[str] = ()):
        self.argv, self.code, self.tail, self.output = list(argv), code, tail, list(output)
        what = "timed out" if code is None else f"exited {code}"
        super().__init__(f"{' '.join(argv[:3])} {what}: {tail}" if tail else f"{' '.join(argv[:3])} {what}")


class FileWriteError(CommandError):
    """A file gopdater keeps for a project (its env file) could not be written: what and why."""

    def __init__(self, path: str, why: str):
        Exception.__init__(self, f"{path} cannot be written: {why}")
        self.argv, self.code, self.tail, self.output = [], 1, why, []


class EngineUnreachable(Exception):
    """No Docker engine answered a command: not a CommandError, so that no step reads it as its own failure (the
    work queue waits for the engine, then recovers from the journal)."""

    def __init__(self, argv: Sequence[str], code: Optional[int], tail: str, output: Sequence[str] = ()):
        self.argv, self.code, self.tail = list(argv), code, tail
        super().__init__(f"{' '.join(argv[:3])}: no Docker engine answered: {tail}")


# What the docker CLI, Compose v2 and Compose v1 say when no engine answers.
ENGINE_GONE_RE = re.compile(r"Cannot connect to the Docker daemon|Is the docker daemon running|error during connect|"
                            r"failed to connect to the docker API|Error while fetching server API version|"
                            r"Couldn't connect to Docker daemon", re.IGNORECASE)


def command_failed(argv: Sequence[str], code: Optional[int], stderr: str, output: Sequence[str] = ()
                   ) -> Exception:
    """The error for a failed command: EngineUnreachable when its stderr says the engine did not answer."""
    kind = EngineUnreachable if ENGINE_GONE_RE.search(stderr) else CommandError
    return kind(argv, code, stderr_tail(stderr), output)


def stderr_tail(stderr: str) -> str:
    """The last STDERR_TAIL_CHARS of stderr, whole lines only."""
    stderr = stderr.strip()
    tail = stderr[-STDERR_TAIL_CHARS:]
    if len(stderr) > STDERR_TAIL_CHARS and "\n" in tail:
        tail = tail.split("\n", 1)[1]
    return tail


def shown(argv: Sequence[str]) -> str:
    """An argv as a shell would need it typed, for the log."""
    return shlex.join(argv)


OUTPUT_TAIL_BYTES = 64 * 1024  # what a step or a container printed, and any stderr: the last 64 KiB are kept
ANSWER_MAX_BYTES = 64 * 1024 * 1024  # docker's own answers (inspect of a whole host), kept whole up to this
PIPE_READ_BYTES = 64 * 1024
LINE_MAX = 500  # characters of one printed line kept, in the log, history, /deployments and notifications


class Printed(NamedTuple):
    """How a command ended: its exit code (None: killed at its timeout, or for answering too much), stdout
    (with both: stdout and stderr as one stream, its tail) and its stderr's tail."""

    code: Optional[int]
    stdout: str
    stderr: str


class Kept:
    """The bytes of one pipe as they stream: all of them up to a limit (over it, `over` is set), or the tail."""

    def __init__(self, limit: int, tail: bool):
        self.limit, self.tail, self.data, self.over = limit, tail, bytearray(), False

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limit:
            if not self.tail:
                self.over = True
            del self.data[:len(self.data) - self.limit]

    def text(self) -> str:
        return self.data.decode(errors="replace")


class How(NamedTuple):
    """How a runner runs one command, beside its argv and timeout: the runner's keywords, as one value."""

    env: Optional[Mapping[str, str]] = None  # its whole environment (gopdater's own is never passed on)
    cwd: Optional[str] = None
    quiet: bool = False  # a read: logged at debug level
    both: bool = False  # stdout and stderr as one stream, its tail kept (a step's or a container's output)
    mutates: bool = False  # it changes something: DRY_RUN logs it instead
    given: Optional[bytes] = None  # a few bytes for its stdin (a credential helper's question)


def collect(argv: Sequence[str], timeout: float, how: How) -> Printed:
    """Run argv to its end, reading its pipes as they fill so that memory stays bounded whatever it prints:
    stdout whole (docker's answers) unless how.both, then its tail (a step's or a container's output)."""
    with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT if how.both else subprocess.PIPE,
                          stdin=subprocess.DEVNULL if how.given is None else subprocess.PIPE,
                          env=dict(how.env) if how.env is not None else None, cwd=how.cwd) as proc:
        if how.given is not None:  # a line, well under a pipe's buffer: written whole before anything is read
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(how.given)
            proc.stdin.close()
        kept = {proc.stdout: Kept(OUTPUT_TAIL_BYTES if how.both else ANSWER_MAX_BYTES, tail=how.both),
                **({proc.stderr: Kept(OUTPUT_TAIL_BYTES, tail=True)} if proc.stderr else {})}
        deadline, code = time.monotonic() + timeout, None
        drain(kept, lambda: kept[proc.stdout].over or time.monotonic() >= deadline, deadline)
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = None if kept[proc.stdout].over else proc.wait(max(0.0, deadline - time.monotonic()))
        if code is None:
            proc.kill()
    stderr = kept[proc.stderr].text() if proc.stderr else ""
    return Printed(code, kept[proc.stdout].text(), stderr)


def drain(kept: Mapping[object, Kept], enough: Callable[[], bool], deadline: float) -> None:
    """Read each pipe into its Kept as it fills, until all are closed, or enough() (over its limit, or late)."""
    with selectors.DefaultSelector() as selector:
        for pipe in kept:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map() and not enough():
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(key.fd, PIPE_READ_BYTES)
                if chunk:
                    kept[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)


def printed_lines(text: str) -> List[str]:
    """The last LOG_TAIL_LINES lines of what a command printed, each cut to LINE_MAX characters."""
    return [line[:LINE_MAX] for line in text.splitlines()[-LOG_TAIL_LINES:]]


def run_command(argv: Sequence[str], *, timeout: float, **keywords: object) -> str:
    """Run one command (argv list, no shell, no stdin but given) with a timeout and How's keywords (a TypeError
    names any other); log it; return stdout (with both, stdout and stderr as one stream, whose last lines a
    CommandError also keeps) or raise CommandError."""
    how = How(**keywords)
    started = time.monotonic()
    try:
        printed = collect(argv, timeout, how)
    except OSError as error:
        log.warning("command %s could not start: %s", shown(argv), error.strerror)
        raise CommandError(argv, 127, error.strerror or "could not start") from None
    seconds = time.monotonic() - started
    stderr = printed.stdout if how.both else printed.stderr
    if printed.code is None:
        what = f"no answer within {timeout:g}s" if seconds >= timeout else f"answered over {ANSWER_MAX_BYTES} bytes"
        log.warning("command %s stopped: %s", shown(argv), what)
        raise CommandError(argv, None, what, printed_lines(printed.stdout))
    if printed.code != 0:
        log.warning("command %s exit=%s seconds=%.2f stderr=%r", shown(argv), printed.code, seconds,
                    stderr_tail(stderr))
        raise command_failed(argv, printed.code, stderr, printed_lines(stderr))
    log.log(logging.DEBUG if how.quiet else logging.INFO, "command %s exit=0 seconds=%.2f", shown(argv), seconds)
    return printed.stdout


Runner = Callable[..., str]


class DryRunner:
    """A runner that runs read-only commands and logs the others instead of running them.

    A dry pull fetches nothing, so the image it would fetch counts as new: the log then shows every
    command of a real update.
    """

    dry = True

    def __init__(self, runner: Runner):
        self.runner = runner

    def __call__(self, argv: Sequence[str], *, mutates: bool = False, **kwargs) -> str:
        if mutates:
            log.info("dry-run would run: %s", shown(argv))
            return ""
        if list(argv[:5]) == ["docker", "image", "inspect", "--format", "{{.Id}}"]:
            return DRY_RUN_IMAGE
        return self.runner(argv, **kwargs)


# -- a container, as docker inspect shows it ---------------------------------------------------


class Container(NamedTuple):
    """What `docker inspect` says about one container."""

    id: str
    name: str
    service: str
    project: str
    image: str
    image_id: str
    status: str
    health: Optional[str]
    restart_count: int
    started_at: str
    exit_code: int
    has_healthcheck: bool
    start_period: float
    oneoff: bool
    labels: Mapping[str, str] = {}  # as Compose and the operator set them: see creator_labels()
    host_ports: bool = False  # publishes a port on the host, so two copies cannot run at once
    networks: Mapping[str, Tuple[str, ...]] = {}  # network: the aliases Compose gave the container there
    ignored: Tuple[str, ...] = ()  # gopdater.* labels its image carries, left out of labels
    network_of: Optional[str] = None  # the container whose network namespace it joined (network_mode: container:)

    @classmethod
    def from_inspect(cls, data: dict, carried: Optional[Mapping[str, str]] = None) -> "Container":
        """Build from one element of `docker inspect` output, less the labels its image carries (if given)."""
        labels, ignored = creator_labels(dig(data, "Config", "Labels") or {}, carried or {})
        return cls(
            id=data.get("Id", ""), name=str(data.get("Name") or "").lstrip("/"),
            service=labels.get("com.docker.compose.service", ""), project=labels.get("com.docker.compose.project", ""),
            image=dig(data, "Config", "Image") or "", image_id=data.get("Image") or "", **container_state(data),
            **container_check(data), oneoff=labels.get("com.docker.compose.oneoff", "False") == "True",
            labels=labels, **container_network(data), ignored=ignored)


def dig(data: object, *path: str) -> object:
    """data[path[0]][path[1]]..., or None where a step is missing or not an object: docker's JSON, read safely."""
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def container_check(data: dict) -> Dict[str, object]:
    """Whether one `docker inspect` element has a healthcheck, and its start period in seconds."""
    test = dig(data, "Config", "Healthcheck", "Test") or []
    return {"has_healthcheck": bool(test) and test[0] != "NONE",
            "start_period": (dig(data, "Config", "Healthcheck", "StartPeriod") or 0) / 1e9}


def container_network(data: dict) -> Dict[str, object]:
    """Whether one `docker inspect` element publishes a host port, and its networks with Compose's aliases."""
    bindings = (dig(data, "HostConfig", "PortBindings") or {}).values()
    return {"host_ports": any(b.get("HostPort") for bs in bindings for b in bs or ()), "network_of": joined(data),
            "networks": {net: tuple(a for a in dig(v, "Aliases") or () if SERVICE_RE.fullmatch(a))
                         for net, v in (dig(data, "NetworkSettings", "Networks") or {}).items()}}


def joined(data: dict) -> Optional[str]:
    """The container whose network namespace one `docker inspect` element joined (NetworkMode container:<id>)."""
    return str(dig(data, "HostConfig", "NetworkMode") or "").partition("container:")[2] or None


def container_state(data: dict) -> Dict[str, object]:
    """The State fields of one `docker inspect` element, as Container keeps them."""
    state = dig(data, "State") or {}
    return {"status": "restarting" if state.get("Restarting") else state.get("Status", ""),
            "health": dig(state, "Health", "Status"), "restart_count": int(data.get("RestartCount") or 0),
            "started_at": state.get("StartedAt") or "", "exit_code": int(state.get("ExitCode") or 0)}


# dockerd copies an image's labels onto each container made from it, where the creator set none of that
# name: these, which steer gopdater, count only where Compose or the operator set them.
OPERATOR_LABEL_PREFIXES = ("gopdater.", "com.docker.compose.project.")


def creator_labels(labels: Mapping[str, str], carried: Mapping[str, str]) -> Tuple[Dict[str, str], Tuple[str, ...]]:
    """A container's labels less those steering gopdater that its image carries with the same value (an image
    could otherwise name the env file Compose reads, or opt itself in or out), and the gopdater.* ones so
    left out. A value that differs from the image's was set by Compose or the operator; a container whose
    com.docker.compose.* labels are all its image's was not made by Compose, and keeps none of them. Pure."""
    compose = [key for key in labels if key.startswith("com.docker.compose.")]
    made_by_compose = any(carried.get(key) != labels[key] for key in compose)  # Compose sets some of its own
    kept = {key: value for key, value in labels.items()
            if not (key.startswith(OPERATOR_LABEL_PREFIXES) and carried.get(key) == value)
            and (made_by_compose or key not in compose)}
    return kept, tuple(sorted(key for key in labels if key not in kept and key.startswith("gopdater.")))


class Configured(NamedTuple):
    """What the Compose file says of one service, where Compose reports it (v2)."""

    order: str = ""  # deploy.update_config.order
    labels: Optional[Mapping[str, str]] = None  # its labels; None where Compose does not say (v1)
    network_service: Optional[str] = None  # network_mode: service:<this>
    restarts_with: Tuple[str, ...] = ()  # depends_on: {<each>: {restart: true}}
    depends: Tuple[str, ...] = ()  # every service it depends on (depends_on), Compose's start order

    @classmethod
    def from_config(cls, value: dict) -> "Configured":
        labels = value.get("labels") or {}
        if isinstance(labels, list):  # the list form, KEY=VALUE
            labels = dict(str(item).partition("=")[::2] for item in labels)
        order = dig(value, "deploy", "update_config", "order")
        return cls(str(order or ""), {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
                   *configured_dependency(value))


def configured_dependency(value: dict) -> Tuple[Optional[str], Tuple[str, ...], Tuple[str, ...]]:
    """The service whose network namespace a service joins (network_mode: service:X), those it restarts with
    (depends_on: {X: {restart: true}}), and all it depends on, as `compose config --format json` gives them
    (Compose v2 writes depends_on as a mapping). Pure."""
    depends = value.get("depends_on") if isinstance(value.get("depends_on"), dict) else {}
    return (str(value.get("network_mode") or "").partition("service:")[2] or None,
            tuple(sorted(str(name) for name, how in depends.items() if dig(how, "restart") is True)),
            tuple(sorted(map(str, depends))))


def project_containers(containers: Iterable[Container], service: Optional[str] = None) -> List[Container]:
    """The containers a project's `compose ps` shows (of one service if named), less one-off `run` ones."""
    return [c for c in containers if not c.oneoff and CONTAINER_RE.fullmatch(c.name) and
            SERVICE_RE.fullmatch(c.service) and (service is None or c.service == service)]


# ==========================================================================================
# Settings: each one a row with its default, help and parser; read once into a frozen Config
# ==========================================================================================

SECRET_RE = re.compile(r"[A-Za-z0-9._~-]{16,}", re.ASCII)
SECRET_FIX = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it and the fix."""


Parser = Callable[[str, Optional[str]], object]


# -- update windows: when a deployment may run (UPDATE_WINDOW, the label gopdater.window) -------

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SPAN_RE = re.compile(r"(?:([a-z]{3})(?:-([a-z]{3}))?\s+)?([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})", re.ASCII)
WINDOW_EXAMPLE = "Mon-Fri 02:00-05:00,Sat-Sun 00:00-24:00"


class Span(NamedTuple):
    """One part of an update window: the days it opens on (0 is Monday), and its start and end in minutes since
    midnight; an end at or before the start runs into the next day (22:00-02:00)."""

    days: FrozenSet[int]
    start: int
    end: int

    def open_at(self, at: datetime) -> bool:
        minute, day = at.hour * 60 + at.minute, at.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return (day in self.days and minute >= self.start) or ((day - 1) % 7 in self.days and minute < self.end)


Window = Tuple[Span, ...]


def parse_span(text: str) -> Span:
    """One span, e.g. `Mon-Fri 02:00-05:00`, `Sat 22:00-02:00` or `03:00-04:00` (every day); ValueError why not."""
    match = SPAN_RE.fullmatch(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"{text.strip()[:40]!r} is not DAYS HH:MM-HH:MM")
    first, last, *clock = match.groups()
    days = span_days(first, last, text)
    hours, minutes = [int(clock[0]), int(clock[2])], [int(clock[1]), int(clock[3])]
    start, end = hours[0] * 60 + minutes[0], hours[1] * 60 + minutes[1]
    if hours[0] > 23 or max(minutes) > 59 or end > 24 * 60 or start == end:
        raise ValueError(f"{text.strip()[:40]!r} is not a time span of one day (00:00 to 24:00)")
    return Span(days, start, end)


def span_days(first: Optional[str], last: Optional[str], text: str) -> FrozenSet[int]:
    """The days a span names (Mon, Mon-Fri, Fri-Mon wrapping the week's end; none: every day)."""
    if not {first or "mon", last or first or "mon"} <= set(DAY_NAMES):
        raise ValueError(f"{text.strip()[:40]!r} names no day: Mon, Tue, Wed, Thu, Fri, Sat or Sun")
    a, b = (DAY_NAMES.index(first), DAY_NAMES.index(last or first)) if first else (0, 6)
    return frozenset((a + i) % 7 for i in range((b - a) % 7 + 1))


def parse_window(text: str) -> Window:
    """An update window: spans, comma-separated; ValueError saying what is wrong."""
    return tuple(parse_span(part) for part in text.split(","))


def window_setting(name: str, text: str) -> Window:
    try:
        return parse_window(text)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}; write spans, comma-separated, e.g. {name}='{WINDOW_EXAMPLE}'") from None


def window_open(window: Window, at: datetime) -> bool:
    """Whether a deployment may run at this local time. Pure."""
    return any(span.open_at(at) for span in window)


def next_opening(window: Window, at: datetime) -> datetime:
    """When the window next opens (at itself if it is open): the earliest start after at. Pure."""
    if window_open(window, at):
        return at
    starts = [datetime.combine(at.date() + timedelta(days=d), dtime(span.start // 60, span.start % 60), at.tzinfo)
              for d in range(8) for span in window if (at.weekday() + d) % 7 in span.days]
    return min(start for start in starts if start > at)


def parse_public_url(name: str, text: str) -> str:
    """PUBLIC_URL: where operators reach gopdater, http(s) with a host and nothing secret in it."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password or \
            parts.query or parts.fragment or set(text) & {"\0", "\r", "\n", " ", "<", ">", '"'}:
        raise ConfigError(f"{name} must be the http(s) address gopdater is reached at, without credentials, e.g. "
                          f"{name}=https://deploy.example.com")
    return text.rstrip("/")


class Setting(NamedTuple):
    """One setting: its variable, default, help text, parser and Config field."""

    name: str
    default: Optional[str]
    help: str
    parse: Parser
    field: str = ""
    switch: bool = False  # a flag that takes no value, e.g. --dry-run

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")

    @property
    def attribute(self) -> str:
        return self.field or self.name.lower()


def _required(parse: Callable[[str, str], object], fix: str) -> Parser:
    def check(name: str, text: Optional[str]) -> object:
        if text is None:
            raise ConfigError(f"{name} is not set: {fix}")
        return parse(name, text)
    return check


def _optional(parse: Callable[[str, str], object]) -> Parser:
    return lambda name, text: None if text is None else parse(name, text)


def number(minimum: float, integer: bool = False, maximum: float = float("inf")) -> Parser:
    """A parser for a number of seconds (or a whole number) within bounds."""
    def parse(name: str, text: Optional[str]) -> float:
        try:
            value = int(text) if integer else float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or value != value or not minimum <= value <= maximum or value == float("inf"):
            kind = "a whole number" if integer else "a number of seconds"
            upper = f" and at most {maximum:g}" if maximum != float("inf") else ""
            raise ConfigError(f"{name} must be {kind} of at least {minimum:g}{upper}, "
                              f"e.g. {name}={SETTING_DEFAULTS[name]}")
        return value
    return parse


def choice(*values: str, upper: bool = False) -> Parser:
    """A parser that accepts one of a few words."""
    def parse(name: str, text: Optional[str]) -> str:
        word = text.upper() if upper else text.lower()
        if word not in values:
            raise ConfigError(f"{name} must be {', '.join(values[:-1])} or {values[-1]}, e.g. {name}={values[0]}")
        return word
    return parse


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes"), ("0", "false", "no")  # a setting's, and a gopdater.* label's


def boolean(name: str, text: Optional[str]) -> bool:
    word = text.lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise ConfigError(f"{name} must be 1 or 0, e.g. {name}=1")
    return word in TRUE_WORDS


def parse_owner(entry: str) -> Tuple[str, str]:
    """Split an OWNER entry into (registry, namespace); a bare name is Docker Hub's."""
    registry, rest = split_registry(entry.strip())
    rest = rest.lower()  # GitHub and Quay namespaces are spelled in any case; image names are lower case
    if not rest or not REPOSITORY_RE.fullmatch(rest):
        raise ConfigError(f"OWNER has an invalid entry {entry.strip()!r}: use namespaces like "
                          "OWNER=acme or OWNER=acme,ghcr.io/acme")
    return registry, rest


def parse_owners(name: str, text: str) -> Tuple[Tuple[str, str], ...]:
    owners = tuple(parse_owner(e) for e in text.split(",") if e.strip())
    if not owners:
        raise ConfigError(f"{name} is empty: set OWNER to your Docker Hub namespace, e.g. OWNER=acme")
    return owners


def parse_secret(name: str, text: str) -> str:
    if not SECRET_RE.fullmatch(text):
        raise ConfigError(f"{name} is too weak: it needs at least 16 characters from A-Z a-z 0-9 . _ ~ -; "
                          f"{SECRET_FIX}")
    return text


def parse_project_name(name: str, text: str) -> str:
    if not PROJECT_RE.fullmatch(text):
        raise ConfigError(f"{name} must be lower-case letters, digits, '-' and '_', starting with a letter or "
                          f"digit, e.g. {name}=site")
    return text


def parse_command(name: str, text: str) -> str:
    if text == "auto":
        return text
    try:
        shlex.split(text)
    except ValueError:
        raise ConfigError(f"{name} is not a valid command line, e.g. {name}=docker-compose") from None
    return text


NOTIFY_FORMAT_NAMES: List[str] = []  # what a NOTIFY_URL's #fragment may name: filled from NOTIFY_FORMATS, its table


WEB, MAIL = ("http", "https"), ("smtp", "smtps")
# What a NOTIFY_URL entry must not be, each with its one line: the first that matches stops start-up.
NOTIFY_URL_RULES: Tuple[Tuple[Callable[[urllib.parse.SplitResult], bool], str], ...] = (
    (lambda p: p.scheme == "http" and p.password is not None,
     "{name} entry {shown} has a password but is plain http://: it would go in clear; use https://"),
    (lambda p: p.scheme in MAIL and not (p.hostname and urllib.parse.parse_qs(p.query).get("to")),
     "{name} entry {shown} needs a host and ?to=ADDRESS, e.g. "
     "smtp://user:pass@mail.example.org:587/?to=ops@example.org"),
    (lambda p: p.scheme not in WEB + MAIL or not p.hostname,
     "{name} entries must be http(s):// or smtp(s):// URLs, e.g. {name}=https://ntfy.sh/mytopic; {shown} is not"),
    (lambda p: p.scheme in WEB and bool(p.fragment) and p.fragment not in NOTIFY_FORMAT_NAMES,
     "{name} entry {shown} names the format #{fragment}; use one of {formats}"),
)


def parse_notify_urls(name: str, text: str) -> Tuple[str, ...]:
    """NOTIFY_URL: comma-separated http(s) URLs (a #fragment may name the format) and smtp(s) URLs."""
    urls = tuple(filter(None, (part.strip() for part in text.split(","))))
    for number, url in enumerate(urls, 1):
        try:  # every part Endpoint.parse and the senders read later, read here: a bad one stops start-up
            parts = urllib.parse.urlsplit(url)
            port_ok = parts.port != 0  # the property raises ValueError for a port out of range or not a number
        except ValueError:
            port_ok, parts = False, None
        if parts is None or not port_ok:  # nothing of the entry is shown: any part of it may be a token
            raise ConfigError(f"{name} entry {number} cannot be read as a URL: write scheme://host[:port]/path, "
                              "the port a number from 1 to 65535, an IPv6 host in brackets")
        shown = f"{parts.scheme}://{parts.hostname or ''}/..."  # never the path, query or credentials: secrets
        for wrong, message in NOTIFY_URL_RULES:
            if wrong(parts):
                raise ConfigError(message.format(name=name, shown=shown, fragment=parts.fragment[:20],
                                                 formats=", ".join(f"#{f}" for f in NOTIFY_FORMAT_NAMES)))
    return urls


def parse_notify_on(name: str, text: str) -> FrozenSet[str]:
    """NOTIFY_ON: the results that are notified."""
    results = frozenset(filter(None, (part.strip().lower() for part in text.split(","))))
    known = tuple(state.value for state in (State.UPDATED, State.ROLLED_BACK, State.FAILED, State.RECOVERED,
                                            State.SKIPPED, State.UP_TO_DATE, State.DRY_RUN, State.WAITING,
                                            State.EXPIRED, State.REJECTED, State.HELD, State.RESUMED))
    if not results or not results <= set(known):
        raise ConfigError(f"{name} must be results, comma-separated, of {', '.join(known)}")
    return results


def parse_services(name: str, text: str) -> Tuple[Tuple[ImageKey, str], ...]:
    """Parse SERVICES: comma-separated IMAGE[:TAG]=[PROJECT/]SERVICE pairs."""
    pairs = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        image, sep, service = entry.partition("=")
        key = parse_reference(image.strip()) if sep else None
        project, _, bare = service.strip().rpartition("/")
        if key is None or not SERVICE_RE.fullmatch(bare) or (project and not PROJECT_RE.fullmatch(project)):
            raise ConfigError(f"{name} has an invalid entry {entry!r}: use IMAGE[:TAG]=[PROJECT/]SERVICE pairs, "
                              "e.g. SERVICES=acme/site=web,acme/api:stable=shop/api")
        pairs.append((key, service.strip()))
    if not pairs:
        raise ConfigError(f"{name} is set but empty: unset it, or give IMAGE[:TAG]=SERVICE pairs")
    return tuple(pairs)


def as_text(name: str, text: Optional[str]) -> Optional[str]:
    return text


ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# What docker and Compose get of gopdater's environment: never its own settings (a project's .env must
# mean what it means when the user runs Compose by hand), only what finds and reaches the engine.
COMMAND_ENV = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT", "DOCKER_CERT_PATH",
               "DOCKER_TLS_VERIFY")


def parse_pass_env(name: str, text: str) -> Tuple[str, ...]:
    names = tuple(filter(None, (part.strip() for part in text.split(","))))
    own = [n for n in names if n in SETTING_DEFAULTS and n not in COMMAND_ENV]
    if not all(ENV_NAME_RE.fullmatch(n) for n in names) or own:
        raise ConfigError(f"{name} must be environment variable names, comma-separated, and none of gopdater's own "
                          f"settings{' (' + ', '.join(own) + ')' if own else ''}, e.g. {name}=HTTP_PROXY,SITE_TAG")
    return names


def command_env(environ: Mapping[str, str], passed: Sequence[str]) -> Mapping[str, str]:
    """The environment docker and Compose run with: COMMAND_ENV and PASS_ENV's names, nothing else."""
    return types.MappingProxyType({k: environ[k] for k in (*COMMAND_ENV, *passed) if k in environ})


def parse_projects(name: str, text: Optional[str]) -> Optional[Tuple[str, ...]]:
    """PROJECTS: unset (the one project here), * (every project on the engine) or names."""
    if text is None:
        return None
    names = tuple(filter(None, (part.strip() for part in text.split(","))))
    if names != ("*",) and (not names or not all(PROJECT_RE.fullmatch(n) for n in names)):
        raise ConfigError(f"{name} must be * or Compose project names, comma-separated, e.g. {name}=blog,shop")
    return names


SETTINGS = (
    Setting("OWNER", None, "required: comma-separated namespaces allowed to trigger updates; a bare name is a "
            "Docker Hub namespace, REGISTRY/NAME another registry's (ghcr.io/acme)",
            _required(parse_owners, "set OWNER to your Docker Hub namespace, e.g. OWNER=acme"), "owners"),
    Setting("WEBHOOK_SECRET", None, "required: at least 16 URL-safe characters (A-Z a-z 0-9 . _ ~ -); "
            "prefer the variable, as a flag is visible to other users in ps",
            _required(parse_secret, SECRET_FIX), "secret"),
    Setting("HOST", "0.0.0.0", "address to listen on", as_text),
    Setting("PORT", "8080", "port to listen on", number(0, integer=True, maximum=65535)),
    Setting("TLS_CERT", None, "PEM certificate file (the chain may follow it); with TLS_KEY, PORT serves HTTPS "
            "only, TLS 1.2 or newer, and replaced files are used within 60 s", as_text),
    Setting("TLS_KEY", None, "PEM private key file of TLS_CERT", as_text),
    Setting("COMPOSE_FILE", None, "Compose file(s), as Compose reads this variable", as_text),
    Setting("COMPOSE_PROJECT_NAME", None, "Compose project name, as Compose reads this variable",
            _optional(parse_project_name), "project_name"),
    Setting("COMPOSE_COMMAND", "auto", "auto (docker compose, else docker-compose) or the command to run, "
            "e.g. 'docker-compose'", parse_command),
    Setting("PROJECTS", None, "unset: the Compose project where gopdater runs; * every Compose project on the "
            "engine; or project names, comma-separated", parse_projects),
    Setting("SERVICES", None, "explicit mapping, comma-separated IMAGE[:TAG]=[PROJECT/]SERVICE pairs (PROJECT: a "
            "Compose project or a Swarm stack); when set only these pairs update", lambda name, text: parse_services(name, text) if text is not None else ()),
    Setting("PASS_ENV", None, "variables of gopdater's environment that docker and Compose also get, "
            "comma-separated (they always get PATH, HOME and DOCKER_HOST, DOCKER_CONFIG, DOCKER_CONTEXT, "
            "DOCKER_CERT_PATH, DOCKER_TLS_VERIFY; never gopdater's own settings)",
            lambda name, text: parse_pass_env(name, text) if text is not None else ()),
    Setting("SWARM", "auto", "auto (Swarm services too when the engine is a swarm manager), on or off",
            choice("auto", "on", "off")),
    Setting("LABEL_ENABLE", "0", "1: only services labelled gopdater.enable=true update (false always keeps one "
            "out)", boolean),
    Setting("PULL_TIMEOUT", "600", "seconds a pull may take", number(1)),
    Setting("COMMAND_TIMEOUT", "120", "seconds any other docker command may take", number(1)),
    Setting("STOP_TIMEOUT", "10", "seconds docker stop waits before killing the old container",
            number(0, integer=True)),
    Setting("HEALTH_TIMEOUT", "60", "seconds each new container (for Swarm, each batch of update_config.parallelism "
            "tasks) has to become healthy, never less than its healthcheck start_period; a rollback gets as long "
            "again", number(1)),
    Setting("SETTLE_TIME", "10", "seconds a container without a healthcheck must stay running", number(0)),
    Setting("NOTIFY_URL", None, "where each deployment's result goes, comma-separated: Slack, Mattermost, Discord, "
            "ntfy, Gotify, Telegram and Teams URLs as the service gives them, smtp(s)://user:pass@host:port/?to=ADDRESS"
            ", or any http(s) URL for JSON (#slack, #discord, #ntfy, #gotify, #telegram, #teams or #json names the "
            "format)", lambda name, text: parse_notify_urls(name, text) if text is not None else ()),
    Setting("NOTIFY_ON", "updated,rolled-back,failed,waiting,expired", "the results that are notified, "
            "comma-separated (also recovered, skipped, up-to-date, dry-run, rejected, held, resumed)", parse_notify_on),
    Setting("DRY_RUN", "0", "1 to log the commands a deployment would run and run none of them", boolean,
            switch=True),
    Setting("REQUEST_TIMEOUT", "10", "seconds a client has to send a whole request", number(0.1)),
    Setting("MAX_CONNECTIONS", "512", "open client connections held at once; the oldest is dropped beyond",
            number(1, integer=True)),
    Setting("SWITCH_DELAY", "1.5", "seconds a start-first update gives a reverse proxy to see the new container "
            "before the old one stops", number(0)),
    Setting("SHUTDOWN_TIMEOUT", "120", "seconds a running deployment may take to finish on SIGTERM", number(0)),
    Setting("STATE_DIR", None, "folder for the journal of updates in progress and the deployment history "
            "(default $XDG_STATE_HOME/gopdater, else ~/.local/state/gopdater)", _optional(lambda name, text: text)),
    Setting("ENGINE_WAIT", "300", "seconds an update waits for a Docker engine that stopped answering",
            number(0)),
    Setting("REFRESH_INTERVAL", "60", "seconds between re-reads of the Compose project while idle", number(1)),
    Setting("RECONCILE_INTERVAL", "3600", "seconds between asking the registry what each tag names now, so that a "
            "push missed is still applied (also once after start-up); 0: only on POST /reconcile", number(0)),
    Setting("PARALLEL", "4", "deployments run at once, each of a different Compose project or Swarm service "
            "(one project's services update one at a time); 1 runs every deployment in turn",
            number(1, integer=True, maximum=64)),
    Setting("UPDATE_WINDOW", None, "when deployments may run, in local time (or TZ's), e.g. "
            f"'{WINDOW_EXAMPLE}'; a push outside it waits until it opens (the label gopdater.window sets a service's "
            "own)", _optional(window_setting)),
    Setting("APPROVE", "0", "1: every deployment waits for an operator's approval (the label gopdater.approve=true "
            "asks it for one service)", boolean),
    Setting("APPROVE_TIMEOUT", "86400", "seconds a deployment waits for approval before it ends expired", number(1)),
    Setting("PUBLIC_URL", None, "the address operators reach gopdater at, e.g. https://deploy.example.com: the "
            "notification of a waiting deployment links to its /status", _optional(parse_public_url)),
    Setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR", choice("INFO", "DEBUG", "WARNING", "ERROR",
                                                                         upper=True)),
)
SETTING_DEFAULTS = {s.name: s.default for s in SETTINGS}


class Config(NamedTuple):
    """Every setting, read once at start-up."""

    owners: Tuple[Tuple[str, str], ...]
    secret: str
    host: str
    port: int
    tls_cert: Optional[str]
    tls_key: Optional[str]
    compose_file: Optional[str]
    project_name: Optional[str]
    compose_command: str
    projects: Optional[Tuple[str, ...]]
    services: Tuple[Tuple[ImageKey, str], ...]
    pass_env: Tuple[str, ...]
    swarm: str
    label_enable: bool
    pull_timeout: float
    command_timeout: float
    stop_timeout: int
    health_timeout: float
    settle_time: float
    notify_url: Tuple[str, ...]
    notify_on: FrozenSet[str]
    dry_run: bool
    request_timeout: float
    max_connections: int
    switch_delay: float
    shutdown_timeout: float
    state_dir: Optional[str]
    engine_wait: float
    refresh_interval: float
    reconcile_interval: float
    parallel: int
    log_level: str
    update_window: Optional[Window]
    approve: bool
    approve_timeout: float
    public_url: Optional[str]
    environ: Mapping[str, str]  # gopdater's own environment, for its own use only
    command_env: Mapping[str, str] = types.MappingProxyType({})  # what docker and Compose get (command_env())
    check: bool = False


def usage() -> str:
    """The --help text: every flag with its variable's help and default."""
    lines = ["usage: gopdater [--check] [--version] [--FLAG VALUE ...]", "",
             "Receive registry push webhooks and update the matching Compose services.", ""]
    for setting in SETTINGS:
        default = f" (default {setting.default})" if setting.default is not None else ""
        lines.append(f"  {setting.flag}{'' if setting.switch else ' ' + setting.name}")
        lines.append(f"      {setting.help}{default}")
    lines += ["  --check", "      diagnose the set-up, print what to fix, exit 0 or 1", "  --version", "",
              "Each flag has an environment variable of the same name in upper case (--port is PORT). "
              "Flags win over variables."]
    return "\n".join(lines)


def parse_flags(argv: Sequence[str]) -> Tuple[Dict[str, str], bool]:
    """The flags given: {setting name: text}, and whether --check was; --help and --version exit here."""
    values: Dict[str, str] = {}
    args = list(argv)
    while args:
        flag, has_value, value = args.pop(0).partition("=")
        values.update(one_flag(flag, (has_value, value), args))
    check = values.pop("--check", None) is not None
    return values, check


ANSWERING_FLAGS: Dict[str, Callable[[], str]] = {  # flags answered at once, then gopdater exits 0
    "-h": lambda: usage(), "--help": lambda: usage(), "--version": lambda: f"gopdater {__version__}"}


def one_flag(flag: str, given: Tuple[str, str], args: List[str]) -> Dict[str, str]:
    """One flag read: {its setting's name (or --check): its text}; given: ("=", value) when written flag=value;
    a value written apart is taken from args."""
    if flag in ANSWERING_FLAGS:
        print(ANSWERING_FLAGS[flag]())
        raise SystemExit(0)
    setting = next((setting for setting in SETTINGS if setting.flag == flag), None)
    if flag == "--check":
        return {flag: switched(flag, given[0])}
    if getattr(setting, "switch", False):
        return {setting.name: switched(flag, given[0])}
    if setting is None:
        raise ConfigError(f"{flag} is not a flag of gopdater: see gopdater --help")
    return {setting.name: given[1] if given[0] else next_value(flag, setting, args)}


def switched(flag: str, has_value: str) -> str:
    """A switch's value ("1"); ConfigError if it was given one."""
    if has_value:
        raise ConfigError(f"{flag} takes no value: give it alone, e.g. gopdater {flag}")
    return "1"


def next_value(flag: str, setting: Setting, args: List[str]) -> str:
    """A flag's value given as the next argument (taken from args); ConfigError if there is none."""
    if not args:
        raise ConfigError(f"{flag} needs a value, e.g. {flag} {setting.default or setting.name}")
    return args.pop(0)


def load_config(argv: Optional[Sequence[str]], environ: Mapping[str, str]) -> Config:
    """Read flags, then the environment, then defaults; raise ConfigError on the first bad one."""
    flags, check = parse_flags(sys.argv[1:] if argv is None else argv)
    values = {}
    for setting in SETTINGS:
        text = flags.get(setting.name, environ.get(setting.name))
        text = setting.default if text is None or not text.strip() else text.strip()
        values[setting.attribute] = setting.parse(setting.name, text)
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError("TLS_CERT and TLS_KEY go together: set both for HTTPS, or neither for HTTP")
    return Config(**values, environ=types.MappingProxyType(dict(environ)),
                  command_env=command_env(environ, values["pass_env"]), check=check)


# ==========================================================================================
# Senders: one row per registry (path, authentication, content types, parser)
# ==========================================================================================

MANIFEST_MEDIA_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
})
DISTRIBUTION_CONTENT_TYPES = frozenset({
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
    "application/json",
})


class PayloadError(Exception):
    """A field of the payload is missing or invalid; the message is the field's path."""


class Ignored(Exception):
    """The delivery is authentic and valid but asks for nothing; the message is a fixed reason."""

    status = "ignored"


class Pong(Ignored):
    """A sender's test delivery (GitHub's ping): answered 200 ok."""

    status = "ok"


class PushEvent(NamedTuple):
    """One pushed image tag, whoever sent it."""

    sender: str
    image: ImageKey
    digest: Optional[str] = None


def get_field(data: object, path: str, kind: type = str, required: bool = True, prefix: str = ""):
    """Walk a dotted path through nested objects; raise PayloadError naming it if absent or of the wrong type."""
    value = data
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        if required:
            raise PayloadError(prefix + path)
        return None
    if not isinstance(value, kind) or value is True or value is False:  # JSON's true is not the number 1
        raise PayloadError(prefix + path)
    return value


MAX_PUSHED = 100  # tags, resources or events one delivery may list: a hook is one push, not a catalogue


class TooMany(PayloadError):
    """A list of the payload is longer than MAX_PUSHED; the message is its path."""


def get_list(data: object, path: str) -> list:
    """A list field (get_field), refused whole before any item is looked at if it is over MAX_PUSHED."""
    items = get_field(data, path, list)
    if len(items) > MAX_PUSHED:
        raise TooMany(path)
    return items


def checked_name(name: str, field: str) -> Tuple[str, str]:
    """Validate an image name from a payload, naming the field when it is wrong."""
    parsed = parse_name(name)
    if parsed is None:
        raise PayloadError(field)
    return parsed


def checked_tag(tag: object, field: str) -> str:
    """Validate a tag from a payload."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise PayloadError(field)
    return tag


def pushed(sender: str, host: object, repository: object, tag: object, digest: object,
           fields: Sequence[str]) -> PushEvent:
    """One pushed image from its parts, each validated; fields names them: host, repository, tag, digest."""
    if not isinstance(host, str) or not DOMAIN_RE.fullmatch(host):
        raise PayloadError(fields[0])
    registry, repository = checked_name(f"{host}/{repository}", fields[1])
    if digest is not None and (not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest)):
        raise PayloadError(fields[3])
    return PushEvent(sender, ImageKey(registry, repository, checked_tag(tag, fields[2])), digest)


def parse_dockerhub(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """Docker Hub: repository.repo_name and push_data.tag; everything else is optional."""
    registry, repository = checked_name(get_field(data, "repository.repo_name"), "repository.repo_name")
    tag = checked_tag(get_field(data, "push_data.tag"), "push_data.tag")
    get_field(data, "push_data.pushed_at", (int, float), required=False)
    return [PushEvent("dockerhub", ImageKey(registry, repository, tag))]


def parse_quay(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """Quay repo_push: docker_url names the image, updated_tags lists the tags."""
    registry, repository = checked_name(get_field(data, "docker_url"), "docker_url")
    events = [PushEvent("quay", ImageKey(registry, repository, checked_tag(tag, f"updated_tags[{i}]")))
              for i, tag in enumerate(get_list(data, "updated_tags"))]
    if not events:
        raise Ignored("no updated tags")
    return events


def parse_ghcr(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """GitHub package event: published or updated container versions with a tag."""
    event = headers.get("X-GitHub-Event", "")
    if event == "ping":
        raise Pong("pong")
    if event not in ("package", "registry_package"):
        raise Ignored("event is not a package event")
    if get_field(data, "action") not in ("published", "updated"):
        raise Ignored("action is not published or updated")
    package = get_field(data, event, dict)
    package_type = get_field(package, "package_type", required=False, prefix=event + ".")
    if package_type is not None and package_type.upper() != "CONTAINER":
        raise Ignored("package is not a container image")
    namespace = get_field(package, "namespace", prefix=event + ".")
    name = get_field(package, "name", prefix=event + ".")
    tag_field = f"{event}.package_version.container_metadata.tag"
    tag = get_field(data, tag_field + ".name", required=False)
    if not tag:
        raise Ignored("version has no tag (a per-platform event)")
    return [pushed("ghcr", "ghcr.io", f"{namespace.lower()}/{name}", tag,
                   get_field(data, tag_field + ".digest", required=False),
                   (event, f"{event}.name", tag_field + ".name", tag_field + ".digest"))]


def parse_harbor(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """Harbor PUSH_ARTIFACT: one event per resource pushed with a tag."""
    if get_field(data, "type") not in ("PUSH_ARTIFACT", "pushImage"):
        raise Ignored("event type is not a push")
    resources = get_list(data, "event_data.resources")
    full_name = get_field(data, "event_data.repository.repo_full_name")
    events, reasons = [], set()
    for i, resource in enumerate(resources):
        field = f"event_data.resources[{i}]."
        host = get_field(resource, "resource_url", prefix=field).split("/", 1)[0]
        tag = get_field(resource, "tag", required=False, prefix=field)
        if not tag or DIGEST_RE.fullmatch(tag):
            reasons.add("no tag: pushed by digest")
            continue
        events.append(pushed("harbor", host, full_name, tag, get_field(resource, "digest", required=False, prefix=field),
                             (field + "resource_url", "event_data.repository.repo_full_name", field + "tag",
                              field + "digest")))
    if not events:
        raise Ignored(sorted(reasons)[0] if reasons else "no resources")
    return events


def distribution_event(sender: str, item: dict, field: str) -> PushEvent:
    """One Distribution-shaped event (a registry's or Azure's): a tagged manifest push, else Ignored."""
    if get_field(item, "action", prefix=field) != "push":
        raise Ignored("not a push")
    if get_field(item, "target.mediaType", required=False, prefix=field) not in MANIFEST_MEDIA_TYPES:
        raise Ignored("not a manifest push")
    tag = get_field(item, "target.tag", required=False, prefix=field)
    if not tag:
        raise Ignored("manifest pushed without a tag")
    parts = ("request.host", "target.repository", "target.tag", "target.digest")
    return pushed(sender, get_field(item, "request.host", prefix=field),
                  get_field(item, "target.repository", prefix=field), tag,
                  get_field(item, "target.digest", required=False, prefix=field), [field + part for part in parts])


def parse_distribution(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """Distribution envelope: manifest pushes with a tag; pulls and blob pushes are skipped."""
    events, reasons = [], set()
    for i, item in enumerate(get_list(data, "events")):
        try:
            events.append(distribution_event("registry", item, f"events[{i}]."))
        except Ignored as reason:
            reasons.add(str(reason))
    if not events:
        raise Ignored(sorted(reasons)[0] if reasons else "no events")
    return events


def parse_acr(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """Azure Container Registry: one Distribution-shaped event, no envelope; only a tagged push counts."""
    if get_field(data, "action") != "push":
        raise Ignored("not a push")
    if not get_field(data, "target.tag", required=False):
        raise Ignored("manifest pushed without a tag")
    parts = ("request.host", "target.repository", "target.tag", "target.digest")
    return [pushed("acr", get_field(data, "request.host"), get_field(data, "target.repository"),
                   get_field(data, "target.tag"), get_field(data, "target.digest", required=False), parts)]


def parse_gitea(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """Gitea and Forgejo package events: created container versions with a tag."""
    event = headers.get("X-Gitea-Event") or headers.get("X-Forgejo-Event") or headers.get("X-GitHub-Event")
    if event != "package":
        raise Ignored("event is not a package event")
    if get_field(data, "action") != "created":
        raise Ignored("action is not created")
    if get_field(data, "package.type") != "container":
        raise Ignored("package is not a container image")
    version = get_field(data, "package.version")
    if DIGEST_RE.fullmatch(version):
        raise Ignored("no tag: pushed by digest")
    try:
        host = urllib.parse.urlsplit(get_field(data, "package.html_url")).netloc
    except ValueError:  # e.g. an unclosed [ in the host
        raise PayloadError("package.html_url") from None
    owner = get_field(data, "package.owner.login")
    return [pushed("gitea", host, f"{owner.lower()}/{get_field(data, 'package.name')}", version, None,
                   ("package.html_url", "package.name", "package.version", ""))]


def secret_in_path(secret: bytes, captured: str, headers: Mapping[str, str], body: bytes) -> bool:
    """The secret is the path segment in the place of {secret}."""
    return hmac.compare_digest(captured.encode(), secret)


def bearer(secret: bytes, captured: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Authorization: Bearer <secret>."""
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret)


def basic(secret: bytes, headers: Mapping[str, str]) -> bool:
    """Authorization: Basic, any user name, the secret as the password (what a browser prompts for)."""
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    try:
        password = base64.b64decode(token.strip(), validate=True).partition(b":")[2]
    except ValueError:  # binascii.Error is a ValueError
        return False
    return scheme.lower() == "basic" and hmac.compare_digest(password, secret)


class Credential(NamedTuple):
    """How a sender proves itself: a check of (secret, captured path part, headers, body), and whether the
    head alone decides it (then a wrong one is refused before its body is read)."""

    check: Callable[[bytes, str, Mapping[str, str], bytes], bool]
    in_head: bool


def signature(*header_prefixes: Tuple[str, str]) -> Credential:
    """HMAC-SHA256 of the raw body, hex, under the first of these (header, prefix) pairs that is present."""
    def check(secret: bytes, captured: str, headers: Mapping[str, str], body: bytes) -> bool:
        for header, prefix in header_prefixes:
            given = headers.get(header)
            if given is not None:
                expected = prefix + hmac.new(secret, body, "sha256").hexdigest()
                return hmac.compare_digest(given.strip().encode(), expected.encode())
        return False
    return Credential(check, in_head=False)


SECRET_IN_PATH, BEARER = Credential(secret_in_path, in_head=True), Credential(bearer, in_head=True)


class Sender(NamedTuple):
    """One way a registry delivers a push: where, how it proves itself, what it sends, how to read it."""

    name: str
    path: str  # "{secret}" stands for a path segment that must be the secret
    authenticate: Credential
    parse: Callable[[dict, Mapping[str, str]], List[PushEvent]]
    content_types: Optional[FrozenSet[str]] = None  # None: any
    # A Distribution registry retries a refused delivery forever and holds back later events.
    foreign_owner_ignored: bool = False


SENDERS = (
    Sender("dockerhub", "/hooks", BEARER, parse_dockerhub),
    Sender("ghcr", "/hooks/ghcr", signature(("X-Hub-Signature-256", "sha256=")), parse_ghcr),
    Sender("harbor", "/hooks/harbor", BEARER, parse_harbor),
    Sender("registry", "/hooks/registry", BEARER, parse_distribution, DISTRIBUTION_CONTENT_TYPES, True),
    Sender("gitea", "/hooks/gitea", signature(("X-Gitea-Signature", ""), ("X-Forgejo-Signature", ""),
                                              ("X-Hub-Signature-256", "sha256=")), parse_gitea),
    Sender("acr", "/hooks/acr", BEARER, parse_acr),
    Sender("dockerhub", "/hooks/{secret}", SECRET_IN_PATH, parse_dockerhub),
    Sender("quay", "/hooks/{secret}/quay", SECRET_IN_PATH, parse_quay),
)
FIXED_ROUTES = {s.path: s for s in SENDERS if "{secret}" not in s.path}
SECRET_ROUTES = {s.path: s for s in SENDERS if "{secret}" in s.path}
SECRET_AT = 2  # "/hooks/{secret}...": the segment that is the secret, the same in every such path
assert all(path.split("/")[SECRET_AT] == "{secret}" for path in SECRET_ROUTES)


# ==========================================================================================
# The journal: each update in progress, on disk before every step, and what recovery does then
# ==========================================================================================
#
# journal.json in STATE_DIR holds one Record per update in progress, rewritten atomically (temp
# file, fsync, rename) before every step and dropped when the update ends. An update follows one
# Procedure, which journals its own Stages in order. After a crash, or an engine that stopped
# answering, plan() decides from the record alone and whether the service's containers all run:
# RECOVERY is that decision as a table, with a row for every stage a procedure journals.


# -- the record: what every kind journals, and what its kind declares --------------------------

RecoveryRows = Mapping[Tuple[str, Stage], Tuple[enum.Enum, enum.Enum]]


class RecordKind(NamedTuple):
    """What the journal knows of one kind of target, all declared by the target itself (RECORD_KINDS)."""

    part: type  # a NamedTuple of the fields only this kind journals, every one optional, with CHECKS and from_stored
    recovery: RecoveryRows  # (procedure, stage) -> (what recovery does if every container runs, if not)
    legacy: Callable[[Mapping[str, object]], str]  # the procedure of a record gopdater 1.1 wrote (it named none)


RECORD_KINDS: Dict[str, RecordKind] = {}  # kind: its row, added where each target is defined


class Record(NamedTuple):
    """One update in progress, as journal.json keeps it: the fields every target journals, and its own part."""

    kind: str
    project: str
    service: str
    deployment: str
    reference: str  # the pushed image and tag
    procedure: str  # how the update changes the service, one of its kind's (the first half of a recovery key)
    stage: Stage
    started: str
    old_image: Optional[str] = None  # image ids (or Swarm's reference@digest)
    new_image: Optional[str] = None
    image: Optional[str] = None  # the reference the service runs, as its containers name it
    old_tag: Optional[str] = None  # version channels: the tag it ran and the tag it moves to
    new_tag: Optional[str] = None
    part: Optional[tuple] = None  # its kind's own fields (RecordKind.part), None until begun

    @classmethod
    def from_json(cls, data: object) -> Optional["Record"]:
        """A record read back from disk, if every field is what gopdater writes; else None."""
        kind = RECORD_KINDS.get(str(data.get("kind"))) if isinstance(data, dict) else None
        if kind is None:
            return None
        fields = shared_fields(data, kind)
        try:
            record = cls(**{**fields, "stage": Stage(fields.get("stage")), "part": kind.part.from_stored(
                {k: v for k, v in data.items() if k in kind.part._fields})})
        except (TypeError, ValueError, AttributeError):
            return None
        return record if record_problem(record) is None else None

    def stored(self) -> dict:
        """The record as journal.json keeps it: one flat object, its part's fields beside the shared ones."""
        shared = {k: v for k, v in self._asdict().items() if k != "part"}
        own = {k: [m._asdict() for m in v] if isinstance(v, tuple) and v and hasattr(v[0], "_asdict") else v
               for k, v in (self.part._asdict() if self.part is not None else {}).items()}  # nested records as objects
        return {**shared, **own, "stage": self.stage.value}


def shared_fields(data: Mapping[str, object], kind: RecordKind) -> Dict[str, object]:
    """The fields of a stored record that every kind journals (a record gopdater 1.1 wrote: its step is its
    stage, and its kind tells its procedure)."""
    fields = {k: v for k, v in data.items() if k in Record._fields and k != "part"}
    if "step" in data and "stage" not in data:
        fields.update(stage=data["step"], procedure=kind.legacy(data))
    return fields


def image_value(text: str) -> bool:
    """An image as a record names it: an id (sha256:...), or a reference, optionally @digest (Swarm's)."""
    reference, at, digest = text.partition("@")
    return bool(DIGEST_RE.fullmatch(text) or (parse_reference(reference) and (not at or DIGEST_RE.fullmatch(digest))))


def written(valid: Callable[[str], object]) -> Callable[[object], bool]:
    """A field check: a string gopdater could have written (valid, and never like an option)."""
    return lambda value: isinstance(value, str) and not value.startswith("-") and bool(valid(value))


RECORD_CHECKS: Tuple[Tuple[str, Callable[[object], bool]], ...] = (
    ("kind", lambda v: isinstance(v, str) and v in RECORD_KINDS),
    ("project", written(lambda v: v == "" or PROJECT_RE.fullmatch(v))), ("service", written(SERVICE_RE.fullmatch)),
    ("deployment", written(re.compile(r"[0-9a-f]{12}|recovery").fullmatch)), ("reference", written(parse_reference)),
    ("procedure", written(re.compile(r"[a-z][a-z-]*").fullmatch)), ("image", written(parse_reference)),
    ("old_image", written(image_value)), ("new_image", written(image_value)), ("started", written(lambda v: True)),
    ("old_tag", written(TAG_RE.fullmatch)), ("new_tag", written(TAG_RE.fullmatch)))


def record_problem(record: Record) -> Optional[str]:
    """Why a record cannot be acted on (a field gopdater would never write, e.g. one like an option), or None."""
    kind = RECORD_KINDS.get(record.kind) if isinstance(record.kind, str) else None
    if kind is None:
        return "its kind is not one gopdater writes"
    if record.procedure not in {procedure for procedure, _ in kind.recovery}:
        return "its procedure is not one of its kind's"
    part = record.part if record.part is not None else kind.part()
    return fields_problem(record, RECORD_CHECKS) or fields_problem(part, part.CHECKS)


def fields_problem(holder: tuple, checks: Sequence[Tuple[str, Callable[[object], bool]]]) -> Optional[str]:
    """The first field of a record (or its part) that its check refuses; an optional one may be None. Pure."""
    for field, valid in checks:
        value = getattr(holder, field)
        if (value is not None or field not in type(holder)._field_defaults) and not valid(value):
            return f"its {field} is not one gopdater writes"
    return None


def plan(record: Record, running: bool) -> Optional[enum.Enum]:
    """What recovery does, from the record and whether every container of its service runs: its kind's recovery
    row for where the update was cut off; None (run nothing, say so) where its kind has no row. Pure."""
    kind = RECORD_KINDS.get(record.kind)
    row = kind.recovery.get((record.procedure, record.stage)) if kind else None
    return None if row is None else row[0 if running else 1]


# -- the journal, and the deployment history ---------------------------------------------------

HISTORY_SIZE = 50  # past deployments kept (history.json, /deployments, the status page)
JOURNAL_VERSION = 2
FAILED_KEPT = 10


class Past(dict):
    """A deployment from before the last restart, as its view was stored (only its own fields, flat)."""

    TEXTS = ("image", "tag", "kind", "project", "service", "id", "sender", "trigger", "digest", "state", "created",
             "started", "finished", "error", "old_tag", "new_tag", "action", "approved")  # each a string or null
    TEXT_MAX = 2000  # characters kept of each (an error names a command and its stderr's tail)
    STEPS_MAX = 100

    @classmethod
    def from_stored(cls, view: object) -> Optional["Past"]:
        """The view as history.json keeps it, if it has the shape and the types gopdater writes, each string cut
        as gopdater cuts it; else None. Pure: a crafted file is refused here, never rendered."""
        if not stored_view(view, cls.TEXTS) or not list_of(view.get("services", []), stored_member):
            return None
        logs, hooks = view.get("logs", []), view.get("hooks", 1)
        return cls({**{k: view.get(k) and view[k][:cls.TEXT_MAX] for k in cls.TEXTS}, "hooks": hooks,
                    "logs": [line[:LINE_MAX] for line in logs[-LOG_TAIL_LINES:]],
                    "steps": stored_steps(view.get("steps", []), cls.STEPS_MAX),
                    "services": [{**{k: m.get(k) and m[k][:cls.TEXT_MAX] for k in MEMBER_TEXTS},
                                  "steps": stored_steps(m.get("steps", []), cls.STEPS_MAX)}
                                 for m in view.get("services", [])[:MAX_SERVICES]]})

    def view(self) -> dict:
        return dict(self)


MEMBER_TEXTS = ("service", "result", "old_image", "new_image", "old_tag", "new_tag")  # each a string or null
MAX_SERVICES = 100  # services of one deployment kept in the history


def stored_member(member: object) -> bool:
    """Whether one service of a stored deployment has the shape Deployment.member_view() gives it. Pure."""
    return (isinstance(member, dict) and all(isinstance(member.get(k), (str, type(None))) for k in MEMBER_TEXTS)
            and list_of(member.get("steps", []), stored_step))


def stored_steps(steps: Sequence[dict], most: int) -> List[dict]:
    """Stored steps (stored_step() said so) as the history keeps them, each string cut."""
    return [{"step": s["step"][:80], "result": s["result"][:80], "seconds": s["seconds"],
             **({"service": s["service"][:80]} if isinstance(s.get("service"), str) else {})} for s in steps[:most]]


def stored_view(view: object, texts: Sequence[str]) -> bool:
    """Whether a stored view has the shape Deployment.view() gives it: its texts strings or null, a known state,
    a count of hooks, steps as stored_step() says, log lines as strings. Pure."""
    if not isinstance(view, dict) or not all(isinstance(view.get(k), (str, type(None))) for k in texts):
        return False
    hooks = view.get("hooks", 1)
    return (view.get("state") in STATE_VALUES and type(hooks) is int and 0 <= hooks <= 10**9
            and list_of(view.get("steps", []), stored_step) and list_of(view.get("logs", []), str))


def list_of(items: object, valid: Callable[[object], bool]) -> bool:
    """Whether items is a list whose every item valid() accepts (a type is a check too)."""
    check = (lambda item: isinstance(item, valid)) if isinstance(valid, type) else valid
    return isinstance(items, list) and all(map(check, items))


def stored_step(step: object) -> bool:
    """Whether a stored step has the shape Step gives it: two strings and a finite count of seconds. Pure."""
    return isinstance(step, dict) and isinstance(step.get("step"), str) and isinstance(step.get("result"), str) \
        and type(step.get("seconds")) in (int, float) and 0 <= step["seconds"] < float("inf")


def stored_previous(kept: object) -> Dict[str, Previous]:
    """The previous images journal.json keeps, those of the shape gopdater writes: an image id (never a reference a
    crafted file could name), a tag or null."""
    found = {}
    for key, value in (kept.items() if isinstance(kept, dict) else ()):
        if isinstance(value, dict) and isinstance(value.get("image"), str) and DIGEST_RE.fullmatch(value["image"]) and (
                value.get("tag") is None or isinstance(value["tag"], str) and TAG_RE.fullmatch(value["tag"])):
            found[key] = Previous(value["image"], value.get("tag"))
    return found


def stored_records(updates: object) -> Dict[str, Record]:
    """The records journal.json keeps, each one gopdater would write; any other is dropped, with a log line."""
    records = {}
    for key, data in (updates.items() if isinstance(updates, dict) else ()):
        record = Record.from_json(data)
        if record is None:
            log.error("journal record %r is not one gopdater writes; it is dropped and nothing is run for it",
                      str(key)[:80])
            continue
        records[key] = record
    return records


class Journal:
    """Updates in progress and the deployment history, kept in STATE_DIR across restarts and crashes."""

    def __init__(self, directory: str):
        self.directory = directory
        self.journal_path = os.path.join(directory, "journal.json")
        self.history_path = os.path.join(directory, "history.json")
        self.records: Dict[str, Record] = {}
        self.failed: Dict[str, List[str]] = {}  # service key: images whose new containers failed, newest last
        self.kept: Dict[str, Previous] = {}  # service key: the image it ran before its last update (for a rollback)
        self.lock = threading.Lock()

    def problem(self) -> Optional[str]:
        """None if STATE_DIR can be written, else one line saying what is wrong and how to fix it."""
        try:
            secure_folder(self.directory)
            write_atomically(os.path.join(self.directory, "probe.json"), {})
            os.remove(os.path.join(self.directory, "probe.json"))
        except OSError as error:
            return (f"STATE_DIR {self.directory} cannot be written ({error.strerror or error}): make it a "
                    "writable folder for this user with free space, or set STATE_DIR to one")
        return None

    def load(self) -> Tuple[List[Record], List[dict]]:
        """The updates a crash left unfinished, and the stored history, newest last."""
        stored = read_state(self.journal_path, dict)
        records = stored_records(stored.get("updates"))
        failed = stored.get("failed")
        with self.lock:
            self.records = records
            self.failed = {k: [i for i in v if isinstance(i, str) and image_value(i)][-FAILED_KEPT:]
                           for k, v in (failed.items() if isinstance(failed, dict) else ()) if isinstance(v, list)}
            self.kept = stored_previous(stored.get("previous"))
        stored = read_state(self.history_path, list)
        history = [past for past in map(Past.from_stored, stored) if past is not None]
        if len(history) < len(stored):
            self.set_history_aside(history, len(stored) - len(history))
        return list(records.values()), history[-HISTORY_SIZE:]

    def set_history_aside(self, kept: List["Past"], dropped: int) -> None:
        """Move a history file with entries gopdater does not write aside, and keep the others in its place."""
        aside = f"{self.history_path}.corrupt-{int(time.time())}"
        try:
            os.replace(self.history_path, aside)
            write_atomically(self.history_path, [past.view() for past in kept[-HISTORY_SIZE:]])
        except OSError as error:
            aside = f"nowhere ({error.strerror})"
        log.warning("%d entries of %s are not ones gopdater writes: the file is moved aside to %s; the other %d are "
                    "kept", dropped, self.history_path, aside, len(kept))

    def record(self, key: str) -> Optional[Record]:
        with self.lock:
            return self.records.get(key)

    def open(self, key: str, record: Record) -> None:
        """Journal a new update; raises OSError if that cannot be written."""
        with self.lock:
            self.records[key] = record
            self.write_locked()

    def mark(self, key: str, **fields: object) -> None:
        """Record where an update stands (fields of Record, or of its kind's part); raises OSError if that cannot be
        written."""
        with self.lock:
            record = self.records[key]
            shared = {k: v for k, v in fields.items() if k in Record._fields}
            own = {k: v for k, v in fields.items() if k not in shared}
            self.records[key] = record._replace(**shared, part=record.part._replace(**own) if own else record.part)
            self.write_locked()

    def close(self, key: str) -> None:
        """The update ended (whatever its result): forget it."""
        with self.lock:
            if self.records.pop(key, None) is not None:
                try:
                    self.write_locked()
                except OSError as error:
                    log.warning("could not close the journal entry of %s: %s", key, error.strerror)

    def needed_by_another(self, key: str, image_id: str) -> bool:
        """Whether an update of another service in flight runs or may roll back to this image."""
        with self.lock:
            return any(image_id in (r.old_image, r.new_image) for k, r in self.records.items() if k != key)

    def kept_elsewhere(self, key: str, image_id: str) -> bool:
        """Whether another service keeps this image for an operator's rollback."""
        with self.lock:
            return any(previous.image == image_id for k, previous in self.kept.items() if k != key)

    def failed_before(self, key: str, image: Optional[str]) -> bool:
        """Whether this image's new container failed for this service before (so a replay skips it)."""
        with self.lock:
            return image is not None and image in self.failed.get(key, ())

    def remember_failure(self, key: str, image: str) -> None:
        """An image whose new container failed and was rolled back; kept for the last FAILED_KEPT per service."""
        with self.lock:
            self.failed[key] = [i for i in self.failed.get(key, []) if i != image][-FAILED_KEPT + 1:] + [image]
            try:
                self.write_locked()
            except OSError as error:
                log.warning("could not keep the failed image of %s: %s", key, error.strerror)

    def previous(self, key: str) -> Optional[Previous]:
        """The image a service ran before its last update, if one is kept."""
        with self.lock:
            return self.kept.get(key)

    def keep(self, key: str, previous: Optional[Previous]) -> Optional[Previous]:
        """Keep the image a service ran before the update that just ended (None: none to keep); the one kept before,
        which may now go."""
        with self.lock:
            before = self.kept.pop(key, None)
            if previous is not None:
                self.kept[key] = previous
            try:
                self.write_locked()
            except OSError as error:
                log.warning("could not keep the previous image of %s: %s", key, error.strerror)
        return before

    def write_locked(self) -> None:
        updates = {key: record.stored() for key, record in self.records.items()}
        write_atomically(self.journal_path, {"version": JOURNAL_VERSION, "updates": updates, "failed": self.failed,
                                             "previous": {k: p._asdict() for k, p in self.kept.items()}})

    def save_history(self, views: List[dict]) -> None:
        try:
            write_atomically(self.history_path, views)
        except OSError as error:
            log.warning("could not keep the deployment history in %s: %s", self.directory, error.strerror)


# -- files in STATE_DIR: written whole or not at all, and one gopdater each --------------------


def write_atomically(path: str, data: object) -> None:
    """Write JSON so that a crash leaves the old file or the new one, never a torn one."""
    replace_file(path, json.dumps(data).encode())


def file_stamp(status: os.stat_result) -> Tuple[int, int, int]:
    """Inode, size and mtime: a file replaced or written by someone else has another."""
    return status.st_ino, status.st_size, status.st_mtime_ns


class FileChanged(OSError):
    """The file was changed by someone else after it was read, so replacing it would lose their change."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path} {why}")
        self.filename, self.strerror = path, why


def replace_file(path: str, data: bytes, mode: int = 0o600, owner: Optional[Tuple[int, int]] = None,
                 unchanged: Optional[Callable[[], bool]] = None) -> None:
    """Replace a file's bytes atomically. The temporary file is made exclusively (a fresh name, so never through
    a link someone left), given the mode and owner, synced, renamed over path, and the folder synced. With
    unchanged, it is asked right before the rename; FileChanged (nothing replaced, no temporary file left) if no."""
    descriptor, temp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                        dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                with contextlib.suppress(OSError):  # only root may give a file away; others keep their own
                    os.fchown(handle.fileno(), *owner)
            os.fsync(handle.fileno())
        if unchanged is not None and not unchanged():
            raise FileChanged(path, "was changed while gopdater wrote it")
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_state(path: str, kind: type):
    """A state file's JSON if it is of this kind; a corrupt one is moved aside with a warning."""
    try:
        # O_NOFOLLOW: a state file that is a link (to /etc/shadow, say) is not read but moved aside.
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), encoding="utf-8") as handle:
            data = json.load(handle)
        if isinstance(data, kind):
            return data
        error: Exception = ValueError("not a JSON " + kind.__name__)
    except FileNotFoundError:
        return kind()
    except (OSError, ValueError, RecursionError) as caught:
        error = caught
    aside = f"{path}.corrupt-{int(time.time())}"
    try:
        os.replace(path, aside)
    except OSError:
        aside = "nowhere (it could not be moved)"
    log.warning("state file %s is unreadable (%s); moved aside to %s; starting without it", path,
                type(error).__name__, aside)
    return kind()


def default_state_dir(config: Config, cwd: Optional[str] = None) -> str:
    """$XDG_STATE_HOME/gopdater (else ~/.local/state/gopdater); with one project (PROJECTS unset), a folder
    of its own below it, named for the project, so that one gopdater per project (the quick start) each
    has its own journal."""
    base = config.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    if config.projects is not None:
        return os.path.join(base, "gopdater")
    return os.path.join(base, "gopdater", "projects", config.project_name or default_project_name(cwd or os.getcwd()))


def state_dir(config: Config) -> str:
    return config.state_dir or default_state_dir(config)


class StateLock:
    """One gopdater per STATE_DIR: an exclusive lock on STATE_DIR/lock, held while the process lives."""

    def __init__(self, directory: str):
        self.path, self.handle = os.path.join(directory, "lock"), None

    def acquire(self) -> Optional[str]:
        """None once held; else one line saying who holds it and what to do."""
        import fcntl  # POSIX only, as Docker is; the lock goes with the process, even when it is killed
        handle = open(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = handle.read(20).strip() or "unknown"
            handle.close()
            return (f"STATE_DIR {os.path.dirname(self.path)} is in use by another gopdater (pid {holder}): give "
                    "each gopdater its own STATE_DIR")
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def secure_folder(directory: str) -> None:
    """Make STATE_DIR (0700), or tighten one that others could read or write, with a warning."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    mode = os.stat(directory).st_mode & 0o777
    if mode & 0o077:
        os.chmod(directory, 0o700)
        log.warning("STATE_DIR %s was open to others (mode %o); it is now 0700", directory, mode)


# -- the operator's gates: what a deployment waits for, the holds, kept in STATE_DIR --------


class Gate(NamedTuple):
    """What a deployment waits for before it may run (State.WAITING while it does). Decisions over it are pure."""

    applies: bool = True  # False for an operator's update now: no window, no approval
    window: Optional[Window] = None  # the window it runs in; () if its label is invalid (it never opens)
    approval: Optional[datetime] = None  # waiting for approval: when that ends it (expired)
    runs_at: Optional[datetime] = None  # when the window opens next, as last judged
    problem: Optional[str] = None  # why its window never opens (an invalid gopdater.window label)

    def ready(self, now: datetime) -> bool:
        """Whether it may run now: approved (or not asked), and inside its window."""
        return self.approval is None and (self.window is None or window_open(self.window, now))

    def judged(self, now: datetime) -> "Gate":
        """The gate with when its window opens next, for the page and /deployments."""
        return self._replace(runs_at=next_opening(self.window, now) if self.window else None)

    def view(self) -> dict:
        what = "approval" if self.approval is not None else "update window"
        return {"for": what, "expires": self.approval and self.approval.isoformat(timespec="seconds"),
                "runs_at": self.runs_at and self.runs_at.isoformat(timespec="seconds"), "problem": self.problem}



APPROVE_LABEL, WINDOW_LABEL = "gopdater.approve", "gopdater.window"
OPERATOR_FILE = "operator.json"
ID_RE = re.compile(r"[0-9a-f]{12}", re.ASCII)
SENDER_RE = re.compile(r"[a-z][a-z0-9-]{0,30}", re.ASCII)


def stamp_value(text: str) -> bool:
    """An ISO time as gopdater writes it."""
    try:
        return len(text) <= 40 and datetime.fromisoformat(text) is not None
    except ValueError:
        return False


class Waiting(NamedTuple):
    """A deployment that waited when gopdater stopped, as operator.json keeps it; its gate is judged again at start."""

    id: str
    sender: str
    reference: str
    digest: Optional[str]
    kind: str
    project: str
    services: Tuple[str, ...]
    created: str
    approved: Optional[str] = None  # when an operator approved it; else it waits for approval again if asked
    expires: Optional[str] = None  # when waiting for approval ends it

    CHECKS = (("id", ID_RE.fullmatch), ("sender", SENDER_RE.fullmatch), ("reference", parse_reference),
              ("digest", lambda v: v is None or written(DIGEST_RE.fullmatch)(v)), ("kind", lambda v: v in RECORD_KINDS),
              ("project", lambda v: v == "" or PROJECT_RE.fullmatch(v)), ("created", written(stamp_value)),
              ("services", lambda v: 0 < len(v) <= MAX_SERVICES and all(map(written(SERVICE_RE.fullmatch), v))),
              ("approved", written(stamp_value)), ("expires", written(stamp_value)))

    @classmethod
    def from_stored(cls, data: object) -> Optional["Waiting"]:
        """An entry as gopdater writes it, else None: a crafted file can only name a push of what runs here."""
        if not isinstance(data, dict) or set(data) != set(cls._fields) or not isinstance(data["services"], list):
            return None
        try:
            entry = cls(**{**data, "services": tuple(data["services"])})
            return entry if fields_problem(entry, cls.CHECKS) is None else None
        except TypeError:
            return None


def stored_hold(entry: object) -> Optional[Tuple[ServiceRef, str]]:
    """A hold as operator.json keeps it ([kind, project, service, since]), if it is one gopdater writes. Pure."""
    if not (isinstance(entry, list) and len(entry) == 4 and all(isinstance(v, str) for v in entry)):
        return None
    valid = entry[0] in RECORD_KINDS and (entry[1] == "" or PROJECT_RE.fullmatch(entry[1])) and SERVICE_RE.fullmatch(
        entry[2]) and stamp_value(entry[3])
    return (ServiceRef(*entry[:3]), entry[3]) if valid else None


def label_true(value: Optional[str]) -> bool:
    """A label's yes (as a setting's: 1, true, yes); anything else, or none, is no."""
    return (value or "").strip().lower() in TRUE_WORDS


def waiting_words(gate: Gate, config: Config) -> str:
    """Why a deployment waits, for its notification: until when, and where it is approved. Pure."""
    if gate.approval is not None:
        where = f"; approve or reject it at {config.public_url}/status" if config.public_url else ""
        return f"it waits for an operator's approval until {gate.approval:%Y-%m-%d %H:%M}{where}"
    if gate.runs_at is None:
        return gate.problem or "it waits for its update window"
    return f"it waits for its update window, which opens {gate.runs_at:%a %Y-%m-%d %H:%M}"


class Gates:
    """The services an operator holds and the gate each new deployment gets (UPDATE_WINDOW, APPROVE and its
    services' labels); holds and the deployments waiting are kept in STATE_DIR/operator.json across restarts."""

    def __init__(self, config: Config, now: Callable[[], datetime], directory: Optional[str]):
        self.config, self.now = config, now
        self.path = os.path.join(directory, OPERATOR_FILE) if directory else None
        self.holds: Dict[ServiceRef, str] = {}  # service: since when

    def gate_for(self, services: Sequence[Running], approved: bool = False, expires: Optional[datetime] = None
                 ) -> Gate:
        """The gate of a deployment of these services: its window (a service's label, else UPDATE_WINDOW), and
        approval when APPROVE or a service's label asks for it (and it was not approved before)."""
        labels = [mapping for service in services for mapping in service.labels]
        asks = self.config.approve or any(label_true(mapping.get(APPROVE_LABEL)) for mapping in labels)
        window, problem = self.window_of(labels)
        now = self.now()
        approval = expires or now + timedelta(seconds=self.config.approve_timeout) if asks and not approved else None
        return Gate(True, window, approval, problem=problem).judged(now)

    def window_of(self, labels: Sequence[Mapping[str, str]]) -> Tuple[Optional[Window], Optional[str]]:
        """The first gopdater.window label's window, else UPDATE_WINDOW; an invalid label's never opens (and why)."""
        text = next((m[WINDOW_LABEL] for m in labels if (m.get(WINDOW_LABEL) or "").strip()), None)
        try:
            return (self.config.update_window if text is None else parse_window(text)), None
        except ValueError as error:
            return (), f"its {WINDOW_LABEL} label is invalid ({error}): it never opens"

    def load(self) -> List[Waiting]:
        """Read the holds (each kept) and the deployments that waited (returned); a crafted entry is dropped."""
        if self.path is None:
            return []
        stored = read_state(self.path, dict)
        holds = stored.get("holds") if isinstance(stored.get("holds"), list) else []
        self.holds.update(hold for hold in map(stored_hold, holds) if hold is not None)
        waiting = stored.get("waiting") if isinstance(stored.get("waiting"), list) else []
        return [entry for entry in map(Waiting.from_stored, waiting[:HISTORY_SIZE]) if entry is not None]

    def save(self, waiting: Iterable[Waiting]) -> None:
        """Keep the holds and the deployments waiting; best effort (a warning if STATE_DIR cannot be written)."""
        if self.path is None:
            return
        data = {"version": 1, "holds": [[*ref, since] for ref, since in self.holds.items()],
                "waiting": [entry._asdict() for entry in waiting]}
        try:
            write_atomically(self.path, data)
        except OSError as error:
            log.warning("could not keep the holds and waiting deployments in %s: %s", self.path, error.strerror)


# ==========================================================================================
# The request pipeline: what the pages show, then route, size, authenticate, decode, parse, owner, map, enqueue
# ==========================================================================================

# -- what the last reconcile round found: the record the reconciling thread hands to the pages --


class Report(NamedTuple):
    """The last round: when it ended, services asked, those found behind, and each failing registry's reason."""

    finished: str = ""
    asked: int = 0
    behind: Tuple[str, ...] = ()
    errors: Mapping[str, str] = {}
    rounds: int = 0


FAILED_STATES = frozenset({State.FAILED.value, State.ROLLED_BACK.value, State.SKIPPED.value})


# -- the status page: one HTML page, no script, no external asset, every value escaped ---------

PAGE_STYLE = """body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;max-width:60em;padding:1em;color:#222}
h1{font-size:1.4em}h1 small{font-weight:normal;color:#666;font-size:.7em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3em .5em;border-bottom:1px solid #ddd;
vertical-align:top}th{font-size:.85em;color:#555}code{font-size:.9em;word-break:break-all}
.r{display:inline-block;padding:0 .45em;border-radius:.3em;color:#fff;background:#757575;font-size:.85em}
.updated{background:#2e7d32}.rolled-back{background:#ef6c00}.failed{background:#c62828}.recovered{background:#1565c0}
.running,.queued{background:#6a1b9a}.bar{display:flex;height:.7em;width:12em;max-width:40vw;background:#eee}
.bar span{background:#90a4ae;border-right:1px solid #fff}.bar span.out{background:#e53935}
.err{color:#b71c1c;font-size:.85em;white-space:normal}.n{white-space:nowrap}.waiting,.held{background:#f9a825}
form.b{display:inline;margin:0 .3em .2em 0}form.b button{font:inherit;font-size:.85em;padding:.1em .5em}
@media(max-width:40em){.wide{display:none}td,th{padding:.25em}}"""
RESULT_WORDS = {State.UPDATED: "updated", State.ROLLED_BACK: "rolled back", State.FAILED: "failed",
                State.RECOVERED: "recovered", State.UP_TO_DATE: "up to date", State.SKIPPED: "skipped",
                State.DRY_RUN: "dry run", State.QUEUED: "queued", State.RUNNING: "running",
                State.CANCELLED: "cancelled", State.WAITING: "waiting", State.REJECTED: "rejected",
                State.EXPIRED: "expired", State.HELD: "held", State.RESUMED: "resumed"}
OUTAGE_STEPS = frozenset({"stop", "remove", "up", "rollback-stop", "rollback-remove", "rollback-up"})


def short_id(image: Optional[str]) -> str:
    return (image or "-").replace("sha256:", "")[:12]


def badge(state: object) -> str:
    state = str(state)
    return f'<span class="r {html.escape(state)}">{html.escape(RESULT_WORDS.get(state, state))}</span>'


def step_bar(steps: Sequence[Mapping[str, object]]) -> str:
    """The steps of a deployment as a bar, each as wide as its share of the time; the outage steps in red."""
    timed = [(str(s.get("step")), float(s["seconds"])) for s in steps
             if s.get("step") not in (DONE, DOWNTIME) and isinstance(s.get("seconds"), (int, float))]
    total = sum(seconds for _, seconds in timed) or 1.0
    spans = "".join(f'<span class="{"out" if step in OUTAGE_STEPS else ""}" style="width:{100 * seconds / total:.1f}%" '
                    f'title="{html.escape(step)} {seconds:.2f} s"></span>' for step, seconds in timed)
    return f'<div class="bar" role="img" aria-label="steps">{spans}</div>'


def when(stamp: object) -> str:
    """An ISO time as the page shows it: date and time, UTC."""
    return html.escape(str(stamp or "")[:19].replace("T", " "))


def service_name(view: Mapping[str, object]) -> str:
    """The services of a deployment view, as the status page names them (project/a, b)."""
    names = ", ".join(view_services(view))
    return f"{view.get('project')}/{names}" if view.get("project") else names


def view_services(view: Mapping[str, object]) -> List[str]:
    """The services a stored or live deployment view names (its "services", else its "service")."""
    listed = view.get("services")
    names = [m.get("service") for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
    return [n for n in names if isinstance(n, str)] or [str(view.get("service"))]


def action_path(action: str, target: str) -> str:
    """Where a form posts an action: /deployments/<id>/<action>, or /services/<project>/<service>/<action>."""
    kind = "deployments" if Action(action) in DEPLOYMENT_ACTIONS else "services"
    return f"/{kind}/{target}/{action}"


class Controls(NamedTuple):
    """What the page's buttons need: a form's token for an action on a target, the holds, the services whose
    previous image is kept (those that can be rolled back)."""

    token: Callable[[str, str], str]
    held: Mapping[ServiceRef, str] = {}
    kept: FrozenSet[ServiceRef] = frozenset()


def button(controls: Controls, action: Action, target: str, label: str) -> str:
    """One action as a plain form (no script): its path, its token, its button."""
    return (f'<form class=b method=post action="{html.escape(action_path(action.value, target))}"><input type=hidden '
            f'name=token value="{html.escape(controls.token(action.value, target))}"><button>{label}</button></form>')


def service_buttons(controls: Optional[Controls], ref: ServiceRef) -> str:
    """A service's buttons: Hold or Resume (and since when it is held), Update now, Roll back (if it can)."""
    if controls is None:
        return ""
    target = f"{ref.project}/{ref.name}" if ref.project else ref.name
    since = controls.held.get(ref)
    hold = (f"{badge(State.HELD.value)} <span class=n>since {when(since)}</span> "
            f"{button(controls, Action.RESUME, target, 'Resume')}" if since else
            button(controls, Action.HOLD, target, "Hold"))
    back = button(controls, Action.ROLLBACK, target, "Roll back") if ref in controls.kept else ""
    return f"<td>{hold}{button(controls, Action.UPDATE, target, 'Update now')}{back}</td>"


def waiting_note(view: Mapping[str, object], controls: Optional[Controls]) -> str:
    """What a waiting deployment waits for (and until when), with Approve and Reject where it waits for approval."""
    waits = view.get("waiting") if isinstance(view.get("waiting"), dict) else {}
    if not waits:
        return ""
    until = f" until {when(waits.get('expires'))}" if waits.get("expires") else (
        f", runs {when(waits.get('runs_at'))}" if waits.get("runs_at") else "")
    note = f" <span class=n>for {html.escape(str(waits.get('for')))}{until}</span>"
    if waits.get("problem"):
        note += f'<div class=err>{html.escape(str(waits["problem"]))}</div>'
    if controls is not None:
        target = str(view.get("id"))
        if waits.get("for") == "approval":
            note += " " + button(controls, Action.APPROVE, target, "Approve")
        note += button(controls, Action.REJECT, target, "Reject")
    return note


def status_rows(services: Sequence["Running"], views: Sequence[Mapping[str, object]],
                controls: Optional[Controls] = None) -> List[str]:
    """One row per service: kind, name, image and tag, the running image's short id, the last result and when, and
    (with controls) its buttons."""
    last = {}
    for view in views:  # newest first
        last.setdefault((view.get("kind"), view.get("project") or "", view.get("service")), view)
    rows = []
    for service in services:
        view = last.get((service.ref.kind, service.ref.project, service.ref.name))
        result = f"{badge(view['state'])} <span class=n>{when(view.get('finished') or view.get('created'))}</span>" \
            if view else "none yet"
        rows.append(f"<tr><td>{html.escape(str(service.ref))}</td><td class=wide>{service.ref.kind}</td>"
                    f"<td><code>{html.escape(str(service.image or '-'))}</code>{channel_note(service.tracking)}</td>"
                    f"<td><code>{html.escape(short_id(service.image_id))}</code></td><td>{result}</td>"
                    f"{service_buttons(controls, service.ref)}</tr>")
    return rows


def channel_note(tracking: Optional["Tracking"]) -> str:
    """Under a tracked service's image: the channel it follows (and its variable), or why it follows none."""
    if tracking is None:
        return ""
    follows, words = tracking_words(tracking, f" ({tracking.variable})" if tracking.variable else "")
    return f"<div class={'n' if follows else 'err'}>{html.escape(words)}</div>"


OPERATOR_WORDS = {"update": "update now, by an operator", "rollback": "rollback, by an operator"}


def operator_words(view: Mapping[str, object]) -> Optional[str]:
    """What an operator asked for, under a deployment's tag (an update now, a rollback), or None."""
    return OPERATOR_WORDS.get(str(view.get("action"))) if view.get("trigger") == "operator" else None


def deployment_rows(views: Sequence[Mapping[str, object]]) -> List[str]:
    """One row per deployment: when, service, image, result (and why), the time it took, its steps drawn."""
    rows = []
    for view in views:
        took = next((s.get("seconds") for s in view.get("steps") or () if s.get("step") == DONE), None)
        error = f'<div class=err>{html.escape(str(view["error"])[:300])}</div>' if view.get("error") else ""
        asked = operator_words(view)
        rows.append(f"<tr><td class='wide n'>{when(view.get('started') or view.get('created'))}</td>"
                    f"<td>{html.escape(service_name(view))}</td><td class='wide n'><code>"
                    f"{html.escape(str(view.get('tag')))}</code>{f'<div>{asked}</div>' if asked else ''}</td>"
                    f"<td>{badge(view.get('state'))}{error}</td>"
                    f"<td class=n>{'' if took is None else f'{float(took):.1f} s'}</td>"
                    f"<td>{step_bar(view.get('steps') or ())}</td></tr>")
    return rows


def reconcile_line(report: Optional["Report"]) -> str:
    """The last round of asking the registry, for the status page, escaped. Pure."""
    if report is None or not report.rounds:
        return "<p>The registry has not been asked yet.</p>"
    errors = "".join(f'<br><span class=err>{html.escape(registry)}: {html.escape(why)}</span>'
                     for registry, why in sorted(report.errors.items()))
    found = f" ({html.escape(', '.join(report.behind))})" if report.behind else ""
    return (f"<p>The registry was last asked at {html.escape(report.finished)}: {report.asked} services, "
            f"{len(report.behind)} behind{found}.{errors}</p>")


def status_page(services: Sequence["Running"], views: Sequence[Mapping[str, object]], now: datetime,
                report: Optional["Report"] = None, controls: Optional[Controls] = None) -> str:
    """The whole page: what gopdater manages, what runs and waits now, the last deployments; with controls, the
    operator's buttons. Pure."""
    active = [v for v in views if v.get("state") in ("queued", "waiting", "running")]
    now_rows = "".join(f"<li>{badge(v['state'])} {html.escape(service_name(v))} <code>{html.escape(str(v.get('tag')))}"
                       f"</code>{waiting_note(v, controls)}</li>" for v in active) or "<li>nothing queued or running</li>"
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1"><meta http-equiv=refresh content=10>'
            f"<title>gopdater</title><style>{PAGE_STYLE}</style></head><body>"
            f"<h1>gopdater <small>{__version__} &middot; {len(services)} services &middot; "
            f"{now.strftime('%Y-%m-%d %H:%M:%S')} UTC</small></h1><h2>Now</h2><ul>{now_rows}</ul>"
            f"{reconcile_line(report)}"
            "<h2>Services</h2><table><tr><th>Service</th><th class=wide>Kind</th><th>Image</th><th>Running</th>"
            f"<th>Last result</th>{'<th>Actions</th>' if controls else ''}</tr>"
            f"{''.join(status_rows(services, views, controls))}</table>"
            "<h2>Last deployments</h2><table><tr><th class=wide>Started</th><th>Service</th><th class=wide>Tag</th>"
            f"<th>Result</th><th>Took</th><th>Steps (red: out of service)</th></tr>{''.join(deployment_rows(views))}"
            "</table></body></html>")


# -- /metrics: what the pipeline and the work queue count --------------------------------------

DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OUTAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class Histogram:
    """A Prometheus histogram: cumulative buckets, a sum and a count."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            self.counts[i] += value <= bound
        self.sum, self.count = self.sum + value, self.count + 1

    def lines(self, name: str) -> List[str]:
        rows = [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.buckets, self.counts)]
        return rows + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6g}",
                       f"{name}_count {self.count}"]


def _labels(**labels: object) -> str:
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


def reconcile_families(report: Optional["Report"]) -> List[Tuple[str, str, str, List[str]]]:
    """The gauges and counters of reconciling, from the last round (None: none yet). Pure."""
    rounds, asked, behind, errors = (report.rounds, report.asked, len(report.behind), sorted(report.errors)) \
        if report is not None else (0, 0, 0, [])
    return [("gopdater_reconcile_rounds_total", "counter", "Rounds of asking the registries what tags name.",
             [f" {rounds}"]),
            ("gopdater_reconcile_services", "gauge", "Services asked in the last round, and found behind.",
             [f'{{found="asked"}} {asked}', f'{{found="behind"}} {behind}']),
            ("gopdater_reconcile_errors", "gauge", "1 for each registry that failed in the last round.",
             [f"{_labels(registry=r)} 1" for r in errors])]


class Metrics:
    """Counters for /metrics. Label values are gopdater's own names (senders, codes, results, services)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock, self.lock = clock, threading.Lock()
        self.hooks: collections.Counter = collections.Counter()
        self.rejected_requests: collections.Counter = collections.Counter()
        self.results: collections.Counter = collections.Counter()
        self.duration, self.outage = Histogram(DURATION_BUCKETS), Histogram(OUTAGE_BUCKETS)
        self.last: Dict[str, Tuple[float, State]] = {}
        self.tags: Dict[str, Tuple[str, str, State]] = {}  # tracked service: its last move and how it ended

    def hook(self, sender: str, status: HTTPStatus) -> None:
        with self.lock:
            self.hooks[(sender, int(status))] += 1

    def rejected(self, status: HTTPStatus) -> None:
        with self.lock:
            self.rejected_requests[int(status)] += 1

    def deployed(self, service: str, result: State, seconds: float, steps: Sequence[Step],
                 tags: Optional[Tuple[Optional[str], str]] = None) -> None:
        with self.lock:
            if tags is not None:
                self.tags[service] = (tags[0] or "", tags[1], result)
            self.results[result.value] += 1
            self.duration.observe(seconds)
            for step in steps:
                if step.step == DOWNTIME:
                    self.outage.observe(step.seconds)
            self.last[service] = (self.clock(), result)

    def render(self, queued: int, report: Optional["Report"] = None) -> str:
        """The Prometheus text exposition format (0.0.4), with the deployments queued or running and the last
        reconcile round (None: none yet)."""
        with self.lock:
            families = [*reconcile_families(report), *self.families(),
                        ("gopdater_queue_length", "gauge", "Deployments queued or running.", [f" {queued}"])]
            lines = []
            for name, kind, help_text, rows in families:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                lines += [name + row for row in rows]
            for name, histogram, help_text in (
                    ("gopdater_deployment_duration_seconds", self.duration, "Seconds a service update took."),
                    ("gopdater_outage_seconds", self.outage, "Seconds from stopping the old container to the "
                                                             "new one running.")):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *histogram.lines(name)]
        return "\n".join(lines) + "\n"

    def families(self) -> List[Tuple[str, str, str, List[str]]]:
        """The counters and gauges of hooks and deployments: (name, type, help, rows); the lock held."""
        return [
            ("gopdater_hooks_total", "counter", "Webhook deliveries answered, by sender and status code.",
             [f"{_labels(sender=s, code=c)} {n}" for (s, c), n in sorted(self.hooks.items())]),
            ("gopdater_rejected_requests_total", "counter", "Requests answered with a 4xx or 5xx code.",
             [f"{_labels(code=c)} {n}" for c, n in sorted(self.rejected_requests.items())]),
            ("gopdater_deployments_total", "counter", "Service updates ended, by result.",
             [f"{_labels(result=r)} {n}" for r, n in sorted(self.results.items())]),
            ("gopdater_last_deployment_timestamp_seconds", "gauge", "When each service's last update ended.",
             [f"{_labels(service=s)} {t:.3f}" for s, (t, _) in sorted(self.last.items())]),
            ("gopdater_last_deployment_result", "gauge", "1 for the result of each service's last update.",
             [f"{_labels(service=s, result=r.value)} 1" for s, (_, r) in sorted(self.last.items())]),
            ("gopdater_last_version_move", "gauge", "1 for each tracked service's last move between tags.",
             [f"{_labels(service=s, old_tag=o, new_tag=n, result=r.value)} 1"
              for s, (o, n, r) in sorted(self.tags.items())]),
        ]


# -- the operator's forms: an action by POST, each form with a token, never from another site ---

FORM_MAX_BYTES = 4096  # an action's body: a token and a confirmation, nothing more
TOKEN_SECONDS = 600  # a form's token is good for 10 minutes (the page renews its own every 10 s)
SERVICE_ACTION, DEPLOYMENT_ACTION = "/services/{service}/{action}", "/deployments/{id}/{action}"
ACTION_PATH_RE = re.compile(r"/(services|deployments)/([A-Za-z0-9._/-]{1,300})", re.ASCII)


def action_route(path: str) -> Optional[Tuple[str, str]]:
    """(endpoint, what follows its prefix) for an operator's action path, else None."""
    match = ACTION_PATH_RE.fullmatch(path)
    if match is None or "/" not in match.group(2):
        return None
    return (SERVICE_ACTION if match.group(1) == "services" else DEPLOYMENT_ACTION), match.group(2)


def parse_action(endpoint: str, captured: str) -> Optional[Tuple[Action, Tuple[str, ...]]]:
    """The action and its target (project and service; or a deployment's id) a path names, if valid. Pure."""
    *target, word = captured.split("/")
    action = next((a for a in Action if a.value == word), None)
    valid = ACTION_TARGETS[endpoint]
    return (action, tuple(target)) if action in valid.actions and valid.target(target) else None


def service_target(target: List[str]) -> bool:
    """Whether a path names a service: project and service (a Swarm service: its name alone, the project "")."""
    if len(target) == 1:
        target.insert(0, "")  # a Swarm service has no project
    return len(target) == 2 and bool(not target[0] or PROJECT_RE.fullmatch(target[0])) and bool(
        SERVICE_RE.fullmatch(target[1]))


class ActionTarget(NamedTuple):
    """What an action path may name: its actions, and whether the rest of the path is a valid target."""

    actions: Tuple[Action, ...]
    target: Callable[[List[str]], bool]


ACTION_TARGETS = {SERVICE_ACTION: ActionTarget(SERVICE_ACTIONS, service_target),
                  DEPLOYMENT_ACTION: ActionTarget(DEPLOYMENT_ACTIONS, lambda t: len(t) == 1 and bool(
                      ID_RE.fullmatch(t[0])))}


def form_token(secret: bytes, action: str, target: str, issued: int) -> str:
    """The token a form carries: when it was issued, and an HMAC over the action, its target and that time, keyed
    by the secret (another site can neither read one nor make one)."""
    mac = hmac.new(secret, f"gopdater form\n{action}\n{target}\n{issued}".encode(), hashlib.sha256).hexdigest()
    return f"{issued}.{mac}"


def token_holds(secret: bytes, token: str, action: str, target: str, now: float) -> bool:
    """Whether a form's token was made here for this action on this target within TOKEN_SECONDS. Pure."""
    issued = token.partition(".")[0]
    if not DIGITS_RE.fullmatch(issued) or len(issued) > 12 or not now - TOKEN_SECONDS <= int(issued) <= now + 5:
        return False
    return hmac.compare_digest(form_token(secret, action, target, int(issued)).encode(), token.encode())


def foreign_origin(headers: Mapping[str, str], public_url: Optional[str]) -> Optional[str]:
    """Why a POST comes from another site (Sec-Fetch-Site says so, or its Origin is neither this Host nor
    PUBLIC_URL's), or None. Pure."""
    if (headers.get("Sec-Fetch-Site") or "").strip().lower() == "cross-site":
        return "a cross-site request"
    origin = headers.get("Origin")
    if origin is None:
        return None
    allowed = {(headers.get("Host") or "").strip().lower(), urllib.parse.urlsplit(public_url or "").netloc.lower()}
    host = urllib.parse.urlsplit(origin.strip()).netloc.lower()
    return None if host and host in allowed else "a request from another origin"


def form_fields(headers: Mapping[str, str], body: bytes) -> Optional[Dict[str, str]]:
    """An urlencoded form's fields (the first of each name; at most 8), or None if the body is not one."""
    if (headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        return None
    try:
        pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=8)
    except ValueError:  # not ASCII (UnicodeDecodeError), or too many fields
        return None
    fields: Dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def confirm_page(target: str, token: str) -> str:
    """The page that asks before a rollback: one form, with its own token and the confirmation. Pure."""
    form = (f'<form method=post action="{html.escape(action_path(Action.ROLLBACK.value, target))}">'
            f'<input type=hidden name=token value="{html.escape(token)}"><input type=hidden name=confirm value=yes>'
            "<button>Roll back</button></form>")
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>gopdater: roll back?</title>"
            f"<style>{PAGE_STYLE}</style></head><body><h1>Roll back {html.escape(target)}?</h1><p>It goes back to the "
            "image it ran before its last update, health-gated, its dependents after it; the image it runs now is "
            f"kept, so a second rollback goes forward again.</p>{form}<p><a href=/status>Cancel</a></p></body></html>")


# -- what the pipeline asks of the work queue and of the operator's desk ----------------------


class Listing(Protocol):
    """What the pipeline reads of a target (Target is the one)."""

    def running(self) -> List[Running]:
        ...

    def why_ignored(self, image: ImageKey) -> str:
        ...


class Deploying(Protocol):
    """What the pipeline asks of the work queue (WorkQueue is the one): take a push, show and count deployments."""

    target: Listing
    stopping: bool

    @property
    def working(self) -> bool:
        ...

    def submit(self, event: PushEvent, only: Optional[FrozenSet[ServiceRef]] = None, gated: bool = True
               ) -> Optional[list]:
        ...

    def views(self) -> List[dict]:
        ...

    def queued(self) -> int:
        ...


class Acting(Protocol):
    """What the pipeline asks of the operator's desk (Desk is the one): the actions, and what the page shows."""

    def on_service(self, project: str, name: str, action: Action) -> Acted:
        ...

    def on_deployment(self, deployment_id: str, action: Action) -> Acted:
        ...

    def holds(self) -> Mapping[ServiceRef, str]:
        ...

    def kept(self) -> FrozenSet[ServiceRef]:
        ...

    def why_ignored(self, image: ImageKey) -> str:
        ...


# -- the pipeline: route, size, authenticate, decode, parse ------------------------------------

MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024


class Html(str):
    """A body that is an HTML page (the status page)."""


class Response(NamedTuple):
    """A status, a short fixed JSON body (or text, for /metrics, or Html) and extra headers."""

    status: HTTPStatus
    payload: Union[dict, str]
    headers: Tuple[Tuple[str, str], ...] = ()


@functools.lru_cache(maxsize=None)
def refusal(status: HTTPStatus, reason: str, headers: Tuple[Tuple[str, str], ...] = ()) -> Response:
    """An error answer; there are only a few, each made once and kept (so are their bytes, see encode)."""
    return Response(status, {"status": "error", "reason": reason}, headers)


NOT_FOUND = refusal(HTTPStatus.NOT_FOUND, "not found")
FORBIDDEN = refusal(HTTPStatus.FORBIDDEN, "forbidden")
FOREIGN_OWNER = refusal(HTTPStatus.FORBIDDEN, "namespace not in OWNER")
INTERNAL_ERROR = refusal(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")


class Request(NamedTuple):
    """A request whose head has been judged: refused already, or its body (length bytes) still to come."""

    sender: Optional[Sender]  # None for the GET endpoints
    endpoint: str
    captured: str
    headers: Mapping[str, str]
    length: int  # -1 when the body cannot be delimited (the connection must close after the answer)
    verified: bool = False  # authenticated from the head already, so its body may be held
    refused: Optional[Response] = None  # the answer, given without reading the body


def route(path: str) -> Tuple[Optional[Sender], str, str]:
    """(sender, endpoint, captured secret) for a path; fixed paths win over the {secret} ones."""
    if path.startswith(("http://", "https://")):  # the absolute form, as a proxy may send it
        path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    path = path.split("?", 1)[0].split("#", 1)[0]
    if len(path) > 1:
        path = path.rstrip("/")
    if path in ENDPOINTS:
        return None, path, ""
    action = action_route(path)
    if action is not None:
        return None, *action
    sender = FIXED_ROUTES.get(path)
    if sender is not None:
        return sender, path, ""
    parts = path.split("/")
    if len(parts) > SECRET_AT and parts[SECRET_AT]:
        captured, parts[SECRET_AT] = parts[SECRET_AT], "{secret}"
        sender = SECRET_ROUTES.get("/".join(parts))
        if sender is not None:
            return sender, sender.path, captured
    return None, "", ""


DIGITS_RE = re.compile(r"[0-9]+", re.ASCII)  # not str.isdigit(), which takes '²'


def body_length(method: str, headers: Mapping[str, str]) -> Union[int, Response]:
    """The body's length from Content-Length, or the refusal: 411 (none, or chunked), 400, 413. The headers
    are http.server's (an http.client.HTTPMessage): a name may come more than once."""
    values = headers.get_all("Content-Length") or ()
    if headers.get("Transfer-Encoding") or (not values and method == "POST"):
        return refusal(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
    if not values:
        return 0
    length = values[0].strip()
    if not DIGITS_RE.fullmatch(length) or {value.strip() for value in values} != {length}:
        return refusal(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
    return body_size(length)


def body_size(length: str) -> Union[int, Response]:
    """A Content-Length of digits as a size, or 413 when it is over MAX_BODY_BYTES."""
    digits = length.lstrip("0")
    size = int(digits or "0") if len(digits) <= 7 else MAX_BODY_BYTES + 1  # int() never gets over 7 digits
    return refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body is over 1 MiB") if size > MAX_BODY_BYTES else size


def decode(body: bytes) -> Union[dict, Response]:
    """The body as a JSON object in UTF-8 (RFC 8259 allows no other between systems), or the 400 that says
    why not. Decoding first spares json's guess at UTF-16 and UTF-32 on every request."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return refusal(HTTPStatus.BAD_REQUEST, "body is not valid JSON")
    if not isinstance(data, dict):
        return refusal(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    return data


REASON_MAX = 1000  # a reason names services and tags; a host with hundreds of them must not make it unbounded


# -- the application: every endpoint's answer --------------------------------------------------


def accepted(submitted: Sequence[Tuple[object, bool]]) -> dict:
    """The 202 answer's body: the first deployment's id, every service, and every id when there are several."""
    ids = list(dict.fromkeys(deployment.id for deployment, _ in submitted))
    reply = {"status": "accepted", "id": ids[0], "services": sorted({str(r) for d, _ in submitted for r in d.refs})}
    return {**reply, "ids": ids} if len(ids) > 1 else reply


class Reconciling(Protocol):
    """What the pipeline asks of reconciling (the Reconciler): the tags a round would ask, a round now, and what the
    last round found."""

    report: Report

    def asks(self) -> List[str]:
        ...

    def ask_now(self) -> None:
        ...


class App:
    """Answers requests; never runs a command on the request path (deployments are queued)."""

    def __init__(self, config: Config, queue: Optional[Deploying], metrics: Optional["Metrics"] = None):
        self.config, self.queue = config, queue
        self.metrics = metrics or Metrics()
        self.reconciler: Optional[Reconciling] = None  # set once the work queue runs
        self.desk: Optional[Acting] = None  # the operator's desk, set with the queue
        self.clock: Callable[[], float] = time.time  # wall time, for the forms' tokens
        self.secret = config.secret.encode()

    def begin(self, method: str, path: str, headers: Mapping[str, str]) -> Request:
        """Route, size, method and a credential in the head: what can be judged before the body is read."""
        sender, endpoint, captured = route(path)
        length = body_length(method, headers)
        if isinstance(length, int) and length > ACTION_BODY_MAX.get(endpoint, MAX_BODY_BYTES):
            length = ACTION_TOO_LARGE
        verified = (sender is not None and sender.authenticate.in_head) or endpoint in POSTED
        refused = self.refused_by_head(Request(sender, endpoint, captured, headers, -1, verified), method, length)
        return Request(sender, endpoint, captured, headers, length if isinstance(length, int) else -1, verified,
                       refused)

    def refused_by_head(self, request: Request, method: str, length: Union[int, Response]) -> Optional[Response]:
        """Why a request is refused before its body is read: no such path, another method, its size, or a
        credential in its head that fails (an action's from a stranger: its body is never read); else None."""
        sender = request.sender
        allowed = "POST" if sender or request.endpoint in POSTED else ("GET" if request.endpoint else None)
        if allowed is None:
            return NOT_FOUND
        if method != allowed:
            return refusal(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", (("Allow", allowed),))
        if isinstance(length, Response):
            return length
        if not request.verified or self.head_credential_holds(request):
            return None
        if sender is not None:
            self.metrics.hook(sender.name, HTTPStatus.FORBIDDEN)
        return FORBIDDEN

    def head_credential_holds(self, request: Request) -> bool:
        """Whether the credential a head carries holds: a sender's own, else the Bearer token (an action)."""
        if request.sender is None:
            return bearer(self.secret, "", request.headers, b"") or (request.endpoint in ACTION_ENDPOINTS and basic(
                self.secret, request.headers))  # an action from the page's form: its token is checked with its body
        return request.sender.authenticate.check(self.secret, request.captured, request.headers, b"")

    def finish(self, request: Request, body: bytes) -> Response:
        """Answer a request whose body has arrived."""
        if request.endpoint in ACTION_ENDPOINTS:
            return ACTION_ENDPOINTS[request.endpoint](self, request, body[:max(request.length, 0)])
        if request.sender is None:
            return ENDPOINTS[request.endpoint](self, request)
        response = self.hook(request.sender, request, body[:request.length])
        self.metrics.hook(request.sender.name, response.status)
        return response

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        """begin, then finish: the whole pipeline for a request already read."""
        request = self.begin(method, path, headers)
        return request.refused or self.finish(request, body)

    def hook(self, sender: Sender, request: Request, body: bytes) -> Response:
        """Authenticate, decode, parse, then owner, mapping and queueing."""
        if not request.verified and not sender.authenticate.check(self.secret, request.captured, request.headers,
                                                                  body):
            return FORBIDDEN
        if sender.content_types is not None and (request.headers.get("Content-Type") or "").split(";")[0].strip(
                ).lower() not in sender.content_types:
            return refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported Content-Type")
        data = decode(body)
        if isinstance(data, Response):
            return data
        try:
            events = sender.parse(data, request.headers)
        except TooMany as error:
            return refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{error} lists over {MAX_PUSHED} items")
        except PayloadError as error:
            return refusal(HTTPStatus.BAD_REQUEST, f"missing or invalid field: {error}")
        except Ignored as reason:
            return Response(HTTPStatus.OK, {"status": reason.status, "reason": str(reason)})
        return self.enqueue(sender, events)

    def enqueue(self, sender: Sender, events: List[PushEvent]) -> Response:
        """Owner check, service mapping and queueing for validated events."""
        allowed = [e for e in events if owner_allowed(self.config.owners, e.image)]
        if not allowed:
            if sender.foreign_owner_ignored:
                return Response(HTTPStatus.OK, {"status": "ignored", "reason": "namespace not in OWNER"})
            return FOREIGN_OWNER
        submitted = self.submit_all(sender, allowed)
        if submitted is None:
            return refusal(HTTPStatus.SERVICE_UNAVAILABLE, "deployment queue is full or gopdater is stopping")
        if not submitted:
            reason = "; ".join(dict.fromkeys((self.desk or self.queue.target).why_ignored(e.image) for e in allowed))
            return Response(HTTPStatus.OK, {"status": "ignored", "reason": reason[:REASON_MAX]})
        return Response(HTTPStatus.ACCEPTED, accepted(submitted))

    def submit_all(self, sender: Sender, events: Sequence[PushEvent]) -> Optional[list]:
        """Queue each event's deployments, logging each; None if the queue takes no more."""
        submitted = []
        for event in events:
            taken = self.queue.submit(event)
            if taken is None:
                return None
            for deployment, coalesced in taken:
                log.info("hook accepted sender=%s image=%s deployment=%s service=%s coalesced=%s", sender.name,
                         event.image, deployment.id, deployment.ref, "yes" if coalesced else "no")
            submitted += taken
        return submitted

    def needs_target(self, request: Request) -> bool:
        """Only /healthz is answered before start-up discovery is done."""
        return request.endpoint != "/healthz"

    def healthz(self, request: Request) -> Response:
        if self.queue is not None and not self.queue.working and not self.queue.stopping:
            return refusal(HTTPStatus.SERVICE_UNAVAILABLE, "no worker runs deployments")
        return Response(HTTPStatus.OK, {"status": "ok"})

    def deployments(self, request: Request) -> Response:
        if not bearer(self.secret, "", request.headers, b""):
            return FORBIDDEN
        return Response(HTTPStatus.OK, {"deployments": self.queue.views()})

    def metrics_text(self, request: Request) -> Response:
        if not bearer(self.secret, "", request.headers, b""):
            return FORBIDDEN
        return Response(HTTPStatus.OK, self.metrics.render(self.queue.queued() if self.queue else 0,
                                                           self.reconciler.report if self.reconciler else None))

    def reconcile(self, request: Request) -> Response:
        """POST /reconcile (Bearer, checked from the head): a round now; 202 with the tags it will ask."""
        if self.reconciler is None:
            return refusal(HTTPStatus.SERVICE_UNAVAILABLE, "gopdater is starting")
        asks = self.reconciler.asks()
        self.reconciler.ask_now()
        log.info("reconcile asked for by POST /reconcile: %d tags", len(asks))
        return Response(HTTPStatus.ACCEPTED, {"status": "accepted", "asks": asks})

    def status_page(self, request: Request) -> Response:
        """The status page, for a browser: HTTP Basic (the secret as the password) or the Bearer token."""
        if not (basic(self.secret, request.headers) or bearer(self.secret, "", request.headers, b"")):
            return UNAUTHORIZED
        report = self.reconciler.report if self.reconciler else None
        controls = Controls(lambda action, target: form_token(self.secret, action, target, int(self.clock())),
                            self.desk.holds(), self.desk.kept()) if self.desk else None
        return Response(HTTPStatus.OK, Html(status_page(self.queue.target.running(), self.queue.views(),
                                                         datetime.now(timezone.utc), report, controls)), PAGE_HEADERS)


def form_answer(app: App, request: Request, form: Optional[Dict[str, str]], action: Action, named: str
                ) -> Optional[Response]:
    """The answer before the desk acts, if there is one: 403 from another site or without the form's token, a
    rollback's confirmation page, 503 while starting; else None."""
    foreign = foreign_origin(request.headers, app.config.public_url)
    if foreign:
        return refusal(HTTPStatus.FORBIDDEN, f"forbidden: {foreign}")
    if form is not None and not token_holds(app.secret, form.get("token", ""), action.value, named, app.clock()):
        return refusal(HTTPStatus.FORBIDDEN, "forbidden: the form's token is missing, stale or for another action")
    if form is not None and action is Action.ROLLBACK and form.get("confirm") != "yes":
        token = form_token(app.secret, action.value, named, int(app.clock()))
        return Response(HTTPStatus.OK, Html(confirm_page(named, token)), PAGE_HEADERS)
    return refusal(HTTPStatus.SERVICE_UNAVAILABLE, "gopdater is starting") if app.desk is None else None


def operator_action(app: App, request: Request, body: bytes) -> Response:
    """POST /services/<project>/<service>/<action> or /deployments/<id>/<action>: the desk's answer, as JSON to the
    Bearer token; to the page's forms (Basic), each checked for its token first, a 303 back to /status."""
    parsed = parse_action(request.endpoint, request.captured)
    if parsed is None:
        return NOT_FOUND
    action, target = parsed
    form = None if bearer(app.secret, "", request.headers, b"") else form_fields(request.headers, body) or {}
    named = "/".join(filter(None, target))
    answered = form_answer(app, request, form, action, named)
    if answered is not None:
        return answered
    acted = app.desk.on_deployment(target[0], action) if action in DEPLOYMENT_ACTIONS else app.desk.on_service(
        target[0], target[1], action)
    log.info("operator action=%s target=%s by=%s: %s %s", action.value, named, "form" if form is not None else
             "token", int(acted.status), acted.reason)
    if form is not None and acted.status < 400:
        return Response(HTTPStatus.SEE_OTHER, {"status": "ok", "reason": acted.reason}, (("Location", "/status"),))
    return Response(acted.status, {"status": ACTED_WORDS.get(acted.status, "error"), "reason": acted.reason,
                                   **({"id": acted.deployment} if acted.deployment else {})})


ACTED_WORDS = {HTTPStatus.OK: "ok", HTTPStatus.ACCEPTED: "accepted"}  # any other status: "error"


UNAUTHORIZED = refusal(HTTPStatus.UNAUTHORIZED, "unauthorized", (("WWW-Authenticate", 'Basic realm="gopdater"'),))
PAGE_HEADERS = (("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"),
                ("X-Frame-Options", "DENY"), ("Referrer-Policy", "same-origin"))  # no-referrer makes a form post say Origin: null
GET_ENDPOINTS: Dict[str, Callable[[App, Request], Response]] = {
    "/healthz": App.healthz, "/deployments": App.deployments, "/metrics": App.metrics_text,
    "/status": App.status_page}
POST_ENDPOINTS: Dict[str, Callable[[App, Request], Response]] = {"/reconcile": App.reconcile}  # Bearer, from the head
ACTION_ENDPOINTS: Dict[str, Callable[[App, Request, bytes], Response]] = {  # Bearer, or Basic and a form's token
    SERVICE_ACTION: operator_action, DEPLOYMENT_ACTION: operator_action}
ENDPOINTS = {**GET_ENDPOINTS, **POST_ENDPOINTS}
POSTED = frozenset({*POST_ENDPOINTS, *ACTION_ENDPOINTS})  # credentials checked from the head
ACTION_BODY_MAX = {endpoint: FORM_MAX_BYTES for endpoint in ACTION_ENDPOINTS}
ACTION_TOO_LARGE = refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "an action's body is over 4 KiB")


# ==========================================================================================
# The work queue: PARALLEL deployments at once, one per lane, bursts coalesced, the last 50 kept
# ==========================================================================================

MAX_QUEUED_DEPLOYMENTS = 50
LOOK_SECONDS = 10.0  # at most one look for new projects per this, and this long after a hook that matched


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- deployments, as /deployments shows them ---------------------------------------------------


class Deployment:
    """One requested update of one service, or of several of one Compose project (refs, in the order they are
    switched), as shown in the deployments view."""

    FIELDS = ("id", "sender", "digest", "state", "hooks", "created", "started", "finished", "steps", "error", "logs",
              "old_tag", "new_tag")

    def __init__(self, id: str, sender: str, key: ImageKey, digest: Optional[str], ref: ServiceRef):
        self.id, self.sender, self.key, self.digest, self.ref = id, sender, key, digest, ref
        self.state, self.hooks, self.created = State.QUEUED, 1, _now()
        self.recovery: Optional["Record"] = None  # the journal record of an update a crash cut off
        self.lane: Hashable = ref  # what it must not run beside (its Compose project): Target.lane()
        self.refs: Tuple[ServiceRef, ...] = (ref,)  # every service it updates, ref first
        self.members: Dict[str, Outcome] = {}  # service: how its part ended (a deployment of several)
        self.started: Optional[str] = None
        self.finished: Optional[str] = None
        self.steps: List[Step] = []
        self.error: Optional[str] = None
        self.logs: List[str] = []
        self.old_tag: Optional[str] = None  # a tracked service's move (gopdater.track), once known
        self.new_tag: Optional[str] = None
        self.action = Action.UPDATE  # or ROLLBACK, HOLD, RESUME: what an operator asked for
        self.previous: Dict[str, Previous] = {}  # service: what an operator's rollback takes it back to
        self.gate = Gate()  # what it waits for (State.WAITING), and whether gates apply to it at all
        self.approved: Optional[str] = None  # when an operator approved it

    def view(self) -> dict:
        """The JSON shape of /deployments."""
        fields = {name: getattr(self, name) for name in self.FIELDS}
        fields.update(state=self.state.value, logs=list(self.logs), steps=[step_view(step) for step in self.steps])
        return {"image": f"{self.key.registry}/{self.key.repository}", "tag": self.key.tag, "kind": self.ref.kind,
                "project": self.ref.project or None, "service": self.ref.name, "trigger": trigger(self.sender),
                "action": self.action.value, "approved": self.approved, **fields,
                "services": [self.member_view(ref.name) for ref in self.refs],
                **({"waiting": self.gate.view()} if self.state is State.WAITING else {})}

    def member_view(self, service: str) -> dict:
        """One service of the deployment: its result and images once its part ended, and its own steps."""
        outcome = self.members.get(service)
        mine = [step_view(step) for step in self.steps if step.service in ("", service)] if len(self.refs) > 1 \
            else [step_view(step) for step in self.steps]
        return {"service": service, "result": outcome.result.value if outcome else None,
                "old_image": outcome and outcome.old_image, "new_image": outcome and outcome.new_image,
                "old_tag": outcome and outcome.old_tag, "new_tag": outcome and outcome.new_tag, "steps": mine}


def step_view(step: Step) -> dict:
    """A step as /deployments shows it (its service only in a deployment of several)."""
    return {"step": step.step, "result": step.result, "seconds": step.seconds,
            **({"service": step.service} if step.service else {})}


TRIGGERS = {"recovery": "recovery", "reconcile": "reconcile", "operator": "operator"}  # any other sender: push


def trigger(sender: str) -> str:
    """What started a deployment: a push (a hook), reconcile (the registry asked), or recovery (at start)."""
    return TRIGGERS.get(sender, "push")


def waiting_entry(deployment: Deployment) -> Waiting:
    """A waiting deployment as operator.json keeps it."""
    ref, gate = deployment.ref, deployment.gate
    return Waiting(deployment.id, deployment.sender, str(deployment.key), deployment.digest, ref.kind, ref.project,
                   tuple(r.name for r in deployment.refs), deployment.created, deployment.approved,
                   gate.approval.isoformat(timespec="seconds") if gate.approval else None)


def waiting_entries(queued: Iterable[Deployment]) -> List[Waiting]:
    """The deployments of these that wait, as operator.json keeps them."""
    return [waiting_entry(d) for d in queued if d.state is State.WAITING]


class Submitted(NamedTuple):
    """What became of one pushed image for one service: the deployment it queued or joined."""

    deployment: Deployment
    coalesced: bool


# -- the queue: lanes, bursts coalesced, the engine waited for ---------------------------------

Tell = Callable[[Deployment, Outcome, float], None]  # told of each deployment as it ends, with its seconds


def joined_by(queued: Deployment, event: PushEvent) -> Deployment:
    """A queued deployment another push of its service joins (the lock held): one more hook, the newest digest,
    and for a tracked service's burst of versions, the newest tag."""
    queued.hooks += 1
    queued.digest = event.digest or queued.digest
    if queued.key[:2] == event.image[:2]:
        queued.key = queued.key._replace(tag=newer_tag(queued.key.tag, event.image.tag))
    return queued


def by_lane(lane: Callable[[ServiceRef], Hashable], refs: Sequence[ServiceRef]) -> Dict[Hashable, List[ServiceRef]]:
    """The services grouped by their lane (Target.lane): one deployment each."""
    lanes: Dict[Hashable, List[ServiceRef]] = {}
    for ref in refs:
        lanes.setdefault(lane(ref), []).append(ref)
    return lanes


def count_deployment(metrics: Metrics, deployment: Deployment, outcome: Outcome, seconds: float) -> None:
    """/metrics: each service of a deployment with how its part ended, its own steps and tag move."""
    for ref in deployment.refs:
        ended = deployment.members.get(ref.name, outcome) if len(deployment.refs) > 1 else outcome
        own = [step for step in deployment.steps if step.service in ("", ref.name)]
        tags = (ended.old_tag, ended.new_tag) if ended.new_tag else None
        metrics.deployed(str(ref), ended.result, seconds, own, tags)


class QueueSeams(NamedTuple):
    """What a work queue reaches the world through: main passes the real ones, tests recording fakes."""

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    tell: Tell = lambda deployment, outcome, seconds: None  # notifications: see notifying()
    metrics: Optional[Metrics] = None  # a new one if None
    journal: Optional["Journal"] = None  # None: nothing is journalled (a test's, or --check's queue)
    now: Callable[[], datetime] = datetime.now  # local time: update windows, approval timeouts


def end_waiting_locked(queue: WorkQueue, deployment: Deployment, state: State, reason: str) -> None:
    """A deployment ends before it ran (expired, rejected): told, kept in the history (the queue's lock held)."""
    queue.queue.remove(deployment)
    deployment.state, deployment.finished, deployment.error = state, _now(), reason
    log.warning("deployment=%s %s service=%s: %s", deployment.id, state.value, deployment.ref, reason)
    queue.gates.save(waiting_entries(queue.queue))
    queue.keep_history()
    queue.tell(deployment, Outcome(state, reason=reason), 0.0)


def requeue_locked(queue: WorkQueue, entry: Waiting) -> None:
    """Queue again a deployment that waited when gopdater stopped, if it still names what a push of its image would
    update here; its gate judged again (a window or APPROVE changed since applies), its approval kept."""
    key, target = parse_reference(entry.reference), queue.target
    refs = [ref for ref in (ServiceRef(entry.kind, entry.project, name) for name in entry.services)
            if ref in target.services_for(key)]
    if not refs:
        log.warning("deployment=%s waited for %s, which no longer runs it: dropped", entry.id, entry.reference)
        return
    deployment = queue.queued_new(PushEvent(entry.sender, key, entry.digest), target.lane(refs[0]), target.order(refs))
    deployment.id, deployment.created, deployment.approved = entry.id, entry.created, entry.approved
    running = {service.ref: service for service in target.running()}
    expires = datetime.fromisoformat(entry.expires).replace(tzinfo=None) if entry.expires else None
    deployment.gate = queue.gates.gate_for([running[ref] for ref in refs], bool(entry.approved), expires)
    deployment.state = State.QUEUED if deployment.gate.ready(queue.gates.now()) else State.WAITING
    log.info("deployment=%s of service=%s %s again after the restart", deployment.id, deployment.ref,
             deployment.state.value)


class WorkQueue:
    """Runs deployments in worker threads (run_forever, one per PARALLEL), at most one per lane: two of one
    Compose project never race. A re-read skips the lanes in flight and holds back new deployments while it
    runs. Knows targets only through Target."""

    def __init__(self, config: Config, target: "Target", seams: Optional[QueueSeams] = None):
        seams = seams or QueueSeams()
        self.config, self.target, self.clock, self.sleep = config, target, seams.clock, seams.sleep
        self.tell, self.metrics, self.journal = seams.tell, seams.metrics or Metrics(), seams.journal
        self.gates = Gates(config, seams.now, self.journal and self.journal.directory)
        self.lock = threading.Condition()
        self.saving = threading.Lock()  # one history.json write at a time, each of the newest views
        self.queue: collections.deque = collections.deque()
        self.history: collections.deque = collections.deque(maxlen=HISTORY_SIZE)
        self.in_flight: Dict[Hashable, Deployment] = {}  # lane: the deployment running in it
        self.refreshing = False  # a re-read of the targets runs: no deployment starts meanwhile
        self.refresh_scope: Tuple[FrozenSet[Hashable], bool] = (frozenset(), True)  # (lanes it skips, full)
        self.workers = 0  # worker threads in run_forever: /healthz says 503 while none runs
        self.stopping = False
        self.refresh_due: Optional[float] = None
        self.last_refresh = self.last_full_refresh = self.clock()

    @property
    def busy(self) -> bool:
        """Whether a job (a deployment, or a re-read of the targets) is running."""
        return bool(self.in_flight) or self.refreshing

    @property
    def working(self) -> bool:
        """Whether a worker thread takes jobs."""
        return self.workers > 0

    # -- the request side: map and enqueue, nothing slower ------------------------------------

    def submit(self, event: PushEvent, only: Optional[FrozenSet[ServiceRef]] = None, gated: bool = True
               ) -> Optional[List[Submitted]]:
        """Queue one deployment per lane (a Compose project, a Swarm service) for the services that run the image
        (of those named in only, if given; held ones left out when gated), or join one queued or waiting there for
        that image; each gated by its window and approval unless not gated (an operator's update now); [] if none
        runs it, None if the queue is full or stopping."""
        held = self.gates.holds if gated else {}
        refs = [ref for ref in self.target.services_for(event.image) if ref not in held]
        refs = refs if only is None else [ref for ref in refs if ref in only]
        submitted = []
        with self.lock:
            self.refresh_soon(matched=bool(refs))
            for lane, group in by_lane(self.target.lane, refs).items():
                queued = next((d for d in self.queue if d.lane == lane and d.key[:2] == event.image[:2] and
                               d.action is Action.UPDATE), None)
                if queued is not None:
                    queued.refs = tuple(self.target.order({*queued.refs, *group}))
                    queued.ref = queued.refs[0]
                    submitted.append(Submitted(self.gated_locked(joined_by(queued, event), gated), True))
                    continue
                if len(self.queue) >= MAX_QUEUED_DEPLOYMENTS or self.stopping:
                    return None
                new = self.queued_new(event, lane, self.target.order(group))
                submitted.append(Submitted(self.gated_locked(new, gated), False))
            self.lock.notify_all()
        return submitted

    def gated_locked(self, deployment: Deployment, gated: bool) -> Deployment:
        """Give a new (or newly joined) deployment its gate: waiting, told and kept if it must (the lock held)."""
        waited = deployment.state is State.WAITING
        gated = gated and deployment.gate.applies
        running = {service.ref: service for service in self.target.running()} if gated else {}
        deployment.gate = self.gates.gate_for([running[r] for r in deployment.refs if r in running]) if gated else \
            Gate(applies=False)
        deployment.approved = None  # a new image: approved again, if approval is asked
        deployment.state = State.QUEUED if deployment.gate.ready(self.gates.now()) else State.WAITING
        waits = deployment.state is State.WAITING
        if waits and not waited:
            self.tell(deployment, Outcome(State.WAITING, reason=waiting_words(deployment.gate, self.config)), 0.0)
        if waited or waits:  # operator.json is written only when the gates are in use
            self.gates.save(waiting_entries(self.queue))
        return deployment

    def queued_new(self, event: PushEvent, lane: Hashable, refs: Sequence[ServiceRef]) -> Deployment:
        """A new deployment of these services (one lane), queued and in the history (the lock held)."""
        deployment = Deployment(os.urandom(6).hex(), event.sender, event.image, event.digest, refs[0])
        deployment.lane, deployment.refs = lane, tuple(refs)
        self.queue.append(deployment)
        self.history.append(deployment)
        return deployment

    def refresh_soon(self, matched: bool = False) -> None:
        """An authentic hook came: look for what changed within 10 s (at most one extra look per 10 s), at once
        if it matched nothing, else after the deployments it queued have started."""
        due = max(self.clock() + (LOOK_SECONDS if matched else 0),
                  self.last_refresh + LOOK_SECONDS)
        if self.refresh_due is None or due < self.refresh_due:
            self.refresh_due = due
            self.lock.notify_all()

    def views(self) -> List[dict]:
        with self.lock:
            now = self.gates.now()
            for deployment in self.queue:
                if deployment.state is State.WAITING:
                    deployment.gate = deployment.gate.judged(now)
            return [d.view() for d in reversed(self.history)]

    def expire_locked(self) -> None:
        """End the deployments that waited APPROVE_TIMEOUT for approval (expired), told and kept (the lock held)."""
        now = self.gates.now()
        for deployment in [d for d in self.queue if d.gate.approval is not None and d.gate.approval <= now]:
            end_waiting_locked(self, deployment, State.EXPIRED, f"not approved within {self.config.approve_timeout:g}s")


    def restore(self) -> int:
        """Show the stored history, and queue a recovery, first, for each update a crash cut off."""
        if self.journal is None:
            return 0
        unfinished, history = self.journal.load()
        waiting = self.gates.load()
        with self.lock:
            for entry in waiting:
                requeue_locked(self, entry)
            requeued = [self.history.popleft() for _ in range(len(self.history))]
            # One that waited but is not queued again (it no longer names what runs here) ended with the stop.
            self.history.extend(Past({**past, "state": State.CANCELLED.value}) if past.get("state") == "waiting"
                                else past for past in history if past.get("id") not in {d.id for d in requeued})
            self.history.extend(requeued)
            for record in unfinished:
                ref = ServiceRef(record.kind, record.project, record.service)
                deployment = Deployment(os.urandom(6).hex(), "recovery", parse_reference(record.reference), None, ref)
                deployment.recovery, deployment.lane = record, self.target.lane(ref)
                deployment.gate = Gate(applies=False)  # a crash is repaired at once: no window, no approval
                deployment.refs = tuple(ServiceRef(record.kind, record.project, name)
                                        for name in getattr(record.part, "services", ()) or (record.service,))
                self.queue.appendleft(deployment)
                self.history.append(deployment)
                log.warning("deployment=%s recovery of service=%s, cut off at step=%s by deployment=%s",
                            deployment.id, ref, record.stage.value, record.deployment)
            self.lock.notify_all()
        return len(unfinished)

    def queued(self) -> int:
        with self.lock:
            return len(self.queue) + len(self.in_flight)

    def pending(self) -> FrozenSet[ServiceRef]:
        """The services with a deployment queued or running."""
        with self.lock:
            return frozenset(ref for d in (*self.queue, *self.in_flight.values()) for ref in d.refs)

    # -- the workers --------------------------------------------------------------------------

    def claim_locked(self) -> Optional[Deployment]:
        """Take the first queued deployment whose lane is free, while fewer than PARALLEL run; or None."""
        if self.refreshing or len(self.in_flight) >= self.config.parallel:
            return None
        now = self.gates.now()
        deployment = next((d for d in self.queue if d.lane not in self.in_flight and d.gate.ready(now)), None)
        if deployment is not None:
            self.queue.remove(deployment)
            self.in_flight[deployment.lane] = deployment
            if deployment.state is State.WAITING:
                deployment.state = State.QUEUED
                self.gates.save(waiting_entries(self.queue))
        return deployment

    def refresh_wait_locked(self) -> float:
        """Seconds until a re-read is due (REFRESH_INTERVAL, or sooner after a hook)."""
        due = min(self.refresh_due or float("inf"), self.last_full_refresh + self.config.refresh_interval)
        return due - self.clock()

    def claim_refresh_locked(self) -> bool:
        """Take a due re-read: of everything every REFRESH_INTERVAL, else of what is new; either way leaving
        alone the lanes deployments run in, and holding back new deployments while it runs."""
        if self.refreshing or self.refresh_wait_locked() > 0:
            return False
        full = self.clock() >= self.last_full_refresh + self.config.refresh_interval
        self.refreshing, self.refresh_due = True, None
        self.refresh_scope = (frozenset(self.in_flight), full)
        return True

    def next_job(self) -> Tuple[bool, Optional[Deployment]]:
        """Wait for a due re-read, or a deployment it may run: (stop, the deployment, or None for the re-read)."""
        with self.lock:
            while not self.stopping:
                self.expire_locked()
                if self.claim_refresh_locked():
                    return False, None
                deployment = self.claim_locked()
                if deployment is not None:
                    return False, deployment
                wait = self.refresh_wait_locked()
                self.lock.wait(timeout=min(wait, 1.0) if wait > 0 else 1.0)  # a job's end notifies
            return True, None

    def run_forever(self) -> None:
        """One worker: take jobs until stopped. Start PARALLEL of them for PARALLEL deployments at once."""
        with self.lock:
            self.workers += 1
        try:
            while True:
                stop, deployment = self.next_job()
                if stop:
                    return
                self.run(deployment)
        finally:
            with self.lock:
                self.workers -= 1

    def run_next(self) -> Optional[Deployment]:
        """Run the next queued deployment it may run in this thread, as a worker would; None if there is none."""
        with self.lock:
            deployment = self.claim_locked()
        if deployment is not None:
            self.run(deployment)
        return deployment

    def run(self, deployment: Optional[Deployment]) -> None:
        """Run one job a worker claimed: a deployment, or (None) a re-read of every target."""
        try:
            if deployment is None:
                self.refresh(*self.refresh_scope)
            else:
                self.execute(deployment)
        finally:
            with self.lock:
                if deployment is None:
                    self.refreshing, self.last_refresh = False, self.clock()
                    if self.refresh_scope[1]:
                        self.last_full_refresh = self.last_refresh
                else:
                    self.in_flight.pop(deployment.lane, None)
                self.lock.notify_all()

    def refresh(self, busy: FrozenSet[Hashable] = frozenset(), full: bool = True) -> None:
        """Re-read the targets but the busy lanes (full: everything, else what changed); never raises."""
        self.guarded(lambda: self.target.refresh(busy, full))

    def refresh_around(self, ref: ServiceRef) -> None:
        """Re-read only what a deployment of ref touched; never raises."""
        self.guarded(lambda: self.target.refresh_around(ref))

    @staticmethod
    def guarded(read: Callable[[], None]) -> None:
        try:
            read()
        except Exception as error:  # a bug or a docker hiccup must not kill the worker
            log.warning("could not re-read what runs here: %s", error)

    def stop(self, timeout: float) -> bool:
        """Stop taking work, cancel queued deployments (those waiting wait on in STATE_DIR), wait (bounded) for the
        running ones; True if idle."""
        with self.lock:
            self.stopping = True
            for deployment in (d for d in self.queue if d.state is not State.WAITING):
                deployment.state, deployment.finished = State.CANCELLED, _now()
                log.warning("deployment=%s cancelled by shutdown service=%s", deployment.id, deployment.ref)
            self.queue.clear()
            self.lock.notify_all()
        idle = self.wait_idle(timeout)
        self.keep_history()
        return idle

    def keep_history(self) -> None:
        if self.journal is not None:
            with self.saving:
                self.journal.save_history(list(reversed(self.views())))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued to run or running (a re-read included; those waiting for their window or
        approval do not count); True if that happened within timeout."""
        end = time.monotonic() + timeout
        idle = lambda: not self.busy and all(d.state is State.WAITING for d in self.queue)  # noqa: E731
        with self.lock:
            while not idle() and time.monotonic() < end:
                self.lock.wait(timeout=min(1.0, max(0.0, end - time.monotonic())))
            return idle()

    def execute(self, deployment: Deployment) -> None:
        """Update the deployment's service through its target; record, count and report the outcome."""
        with self.lock:
            deployment.state, deployment.started = State.RUNNING, _now()
        log.info("deployment=%s start image=%s service=%s hooks=%s", deployment.id, deployment.key,
                 deployment.ref, deployment.hooks)
        steps = StepLog(deployment, self.lock, self.clock, self.sleep, self.journal)
        started = self.clock()
        outcome = run_target(self, deployment, steps)
        if not outcome.resume and self.journal is not None:
            self.journal.close(steps.key)
        if outcome.result is State.ROLLED_BACK and outcome.new_image and self.journal is not None:
            self.journal.remember_failure(steps.key, outcome.new_image)
        with self.lock:
            deployment.state, deployment.finished = outcome.result, _now()
            deployment.old_tag, deployment.new_tag = outcome.old_tag, outcome.new_tag
            if outcome.reason and outcome.result in (State.FAILED, State.ROLLED_BACK, State.SKIPPED):
                deployment.error = outcome.reason[:REASON_MAX]
        seconds = steps.record(DONE, outcome.result.value, started)
        count_deployment(self.metrics, deployment, outcome, seconds)
        self.keep_history()
        self.tell(deployment, outcome, seconds)
        if outcome.result in CHANGED:
            for ref in deployment.refs:
                self.refresh_around(ref)
        log.info("deployment=%s end state=%s", deployment.id, deployment.state.value)

# -- what the queue updates: the Target interface, and the one matcher -------------------------


class Target:
    """What the work queue updates. The queue, the HTTP side and --check know targets only through this.

    A new kind of target (plain `docker run` containers, say) is one subclass and one row, with no edit of the
    queue or the journal. The subclass: a `kind` name; running(), owns(), update(), recover(), engine_answers(),
    refresh(), describe() and summary() (lane() and refresh_around() where the defaults do not fit); update()
    opens the journal with steps.begin(<one of its procedures>) and journals each stage with steps.step(), and
    recover() does what plan() returns. The row: RECORD_KINDS[kind] = RecordKind(its part of a journal record,
    a NamedTuple with CHECKS and from_stored; its recovery rows, (procedure, stage) -> (action if running, if
    not); the procedure of a record without one). A part may name the services of its record (`services`), for
    the view of their recovery. Start-up makes it from a TARGET_KINDS row (main section).
    """

    kind = ""
    runner: Runner  # what runs its commands (a DryRunner for DRY_RUN)

    def __init__(self, config: Config, engine: str):
        self.config, self.engine_version = config, engine

    @property
    def dry(self) -> bool:
        """Whether commands that change something are only logged (DRY_RUN)."""
        return getattr(self.runner, "dry", False)

    def running(self) -> List[Running]:
        """Every service this target could update, as last read."""
        raise NotImplementedError

    def services_for(self, image: ImageKey) -> List[ServiceRef]:
        """The services that a push of this image and tag updates."""
        return [s.ref for s in self.running() if push_verdict(self.config, s, image) is None]

    def why_ignored(self, image: ImageKey) -> str:
        """Why a push updates nothing: what each service tracking that image said, else that none runs it."""
        said = [f"{s.ref}: {push_verdict(self.config, s, image)}" for s in self.running()
                if s.tracking is not None and s.image is not None and s.image[:2] == image[:2]]
        return "; ".join(said) or "no service runs this image and tag"

    def owns(self, ref: ServiceRef) -> bool:
        """Whether this target updates that service."""
        raise NotImplementedError

    def update(self, ref: ServiceRef, digest: Optional[str], steps: StepLog) -> Outcome:
        """Update one service to the pushed image, safely; report steps through steps. Raises only
        EngineUnreachable (the queue waits for the engine), or OSError if the journal cannot be opened."""
        raise NotImplementedError

    def recover(self, ref: ServiceRef, record: Record, steps: StepLog) -> Outcome:
        """Make a service whole after its update was cut off (a crash, the engine gone), as plan() says."""
        raise NotImplementedError

    def engine_answers(self) -> bool:
        """Whether the engine behind this target answers."""
        raise NotImplementedError

    def refresh(self, busy: FrozenSet[Hashable] = frozenset(), full: bool = True) -> None:
        """Re-read what runs here, leaving alone what runs in the busy lanes (a deployment in flight); full:
        everything, else at least what is new. CommandError or ValueError if it cannot be read."""
        raise NotImplementedError

    def refresh_around(self, ref: ServiceRef) -> None:
        """Re-read what an update of ref may have changed (by default everything), as refresh() does."""
        self.refresh()

    def lane(self, ref: ServiceRef) -> Hashable:
        """What an update of ref must not run beside (by default the service itself)."""
        return ref

    def order(self, refs: Iterable[ServiceRef]) -> List[ServiceRef]:
        """Services of one lane in the order one deployment switches them (by default by name)."""
        return sorted(refs)

    def rolls_back(self, ref: ServiceRef) -> bool:
        """Whether an operator's rollback (a deployment whose action is ROLLBACK) is one this target carries out."""
        return False

    def describe(self) -> List[Finding]:
        """What this target is and what would update, one finding per line (for --check)."""
        raise NotImplementedError

    def summary(self) -> str:
        """What this target is, in one line (for the start-up log)."""
        raise NotImplementedError

    def service_findings(self, label: str) -> List[Finding]:
        """One line per service: the pushes that update it, or why none does."""
        found = []
        for service in self.running():
            keys, why = triggers(self.config, service)
            found.append((True, f"{label} {service.ref}: " + (
                f"updates on a push of {pushes(service, keys)}" if keys else f"{why}, never updated")))
        return found


class StepLog:
    """What an update target reports through: timed steps, log lines, its clock, and its journal record."""

    def __init__(self, deployment: Deployment, lock: threading.Condition, clock: Callable[[], float],
                 sleep: Callable[[float], None], journal: Optional[Journal] = None):
        self.deployment, self.lock = deployment, lock
        self.clock, self.sleep, self.journal = clock, sleep, journal
        self.label = f"deployment={deployment.id} service={deployment.ref}"
        self.service = ""  # in a deployment of several services, the one its steps are about now
        self.key = f"{deployment.ref.kind}:{deployment.ref}"

    def begin(self, procedure: enum.Enum) -> None:
        """Open the journal record before any command; OSError if it cannot be written."""
        if self.journal is not None:
            ref = self.deployment.ref
            self.journal.open(self.key, Record(ref.kind, ref.project, ref.name, self.deployment.id,
                                               str(self.deployment.key), procedure.value, Stage.START, _now(),
                                               part=RECORD_KINDS[ref.kind].part()))

    def failed_before(self, image: Optional[str]) -> bool:
        """Whether this image was rolled back for this service before: a replay must not try it again."""
        return self.journal is not None and self.journal.failed_before(self.key, image)

    def needed_by_another(self, image_id: str) -> bool:
        """Whether an update of another service in flight (PARALLEL) runs or may roll back to this image, or another
        service keeps it for an operator's rollback."""
        return self.journal is not None and (self.journal.needed_by_another(self.key, image_id) or
                                             self.journal.kept_elsewhere(self.key_of(self.service), image_id))

    def key_of(self, service: str) -> str:
        """The journal's key of one service of this deployment ("" for its first)."""
        ref = self.deployment.ref
        return f"{ref.kind}:{ServiceRef(ref.kind, ref.project, service or ref.name)}"

    def keep_previous(self, service: str, previous: Optional[Previous]) -> Optional[Previous]:
        """Keep the image the service ran before this update, for an operator's rollback; the one kept before."""
        return self.journal.keep(self.key_of(service), previous) if self.journal is not None else None

    def record_now(self) -> Optional[Record]:
        """The journal record as it stands, if there is one."""
        return self.journal.record(self.key) if self.journal is not None else None

    def remember(self, **fields: object) -> None:
        """Add what recovery would need (image ids, the image reference, the procedure) to the journal record."""
        if self.journal is not None:
            try:
                self.journal.mark(self.key, **fields)
            except OSError as error:  # mid-update, going on beats stopping with the service down
                log.warning("%s could not write the journal: %s", self.label, error.strerror)

    def record(self, step: str, result: str, started: float) -> float:
        """Log one step that began at started and keep its timing in the deployment; return its seconds."""
        return self.note(step, result, self.clock() - started)

    def note(self, step: str, result: str, seconds: float) -> float:
        """Log one step of the given length and keep it in the deployment."""
        seconds = round(seconds, 3)
        with self.lock:
            self.deployment.steps.append(Step(step, result, seconds, self.service))
        quiet = result in (STEP_OK, STEP_KEPT, RECREATED, RESTARTED, State.UPDATED, State.UP_TO_DATE, State.DRY_RUN)
        log.log(logging.INFO if quiet else logging.WARNING, "%s step=%s result=%s seconds=%.2f", self.label,
                step, result, seconds)
        return seconds

    def member(self, service: str, outcome: Outcome) -> None:
        """How one service of a deployment of several ended, for the view."""
        with self.lock:
            self.deployment.members[service] = outcome

    def step(self, stage: Stage, action: Callable[[], object]):
        """Run one stage, journalled first, and timed; a CommandError becomes DeployFailed naming it."""
        record = self.record_now()
        if record is not None and (record.procedure, stage) not in RECORD_KINDS[record.kind].recovery:
            raise ValueError(f"{stage.value} is not a stage of {record.procedure}: add its recovery row")
        self.remember(stage=stage)
        return self.look(stage.value, action)

    def look(self, name: str, action: Callable[[], object]):
        """Run one step, timed but not journalled: a read-only look must not overwrite where an update stands."""
        started = self.clock()
        try:
            value = action()
        except EngineUnreachable:
            self.record(name, STEP_FAILED, started)
            raise
        except CommandError as error:
            self.record(name, STEP_FAILED, started)
            raise DeployFailed(f"{name} failed: {error}") from None
        self.record(name, STEP_OK, started)
        return value

    def command_output(self, name: str, lines: Sequence[str]) -> None:
        """Keep the last lines a release step printed, each cut, in the log and in the deployment (never run or
        parsed)."""
        for line in (line[:LINE_MAX] for line in lines[-LOG_TAIL_LINES:]):
            log.info("%s %s printed: %r", self.label, name, line)
            with self.lock:
                self.deployment.logs.append(f"{name}: {line}")

    def container_log(self, container: str, lines: Sequence[str]) -> None:
        """Keep a failing container's last lines, each cut, in the log and in the deployment."""
        for line in (line[:LINE_MAX] for line in lines[-LOG_TAIL_LINES:]):
            log.warning("%s container %s logged: %r", self.label, container, line)
            with self.lock:
                self.deployment.logs.append(line)


def names(entry: str, ref: ServiceRef) -> bool:
    """Whether a SERVICES entry (SERVICE, or PROJECT/SERVICE with a Compose project or Swarm stack) names ref."""
    project, _, service = entry.rpartition("/")
    return service == ref.name and project in ("", ref.project)


def enable_label_says_no(config: Config, labels: Sequence[Mapping[str, str]]) -> Optional[str]:
    """Why the label gopdater.enable (on a service or its containers) keeps it out, or None."""
    values = {(each.get("gopdater.enable") or "").strip().lower() for each in labels}
    if "false" in values:
        return "labelled gopdater.enable=false"
    if config.label_enable and "true" not in values:
        return "not labelled gopdater.enable=true (LABEL_ENABLE=1)"
    return None


def triggers(config: Config, service: Running) -> Tuple[Tuple[ImageKey, ...], str]:
    """The pushes that update a service, or () and why none does: the opt-out label, LABEL_ENABLE,
    SERVICES and OWNER, for the pipeline, --check and the start-up log alike. Pure."""
    why = enable_label_says_no(config, service.labels) or (service.tracking and service.tracking.problem)
    if why:
        return (), why
    keys, why = wanted_keys(config, service)
    if not keys:
        return (), why
    allowed = tuple(key for key in keys if owner_allowed(config.owners, key))
    return allowed, "" if allowed else f"{keys[0]} is not in OWNER"


def wanted_keys(config: Config, service: Running) -> Tuple[Tuple[ImageKey, ...], str]:
    """The images and tags a service takes pushes of (SERVICES', else its own), or () and why none. Pure."""
    if config.services:
        keys = tuple(key for key, entry in config.services if names(entry, service.ref))
        return keys, "" if keys else "not in SERVICES"
    if service.image is None:
        return (), "no running container with a tagged image"
    return (service.image,), ""


def push_verdict(config: Config, service: Running, pushed: ImageKey) -> Optional[str]:
    """None if a push of this image and tag updates the service, else why not: the one matcher. A service
    takes its own tag; a tracked one a newer version of its image within its channel. Pure."""
    keys, why = triggers(config, service)
    if not keys:
        return why
    if service.tracking is None:
        return None if pushed in keys else "it runs another image or tag"
    if not any(key[:2] == pushed[:2] for key in keys):
        return "it runs another image"
    if service.image is None or service.image[:2] != pushed[:2]:
        return "no running container of it has a tag of this image"
    return channel_verdict(service.tracking.channel, service.image.tag, pushed.tag)


def pushes(service: Running, keys: Sequence[ImageKey]) -> str:
    """The pushes that update a service, in words (for --check and the start-up log)."""
    if service.tracking is None or service.tracking.channel is None:
        return ", ".join(map(str, keys))
    return f"a newer {service.tracking.channel.value} release of " + ", ".join(
        f"{k.registry}/{k.repository} than {k.tag}" for k in keys)


def backoff(first: float, factor: float, most: float):
    """Pauses that grow by factor from first up to most, for every poll and wait that repeats."""
    delay = first
    while True:
        yield delay
        delay = min(delay * factor, most)


# -- what a worker does with a deployment: run it through its target, end one that waited ------


def run_target(queue: WorkQueue, deployment: Deployment, steps: StepLog) -> Outcome:
    """The target's update (or recovery) of one service, journalled; never raises."""
    try:
        try:
            if deployment.recovery is not None:
                return queue.target.recover(deployment.ref, deployment.recovery, steps)
            return queue.target.update(deployment.ref, deployment.digest, steps)
        except EngineUnreachable:
            return after_engine_outage(queue, steps)
    except OSError as error:  # the journal could not be opened: nothing has run
        log.error("%s not started: the journal cannot be written (%s)", steps.label, error.strerror)
        return Outcome(reason=f"not started: the journal in STATE_DIR cannot be written ({error.strerror})")
    except Exception as error:  # a bug must not kill the worker
        log.exception("%s crashed", steps.label)
        return Outcome(reason=f"internal error ({type(error).__name__}: {error})")


def after_engine_outage(queue: WorkQueue, steps: StepLog) -> Outcome:
    """The engine stopped answering mid-update: wait for it (ENGINE_WAIT), then go on from the journal."""
    log.error("%s the Docker engine stopped answering; waiting up to %gs for it", steps.label,
              queue.config.engine_wait)
    end = queue.clock() + queue.config.engine_wait
    for delay in backoff(1.0, 2.0, 10.0):
        if queue.target.engine_answers():
            break
        if queue.clock() >= end:
            return Outcome(reason=f"the Docker engine did not answer for {queue.config.engine_wait:g}s; "
                                  "the next start recovers the service from the journal", resume=True)
        queue.sleep(delay)
    log.warning("%s the Docker engine answers again; going on from the journal", steps.label)
    record = steps.record_now()
    if record is None:
        return Outcome(reason="the Docker engine went away before the update was journalled; push again")
    try:
        return queue.target.recover(steps.deployment.ref, record, steps)
    except EngineUnreachable:
        return Outcome(reason="the Docker engine went away again; the next start recovers the service",
                       resume=True)





# -- the operator's desk: hold, resume, update now, roll back, approve, reject ----------------

NO_IMAGE = ImageKey("", "(none)", "")  # what an action on a service that runs no tagged image names


class Desk:
    """An operator's actions, each answered at once: a hold or resume takes effect now; an update now or a rollback
    is a deployment, queued; an approval lets a waiting one run, a rejection ends it. Each is logged, kept in the
    history and told, with the operator as its trigger."""

    def __init__(self, queue: WorkQueue):
        self.queue, self.gates = queue, queue.gates

    def on_service(self, project: str, name: str, action: Action) -> Acted:
        """hold, resume, update or rollback one service; 404 if none runs here by that name."""
        service = next((s for s in self.queue.target.running() if (s.ref.project, s.ref.name) == (project, name)),
                       None)
        if service is None:
            return Acted(HTTPStatus.NOT_FOUND, f"no service {project + '/' if project else ''}{name} here")
        return SERVICE_DESK[action](self, service)

    def hold(self, service: Running) -> Acted:
        with self.queue.lock:
            since = self.gates.holds.get(service.ref)
            if since is None:
                self.gates.holds[service.ref] = _now()
                self.gates.save(waiting_entries(self.queue.queue))
        if since is not None:
            return Acted(HTTPStatus.CONFLICT, f"{service.ref} is held already, since {since}")
        return self.noted(service, State.HELD, "held: pushes and reconciling leave it alone until it is resumed")

    def resume(self, service: Running) -> Acted:
        with self.queue.lock:
            since = self.gates.holds.pop(service.ref, None)
            self.gates.save(waiting_entries(self.queue.queue))
        if since is None:
            return Acted(HTTPStatus.CONFLICT, f"{service.ref} is not held")
        return self.noted(service, State.RESUMED, f"resumed (held since {since}): pushes update it again")

    def noted(self, service: Running, state: State, words: str) -> Acted:
        """An action that took effect at once: logged, kept in the history, told."""
        deployment = Deployment(os.urandom(6).hex(), "operator", service.image or NO_IMAGE, None, service.ref)
        deployment.action = Action.HOLD if state is State.HELD else Action.RESUME
        deployment.state, deployment.started = state, _now()
        deployment.finished = deployment.started
        with self.queue.lock:
            self.queue.history.append(deployment)
        log.warning("operator: service=%s %s", service.ref, words)
        self.queue.keep_history()
        self.queue.tell(deployment, Outcome(state, reason=words), 0.0)
        return Acted(HTTPStatus.OK, words, deployment.id)

    def update(self, service: Running) -> Acted:
        """Update it now to what its tag names in the registry, as a push would: held, waiting or outside its window
        or not."""
        if service.image is None:
            return Acted(HTTPStatus.CONFLICT, f"{service.ref} runs no tagged image to update")
        submitted = self.queue.submit(PushEvent("operator", service.image), frozenset({service.ref}), gated=False)
        if submitted is None:
            return Acted(HTTPStatus.SERVICE_UNAVAILABLE, "deployment queue is full or gopdater is stopping")
        if not submitted:
            return Acted(HTTPStatus.CONFLICT, self.queue.target.why_ignored(service.image)[:REASON_MAX])
        log.warning("operator: update now of service=%s: deployment=%s", service.ref, submitted[0].deployment.id)
        return Acted(HTTPStatus.ACCEPTED, "queued", submitted[0].deployment.id)

    def rollback(self, service: Running) -> Acted:
        """Back to the image it ran before its last update; 409 while a deployment of its project is queued, waits
        or runs, or when none is kept."""
        previous = self.queue.journal.previous(f"{service.ref.kind}:{service.ref}") if self.queue.journal else None
        lane = self.queue.target.lane(service.ref)
        with self.queue.lock:
            refused = self.rollback_refused_locked(service, lane, previous)
            if not refused:
                group = self.rolled_back_with(service, previous)
                deployment = self.queue.queued_new(PushEvent("operator", service.image or NO_IMAGE), lane,
                                                   self.queue.target.order(group))
                deployment.action, deployment.gate = Action.ROLLBACK, Gate(False)
                deployment.previous = {ref.name: previous for ref in group}
                self.queue.lock.notify_all()
        if refused:
            return Acted(HTTPStatus.CONFLICT, refused)
        log.warning("operator: rollback of service=%s to %s: deployment=%s", service.ref, previous.image[:19],
                    deployment.id)
        return Acted(HTTPStatus.ACCEPTED, f"rolls back to {short_id(previous.image)}", deployment.id)

    def rolled_back_with(self, service: Running, previous: Previous) -> List[ServiceRef]:
        """The services a rollback of this one takes back with it, itself first: those of its project that run its
        image and keep the same previous one (a push updated them as one group: no mixed versions)."""
        journal, lane = self.queue.journal, self.queue.target.lane(service.ref)
        return [service.ref] + [s.ref for s in self.queue.target.running() if s.ref != service.ref and
                                self.queue.target.lane(s.ref) == lane and s.image_id == service.image_id and
                                journal.previous(f"{s.ref.kind}:{s.ref}") == previous]

    def rollback_refused_locked(self, service: Running, lane: Hashable, previous: Optional[Previous]
                                ) -> Optional[str]:
        """Why a rollback makes no sense now: a deployment of the project has not ended, the target does not roll
        back, or no previous image is kept; else None."""
        busy = next((d for d in (*self.queue.queue, *self.queue.in_flight.values()) if d.lane == lane and
                     d.state in PENDING), None)  # one that has ended may still be re-reading what it changed
        if busy is not None:
            return f"a deployment of {busy.ref} is {busy.state.value}: roll back once it has ended"
        if not self.queue.target.rolls_back(service.ref):
            return "a Swarm service is rolled back by Swarm itself: docker service rollback"
        return None if previous else f"no previous image is kept for {service.ref}: gopdater keeps one from its " \
                                     "next update on"

    def on_deployment(self, deployment_id: str, action: Action) -> Acted:
        """approve or reject a waiting deployment; 404 for an unknown id, 409 for one that does not wait."""
        with self.queue.lock:
            waiting = next((d for d in self.queue.queue if d.id == deployment_id and d.state is State.WAITING), None)
            if waiting is not None:
                return DEPLOYMENT_DESK[action](self, waiting)
        known = next((v for v in self.queue.views() if v.get("id") == deployment_id), None)
        if known is None:
            return Acted(HTTPStatus.NOT_FOUND, f"no deployment {deployment_id}")
        return Acted(HTTPStatus.CONFLICT, f"deployment {deployment_id} is {known.get('state')}: it does not wait")

    def approve(self, deployment: Deployment) -> Acted:
        """Let it run (when its window is open); the queue's lock held."""
        if deployment.gate.approval is None:
            return Acted(HTTPStatus.CONFLICT, f"deployment {deployment.id} waits for its update window, not for "
                                              "approval")
        now = self.gates.now()
        deployment.gate, deployment.approved = deployment.gate._replace(approval=None).judged(now), _now()
        if deployment.gate.ready(now):
            deployment.state = State.QUEUED
        self.gates.save(waiting_entries(self.queue.queue))
        self.queue.lock.notify_all()
        log.warning("operator: deployment=%s of service=%s approved", deployment.id, deployment.ref)
        return Acted(HTTPStatus.OK, "approved" if deployment.state is State.QUEUED else
                     f"approved; {waiting_words(deployment.gate, self.queue.config)}", deployment.id)

    def reject(self, deployment: Deployment) -> Acted:
        """End it without running; the queue's lock held."""
        end_waiting_locked(self.queue, deployment, State.REJECTED, "rejected by an operator")
        return Acted(HTTPStatus.OK, "rejected", deployment.id)

    # -- what the page and the pipeline read ----------------------------------------------

    def holds(self) -> Mapping[ServiceRef, str]:
        with self.queue.lock:
            return dict(self.gates.holds)

    def kept(self) -> FrozenSet[ServiceRef]:
        """The services an operator can roll back: a previous image is kept, and gopdater carries that out."""
        journal, target = self.queue.journal, self.queue.target
        return frozenset(s.ref for s in target.running() if journal and target.rolls_back(s.ref) and
                         journal.previous(f"{s.ref.kind}:{s.ref}"))

    def why_ignored(self, image: ImageKey) -> str:
        """Why a push updates nothing: the services held that it would update, else what the target says."""
        holds = self.holds()
        held = [f"{ref}: held since {holds[ref]}" for ref in self.queue.target.services_for(image) if ref in holds]
        return "; ".join(held) or self.queue.target.why_ignored(image)


SERVICE_DESK: Dict[Action, Callable[[Desk, Running], Acted]] = {
    Action.HOLD: Desk.hold, Action.RESUME: Desk.resume, Action.UPDATE: Desk.update, Action.ROLLBACK: Desk.rollback}
DEPLOYMENT_DESK: Dict[Action, Callable[[Desk, Deployment], Acted]] = {
    Action.APPROVE: Desk.approve, Action.REJECT: Desk.reject}





# ==========================================================================================
# Docker commands: every command gopdater runs (docker, Compose, a credential helper), as argv lists
# ==========================================================================================


# -- the engine: every docker command ----------------------------------------------------------


def gone(error: CommandError) -> bool:
    """Whether docker inspect failed because the container or image is no longer there (CLI 20.10 and later's
    words)."""
    return any(words in error.tail for words in ("No such container", "No such object", "No such image"))


def unless_gone(read: Callable[[], list]) -> list:
    """What read returns of one container or image; [] if Docker no longer has it (a busy host's race)."""
    try:
        return read()
    except CommandError as error:
        if not gone(error):
            raise
    return []


# Swarm's answer when the service changed between the CLI's read of it and its write (Swarm itself writes a
# service's update status as a previous update runs on): the CLI does not ask again, so gopdater does.
OUT_OF_SEQUENCE = "update out of sequence"
SERVICE_UPDATE_TRIES = 3


class Engine:
    """Every `docker` command gopdater runs, as argv lists: the runner, its timeout and its environment bound
    once. Names reach these argv lists only from the engine's own answers, the operator's settings and Compose
    files, never from a payload (a payload picks among services already read; see Target.services_for)."""

    def __init__(self, config: Config, runner: Runner):
        self.config, self.runner = config, runner

    @property
    def dry(self) -> bool:
        """Whether commands that change something are only logged (DRY_RUN)."""
        return getattr(self.runner, "dry", False)

    def run(self, argv: Sequence[str], timeout: Optional[float] = None, **kwargs) -> str:
        return self.runner(list(argv), timeout=timeout or self.config.command_timeout,
                           env=kwargs.pop("env", self.config.command_env), **kwargs)

    def read(self, argv: Sequence[str]) -> str:
        """A read-only command, logged at debug level."""
        return self.run(argv, quiet=True)

    # -- the engine itself --------------------------------------------------------------

    def version(self) -> str:
        return self.read(["docker", "version", "--format", "{{.Server.Version}}"]).strip()

    def answers(self) -> bool:
        """Whether the engine answers `docker version`."""
        try:
            self.version()
        except (CommandError, EngineUnreachable):
            return False
        return True

    def credentials(self, helper: str, server: str) -> str:
        """What the docker CLI's credential helper (HELPER_RE: a name, never a path) says of a registry: JSON."""
        return self.run([f"docker-credential-{helper}", "get"], quiet=True, given=server.encode() + b"\n")

    def info(self, field: str) -> object:
        """One field of `docker info` (Swarm, RegistryConfig), as JSON."""
        return json.loads(self.read(["docker", "info", "--format", f"{{{{json .{field}}}}}"]) or "null")

    # -- containers -----------------------------------------------------------------------

    def container_ids(self, labels: Sequence[str]) -> List[str]:
        """Every container (stopped ones too) carrying all these labels (key=value, or a key alone)."""
        return self.read(["docker", "ps", "-a", "-q", "--no-trunc",
                          *(arg for label in labels for arg in ("--filter", f"label={label}"))]).split()

    def compose_container_ids(self) -> List[str]:
        """Every container Compose made on the engine (stopped ones too), short ids: the host listing."""
        return self.read(["docker", "ps", "-a", "-q", "--filter", "label=com.docker.compose.project"]).split()

    def inspect_raw(self, ids: Sequence[str]) -> List[dict]:
        """`docker inspect --type container` of containers, as JSON. The type spares a missing container's id
        the CLI's search of every other kind of object (a socket proxy would refuse those calls)."""
        return json.loads(self.read(["docker", "inspect", "--type", "container", *ids])) if ids else []

    def inspect(self, ids: Sequence[str]) -> List[Container]:
        """Inspect containers by id, labels as they are (the new containers of an update: judged, not read)."""
        return [Container.from_inspect(d) for d in self.inspect_raw(ids)]

    def containers(self, ids: Sequence[str]) -> List[Container]:
        """Containers just listed, inspected, each less the labels its image carries (one `docker inspect` and
        one `docker image inspect` for all); one removed meanwhile is left out."""
        listed = self.inspect_listed(ids)
        images = sorted({data.get("Image") or "" for data in listed} - {""})
        carried = {"": {}, **(self.image_labels(images) if images else {})}
        # A container whose image was removed meanwhile is being removed too, or stopped on an image no one has:
        # left out, as a removed one is (which labels came from its image can no longer be told).
        return [Container.from_inspect(data, carried[data.get("Image") or ""]) for data in listed
                if (data.get("Image") or "") in carried]

    def inspect_listed(self, ids: Sequence[str]) -> List[dict]:
        """`docker inspect` of containers just listed, leaving out any removed meanwhile (containers come and go
        on a busy host; one gone must not make the whole listing fail)."""
        try:
            return self.inspect_raw(ids)
        except CommandError as error:
            if not gone(error):
                raise
        return [data for one in ids for data in unless_gone(lambda: self.inspect_raw([one]))]

    def start(self, name: str) -> None:
        self.run(["docker", "start", name], mutates=True)

    def stop(self, name: str) -> None:
        self.run(["docker", "stop", "-t", str(self.config.stop_timeout), name],
                 timeout=self.config.stop_timeout + self.config.command_timeout, mutates=True)

    def remove(self, name: str) -> None:
        self.run(["docker", "rm", name], mutates=True)

    def discard(self, name: str) -> None:
        self.run(["docker", "rm", "-f", name], mutates=True)

    def network(self, verb: str, network: str, name: str, aliases: Sequence[str] = ()) -> None:
        self.run(["docker", "network", verb, *(a for alias in aliases for a in ("--alias", alias)), network, name],
                 mutates=True)

    def exec(self, where: str, argv: Sequence[str], env: Mapping[str, str], timeout: float) -> str:
        """Run a release step in a running container; what it printed (stdout and stderr as one stream)."""
        given = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        return self.run(["docker", "exec", *given, where, *argv], timeout=timeout, mutates=True, both=True)

    def logs(self, name: str) -> List[str]:
        """The container's last log lines, stdout and stderr together; never raises."""
        try:
            text = self.run(["docker", "logs", "--tail", str(LOG_TAIL_LINES), name], quiet=True, both=True)
        except (CommandError, EngineUnreachable):
            return []
        return printed_lines(text)

    # -- images ---------------------------------------------------------------------------

    def pull(self, image: str) -> None:
        self.run(["docker", "pull", image], timeout=self.config.pull_timeout, mutates=True)

    def image_id(self, image: str) -> str:
        return self.read(["docker", "image", "inspect", "--format", "{{.Id}}", image]).strip()

    def image_labels(self, image_ids: Sequence[str]) -> Dict[str, Mapping[str, str]]:
        """The labels each image carries, by id; one removed meanwhile is left out (asked one by one then, as the
        CLI's answer for the others is lost to its failure); CommandError if one cannot be read otherwise."""
        try:
            return dict(zip(image_ids, self.labels_read(image_ids)))
        except CommandError as error:
            if not gone(error):
                raise
        return {one: labels for one in image_ids for labels in unless_gone(lambda: self.labels_read([one]))}

    def labels_read(self, image_ids: Sequence[str]) -> List[Mapping[str, str]]:
        """One `docker image inspect` for the labels of these images, in order."""
        text = self.read(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", *image_ids])
        found = [json.loads(line or "null") for line in text.splitlines()[:len(image_ids)]]
        if len(found) != len(image_ids):
            raise CommandError(["docker", "image", "inspect"], 1, "fewer answers than images asked")
        return [labels if isinstance(labels, dict) else {} for labels in found]

    def repo_digests(self, image_ids: Sequence[str]) -> Dict[str, List[str]]:
        """The registry digests each image was pulled by (`RepoDigests`), by image id."""
        text = self.read(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", *image_ids])
        return dict(zip(image_ids, (json.loads(line or "null") or [] for line in text.splitlines())))

    def tag(self, image_id: str, image: str) -> None:
        self.run(["docker", "tag", image_id, image], mutates=True)

    def remove_image(self, image_id: str) -> None:
        self.run(["docker", "rmi", image_id], mutates=True)

    # -- Swarm ----------------------------------------------------------------------------

    def service_names(self) -> List[str]:
        return self.read(["docker", "service", "ls", "-q"]).split()

    def service_inspect(self, names: Sequence[str]) -> List[dict]:
        return json.loads(self.read(["docker", "service", "inspect", *names])) if names else []

    def service_update(self, name: str, image: str) -> None:
        """Have Swarm move a service to an image (a tag, resolved by Swarm now), with the registry login; asked
        again when Swarm answers OUT_OF_SEQUENCE, at most SERVICE_UPDATE_TRIES times in all."""
        for tries_left in reversed(range(SERVICE_UPDATE_TRIES)):
            try:
                self.run(["docker", "service", "update", "--detach", "--image", image, "--with-registry-auth", name],
                         mutates=True)
                return
            except CommandError as error:
                if OUT_OF_SEQUENCE not in error.tail or not tries_left:
                    raise

    def service_rollback(self, name: str) -> None:
        self.run(["docker", "service", "rollback", "--detach", name], mutates=True)

    def service_tasks(self, name: str) -> List[dict]:
        """The tasks Swarm wants running for a service, inspected."""
        ids = self.read(["docker", "service", "ps", "-q", "--filter", "desired-state=running", name]).split()
        return json.loads(self.read(["docker", "inspect", "--type", "task", *ids])) if ids else []


# -- Compose's files: where a project lives, its env files read and rewritten in place ---------


class ComposeLocation(NamedTuple):
    """Which project Compose works on, and where each part of that came from."""

    project_name: Optional[str]
    project_name_source: str
    compose_file: Optional[str]
    compose_file_source: str
    working_dir: str
    working_dir_source: str
    own_service: Optional[str] = None
    env_files: Tuple[str, ...] = ()


def path_separator(config: Config) -> str:
    """The separator of COMPOSE_FILE lists, as Compose reads it."""
    return config.environ.get("COMPOSE_PATH_SEPARATOR", os.pathsep)


# One definition in an env file, as Compose reads it: [export ]NAME=value, value bare or quoted, then a comment.
ENV_LINE_RE = re.compile(r"(?P<lead>[ \t]*(?:export[ \t]+)?)(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P<eq>[ \t]*=[ \t]*)"
                         r"(?P<value>\"[^\"\\$`]*\"|'[^']*'|[^\s#\"'$`\\]*)(?P<rest>(?:[ \t]+#.*|[ \t]*))", re.ASCII)


def env_definitions(lines: Sequence[str], variable: str) -> List[Tuple[int, Optional[re.Match]]]:
    """Each line that defines variable, with its parts, or None for a definition too unusual to rewrite."""
    found = []
    for number, line in enumerate(lines):
        body = line.rstrip("\r\n")
        head = re.match(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=", body)
        if head and head.group(1) == variable:
            found.append((number, ENV_LINE_RE.fullmatch(body)))
    return found


def env_value(text: str, variable: str) -> Optional[str]:
    """The value an env file gives variable (its last definition wins, as in Compose), unquoted; or None. Pure."""
    defined = env_definitions(text.splitlines(keepends=True), variable)
    if not defined or defined[-1][1] is None:
        return None
    value = defined[-1][1].group("value")
    return value[1:-1] if value[:1] in ("'", '"') else value


def rewrite_env(text: str, variable: str, value: str) -> str:
    """The env file with every definition of variable set to value, quoting kept, every other byte unchanged;
    one line added (in the file's line ending) if none defines it. ValueError if a definition is not a plain
    value gopdater can rewrite safely. Pure."""
    lines = text.splitlines(keepends=True)
    defined = env_definitions(lines, variable)
    if any(match is None for _, match in defined):
        raise ValueError(f"{variable} is defined in a form gopdater does not rewrite (a plain or quoted tag is)")
    for number, match in defined:
        quote = match.group("value")[:1] if match.group("value")[:1] in ("'", '"') else ""
        ending = lines[number][len(lines[number].rstrip("\r\n")):]
        lines[number] = f"{match.group('lead')}{variable}{match.group('eq')}{quote}{value}{quote}" \
                        f"{match.group('rest')}{ending}"
    if not defined:
        newline = "\r\n" if "\r\n" in text else "\n"
        if lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += newline
        lines.append(f"{variable}={value}{newline}")
    return "".join(lines)


class EnvFile(NamedTuple):
    """An env file as read for a rewrite: its text (bytes kept as they were), mode, owner and stamp; or absent."""

    text: str
    mode: int = 0o644
    owner: Optional[Tuple[int, int]] = None
    stamp: Optional[Tuple[int, int, int]] = None  # file_stamp() as read; None if absent

    @staticmethod
    def stamp_of(path: str) -> Optional[Tuple[int, int, int]]:
        """The file's stamp now; None if there is none."""
        try:
            return file_stamp(os.lstat(path))
        except FileNotFoundError:
            return None

    @classmethod
    def read(cls, path: str) -> "EnvFile":
        """Read it, never through a link (a rename would replace the link, not its target); OSError if unusable."""
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return cls("")
        with open(descriptor, "rb") as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_size > ENV_FILE_MAX:
                raise OSError(f"{path} is not a regular file of at most {ENV_FILE_MAX} bytes")
            data = handle.read(ENV_FILE_MAX + 1)
        return cls(data.decode("utf-8", "surrogateescape"), stat.S_IMODE(status.st_mode),
                   (status.st_uid, status.st_gid), file_stamp(status))


ENV_FILE_MAX = 1 << 20
ENV_WRITE_ATTEMPTS = 3  # reads of a file someone else keeps changing before gopdater gives up


def write_env(path: str, variable: str, value: str, read: Callable[[str], EnvFile] = EnvFile.read) -> Optional[str]:
    """Set variable=value in an env file, atomically, keeping its mode, owner and any edit made meanwhile; the
    line written, or None if the file already said so. OSError (FileChanged) or ValueError if it cannot be done."""
    for _ in range(ENV_WRITE_ATTEMPTS):
        current = read(path)
        text = rewrite_env(current.text, variable, value)
        if text == current.text:
            return None
        # Someone editing the file since it was read (by hand, or a deploy script) keeps their edit: read again.
        with contextlib.suppress(FileChanged):
            replace_file(path, text.encode("utf-8", "surrogateescape"), current.mode, current.owner,
                         lambda: EnvFile.stamp_of(path) == current.stamp)
            return changed_line(current.text, text)
    raise FileChanged(path, f"kept changing while gopdater wrote it ({ENV_WRITE_ATTEMPTS} attempts)")


def changed_line(before: str, after: str) -> str:
    """The first line that differs, for the log."""
    pairs = itertools.zip_longest(before.splitlines(), after.splitlines(), fillvalue="")
    return next((new for old, new in pairs if old != new), "")


def raw_images_from_yaml(text: str) -> Dict[str, str]:
    """Each service's image from `docker-compose config --no-interpolate` (Compose v1 prints YAML only): the
    service keys two spaces in under services:, their image: four in. Pure."""
    images, service, inside = {}, None, False
    for line in text.splitlines():
        if not line.startswith(" "):
            inside, service = line.rstrip() == "services:", None
        elif inside and re.fullmatch(r"  [^ :][^:]*:\s*", line):
            service = line.strip()[:-1].strip("'\"")
        elif inside and service and line.startswith("    image:"):
            value = line.split(":", 1)[1].strip()
            images[service] = value[1:-1] if value[:1] in ("'", '"') and value[-1:] == value[:1] else value
    return images


def outside_folder(path: str, folder: str) -> bool:
    """Whether path, its links resolved, lies outside folder (its links resolved too)."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, base]) != base


# -- Compose: every Compose command of one project ---------------------------------------------


class Compose:
    """Every Compose command gopdater runs for one project, as argv lists (its docker commands: engine)."""

    def __init__(self, config: Config, location: ComposeLocation, command: Sequence[str], runner: Runner,
                 json_config: bool = False):
        self.config, self.location, self.runner, self.json_config = config, location, runner, json_config
        self.engine = Engine(config, runner)
        self.command = [*command, *(arg for path in location.env_files for arg in ("--env-file", path))]
        env = dict(config.command_env)
        # Compose interpolates ${PWD}; make it the project directory, as on the host.
        env["PWD"] = location.working_dir
        if location.project_name:
            env["COMPOSE_PROJECT_NAME"] = location.project_name
        if location.compose_file:
            env["COMPOSE_FILE"], env["COMPOSE_PATH_SEPARATOR"] = location.compose_file, path_separator(config)
        self.env = types.MappingProxyType(env)

    def run(self, argv: Sequence[str], timeout: Optional[float] = None, **kwargs) -> str:
        return self.runner(list(argv), timeout=timeout or self.config.command_timeout, env=self.env,
                           cwd=self.location.working_dir, **kwargs)

    def list_services(self) -> Dict[str, "Configured"]:
        """Service names of the project, each with its deploy.update_config.order and labels as the Compose
        file gives them (`compose config --format json`, Compose v2), else names alone (v1)."""
        if not self.json_config:
            return {s: Configured() for s in self.run([*self.command, "config", "--services"], quiet=True).split()
                    if SERVICE_RE.fullmatch(s)}
        services = json.loads(self.run([*self.command, "config", "--format", "json"], quiet=True)).get("services")
        return {name: Configured.from_config(value if isinstance(value, dict) else {})
                for name, value in (services or {}).items() if SERVICE_RE.fullmatch(name)}

    def raw_images(self) -> Dict[str, str]:
        """Each service's image as the Compose file writes it, variables not filled in (`config --no-interpolate`:
        JSON from Compose v2, YAML from v1)."""
        if not self.json_config:
            return raw_images_from_yaml(self.run([*self.command, "config", "--no-interpolate"], quiet=True))
        services = json.loads(self.run([*self.command, "config", "--no-interpolate", "--format", "json"],
                                       quiet=True)).get("services")
        return {str(name): str(value.get("image") or "") for name, value in (services or {}).items()
                if isinstance(value, dict)}

    def env_files(self) -> Tuple[str, ...]:
        """The env files Compose reads for the project, the last winning: as its labels name them, else .env."""
        return self.location.env_files or (os.path.join(self.location.working_dir, ".env"),)

    def write_env(self, path: str, variable: str, value: str) -> None:
        """Set variable=value in the project's env file (logged, not done, under DRY_RUN); FileWriteError."""
        if getattr(self.runner, "dry", False):
            log.info("dry-run would write %s=%s to %s", variable, value, path)
            return
        try:
            line = write_env(path, variable, value)
        except (OSError, ValueError) as error:
            raise FileWriteError(path, getattr(error, "strerror", None) or str(error)) from None
        if line is not None:
            log.info("wrote %r to %s", line, path)

    def release_step(self, one_off: bool, service: str, where: str, argv: Sequence[str], env: Mapping[str, str],
                     timeout: float) -> str:
        """Run one release step: in the container where (`docker exec`), or one_off in a one-off container of the
        service named where (`compose run --rm --no-deps -T`), removed if it outlives timeout."""
        if not one_off:
            return self.engine.exec(where, argv, env, timeout)
        given = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        try:
            return self.run([*self.command, "run", "--rm", "--no-deps", "-T", "--name", where, *given, service, *argv],
                            timeout=timeout, mutates=True, both=True)
        except CommandError as error:
            if error.code is None:  # killing Compose leaves its one-off container running
                with contextlib.suppress(CommandError, EngineUnreachable):
                    self.engine.discard(where)
            raise

    def recreate(self, service: str) -> None:
        """A service's containers made anew on their own image (a dependent in another's network namespace)."""
        self.run([*self.command, "up", "-d", "--no-deps", "--force-recreate", service], mutates=True)

    def restart(self, service: str) -> None:
        self.run([*self.command, "restart", service], mutates=True)

    def create_next(self, service: str, count: int) -> None:
        """One more container of the service, created and not started, the others left as they are."""
        self.run([*self.command, "up", "--no-start", "--no-deps", "--no-recreate", "--scale", f"{service}={count}",
                  service], mutates=True)

    def container_ids(self, service: Optional[str] = None) -> List[str]:
        """Ids of the project's containers (of one service): by label when the project's name is known, as one
        `docker ps` costs a fraction of Compose loading the project (under load, 0.1 s against 0.7 s), else
        from `compose ps`."""
        name = self.location.project_name
        if not name:
            return self.run([*self.command, "ps", "-a", "-q", *([service] if service else [])], quiet=True).split()
        return self.engine.container_ids([f"com.docker.compose.project={name}",
                                          *([f"com.docker.compose.service={service}"] if service else [])])

    def containers(self, service: Optional[str] = None, labelled: bool = True) -> List[Container]:
        """The project's containers (one-off `run` containers left out), optionally of one service; their labels
        less their images' unless labelled is False (the ids alone are wanted: the images are not read)."""
        ids = self.container_ids(service)
        found = (self.engine.containers(ids) if labelled else
                 [Container.from_inspect(data) for data in self.engine.inspect_listed(ids)])
        return project_containers(found, service)

    def pull(self, service: str) -> None:
        self.run([*self.command, "pull", service], timeout=self.config.pull_timeout, mutates=True)

    def up(self, service: str) -> None:
        self.run([*self.command, "up", "-d", "--no-deps", service], mutates=True)


def detect_compose(config: Config, runner: Runner) -> Tuple[List[str], str]:
    """Find the Compose command and its version: COMPOSE_COMMAND, else `docker compose`, else `docker-compose`."""
    if config.compose_command != "auto":
        candidates = [shlex.split(config.compose_command)]
    else:
        candidates = [["docker", "compose"], ["docker-compose"]]
    errors = []
    for command in candidates:
        try:
            version = runner([*command, "version", "--short"], timeout=config.command_timeout,
                             env=config.command_env, quiet=True).strip().lstrip("v")
        except CommandError as error:
            errors.append(f"{' '.join(command)}: {error.tail or error.code}")
            continue
        if re.match(r"\d+\.", version):
            return command, version
        errors.append(f"{' '.join(command)}: unexpected version {version[:40]!r}")
    raise CommandError(candidates[-1], 127, "; ".join(errors))


def compose_flavour(version: str) -> str:
    """'v1' for the Python docker-compose 1.x, else 'v2' (the Go Compose, v2 and later)."""
    return "v1" if version.startswith("1.") else "v2"


# ==========================================================================================
# Update targets: what gets updated (Compose projects, Swarm services), behind one interface
# ==========================================================================================

POLL_FIRST, POLL_FACTOR, POLL_MAX = 0.2, 1.5, 2.0
DISCOVERY_READS = 8  # projects read at once: `compose config` mostly waits on its start-up and the engine
DEFAULT = "(Compose's default)"

# -- the health verdict, and several targets as one --------------------------------------------


class Verdict(enum.Enum):
    READY = "ready"
    WAIT = "wait"
    FAILED = "failed"


class Health(NamedTuple):
    """A verdict on a service's new containers at one moment, with what it waits for or why it failed."""

    verdict: Verdict
    reason: str = ""


def health_limit(containers: Sequence[Container], health_timeout: float, settle_time: float) -> float:
    """Seconds the new containers get: HEALTH_TIMEOUT or the longest start_period, plus settling if needed."""
    limit = max([health_timeout] + [c.start_period for c in containers])
    return limit + (settle_time if not all(c.has_healthcheck for c in containers) else 0)


class Patience(NamedTuple):
    """How long the new containers have waited, how long they get, and how long one without a healthcheck must
    run before it counts as ready (SETTLE_TIME)."""

    waited: float
    limit: float
    settle_time: float


def judge(containers: Sequence[Container], expected: int, first_seen: Mapping[str, Tuple[float, str]],
          now: float, patience: Patience) -> Health:
    """Judge inspected containers: ready, keep waiting, or failed with a reason. Pure.

    first_seen maps a container id to when it was first seen running and its StartedAt then.
    """
    ready, waiting = 0, "not running"
    for c in containers:
        failed, is_ready, waiting = container_health(c, first_seen.get(c.id, (now, c.started_at)), now,
                                                     patience.settle_time)
        if failed:
            return Health(Verdict.FAILED, failed)
        ready += is_ready
    if ready == expected == len(containers):
        return Health(Verdict.READY)
    if patience.waited >= patience.limit:
        return Health(Verdict.FAILED, f"still {waiting} after {patience.limit:g}s")
    return Health(Verdict.WAIT, waiting)


def container_health(c: Container, seen: Tuple[float, str], now: float, settle_time: float
                     ) -> Tuple[Optional[str], bool, str]:
    """One container's part of the verdict: why it failed (or None), whether it is ready, what it waits for.
    seen: when it was first seen running, and its StartedAt then. Pure."""
    seen_at, seen_start = seen
    if c.status in ("exited", "dead"):
        return f"container {c.name} exited with code {c.exit_code}", False, ""
    if c.restart_count > 0 or c.status == "restarting" or seen_start != c.started_at:
        return f"container {c.name} restarted", False, ""
    if c.status != "running":
        return None, False, c.status or "not running"
    if not c.has_healthcheck:
        return None, now - seen_at >= settle_time, "settling"
    if c.health == "unhealthy":
        return f"container {c.name} is unhealthy", False, ""
    return None, c.health == "healthy", f"health {c.health or 'unknown'}"


class Targets(Target):
    """Several targets as one: each service goes to the target that owns it."""

    def __init__(self, members: Sequence[Target]):
        self.members = list(members)
        first = self.members[0] if self.members else None
        super().__init__(first.config if first else None, first.engine_version if first else "")
        self.runner = first.runner if first else None

    def owner(self, ref: ServiceRef) -> Optional[Target]:
        return next((member for member in self.members if member.owns(ref)), None)

    def owns(self, ref: ServiceRef) -> bool:
        return self.owner(ref) is not None

    def running(self) -> List[Running]:
        return [service for member in self.members for service in member.running()]

    def update(self, ref: ServiceRef, digest: Optional[str], steps: StepLog) -> Outcome:
        owner = self.owner(ref)
        return owner.update(ref, digest, steps) if owner else Outcome(reason=f"{ref} is no longer found here")

    def recover(self, ref: ServiceRef, record: Record, steps: StepLog) -> Outcome:
        owner = self.owner(ref)
        return owner.recover(ref, record, steps) if owner else Outcome(
            reason=f"{ref} is no longer found here; nothing was run for its unfinished update")

    def engine_answers(self) -> bool:
        return all(member.engine_answers() for member in self.members)

    def lane(self, ref: ServiceRef) -> Hashable:
        owner = self.owner(ref)
        return owner.lane(ref) if owner else ref

    def order(self, refs: Iterable[ServiceRef]) -> List[ServiceRef]:
        refs = list(refs)
        owner = self.owner(refs[0]) if refs else None
        return owner.order(refs) if owner else sorted(refs)

    def rolls_back(self, ref: ServiceRef) -> bool:
        owner = self.owner(ref)
        return owner is not None and owner.rolls_back(ref)

    def refresh_around(self, ref: ServiceRef) -> None:
        """Re-read only the member that owns ref."""
        owner = self.owner(ref)
        if owner is not None:
            owner.refresh_around(ref)

    def refresh(self, busy: FrozenSet[Hashable] = frozenset(), full: bool = True) -> None:
        """Re-read each member; one that cannot be read keeps its last view and does not stop the others."""
        for member in self.members:
            try:
                member.refresh(busy, full)
            except (CommandError, EngineUnreachable, ValueError) as error:
                log.warning("could not re-read %s: %s", type(member).__name__, error)

    def describe(self) -> List[Finding]:
        return [finding for member in self.members for finding in member.describe()]

    def summary(self) -> str:
        return " ".join(member.summary() for member in self.members)


# -- the steps any container-based target takes: wait and judge, put a tag back, clean up ------


class ContainerSteps:
    """Engine-level steps on containers, written once for every target that replaces containers."""

    def __init__(self, config: Config, docker: "Compose"):
        self.config, self.docker, self.engine = config, docker, docker.engine

    def wait_until_ready(self, ids: Sequence[str], steps: StepLog, stopped: Optional[float]) -> None:
        """Poll the new containers until judged ready; raise DeployFailed with the reason otherwise."""
        started = steps.clock()
        try:
            health, containers = self.poll(ids, steps, stopped, started)
        except CommandError as error:
            steps.record(WAIT, STEP_FAILED, started)
            raise DeployFailed(f"wait failed: {error}") from None
        if health.verdict is Verdict.READY:
            steps.record(WAIT, STEP_OK, started)
            return
        steps.record(WAIT, STEP_FAILED, started)
        for c in containers:
            steps.container_log(c.name, self.engine.logs(c.name))
        raise DeployFailed(health.reason)

    def poll(self, ids: Sequence[str], steps: StepLog, stopped: Optional[float], started: float
             ) -> Tuple[Health, List[Container]]:
        """Inspect the containers with a growing pause until the verdict is not WAIT; note the downtime
        (from stopped, when an old container was stopped, to the first one running)."""
        if not ids:
            return Health(Verdict.FAILED, "wait failed: compose up created no container"), []
        first_seen: Dict[str, Tuple[float, str]] = {}
        for delay in backoff(POLL_FIRST, POLL_FACTOR, POLL_MAX):
            containers, now = self.engine.inspect(ids), steps.clock()
            for c in containers:
                if c.status == "running" and not first_seen and stopped is not None:
                    steps.note(DOWNTIME, STEP_OK, now - stopped)
                if c.status == "running":
                    first_seen.setdefault(c.id, (now, c.started_at))
            limit = health_limit(containers, self.config.health_timeout, self.config.settle_time)
            patience = Patience(now - started, limit, self.config.settle_time)
            health = judge(containers, len(ids), first_seen, now, patience)
            if health.verdict is not Verdict.WAIT:
                return health, containers
            steps.sleep(delay)
        raise AssertionError("unreachable: backoff() never ends")

    def retire(self, container: Container, steps: StepLog, prefix: str = "") -> None:
        """Stop and remove a container."""
        steps.step(Stage(prefix + "stop"), lambda: self.engine.stop(container.name))
        steps.step(Stage(prefix + "remove"), lambda: self.engine.remove(container.name))

    def point(self, image_id: str, image: str, move: Optional[TagMove], new: bool) -> None:
        """Make a later `compose up` run image_id: a tracked service's env file names its tag (the new one, or the
        old), and image (the reference that tag makes) names image_id."""
        if move is not None and move.env_file and move.variable:
            self.docker.write_env(move.env_file, move.variable, move.new_tag if new else move.old_tag)
        self.engine.tag(image_id, image)

    def put_back_tag(self, old_id: str, image: str, steps: StepLog, journalled: bool = True,
                     move: Optional[TagMove] = None) -> None:
        """Point the image name (and a tracked service's env file) at the old image again, so a later `compose up`
        keeps it; best effort. Not journalled where nothing has changed yet: a crash there must still leave the
        service alone."""
        tag = lambda: self.point(old_id, image, move, new=False)  # noqa: E731
        try:
            steps.step(Stage.ROLLBACK_TAG, tag) if journalled else steps.look(Stage.ROLLBACK_TAG.value, tag)
        except DeployFailed as error:
            log.warning("%s %s", steps.label, error)

    def has_image(self, image_id: str) -> bool:
        try:
            self.engine.image_id(image_id)
            return True
        except CommandError:
            return False

    def clean_up(self, old_ids: Sequence[str], new_id: Optional[str], steps: StepLog) -> None:
        """Remove the replaced images; keep one, with a log line, if Docker says it is still in use."""
        for image_id in old_ids:
            if image_id == new_id:
                continue
            started = steps.clock()
            if steps.needed_by_another(image_id):
                steps.record(CLEANUP, STEP_KEPT, started)
                log.info("%s kept old image %s: an update in flight elsewhere may roll back to it", steps.label,
                         image_id[:19])
                continue
            try:
                self.engine.remove_image(image_id)
            except (CommandError, EngineUnreachable) as error:  # a success stays one; the image is kept
                steps.record(CLEANUP, STEP_KEPT, started)
                log.info("%s kept old image %s: %s", steps.label, image_id[:19], error.tail)
                continue
            steps.record(CLEANUP, STEP_OK, started)


# -- Compose: which project gopdater runs in (its own container's labels, or its settings) -----


def own_container_id(mountinfo: str, cgroup: str) -> Optional[str]:
    """Find the id of the container this process runs in, from /proc/self/{mountinfo,cgroup} text."""
    match = re.search(r"/containers/([0-9a-f]{64})/", mountinfo) or re.search(
        r"(?:docker[-/])([0-9a-f]{64})", cgroup)
    return match.group(1) if match else None


def _project_name(config: Config, labels: Mapping[str, str]) -> Tuple[Optional[str], str]:
    if config.project_name:
        return config.project_name, "COMPOSE_PROJECT_NAME"
    if labels.get("com.docker.compose.project"):
        return labels["com.docker.compose.project"], "label com.docker.compose.project of this container"
    return None, "Compose's default, the project folder's name"


def _compose_file(config: Config, labels: Mapping[str, str], cwd: str) -> Tuple[Optional[str], str]:
    """The Compose files (COMPOSE_FILE, else our own container's labels, else Compose's default), and whence."""
    separator = path_separator(config)
    working_dir = labels.get("com.docker.compose.project.working_dir")
    files = [f for f in labels.get("com.docker.compose.project.config_files", "").split(",") if f]
    if config.compose_file:
        # Made absolute because Compose then runs in the project directory, not in ours.
        paths = [os.path.abspath(os.path.join(cwd, f)) for f in config.compose_file.split(separator) if f]
        return separator.join(paths), "COMPOSE_FILE"
    if files and working_dir:
        return (separator.join(os.path.join(working_dir, f) for f in files),
                "label com.docker.compose.project.config_files of this container")
    return None, "Compose's default, compose.yaml or docker-compose.yml"


def locate(config: Config, labels: Mapping[str, str], cwd: str) -> ComposeLocation:
    """Decide project name, files and working dir: explicit settings win, then our own container's labels."""
    project = labels.get("com.docker.compose.project")
    working_dir = labels.get("com.docker.compose.project.working_dir")
    name, name_source = _project_name(config, labels)
    separator = path_separator(config)
    compose_file, file_source = _compose_file(config, labels, cwd)
    if working_dir:
        directory, dir_source = working_dir, "label com.docker.compose.project.working_dir of this container"
    elif config.compose_file:
        # Compose's project directory is the first file's; ${PWD} and ./paths then mean what they meant there.
        directory, dir_source = os.path.dirname(compose_file.split(separator)[0]), "directory of the first COMPOSE_FILE"
    else:
        directory, dir_source = cwd, "current directory"
    # gopdater leaves its own service alone when it works on its own project.
    own_service = labels.get("com.docker.compose.service") if project and name == project else None
    return ComposeLocation(name, name_source, compose_file, file_source, directory, dir_source, own_service)


COMPOSE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*[-_][a-zA-Z0-9][a-zA-Z0-9._-]*[-_][0-9]+", re.ASCII)


# -- release steps: commands from a service's labels around its update -------------------------

RELEASE_STEPS = tuple(row.stage for row in RELEASE_STAGES)
HOOK_TIMEOUT_LABEL = "gopdater.hook-timeout"
DEFAULT_HOOK_TIMEOUT = 300.0
HOOK_TIMEOUT_RANGE = (1.0, 86400.0)  # a second to a day


class ReleaseSteps(NamedTuple):
    """A service's release steps, as its labels gopdater.pre-update, .migrate, .post-update give them."""

    commands: Mapping[Stage, Tuple[str, ...]] = {}  # each an argv, split as a shell would split the label
    timeout: float = DEFAULT_HOOK_TIMEOUT  # seconds each may take (gopdater.hook-timeout)
    problem: Optional[str] = None  # why they cannot run as labelled (the update then runs nothing)

    def describe(self) -> str:
        """One line for --check and the start-up log."""
        if self.problem:
            return self.problem
        steps = ", ".join(f"{stage.value} {shlex.join(argv)!r}" for stage, argv in self.commands.items())
        return f"release steps: {steps} (each within {self.timeout:g}s)"


def release_label(stage: Stage) -> str:
    return f"gopdater.{stage.value}"


def release_steps(labels: Mapping[str, str]) -> ReleaseSteps:
    """Read the release-step labels of one service. Pure; a label that cannot be read is a problem, never
    guessed at."""
    commands, problems = {}, []
    for stage in RELEASE_STEPS:
        text = (labels.get(release_label(stage)) or "").strip()
        if not text:
            continue
        try:
            commands[stage] = tuple(shlex.split(text))
        except ValueError as error:
            problems.append(f"{release_label(stage)} cannot be split as a shell would split it ({error})")
    timeout_text = (labels.get(HOOK_TIMEOUT_LABEL) or "").strip()
    timeout = DEFAULT_HOOK_TIMEOUT
    if timeout_text:
        try:
            timeout = float(timeout_text)
        except ValueError:
            timeout = float("nan")
        if not HOOK_TIMEOUT_RANGE[0] <= timeout <= HOOK_TIMEOUT_RANGE[1]:
            problems.append(f"{HOOK_TIMEOUT_LABEL} must be a number of seconds from {HOOK_TIMEOUT_RANGE[0]:g} to "
                            f"{HOOK_TIMEOUT_RANGE[1]:g}, not {timeout_text[:40]!r}")
            timeout = DEFAULT_HOOK_TIMEOUT
    return ReleaseSteps(commands, timeout, "; ".join(problems) or None)


def release_rows(release: "ReleaseSteps", when: str) -> List[ReleaseStage]:
    """The release steps a service declares that run at this point of its update, in the table's order. Pure."""
    return [row for row in RELEASE_STAGES if row.when == when and row.stage in release.commands]


def start_first_refusal(containers: Sequence[Container]) -> Optional[str]:
    """Why a service's containers cannot run twice at once for a start-first update, or None."""
    for c in containers:
        if c.host_ports:
            return f"{c.name} publishes a host port"
        if not COMPOSE_NAME_RE.fullmatch(c.name) or not c.name.startswith(c.project):
            return f"{c.name} has a fixed container_name"
        if not c.has_healthcheck:
            return f"{c.name} has no healthcheck, which start-first needs"
    return None


# -- Compose: what an update journals, and what recovery does at each stage --------------------


class ComposeProcedure(str, enum.Enum):
    """How a Compose update changes a service; what its journalled stages mean depends on it."""

    REPLACE = "replace"  # stop and remove the old containers, compose up, wait (also any recovery of it)
    START_FIRST = "start-first"  # a new container beside the old one, switched in once healthy
    GROUP = "group"  # several services of the project on one push, switched in turn, rolled back as one


class ComposeAction(enum.Enum):
    """What Compose recovery does with a service an update left unfinished."""

    LEAVE = "leave"  # nothing had changed: record it as it was
    JUDGE = "judge"  # what runs now is judged as a new container would be; rolled back if it fails
    BRING_UP = "bring-up"  # bring the service up on the new image, or back on the old one if that is gone
    ROLL_BACK = "roll-back"  # the update had failed: finish putting the old image back
    SETTLE = "settle"  # a start-first switch: keep exactly one container, the old one if it still serves
    ROLL_BACK_GROUP = "roll-back-group"  # a group: every service switched so far back on its old image


class Member(NamedTuple):
    """One service of a group deployment, as its journal record keeps it: what recovery needs to put it back."""

    service: str
    image: Optional[str] = None  # the reference it runs
    old_image: Optional[str] = None  # image ids
    new_image: Optional[str] = None
    old_tag: Optional[str] = None  # a tracked service's tag move
    new_tag: Optional[str] = None
    env_file: Optional[str] = None
    variable: Optional[str] = None

    CHECKS = (("service", written(SERVICE_RE.fullmatch)), ("image", written(parse_reference)),
              ("old_image", written(image_value)), ("new_image", written(image_value)),
              ("old_tag", written(TAG_RE.fullmatch)), ("new_tag", written(TAG_RE.fullmatch)),
              ("env_file", written(lambda v: os.path.isabs(v) and not set(v) & {"\0", "\n", "\r"})),
              ("variable", written(ENV_NAME_RE.fullmatch)))

    @property
    def move(self) -> Optional[TagMove]:
        return TagMove(self.old_tag, self.new_tag, self.env_file, self.variable) if self.old_tag and self.new_tag \
            else None


class ComposePart(NamedTuple):
    """What only a Compose update journals: a start-first switch's two containers and the new one's networks, and
    a tracked service's env file and variable."""

    old_container: Optional[str] = None
    new_container: Optional[str] = None
    networks: Mapping[str, Tuple[str, ...]] = {}
    env_file: Optional[str] = None  # where the tag is kept, as variable=tag
    variable: Optional[str] = None
    network_dependents: Tuple[str, ...] = ()  # the services that follow it (Dependents), as the update found them
    restart_dependents: Tuple[str, ...] = ()
    members: Tuple[Member, ...] = ()  # a group: each service, in the order they are switched
    switched: Tuple[str, ...] = ()  # a group: the services switched so far (and the one being switched)

    @property
    def services(self) -> Tuple[str, ...]:
        """The services of a group's record (a record's part may name them: the queue shows each)."""
        return tuple(member.service for member in self.members)

    CHECKS = (  # a class attribute (no annotation), not a field
        ("old_container", written(CONTAINER_RE.fullmatch)), ("new_container", written(CONTAINER_RE.fullmatch)),
        ("env_file", written(lambda v: os.path.isabs(v) and not set(v) & {"\0", "\n", "\r"})),
        ("variable", written(ENV_NAME_RE.fullmatch)),
        ("networks", lambda v: all(written(SERVICE_RE.fullmatch)(n) and all(map(written(SERVICE_RE.fullmatch), a))
                                   for n, a in v.items())),
        ("network_dependents", lambda v: all(map(written(SERVICE_RE.fullmatch), v))),
        ("restart_dependents", lambda v: all(map(written(SERVICE_RE.fullmatch), v))),
        ("members", lambda v: all(fields_problem(m, Member.CHECKS) is None for m in v)),
        ("switched", lambda v: all(map(written(SERVICE_RE.fullmatch), v))))

    @classmethod
    def from_stored(cls, data: Mapping[str, object]) -> "ComposePart":
        networks = data.get("networks") or {}
        return cls(**{**data, "networks": {str(k): tuple(v) for k, v in networks.items()},
                      **{k: tuple(data.get(k) or ()) for k in ("network_dependents", "restart_dependents", "switched")},
                      "members": tuple(Member(**m) for m in data.get("members") or ())})


_ROLLBACK = (Stage.ROLLBACK_TAG, Stage.ROLLBACK_STOP, Stage.ROLLBACK_REMOVE, Stage.ROLLBACK_UP)
_P, _A = ComposeProcedure, ComposeAction
_BEFORE = tuple(row.stage for row in RELEASE_STAGES if row.when == BEFORE_SWITCH)  # nothing switched yet
_AFTER = tuple(row.stage for row in RELEASE_STAGES if row.when == AFTER_SWITCH)  # the new container runs
COMPOSE_ROWS: RecoveryRows = {
    **{(_P.REPLACE, s): (_A.LEAVE, _A.LEAVE)
       for s in (Stage.START, Stage.INSPECT, Stage.PULL, Stage.COMPARE, Stage.SET_TAG, *_BEFORE)},
    **{(_P.REPLACE, s): (_A.JUDGE, _A.BRING_UP)
       for s in (Stage.STOP, Stage.REMOVE, Stage.UP, Stage.RECOVER_TAG, Stage.DEPENDENTS, *_AFTER)},
    **{(_P.REPLACE, s): (_A.ROLL_BACK, _A.ROLL_BACK) for s in _ROLLBACK},
    **{(_P.START_FIRST, s): (_A.SETTLE, _A.SETTLE)
       for s in (Stage.INSPECT, Stage.CREATE, Stage.ISOLATE, Stage.START, Stage.CONNECT, Stage.DISCARD, Stage.STOP,
                 Stage.REMOVE, *_ROLLBACK, *_AFTER)},
}
# A group cut off anywhere: the services it had begun to switch go back, the others' env files name their old
# tags again (before the first switch that is all). No mixed versions, whatever the stage.
COMPOSE_ROWS.update({(ComposeProcedure.GROUP, s): (_A.ROLL_BACK_GROUP, _A.ROLL_BACK_GROUP) for s in (
    Stage.START, Stage.INSPECT, Stage.PULL, Stage.COMPARE, Stage.SET_TAG, *_BEFORE, Stage.STOP, Stage.REMOVE,
    Stage.UP, Stage.DEPENDENTS, *_ROLLBACK, *_AFTER, Stage.CREATE, Stage.ISOLATE, Stage.CONNECT, Stage.DISCARD)})
RECORD_KINDS["compose"] = RecordKind(ComposePart, COMPOSE_ROWS, lambda data: (
    ComposeProcedure.START_FIRST if data.get("new_container") else ComposeProcedure.REPLACE).value)


def recorded_move(record: Record) -> Optional[TagMove]:
    """A tracked service's tag move, as its record keeps it."""
    if not (record.old_tag and record.new_tag):
        return None
    return TagMove(record.old_tag, record.new_tag, record.part.env_file, record.part.variable)


# -- what a Compose update works on: the project as read (its protocol), one deployment's plan --


class Dependents(NamedTuple):
    """The services that follow one: those in its network namespace (network_mode: service:X, or container: naming
    X's container), recreated after it changes; and those that asked to restart with it (depends_on: {X: {restart:
    true}}, Compose v2), restarted. Each keeps its own image."""

    network: Tuple[str, ...] = ()
    restart: Tuple[str, ...] = ()

    def each(self) -> List[Tuple[str, str]]:
        """(service, how it follows), in the order they are followed."""
        return [(name, RECREATED) for name in self.network] + [(name, RESTARTED) for name in self.restart]

    def describe(self) -> str:
        return ", ".join(f"{name} ({how} after its update)" for name, how in self.each())


def dependency_order(after: Mapping[str, FrozenSet[str]]) -> List[str]:
    """Names, each after those it comes after (by name among those free to go; a cycle is broken by name). Pure."""
    placed: List[str] = []
    while len(placed) < len(after):
        free = sorted(n for n in after if n not in placed and after[n] <= set(placed)) or \
            sorted(n for n in after if n not in placed)
        placed.append(free[0])
    return placed


def by_service(containers: Iterable[Container], services: Sequence[str]) -> Dict[str, List[Container]]:
    """Containers grouped by their service, for the services named."""
    found: Dict[str, List[Container]] = {}
    for container in containers:
        if container.service in services:
            found.setdefault(container.service, []).append(container)
    return found


def env_file_for(docker: "Compose", variable: str) -> Tuple[str, Optional[str]]:
    """The env file to keep variable in (the last that defines it, else the last Compose reads), and why it
    cannot be rewritten from here, or None."""
    read = {}
    for path in docker.env_files():
        if outside_folder(path, docker.location.working_dir):  # checked before it is read
            return path, (f"{path} lies outside the project's folder (links resolved): gopdater reads and "
                          "writes env files inside it only")
        try:
            read[path] = EnvFile.read(path)
        except OSError as error:
            return path, f"{path} cannot be read: {error.strerror or error}"
    path = next((p for p in reversed(list(read)) if env_value(read[p].text, variable) is not None), path)
    folder = os.path.dirname(path)
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return path, (f"{path} cannot be written here (gopdater replaces it atomically, in its folder): mount "
                      f"{folder} read-write")
    try:
        rewrite_env(read[path].text, variable, "0.0.0")
    except ValueError as error:
        return path, f"{path}: {error}"
    return path, None


class ProjectAsRead(Protocol):
    """What a Compose update, its group and its recovery ask of the project (ComposeProject is the one)."""

    config: Config
    docker: Compose
    engine: Engine
    steps: ContainerSteps
    tracked: Mapping[str, Tracking]

    @property
    def name(self) -> str:
        ...

    @property
    def start_first(self) -> FrozenSet[str]:
        ...

    @property
    def dry(self) -> bool:
        ...

    def release_steps(self, service: str, old: Sequence[Container]) -> ReleaseSteps:
        ...

    def dependents(self, service: str) -> Dependents:
        ...


class ComposePlan(NamedTuple):
    """One deployment of one Compose service, as a value: what ran, what is pulled, what runs around the switch."""

    service: str
    old: Tuple[Container, ...]  # its containers when the update began
    image: Optional[str]  # the reference they run, as the Compose file names it
    old_ids: Tuple[str, ...]  # the images they run
    move: Optional[TagMove]  # a tracked service's tag move (gopdater.track)
    pulled: Optional[str] = None  # the reference pulled (the new tag's, for a tracked service)
    release: ReleaseSteps = ReleaseSteps()
    start_first: bool = False
    outcome: Outcome = Outcome()  # the outcome so far: old and new image, old and new tag
    dependents: Dependents = Dependents()

    @property
    def previous(self) -> Optional[str]:
        """The one image the service ran, to roll back to; None if it ran none or several."""
        return self.old_ids[0] if self.image and len(self.old_ids) == 1 else None


class ComposeUpdate:
    """The procedure that carries a ComposePlan out for one deployment, and rolls it back."""

    def __init__(self, project: ProjectAsRead, steps: StepLog):
        self.project, self.steps = project, steps
        self.docker, self.engine, self.containers = project.docker, project.engine, project.steps
        self.pulled: set = set()  # references pulled in this deployment: each once

    def run(self, service: str) -> Outcome:
        """The Compose update, one step per line: journal, plan (inspect, pull, compare), release steps before the
        switch, the switch (health-gated, post-update after it, rolled back if anything fails), clean up."""
        self.steps.begin(ComposeProcedure.REPLACE)
        plan = self.plan(service)
        if isinstance(plan, Outcome):
            return plan
        problem = plan.release.problem or self.before_switch(plan)
        if problem:
            return plan.outcome._replace(reason=problem)
        outcome = self.start_first(plan) if plan.start_first else self.stop_first(plan)
        if outcome.result in (State.UPDATED, State.DRY_RUN):
            self.clean_up(plan)
        return outcome

    def plan(self, service: str) -> Union[ComposePlan, Outcome]:
        """Inspect, pull and compare: the plan of this deployment, or how it ends before anything changes."""
        try:
            old = tuple(self.steps.step(Stage.INSPECT, lambda: self.docker.containers(service)))
            image = old[0].image if old else None
            move = move_to(self.project.tracked.get(service), parse_reference(image or ""),
                           self.steps.deployment.key.tag)
            if isinstance(move, str):
                return Outcome(State.SKIPPED, reason=move)
            plan = ComposePlan(service, old, image, tuple(sorted({c.image_id for c in old})), move)
            plan = plan._replace(pulled=self.pull(plan))
            new_id = self.steps.step(Stage.COMPARE, lambda: self.engine.image_id(plan.pulled)) if plan.pulled else None
        except DeployFailed as error:
            return Outcome(reason=str(error))
        return self.judge_plan(plan, new_id)

    def judge_plan(self, plan: ComposePlan, new_id: Optional[str]) -> Union[ComposePlan, Outcome]:
        """The plan with its outcome so far journalled, or how it ends: unchanged, or an image that failed before."""
        move = plan.move
        outcome = Outcome(old_image=plan.old_ids[0] if plan.old_ids else None, new_image=new_id,
                          old_tag=move and move.old_tag, new_tag=move and move.new_tag)
        self.steps.remember(old_image=outcome.old_image, new_image=new_id, image=plan.image,
                            **(move._asdict() if move else {}))
        if plan.old and all(c.image_id == new_id for c in plan.old):
            return outcome._replace(result=State.UP_TO_DATE)
        if self.steps.failed_before(new_id):
            return outcome._replace(result=State.SKIPPED, reason=f"{plan.pulled} is the image whose new container "
                                                                 "failed here before; push a new one")
        dependents = self.project.dependents(plan.service)
        self.steps.remember(network_dependents=dependents.network, restart_dependents=dependents.restart)
        plan = plan._replace(outcome=outcome, release=self.project.release_steps(plan.service, plan.old),
                             dependents=dependents)
        return plan._replace(start_first=self.starts_first(plan))

    def starts_first(self, plan: ComposePlan) -> bool:
        """Whether the service asked for start-first and its containers allow it (else stop-first, logged)."""
        if plan.service not in self.project.start_first:
            return False
        refusal = start_first_refusal(plan.old) or (plan.dependents.each() and "services follow it: "
                                                    + plan.dependents.describe())
        if refusal:
            log.warning("%s start-first falls back to stop-first: %s", self.steps.label, refusal)
        return not refusal

    def pull(self, plan: ComposePlan) -> Optional[str]:
        """Pull what the update would run (`compose pull`, or a tracked service's new tag); that reference."""
        pulled = with_tag(plan.image or "", plan.move.new_tag) if plan.move else plan.image
        if pulled in self.pulled:  # another service of this deployment runs it: pulled already
            return pulled
        if plan.move is None:
            self.steps.step(Stage.PULL, lambda: self.docker.pull(plan.service))
        else:
            self.steps.step(Stage.PULL, lambda: self.engine.pull(pulled))
        self.pulled.add(pulled)
        return pulled

    def clean_up(self, plan: ComposePlan) -> None:
        """Keep the replaced image for an operator's rollback, and remove the one kept before it (and any other
        replaced image), unless it is a tracked service's old version: that still has its own tag."""
        kept = Previous(plan.previous, plan.move and plan.move.old_tag) if plan.previous else None
        before = None if self.project.dry else self.steps.keep_previous(plan.service, kept)
        if plan.move is not None:
            log.info("%s kept the image of %s: it is still tagged", self.steps.label, plan.move.old_tag)
            return
        gone = [image for image in plan.old_ids if image != plan.previous]
        if before is not None and before.tag is None and before.image not in (plan.previous, plan.outcome.new_image):
            gone.append(before.image)
        self.containers.clean_up(gone, plan.outcome.new_image, self.steps)

    # -- release steps around the switch ------------------------------------------------------

    def before_switch(self, plan: ComposePlan) -> Optional[str]:
        """A tracked service's new tag into its env file, then each release step that runs before the switch (in
        RELEASE_STAGES order: pre-update, migrate); why one failed (nothing was switched, the image name and the
        env file name the old image again), or None."""
        move = plan.move
        try:
            if move is not None:
                self.steps.step(Stage.SET_TAG, lambda: self.docker.write_env(move.env_file, move.variable,
                                                                             move.new_tag))
            for row in release_rows(plan.release, BEFORE_SWITCH):
                self.release_step(plan, row, self.place(plan, row))
        except DeployFailed as error:
            if plan.previous:
                self.containers.put_back_tag(plan.previous, plan.image, self.steps, journalled=False, move=move)
            return f"{error}; nothing was switched"
        return None

    def after_switch(self, plan: ComposePlan, ids: Sequence[str]) -> None:
        """Once the new containers are ready: the services that follow this one (its dependents), then each release
        step that runs after the switch, in each new container; DeployFailed rolls the update back."""
        self.follow(plan.dependents)
        for row in release_rows(plan.release, AFTER_SWITCH):
            for container in ids:
                self.release_step(plan, row, container)

    def place(self, plan: ComposePlan, row: ReleaseStage) -> str:
        """Where a release step before the switch runs: the old container's name, or the one-off container's."""
        if row.where == IN_OLD:
            return plan.old[0].name if plan.old else ""
        return f"{self.project.name}-{plan.service}-{row.name}-{self.steps.deployment.id}"

    def release_step(self, plan: ComposePlan, row: ReleaseStage, where: str) -> None:
        """Run one release step, journalled and timed, keeping its last lines; DeployFailed if it fails."""
        env = {"GOPDATER_OLD_IMAGE": plan.outcome.old_image or "", "GOPDATER_NEW_IMAGE": plan.outcome.new_image or "",
               "GOPDATER_TAG": self.steps.deployment.key.tag}

        stage = row.stage

        def run() -> None:
            try:
                printed = self.docker.release_step(row.where == IN_ONE_OFF, plan.service, where,
                                                   plan.release.commands[stage], env, plan.release.timeout)
            except CommandError as error:
                self.steps.command_output(stage.value, error.output)
                raise
            self.steps.command_output(stage.value, printed.splitlines())
        self.steps.step(stage, run)

    # -- the switch: stop-first ---------------------------------------------------------------

    def stop_first(self, plan: ComposePlan) -> Outcome:
        """Replace the service's containers (post-update after), or roll back to the previous image."""
        try:
            self.replace(plan.service, plan.old, after=functools.partial(self.after_switch, plan))
        except DeployFailed as error:
            return self.roll_back(plan, plan.outcome._replace(reason=str(error)))
        return plan.outcome._replace(result=State.DRY_RUN if self.project.dry else State.UPDATED)

    def replace(self, service: str, old: Sequence[Container], prefix: str = "",
                after: Optional[Callable[[Sequence[str]], None]] = None) -> None:
        """Stop and remove the old containers, `compose up` the service, wait until it is ready, then after()
        (the post-update step) with the new containers' ids."""
        stopped = self.steps.clock()
        for container in old:
            self.containers.retire(container, self.steps, prefix)
        self.steps.step(Stage(prefix + "up"), lambda: self.docker.up(service))
        ids = self.container_ids(service)
        self.containers.wait_until_ready(ids, self.steps, stopped)
        if after is not None:
            after(ids)

    def container_ids(self, service: str) -> List[str]:
        """The ids of the service's containers now; DeployFailed if Compose cannot say."""
        try:
            return [c.id for c in self.docker.containers(service, labelled=False)]
        except CommandError as error:
            raise DeployFailed(f"wait failed: {error}") from None

    def roll_back(self, plan: ComposePlan, failed: Outcome) -> Outcome:
        """Tag the previous image under the service's image name again (a tracked service: its env file names the
        old tag again; the new tag is never moved), then recreate the service from it, health-gated."""
        log.error("%s update failed: %s; rolling back", self.steps.label, failed.reason)
        if not plan.previous:
            return failed._replace(reason=f"{failed.reason}; no previous image to roll back to, fix the service by "
                                          "hand")
        try:
            self.steps.step(Stage.ROLLBACK_TAG, lambda: self.containers.point(plan.previous, plan.image, plan.move,
                                                                               new=False))
            self.replace(plan.service, self.docker.containers(plan.service), prefix="rollback-")
        except (DeployFailed, CommandError) as error:
            reason = f"{failed.reason}; rollback failed too ({error}); run by hand: {self.by_hand(plan)}"
            log.error("%s ROLLBACK FAILED: %s", self.steps.label, reason)
            return failed._replace(reason=reason)
        log.warning("%s rolled back to %s; the failed image %s is kept for inspection", self.steps.label,
                    plan.previous[:19], failed.new_image)
        return self.follow_after(plan.dependents, failed._replace(result=State.ROLLED_BACK))

    def follow_after(self, dependents: Dependents, outcome: Outcome) -> Outcome:
        """The dependents follow a service that was rolled back or recovered; if one cannot, the outcome says so."""
        try:
            self.follow(dependents)
        except DeployFailed as error:
            log.error("%s %s", self.steps.label, error)
            return outcome._replace(reason=f"{outcome.reason + '; ' if outcome.reason else ''}{error}")
        return outcome

    def follow(self, dependents: Dependents) -> None:
        """Recreate the services in this one's network namespace and restart those that asked to, each health-gated
        and timed as `dependent <name>`; DeployFailed naming the first that fails."""
        if dependents.each():
            self.steps.remember(stage=Stage.DEPENDENTS)
        for name, how in dependents.each():
            started = self.steps.clock()
            try:
                (self.docker.recreate if how == RECREATED else self.docker.restart)(name)
                self.containers.wait_until_ready(self.container_ids(name), self.steps, None)
            except (DeployFailed, CommandError) as error:
                self.steps.record(f"dependent {name}", STEP_FAILED, started)
                raise DeployFailed(f"dependent {name} failed: {error}") from None
            self.steps.record(f"dependent {name}", how, started)

    def by_hand(self, plan: ComposePlan) -> str:
        """The commands that finish a rollback by hand."""
        move, where = plan.move, self.docker.location.working_dir
        env = f"set {move.variable}={move.old_tag} in {move.env_file} && " if move and move.env_file else ""
        return (f"{env}docker tag {plan.previous} {plan.image} && cd {where} && {' '.join(self.docker.command)} up -d "
                f"--no-deps {plan.service}")

    # -- the switch: start-first --------------------------------------------------------------

    def start_first(self, plan: ComposePlan) -> Outcome:
        """Each old container in turn: a new one beside it, off the networks until healthy, then switched in."""
        self.steps.remember(procedure=ComposeProcedure.START_FIRST.value)
        return self.switch_in_turn(plan)

    def switch_in_turn(self, plan: ComposePlan) -> Outcome:
        """start_first's switches (journalled under the procedure already open); the old container kept serving
        where one fails."""
        for container in plan.old:
            try:
                self.switch(plan, container)
            except DeployFailed as error:
                log.error("%s update failed: %s; the old container kept serving", self.steps.label, error)
                if plan.previous:
                    self.containers.put_back_tag(plan.previous, plan.image, self.steps, move=plan.move)
                return plan.outcome._replace(result=State.ROLLED_BACK, reason=str(error))
        return plan.outcome._replace(result=State.DRY_RUN if self.project.dry else State.UPDATED)

    def switch(self, plan: ComposePlan, old: Container) -> None:
        """Create a new container beside old, start it off the networks, wait, connect it, post-update, retire
        old."""
        new = self.create_beside(plan.service)
        self.steps.remember(old_container=old.name, new_container=new.name, networks=dict(new.networks))
        try:
            for network in new.networks:
                self.steps.step(Stage.ISOLATE, lambda n=network: self.engine.network("disconnect", n, new.name))
            self.steps.step(Stage.START, lambda: self.engine.start(new.name))
            self.containers.wait_until_ready([new.id], self.steps, None)
            for network, aliases in new.networks.items():
                self.steps.step(Stage.CONNECT, lambda n=network, a=aliases: self.engine.network(
                    "connect", n, new.name, a))
            self.after_switch(plan, [new.id])
        except DeployFailed:
            self.steps.step(Stage.DISCARD, lambda: self.engine.discard(new.name))
            raise
        started = self.steps.clock()
        self.steps.sleep(self.project.config.switch_delay)  # the reverse proxy's DNS must see the new one first
        self.steps.record(SWITCH, STEP_OK, started)
        self.containers.retire(old, self.steps)

    def create_beside(self, service: str) -> Container:
        """One more container of the service, created and not started; DeployFailed unless exactly one came."""
        before = self.docker.containers(service)
        self.steps.step(Stage.CREATE, lambda: self.docker.create_next(service, len(before) + 1))
        created = [c for c in self.docker.containers(service) if c.id not in {b.id for b in before}]
        if len(created) != 1:
            raise DeployFailed(f"create made {len(created)} containers, not one")
        return created[0]


# -- an operator's rollback: back to the image the service ran before its last update ----------


class ComposeRollback:
    """An operator's rollback: each service back on the image it ran before its last update, carried out as a
    push's update is (journalled, health-gated, start-first where asked, its dependents after it, put back on what
    it runs now if that fails; several services of one image as one group), without release steps: a migration
    runs forward only."""

    def __init__(self, project: ProjectAsRead, steps: StepLog):
        self.project, self.steps, self.one = project, steps, ComposeUpdate(project, steps)

    def run(self, services: Sequence[str], previous: Mapping[str, Previous]) -> Outcome:
        """Journal, plan (the image name, and a tracked service's env file, pointed at the previous image), switch,
        keep the image it ran until now in turn (so a second rollback goes forward again)."""
        if len(services) > 1:
            return ComposeGroupUpdate(self.project, self.steps, lambda s: self.plan(s, previous[s])).run(services)
        self.steps.begin(ComposeProcedure.REPLACE)
        plan = self.plan(services[0], previous[services[0]])
        if isinstance(plan, Outcome):
            return plan
        outcome = self.one.start_first(plan) if plan.start_first else self.one.stop_first(plan)
        if outcome.result is State.UPDATED:
            self.one.clean_up(plan)  # keeps what it ran; the image kept before is what runs now: never removed
        return outcome

    def plan(self, service: str, previous: Previous) -> Union[ComposePlan, Outcome]:
        """What runs now and what it goes back to, its image name pointed there; or why it cannot (nothing
        changed)."""
        plan = self.judged(service, previous)
        if isinstance(plan, Outcome):
            return plan
        try:
            # Journalled as a push's pull is: the image name moved, nothing switched (recovery leaves it there).
            self.steps.step(Stage.PULL, lambda: self.one.containers.point(previous.image, plan.pulled, plan.move,
                                                                           new=True))
        except DeployFailed as error:
            self.one.containers.put_back_tag(plan.previous, plan.image, self.steps, move=plan.move)
            return plan.outcome._replace(reason=f"{error}; nothing was switched")
        return plan

    def judged(self, service: str, previous: Previous) -> Union[ComposePlan, Outcome]:
        """What runs now and what it goes back to, or why it cannot (nothing was changed)."""
        try:
            old = tuple(self.steps.step(Stage.INSPECT, lambda: self.one.docker.containers(service)))
        except DeployFailed as error:
            return Outcome(reason=str(error))
        ids = tuple(sorted({c.image_id for c in old}))
        if not old or len(ids) != 1:
            return Outcome(reason="its containers do not run one image: nothing to roll back from; nothing changed")
        if not self.one.containers.has_image(previous.image):
            return Outcome(reason=f"the previous image {short_id(previous.image)} is no longer on the engine (removed "
                                  "by hand?); nothing was changed")
        move = self.tag_move(service, old[0].image, previous)
        plan = ComposePlan(service, old, old[0].image, ids, move, pulled=with_tag(old[0].image, move.new_tag)
                           if move else old[0].image)
        judged = self.one.judge_plan(plan, previous.image)
        return judged._replace(release=ReleaseSteps()) if isinstance(judged, ComposePlan) else judged

    def tag_move(self, service: str, image: str, previous: Previous) -> Optional[TagMove]:
        """A tracked service goes back to its previous tag, written into its env file as a push's new tag is."""
        tracking, current = self.project.tracked.get(service), parse_reference(image)
        if not previous.tag or tracking is None or tracking.problem or not tracking.variable or current is None or \
                current.tag == previous.tag:
            return None
        return TagMove(current.tag, previous.tag, tracking.env_file, tracking.variable)


# -- a group: several services of one project on one push, switched in turn, rolled back as one --


Failure = Tuple[ComposePlan, str]  # the service whose step failed, and why


class ComposeGroupUpdate:
    """The procedure for several services of one project that one push updates: planned together (each image
    pulled once), every pre-update and migrate before any switch, switched in Compose's order with their
    dependents, post-update once all are switched, and on any failure every switched service rolled back in
    reverse order: no mixed versions."""

    def __init__(self, project: ProjectAsRead, steps: StepLog,
                 planner: Optional[Callable[[str], Union[ComposePlan, Outcome]]] = None):
        self.project, self.steps, self.one = project, steps, ComposeUpdate(project, steps)
        self.planner = planner or self.one.plan  # an operator's rollback plans each service its own way

    def run(self, services: Sequence[str]) -> Outcome:
        """The group update, one step per line."""
        self.steps.begin(ComposeProcedure.GROUP)
        plans = self.plan_all(services)
        if isinstance(plans, Outcome) or not plans:
            return plans or self.unchanged(services)
        self.steps.remember(members=tuple(member_of(plan) for plan in plans))
        problem = next(filter(None, (plan.release.problem for plan in plans)), None) or self.before_switch(plans)
        if problem:
            return self.ended(plans, Outcome(reason=problem))
        return self.switch_then_post_update(plans)

    def switch_then_post_update(self, plans: Sequence[ComposePlan]) -> Outcome:
        """Switch each in turn, then every post-update; on a failure every switched service goes back; else the
        replaced images are cleaned up."""
        switched: List[ComposePlan] = []
        failure = self.switch_all(plans, switched) or self.post_update(plans)
        if failure:
            return self.roll_back(plans, switched, failure)
        for plan in plans:
            self.steps.service = plan.service
            self.one.clean_up(plan)
        return self.ended(plans, Outcome(State.DRY_RUN if self.project.dry else State.UPDATED))

    def plan_all(self, services: Sequence[str]) -> Union[List[ComposePlan], Outcome]:
        """Each service's plan (inspect, pull, compare); those unchanged or skipped end here; a failure ends
        the deployment before anything changed."""
        plans = []
        for service in services:
            self.steps.service = service
            plan = self.planner(service)
            if isinstance(plan, ComposePlan):
                plans.append(plan)
            elif plan.result is State.FAILED:
                return plan._replace(reason=f"{service}: {plan.reason}; nothing was switched")
            else:
                self.steps.member(service, plan)
        self.steps.service = ""
        return plans

    def unchanged(self, services: Sequence[str]) -> Outcome:
        """No service needs the push: up to date (or skipped, when every one was)."""
        outcomes = [self.steps.deployment.members.get(service) for service in services]
        skipped = all(outcome and outcome.result is State.SKIPPED for outcome in outcomes)
        first = outcomes[0] or Outcome()
        return first._replace(result=State.SKIPPED if skipped else State.UP_TO_DATE)

    def before_switch(self, plans: Sequence[ComposePlan]) -> Optional[str]:
        """Each tracked service's new tag into its env file, every pre-update, then each migrate; why one failed
        (nothing was switched; the image names and env files name the old images again), or None."""
        try:
            for plan in plans:
                self.steps.service = plan.service
                if plan.move is not None:
                    self.steps.step(Stage.SET_TAG, lambda p=plan: self.one.docker.write_env(
                        p.move.env_file, p.move.variable, p.move.new_tag))
            for row in (row for row in RELEASE_STAGES if row.when == BEFORE_SWITCH):
                for plan in (plan for plan in plans if row.stage in plan.release.commands):
                    self.steps.service = plan.service
                    self.one.release_step(plan, row, self.one.place(plan, row))
        except DeployFailed as error:
            self.put_back(plans)
            return f"{self.steps.service}: {error}; nothing was switched"
        return None

    def switch_all(self, plans: Sequence[ComposePlan], switched: List[ComposePlan]) -> Optional[Failure]:
        """Switch each service in turn, health-gated, its dependents (those outside the group) after it; the
        first failure, or None. A service is in switched from the moment its switch begins."""
        members = {plan.service for plan in plans}
        for plan in plans:
            self.steps.service = plan.service
            dependents = Dependents(*(tuple(n for n in names if n not in members) for names in plan.dependents))
            alone = plan._replace(release=without_after(plan.release), dependents=dependents)
            switched.append(plan)
            self.steps.remember(switched=tuple(p.service for p in switched))
            failure = self.switch(alone)
            if failure:
                return plan, failure
        return None

    def switch(self, plan: ComposePlan) -> Optional[str]:
        """One service switched (start-first where it asked, else stop-first); why it failed, or None."""
        if plan.start_first:
            outcome = self.one.switch_in_turn(plan)
            return None if outcome.result in (State.UPDATED, State.DRY_RUN) else outcome.reason or "it failed"
        try:
            self.one.replace(plan.service, plan.old, after=functools.partial(self.one.after_switch, plan))
        except DeployFailed as error:
            return str(error)
        return None

    def post_update(self, plans: Sequence[ComposePlan]) -> Optional[Failure]:
        """Every post-update, once all are switched, in each new container; the first failure, or None."""
        for plan in (plan for plan in plans if release_rows(plan.release, AFTER_SWITCH)):
            self.steps.service = plan.service
            try:
                self.one.after_switch(plan._replace(dependents=Dependents()), self.one.container_ids(plan.service))
            except DeployFailed as error:
                return plan, str(error)
        return None

    def roll_back(self, plans: Sequence[ComposePlan], switched: Sequence[ComposePlan], failure: Failure) -> Outcome:
        """Every switched service back on its previous image, in reverse order (each health-gated, its dependents
        after it), the others' env files as they were: the deployment rolled-back, naming the service that failed."""
        failed, why = failure
        reason = f"{failed.service}: {why}"
        back = []
        for plan in reversed(switched):
            self.steps.service = plan.service
            if plan.start_first and plan is failed:  # its old container kept serving: nothing to undo
                continue
            back.append(self.one.roll_back(plan, plan.outcome._replace(reason=reason)))
        self.put_back([plan for plan in plans if plan not in switched])
        return self.ended(plans, rolled_back(back, reason))

    def put_back(self, plans: Sequence[ComposePlan]) -> None:
        """The image names and env files of services never switched name their old images again."""
        for plan in plans:
            if plan.previous:
                self.one.containers.put_back_tag(plan.previous, plan.image, self.steps, journalled=False,
                                                 move=plan.move)

    def ended(self, plans: Sequence[ComposePlan], outcome: Outcome) -> Outcome:
        """Each service's part ends with the deployment; the deployment's outcome carries the first's images."""
        self.steps.service = ""
        for plan in plans:
            self.steps.member(plan.service, plan.outcome._replace(result=outcome.result, reason=outcome.reason))
        return plans[0].outcome._replace(result=outcome.result, reason=outcome.reason)


def rolled_back(back: Sequence[Outcome], reason: str) -> Outcome:
    """A group's outcome from its services' rollbacks: rolled-back if each was, else failed with their reasons."""
    failed = [o.reason for o in back if o.result is not State.ROLLED_BACK and o.reason != reason]
    return Outcome(State.FAILED if failed else State.ROLLED_BACK, reason="; ".join([reason, *failed]))


def member_of(plan: ComposePlan) -> Member:
    """What a group's journal record keeps of one service."""
    move = plan.move
    return Member(plan.service, plan.image, plan.previous, plan.outcome.new_image, move and move.old_tag,
                  move and move.new_tag, move and move.env_file, move and move.variable)


def without_after(release: ReleaseSteps) -> ReleaseSteps:
    """Release steps less those after the switch (a group runs them once every service is switched)."""
    after = {row.stage for row in RELEASE_STAGES if row.when == AFTER_SWITCH}
    return release._replace(commands={stage: argv for stage, argv in release.commands.items() if stage not in after})


# -- Compose recovery: what a crash left, made whole as the recovery table says ----------------


class ComposeRecovery:
    """Recovery of one Compose service from its journal record: one method per Action, chosen by plan()."""

    def __init__(self, project: ProjectAsRead, steps: StepLog):
        self.project, self.steps = project, steps
        self.docker, self.engine, self.containers = project.docker, project.engine, project.steps
        self.procedure = ComposeUpdate(project, steps)

    def run(self, service: str, record: Record) -> Outcome:
        """Make the service whole from its journal record, doing what plan() says for where it was cut off."""
        outcome = Outcome(old_image=record.old_image, new_image=record.new_image, old_tag=record.old_tag,
                          new_tag=record.new_tag)
        try:
            containers = self.steps.look("inspect", lambda: self.docker.containers(service))
        except DeployFailed as error:
            return outcome._replace(reason=str(error))
        action = plan(record, bool(containers) and all(c.status == "running" for c in containers))
        env_file = record.part.env_file
        if env_file and env_file not in self.docker.env_files():  # never a file a journal names
            return outcome._replace(reason=f"its journal record names {env_file[:200]}, not an env file of the "
                                           "project; nothing was run, check the service by hand")
        handler = COMPOSE_RECOVERY.get(action, ComposeRecovery.refuse)
        recovered = handler(self, Cut(service, record, tuple(containers), outcome))
        if action in (ComposeAction.LEAVE, ComposeAction.ROLL_BACK_GROUP) or recovered.result not in (
                State.RECOVERED, State.ROLLED_BACK):
            return recovered
        dependents = Dependents(record.part.network_dependents, record.part.restart_dependents)
        return self.procedure.follow_after(dependents, recovered)  # they joined, or restarted with, what runs now

    def leave(self, cut: "Cut") -> Outcome:
        """Cut off before anything changed (a tracked service's env file names the old tag again)."""
        running = bool(cut.containers) and all(c.status == "running" for c in cut.containers)
        self.agree(cut.record, False)
        if cut.record.stage in RELEASE_STEPS:
            return cut.outcome._replace(result=State.RECOVERED, reason=f"cut off during {cut.record.stage.value}; "
                                                                       "push again")
        return cut.outcome._replace(result=State.RECOVERED, reason="it was still running; left as it was" if running
                                    else "the update had changed nothing yet; left as it was")

    def judge_running(self, cut: "Cut") -> Outcome:
        """It runs again: judge it as a new container; roll back if it fails."""
        try:
            self.containers.wait_until_ready([c.id for c in cut.containers], self.steps, self.steps.clock())
        except DeployFailed as error:
            return self.roll_back(cut, str(error))
        back = {c.image_id for c in cut.containers} == {cut.record.old_image}
        self.agree(cut.record, not back)
        return cut.outcome._replace(result=State.ROLLED_BACK if back else State.RECOVERED,
                                    reason=f"{'the previous' if back else 'the new'} image was running healthy")

    def bring_up(self, cut: "Cut") -> Outcome:
        """Bring the service up on the new image; back on the old one if that fails or the image is gone."""
        record = cut.record
        try:
            if not record.image or not record.new_image or not self.containers.has_image(record.new_image):
                raise DeployFailed("the update was cut off before the new image was running")
            move = recorded_move(record)  # a tracked service's new image has its own tag: the old one stays
            image = with_tag(record.image, move.new_tag) if move else record.image
            self.steps.step(Stage.RECOVER_TAG, lambda: self.containers.point(record.new_image, image, move, new=True))
            self.procedure.replace(cut.service, cut.containers)
        except DeployFailed as error:
            return self.roll_back(cut, str(error))
        return cut.outcome._replace(result=State.RECOVERED, reason="the new image now runs healthy")

    def finish_rollback(self, cut: "Cut") -> Outcome:
        """The update had failed and was being rolled back: finish that."""
        return self.roll_back(cut, "the update had failed and was being rolled back")

    def roll_back(self, cut: "Cut", reason: str) -> Outcome:
        """Roll the service back to the image its record names, as the update itself would."""
        record = cut.record
        plan = ComposePlan(cut.service, cut.containers, record.image,
                           (record.old_image,) if record.old_image else (), recorded_move(record))
        return self.procedure.roll_back(plan, cut.outcome._replace(reason=reason))

    def agree(self, record: Record, new: bool) -> None:
        """A tracked service's env file names the tag that now runs (the new one, or the old); best effort."""
        self.agree_move(recorded_move(record), new)

    def agree_move(self, move: Optional[TagMove], new: bool) -> None:
        """A tag move's env file names its new tag, or its old one; best effort."""
        if move is None or not move.env_file or not move.variable:
            return
        try:
            self.steps.look(Stage.SET_TAG.value, lambda: self.docker.write_env(
                move.env_file, move.variable, move.new_tag if new else move.old_tag))
        except DeployFailed as error:
            log.error("%s %s; the env file may not name the tag that runs", self.steps.label, error)

    def settle(self, cut: "Cut") -> Outcome:
        """A start-first switch was cut off: keep exactly one healthy container, the old one if it still runs."""
        by_name = {c.name: c for c in cut.containers}
        old, new = by_name.get(cut.record.part.old_container or ""), by_name.get(cut.record.part.new_container or "")
        try:
            if old is not None and old.status == "running" or new is None:
                return self.keep_old(cut, old, new)
            if old is not None:
                self.steps.step(Stage.REMOVE, lambda: self.engine.remove(old.name))
            self.switch_in(cut.record, new)
        except DeployFailed as error:
            return self.roll_back(cut, str(error))
        self.agree(cut.record, True)
        return cut.outcome._replace(result=State.RECOVERED, reason="the new container now serves alone")

    def keep_old(self, cut: "Cut", old: Optional[Container], new: Optional[Container]) -> Outcome:
        """The old container still serves (or neither is there): discard the new one, keep the old image's name."""
        record = cut.record
        if new is not None:
            self.steps.step(Stage.DISCARD, lambda: self.engine.discard(new.name))
        if old is None or old.status != "running":
            raise DeployFailed("the switch was cut off with neither container running")
        if record.image and record.old_image:
            self.containers.put_back_tag(record.old_image, record.image, self.steps, move=recorded_move(record))
        return cut.outcome._replace(result=State.ROLLED_BACK, reason="the switch was cut off; the old container "
                                                                     "kept serving")

    def switch_in(self, record: Record, new: Container) -> None:
        """Finish switching the new container in: started, on its networks again, healthy."""
        if new.status != "running":
            self.steps.step(Stage.START, lambda: self.engine.start(new.name))
        for network, aliases in record.part.networks.items():
            if network not in new.networks:
                self.steps.step(Stage.CONNECT, lambda n=network, a=aliases: self.engine.network(
                    "connect", n, new.name, a))
        self.containers.wait_until_ready([new.id], self.steps, None)

    def roll_back_group(self, cut: "Cut") -> Outcome:
        """A deployment of several services cut off: each it had begun to switch back on its old image (in reverse
        order, health-gated, its dependents after it); the others' env files name their old tags again."""
        part, back = cut.record.part, []
        for member in reversed(part.members):
            self.steps.service = member.service
            if member.service not in part.switched:
                self.agree_move(member.move, False)
                continue
            plan = ComposePlan(member.service, (), member.image, (member.old_image,) if member.old_image else (),
                               member.move, dependents=self.project.dependents(member.service))
            back.append(self.procedure.roll_back(plan, cut.outcome._replace(reason="the update was cut off")))
        self.steps.service = ""
        if not back:
            return cut.outcome._replace(result=State.RECOVERED, reason="cut off before any service was switched; "
                                                                       "left as it was")
        failed = [o.reason for o in back if o.result is not State.ROLLED_BACK]
        return cut.outcome._replace(result=State.FAILED if failed else State.ROLLED_BACK, reason="; ".join(
            failed) or "the update of several services was cut off; each switched one is back on its previous image")

    def refuse(self, cut: "Cut") -> Outcome:
        return cut.outcome._replace(reason=f"its journal record ({cut.record.procedure} at "
                                           f"{cut.record.stage.value}) is not one Compose recovery knows; nothing "
                                           "was run, check the service by hand")


class Cut(NamedTuple):
    """Where an update of one Compose service was cut off: its record, its containers now, the outcome so far."""

    service: str
    record: Record
    containers: Tuple[Container, ...]
    outcome: Outcome


COMPOSE_RECOVERY: Dict[ComposeAction, Callable[[ComposeRecovery, Cut], Outcome]] = {
    ComposeAction.LEAVE: ComposeRecovery.leave, ComposeAction.JUDGE: ComposeRecovery.judge_running,
    ComposeAction.BRING_UP: ComposeRecovery.bring_up, ComposeAction.ROLL_BACK: ComposeRecovery.finish_rollback,
    ComposeAction.SETTLE: ComposeRecovery.settle, ComposeAction.ROLL_BACK_GROUP: ComposeRecovery.roll_back_group}


# -- the Compose project as read: services, containers, operator labels, tracking --------------


class ComposeProject(Target):
    """A Compose project as read: its services, their containers and operator labels, how each follows versions,
    and what it says of itself. Its update is a ComposeUpdate of one ComposePlan; its recovery a ComposeRecovery."""

    kind = "compose"

    def __init__(self, config: Config, docker: "Compose", version: str, engine: str = ""):
        super().__init__(config, engine)
        self.docker, self.engine, self.version = docker, docker.engine, version
        self.steps = ContainerSteps(config, docker)
        self.services: Tuple[str, ...] = ()
        self.containers: Dict[str, List[Container]] = {}
        self.orders: Mapping[str, Configured] = {}  # service: what the Compose file says of it (v2)
        self.tracked: Mapping[str, Tracking] = {}  # service: how it follows versions (gopdater.track)

    @property
    def name(self) -> str:
        """The project's name: as set, else as its containers' labels say, else as Compose names it by default."""
        labels = sorted({c.project for cs in self.containers.values() for c in cs})
        return self.docker.location.project_name or ", ".join(labels) or default_project_name(
            self.docker.location.working_dir)

    def refresh(self, busy: FrozenSet[Hashable] = frozenset(), full: bool = True) -> None:
        """Re-read the project, unless a deployment of it is in flight."""
        if self.lane(ServiceRef(self.kind, self.name, "")) not in busy:
            self.read()

    def take(self, listed: Sequence[Container]) -> None:
        """Its containers, as a listing of the whole host found them (the Compose file is not read again)."""
        self.containers = by_service(project_containers(listed), self.services)

    def read(self, listed: Optional[Sequence[Container]] = None) -> None:
        """Read the project (`compose config`, and `compose ps` and `docker inspect` unless its containers,
        inspected, are given)."""
        configured = self.docker.list_services()
        services = tuple(s for s in configured if s != self.docker.location.own_service)
        found = self.docker.containers() if listed is None else project_containers(listed)
        self.services, self.containers, self.orders = services, by_service(found, services), configured
        self.tracked = self.read_tracking()

    def refresh_around(self, ref: ServiceRef) -> None:
        """An update of one service changed only containers, its own and its dependents': re-read those (the
        Compose file is not read again); its dependents as the listing before the update found them."""
        touched = (ref.name, *(name for name, _ in self.dependents(ref.name).each()))
        self.containers = {**self.containers, **{name: self.docker.containers(name) for name in touched}}

    @property
    def start_first(self) -> FrozenSet[str]:
        """The services that asked for start-first updates, in the Compose file or by label."""
        return frozenset(s for s in self.services if self.orders.get(s, Configured()).order == "start-first" or
                         self.operator_labels(s).get("gopdater.order", "").strip() == "start-first")

    def operator_labels(self, service: str, containers: Optional[Sequence[Container]] = None) -> Mapping[str, str]:
        """A service's labels as the operator wrote them: the Compose file's (`compose config`, v2), else (v1,
        whose config is not read as data) its containers' less those their image carries (creator_labels).
        Every gopdater.* label is read through here."""
        configured = self.orders.get(service, Configured()).labels
        if configured is not None:
            return configured
        containers = self.containers.get(service, []) if containers is None else containers
        return containers[0].labels if containers else {}

    def ignored_labels(self, service: str) -> Tuple[str, ...]:
        """The gopdater.* labels a service's image carries, ignored (v1: they cannot be told from the operator's)."""
        if self.orders.get(service, Configured()).labels is not None:
            return ()
        return tuple(sorted({label for c in self.containers.get(service, []) for label in c.ignored}))

    def dependents(self, service: str) -> Dependents:
        """The services that follow this one: in its network namespace (by the Compose file, v2, or by their
        containers' network mode naming one of its containers, v1 too), or restarting with it (v2)."""
        mine = {ref for c in self.containers.get(service, []) for ref in (c.id, c.name)}
        others = [s for s in self.services if s != service]
        network = [s for s in others if self.joins(s, service, frozenset(mine))]
        restart = [s for s in others if s not in network and service in self.orders.get(s, Configured()).restarts_with]
        return Dependents(tuple(network), tuple(restart))

    def joins(self, dependent: str, service: str, containers: FrozenSet[str]) -> bool:
        """Whether a service runs in another's network namespace: its Compose file says so (v2), or one of its
        containers joined one of the other's (these ids and names)."""
        return (self.orders.get(dependent, Configured()).network_service == service or
                any(c.network_of in containers for c in self.containers.get(dependent, [])))

    def release_steps(self, service: str, old: Sequence[Container]) -> ReleaseSteps:
        """The service's release steps, from the operator's labels: commands never come from an image."""
        return release_steps(self.operator_labels(service, old))

    @property
    def runner(self) -> Runner:
        return self.docker.runner

    def running(self) -> List[Running]:
        found = []
        for service in self.services:
            containers = self.containers.get(service, [])
            image = parse_reference(containers[0].image) if containers else None
            found.append(Running(ServiceRef(self.kind, self.name, service), image, (self.operator_labels(service),),
                                 containers[0].image_id if containers else None, self.tracked.get(service)))
        return found

    def owns(self, ref: ServiceRef) -> bool:
        return ref.kind == self.kind and ref.project == self.name

    def lane(self, ref: ServiceRef) -> Hashable:
        """The whole project: two `compose up` of one project never run at once."""
        return (self.kind, ref.project)

    def order(self, refs: Iterable[ServiceRef]) -> List[ServiceRef]:
        """Compose's dependency order (depends_on, and a dependent after the service whose network it joins),
        then the name."""
        by_name = {ref.name: ref for ref in refs}
        after = {name: {*self.orders.get(name, Configured()).depends,
                        *(s for s in self.services if name in self.dependents(s).network)} & set(by_name)
                 for name in by_name}
        return [by_name[name] for name in dependency_order(after)]

    def engine_answers(self) -> bool:
        return self.engine.answers()

    def rolls_back(self, ref: ServiceRef) -> bool:
        return self.owns(ref)

    # -- version channels -----------------------------------------------------------------

    def read_tracking(self) -> Dict[str, Tracking]:
        """The services labelled gopdater.track, each with where its tag lives, or why it cannot follow versions
        (the raw Compose file is read only when one is labelled)."""
        labelled = {}
        for service in self.services:
            value = self.operator_labels(service).get(TRACK_LABEL)
            if (value or "").strip():
                labelled[service] = value
        try:
            raw = self.docker.raw_images() if labelled else {}
        except (CommandError, ValueError) as error:  # Compose v1 validates the file before filling variables in
            why = (f"Compose cannot read the Compose file with its variables left in ({error}): on Compose v1 a "
                   "variable where its schema wants a number (a port) does this; use Compose v2")
            return {service: label_tracking(value)._replace(problem=label_tracking(value).problem or why)
                    for service, value in labelled.items()}
        tracked = {service: self.tracking_of(service, value, raw.get(service)) for service, value in labelled.items()}
        return {service: tracking._replace(problem=tracking.problem or shared_variable(
            service, tracking, tracked, raw)) for service, tracking in tracked.items()}

    def tracking_of(self, service: str, value: str, raw: Optional[str]) -> Tracking:
        """How one labelled service follows versions: its channel, the variable that is its tag, its env file."""
        tracking = label_tracking(value)
        variable, problem = tag_variable(raw, service)
        if tracking.problem or variable is None:
            return tracking._replace(problem=tracking.problem or problem)
        if variable in self.docker.env:
            return tracking._replace(variable=variable, problem=f"{variable} is set in gopdater's own environment, "
                                                                "which Compose puts before the env file: take it out "
                                                                "of PASS_ENV")
        env_file, problem = env_file_for(self.docker, variable)
        return tracking._replace(variable=variable, env_file=env_file,
                                 problem=self.env_files_differ(service) or problem)

    def env_files_differ(self, service: str) -> Optional[str]:
        """Why the env files gopdater would write are not the ones the service was started with, or None."""
        folder = self.docker.location.working_dir
        for container in self.containers.get(service, []):
            named = container.labels.get("com.docker.compose.project.environment_file")
            started = tuple(os.path.join(folder, f) for f in (named or "").split(",") if f)
            if started and started != self.docker.env_files():
                return (f"the project was started with --env-file {named[:200]}, which gopdater does not read "
                        f"here: set PROJECTS={self.name}, so that Compose runs as the project was started")
        return None

    # -- what it says about itself --------------------------------------------------------

    def describe(self) -> List[Finding]:
        """Compose, the project and where it came from, and what would update each service."""
        where = self.docker.location
        found = [(True, f"compose: {' '.join(self.docker.command)} {self.version} ({compose_flavour(self.version)})"),
                 (True, f"project: {self.name} (from {where.project_name_source})"),
                 (True, f"compose file: {where.compose_file or DEFAULT} (from {where.compose_file_source})"),
                 (True, f"working directory: {where.working_dir} (from {where.working_dir_source})")]
        if where.own_service:
            found.append((True, f"own service {where.own_service} is left alone: gopdater does not update itself"))
        found += self.service_findings("service") + self.label_findings()
        if not any(triggers(self.config, s)[0] for s in self.running()):
            found.append((False, "no service would ever be updated: start the services with docker compose up -d, "
                                 "or set SERVICES"))
        return found

    def label_findings(self) -> List[Finding]:
        """What each service's labels ask for: release steps, versions followed, image labels ignored, start-first."""
        found = []
        for service in self.services:
            ref = ServiceRef(self.kind, self.name, service)
            release = self.release_steps(service, self.containers.get(service, []))
            if release.commands or release.problem:
                found.append((release.problem is None, f"service {ref}: {release.describe()}"))
            if service in self.tracked:
                found.append(tracking_finding(ref, self.tracked[service]))
            if self.ignored_labels(service):
                found.append((True, f"warning: service {ref}: {', '.join(self.ignored_labels(service))} carried by "
                                    "its image, ignored: on Compose v1 gopdater takes a label from the Compose file "
                                    "only where its value differs from the image's"))
            if self.dependents(service).each():
                found.append((True, f"service {ref}: {self.dependents(service).describe()}"))
            if service in self.start_first:
                refused = start_first_refusal(self.containers.get(service, []))
                found.append((True, f"service {ref}: start-first" + (
                    f" falls back to stop-first: {refused}" if refused else "")))
        return found

    def summary(self) -> str:
        """One line for the start-up log."""
        services = ",".join(f"{s.ref.name}={s.image}" if s.image else s.ref.name for s in self.running())
        return (f"compose={' '.join(self.docker.command)} {self.version} project={self.name} "
                f"dir={self.docker.location.working_dir} services={services}")

    # -- its update and its recovery ----------------------------------------------------

    def update(self, ref: ServiceRef, digest: Optional[str], steps: StepLog) -> Outcome:
        """The Compose update of one service (a ComposeUpdate), or of several of this project (a ComposeGroupUpdate)."""
        names = [member.name for member in steps.deployment.refs]
        if steps.deployment.action is Action.ROLLBACK:
            return ComposeRollback(self, steps).run(names, steps.deployment.previous)
        if len(names) > 1:
            return ComposeGroupUpdate(self, steps).run(names)
        return ComposeUpdate(self, steps).run(ref.name)

    def recover(self, ref: ServiceRef, record: Record, steps: StepLog) -> Outcome:
        """Recovery of one service from its journal record: a ComposeRecovery."""
        return ComposeRecovery(self, steps).run(ref.name, record)


# -- the Compose update: one plan, carried out step by step, rolled back as one ----------------


# -- every Compose project on the engine (PROJECTS), each run as in its own folder -------------


class HostListing(NamedTuple):
    """One listing of the host's Compose projects, beside what was known before it."""

    found: Mapping[str, Tuple[ComposeLocation, List[Container]]]  # project: where it lives, its containers
    known: Mapping[str, "ComposeProject"]  # project: as read before
    in_flight: FrozenSet[str]  # projects a deployment runs in: left as they are


class ComposeHost(Targets):
    """Every Compose project on the engine (PROJECTS=*), or those named, each run as in its own folder."""

    kind = "compose"

    def __init__(self, config: Config, command: Sequence[str], version: str, engine: str, runner: Runner,
                 own: Mapping[str, str]):
        super().__init__([])
        self.config, self.runner, self.engine_version = config, runner, engine
        self.command, self.version, self.own = list(command), version, own
        self.skipped: Dict[str, str] = {}  # project: why it cannot be updated from here

    def refresh(self, busy: FrozenSet[Hashable] = frozenset(), full: bool = True) -> None:
        """Find the projects from their containers' labels (one listing for all), then read each one that can be
        read here, DISCOVERY_READS at a time: every one if full, else the new ones (the others take their
        containers from the listing); one a deployment is in flight in is left as it is."""
        found = projects_on_engine(self.config, self.runner, self.own)
        known = {member.name: member for member in self.members}
        listing = HostListing(found, known, frozenset(n for n in {*found, *known} if (self.kind, n) in busy))
        skipped = self.skipped_in(listing)
        readable = [(name, known.get(name) or self.project_at(found[name][0]))
                    for name in self.wanted(listing) if name not in skipped]
        to_read = self.take_listed(listing, readable, full)
        skipped.update(self.read_all(to_read, found))
        self.members = [member for (name, member) in readable if name not in skipped]
        self.skipped = dict(sorted(skipped.items()))

    def wanted(self, listing: "HostListing") -> List[str]:
        """The projects to update: every one listed (and those in flight) for PROJECTS=*, else those named."""
        if self.config.projects == ("*",):
            return sorted(set(listing.found) | listing.in_flight)
        return list(self.config.projects or ())

    def skipped_in(self, listing: "HostListing") -> Dict[str, str]:
        """Each wanted project that cannot be updated from here, and why (one in flight is kept as it is)."""
        found = {name: self.problem(listing.found, name) for name in self.wanted(listing)}
        return {name: why for name, why in found.items() if why and name not in listing.in_flight}

    @staticmethod
    def take_listed(listing: "HostListing", readable: Sequence[Tuple[str, "ComposeProject"]], full: bool
                    ) -> List[Tuple[str, "ComposeProject"]]:
        """The projects to read again (every one if full, else the new ones); the others take their containers
        from the listing; one in flight is left as it is."""
        to_read = []
        for name, member in readable:
            if name in listing.in_flight:
                continue
            if full or name not in listing.known:
                to_read.append((name, member))
            else:
                member.take(listing.found[name][1])
        return to_read

    def read_all(self, to_read: Sequence[Tuple[str, "ComposeProject"]],
                 found: Mapping[str, Tuple[ComposeLocation, List[Container]]]) -> Dict[str, str]:
        """Read these projects, DISCOVERY_READS at a time; why each that cannot be read cannot."""
        with concurrent.futures.ThreadPoolExecutor(max(1, min(DISCOVERY_READS, len(to_read)))) as pool:
            problems = list(pool.map(lambda pair: self.read(pair[1], found[pair[0]][1]), to_read))
        return {name: problem for (name, _), problem in zip(to_read, problems) if problem}

    def problem(self, found: Mapping[str, Tuple[ComposeLocation, List[Container]]], name: str) -> Optional[str]:
        """Why a project cannot be updated from here, or None."""
        return unreadable(self.config, found[name][0]) if name in found else "no container of it is on this engine"

    def project_at(self, location: ComposeLocation) -> "ComposeProject":
        """A project not read yet, as Compose runs it in its own folder."""
        return ComposeProject(self.config, Compose(self.config, location, self.command, self.runner,
                                                   compose_flavour(self.version) == "v2"),
                              self.version, self.engine_version)

    @staticmethod
    def read(member: "ComposeProject", listed: Sequence[Container]) -> Optional[str]:
        """Re-read one project from the containers listed for it; why it cannot be read, or None."""
        try:
            member.read(listed)
        except (CommandError, EngineUnreachable, ValueError) as error:
            return f"Compose cannot read it ({error})"
        return None

    def describe(self) -> List[Finding]:
        found = [(True, f"projects: {', '.join(m.name for m in self.members) or 'none'} "
                        f"(PROJECTS={','.join(self.config.projects or ())})")]
        found += [(False, f"project {name} is skipped: {why}") for name, why in sorted(self.skipped.items())]
        return found + super().describe()

    def summary(self) -> str:
        return super().summary() or f"compose projects=none (PROJECTS={','.join(self.config.projects or ())})"


def projects_on_engine(config: Config, runner: Runner, own: Mapping[str, str]
                       ) -> Dict[str, Tuple[ComposeLocation, List[Container]]]:
    """Each Compose project with a container on the engine: where Compose keeps it, from the labels, and its
    containers, inspected (one `docker ps` and one `docker inspect` for the whole host)."""
    engine = Engine(config, runner)
    ids = engine.compose_container_ids()
    locations: Dict[str, ComposeLocation] = {}
    containers: Dict[str, List[Container]] = collections.defaultdict(list)
    for container in engine.containers(ids):
        name, labels = container.project, container.labels
        if not PROJECT_RE.fullmatch(name):
            continue
        containers[name].append(container)
        if name not in locations and labels.get("com.docker.compose.project.working_dir"):
            locations[name] = project_location(config, labels, own)
    return {name: (location, containers[name]) for name, location in locations.items()}


def project_location(config: Config, labels: Mapping[str, str], own: Mapping[str, str]) -> ComposeLocation:
    """Where a project lives, from one of its containers' labels, as `docker compose up -d` there would run."""
    folder = labels["com.docker.compose.project.working_dir"]
    files = [os.path.join(folder, f) for f in labels.get("com.docker.compose.project.config_files", "").split(",") if f]
    env_files = tuple(os.path.join(folder, f) for f in
                      labels.get("com.docker.compose.project.environment_file", "").split(",") if f)
    source = "labels of its containers"
    # gopdater leaves its own service alone when it works on its own project.
    mine = own.get("com.docker.compose.service") if own.get("com.docker.compose.project") == labels.get(
        "com.docker.compose.project") else None
    return ComposeLocation(labels["com.docker.compose.project"], source, path_separator(config).join(files) or None,
                           source, folder, source, mine, env_files)


def unreadable(config: Config, location: ComposeLocation) -> Optional[str]:
    """Why Compose could not read a project from here (its folder or files not visible, an env file outside
    its folder), or None."""
    if not os.path.isdir(location.working_dir):
        parent = os.path.dirname(location.working_dir.rstrip("/")) or "/"
        return (f"its folder {location.working_dir} is not visible here: mount it at the same path, "
                f"e.g. -v {parent}:{parent}")
    outside = next((p for p in location.env_files if outside_folder(p, location.working_dir)), None)
    if outside is not None:
        return (f"its env file {outside[:300]} lies outside its folder {location.working_dir} (links resolved): "
                "gopdater runs Compose with env files of the project's own folder only")
    return missing_files(config, location)


def missing_files(config: Config, location: ComposeLocation) -> Optional[str]:
    """Which of a project's Compose and env files cannot be read here, or None."""
    paths = [p for p in (location.compose_file or "").split(path_separator(config)) if p] + list(location.env_files)
    missing = [p for p in paths if not os.access(p, os.R_OK)]
    return f"{', '.join(missing)} cannot be read here: mount or fix it" if missing else None


# -- Swarm: what a Swarm update journals, and what recovery does at each stage -----------------


class SwarmProcedure(str, enum.Enum):
    """How a Swarm update changes a service."""

    SWARM = "swarm"  # docker service update, then Swarm's own UpdateStatus


class SwarmAction(enum.Enum):
    """What Swarm recovery does with a service an update left unfinished."""

    LEAVE = "leave"  # nothing had been asked of Swarm: record it as it was
    FOLLOW = "follow"  # Swarm went on alone: follow its update to the end


class SwarmPart(NamedTuple):
    """What only a Swarm update journals: Swarm's UpdateStatus.StartedAt before it, to tell its own update."""

    swarm_started: Optional[str] = None

    CHECKS = (("swarm_started", written(lambda v: True)),)

    @classmethod
    def from_stored(cls, data: Mapping[str, object]) -> "SwarmPart":
        return cls(**data)


SWARM_ROWS: RecoveryRows = {
    **{(SwarmProcedure.SWARM, s): (SwarmAction.LEAVE, SwarmAction.LEAVE) for s in (Stage.START, Stage.INSPECT)},
    **{(SwarmProcedure.SWARM, s): (SwarmAction.FOLLOW, SwarmAction.FOLLOW) for s in (Stage.UPDATE, Stage.ROLLBACK)},
}
RECORD_KINDS["swarm"] = RecordKind(SwarmPart, SWARM_ROWS, lambda data: SwarmProcedure.SWARM.value)


# -- Swarm: services updated by Swarm itself ---------------------------------------------------


class SwarmService(NamedTuple):
    """What `docker service inspect` says about one Swarm service."""

    id: str
    name: str
    stack: str
    image: str  # as Swarm stores it: ref:tag@sha256:...
    key: Optional[ImageKey]
    digest: Optional[str]
    labels: Mapping[str, str]
    replicas: Optional[int]  # None for a global service
    batches: int  # how many batches of update_config.parallelism an update takes
    update_state: str
    update_started: str
    update_message: str

    @classmethod
    def from_inspect(cls, data: dict) -> "SwarmService":
        image = str(dig(data, "Spec", "TaskTemplate", "ContainerSpec", "Image") or "")
        reference, _, digest = image.partition("@")
        replicas = dig(data, "Spec", "Mode", "Replicated", "Replicas")
        parallelism = dig(data, "Spec", "UpdateConfig", "Parallelism") or 0
        labels = dig(data, "Spec", "Labels") or {}
        status = [str(dig(data, "UpdateStatus", field) or "") for field in ("State", "StartedAt", "Message")]
        return cls(data.get("ID", ""), str(dig(data, "Spec", "Name") or ""),
                   labels.get("com.docker.stack.namespace", ""), image, parse_reference(reference), digest or None,
                   labels, replicas,
                   -(-(replicas or 1) // parallelism) if parallelism else 1, *status)


def swarm_tracking(labels: Mapping[str, str]) -> Optional[Tracking]:
    """How a Swarm service follows versions (its spec, where its image is kept, is the source of truth). Pure."""
    value = (labels.get(TRACK_LABEL) or "").strip()
    return label_tracking(value) if value else None


class SwarmMove(enum.Enum):
    """What following a Swarm update does next."""

    WAIT = "wait"
    UPDATED = "updated"  # completed, every task on the image
    ROLLED_BACK = "rolled-back"  # Swarm's rollback completed
    STUCK = "stuck"  # the rollback paused, or outlived its time
    ROLL_BACK = "roll-back"  # paused or late: ask Swarm to roll back


def swarm_move(state: str, tasks_run: bool, rolling_back: bool, limits: float) -> SwarmMove:
    """The next move, from Swarm's UpdateStatus.State, whether every task runs the image, whether gopdater asked
    for a rollback, and how many HEALTH_TIMEOUT limits have passed. Pure."""
    if state == "completed" and tasks_run:
        return SwarmMove.UPDATED
    if state == "rollback_completed":
        return SwarmMove.ROLLED_BACK
    if state == "rollback_paused" or (rolling_back and limits > 2):
        return SwarmMove.STUCK
    if not rolling_back and (state == "paused" or limits > 1):
        return SwarmMove.ROLL_BACK
    return SwarmMove.WAIT


def swarm_outcome(move: SwarmMove, service: "SwarmService", reason: Optional[str], outcome: Outcome) -> Outcome:
    """How a followed Swarm update ended. Pure."""
    if move is SwarmMove.UPDATED:
        return outcome._replace(result=State.UPDATED, new_image=service.image)
    if move is SwarmMove.ROLLED_BACK:
        return outcome._replace(result=State.ROLLED_BACK, reason=reason or service.update_message)
    return outcome._replace(reason=f"{reason or 'the rollback'}; Swarm's rollback did not finish: "
                                   f"{service.update_message}; see docker service ps {service.name}")


class SwarmServices(Target):
    """The engine's Swarm services, updated by Swarm itself: `docker service update --image`, then its state."""

    kind = "swarm"

    def __init__(self, config: Config, runner: Runner, engine: str):
        super().__init__(config, engine)
        self.runner, self.engine = runner, Engine(config, runner)
        self.services: Dict[str, SwarmService] = {}

    def inspect(self, names: Sequence[str]) -> List[SwarmService]:
        return [SwarmService.from_inspect(d) for d in self.engine.service_inspect(names)]

    def refresh(self, busy: FrozenSet[Hashable] = frozenset(), full: bool = True) -> None:
        found = self.inspect(self.engine.service_names())
        services = {s.name: s for s in found if SERVICE_RE.fullmatch(s.name)}
        kept = {name: s for name, s in self.services.items() if self.lane(self.ref(s)) in busy}
        self.services = {**services, **kept}

    def ref(self, service: "SwarmService") -> ServiceRef:
        return ServiceRef(self.kind, service.stack, service.name)

    def running(self) -> List[Running]:
        return [Running(self.ref(s), s.key, (s.labels,), s.digest, swarm_tracking(s.labels))
                for s in sorted(self.services.values())]

    def owns(self, ref: ServiceRef) -> bool:
        return ref.kind == self.kind

    def engine_answers(self) -> bool:
        return self.engine.answers()

    def update(self, ref: ServiceRef, digest: Optional[str], steps: StepLog) -> Outcome:
        """`docker service update --image <ref:tag> --with-registry-auth`, then follow Swarm's state."""
        steps.begin(SwarmProcedure.SWARM)
        try:
            before = steps.step(Stage.INSPECT, lambda: self.inspect([ref.name]))[0]
            target = self.target_of(before, digest, steps)
            if isinstance(target, Outcome):
                return target
            image, outcome = target
            steps.step(Stage.UPDATE, lambda: self.engine.service_update(ref.name, image))
            if self.dry:
                return outcome._replace(result=State.DRY_RUN)
            after = self.inspect([ref.name])[0]
            if after.image == before.image:
                return outcome._replace(result=State.UP_TO_DATE, new_image=after.image)
            return self.follow(ref.name, before.update_started, outcome._replace(new_image=after.image), steps)
        except DeployFailed as error:
            return Outcome(reason=str(error))

    def target_of(self, before: SwarmService, digest: Optional[str], steps: StepLog
                  ) -> Union[Tuple[str, Outcome], Outcome]:
        """The image to ask Swarm for (a tag, never the payload's digest: Swarm resolves it now, so a replay cannot
        move it backwards) and the outcome so far, journalled; or how the update ends before Swarm is asked."""
        outcome = Outcome(old_image=before.image)
        if digest and digest == before.digest:
            return outcome._replace(result=State.UP_TO_DATE, new_image=before.image)
        move = move_to(swarm_tracking(before.labels), before.key, steps.deployment.key.tag)
        if isinstance(move, str):
            return outcome._replace(result=State.SKIPPED, reason=move)
        reference = before.image.partition("@")[0]
        if digest and steps.failed_before(f"{reference}@{digest}"):
            return outcome._replace(result=State.SKIPPED, reason=f"{reference}@{digest} failed here before; "
                                                                 "push a new one")
        tags = {"old_tag": move.old_tag, "new_tag": move.new_tag} if move else {}
        steps.remember(old_image=before.image, swarm_started=before.update_started, **tags)
        return with_tag(reference, move.new_tag) if move else reference, outcome._replace(**tags)

    def follow(self, name: str, previous: str, outcome: Outcome, steps: StepLog) -> Outcome:
        """Follow UpdateStatus until it settles; roll back (`docker service rollback`) a paused or unhealthy one.
        Each batch of tasks gets HEALTH_TIMEOUT; a rollback gets as long again."""
        started, reason = steps.clock(), None
        for delay in backoff(POLL_FIRST, POLL_FACTOR, POLL_MAX):
            service = self.inspect([name])[0]
            state = service.update_state if service.update_started != previous else "pending"
            limit = self.config.health_timeout * max(1, service.batches)
            move = swarm_move(state, state == "completed" and self.tasks_run(service), bool(reason),
                              (steps.clock() - started) / limit)
            if move is SwarmMove.ROLL_BACK:
                reason = service.update_message if state == "paused" else f"not running after {limit:g}s"
                log.error("%s update failed: %s; rolling back", steps.label, reason)
                steps.step(Stage.ROLLBACK, lambda: self.engine.service_rollback(name))
            elif move is not SwarmMove.WAIT:
                steps.record(WAIT, STEP_OK if move is SwarmMove.UPDATED else STEP_FAILED, started)
                return swarm_outcome(move, service, reason, outcome)
            steps.sleep(delay)
        raise AssertionError("unreachable: backoff() never ends")

    def tasks_run(self, service: SwarmService) -> bool:
        """Whether every task Swarm wants running runs the service's image (and as many as its replicas)."""
        tasks = self.engine.service_tasks(service.name)
        running = [t for t in tasks if (t.get("Status") or {}).get("State") == "running" and
                   ((t.get("Spec") or {}).get("ContainerSpec") or {}).get("Image") == service.image]
        return bool(running) and len(running) == len(tasks) and service.replicas in (None, len(running))

    def recover(self, ref: ServiceRef, record: Record, steps: StepLog) -> Outcome:
        """Swarm kept going without us: do what plan() says for where the journal says it was."""
        outcome = Outcome(old_image=record.old_image, old_tag=record.old_tag, new_tag=record.new_tag)
        handler = SWARM_RECOVERY.get(plan(record, True), SwarmServices.refuse)
        return handler(self, ref.name, record, outcome, steps)

    def leave(self, name: str, record: Record, outcome: Outcome, steps: StepLog) -> Outcome:
        """Cut off before Swarm was asked for anything."""
        return outcome._replace(result=State.RECOVERED, reason="it was still running; left as it was")

    def follow_on(self, name: str, record: Record, outcome: Outcome, steps: StepLog) -> Outcome:
        """Swarm went on alone: follow its update (or its rollback) to the end."""
        try:
            followed = self.follow(name, record.part.swarm_started or "", outcome, steps)
        except DeployFailed as error:
            return outcome._replace(reason=str(error))
        return followed._replace(result=State.RECOVERED) if followed.result is State.UPDATED else followed

    def refuse(self, name: str, record: Record, outcome: Outcome, steps: StepLog) -> Outcome:
        return outcome._replace(reason=f"its journal record ({record.procedure} at {record.stage.value}) is not one "
                                       "Swarm recovery knows; nothing was run")

    def describe(self) -> List[Finding]:
        found = [(True, f"swarm: this engine is a manager; {len(self.services)} Swarm services")]
        for service in sorted(self.services.values()):
            names = (*map(release_label, RELEASE_STEPS), HOOK_TIMEOUT_LABEL)
            labelled = [name for name in names if name in service.labels]
            if labelled:
                found.append((False, f"Swarm service {service.name}: {', '.join(labelled)} is not supported on Swarm "
                                     "services yet and is ignored; Swarm's update_config is in charge there"))
            tracking = swarm_tracking(service.labels)
            if tracking is not None:
                found.append(tracking_finding(self.ref(service), tracking))
        return found + self.service_findings("Swarm service")

    def summary(self) -> str:
        return f"swarm={','.join(sorted(self.services)) or 'no services'}"


SWARM_RECOVERY: Dict[SwarmAction, Callable[..., Outcome]] = {
    SwarmAction.LEAVE: SwarmServices.leave, SwarmAction.FOLLOW: SwarmServices.follow_on}


# ==========================================================================================
# Reconciling: the registry asked what each tag names now, so that no push is missed
# ==========================================================================================
#
# A push made while gopdater was stopped, or whose webhook was lost, is still applied: after start-up
# recovery, every RECONCILE_INTERVAL and on POST /reconcile, each service the matcher would update is
# compared with what its tag names in the registry (HEAD of the manifest: no pull, nothing counted
# against pull limits), and one that is behind is queued exactly as a push would queue it.

RECONCILE_TIMEOUT = 10.0  # seconds one request to a registry may take, whole
RECONCILE_REGISTRIES = 4  # registries asked at once
REGISTRY_HEAD_MAX = 16 * 1024
REGISTRY_READ_BYTES = 64 * 1024
REGISTRY_BODY_MAX = 1024 * 1024  # a token, or one page of tags
TAG_PAGES_MAX = 10
MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"))
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_LOGIN = "https://index.docker.io/v1/"  # Docker Hub's key in the docker CLI's config
CHALLENGE_RE = re.compile(r'([A-Za-z_]+)="([^"]*)"')
LINK_NEXT_RE = re.compile(r'<(/v2/[^>]+)>\s*;\s*rel="?next"?')
HELPER_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}", re.ASCII)


class RegistryError(Exception):
    """A registry could not say what a tag names (the message says why); never a reason to change anything."""


class TooSoon(RegistryError):
    """A registry answered 429: ask it again no sooner than `seconds` from now."""

    def __init__(self, seconds: float):
        super().__init__(f"429 Too Many Requests: asked again in {seconds:g}s")
        self.seconds = seconds


class Reply(NamedTuple):
    """A registry's answer: its status, headers and (bounded) body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


# -- one request: a total deadline, a bounded answer, no redirect followed ---------------------


def registry_call(url: str, headers: Mapping[str, str], deadline: float, method: str = "GET") -> Reply:
    """One request, all of it before deadline (time.monotonic()); RegistryError for a broken, late or
    oversized answer. A redirect is answered as it is, never followed: credentials go nowhere else."""
    if not url.isprintable() or " " in url:  # a Link or a realm a registry sent: nothing may split the request line
        raise RegistryError("it named a URL with spaces or control characters")
    parts = urllib.parse.urlsplit(url)

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RegistryError(f"no answer within {RECONCILE_TIMEOUT:g}s")
        return remaining

    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}",
            f"User-Agent: gopdater/{__version__}",
            "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=left()) as plain:
            sock = plain
            if parts.scheme == "https":
                import ssl  # loaded by asyncio already; named here for the reader
                sock = ssl.create_default_context().wrap_socket(plain, server_hostname=parts.hostname)
            with sock:
                sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
                return read_reply(sock, left, method == "HEAD")
    except socket.timeout:
        raise RegistryError(f"no answer within {RECONCILE_TIMEOUT:g}s") from None
    except (OSError, ValueError) as error:
        raise RegistryError(f"cannot be reached ({type(error).__name__})") from None


def read_reply(sock: socket.socket, left: Callable[[], float], bodiless: bool) -> Reply:
    """Read one HTTP/1.1 answer: head up to 16 KiB, body up to 1 MiB (by Content-Length, chunks or close)."""
    import http.client
    data = bytearray()
    while b"\r\n\r\n" not in data:
        if len(data) > REGISTRY_HEAD_MAX:
            raise RegistryError("an answer head over 16 KiB")
        sock.settimeout(left())
        chunk = sock.recv(REGISTRY_READ_BYTES)
        if not chunk:
            raise RegistryError("the connection closed mid-answer")
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    line, _, fields = head.partition(b"\r\n")
    match = re.match(rb"HTTP/1\.[01] ([0-9]{3})", line)
    if match is None:
        raise RegistryError("not an HTTP answer")
    parsed = http.client.parse_headers(io.BytesIO(fields + b"\r\n\r\n"))
    status = int(match.group(1))
    if bodiless or status in (204, 304):
        return Reply(status, parsed, b"")
    body = read_body(sock, left, rest, parsed)
    return Reply(status, parsed, body)


def read_body(sock: socket.socket, left: Callable[[], float], data: bytes, headers) -> bytes:
    """The body after the head: whole, or RegistryError past REGISTRY_BODY_MAX (an endless answer)."""
    length = headers.get("Content-Length")
    chunked = "chunked" in (headers.get("Transfer-Encoding") or "").lower()
    if length is not None and (not DIGITS_RE.fullmatch(length) or int(length) > REGISTRY_BODY_MAX):
        raise RegistryError("an answer over 1 MiB")
    size = int(length) if length is not None else None
    buffer = bytearray(data)
    while not body_ends(buffer, size, chunked):
        sock.settimeout(left())
        chunk = sock.recv(REGISTRY_READ_BYTES)
        if not chunk:
            break
        buffer += chunk
    return unchunk(bytes(buffer)) if chunked else bytes(buffer[:size])


def body_ends(buffer: bytes, size: Optional[int], chunked: bool) -> bool:
    """Whether an answer's body has all come (its size, or the last chunk); RegistryError past the limit."""
    if len(buffer) > REGISTRY_BODY_MAX + 64:
        raise RegistryError("an answer over 1 MiB")
    return (size is not None and len(buffer) >= size) or (chunked and buffer.endswith(b"0\r\n\r\n"))


def unchunk(data: bytes) -> bytes:
    """A chunked body, joined; RegistryError if it is not one."""
    body, at = bytearray(), 0
    while True:
        end = data.find(b"\r\n", at)
        try:
            size = int(data[at:end].split(b";")[0], 16)
        except ValueError:
            raise RegistryError("a broken chunked answer") from None
        if size == 0:
            return bytes(body)
        body += data[end + 2:end + 2 + size]
        at = end + 4 + size


# -- who may ask: the docker CLI's logins, and the token flow ----------------------------------


def registry_login(registry: str, config: Config, runner: Runner) -> Optional[Tuple[str, str]]:
    """The user and password the docker CLI would use for a registry (DOCKER_CONFIG's config.json: auths,
    credsStore, credHelpers through `docker-credential-<name> get`), or None: ask anonymously."""
    stored = docker_config(config)
    keys = (DOCKER_HUB_LOGIN, "index.docker.io", DOCKER_HUB) if registry == DOCKER_HUB else (
        registry, f"https://{registry}", f"http://{registry}")
    helper = next(filter(None, (text_at(stored, "credHelpers", k) for k in keys)), stored.get("credsStore"))
    if isinstance(helper, str) and HELPER_RE.fullmatch(helper):
        return helper_login(helper, keys[0], config, runner)
    entry = next((dig(stored, "auths", k) for k in keys if isinstance(dig(stored, "auths", k), dict)), {})
    try:
        user, sep, password = base64.b64decode(str(entry.get("auth") or ""), validate=True).decode().partition(":")
    except ValueError:
        return None
    return (user, password) if sep else None


def text_at(data: object, *path: str) -> Optional[str]:
    """dig(), where only a string is wanted."""
    found = dig(data, *path)
    return found if isinstance(found, str) else None


def docker_config(config: Config) -> dict:
    """The docker CLI's config.json (DOCKER_CONFIG, else ~/.docker), or {} if there is none to read."""
    folder = config.environ.get("DOCKER_CONFIG") or os.path.join(config.environ.get("HOME") or "/root", ".docker")
    try:
        with open(os.path.join(folder, "config.json"), "rb") as handle:
            stored = json.loads(handle.read(REGISTRY_BODY_MAX))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def helper_login(helper: str, server: str, config: Config, runner: Runner) -> Optional[Tuple[str, str]]:
    """Ask a credential helper (`docker-credential-<helper> get`, the server on its stdin); None if it has none."""
    try:
        answer = json.loads(Engine(config, runner).credentials(helper, server))
    except (CommandError, EngineUnreachable, ValueError):
        return None
    if isinstance(answer, dict) and isinstance(answer.get("Username"), str) and isinstance(answer.get("Secret"), str):
        return answer["Username"], answer["Secret"]
    return None


def basic_authorization(login: Tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()


def bearer_token(challenge: Mapping[str, str], login: Optional[Tuple[str, str]], deadline: float) -> str:
    """A token from the realm a registry's challenge names (its service and scope asked), with the login only
    where the realm is HTTPS or on this host."""
    realm = urllib.parse.urlsplit(challenge.get("realm", ""))
    if realm.scheme not in ("http", "https") or not realm.hostname:
        raise RegistryError("its token realm is not an http(s) URL")
    query = urllib.parse.urlencode({k: v for k, v in challenge.items() if k in ("service", "scope")})
    url = urllib.parse.urlunsplit((realm.scheme, realm.netloc, realm.path or "/", "&".join(
        filter(None, (realm.query, query))), ""))
    safe = realm.scheme == "https" or loopback(realm.hostname)
    reply = registry_call(url, {"Authorization": basic_authorization(login)} if login and safe else {}, deadline)
    token = token_in(reply)
    if token is None:
        raise RegistryError(f"its token service answered {reply.status} without a token")
    return token


def token_in(reply: "Reply") -> Optional[str]:
    """The token a token service's answer carries (token, or OAuth's access_token), if it is one to send on."""
    try:
        answer = json.loads(reply.body) if reply.status == 200 else None
    except ValueError:
        return None
    token = (answer.get("token") or answer.get("access_token")) if isinstance(answer, dict) else None
    ok = isinstance(token, str) and token and token.isascii() and not any(c in token for c in "\r\n ")
    return token if ok else None


def loopback(host: str) -> bool:
    """Whether a host name or address is this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class RegistryClient(NamedTuple):
    """How one registry is asked: its base URL (http only where Docker itself would) and the login to use."""

    base: str
    login: Optional[Tuple[str, str]]

    def call(self, path: str, method: str, deadline: float) -> Reply:
        """A request with the Accept types of every manifest, authenticated as the registry's 401 asks."""
        accept = {"Accept": MANIFEST_ACCEPT}
        reply = registry_call(self.base + path, accept, deadline, method)
        if reply.status == 401:
            scheme, _, params = (reply.headers.get("WWW-Authenticate") or "").partition(" ")
            challenge = dict(CHALLENGE_RE.findall(params))
            if scheme.lower() == "bearer":
                authorization = "Bearer " + bearer_token(challenge, self.login, deadline)
            elif scheme.lower() == "basic" and self.login:
                authorization = basic_authorization(self.login)
            else:
                raise RegistryError("401 Unauthorized: give the docker CLI a login for it (docker login)")
            reply = registry_call(self.base + path, {**accept, "Authorization": authorization}, deadline, method)
        if reply.status == 429:
            retry = reply.headers.get("Retry-After") or ""
            raise TooSoon(min(float(retry), 86400.0) if DIGITS_RE.fullmatch(retry) else 60.0)
        if reply.status != 200:
            raise RegistryError(f"answered {reply.status}" + (" (a redirect is not followed)"
                                                               if 300 <= reply.status < 400 else ""))
        return reply

    def digest(self, key: ImageKey) -> str:
        """What the tag names now: the digest of its manifest (a multi-platform image's index)."""
        reply = self.call(f"/v2/{key.repository}/manifests/{key.tag}", "HEAD", time.monotonic() + RECONCILE_TIMEOUT)
        digest = reply.headers.get("Docker-Content-Digest") or ""
        if not DIGEST_RE.fullmatch(digest):
            raise RegistryError("its answer names no digest")
        return digest

    def tags(self, repository: str) -> List[str]:
        """The repository's tags, page after page (Link: rel="next", on this registry only), at most 10 pages."""
        found, path = [], f"/v2/{repository}/tags/list?n=1000"
        for _ in range(TAG_PAGES_MAX):
            reply = self.call(path, "GET", time.monotonic() + RECONCILE_TIMEOUT)
            try:
                page = json.loads(reply.body).get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError("its tag list is not JSON") from None
            found += [tag for tag in page if isinstance(tag, str) and TAG_RE.fullmatch(tag)]
            link = LINK_NEXT_RE.search(reply.headers.get("Link") or "")
            if link is None:
                return found
            path = link.group(1)
        return found


def insecure_registries(info: Mapping[str, object]) -> Callable[[str], bool]:
    """Whether Docker itself talks plain HTTP to a registry: `docker info`'s RegistryConfig (IndexConfigs
    marked not Secure, InsecureRegistryCIDRs), and this host. Pure."""
    import ipaddress
    indexes = info.get("IndexConfigs") if isinstance(info.get("IndexConfigs"), dict) else {}
    networks = []
    for cidr in info.get("InsecureRegistryCIDRs") or ():
        with contextlib.suppress(ValueError, TypeError):
            networks.append(ipaddress.ip_network(cidr))

    def plain(registry: str) -> bool:
        host = urllib.parse.urlsplit(f"//{registry}").hostname or ""
        entry = indexes.get(registry)
        if isinstance(entry, dict) and entry.get("Secure") is False:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host == "localhost"
        return address.is_loopback or any(address in network for network in networks)
    return plain


# -- a round: what is asked, what the answers mean, what is queued -----------------------------


class Asked(NamedTuple):
    """What reconciling asks for one service: the tag (a tracked service: its repository's tags), or why none."""

    service: Running
    key: Optional[ImageKey]
    why: str = ""


def reconcile_plan(config: Config, services: Sequence[Running], pending: FrozenSet[ServiceRef]) -> List[Asked]:
    """Each service's question, by the one matcher hooks use (OWNER, SERVICES, gopdater.enable, tracking), or
    why it is not asked; one with a deployment queued or running is left to it. Pure."""
    plan = []
    for service in services:
        keys, why = triggers(config, service)
        if keys and service.image is None:
            why = "no running container with a tagged image"
        elif keys and not any(key[:2] == service.image[:2] for key in keys):
            why = f"SERVICES maps it to another image than it runs ({service.image}): that one cannot be compared"
        elif keys and service.ref in pending:
            why = "a deployment of it is queued or running"
        key = service.image if keys and not why else None
        plan.append(Asked(service, key, why))
    return plan


def tracks(service: Running) -> bool:
    return service.tracking is not None and service.tracking.channel is not None


def newest_in_channel(tracking: Tracking, current: str, tags: Iterable[str]) -> Optional[str]:
    """The newest tag a push would move a tracked service to, or None. Pure."""
    taken = [tag for tag in tags if channel_verdict(tracking.channel, current, tag) is None]
    return functools.reduce(newer_tag, taken) if taken else None


def behind(asked: Asked, answer: Union[str, List[str]], running: FrozenSet[str],
           failed: FrozenSet[Tuple[ServiceRef, str]]) -> Optional[PushEvent]:
    """The push a service is behind by, or None: another digest than it runs (unless that digest failed here
    before), or for a tracked service a newer tag in its channel. Pure."""
    if tracks(asked.service):
        newest = newest_in_channel(asked.service.tracking, asked.key.tag, answer)
        return PushEvent("reconcile", asked.key._replace(tag=newest)) if newest else None
    if answer in running or (asked.service.ref, answer) in failed:
        return None
    return PushEvent("reconcile", asked.key, answer)


def spec_digests(services: Sequence[Running]) -> Dict[ServiceRef, FrozenSet[str]]:
    """The digest each Swarm service's spec pins (what it runs). Pure."""
    return {s.ref: frozenset({s.image_id}) for s in services if s.ref.kind == "swarm" and s.image_id}


def own_digests(service: Running, repo_digests: Sequence[object]) -> FrozenSet[str]:
    """The digests of a service's image in its own repository, from the image's RepoDigests. Pure."""
    found = set()
    for entry in repo_digests:
        name, _, digest = str(entry).partition("@")
        if parse_name(name) == (service.image.registry, service.image.repository):
            found.add(digest)
    return frozenset(found)


def failed_digests(views: Iterable[Mapping[str, object]]) -> FrozenSet[Tuple[ServiceRef, str]]:
    """The (service, digest) pairs a deployment with a digest ended failed, rolled back or skipped (each service of
    a deployment of several). Pure."""
    return frozenset((ServiceRef(str(v.get("kind")), v.get("project") or "", str(name)), v["digest"])
                     for v in views if v.get("state") in FAILED_STATES and isinstance(v.get("digest"), str)
                     for name in view_services(v))


class Reconciler:
    """Asks the registries what each managed tag names now, in rounds; queues the services found behind."""

    def __init__(self, config: Config, queue: WorkQueue, runner: Runner = run_command,
                 client: Optional[Callable[[str], RegistryClient]] = None):
        self.config, self.queue, self.runner = config, queue, runner
        self.client = client or self.client_for
        self.wanted = threading.Event()  # POST /reconcile, or the first round after start-up
        self.report = Report()
        self.not_before: Dict[str, float] = {}  # registry: when it may be asked again (429)
        self.plain: Callable[[str], bool] = insecure_registries({})

    def asks(self) -> List[str]:
        """The tags a round would ask the registries about, each once."""
        return sorted({str(item.key) for item in self.plan() if item.key is not None})

    def ask_now(self) -> None:
        """A round as soon as the reconciling thread can (POST /reconcile)."""
        self.wanted.set()

    def plan(self) -> List[Asked]:
        return reconcile_plan(self.config, self.queue.target.running(), self.queue.pending())

    def run_forever(self) -> None:
        """A round after start-up recovery, then every RECONCILE_INTERVAL (0: none but those asked for), and
        whenever POST /reconcile asks; a round that fails is logged, and the next runs as planned."""
        interval = self.config.reconcile_interval or None
        if interval:
            self.wanted.set()
        while not self.queue.stopping:
            self.wanted.wait(interval)
            self.wanted.clear()
            try:
                self.round()
            except Exception:  # a bug must not end reconciling for good
                log.exception("a reconcile round failed; the next one runs as planned")

    def round(self) -> Report:
        """One round: the plan, one question per registry/repository:tag (4 registries at once), the verdicts;
        its report, kept as the last."""
        asked = [a for a in self.plan() if a.key is not None]
        self.plain = insecure_registries(self.registry_config())
        questions: Dict[str, Dict[Tuple[str, str, Optional[str]], None]] = {}
        for item in asked:
            key = item.key
            questions.setdefault(key.registry, {})[(key.repository, None if tracks(item.service) else key.tag)] = None
        wanted = [list(q) for q in questions.values()]
        if len(questions) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(RECONCILE_REGISTRIES, len(questions))) as pool:
                answers = dict(zip(questions, pool.map(self.ask, questions, wanted)))
        else:  # one registry, the usual case: no thread is started (each costs the C heap an arena)
            answers = dict(zip(questions, map(self.ask, questions, wanted)))
        errors = {registry: str(answer) for registry, answer in answers.items() if isinstance(answer, RegistryError)}
        found = self.queue_behind(asked, answers)
        report = self.report = Report(_now(), len(asked), tuple(found), errors, self.report.rounds + 1)
        log.info("reconcile: asked the registry for %d services: %d behind%s%s", report.asked, len(found),
                 f" ({', '.join(found)})" if found else "",
                 "".join(f"; {registry} failed: {why}" for registry, why in sorted(errors.items())))
        return report

    def ask(self, registry: str, wanted: List[Tuple[str, Optional[str]]]) -> Union[Dict, RegistryError]:
        """Every question for one registry, in turn; the first error ends its round (logged once, not per service)."""
        if time.monotonic() < self.not_before.get(registry, 0.0):
            return RegistryError("answered 429 earlier: not asked again yet")
        try:
            client, found = self.client(registry), {}
            for repository, tag in wanted:
                found[(repository, tag)] = client.tags(repository) if tag is None else client.digest(
                    ImageKey(registry, repository, tag))
            return found
        except TooSoon as error:
            self.not_before[registry] = time.monotonic() + error.seconds
            return error
        except RegistryError as error:
            return error

    def queue_behind(self, asked: Sequence[Asked], answers: Mapping[str, object]) -> List[str]:
        """Submit each service that is behind, as a push of what it is behind by would; their names."""
        running = self.running_digests([a.service for a in asked if not tracks(a.service)])
        failed, found = failed_digests(self.queue.views()), []
        for item in asked:
            answer = answers.get(item.key.registry)
            key = (item.key.repository, None if tracks(item.service) else item.key.tag)
            if not isinstance(answer, dict) or key not in answer:
                continue
            event = behind(item, answer[key], running.get(item.service.ref, frozenset()), failed)
            if event is None:
                continue
            for deployment, _ in self.queue.submit(event, only=frozenset({item.service.ref})) or ():
                log.info("reconcile: service=%s is behind %s%s: deployment=%s trigger=reconcile", item.service.ref,
                         event.image, f" ({event.digest})" if event.digest else "", deployment.id)
                found.append(str(item.service.ref))
        return found

    def running_digests(self, services: Sequence[Running]) -> Dict[ServiceRef, FrozenSet[str]]:
        """The digests each service runs, for its own repository: a Swarm service's from its spec, a container's
        from its image's RepoDigests (one `docker image inspect` for all)."""
        found = spec_digests(services)
        rest = [s for s in services if s.ref not in found and s.image_id]
        listed = self.repo_digests(sorted({s.image_id for s in rest}))
        found.update((s.ref, own_digests(s, listed.get(s.image_id, []))) for s in rest)
        return {ref: digests for ref, digests in found.items() if digests}

    def repo_digests(self, images: Sequence[str]) -> Mapping[str, List[str]]:
        """The RepoDigests of these images (one `docker image inspect` for all); {} if they cannot be read."""
        if not images:
            return {}
        try:
            return Engine(self.config, self.runner).repo_digests(images)
        except (CommandError, EngineUnreachable, ValueError) as error:
            log.warning("reconcile: the running images' digests cannot be read (%s)", error)
            return {}

    def registry_config(self) -> Mapping[str, object]:
        """`docker info`'s RegistryConfig (insecure registries), or {} if the engine does not say."""
        try:
            info = Engine(self.config, self.runner).info("RegistryConfig")
        except (CommandError, EngineUnreachable, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def client_for(self, registry: str) -> RegistryClient:
        """How to ask a registry: HTTPS unless Docker itself would not, with the docker CLI's login for it."""
        host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        return RegistryClient(f"{'http' if self.plain(registry) else 'https'}://{host}",
                              registry_login(registry, self.config, self.runner))


# ==========================================================================================
# Notifications: what gopdater tells the outside about each deployment
# ==========================================================================================

NOTIFY_TIMEOUT, NOTIFY_RETRY_DELAY = 5.0, 1.0
REASON_MAX = 2000  # characters of a deployment's reason kept (it may quote a command's stderr)
NOTIFY_BODY_MAX = 64 * 1024  # bytes of one notification's body at most: LOG_TAIL_LINES lines of LINE_MAX and more


SENTENCES = {
    State.UPDATED: "gopdater updated {service} to {image} in {seconds:.1f} s.",
    State.RECOVERED: "gopdater recovered {service} after an interrupted update ({reason}).",
    State.ROLLED_BACK: "gopdater rolled {service} back: {image} failed ({reason}).",
    State.FAILED: "gopdater could not update {service} to {image}: {reason}.",
    State.SKIPPED: "gopdater skipped {service}: {reason}.",
    State.UP_TO_DATE: "{service} already runs {image}.",
    State.DRY_RUN: "gopdater would have updated {service} to {image} (DRY_RUN).",
    State.WAITING: "gopdater will update {service} to {image}: {reason}.",
    State.REJECTED: "The update of {service} to {image} was rejected by an operator.",
    State.EXPIRED: "The update of {service} to {image} expired: {reason}.",
    State.HELD: "{service} is held by an operator: pushes and reconciling leave it alone until it is resumed.",
    State.RESUMED: "{service} is resumed by an operator: pushes update it again.",
}
OPERATOR_SENTENCES = {  # (a deployment's action, its result): the sentence, where it is not SENTENCES'
    (Action.ROLLBACK, State.UPDATED): "An operator rolled {service} back to the image it ran before ({new}) in "
                                      "{seconds:.1f} s.",
    (Action.ROLLBACK, State.ROLLED_BACK): "An operator's rollback of {service} failed; it runs what it ran before "
                                          "({reason}).",
}


def notification(deployment: Deployment, outcome: Outcome, seconds: float, secret: str = "") -> dict:
    """The JSON summary of one service's outcome, with a one-sentence text chat tools show as it is; the secret
    is taken out of every string (a command's output could hold anything)."""
    reason = outcome.reason and outcome.reason[:REASON_MAX]
    template = OPERATOR_SENTENCES.get((deployment.action, outcome.result), SENTENCES[outcome.result])
    sentence = template.format(service=", ".join(map(str, deployment.refs)), image=deployment.key, seconds=seconds,
                               reason=reason, new=short_id(outcome.new_image))
    payload = {"deployment": deployment.id, "kind": deployment.ref.kind, "project": deployment.ref.project or None,
            "service": deployment.ref.name, "services": [ref.name for ref in deployment.refs],
            "trigger": trigger(deployment.sender), "action": deployment.action.value,
            "image": f"{deployment.key.registry}/{deployment.key.repository}",
            "tag": deployment.key.tag, "digest": deployment.digest, "result": outcome.result.value,
            "old_image": outcome.old_image, "new_image": outcome.new_image, "old_tag": outcome.old_tag,
            "new_tag": outcome.new_tag, "seconds": round(seconds, 3),
            "durations": {s.step: s.seconds for s in deployment.steps}, "reason": reason,
            "logs": [line[:LINE_MAX] for line in deployment.logs[-LOG_TAIL_LINES:]], "text": sentence}
    return without_secret(payload, secret)


def without_secret(payload: dict, secret: str) -> dict:
    """The payload with the secret taken out of every string, and of every string in a list."""
    if not secret:
        return payload
    clean = lambda value: value.replace(secret, "***") if isinstance(value, str) else value  # noqa: E731
    return {k: [clean(v) for v in value] if isinstance(value, list) else clean(value) for k, value in payload.items()}


def notifying(config: Config, send: Callable[[str, dict], bool]) -> Tell:
    """What the work queue tells as each deployment ends: its notification, sent to each NOTIFY_URL when
    NOTIFY_ON names its result."""
    def tell(deployment: Deployment, outcome: Outcome, seconds: float) -> None:
        if outcome.result.value in config.notify_on and config.notify_url:
            payload = notification(deployment, outcome, seconds, config.secret)
            for url in config.notify_url:
                send(url, payload)
    return tell


# -- what each service renders: the format follows from the URL, or its #fragment --------------

RESULT_LOOK = {  # result: (Discord colour, ntfy tag, ntfy and Gotify priority)
    State.UPDATED: (0x2E7D32, "white_check_mark", 3), State.RECOVERED: (0x1565C0, "wrench", 3),
    State.ROLLED_BACK: (0xEF6C00, "rewind", 4), State.FAILED: (0xC62828, "x", 5)}


def message_fields(payload: dict) -> List[Tuple[str, str]]:
    """The facts of one outcome, as (name, value), in the order every format shows them."""
    fields = [("Service", f"{payload['project']}/{payload['service']}" if payload["project"] else payload["service"]),
              ("Image", f"{payload['image']}:{payload['tag']}"), ("Result", payload["result"]),
              ("Took", f"{payload['seconds']:.1f} s"), ("Old image", short_id(payload["old_image"])),
              ("New image", short_id(payload["new_image"]))]
    if payload.get("new_tag"):
        fields.insert(2, ("Version", f"{payload['old_tag']} -> {payload['new_tag']}"))
    return fields + ([("Reason", payload["reason"])] if payload["reason"] else [])


def plain_message(payload: dict) -> str:
    """Title, facts and the last lines as plain text (ntfy, Gotify, Telegram, e-mail)."""
    lines = [payload["text"], ""] + [f"{name}: {value}" for name, value in message_fields(payload)]
    return "\n".join(lines + ([""] + ["Last lines:"] + payload["logs"] if payload["logs"] else []))


def title(payload: dict) -> str:
    service = f"{payload['project']}/{payload['service']}" if payload["project"] else payload["service"]
    return f"gopdater: {service} {payload['result']}"


def as_json(value: object) -> Tuple[str, bytes, Tuple[Tuple[str, str], ...]]:
    return "application/json", json.dumps(value).encode(), ()


# What a reason or a printed line carries must stay text in chat: no mention, no link, no markup. Slack
# and Mattermost read &<> as markup (<!channel>, <url|text>) and Mattermost @channel as a mention; a zero
# width space after @ keeps the word and breaks the mention.
SLACK_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "@": "@\u200b"})
MARKDOWN_SPECIALS = re.compile(r"([\\`*_~|<>\[\](){}#+\-.!:@])")  # Discord's markdown, and Teams' links


def slack_text(text: str) -> str:
    return text.translate(SLACK_ESCAPES)


def markdown_text(text: str) -> str:
    """Text that markdown shows as it is: every character markdown could read, backslash-escaped."""
    return MARKDOWN_SPECIALS.sub(r"\\\1", text)


def code_block(lines: Sequence[str], limit: int, escape: Callable[[str], str] = lambda text: text) -> str:
    """The last lines as a fenced code block of at most limit characters; a fence inside cannot close it."""
    body = escape("\n".join(lines).replace("```", "\'\'\'"))[-limit:]
    return "```\n" + body + "\n```"


def render_slack(payload: dict, parts: urllib.parse.SplitResult):
    """Slack blocks (Mattermost shows the text): the facts as plain text, the last lines as code, escaped."""
    fields = [{"type": "plain_text", "text": f"{name}: {value}"[:2000]} for name, value in message_fields(payload)]
    blocks = [{"type": "section", "text": {"type": "plain_text", "text": payload["text"][:3000]}},
              {"type": "section", "fields": fields[:10]}]
    if payload["logs"]:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": code_block(payload["logs"], 2900,
                                                                                          slack_text)}})
    return as_json({"text": slack_text(payload["text"]), "blocks": blocks})


def render_discord(payload: dict, parts: urllib.parse.SplitResult):
    """A Discord embed; no mention in it pings anyone."""
    embed = {"title": title(payload)[:256], "description": markdown_text(payload["text"])[:4096],
             "color": RESULT_LOOK.get(payload["result"], (0x607D8B,))[0],
             "fields": [{"name": name, "value": markdown_text(value)[:1024], "inline": len(value) < 40}
                        for name, value in message_fields(payload)]}
    if payload["logs"]:
        embed["fields"].append({"name": "Last lines", "value": code_block(payload["logs"], 1000)})
    return as_json({"embeds": [embed], "allowed_mentions": {"parse": []}})


def header_value(text: str) -> str:
    """A header-safe version of text: no line breaks, Latin-1 only."""
    return re.sub(r"[\r\n]+", " ", text).encode("latin-1", "replace").decode("latin-1")[:250]


def render_ntfy(payload: dict, parts: urllib.parse.SplitResult):
    """ntfy: the text as the body, with a title, a tag and a priority."""
    _, tag, priority = RESULT_LOOK.get(payload["result"], (0, "information_source", 3))
    return "text/plain; charset=utf-8", plain_message(payload).encode(), (
        ("Title", header_value(title(payload))), ("Tags", tag), ("Priority", str(priority)))


def render_gotify(payload: dict, parts: urllib.parse.SplitResult):
    return as_json({"title": title(payload), "message": plain_message(payload),
                    "priority": RESULT_LOOK.get(payload["result"], (0, "", 3))[2]})


def render_telegram(payload: dict, parts: urllib.parse.SplitResult):
    """sendMessage as plain text (no parse_mode: nothing in it is markup)."""
    chat = urllib.parse.parse_qs(parts.query).get("chat_id", [""])[0]
    return as_json({"chat_id": chat, "text": plain_message(payload)[:4096], "disable_web_page_preview": True})


def render_teams(payload: dict, parts: urllib.parse.SplitResult):
    """An Adaptive Card, as Teams workflows take it."""
    card = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard",
            "version": "1.4", "body": [
                {"type": "TextBlock", "text": markdown_text(title(payload)), "weight": "Bolder", "size": "Medium",
                 "wrap": True},
                # A RichTextBlock's TextRuns are never read as markdown: the sentence, facts and lines stay text.
                {"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": payload["text"]}]},
                {"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": f"{n}: {v}\n"}
                                                      for n, v in message_fields(payload)]},
                *([{"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": "\n".join(payload["logs"]),
                                                          "fontType": "Monospace"}]}] if payload["logs"] else [])]}
    return as_json({"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive",
                                                        "content": card}]})


class NotifyFormat(NamedTuple):
    """One notification format: which URLs are its own, and how it renders an outcome."""

    matches: Callable[[urllib.parse.SplitResult], bool]
    render: Callable[[dict, urllib.parse.SplitResult], Tuple[str, bytes, Tuple[Tuple[str, str], ...]]]


def host_is(parts: urllib.parse.SplitResult, *names: str) -> bool:
    host = (parts.hostname or "").lower()
    return any(host == name or host.endswith("." + name) for name in names)


# The first that matches the URL renders it, unless its #fragment names one; json matches any.
NOTIFY_FORMATS: Dict[str, NotifyFormat] = {
    "slack": NotifyFormat(lambda p: host_is(p, "hooks.slack.com") or bool(re.fullmatch(r"/hooks/[a-z0-9]{26}", p.path)),
                          render_slack),
    "discord": NotifyFormat(lambda p: host_is(p, "discord.com", "discordapp.com") and "/api/webhooks/" in p.path,
                            render_discord),
    "ntfy": NotifyFormat(lambda p: host_is(p, "ntfy.sh"), render_ntfy),
    "gotify": NotifyFormat(lambda p: p.path.endswith("/message") and "token=" in p.query, render_gotify),
    "telegram": NotifyFormat(lambda p: host_is(p, "api.telegram.org") and p.path.endswith("/sendMessage"),
                             render_telegram),
    "teams": NotifyFormat(lambda p: host_is(p, "logic.azure.com", "powerplatform.com", "webhook.office.com"),
                          render_teams),
    "json": NotifyFormat(lambda p: True, lambda payload, parts: as_json(payload)),
}
NOTIFY_FORMAT_NAMES.extend(NOTIFY_FORMATS)


def notify_format(url: str) -> str:
    """The format name for a NOTIFY_URL entry: its #fragment, else the first whose URLs it is."""
    parts = urllib.parse.urlsplit(url)
    return parts.fragment if parts.fragment in NOTIFY_FORMATS else next(
        name for name, row in NOTIFY_FORMATS.items() if row.matches(parts))


class Endpoint(NamedTuple):
    """Where a notification goes: NOTIFY_URL taken apart; user and password go as HTTP Basic authentication."""

    tls: bool
    host: str
    port: int
    target: str  # path and query
    authorization: Optional[str]
    shown: str  # for the log: scheme and host, the credentials and the path (chat webhooks' secret) masked

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        parts = urllib.parse.urlsplit(url)
        credentials = None
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            credentials = "Basic " + base64.b64encode(pair.encode()).decode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        shown = f"{parts.scheme}://{'***@' if credentials else ''}{parts.hostname}{'/***' if target != '/' else ''}"
        return cls(parts.scheme == "https", parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80),
                   target, credentials, shown)


def post_json(endpoint: Endpoint, payload: dict, deadline: float) -> int:
    """POST JSON; see post."""
    return post(endpoint, *as_json(payload), deadline)


def post(endpoint: Endpoint, kind: str, body: bytes, headers: Tuple[Tuple[str, str], ...], deadline: float) -> int:
    """POST a body and read the status line, all before deadline (time.monotonic()); return the status code.
    Raises OSError (a timeout included) or ValueError. A redirect is a status like any other: never followed.
    One total deadline, as a client sending a byte every few seconds must not hold the sender."""
    if len(body) > NOTIFY_BODY_MAX:
        raise ValueError(f"a notification of {len(body)} bytes is over {NOTIFY_BODY_MAX}")
    head = [f"POST {endpoint.target} HTTP/1.1", f"Host: {endpoint.host}", f"Content-Type: {kind}",
            f"Content-Length: {len(body)}", f"User-Agent: gopdater/{__version__}", "Connection: close",
            *(f"{name}: {value}" for name, value in headers)]
    if endpoint.authorization:
        head.append(f"Authorization: {endpoint.authorization}")

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer within the deadline")
        return remaining

    try:
        return read_status(endpoint, head, body, left)
    except socket.timeout:  # before Python 3.10 not yet the TimeoutError it is since
        raise TimeoutError("no answer within the deadline") from None


def read_status(endpoint: Endpoint, head: List[str], body: bytes, left: Callable[[], float]) -> int:
    """post_json's exchange: connect, (TLS,) send, read the status line; each wait bounded by left()."""
    with socket.create_connection((endpoint.host, endpoint.port), timeout=left()) as plain:
        sock = plain
        if endpoint.tls:
            import ssl  # loaded by asyncio already; named here for the reader
            plain.settimeout(left())
            sock = ssl.create_default_context().wrap_socket(plain, server_hostname=endpoint.host)
        with sock:
            sock.settimeout(left())
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            line = b""
            while b"\r\n" not in line and len(line) < 1024:
                sock.settimeout(left())
                chunk = sock.recv(1024)
                if not chunk:
                    break
                line += chunk
    match = re.match(rb"HTTP/1\.[01] ([0-9]{3}) ", line)
    if match is None:
        raise ValueError("not an HTTP answer")
    return int(match.group(1))


def deliver_http(url: str, payload: dict, deadline: float) -> int:
    """POST the outcome to url in the format its URL names; the status code."""
    parts = urllib.parse.urlsplit(url)
    return post(Endpoint.parse(url), *NOTIFY_FORMATS[notify_format(url)].render(payload, parts), deadline)


def deliver_mail(url: str, payload: dict, deadline: float) -> int:
    """Send the outcome as an e-mail: smtps:// in TLS from the start, smtp:// with STARTTLS when offered (a
    password is never sent without TLS); 250 once the server took it. Each step gets what is left of deadline."""
    import smtplib  # only with an smtp(s):// NOTIFY_URL
    import ssl
    from email.message import EmailMessage
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    mail = EmailMessage()
    mail["Subject"] = title(payload)
    mail["To"] = ", ".join(a.strip() for value in query["to"] for a in value.split(",") if a.strip())
    mail["From"] = query.get("from", [f"gopdater@{socket.gethostname()}"])[0]
    mail.set_content(plain_message(payload))
    left = lambda: max(0.01, deadline - time.monotonic())  # noqa: E731
    tls = parts.scheme == "smtps"
    server = (smtplib.SMTP_SSL(timeout=left(), context=ssl.create_default_context()) if tls
              else smtplib.SMTP(timeout=left()))
    # smtplib bounds each read, not the exchange: a server sending "220-" lines forever would hold this
    # notifier for good. At the deadline the socket is shut down, which ends any read in progress.
    cut = threading.Timer(left(), shut_down, args=(server,))
    cut.daemon = True
    cut.start()
    try:
        server.connect(parts.hostname, parts.port or (465 if tls else 587))
        return send_mail(server, parts, mail, left)
    finally:
        cut.cancel()


def shut_down(server) -> None:
    """End a mail exchange that ran past its deadline (from the timer's thread)."""
    sock = server.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def send_mail(server, parts: urllib.parse.SplitResult, mail, left: Callable[[], float]) -> int:
    """deliver_mail's exchange once connected: STARTTLS, login, the message; 250."""
    import ssl
    tls = parts.scheme == "smtps"
    with server:
        server.ehlo()
        if not tls and server.has_extn("starttls"):
            server.sock.settimeout(left())
            server.starttls(context=ssl.create_default_context())
            server.ehlo()
        elif not tls and parts.username:
            raise ValueError("the mail server offers no STARTTLS: the password is not sent in clear")
        if parts.username:
            server.sock.settimeout(left())
            server.login(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        server.sock.settimeout(left())
        server.send_message(mail)
    return 250


def send_notification(url: str, payload: dict, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Deliver one outcome to url (http(s) in its format, or smtp(s)): one total deadline of 5 s per attempt,
    one retry, no redirect followed; never raises, never logs the URL's secrets."""
    deliver = deliver_mail if url.startswith(("smtp://", "smtps://")) else deliver_http
    endpoint = Endpoint.parse(url)
    for attempt in (1, 2):
        try:
            status = deliver(url, payload, time.monotonic() + NOTIFY_TIMEOUT)
            status = 200 if status == 250 else status
        except (OSError, ValueError) as error:  # smtplib's errors are OSErrors
            log.warning("notification to %s failed (attempt %s): %s", endpoint.shown, attempt, type(error).__name__)
        else:
            if 200 <= status < 300:
                return True
            log.warning("notification to %s answered %s (attempt %s)%s", endpoint.shown, status, attempt,
                        "; redirects are not followed" if 300 <= status < 400 else "")
        if attempt == 1:
            sleep(NOTIFY_RETRY_DELAY)
    return False


class Notifier:
    """Sends notifications off the deployment path: a thread and a bounded queue for each URL, so that a slow
    endpoint delays only its own messages."""

    def __init__(self, send: Callable[[str, dict], bool] = send_notification, size: int = 100):
        import queue  # only with a NOTIFY_URL
        self.send, self.size, self.queue_module = send, size, queue
        self.lanes: Dict[str, Tuple["queue.Queue", threading.Thread]] = {}
        self.lock = threading.Lock()

    def lane(self, url: str):
        """The queue for url, its thread started on first use."""
        with self.lock:
            if url not in self.lanes:
                pending = self.queue_module.Queue(maxsize=self.size)
                thread = threading.Thread(target=self.run, args=(pending,), name="notifier", daemon=True)
                thread.start()
                self.lanes[url] = (pending, thread)
            return self.lanes[url][0]

    def waiting(self, url: str) -> int:
        """How many notifications for url wait to be sent."""
        return self.lane(url).qsize()

    def submit(self, url: str, payload: dict) -> bool:
        """Queue one notification; False (and a log line) when url's queue is full."""
        try:
            self.lane(url).put_nowait((url, payload))
            return True
        except self.queue_module.Full:
            log.warning("notification of deployment=%s to %s dropped: %d are waiting already",
                        payload.get("deployment"), Endpoint.parse(url).shown, self.size)
            return False

    def run(self, pending) -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            if not self.send(*item):
                log.warning("deployment=%s notification not delivered", item[1].get("deployment"))

    def close(self, timeout: float) -> None:
        """Send what is queued (bounded by timeout in all), then stop."""
        end = time.monotonic() + timeout
        with self.lock:
            lanes = list(self.lanes.values())
        for pending, _ in lanes:
            with contextlib.suppress(Exception):
                pending.put(None, timeout=max(0.0, end - time.monotonic()))
        for _, thread in lanes:
            thread.join(max(0.0, end - time.monotonic()))


# ==========================================================================================
# The HTTP transport: asyncio, one protocol object per connection, heads parsed by http.server
# ==========================================================================================
#
# What bounds what (test_hostile.py tries each as an attacker would):
# - A connection keeps at most one request's head (16 KiB) or body (1 MiB) plus one read (64 KiB):
#   it is not read from while a whole request of it waits for its turn or for start-up, or while
#   the answers already written are not being read (asyncio's write buffer above WRITE_HIGH_WATER).
# - A turn does at most TURN_STEPS steps for one connection, then the loop serves the others: a
#   client pipelining thousands of requests delays everyone else by one turn (well under 1 ms).
# - Bodies read before they can be authenticated (signed senders, and GET bodies) share
#   UNVERIFIED_BODY_BYTES; beyond it a request is answered 503 before its body is read.
# - REQUEST_TIMEOUT bounds a TLS handshake, a request from its first byte, an idle keep-alive and a
#   client that stopped reading; MAX_CONNECTIONS bounds how many (the least recently active goes).
# - Whatever goes wrong with one connection ends that connection only: 400 for what http.server's
#   parser refuses, 500 for a bug (its traceback logged once a minute), never an exception that
#   leaves the loop.

REJECT_LOG_INTERVAL = 60.0
DRAIN_SECONDS = 2.0
STARTUP_WAIT = 5.0
SWEEP_SECONDS = 0.1
READ_BYTES = 64 * 1024
WRITE_HIGH_WATER = 64 * 1024
TURN_STEPS = 4
LISTEN_BACKLOG = 1024  # connections the kernel queues for accept
ACCEPT_BURST = 16  # connections accepted in one turn of the loop, before any is read
UNVERIFIED_BODY_BYTES = 8 * 1024 * 1024
TLS_RELOAD_SECONDS = 10.0
TLS_EXPIRY_WARNING_DAYS = 14
# A hook path's secret, whatever it begins with: a sender's own path (/hooks/ghcr) is left as it is only when
# the segment is exactly its name (a secret may begin "ghcr." or "acr-").
SECRET_PATH_RE = re.compile(r"/hooks/(?!(?:" + "|".join(
    re.escape(s.path.split("/")[2]) for s in SENDERS if s.path.count("/") == 2 and "{" not in s.path)
    + r")(?:[/\s?\"]|$))[^/\s?\"]+")


def redact(text: str, secret: str) -> str:
    """Remove the secret, and anything in the secret's place in a hook path, from a log line."""
    text = SECRET_PATH_RE.sub("/hooks/***", text.replace(secret, "***"))
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


class RejectLog:
    """Per kind of refusal (its status code): the first of each interval logged in full, then one count."""

    def __init__(self, interval: float = REJECT_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self.lock = threading.Lock()
        self.windows: Dict[int, List[float]] = {}  # status: [window start, refusals counted since]
        self.due = float("inf")  # when the oldest window ends

    def note(self, status: int, line: Callable[[], str], trace: bool = False) -> None:
        """Count a refusal; line() is called only for the one logged in full (with trace, its traceback)."""
        with self.lock:
            if self.clock() >= self.due:
                self._flush_locked()
            window = self.windows.get(status)
            if window is not None:
                window[1] += 1
                return
            self.windows[status] = [self.clock(), 0]
            self.due = min(self.due, self.clock() + self.interval)
        log.log(logging.ERROR if trace else logging.WARNING, "rejected %s (further %s answers are counted for "
                "%ds)", line(), status, self.interval, exc_info=trace)

    def flush(self, force: bool = False) -> None:
        with self.lock:
            self._flush_locked(force)

    def _flush_locked(self, force: bool = False) -> None:
        now = self.clock()
        for status, (started, count) in sorted(self.windows.items()):
            if force or now - started >= self.interval:
                if count:
                    log.warning("rejected %d more requests in the last %ds (%s: %d)", count, round(now - started),
                                status, count)
                del self.windows[status]
        self.due = min((started for started, _ in self.windows.values()), default=float("inf")) + self.interval


REFUSAL_KEYS = frozenset(("status", "reason"))


def encode(response: Response, keep_alive: bool) -> bytes:
    """A complete HTTP/1.1 response: short JSON (or the metrics text) and fixed headers."""
    if response.status >= 400 and isinstance(response.payload, dict) and response.payload.keys() == REFUSAL_KEYS:
        return encode_refusal(response.status, response.payload["reason"], response.headers, keep_alive)
    return encode_now(response, keep_alive)


@functools.lru_cache(maxsize=256)
def encode_refusal(status: HTTPStatus, reason: str, headers: Tuple[Tuple[str, str], ...], keep_alive: bool) -> bytes:
    """A flood is answered with a few fixed refusals: each is encoded once, which is about 5 us of the
    40 us a refused request costs here (bench/README.md)."""
    return encode_now(refusal(status, reason, headers), keep_alive)


def encode_now(response: Response, keep_alive: bool) -> bytes:
    """encode() without the cache."""
    if isinstance(response.payload, Html):
        body, kind = response.payload.encode(), "text/html; charset=utf-8"
    elif isinstance(response.payload, str):
        body, kind = response.payload.encode(), "text/plain; version=0.0.4; charset=utf-8"
    else:
        body, kind = json.dumps(response.payload).encode(), "application/json"
    lines = [f"HTTP/1.1 {response.status.value} {response.status.phrase}", "Server: gopdater",
             f"Content-Type: {kind}", f"Content-Length: {len(body)}", "Cache-Control: no-store",
             "X-Content-Type-Options: nosniff", "Connection: " + ("keep-alive" if keep_alive else "close"),
             *(f"{k}: {v}" for k, v in response.headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@functools.lru_cache(maxsize=None)
def head_parser() -> type:
    """http.server's request handler, made to parse a head already read and write nothing."""
    import http.client
    import http.server  # here, not at the top: the port opens before this import's 15 ms

    class HeadMessage(http.client.HTTPMessage):
        """A head's headers, parsed by http.client, then only read. While it parses, the email parser asks
        four times for the content type (each a scan of every header, a tenth of what a refused request
        costs) to choose how to parse a body, which a head never has. It asks once every header is in,
        and nothing changes a head after: the first answer is kept."""

        content_type: Optional[str] = None

        def get_content_type(self) -> str:
            if self.content_type is None:
                self.content_type = super().get_content_type()
            return self.content_type

    class HeadParser(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        MessageClass = HeadMessage

        def __init__(self, head: bytes):  # pylint: disable=super-init-not-called
            self.rfile, self.wfile = io.BytesIO(head), None  # send_error is replaced: nothing is written
            self.error, self.expects_continue, self.command = None, False, None
            self.raw_requestline = self.rfile.readline(MAX_HEADER_BYTES + 1)
            self.valid = self.parse_request()

        def handle_expect_100(self) -> bool:
            self.expects_continue = True
            return True

        def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
            self.error = HTTPStatus(code)

    return HeadParser


# -- TLS: a context that follows its files when certbot or a proxy's ACME client replaces them --


def certificate_expiry(pem: str) -> datetime:
    """The notAfter of the first certificate in PEM text. The ssl module decodes only a verified peer's
    certificate, so this walks the DER: Certificate, tbsCertificate, then its fifth field, validity."""
    import ssl
    block = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if block is None:
        raise ValueError("no PEM certificate in it")
    der = ssl.PEM_cert_to_DER_cert(block.group(0))

    def element(at: int) -> Tuple[int, int, int]:  # (tag, where its content starts, where it ends)
        tag, size, at = der[at], der[at + 1], at + 2
        if size & 0x80:
            size, at = int.from_bytes(der[at:at + (size & 0x7F)], "big"), at + (size & 0x7F)
        return tag, at, at + size

    _, tbs, _ = element(element(0)[1])
    tag, _, end = element(tbs)
    at = end if tag == 0xA0 else tbs  # the optional [0] version
    for _ in range(3):  # serialNumber, signature, issuer
        at = element(at)[2]
    _, validity, _ = element(at)
    tag, start, end = element(element(validity)[2])  # notAfter, after notBefore
    text = der[start:end].decode("ascii")
    return datetime.strptime(text, "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)


def refuse_password() -> bytes:
    """The password callback of TLS_KEY: gopdater takes no encrypted key (there is nobody to type it)."""
    raise ValueError("the key is encrypted: give gopdater the key without a passphrase (openssl pkey -in KEY)")


class TLSFiles:
    """TLS_CERT and TLS_KEY as server contexts: each connection gets the newest pair that loaded."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key
        self.stamp, self.current = self.files_stamp(), self.load()  # raises OSError, ValueError, ssl.SSLError
        self.refused: Optional[tuple] = None  # the stamp of files that failed to load, warned about once

    def load(self):
        """A TLS 1.2+ server context with the files as they are now; raises if they do not make a pair, or if
        the key is encrypted (OpenSSL would otherwise ask for its password on the terminal, from the loop)."""
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key, password=refuse_password)
        return context

    def files_stamp(self) -> tuple:
        return tuple(file_stamp(os.stat(path)) for path in (self.cert, self.key))

    def expiry(self) -> datetime:
        with open(self.cert, encoding="ascii", errors="replace") as handle:
            return certificate_expiry(handle.read())

    def reload(self) -> bool:
        """Load the files again if they changed; keep the old pair (with one warning) if they do not load."""
        try:
            stamp = self.files_stamp()
        except OSError:  # a file is being replaced: look again at the next check
            return False
        if stamp in (self.stamp, self.refused):
            return False
        try:
            self.current = self.load()
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            self.refused = stamp
            log.warning("the TLS files changed but do not load as a pair (%s); keeping the previous certificate",
                        error)
            return False
        self.stamp, self.refused = stamp, None
        log.info("TLS certificate reloaded from %s", self.cert)
        return True


def tls_problem(cert: str, key: str, now: Optional[datetime] = None) -> Finding:
    """Whether the pair loads, and when the certificate expires (a warning within 14 days)."""
    try:
        expires = TLSFiles(cert, key).expiry()
    except (OSError, ValueError) as error:
        return False, (f"TLS_CERT {cert} and TLS_KEY {key} do not load ({getattr(error, 'strerror', None) or error}):"
                       " both must be readable PEM files, the key the certificate's")
    days = (expires - (now or datetime.now(timezone.utc))).total_seconds() / 86400
    if days < 0:
        return False, f"tls: the certificate {cert} expired on {expires:%Y-%m-%d}: renew it"
    warning = f"warning: renew it, it expires in {days:.0f} days; " if days < TLS_EXPIRY_WARNING_DAYS else ""
    return True, f"tls: {warning}{cert} with its key, expires {expires:%Y-%m-%d}; PORT serves HTTPS only"


# -- one connection ----------------------------------------------------------------------------


class Phase(enum.Enum):
    """Where a connection stands: what the next bytes from the client are."""

    HEAD = "head"  # the next request's head (nothing yet: an idle keep-alive)
    BODY = "body"  # the body of an accepted head, read whole before it is answered
    SKIP = "skip"  # the body of a refused head, dropped as it comes, then HEAD again
    HELD = "held"  # a whole request waits for start-up discovery; nothing more is read
    CLOSING = "closing"  # the last answer is written; what still comes is dropped until the client closes


class Connection(asyncio.BufferedProtocol):
    """One client connection: its unparsed bytes, its phase, the request in progress and its deadline."""

    def __init__(self, server: "HookServer"):
        self.server, self.transport = server, None
        self.buffer = bytearray()
        self.phase, self.request, self.skip, self.reserved, self.unsent = Phase.HEAD, None, 0, 0, 0
        self.head, self.keep_alive, self.quiet, self.peer = b"", False, False, "-"
        self.writing_paused = self.turn_pending = self.reading_paused = self.eof = False
        self.held: Optional[Tuple[Request, bytes]] = None
        self.deadline = time.monotonic() + server.request_timeout

    # -- what asyncio calls -------------------------------------------------------------------

    @property
    def first_line(self) -> str:
        """The request line of the latest head, for the log."""
        return self.head[:200].split(b"\r\n", 1)[0].decode("latin-1")

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "-"
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.server.opened(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.server.closed(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.scratch  # one buffer for every connection: buffer_updated copies out at once

    def buffer_updated(self, nbytes: int) -> None:
        if self.phase is Phase.CLOSING:
            return
        if self.phase is Phase.HEAD and not self.buffer:
            self.deadline = time.monotonic() + self.server.request_timeout  # a request is whole in time
        self.buffer += self.server.scratch[:nbytes]
        self.advance()

    def eof_received(self) -> bool:
        """The client sends no more: answer what is whole, then close (True keeps it open meanwhile)."""
        self.eof = True
        self.advance()
        return self.phase is Phase.HELD or self.turn_pending

    def pause_writing(self) -> None:
        self.writing_paused, self.deadline = True, time.monotonic() + self.server.request_timeout
        self.unsent = self.transport.get_write_buffer_size()
        self.update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.advance()

    # -- requests -----------------------------------------------------------------------------

    def advance(self) -> None:
        """Answer what is whole in the buffer, at most TURN_STEPS steps, then let the others have a turn."""
        try:
            for _ in range(TURN_STEPS):
                if not self.step():
                    break
            else:
                if not self.turn_pending:
                    self.turn_pending = True
                    self.server.loop.call_soon(self.next_turn)
            if self.eof and not self.turn_pending and self.phase is not Phase.HELD:
                self.transport.close()
        except Exception:  # a bug must cost this connection only
            self.server.internal_error(self)
        self.update_reading()

    def next_turn(self) -> None:
        self.turn_pending = False
        self.advance()

    def update_reading(self) -> None:
        """Read only while this connection's answers are read and none of its requests waits."""
        paused = self.writing_paused or self.turn_pending or self.phase is Phase.HELD
        if paused != self.reading_paused and not self.transport.is_closing():
            self.reading_paused = paused
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def step(self) -> bool:
        """One step: drop a refused body, or judge a head and answer its request when its body is whole;
        False when none can be made."""
        if (self.phase is Phase.HEAD and not self.buffer) or self.writing_paused or \
                self.phase in (Phase.HELD, Phase.CLOSING) or self.transport.is_closing():
            return False  # the first test is the usual end of a turn: everything that came is answered
        if self.phase is Phase.SKIP:
            dropped = min(self.skip, len(self.buffer))
            del self.buffer[:dropped]
            self.skip -= dropped
            if self.skip:
                return False
            self.phase = Phase.HEAD
        if self.phase is Phase.HEAD and not self.read_head():
            return False
        if self.phase is not Phase.BODY:  # the head was refused and answered
            return True
        if len(self.buffer) < self.request.length:
            return False
        body = bytes(self.buffer[:self.request.length])
        del self.buffer[:self.request.length]
        self.answer(self.request, body)
        return True

    def read_head(self) -> bool:
        """Parse the next head if it is whole and judge it; False when it is not whole or the connection ends."""
        end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
        if end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                self.respond(refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request header fields too large"),
                             close=True)
            return False
        head = bytes(self.buffer[:end + 4])
        del self.buffer[:end + 4]
        self.head, self.quiet = head, False
        parsed = self.server.parse_head(head)
        if not parsed.valid:
            status = parsed.error or HTTPStatus.BAD_REQUEST
            self.respond(refusal(status, status.phrase.lower()), close=True)
            return False
        self.keep_alive = not parsed.close_connection
        begun = self.server.app.begin(parsed.command, parsed.path, parsed.headers)
        if begun.refused is not None:
            self.respond(begun.refused, close=begun.length < 0)  # a body that cannot be delimited is not read
            if self.phase is Phase.HEAD and begun.length > 0:
                self.phase, self.skip = Phase.SKIP, begun.length
            return self.phase is not Phase.CLOSING
        if not begun.verified and not self.server.reserve(self, begun.length):
            self.respond(refusal(HTTPStatus.SERVICE_UNAVAILABLE, "too many unauthenticated bodies at once"),
                         close=True)
            return False
        self.request, self.phase = begun, Phase.BODY
        if parsed.expects_continue and len(self.buffer) < begun.length:
            # curl sends a body over 1 KiB only after this, or after waiting a second for it.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def answer(self, request: Request, body: bytes) -> None:
        """Answer through the App, or hold the request until start-up discovery is done if it needs that."""
        self.server.release(self)
        self.request, self.phase, self.quiet = None, Phase.HEAD, request.endpoint == "/healthz"
        if self.server.ready or not self.server.app.needs_target(request):
            response = self.server.finish(request, body)
            self.respond(response, close=response is INTERNAL_ERROR)
        else:
            self.phase, self.held = Phase.HELD, (request, body)
            self.deadline = time.monotonic() + self.server.startup_wait

    def release_held(self, ready: bool) -> None:
        """Start-up is done (or took too long): answer the held request, then go on with the next."""
        request, body = self.held
        self.held, self.phase = None, Phase.HEAD
        self.respond(self.server.finish(request, body) if ready else
                     refusal(HTTPStatus.SERVICE_UNAVAILABLE, "gopdater is starting"))
        self.advance()

    def respond(self, response: Response, close: bool = False) -> None:
        """Write the answer and log it (the secret redacted); after it, close if it must."""
        keep = self.keep_alive and not close and not self.server.stopping
        self.server.log_request(self, response.status)  # before it leaves: a client that has it finds it logged
        if self.transport.is_closing():  # the client is gone (reset): nobody to answer
            self.phase = Phase.CLOSING
            return
        self.transport.write(encode(response, keep))
        self.deadline = time.monotonic() + self.server.request_timeout
        self.server.touched(self)
        if not keep:
            self.close_after_answer()

    def close_after_answer(self) -> None:
        """Half-close and drop what still comes: closing with unread data would reset the connection
        before the client reads the answer. TLS has no half-close; its close waits for the client's."""
        self.server.release(self)
        self.phase, self.held, self.request = Phase.CLOSING, None, None
        self.buffer.clear()
        self.unsent = self.transport.get_write_buffer_size()
        self.deadline = time.monotonic() + (self.server.request_timeout if self.unsent else DRAIN_SECONDS)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        try:
            self.transport.write_eof()
        except OSError:  # the client reset the connection meanwhile
            self.transport.abort()

    def answer_moving(self) -> bool:
        """Whether bytes of the answers written left since the last look: then it gets REQUEST_TIMEOUT more, so
        a large answer to a slow reader takes the time its size needs, and one that does not move is cut."""
        left = self.transport.get_write_buffer_size()
        if 0 < left < self.unsent:
            self.unsent, self.deadline = left, time.monotonic() + self.server.request_timeout
            return True
        return False

    def expire(self) -> None:
        """REQUEST_TIMEOUT (or the start-up wait, or the drain) ran out for this connection."""
        if self.phase is Phase.HELD:
            self.release_held(ready=False)
        elif self.phase is Phase.CLOSING or self.writing_paused:
            if not self.answer_moving():
                self.transport.abort()
        elif self.buffer or self.phase is Phase.BODY:
            self.respond(refusal(HTTPStatus.REQUEST_TIMEOUT, "request timeout"), close=True)
        else:
            self.transport.close()


# -- the server --------------------------------------------------------------------------------


class Front(NamedTuple):
    """How the server holds its front door: how many connections, how long a request may take, TLS (None: plain
    HTTP), and how long a request waits for start-up before 503."""

    max_connections: int = 512
    request_timeout: float = 10.0
    tls: Optional[TLSFiles] = None
    startup_wait: float = STARTUP_WAIT


class HookServer:
    """Serves the App on an asyncio loop in the thread that calls serve_forever(); stop it from anywhere."""

    def __init__(self, sock: socket.socket, app: App, front: Front = Front()):
        self.listener, self.app, self.tls, self.startup_wait = sock, app, front.tls, front.startup_wait
        self.server_address = sock.getsockname()[:2]
        self.max_connections, self.request_timeout = front.max_connections, front.request_timeout
        self.max_silent = max(1, front.max_connections // 4)
        self.rejects = RejectLog()
        self.loop = asyncio.new_event_loop()
        self.done = self.loop.create_future()
        self.connections: "collections.OrderedDict[Connection, None]" = collections.OrderedDict()
        self.silent: "collections.OrderedDict[Connection, None]" = collections.OrderedDict()  # not yet answered
        self.scratch = memoryview(bytearray(READ_BYTES))
        self.unverified = 0  # body bytes held for requests not yet authenticated
        self.ready, self.stopping = app.queue is not None, False
        self.tls_checked = time.monotonic()  # when the TLS files were last looked at
        self.parse_head = head_parser()
        self.trouble: Dict[str, float] = {}  # asyncio's error message: when it may be logged again

    def serve_forever(self) -> None:
        """Accept and answer until shutdown(); then close every connection."""
        try:
            self.loop.run_until_complete(self.serve())
        finally:
            self.loop.close()

    async def serve(self) -> None:
        self.loop.set_exception_handler(self.loop_trouble)
        tls = self.tls
        server = await self.loop.create_server(
            (lambda: TLSLayer(self, tls.current)) if tls else (lambda: Connection(self)),
            sock=self.listener, backlog=ACCEPT_BURST)
        # asyncio accepts up to its backlog argument per turn of the loop, and listens with it too: the
        # kernel's queue is set back to LISTEN_BACKLOG, the turn keeps ACCEPT_BURST (see opened()).
        self.listener.listen(LISTEN_BACKLOG)
        sweep = self.loop.call_later(SWEEP_SECONDS, self.sweep)
        await self.done
        sweep.cancel()
        server.close()
        for connection in list(self.connections):
            connection.transport.abort()
        await asyncio.sleep(0)  # let connection_lost run

    def loop_trouble(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio's own errors (accept out of file descriptors, which asyncio retries after a second): each
        kind logged once a minute, never per attempt."""
        message = str(context.get("message") or "asyncio error")[:200]
        if time.monotonic() >= self.trouble.get(message, 0.0):
            self.trouble[message] = time.monotonic() + REJECT_LOG_INTERVAL
            log.error("%s: %s (logged once a minute)", message, context.get("exception"))

    def close(self) -> None:
        """Free the socket and the loop of a server that was never served (serve_forever frees its own)."""
        self.listener.close()
        self.loop.close()

    def shutdown(self) -> None:
        """Stop serving soon; safe from any thread, and after the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.stop)
        except RuntimeError:  # already closed
            pass

    def stop(self) -> None:
        self.stopping = True
        if not self.done.done():
            self.done.set_result(None)

    def stop_on(self, *signals: int) -> None:
        """Stop on these signals (from the main thread)."""
        for signum in signals:
            self.loop.add_signal_handler(signum, self.stop)

    def mark_ready(self) -> None:
        """Start-up discovery is done: answer the requests that waited for it."""
        self.loop.call_soon_threadsafe(self.release_waiting)

    def held(self) -> int:
        """How many requests wait for start-up discovery now (read from the loop's thread, or roughly)."""
        return sum(c.phase is Phase.HELD for c in list(self.connections))

    def release_waiting(self) -> None:
        self.ready = True
        for connection in [c for c in self.connections if c.phase is Phase.HELD]:
            connection.release_held(ready=True)

    # -- the table of connections, and what they share -----------------------------------------

    def opened(self, connection: Connection) -> None:
        """A connection from accept on (in a TLS handshake too). Beyond MAX_CONNECTIONS, or beyond a quarter of
        it not yet answered, one goes: the oldest that has not yet said a thing worth answering (a flood's
        idle or half-sent connects, each up to 45 KiB in OpenSSL), else the least recently active. asyncio
        accepts ACCEPT_BURST a turn: a client's first flight is read and answered within a turn or two."""
        if len(self.connections) >= self.max_connections or len(self.silent) >= self.max_silent:
            self.evict(next(iter(self.silent), None) or next(iter(self.connections)))
        self.connections[connection] = self.silent[connection] = None

    def evict(self, oldest: Connection) -> None:
        """Drop a connection to make room: a 503 if it is between requests, aborted if its answers are unread."""
        self.connections.pop(oldest)
        self.silent.pop(oldest, None)
        if not oldest.writing_paused and oldest.phase is not Phase.CLOSING:
            oldest.respond(refusal(HTTPStatus.SERVICE_UNAVAILABLE, "service unavailable"), close=True)
        # Out of the table nothing expires it: a client that does not read must not keep it alive.
        if oldest.transport.get_write_buffer_size():
            oldest.transport.abort()
        oldest.transport.close()

    def closed(self, connection: Connection) -> None:
        self.release(connection)
        self.connections.pop(connection, None)
        self.silent.pop(connection, None)

    def touched(self, connection: Connection) -> None:
        """The connection was answered (a request, or a flight of its TLS handshake): it is the newest."""
        if connection in self.connections:
            self.connections.move_to_end(connection)
            self.silent.pop(connection, None)

    def reserve(self, connection: Connection, length: int) -> bool:
        """Hold room for an unauthenticated body, if the shared budget has it."""
        if self.unverified + length > UNVERIFIED_BODY_BYTES:
            return False
        self.unverified, connection.reserved = self.unverified + length, length
        return True

    def release(self, connection: Connection) -> None:
        self.unverified, connection.reserved = self.unverified - connection.reserved, 0

    def sweep(self) -> None:
        """Expire what ran out of time, pick up renewed TLS files, flush the refusal counts; every 0.1 s."""
        now = time.monotonic()
        for connection in [c for c in self.connections if c.deadline <= now]:
            try:
                connection.expire()
            except Exception:  # a bug must cost this connection only
                self.internal_error(connection)
        if self.tls is not None and now >= self.tls_checked + TLS_RELOAD_SECONDS:
            self.tls_checked = now
            self.tls.reload()
        self.rejects.flush()
        self.loop.call_later(SWEEP_SECONDS, self.sweep)

    # -- answers and the access log -----------------------------------------------------------

    def finish(self, request: Request, body: bytes) -> Response:
        try:
            return self.app.finish(request, body)
        except Exception:
            self.rejects.note(500, lambda: f"internal error answering {request.endpoint}", trace=True)
            return INTERNAL_ERROR

    def internal_error(self, connection: Connection) -> None:
        """A bug while handling a connection: log it (once a minute), answer 500 if it can, close it."""
        self.rejects.note(500, lambda: redact(f'{connection.peer} "{connection.first_line}" 500',
                                              self.app.config.secret), trace=True)
        if connection.phase is not Phase.CLOSING and not connection.transport.is_closing():
            connection.transport.write(encode(INTERNAL_ERROR, False))
        connection.phase = Phase.CLOSING
        connection.transport.close()

    def log_request(self, c: Connection, status: HTTPStatus) -> None:
        """The access log: refusals summarised per kind, /healthz at DEBUG, the secret never shown."""
        def line() -> str:
            return redact(f'{c.peer} "{c.first_line}" {int(status)}', self.app.config.secret)
        if status >= 400:
            self.app.metrics.rejected(status)
            self.rejects.note(int(status), line)  # int() is a C call; HTTPStatus.value is enum's Python property
        else:
            log.log(logging.DEBUG if c.quiet else logging.INFO, "%s", line())


# -- TLS over the plain transport: every connection counted from accept ------------------------


class TLSLayer(asyncio.BufferedProtocol):
    """One HTTPS connection: the protocol asyncio calls with the encrypted bytes, and the transport its
    Connection writes to. asyncio's own TLS (create_server(ssl=...)) calls the protocol only once a
    handshake is done, so connections still in one counted against no limit, and it kept a 256 KiB buffer
    for each; here a connection is in the table from accept, and an SSLObject with two BIOs is all it adds."""

    def __init__(self, server: "HookServer", context):
        import ssl
        self.server, self.raw = server, None
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.app = Connection(server)
        self.secured = self.paused = self.shut = False  # handshake done; its Connection reads no more; EOF sent
        self.want_read, self.ended = ssl.SSLWantReadError, ssl.SSLZeroReturnError

    # -- what asyncio calls -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.raw = transport
        self.app.connection_made(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        """Free OpenSSL's memory now: the Connection and this layer refer to each other, and such a cycle
        waits for the collector's rare full pass, while a flood leaves thousands of them, tens of KiB each."""
        self.app.connection_lost(exc)
        self.tls = self.incoming = self.outgoing = None
        self.shut = True

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if not self.shut:
            self.incoming.write(self.server.scratch[:nbytes])
            self.pump()

    def eof_received(self) -> bool:
        return self.app.eof_received()

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # -- the handshake, then the plain bytes to the Connection -----------------------------------

    def pump(self) -> None:
        """Go on with the handshake, then hand what decrypts to the Connection while it reads."""
        if self.tls is None:  # lost meanwhile
            return
        try:
            if not self.secured:
                self.tls.do_handshake()
                self.secured = True
            while not self.paused and not self.shut and not self.raw.is_closing():
                self.app.buffer_updated(self.tls.read(READ_BYTES, self.server.scratch))
        except self.want_read:  # more bytes are needed
            pass
        except self.ended:  # the client's close_notify: it sends no more
            if not self.app.eof_received():
                self.close()
        except (OSError, ValueError):  # not TLS, a version or cipher refused, or a broken record: end it
            self.flush()  # the alert, if OpenSSL wrote one
            self.raw.close()
            return
        self.flush()

    def flush(self) -> None:
        """Send what OpenSSL wrote; a handshake flight counts as an answer (the client spoke TLS)."""
        data = self.outgoing.read()
        if data and not self.raw.is_closing():
            self.raw.write(data)
            self.server.touched(self.app)

    # -- what the Connection calls: asyncio's transport interface, the part it uses ---------------

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.raw.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def pause_reading(self) -> None:
        self.paused = True
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        self.raw.resume_reading()
        # Records that came before the pause are decrypted now, not at the next read (which may never come).
        if self.incoming is not None and self.incoming.pending:
            self.server.loop.call_soon(self.pump)

    def write(self, data: bytes) -> None:
        if self.secured and not self.shut and not self.raw.is_closing():
            try:
                self.tls.write(data)
            except (OSError, ValueError):
                self.raw.abort()
                return
            self.flush()

    def can_write_eof(self) -> bool:
        return self.secured

    def write_eof(self) -> None:
        """close_notify, then the TCP half-close: the answer is read before the connection goes."""
        self.shut = True
        with contextlib.suppress(OSError, ValueError):  # unwrap() waits for the client's: not here
            self.tls.unwrap()
        self.flush()
        self.raw.write_eof()

    def close(self) -> None:
        """Close after what is written; a connection that never finished its handshake is simply dropped."""
        if not self.secured:
            self.raw.abort()
            return
        try:
            if not self.shut and not self.raw.is_closing():
                self.write_eof()
        except OSError:  # the client is gone already
            self.raw.abort()
            return
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()


# ==========================================================================================
# --check: diagnose the set-up, one line per finding, a fix for each problem
# ==========================================================================================


def state_finding(config: Config) -> Finding:
    """Whether STATE_DIR can be written, and what it holds."""
    journal, lock = Journal(state_dir(config)), StateLock(state_dir(config))
    problem = journal.problem() or lock.acquire()
    lock.release()  # --check only asks whether another gopdater holds it
    if problem:
        return False, problem
    unfinished, history = journal.load()
    return True, (f"state: {journal.directory} is writable; {len(history)} past deployments, "
                  f"{len(unfinished)} unfinished updates to recover at the next start")


def notify_finding(url: str, notify_on: FrozenSet[str]) -> Finding:
    """What --check says of one NOTIFY_URL entry, its secrets masked."""
    endpoint, mail = Endpoint.parse(url), url.startswith(("smtp://", "smtps://"))
    credentials = "; its user and password go as " + ("SMTP login, over TLS only" if mail else
                                                       "HTTP Basic authentication") + ", never logged"
    return True, (f"notify: {endpoint.shown} as {'e-mail' if mail else notify_format(url)} on "
                  f"{','.join(sorted(notify_on))}" + (credentials if endpoint.authorization else ""))


def reconcile_findings(config: Config, services: Sequence[Running]) -> List[Finding]:
    """For each service: the tag reconciling asks the registry for, or why it asks none."""
    every = (f"every {config.reconcile_interval:g}s, after start-up and on POST /reconcile"
             if config.reconcile_interval else "on POST /reconcile only (RECONCILE_INTERVAL=0)")
    found = []
    for item in reconcile_plan(config, services, frozenset()):
        asks = (f"the tags of {item.key.registry}/{item.key.repository}" if tracks(item.service) else
                str(item.key)) if item.key else ""
        found.append((True, f"reconcile: service {item.service.ref}: " + (
            f"asks the registry for {asks} {every}" if item.key else f"not asked: {item.why}")))
    return found


def run_check(config: Config, runner: Runner = None, out=None) -> int:
    """Diagnose the set-up for --check: one line per finding, a fix for each problem; 0 if all is well."""
    runner = runner or run_command
    docker_host = config.environ.get("DOCKER_HOST") or "unset, so /var/run/docker.sock"
    try:
        target = discover(config, runner)
    except ConfigError as error:
        findings = [(False, f"{error} (DOCKER_HOST {docker_host})")]
    else:
        findings = [(True, f"docker: engine {target.engine_version} answers (DOCKER_HOST {docker_host})"),
                    *setup_findings(config, runner, target)]
    print("".join(f"{'ok  ' if ok else 'FAIL'} {text}\n" for ok, text in findings), end="", file=out or sys.stdout)
    return 0 if all(ok for ok, _ in findings) else 1


def setup_findings(config: Config, runner: Runner, target: Target) -> List[Finding]:
    """What --check says once the engine answers: the targets, owners, the webhook URL, TLS, notifications,
    DRY_RUN, Swarm, reconciling and STATE_DIR."""
    findings = [*target.describe(), (True, f"owners allowed: {', '.join(f'{r}/{n}' for r, n in config.owners)}"),
                (True, f"webhook URL for Docker Hub: {scheme(config)}://<this-host>:{config.port}/hooks/"
                       f"{config.secret[:4]}{'*' * 8} (the full secret is WEBHOOK_SECRET)")]
    if config.tls_cert:
        findings.append(tls_problem(config.tls_cert, config.tls_key))
    findings += [notify_finding(url, config.notify_on) for url in config.notify_url]
    if config.dry_run:
        findings.append((True, "DRY_RUN is on: deployments log their commands and run none"))
    if config.swarm != "off" and swarm_role(config, runner) == "worker":
        findings.append((True, "swarm: this engine is a worker; Swarm services are updated only by a gopdater on a "
                               "manager"))
    return findings + reconcile_findings(config, target.running()) + gate_findings(config, target.running()) + [
        state_finding(config)]


def gate_findings(config: Config, services: Sequence[Running]) -> List[Finding]:
    """The update window and approval each service waits for (UPDATE_WINDOW, APPROVE, their labels); an invalid
    gopdater.window label fails."""
    found = []
    for service in services:
        gate = Gates(config, datetime.now, None).gate_for([service])
        if gate.problem:
            found.append((False, f"service {service.ref}: {gate.problem}; fix the label"))
            continue
        waits = [f"its update window ({next_opening(gate.window, datetime.now()):%a %H:%M} next)"] if gate.window \
            else []
        waits += ["an operator's approval"] if gate.approval is not None else []
        if waits:
            found.append((True, f"service {service.ref}: a deployment waits for {' and '.join(waits)}"))
    return found


# ==========================================================================================
# main: settings, the port at once, discovery in the background, serve until SIGTERM
# ==========================================================================================


# -- start-up: the engine, then each kind of target from a table -------------------------------


class EngineFacts(NamedTuple):
    """What start-up learns of the engine once, for every kind of target."""

    version: str
    swarm_role: str  # "manager", "worker", or "" (not in a swarm; or SWARM=off, so not asked)
    own_labels: Mapping[str, str]  # the Compose labels of the container gopdater runs in, if any


class TargetKind(NamedTuple):
    """One kind of update target: whether it is wanted on this engine, whether it must be, and how to make it."""

    name: str
    wanted: Callable[[Config, EngineFacts], bool]
    required: Callable[[Config, EngineFacts], bool]  # a failure to make it stops start-up even beside others
    make: Callable[[Config, Runner, EngineFacts, Optional[str]], Target]  # raises ConfigError


def swarm_wanted(config: Config, facts: EngineFacts) -> bool:
    if config.swarm == "on" and facts.swarm_role != "manager":
        raise ConfigError(f"SWARM=on but this engine is {'a swarm worker' if facts.swarm_role else 'not in a swarm'}:"
                          " Swarm services are updated from a manager; run gopdater there, or set SWARM=auto")
    if facts.swarm_role == "worker":
        log.warning("this engine is a swarm worker: Swarm services are updated only by a gopdater on a manager")
    return facts.swarm_role == "manager"


TARGET_KINDS = (
    TargetKind("compose", lambda config, facts: True, lambda config, facts: False, lambda *a: compose_target(*a)),
    TargetKind("swarm", swarm_wanted, lambda config, facts: config.swarm == "on", lambda *a: swarm_target(*a)),
)


def discover(config: Config, runner: Runner = None, read_file: Optional[Callable[[str], str]] = None,
             cwd: Optional[str] = None) -> Target:
    """Check Docker, then make each kind of target wanted here (TARGET_KINDS) and validate SERVICES across
    them; ConfigError saying the fix when nothing can be updated."""
    runner = runner or run_command
    facts = engine_facts(config, runner, read_file or _read_text)
    runner = DryRunner(runner) if config.dry_run else runner
    wanted = [kind for kind in TARGET_KINDS if kind.wanted(config, facts)]
    return one_target(config, [make_target(kind, config, runner, facts, cwd) for kind in wanted])


def one_target(config: Config, made: Sequence[Union[Target, ConfigError]]) -> Target:
    """The targets made, as one, with SERVICES checked across them; the first error if none could be made."""
    members = [target for target in made if not isinstance(target, ConfigError)]
    errors = [error for error in made if isinstance(error, ConfigError)]
    if not members:
        raise errors[0] if errors else ConfigError("nothing here can be updated: start a Compose project or a swarm")
    for error in errors:
        log.warning("%s", error)
    target = members[0] if len(members) == 1 else Targets(members)
    check_services(config, target)
    return target


def engine_facts(config: Config, runner: Runner, read_file: Callable[[str], str]) -> EngineFacts:
    """What start-up learns of the engine: its version (ConfigError if it does not answer), its Swarm role, and the
    labels of the container gopdater runs in."""
    return EngineFacts(engine_version(config, runner), swarm_role(config, runner) if config.swarm != "off" else "",
                       own_labels(config, runner, read_file))


def make_target(kind: "TargetKind", config: Config, runner: Runner, facts: EngineFacts, cwd: Optional[str]
                ) -> Union[Target, ConfigError]:
    """One kind of target made, or why it cannot be (raised where that kind is required here)."""
    try:
        return kind.make(config, runner, facts, cwd)
    except ConfigError as error:
        if kind.required(config, facts):
            raise
        return error


def swarm_target(config: Config, runner: Runner, facts: EngineFacts, cwd: Optional[str]) -> SwarmServices:
    """The Swarm services of this manager."""
    swarm = SwarmServices(config, runner, facts.version)
    try:
        swarm.refresh()
    except (CommandError, EngineUnreachable, ValueError) as error:
        raise ConfigError(f"the Swarm services cannot be listed ({error}): check DOCKER_HOST") from None
    return swarm


def compose_target(config: Config, runner: Runner, facts: EngineFacts, cwd: Optional[str]) -> Target:
    """The Compose project here, or with PROJECTS those on the engine."""
    try:
        command, version = detect_compose(config, runner)
    except CommandError as error:
        raise ConfigError(f"no Compose found ({error.tail}): install the docker compose plugin or "
                          "docker-compose, or set COMPOSE_COMMAND") from None
    if config.projects is not None:
        host = ComposeHost(config, command, version, facts.version, runner, facts.own_labels)
        try:
            host.refresh()
        except (CommandError, EngineUnreachable, ValueError) as error:
            raise ConfigError(f"the Compose projects on the engine cannot be listed ({error}): check DOCKER_HOST") \
                from None
        return host
    location = locate(config, facts.own_labels, cwd or os.getcwd())
    project = ComposeProject(config, Compose(config, location, command, runner, compose_flavour(version) == "v2"),
                             version, facts.version)
    try:
        project.refresh()
    except (CommandError, EngineUnreachable, ValueError) as error:
        raise ConfigError(f"Compose cannot read the project in {location.working_dir} ({error}): set COMPOSE_FILE "
                          "or run gopdater from the project directory") from None
    return project


def check_services(config: Config, target: Target) -> None:
    """Every SERVICES entry names exactly one service here; ConfigError naming the fix if not."""
    refs = [service.ref for service in target.running()]
    for _, entry in config.services:
        named = [ref for ref in refs if names(entry, ref)]
        if not named:
            known = ", ".join(map(str, refs)) or "none"
            raise ConfigError(f"SERVICES names {entry}, not a service here ({known}): fix SERVICES")
        if len(named) > 1:
            raise ConfigError(f"SERVICES names {entry}, a service of {' and '.join(r.project for r in named)}: "
                              f"write PROJECT/SERVICE, e.g. {named[0]}")


def swarm_role(config: Config, runner: Runner) -> str:
    """'manager', 'worker' or '' (not in a swarm), from `docker info`."""
    try:
        info = Engine(config, runner).info("Swarm")
    except (CommandError, EngineUnreachable, ValueError):
        return ""
    if not isinstance(info, dict) or info.get("LocalNodeState") != "active":
        return ""
    return "manager" if info.get("ControlAvailable") else "worker"


def engine_version(config: Config, runner: Runner) -> str:
    """The Docker engine's version; ConfigError if it does not answer."""
    try:
        return Engine(config, runner).version()
    except (CommandError, EngineUnreachable) as error:
        raise ConfigError("the Docker engine does not answer (docker version: "
                          f"{error.tail or error.code}): start Docker, mount /var/run/docker.sock, "
                          "or set DOCKER_HOST") from None


def own_labels(config: Config, runner: Runner, read_file: Callable[[str], str]) -> Mapping[str, str]:
    """The Compose labels of the container gopdater runs in, if it runs in one."""
    container_id = own_container_id(read_file("/proc/self/mountinfo"), read_file("/proc/self/cgroup"))
    if not container_id:
        return {}
    try:
        found = Engine(config, runner).inspect_raw([container_id])
        return (found[0].get("Config") or {}).get("Labels") or {}
    except (CommandError, EngineUnreachable, ValueError, IndexError, AttributeError):
        log.info("running in container %s, which Docker does not report; using settings only", container_id[:12])
        return {}


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


# -- the process -------------------------------------------------------------------------------

# Line breaks and other control characters (Unicode's too), as escapes: what a step, a container, a payload
# or a client sent cannot start a log line of its own.
CONTROL_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
                   for code in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029)}


class OneLineFormatter(logging.Formatter):
    """gopdater's log format: one line per message, whatever the message carries; a traceback follows its line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(CONTROL_ESCAPES)
        return super().formatMessage(record)


def listen(host: str, port: int):
    """The listening socket (dual-stack for HOST=::)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024, reuse_port=False,
                                dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())


FD_SHARE = 2  # client connections take at most 1/FD_SHARE of the file descriptors; deployments need the rest


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard one (systemd gives services 1,024 soft); the soft
    limit now in force."""
    import resource  # POSIX, as Docker is
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def connection_cap(wanted: int, file_limit: int) -> int:
    """MAX_CONNECTIONS, kept to a share of the file limit so that a deployment (pipes, the journal, docker
    children) always has descriptors while every connection is held. Pure."""
    return max(1, min(wanted, file_limit // FD_SHARE))


def scheme(config: Config) -> str:
    return "https" if config.tls_cert else "http"


STATE_LOCKS: List[StateLock] = []  # the lock on STATE_DIR, held as long as the process runs


def hold_state_dir(config: Config) -> None:
    """Take STATE_DIR for this process; ConfigError if another gopdater has it, or if its lock cannot be
    taken at all (two gopdaters on one folder would undo each other's recoveries)."""
    directory = state_dir(config)
    try:
        secure_folder(directory)
        lock = StateLock(directory)
        held_by_other = lock.acquire()
    except OSError as error:
        raise ConfigError(f"STATE_DIR {directory} cannot be locked ({error.strerror or error}): make it a folder "
                          "this user can write, or set STATE_DIR to one") from None
    if held_by_other:
        raise ConfigError(held_by_other)
    STATE_LOCKS.append(lock)


def open_front(config: Config) -> Tuple[socket.socket, Optional[TLSFiles]]:
    """The TLS files (checked first), STATE_DIR taken for this process, then the listening socket: a second
    gopdater on one STATE_DIR stops before it binds. ConfigError saying the fix."""
    tls = None
    if config.tls_cert:
        ok, text = tls_problem(config.tls_cert, config.tls_key)
        if not ok:
            raise ConfigError(text)
        if "warning" in text:
            log.warning("%s", text)
        tls = TLSFiles(config.tls_cert, config.tls_key)
    hold_state_dir(config)
    try:
        return listen(config.host, config.port), tls
    except OSError as error:
        raise ConfigError(f"cannot listen on {config.host}:{config.port} ({error.strerror}): set HOST and PORT "
                          "to a free address") from None


def start_then_work(config: Config, app: App, server: HookServer, failed: List[str]) -> None:
    """The first worker thread: discover what runs here, read the journal, let waiting requests through, start
    the other PARALLEL - 1 workers, then work (each thread costs the C heap an arena: no more than that)."""
    try:
        target = discover(config)
    except ConfigError as error:
        failed.append(str(error))
        server.shutdown()
        return
    journal = Journal(state_dir(config))
    problem = journal.problem()
    if problem:
        log.error("%s; until then every deployment fails before it starts", problem)
    notifier = Notifier() if config.notify_url else None
    app.queue = WorkQueue(config, target, QueueSeams(tell=notifying(config, notifier.submit if notifier else (
        lambda url, payload: send_notification(url, payload))), metrics=app.metrics, journal=journal))
    if app.queue.restore():
        log.warning("updates cut off by the last stop are recovered first")
    for ok, line in target.describe():
        if not ok:
            log.warning("%s (gopdater --check lists every finding)", line)
    server.mark_ready()
    log.info("gopdater %s ready on %s:%s %s%s", __version__, *server.server_address[:2], target.summary(),
             " DRY_RUN" if config.dry_run else "")
    for worker in range(2, config.parallel + 1):
        threading.Thread(target=work_until_stopped, args=(app.queue,), name=f"deployer-{worker}",
                         daemon=True).start()
    app.desk = Desk(app.queue)
    app.reconciler = Reconciler(config, app.queue)  # it only reads: DRY_RUN changes nothing of it
    threading.Thread(target=app.reconciler.run_forever, name="reconciler", daemon=True).start()
    work_until_stopped(app.queue)
    if notifier is not None:
        notifier.close(NOTIFY_TIMEOUT * 2 + NOTIFY_RETRY_DELAY)


def work_until_stopped(queue: WorkQueue) -> None:
    """Run the worker; one that dies (a bug) is logged and started again, /healthz answering 503 meanwhile."""
    for delay in backoff(1.0, 2.0, 30.0):
        try:
            queue.run_forever()
            return
        except Exception:
            log.exception("the worker died; it starts again in %gs", delay)
            time.sleep(delay)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Start gopdater: read settings, listen, find the project, serve until SIGTERM or SIGINT."""
    try:
        config = load_config(argv, os.environ)
    except ConfigError as error:
        if "--check" in (sys.argv[1:] if argv is None else argv):
            print(f"FAIL {error}")
            return 1
        print(f"gopdater: {error}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=config.log_level, handlers=[handler])
    if config.check:
        return run_check(config)
    try:
        sock, tls = open_front(config)
    except ConfigError as error:
        print(f"gopdater: {error}", file=sys.stderr)
        return 2
    app, failed = App(config, None), []
    file_limit = raise_file_limit()
    connections = connection_cap(config.max_connections, file_limit)
    if connections < config.max_connections:
        log.warning("MAX_CONNECTIONS is %d: at most half of the %d open files this process may have (raise its "
                    "hard limit, e.g. LimitNOFILE= or --ulimit nofile=)", connections, file_limit)
    server = HookServer(sock, app, Front(connections, config.request_timeout, tls))
    server.stop_on(signal.SIGTERM, signal.SIGINT)
    log.info("gopdater %s listening on %s:%s; Docker Hub webhook URL: %s://<this-host>:%s/hooks/%s******** "
             "(the rest of WEBHOOK_SECRET)", __version__, *server.server_address[:2], scheme(config), config.port,
             config.secret[:4])
    threading.Thread(target=start_then_work, args=(config, app, server, failed), name="deployer",
                     daemon=True).start()
    server.serve_forever()
    if failed:
        print(f"gopdater: {failed[0]}", file=sys.stderr)
        return 2
    log.info("stopping: no new requests; waiting up to %ss for a running deployment", config.shutdown_timeout)
    if app.queue is not None and not app.queue.stop(config.shutdown_timeout):
        log.error("a deployment was still running after SHUTDOWN_TIMEOUT; exiting anyway")
    server.rejects.flush(force=True)
    log.info("stopped")
    while STATE_LOCKS:
        STATE_LOCKS.pop().handle.close()  # STATE_DIR is free for the next gopdater
    return 0


if __name__ == "__main__":
    sys.exit(main())
