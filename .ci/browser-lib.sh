# What the two real-browser checks (.ci/browser-interop and
# .ci/browser-app-heartbeat) share: Chromium installed, free ports, waiting
# for a line in a log, stopping what they started, and a headless Chromium
# in a process group of its own. Source it after defining log() and die().

# Installs Debian's chromium if it is missing (as root); fails, never skips.
ensure_chromium() {
    if ! command -v chromium >/dev/null; then
        [ "$(id -u)" -eq 0 ] || die "chromium is missing; install Debian's package: sudo apt-get install chromium"
        log "chromium is missing: installing Debian's package (apt-get)"
        if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } >&2; then
            die "could not install chromium; install it with: apt-get update && apt-get install --no-install-recommends chromium"
        fi
    fi
    command -v chromium >/dev/null || die "chromium is still missing after apt-get; install Debian's 'chromium' package"
    log "$(chromium --version 2>/dev/null)"
}

stop() { # stop PID [group]: TERM, wait up to 5 s, then KILL
    local pid=$1 target=$1
    [ -n "$pid" ] || return 0
    [ "${2:-}" = group ] && target="-$pid"
    kill -TERM -- "$target" 2>/dev/null || return 0
    local deadline=$((SECONDS + 5))
    while kill -0 -- "$target" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL -- "$target" 2>/dev/null || true
}

wait_for() { # wait_for FILE PATTERN SECONDS WHAT [PID that must stay alive meanwhile]
    local deadline=$((SECONDS + $3))
    until [ -f "$1" ] && grep -q -- "$2" "$1"; do
        [ $SECONDS -lt $deadline ] || die "$4: '$2' did not appear in $(basename "$1") within $3 s"
        [ -z "${5:-}" ] || kill -0 "$5" 2>/dev/null || die "$4: exited before '$2' appeared in $(basename "$1")"
        sleep 0.1
    done
}

pgid() { local stat; stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0; stat=${stat##*) }; set -- $stat; echo "$3"; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_chromium DIR URL [FLAG...]: headless Chromium on URL, its profile,
# temporary files and log (browser.log) in DIR, in a process group of its
# own (so that its helpers go with it: `stop "$browser_pid" group`); sets
# browser_pid. The flags keep it off the network this machine does not have.
start_chromium() {
    local dir=$1 url=$2
    shift 2
    mkdir -p "$dir/browser-tmp" # its /tmp/org.chromium.Chromium.* go here
    TMPDIR="$dir/browser-tmp" setsid chromium --headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync --disable-dev-shm-usage \
        --user-data-dir="$dir/profile" "$@" "$url" >"$dir/browser.log" 2>&1 &
    browser_pid=$!
    # setsid does not fork here (a background job is no group leader), so
    # this PID leads the new group once setsid() has run: wait for that.
    local deadline=$((SECONDS + 5))
    until [ "$(pgid "$browser_pid")" = "$browser_pid" ]; do
        [ $SECONDS -lt $deadline ] || die "chromium ($browser_pid) does not lead a process group of its own"
        sleep 0.05
    done
}
