#!/usr/bin/env python3
"""gopdater: update a Docker Compose service when its registry reports a push.

A registry (Docker Hub, GHCR, Quay, Harbor or a self-hosted Distribution
registry) POSTs a webhook when an image is pushed. gopdater checks it, finds
the Compose services on this server that run that image and tag, and updates
them one at a time: pull while the old container serves, stop and remove the
old container, `compose up -d --no-deps <service>`, wait until the new one is
healthy, roll back if it is not, and only then remove the old image.

Settings (environment variable, or the flag of the same name in lower case
with dashes, e.g. PORT and --port; `--help` lists them all): OWNER and
WEBHOOK_SECRET (required), HOST, PORT, COMPOSE_FILE, COMPOSE_PROJECT_NAME,
COMPOSE_COMMAND, SERVICES, PULL_TIMEOUT, COMMAND_TIMEOUT, STOP_TIMEOUT,
HEALTH_TIMEOUT, SETTLE_TIME, NOTIFY_URL, DRY_RUN, REQUEST_TIMEOUT,
MAX_CONNECTIONS, WORKERS, SHUTDOWN_TIMEOUT, REFRESH_INTERVAL, LOG_LEVEL.
The docker CLI it runs honours DOCKER_HOST as usual.

Security, plainly: Docker Hub signs nothing, so the long secret in the webhook
URL is the credential. Every request is size-checked, then its secret (or
GitHub signature) is compared in constant time, and only then is the body
parsed. The pushed namespace must be one of OWNER. Names from a payload never
reach a command: only service and container names that Compose itself reports
for this project do, and every command is an argv list (no shell). The secret
is kept out of every log line and no response echoes the request, a command's
output or an exception's text. Whoever can reach the Docker socket is root on
the host; give gopdater nothing more than it needs (see README).

Standard library only; Python 3.9 or newer.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import hmac
import http.client
import http.server
import io
import json
import logging
import os
import queue
import re
import secrets
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

__version__ = "1.0.0"

log = logging.getLogger("gopdater")

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
HISTORY_SIZE = 50
MAX_QUEUED_DEPLOYMENTS = 50
STDERR_TAIL_CHARS = 300
LOG_TAIL_LINES = 20
REJECT_LOG_INTERVAL = 60.0
DRAIN_SECONDS = 2.0
POLL_FIRST, POLL_MAX = 0.2, 2.0
NOTIFY_TIMEOUT, NOTIFY_RETRY_DELAY = 5.0, 1.0

DEFAULT = "(Compose's default)"
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

# Docker's reference grammar (github.com/distribution/reference, regexp.go).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
DOMAIN_RE = re.compile(_DOMAIN, re.ASCII)
REPOSITORY_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
NAMESPACE_RE = REPOSITORY_RE
TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}", re.ASCII)
NAME_MAX = 255
# Compose's own rules for project, service and container names.
PROJECT_RE = re.compile(r"[a-z0-9][a-z0-9_-]*", re.ASCII)
SERVICE_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]*", re.ASCII)
CONTAINER_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", re.ASCII)
SECRET_RE = re.compile(r"[A-Za-z0-9._~-]{16,}", re.ASCII)

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

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its variable name, default and help text."""

    name: str
    default: Optional[str]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")


SETTINGS = (
    Setting("OWNER", None, "required: comma-separated namespaces allowed to trigger updates; "
            "a bare name is a Docker Hub namespace, REGISTRY/NAME another registry's (ghcr.io/acme)"),
    Setting("WEBHOOK_SECRET", None, "required: at least 16 URL-safe characters (A-Z a-z 0-9 . _ ~ -); "
            "prefer the variable, as a flag is visible to other users in ps"),
    Setting("HOST", "0.0.0.0", "address to listen on"),
    Setting("PORT", "8080", "port to listen on"),
    Setting("COMPOSE_FILE", None, "Compose file(s), as Compose reads this variable"),
    Setting("COMPOSE_PROJECT_NAME", None, "Compose project name, as Compose reads this variable"),
    Setting("COMPOSE_COMMAND", "auto", "auto (docker compose, else docker-compose) or the command to run, "
            "e.g. 'docker-compose'"),
    Setting("SERVICES", None, "explicit mapping, comma-separated IMAGE[:TAG]=SERVICE pairs; "
            "when set only these pairs update"),
    Setting("PULL_TIMEOUT", "600", "seconds a pull may take"),
    Setting("COMMAND_TIMEOUT", "120", "seconds any other docker command may take"),
    Setting("STOP_TIMEOUT", "10", "seconds docker stop waits before killing the old container"),
    Setting("HEALTH_TIMEOUT", "60", "seconds a new container has to become healthy "
            "(never less than its healthcheck start_period)"),
    Setting("SETTLE_TIME", "10", "seconds a container without a healthcheck must stay running"),
    Setting("NOTIFY_URL", None, "http(s) URL that receives a JSON summary of each deployment that "
            "changed something or failed"),
    Setting("DRY_RUN", "0", "1 to log the commands a deployment would run and run none of them"),
    Setting("REQUEST_TIMEOUT", "10", "seconds a client has to send its whole request"),
    Setting("MAX_CONNECTIONS", "512", "open client connections held at once; the oldest is dropped beyond"),
    Setting("WORKERS", "4", "threads answering complete requests"),
    Setting("SHUTDOWN_TIMEOUT", "120", "seconds a running deployment may take to finish on SIGTERM"),
    Setting("REFRESH_INTERVAL", "60", "seconds between re-reads of the Compose project while idle"),
    Setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


class ImageKey(collections.namedtuple("ImageKey", "registry repository tag")):
    """A normalised image name and tag, as registries and Compose both spell it."""

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting, read once at start-up."""

    owners: Tuple[Tuple[str, str], ...]
    secret: str
    host: str
    port: int
    compose_file: Optional[str]
    project_name: Optional[str]
    compose_command: str
    services: Tuple[Tuple[ImageKey, str], ...]
    pull_timeout: float
    command_timeout: float
    stop_timeout: int
    health_timeout: float
    settle_time: float
    notify_url: Optional[str]
    dry_run: bool
    request_timeout: float
    max_connections: int
    workers: int
    shutdown_timeout: float
    refresh_interval: float
    log_level: str
    environ: Mapping[str, str]
    check: bool = False


def _number(name: str, text: str, minimum: float, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or value != value or value < minimum or value == float("inf"):
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(f"{name} must be {kind} of at least {minimum:g}, e.g. {name}={SETTING_DEFAULTS[name]}")
    return value


def parse_owner(entry: str) -> Tuple[str, str]:
    """Split an OWNER entry into (registry, namespace); a bare name is Docker Hub's."""
    registry, rest = split_registry(entry.strip())
    rest = rest.lower()  # GitHub and Quay namespaces are spelled in any case; image names are lower case
    if not rest or not NAMESPACE_RE.fullmatch(rest):
        raise ConfigError(f"OWNER has an invalid entry {entry.strip()!r}: use namespaces like "
                          "OWNER=acme or OWNER=acme,ghcr.io/acme")
    return registry, rest


def parse_services(text: str) -> Tuple[Tuple[ImageKey, str], ...]:
    """Parse SERVICES: comma-separated IMAGE[:TAG]=SERVICE pairs."""
    pairs = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        image, sep, service = entry.partition("=")
        key = parse_reference(image.strip()) if sep else None
        if key is None or not SERVICE_RE.fullmatch(service.strip()):
            raise ConfigError(f"SERVICES has an invalid entry {entry!r}: use IMAGE[:TAG]=SERVICE pairs, "
                              "e.g. SERVICES=acme/site=web,acme/api:stable=api")
        pairs.append((key, service.strip()))
    if not pairs:
        raise ConfigError("SERVICES is set but empty: unset it, or give IMAGE[:TAG]=SERVICE pairs")
    return tuple(pairs)


SETTING_DEFAULTS = {s.name: s.default for s in SETTINGS}


def load_config(argv: Optional[Sequence[str]], environ: Mapping[str, str]) -> Config:
    """Read flags, then the environment, then defaults; raise ConfigError on the first bad one."""
    parser = argparse.ArgumentParser(
        prog="gopdater", description="Receive registry push webhooks and update the matching Compose services.",
        epilog="Each flag has an environment variable of the same name in upper case (--port is PORT). "
               "Flags win over variables.")
    for setting in SETTINGS:
        default = f" (default {setting.default})" if setting.default is not None else ""
        if setting.name == "DRY_RUN":
            parser.add_argument("--dry-run", dest="DRY_RUN", action="store_const", const="1",
                                help=f"{setting.help}{default}")
        else:
            parser.add_argument(setting.flag, dest=setting.name, metavar=setting.name,
                                help=f"{setting.help}{default}")
    parser.add_argument("--check", action="store_true", help="diagnose the set-up, print what to fix, exit 0 or 1")
    parser.add_argument("--version", action="version", version=f"gopdater {__version__}")
    args = parser.parse_args(argv)

    def get(name: str) -> Optional[str]:
        value = getattr(args, name)
        if value is None:
            value = environ.get(name)
        if value is None or value.strip() == "":
            return SETTING_DEFAULTS[name]
        return value.strip()

    owner_text = get("OWNER")
    if not owner_text:
        raise ConfigError("OWNER is not set: set OWNER to your Docker Hub namespace, e.g. OWNER=acme")
    owners = tuple(parse_owner(e) for e in owner_text.split(",") if e.strip())
    if not owners:
        raise ConfigError("OWNER is empty: set OWNER to your Docker Hub namespace, e.g. OWNER=acme")
    secret = get("WEBHOOK_SECRET")
    fix = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if not secret:
        raise ConfigError(f"WEBHOOK_SECRET is not set: {fix}")
    if not SECRET_RE.fullmatch(secret):
        raise ConfigError("WEBHOOK_SECRET is too weak: it needs at least 16 characters from "
                          f"A-Z a-z 0-9 . _ ~ -; {fix}")
    project_name = get("COMPOSE_PROJECT_NAME")
    if project_name is not None and not PROJECT_RE.fullmatch(project_name):
        raise ConfigError("COMPOSE_PROJECT_NAME must be lower-case letters, digits, '-' and '_', "
                          "starting with a letter or digit, e.g. COMPOSE_PROJECT_NAME=site")
    notify_url = get("NOTIFY_URL")
    if notify_url is not None:
        parts = urllib.parse.urlsplit(notify_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError("NOTIFY_URL must be an http:// or https:// URL, e.g. NOTIFY_URL=https://ntfy.sh/mytopic")
    dry_run = get("DRY_RUN").lower()
    if dry_run not in ("0", "1", "true", "false", "yes", "no"):
        raise ConfigError("DRY_RUN must be 1 or 0, e.g. DRY_RUN=1")
    log_level = get("LOG_LEVEL").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, e.g. LOG_LEVEL=INFO")
    port = int(_number("PORT", get("PORT"), 0, integer=True))
    if port > 65535:
        raise ConfigError("PORT must be at most 65535, e.g. PORT=8080")
    services_text = get("SERVICES")
    compose_command = get("COMPOSE_COMMAND")
    try:
        shlex.split(compose_command)
    except ValueError:
        raise ConfigError("COMPOSE_COMMAND is not a valid command line, e.g. COMPOSE_COMMAND=docker-compose") from None
    return Config(
        owners=owners,
        secret=secret,
        host=get("HOST"),
        port=port,
        compose_file=get("COMPOSE_FILE"),
        project_name=project_name,
        compose_command=compose_command,
        services=parse_services(services_text) if services_text else (),
        pull_timeout=_number("PULL_TIMEOUT", get("PULL_TIMEOUT"), 1),
        command_timeout=_number("COMMAND_TIMEOUT", get("COMMAND_TIMEOUT"), 1),
        stop_timeout=int(_number("STOP_TIMEOUT", get("STOP_TIMEOUT"), 0, integer=True)),
        health_timeout=_number("HEALTH_TIMEOUT", get("HEALTH_TIMEOUT"), 1),
        settle_time=_number("SETTLE_TIME", get("SETTLE_TIME"), 0),
        notify_url=notify_url,
        dry_run=dry_run in ("1", "true", "yes"),
        request_timeout=_number("REQUEST_TIMEOUT", get("REQUEST_TIMEOUT"), 0.1),
        max_connections=int(_number("MAX_CONNECTIONS", get("MAX_CONNECTIONS"), 1, integer=True)),
        workers=int(_number("WORKERS", get("WORKERS"), 1, integer=True)),
        shutdown_timeout=_number("SHUTDOWN_TIMEOUT", get("SHUTDOWN_TIMEOUT"), 0),
        refresh_interval=_number("REFRESH_INTERVAL", get("REFRESH_INTERVAL"), 1),
        log_level=log_level,
        environ=types.MappingProxyType(dict(environ)),
        check=args.check,
    )


# --------------------------------------------------------------------------
# Payload parsing
# --------------------------------------------------------------------------


class PayloadError(Exception):
    """A field of the payload is missing or invalid; the message is the field's path."""


class Ignored(Exception):
    """The delivery is authentic and valid but asks for nothing; the message is a fixed reason."""


@dataclasses.dataclass(frozen=True)
class PushEvent:
    """One pushed image tag, whoever sent it."""

    sender: str
    image: ImageKey
    digest: Optional[str] = None


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
    if not DOMAIN_RE.fullmatch(registry) or not REPOSITORY_RE.fullmatch(repository):
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


def get_field(data: object, path: str, kind: type = str, required: bool = True, prefix: str = ""):
    """Walk a dotted path through nested objects; raise PayloadError naming it if absent or of the wrong type."""
    value = data
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        if required:
            raise PayloadError(prefix + path)
        return None
    numbers = kind in ((int, float), float, int)
    if not isinstance(value, kind) or (numbers and isinstance(value, bool)):
        raise PayloadError(prefix + path)
    return value


def checked_name(name: str, field: str) -> Tuple[str, str]:
    """Validate an image name from a payload, naming the field when it is wrong."""
    parsed = parse_name(name)
    if parsed is None:
        raise PayloadError(field)
    return parsed


def checked_digest(digest: object, field: str) -> Optional[str]:
    """Validate an optional digest from a payload."""
    if digest is not None and (not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest)):
        raise PayloadError(field)
    return digest


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
    return PushEvent(sender, ImageKey(registry, repository, checked_tag(tag, fields[2])),
                     checked_digest(digest, fields[3]))


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
              for i, tag in enumerate(get_field(data, "updated_tags", list))]
    if not events:
        raise Ignored("no updated tags")
    return events


def parse_ghcr(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """GitHub package event: published or updated container versions with a tag."""
    event = headers.get("X-GitHub-Event", "")
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
    resources = get_field(data, "event_data.resources", list)
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


def parse_distribution(data: dict, headers: Mapping[str, str]) -> List[PushEvent]:
    """Distribution envelope: manifest pushes with a tag; pulls and blob pushes are skipped."""
    events, reasons = [], set()
    for i, item in enumerate(get_field(data, "events", list)):
        field = f"events[{i}]."
        if get_field(item, "action", prefix=field) != "push":
            reasons.add("not a push")
            continue
        if get_field(item, "target.mediaType", required=False, prefix=field) not in MANIFEST_MEDIA_TYPES:
            reasons.add("not a manifest push")
            continue
        tag = get_field(item, "target.tag", required=False, prefix=field)
        if not tag:
            reasons.add("manifest pushed without a tag")
            continue
        parts = ("request.host", "target.repository", "target.tag", "target.digest")
        events.append(pushed("registry", get_field(item, "request.host", prefix=field),
                             get_field(item, "target.repository", prefix=field), tag,
                             get_field(item, "target.digest", required=False, prefix=field),
                             [field + part for part in parts]))
    if not events:
        raise Ignored(sorted(reasons)[0] if reasons else "no events")
    return events


def owner_allowed(owners: Sequence[Tuple[str, str]], image: ImageKey) -> bool:
    """True when the image's registry and namespace are one of OWNER."""
    return any(image.registry == registry and image.repository.startswith(namespace + "/")
               for registry, namespace in owners)


# --------------------------------------------------------------------------
# The docker / compose layer
# --------------------------------------------------------------------------


class CommandError(Exception):
    """A command failed: its exit code (None on timeout) and a short stderr tail."""

    def __init__(self, argv: Sequence[str], code: Optional[int], tail: str):
        self.argv, self.code, self.tail = list(argv), code, tail
        what = "timed out" if code is None else f"exited {code}"
        super().__init__(f"{' '.join(argv[:3])} {what}: {tail}" if tail else f"{' '.join(argv[:3])} {what}")


def run_command(argv: Sequence[str], *, timeout: float, env: Optional[Mapping[str, str]] = None,
                cwd: Optional[str] = None, quiet: bool = False, both: bool = False) -> str:
    """Run one command (argv list, no shell) with a timeout; log it; return stdout (with both, and
    stderr) or raise CommandError."""
    level = logging.DEBUG if quiet else logging.INFO
    started = time.monotonic()
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=dict(env) if env is not None else None, cwd=cwd)
    except subprocess.TimeoutExpired:
        log.warning("command %s timed out after %ss", shlex.join(argv), timeout)
        raise CommandError(argv, None, f"no answer within {timeout:g}s") from None
    except OSError as error:
        log.warning("command %s could not start: %s", shlex.join(argv), error.strerror)
        raise CommandError(argv, 127, error.strerror or "could not start") from None
    seconds = time.monotonic() - started
    stderr = (proc.stderr or "").strip()
    tail = stderr[-STDERR_TAIL_CHARS:]
    if len(stderr) > STDERR_TAIL_CHARS and "\n" in tail:
        tail = tail.split("\n", 1)[1]  # whole lines only
    if proc.returncode != 0:
        log.warning("command %s exit=%s seconds=%.2f stderr=%r", shlex.join(argv), proc.returncode, seconds, tail)
        raise CommandError(argv, proc.returncode, tail)
    log.log(level, "command %s exit=0 seconds=%.2f", shlex.join(argv), seconds)
    return proc.stdout + (proc.stderr or "") if both else proc.stdout


Runner = Callable[..., str]


@dataclasses.dataclass(frozen=True)
class Container:
    """What `docker inspect` says about one container of the project."""

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

    @classmethod
    def from_inspect(cls, data: dict) -> "Container":
        """Build from one element of `docker inspect` output."""
        config = data.get("Config") or {}
        labels = config.get("Labels") or {}
        state = data.get("State") or {}
        check = config.get("Healthcheck") or {}
        test = check.get("Test") or []
        return cls(
            id=data.get("Id", ""),
            name=(data.get("Name") or "").lstrip("/"),
            service=labels.get("com.docker.compose.service", ""),
            project=labels.get("com.docker.compose.project", ""),
            image=config.get("Image") or "",
            image_id=data.get("Image") or "",
            status="restarting" if state.get("Restarting") else state.get("Status", ""),
            health=(state.get("Health") or {}).get("Status"),
            restart_count=int(data.get("RestartCount") or 0),
            started_at=state.get("StartedAt") or "",
            exit_code=int(state.get("ExitCode") or 0),
            has_healthcheck=bool(test) and test[0] != "NONE",
            start_period=(check.get("StartPeriod") or 0) / 1e9,
            oneoff=labels.get("com.docker.compose.oneoff", "False") == "True",
        )


@dataclasses.dataclass(frozen=True)
class ComposeTarget:
    """Which project Compose works on, and where each part of that came from."""

    project_name: Optional[str]
    project_name_source: str
    compose_file: Optional[str]
    compose_file_source: str
    working_dir: str
    working_dir_source: str
    own_service: Optional[str] = None


def own_container_id(mountinfo: str, cgroup: str) -> Optional[str]:
    """Find the id of the container this process runs in, from /proc/self/{mountinfo,cgroup} text."""
    match = re.search(r"/containers/([0-9a-f]{64})/", mountinfo) or re.search(
        r"(?:docker[-/])([0-9a-f]{64})", cgroup)
    return match.group(1) if match else None


def resolve_target(config: Config, labels: Mapping[str, str], cwd: str) -> ComposeTarget:
    """Decide project name, files and working dir: explicit settings win, then our own container's labels."""
    project = labels.get("com.docker.compose.project")
    working_dir = labels.get("com.docker.compose.project.working_dir")
    files = [f for f in labels.get("com.docker.compose.project.config_files", "").split(",") if f]
    if config.project_name:
        name, name_source = config.project_name, "COMPOSE_PROJECT_NAME"
    elif project:
        name, name_source = project, "label com.docker.compose.project of this container"
    else:
        name, name_source = None, "Compose's default, the project folder's name"
    separator = config.environ.get("COMPOSE_PATH_SEPARATOR", os.pathsep)
    if config.compose_file:
        # Made absolute because Compose then runs in the project directory, not in ours.
        paths = [os.path.abspath(os.path.join(cwd, f)) for f in config.compose_file.split(separator) if f]
        compose_file, file_source = separator.join(paths), "COMPOSE_FILE"
    elif files and working_dir:
        compose_file = separator.join(os.path.join(working_dir, f) for f in files)
        file_source = "label com.docker.compose.project.config_files of this container"
    else:
        compose_file, file_source = None, "Compose's default, compose.yaml or docker-compose.yml"
    if working_dir:
        directory, dir_source = working_dir, "label com.docker.compose.project.working_dir of this container"
    elif config.compose_file:
        # Compose's project directory is the first file's; ${PWD} and ./paths then mean what they meant there.
        directory, dir_source = os.path.dirname(compose_file.split(separator)[0]), "directory of the first COMPOSE_FILE"
    else:
        directory, dir_source = cwd, "current directory"
    # gopdater leaves its own service alone when it works on its own project.
    own_service = labels.get("com.docker.compose.service") if project and name == project else None
    return ComposeTarget(name, name_source, compose_file, file_source, directory, dir_source, own_service)


class Compose:
    """Every docker and Compose command gopdater runs, for one project."""

    def __init__(self, config: Config, target: ComposeTarget, command: Sequence[str], runner: Runner):
        self.config, self.target, self.command, self.runner = config, target, list(command), runner
        env = dict(config.environ)
        # Compose interpolates ${PWD}; make it the project directory, as on the host.
        env["PWD"] = target.working_dir
        if target.project_name:
            env["COMPOSE_PROJECT_NAME"] = target.project_name
        if target.compose_file:
            env["COMPOSE_FILE"] = target.compose_file
        self.env = types.MappingProxyType(env)

    def run(self, argv: Sequence[str], timeout: Optional[float] = None, quiet: bool = False) -> str:
        return self.runner(list(argv), timeout=timeout or self.config.command_timeout,
                           env=self.env, cwd=self.target.working_dir, quiet=quiet)

    def run_compose(self, *args: str, timeout: Optional[float] = None, quiet: bool = False) -> str:
        return self.run([*self.command, *args], timeout=timeout, quiet=quiet)

    def list_services(self) -> List[str]:
        """Service names of the project, from `compose config --services`."""
        return [s for s in self.run_compose("config", "--services", quiet=True).split() if SERVICE_RE.fullmatch(s)]

    def inspect(self, ids: Sequence[str]) -> List[Container]:
        """Inspect containers by id."""
        if not ids:
            return []
        return [Container.from_inspect(d) for d in json.loads(self.run(["docker", "inspect", *ids], quiet=True))]

    def containers(self, service: Optional[str] = None) -> List[Container]:
        """The project's containers (one-off `run` containers left out), optionally of one service."""
        ids = self.run_compose("ps", "-a", "-q", *([service] if service else []), quiet=True).split()
        return [c for c in self.inspect(ids) if not c.oneoff and CONTAINER_RE.fullmatch(c.name)
                and SERVICE_RE.fullmatch(c.service) and (service is None or c.service == service)]

    def pull(self, service: str) -> None:
        self.run_compose("pull", service, timeout=self.config.pull_timeout)

    def image_id(self, image: str) -> str:
        return self.run(["docker", "image", "inspect", "--format", "{{.Id}}", image], quiet=True).strip()

    def stop(self, name: str) -> None:
        self.run(["docker", "stop", "-t", str(self.config.stop_timeout), name],
                 timeout=self.config.stop_timeout + self.config.command_timeout)

    def remove(self, name: str) -> None:
        self.run(["docker", "rm", name])

    def up(self, service: str) -> None:
        self.run_compose("up", "-d", "--no-deps", service)

    def remove_image(self, image_id: str) -> None:
        self.run(["docker", "rmi", image_id])

    def tag(self, image_id: str, image: str) -> None:
        self.run(["docker", "tag", image_id, image])

    def logs(self, name: str) -> List[str]:
        """The container's last log lines, stdout and stderr together; never raises."""
        try:
            text = self.runner(["docker", "logs", "--tail", str(LOG_TAIL_LINES), name],
                               timeout=self.config.command_timeout, env=self.env, cwd=self.target.working_dir,
                               quiet=True, both=True)
        except CommandError:
            return []
        return text.splitlines()[-LOG_TAIL_LINES:]


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
                             env=config.environ, quiet=True).strip().lstrip("v")
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


@dataclasses.dataclass
class Project:
    """The Compose project as last discovered: services, and the image each one runs."""

    compose: Compose
    version: str
    engine: str = ""
    services: Tuple[str, ...] = ()
    images: Dict[str, ImageKey] = dataclasses.field(default_factory=dict)
    containers: Dict[str, List[Container]] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        """The project's name: as set, else as its containers' labels say."""
        labels = sorted({c.project for cs in self.containers.values() for c in cs})
        return self.compose.target.project_name or ", ".join(labels) or DEFAULT

    def refresh(self) -> None:
        """Re-read the project (`compose config --services`, `compose ps`, `docker inspect`)."""
        services = tuple(s for s in self.compose.list_services() if s != self.compose.target.own_service)
        by_service: Dict[str, List[Container]] = {}
        for container in self.compose.containers():
            if container.service in services:
                by_service.setdefault(container.service, []).append(container)
        images = {}
        for service, containers in by_service.items():
            key = parse_reference(containers[0].image)
            if key is not None:
                images[service] = key
        self.services, self.images, self.containers = services, images, by_service

    def services_for(self, image: ImageKey, explicit: Sequence[Tuple[ImageKey, str]]) -> List[str]:
        """Services that run this image: by SERVICES when set, else by what the project runs."""
        if explicit:
            return sorted({service for key, service in explicit if key == image})
        return sorted(service for service, key in self.images.items() if key == image)


def start_project(config: Config, runner: Runner = run_command,
                  read_file: Optional[Callable[[str], str]] = None, cwd: Optional[str] = None) -> Project:
    """Check Docker, find Compose and the project (with self-detection), validate SERVICES; raise ConfigError."""
    read_file = read_file or _read_text
    try:
        engine = runner(["docker", "version", "--format", "{{.Server.Version}}"], timeout=config.command_timeout,
                        env=config.environ, quiet=True).strip()
    except CommandError as error:
        raise ConfigError("the Docker engine does not answer (docker version: "
                          f"{error.tail or error.code}): start Docker, mount /var/run/docker.sock, "
                          "or set DOCKER_HOST") from None
    try:
        command, version = detect_compose(config, runner)
    except CommandError as error:
        raise ConfigError(f"no Compose found ({error.tail}): install the docker compose plugin or "
                          "docker-compose, or set COMPOSE_COMMAND") from None
    labels: Mapping[str, str] = {}
    container_id = own_container_id(read_file("/proc/self/mountinfo"), read_file("/proc/self/cgroup"))
    if container_id:
        try:
            found = json.loads(runner(["docker", "inspect", container_id], timeout=config.command_timeout,
                                      env=config.environ, quiet=True))
            labels = (found[0].get("Config") or {}).get("Labels") or {}
        except (CommandError, ValueError, IndexError, AttributeError):
            log.info("running in container %s, which Docker does not report; using settings only", container_id[:12])
    target = resolve_target(config, labels, cwd or os.getcwd())
    project = Project(Compose(config, target, command, runner), version, engine)
    try:
        project.refresh()
    except (CommandError, ValueError) as error:
        raise ConfigError(f"Compose cannot read the project in {target.working_dir} ({error}): set COMPOSE_FILE "
                          "or run gopdater from the project directory") from None
    unknown = sorted({service for _, service in config.services} - set(project.services))
    if unknown:
        raise ConfigError(f"SERVICES names {', '.join(unknown)}, not a service of this Compose project "
                          f"({', '.join(project.services) or 'none'}): fix SERVICES")
    return project


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


# --------------------------------------------------------------------------
# The deployment worker
# --------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class Deployment:
    """One requested update of one or more services, as shown in the deployments view."""

    id: str
    sender: str
    key: ImageKey
    digest: Optional[str]
    services: List[str]
    state: str = "queued"
    hooks: int = 1
    created: str = dataclasses.field(default_factory=_now)
    started: Optional[str] = None
    finished: Optional[str] = None
    results: Dict[str, str] = dataclasses.field(default_factory=dict)
    steps: List[dict] = dataclasses.field(default_factory=list)
    error: Optional[str] = None
    logs: List[str] = dataclasses.field(default_factory=list)

    @property
    def image(self) -> str:
        return f"{self.key.registry}/{self.key.repository}"

    @property
    def tag(self) -> str:
        return self.key.tag

    def view(self) -> dict:
        fields = dataclasses.asdict(self)
        del fields["key"]
        return {"id": self.id, "image": self.image, "tag": self.tag, **fields}


class DeployFailed(Exception):
    """A step of a deployment failed; the message is the reason."""


class Deployer:
    """Runs deployments one at a time in a worker thread; bursts for the same service coalesce."""

    def __init__(self, config: Config, project: Project, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 notify: Optional[Callable[[str, dict], bool]] = None):
        self.config, self.project, self.compose = config, project, project.compose
        self.clock, self.sleep = clock, sleep
        self.notify = notify or (lambda url, summary: send_notification(url, summary, sleep=sleep))
        self.lock = threading.Condition()
        self.queue: collections.deque = collections.deque()
        self.history: collections.deque = collections.deque(maxlen=HISTORY_SIZE)
        self.current: Optional[Deployment] = None
        self.stopping = False
        self.refresh_wanted = False

    # -- the request side: validate-and-enqueue only --------------------------------------------

    def submit(self, event: PushEvent, services: List[str]) -> Tuple[Optional[Deployment], bool]:
        """Queue a deployment, or join a queued one for the same image or services; (None, False) if full."""
        with self.lock:
            for queued in self.queue:
                if queued.key == event.image or set(services) <= set(queued.services):
                    queued.hooks += 1
                    queued.services = sorted(set(queued.services) | set(services))
                    queued.digest = event.digest or queued.digest
                    return queued, True
            if len(self.queue) >= MAX_QUEUED_DEPLOYMENTS or self.stopping:
                return None, False
            deployment = Deployment(id=secrets.token_hex(6), sender=event.sender, key=event.image,
                                    digest=event.digest, services=list(services))
            self.queue.append(deployment)
            self.history.append(deployment)
            self.lock.notify_all()
            return deployment, False

    def request_refresh(self) -> None:
        """Ask the worker to re-read the project soon (a hook matched nothing)."""
        with self.lock:
            self.refresh_wanted = True
            self.lock.notify_all()

    def views(self) -> List[dict]:
        with self.lock:
            return [d.view() for d in reversed(self.history)]

    # -- the worker ---------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Take queued deployments one at a time until stopped; re-read the project while idle."""
        last_refresh = self.clock()
        while True:
            with self.lock:
                while not self.queue and not self.stopping:
                    # A hook that matched nothing asks for a refresh, but at most one per 10 s.
                    interval = min(self.config.refresh_interval, 10) if self.refresh_wanted \
                        else self.config.refresh_interval
                    due = last_refresh + interval - self.clock()
                    if due <= 0:
                        break
                    self.lock.wait(timeout=min(due, 1.0))
                if self.stopping:
                    return
                deployment = self.queue.popleft() if self.queue else None
                self.current = deployment
                self.refresh_wanted = False
            if deployment is None:
                self.refresh_quietly()
            else:
                try:
                    self.execute(deployment)
                finally:
                    with self.lock:
                        self.current = None
                        self.lock.notify_all()
            last_refresh = self.clock()

    def stop(self, timeout: float) -> bool:
        """Stop taking work, cancel queued deployments, wait (bounded) for the running one; True if idle."""
        with self.lock:
            self.stopping = True
            for deployment in self.queue:
                deployment.state, deployment.finished = "cancelled", _now()
                log.warning("deployment=%s cancelled by shutdown services=%s", deployment.id,
                            ",".join(deployment.services))
            self.queue.clear()
            self.lock.notify_all()
        return self.wait_idle(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running; True if that happened within timeout."""
        end = time.monotonic() + timeout
        with self.lock:
            while (self.queue or self.current is not None) and time.monotonic() < end:
                self.lock.wait(timeout=min(1.0, max(0.0, end - time.monotonic())))
            return not self.queue and self.current is None

    def refresh_quietly(self) -> None:
        try:
            self.project.refresh()
        except (CommandError, ValueError) as error:
            log.warning("could not re-read the Compose project: %s", error)
        except Exception:  # a bug must not kill the worker
            log.exception("could not re-read the Compose project")

    def execute(self, deployment: Deployment) -> None:
        """Deploy each service of the deployment in turn and record the outcome."""
        deployment.state, deployment.started = "running", _now()
        log.info("deployment=%s start image=%s:%s services=%s hooks=%s", deployment.id, deployment.image,
                 deployment.tag, ",".join(deployment.services), deployment.hooks)
        for service in list(deployment.services):
            started = self.clock()
            summary = {"result": "failed", "old_image": None, "new_image": None, "reason": None}
            try:
                self.deploy_service(deployment, service, summary)
            except DeployFailed as error:
                summary["reason"] = str(error)
            except Exception as error:  # a bug must not kill the worker
                log.exception("deployment=%s service=%s crashed", deployment.id, service)
                summary["reason"] = f"internal error ({type(error).__name__})"
            with self.lock:
                deployment.results[service] = summary["result"]
                if summary["reason"] and summary["result"] in ("failed", "rolled-back"):
                    deployment.error = "; ".join(filter(None, [deployment.error, f"{service}: {summary['reason']}"]))
            self.record(deployment, service, "done", summary["result"], started)
            if summary["result"] in ("updated", "failed", "rolled-back") and self.config.notify_url:
                self.send_summary(deployment, service, summary, self.clock() - started)
        results = set(deployment.results.values())
        for state in ("failed", "rolled-back", "updated", "dry-run", "up-to-date"):
            if state in results:
                deployment.state = state
                break
        deployment.finished = _now()
        if results & {"updated", "rolled-back", "failed"}:  # only these can have changed the containers
            self.refresh_quietly()
        log.info("deployment=%s end state=%s", deployment.id, deployment.state)

    def record(self, deployment: Deployment, service: str, step: str, result: str, started: float) -> None:
        """Log one step and keep its timing in the deployment."""
        seconds = round(self.clock() - started, 3)
        with self.lock:
            deployment.steps.append({"service": service, "step": step, "result": result, "seconds": seconds})
        level = logging.INFO if result in ("ok", "updated", "up-to-date", "dry-run", "kept") else logging.WARNING
        log.log(level, "deployment=%s service=%s step=%s result=%s seconds=%.2f",
                deployment.id, service, step, result, seconds)

    def step(self, deployment: Deployment, service: str, name: str, action: Callable[[], object]):
        """Run one step, recording its time; a CommandError becomes DeployFailed naming the step."""
        started = self.clock()
        try:
            value = action()
        except CommandError as error:
            self.record(deployment, service, name, "failed", started)
            raise DeployFailed(f"{name} failed: {error}") from None
        self.record(deployment, service, name, "ok", started)
        return value

    def deploy_service(self, deployment: Deployment, service: str, summary: dict) -> None:
        """Pull; stop if unchanged; else stop, remove, up, wait; roll back on failure; clean up on success."""
        old = self.step(deployment, service, "inspect", lambda: self.compose.containers(service))
        if self.config.dry_run:
            self.plan(deployment, service, old)
            summary["result"] = "dry-run"
            return
        self.step(deployment, service, "pull", lambda: self.compose.pull(service))
        image = old[0].image if old else None
        new_id = self.step(deployment, service, "compare", lambda: self.compose.image_id(image)) if image else None
        old_ids = sorted({c.image_id for c in old})
        summary["old_image"], summary["new_image"] = (old_ids[0] if old_ids else None), new_id
        if old and all(c.image_id == new_id for c in old):
            summary["result"] = "up-to-date"
            return
        stopped = self.clock()
        try:
            for container in old:
                self.step(deployment, service, "stop", lambda c=container: self.compose.stop(c.name))
                self.step(deployment, service, "remove", lambda c=container: self.compose.remove(c.name))
            self.step(deployment, service, "up", lambda: self.compose.up(service))
            self.wait_until_ready(deployment, service, stopped)
        except DeployFailed as error:
            self.roll_back(deployment, service, image, old_ids, str(error), summary)
            return
        summary["result"] = "updated"
        for old_id in old_ids:
            if old_id != new_id:
                self.remove_old_image(deployment, service, old_id)

    def plan(self, deployment: Deployment, service: str, old: List[Container]) -> None:
        """Dry run: log the commands a deployment would run, run none of them."""
        compose = self.compose
        argvs = [[*compose.command, "pull", service]]
        for container in old:
            argvs += [["docker", "stop", "-t", str(self.config.stop_timeout), container.name],
                      ["docker", "rm", container.name]]
        argvs.append([*compose.command, "up", "-d", "--no-deps", service])
        argvs += [["docker", "rmi", image_id] for image_id in sorted({c.image_id for c in old})]
        for argv in argvs:
            log.info("deployment=%s service=%s dry-run would run: %s", deployment.id, service, shlex.join(argv))

    def wait_until_ready(self, deployment: Deployment, service: str, stopped: float) -> None:
        """Poll the new containers until healthy (or running for SETTLE_TIME); raise DeployFailed otherwise."""
        started = self.clock()
        try:
            self.poll_until_ready(deployment, service, stopped, started)
        except CommandError as error:
            self.record(deployment, service, "wait", "failed", started)
            raise DeployFailed(f"wait failed: {error}") from None

    def poll_until_ready(self, deployment: Deployment, service: str, stopped: float, started: float) -> None:
        ids = [c.id for c in self.compose.containers(service)]
        if not ids:
            self.record(deployment, service, "wait", "failed", started)
            raise DeployFailed("wait failed: compose up created no container")
        first_running: Dict[str, Tuple[float, str]] = {}
        delay, downtime = POLL_FIRST, None
        while True:
            containers = self.compose.inspect(ids)
            limit = max([self.config.health_timeout] + [c.start_period for c in containers])
            if not all(c.has_healthcheck for c in containers):
                limit += self.config.settle_time
            now = self.clock()
            ready, problem, waiting = 0, None, "not running"
            for c in containers:
                if c.status in ("exited", "dead") or c.restart_count > 0 or c.status == "restarting":
                    problem = f"container {c.name} exited with code {c.exit_code}" if c.status in (
                        "exited", "dead") else f"container {c.name} restarted"
                    break
                if c.status != "running":
                    waiting = c.status or "not running"
                    continue
                if downtime is None:
                    downtime = now - stopped
                seen_at, seen_start = first_running.setdefault(c.id, (now, c.started_at))
                if seen_start != c.started_at:
                    problem = f"container {c.name} restarted"
                    break
                if c.has_healthcheck:
                    if c.health == "unhealthy":
                        problem = f"container {c.name} is unhealthy"
                        break
                    ready += c.health == "healthy"
                    waiting = f"health {c.health or 'unknown'}"
                else:
                    ready += now - seen_at >= self.config.settle_time
                    waiting = "settling"
            if problem is None and ready == len(ids) == len(containers):
                with self.lock:
                    deployment.steps.append({"service": service, "step": "downtime", "result": "ok",
                                             "seconds": round(downtime or 0.0, 3)})
                self.record(deployment, service, "wait", "ok", started)
                return
            if problem is None and now - started >= limit:
                problem = f"still {waiting} after {limit:g}s"
            if problem is not None:
                self.record(deployment, service, "wait", "failed", started)
                for c in containers:
                    for line in self.compose.logs(c.name):
                        log.warning("deployment=%s service=%s container %s logged: %r", deployment.id, service,
                                    c.name, line)
                        deployment.logs.append(f"{service}: {line}")
                raise DeployFailed(problem)
            self.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX)

    def roll_back(self, deployment: Deployment, service: str, image: Optional[str], old_ids: List[str],
                  reason: str, summary: dict) -> None:
        """Put the previous image back under the service's image name and recreate the service from it."""
        summary["reason"] = reason
        log.error("deployment=%s service=%s update failed: %s; rolling back", deployment.id, service, reason)
        if not image or len(old_ids) != 1:
            summary["result"] = "failed"
            summary["reason"] = f"{reason}; no previous image to roll back to, fix the service by hand"
            return
        hint = (f"run by hand in {self.compose.target.working_dir}: docker tag {old_ids[0]} {image} && "
                f"{' '.join(self.compose.command)} up -d --no-deps {service}")
        started = self.clock()
        try:
            self.step(deployment, service, "rollback-tag", lambda: self.compose.tag(old_ids[0], image))
            for container in self.compose.containers(service):
                self.step(deployment, service, "rollback-stop", lambda c=container: self.compose.stop(c.name))
                self.step(deployment, service, "rollback-remove", lambda c=container: self.compose.remove(c.name))
            self.step(deployment, service, "rollback-up", lambda: self.compose.up(service))
            self.wait_until_ready(deployment, service, started)
        except (DeployFailed, CommandError) as error:
            summary["result"] = "failed"
            summary["reason"] = f"{reason}; rollback failed too ({error}); {hint}"
            log.error("deployment=%s service=%s ROLLBACK FAILED: %s", deployment.id, service, summary["reason"])
            return
        summary["result"] = "rolled-back"
        log.warning("deployment=%s service=%s rolled back to %s; the failed image %s is kept for inspection",
                    deployment.id, service, old_ids[0][:19], summary["new_image"])

    def remove_old_image(self, deployment: Deployment, service: str, image_id: str) -> None:
        """Remove the replaced image; keep it, with a log line, if Docker says it is still in use."""
        started = self.clock()
        try:
            self.compose.remove_image(image_id)
        except CommandError as error:
            self.record(deployment, service, "cleanup", "kept", started)
            log.info("deployment=%s service=%s kept old image %s: %s", deployment.id, service, image_id[:19],
                     error.tail)
            return
        self.record(deployment, service, "cleanup", "ok", started)

    def send_summary(self, deployment: Deployment, service: str, summary: dict, seconds: float) -> None:
        """POST the outcome to NOTIFY_URL; a failure is logged and changes nothing else."""
        result, image = summary["result"], f"{deployment.image}:{deployment.tag}"
        sentence = {
            "updated": f"gopdater updated {service} to {image} in {seconds:.1f} s.",
            "rolled-back": f"gopdater rolled {service} back: {image} failed ({summary['reason']}).",
            "failed": f"gopdater could not update {service} to {image}: {summary['reason']}.",
        }[result]
        payload = {"deployment": deployment.id, "service": service, "image": deployment.image,
                   "tag": deployment.tag, "digest": deployment.digest, "result": result,
                   "old_image": summary["old_image"], "new_image": summary["new_image"],
                   "seconds": round(seconds, 3),
                   "durations": {s["step"]: s["seconds"] for s in deployment.steps if s["service"] == service},
                   "reason": summary["reason"], "text": sentence}
        if not self.notify(self.config.notify_url, payload):
            log.warning("deployment=%s service=%s notification not delivered", deployment.id, service)


def send_notification(url: str, payload: dict, sleep: Callable[[float], None] = time.sleep) -> bool:
    """POST JSON to url with a timeout and one retry; never raises."""
    body = json.dumps(payload).encode()
    host = urllib.parse.urlsplit(url).netloc
    for attempt in (1, 2):
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"gopdater/{__version__}"})
        try:
            with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT) as response:
                response.read(1024)
            return True
        except (OSError, http.client.HTTPException, ValueError) as error:
            # The URL may itself be a secret (chat webhooks): log the host only.
            log.warning("notification to %s failed (attempt %s): %s", host, attempt, type(error).__name__)
        if attempt == 1:
            sleep(NOTIFY_RETRY_DELAY)
    return False


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


def redact(text: str, secret: str) -> str:
    """Remove the secret, and anything in the secret's place in a hook path, from a log line."""
    text = text.replace(secret, "***")
    text = re.sub(r"/hooks/(?!ghcr\b|harbor\b|registry\b)[^/\s?\"]+", "/hooks/***", text)
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


class RejectLog:
    """Logs the first rejected request of each interval, then one summary line with counts."""

    def __init__(self, interval: float = REJECT_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self.lock = threading.Lock()
        self.window_start: Optional[float] = None
        self.counts: collections.Counter = collections.Counter()

    def note(self, status: int, line: str) -> None:
        with self.lock:
            self._flush_locked()
            if self.window_start is None:
                self.window_start = self.clock()
                log.warning("rejected %s (further rejections are counted for %ds)", line, self.interval)
            else:
                self.counts[status] += 1

    def flush(self, force: bool = False) -> None:
        with self.lock:
            self._flush_locked(force)

    def _flush_locked(self, force: bool = False) -> None:
        if self.window_start is None or (not force and self.clock() - self.window_start < self.interval):
            return
        if self.counts:
            detail = ", ".join(f"{code}: {n}" for code, n in sorted(self.counts.items()))
            log.warning("rejected %d more requests in the last %ds (%s)", sum(self.counts.values()),
                        round(self.clock() - self.window_start), detail)
        self.window_start, self.counts = None, collections.Counter()


def http_response(status: HTTPStatus, payload: dict, headers: Sequence[Tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.0 response with a small JSON body."""
    body = json.dumps(payload).encode()
    lines = [f"HTTP/1.0 {status.value} {status.phrase}", "Server: gopdater", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Cache-Control: no-store", "X-Content-Type-Options: nosniff",
             "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_body(reason: str) -> dict:
    return {"status": "error", "reason": reason}


Response = Tuple[HTTPStatus, dict, Tuple[Tuple[str, str], ...]]

HOOK_ROUTES = {"ghcr": ("ghcr", parse_ghcr), "harbor": ("harbor", parse_harbor),
               "registry": ("registry", parse_distribution)}


class App:
    """Routes, authenticates, validates and enqueues; never runs a command on the request path."""

    def __init__(self, config: Config, project: Project, deployer: Deployer, rejects: Optional[RejectLog] = None):
        self.config, self.project, self.deployer = config, project, deployer
        self.rejects = rejects or RejectLog()
        self.secret = config.secret.encode()

    def bearer_ok(self, headers: Mapping[str, str]) -> bool:
        value = headers.get("Authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.secret)

    def check_secret(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self.secret)

    def signature_ok(self, headers: Mapping[str, str], body: bytes) -> bool:
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return hmac.compare_digest((headers.get("X-Hub-Signature-256") or "").encode(), expected.encode())

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request; the order is route, method, size, secret, parse, owner, mapping."""
        path = urllib.parse.urlsplit(raw_path).path
        if len(path) > 1:
            path = path.rstrip("/")
        if path == "/healthz":
            if method != "GET":
                return HTTPStatus.METHOD_NOT_ALLOWED, error_body("method not allowed"), (("Allow", "GET"),)
            return HTTPStatus.OK, {"status": "ok"}, ()
        if path == "/deployments":
            if method != "GET":
                return HTTPStatus.METHOD_NOT_ALLOWED, error_body("method not allowed"), (("Allow", "GET"),)
            if not self.bearer_ok(headers):
                return HTTPStatus.FORBIDDEN, error_body("forbidden"), ()
            return HTTPStatus.OK, {"deployments": self.deployer.views()}, ()
        parts = path.split("/")[1:]
        if parts[:1] != ["hooks"] or len(parts) > 3 or (len(parts) == 3 and parts[2] != "quay"):
            return HTTPStatus.NOT_FOUND, error_body("not found"), ()
        if method != "POST":
            return HTTPStatus.METHOD_NOT_ALLOWED, error_body("method not allowed"), (("Allow", "POST"),)
        length = headers.get("Content-Length")
        if headers.get("Transfer-Encoding") or length is None:
            return HTTPStatus.LENGTH_REQUIRED, error_body("Content-Length is required"), ()
        if not length.strip().isdigit():
            return HTTPStatus.BAD_REQUEST, error_body("invalid Content-Length"), ()
        if int(length) > MAX_BODY_BYTES:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, error_body("body is over 1 MiB"), ()
        body = body[:int(length)]
        if len(parts) == 1:
            sender, parse, authentic = "dockerhub", parse_dockerhub, self.bearer_ok(headers)
        elif len(parts) == 2 and parts[1] in HOOK_ROUTES:
            sender, parse = HOOK_ROUTES[parts[1]]
            authentic = self.signature_ok(headers, body) if sender == "ghcr" else self.bearer_ok(headers)
        else:
            sender, parse = ("quay", parse_quay) if len(parts) == 3 else ("dockerhub", parse_dockerhub)
            authentic = self.check_secret(parts[1])
        if not authentic:
            return HTTPStatus.FORBIDDEN, error_body("forbidden"), ()
        if sender == "ghcr" and headers.get("X-GitHub-Event") == "ping":
            return HTTPStatus.OK, {"status": "ok", "reason": "pong"}, ()
        if sender == "registry":
            content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type not in DISTRIBUTION_CONTENT_TYPES:
                return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, error_body("unsupported Content-Type"), ()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return HTTPStatus.BAD_REQUEST, error_body("body is not valid JSON"), ()
        if not isinstance(data, dict):
            return HTTPStatus.BAD_REQUEST, error_body("body must be a JSON object"), ()
        try:
            events = parse(data, headers)
        except PayloadError as error:
            return HTTPStatus.BAD_REQUEST, error_body(f"missing or invalid field: {error}"), ()
        except Ignored as reason:
            return HTTPStatus.OK, {"status": "ignored", "reason": str(reason)}, ()
        return self.enqueue(sender, events)

    def enqueue(self, sender: str, events: List[PushEvent]) -> Response:
        """Owner check, service mapping and queueing for validated events."""
        allowed = [e for e in events if owner_allowed(self.config.owners, e.image)]
        if not allowed:
            # A Distribution registry retries a refused delivery forever and holds back later events,
            # so events outside OWNER are only ignored there.
            if sender == "registry":
                return HTTPStatus.OK, {"status": "ignored", "reason": "namespace not in OWNER"}, ()
            return HTTPStatus.FORBIDDEN, error_body("namespace not in OWNER"), ()
        ids, all_services = [], set()
        for event in allowed:
            services = self.project.services_for(event.image, self.config.services)
            if not services:
                continue
            deployment, coalesced = self.deployer.submit(event, services)
            if deployment is None:
                reason = "deployment queue is full or gopdater is stopping"
                return HTTPStatus.SERVICE_UNAVAILABLE, error_body(reason), ()
            log.info("hook accepted sender=%s image=%s deployment=%s services=%s coalesced=%s", sender,
                     event.image, deployment.id, ",".join(services), "yes" if coalesced else "no")
            if deployment.id not in ids:
                ids.append(deployment.id)
            all_services.update(services)
        if not ids:
            self.deployer.request_refresh()
            return HTTPStatus.OK, {"status": "ignored", "reason": "no service runs this image and tag"}, ()
        reply = {"status": "accepted", "id": ids[0], "services": sorted(all_services)}
        if len(ids) > 1:
            reply["ids"] = ids
        return HTTPStatus.ACCEPTED, reply, ()


class PendingRequest:
    """A connection whose request is still arriving."""

    __slots__ = ("sock", "address", "data", "deadline", "need")

    def __init__(self, sock: socket.socket, address, deadline: float):
        self.sock, self.address, self.data, self.deadline, self.need = sock, address, bytearray(), deadline, None


class Buffered:
    """A complete request handed to a worker: the socket and the bytes already read."""

    def __init__(self, sock: socket.socket, data: bytes):
        self.sock, self.data = sock, data


def read_head(head: bytes) -> Tuple[int, bool]:
    """Content-Length (0 when absent or unusable: the handler answers those) and whether the client
    waits for `100 Continue` before sending the body, from raw header bytes."""
    length, expect = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length" and value.isdigit():
            length = int(value)
        expect = expect or (name == b"expect" and value.lower() == b"100-continue")
    return length, expect


class HookHandler(http.server.BaseHTTPRequestHandler):
    """Parses one already-buffered request with http.server and answers it through App."""

    server_version, sys_version, protocol_version = "gopdater", "", "HTTP/1.0"

    def setup(self) -> None:
        self.connection = self.request.sock
        self.connection.settimeout(self.server.request_timeout)
        self.rfile = io.BytesIO(self.request.data)
        self.wfile = io.BytesIO()
        self.rejected = False

    def finish(self) -> None:
        try:
            self.connection.sendall(self.wfile.getvalue())
        except OSError:
            pass

    def handle(self) -> None:
        self.close_connection = True
        self.raw_requestline = self.rfile.readline(MAX_HEADER_BYTES + 1)
        if not self.raw_requestline or not self.parse_request():
            return
        try:
            status, payload, headers = self.server.app.handle(self.command, self.path, self.headers, self.rfile.read())
        except Exception:
            log.exception("internal error answering %s", redact(self.requestline, self.server.app.config.secret))
            status, payload, headers = HTTPStatus.INTERNAL_SERVER_ERROR, error_body("internal error"), ()
        self.reply(status, payload, headers)

    def reply(self, status: HTTPStatus, payload: dict, headers: Sequence[Tuple[str, str]] = ()) -> None:
        self.rejected = status >= 400
        self.wfile.write(http_response(status, payload, headers))
        self.log_request(status.value, "-")

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (bad request line, ...), as fixed JSON that echoes nothing."""
        status = HTTPStatus(code)
        self.reply(status, error_body(status.phrase.lower()))

    def log_message(self, format: str, *args) -> None:
        line = redact(f"{self.client_address[0]} " + format % args, self.server.app.config.secret)
        if self.rejected:
            self.server.app.rejects.note(int(args[1]) if len(args) > 1 and str(args[1]).isdigit() else 0, line)
        else:
            log.info("%s", line)


class HookServer:
    """Reads requests without a thread per connection, then answers complete ones on a bounded pool.

    A slow or idle client costs a buffer, not a thread: threads stay at WORKERS however many
    connections are open, at most MAX_CONNECTIONS are held (the oldest is dropped beyond),
    and each has REQUEST_TIMEOUT to send its whole request.
    """

    def __init__(self, address: Tuple[str, int], app: App, *, workers: int = 4, max_connections: int = 512,
                 request_timeout: float = 10.0):
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=128,
                                             dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()[:2]
        self.app, self.workers, self.max_connections = app, workers, max_connections
        self.request_timeout = request_timeout
        self.pending: "collections.OrderedDict[int, PendingRequest]" = collections.OrderedDict()
        self.draining: Dict[int, PendingRequest] = {}
        self.jobs: queue.Queue = queue.Queue(maxsize=workers * 16)
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.stopping = threading.Event()
        self.threads: List[threading.Thread] = []

    def shutdown(self) -> None:
        """Stop accepting; serve_forever returns soon after. Safe from a signal handler."""
        self.stopping.set()
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        for n in range(self.workers):
            thread = threading.Thread(target=self.work, name=f"http-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping.is_set():
                for key, _ in self.selector.select(timeout=0.5):
                    if key.data == "accept":
                        self.accept()
                    elif key.data == "wake":
                        self.wake_r.recv(64)
                    else:
                        self.read(key.data)
                self.expire()
                self.app.rejects.flush()
        finally:
            self.close()

    def close(self) -> None:
        self.selector.close()
        self.listener.close()
        for pending in [*self.pending.values(), *self.draining.values()]:
            pending.sock.close()
        self.pending.clear()
        self.draining.clear()
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join(timeout=self.request_timeout)
        self.wake_r.close()
        self.wake_w.close()

    def accept(self) -> None:
        for _ in range(64):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. out of file descriptors: drop the oldest to make room
                log.warning("accept failed: %s", error)
                if self.pending:
                    self.refuse(next(iter(self.pending.values())), HTTPStatus.SERVICE_UNAVAILABLE)
                return
            if len(self.pending) >= self.max_connections:
                self.refuse(next(iter(self.pending.values())), HTTPStatus.SERVICE_UNAVAILABLE)
            sock.setblocking(False)
            pending = PendingRequest(sock, address, time.monotonic() + self.request_timeout)
            self.pending[sock.fileno()] = pending
            self.selector.register(sock, selectors.EVENT_READ, pending)

    def read(self, pending: PendingRequest) -> None:
        try:
            chunk = pending.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if pending.sock.fileno() in self.draining:
            if not chunk:
                self.drop(pending)
            return
        if not chunk:
            self.drop(pending)
            return
        pending.data += chunk
        if pending.need is None:
            end = pending.data.find(b"\r\n\r\n")
            if end < 0:
                if len(pending.data) > MAX_HEADER_BYTES:
                    self.refuse(pending, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                return
            length, expect = read_head(bytes(pending.data[:end]))
            if length > MAX_BODY_BYTES:
                self.refuse(pending, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, drain=True)
                return
            pending.need = end + 4 + length
            if expect and len(pending.data) < pending.need:
                # curl sends a body over 1 KiB only after this, or after waiting a second for it.
                try:
                    pending.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
        if len(pending.data) >= pending.need:
            self.dispatch(pending)

    def dispatch(self, pending: PendingRequest) -> None:
        self.selector.unregister(pending.sock)
        del self.pending[pending.sock.fileno()]
        pending.sock.setblocking(True)
        try:
            self.jobs.put_nowait((pending.sock, pending.address, bytes(pending.data)))
        except queue.Full:
            self.send_quietly(pending.sock, HTTPStatus.SERVICE_UNAVAILABLE, "server busy")
            self.note_rejected(pending, HTTPStatus.SERVICE_UNAVAILABLE)
            pending.sock.close()

    def work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            sock, address, data = job
            try:
                HookHandler(Buffered(sock, data), address, self)
            except Exception:
                log.exception("internal error in the HTTP worker")
            finally:
                sock.close()

    def send_quietly(self, sock: socket.socket, status: HTTPStatus, reason: str) -> None:
        try:
            sock.send(http_response(status, error_body(reason)))
        except OSError:
            pass

    def note_rejected(self, pending: PendingRequest, status: HTTPStatus) -> None:
        first_line = bytes(pending.data[:200]).split(b"\r\n")[0].decode("latin-1")
        line = redact(f'{pending.address[0]} "{first_line}" {status.value}', self.app.config.secret)
        self.app.rejects.note(status.value, line)

    def refuse(self, pending: PendingRequest, status: HTTPStatus, drain: bool = False) -> None:
        """Answer with a fixed error without a worker; with drain, read and discard what the client still sends."""
        self.send_quietly(pending.sock, status, status.phrase.lower())
        self.note_rejected(pending, status)
        del self.pending[pending.sock.fileno()]
        if drain:
            # Closing with unread data would reset the connection before the client reads the answer.
            try:
                pending.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            pending.deadline = time.monotonic() + DRAIN_SECONDS
            self.draining[pending.sock.fileno()] = pending
        else:
            self.selector.unregister(pending.sock)
            pending.sock.close()

    def drop(self, pending: PendingRequest) -> None:
        fileno = pending.sock.fileno()
        self.pending.pop(fileno, None)
        self.draining.pop(fileno, None)
        self.selector.unregister(pending.sock)
        pending.sock.close()

    def expire(self) -> None:
        now = time.monotonic()
        while self.pending:
            oldest = next(iter(self.pending.values()))
            if oldest.deadline > now:
                break
            if oldest.data:
                self.refuse(oldest, HTTPStatus.REQUEST_TIMEOUT)
            else:
                self.drop(oldest)
        for pending in [p for p in self.draining.values() if p.deadline <= now]:
            self.drop(pending)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def run_check(config: Config, runner: Runner = run_command, out=None) -> int:
    """Diagnose the set-up for --check: one line per finding, a fix for each problem; 0 if all is well."""
    out = out or sys.stdout
    problems = 0

    def say(ok: bool, text: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {text}", file=out)

    docker_host = config.environ.get("DOCKER_HOST") or "unset, so /var/run/docker.sock"
    try:
        project = start_project(config, runner)
    except ConfigError as error:
        say(False, f"{error} (DOCKER_HOST {docker_host})")
        return 1
    compose, target = project.compose, project.compose.target
    say(True, f"docker: engine {project.engine} answers (DOCKER_HOST {docker_host})")
    say(True, f"compose: {' '.join(compose.command)} {project.version} ({compose_flavour(project.version)})")
    say(True, f"project: {project.name} (from {target.project_name_source})")
    say(True, f"compose file: {target.compose_file or DEFAULT} (from {target.compose_file_source})")
    say(True, f"working directory: {target.working_dir} (from {target.working_dir_source})")
    if target.own_service:
        say(True, f"own service {target.own_service} is left alone: gopdater does not update itself")
    mapped = 0
    for service in project.services:
        keys = [str(k) for k, s in config.services if s == service] if config.services else (
            [str(project.images[service])] if service in project.images else [])
        mapped += bool(keys)
        if keys:
            say(True, f"service {service}: updates on a push of {', '.join(keys)}")
        elif config.services:
            say(True, f"service {service}: not in SERVICES, never updated")
        else:
            say(True, f"service {service}: no running container with a tagged image, never updated")
    if not mapped:
        say(False, "no service would ever be updated: start the services with docker compose up -d, "
                   "or set SERVICES")
    owners = ", ".join(f"{r}/{n}" for r, n in config.owners)
    say(True, f"owners allowed: {owners}")
    say(True, f"webhook URL for Docker Hub: http://<this-host>:{config.port}/hooks/{config.secret[:4]}"
              f"{'*' * 8} (the full secret is WEBHOOK_SECRET)")
    if config.dry_run:
        say(True, "DRY_RUN is on: deployments log their commands and run none")
    return 1 if problems else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Start gopdater: read settings, find the project, serve until SIGTERM or SIGINT."""
    try:
        config = load_config(argv, os.environ)
    except ConfigError as error:
        if "--check" in (sys.argv[1:] if argv is None else argv):
            print(f"FAIL {error}")
            return 1
        print(f"gopdater: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s")
    if config.check:
        return run_check(config)
    try:
        project = start_project(config)
    except ConfigError as error:
        print(f"gopdater: {error}", file=sys.stderr)
        return 2
    deployer = Deployer(config, project)
    app = App(config, project, deployer)
    try:
        server = HookServer((config.host, config.port), app, workers=config.workers,
                            max_connections=config.max_connections, request_timeout=config.request_timeout)
    except OSError as error:
        print(f"gopdater: cannot listen on {config.host}:{config.port} ({error.strerror}): "
              "set HOST and PORT to a free address", file=sys.stderr)
        return 2
    worker = threading.Thread(target=deployer.run_forever, name="deployer", daemon=True)
    worker.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.shutdown())
    target = project.compose.target
    log.info("gopdater %s listening on %s:%s compose=%s %s project=%s dir=%s services=%s%s", __version__,
             *server.server_address[:2], " ".join(project.compose.command), project.version,
             project.name, target.working_dir,
             ",".join(f"{s}={project.images[s]}" if s in project.images else s for s in project.services),
             " DRY_RUN" if config.dry_run else "")
    log.info("Docker Hub webhook URL: http://<this-host>:%s/hooks/%s******** (the rest of WEBHOOK_SECRET)",
             config.port, config.secret[:4])
    server.serve_forever()
    log.info("stopping: no new requests; waiting up to %ss for a running deployment", config.shutdown_timeout)
    if not deployer.stop(config.shutdown_timeout):
        log.error("a deployment was still running after SHUTDOWN_TIMEOUT; exiting anyway")
    app.rejects.flush(force=True)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
