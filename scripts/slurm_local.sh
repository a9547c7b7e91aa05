#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying and testing Slurm sweeps (run as root).
#
#   scripts/slurm_local.sh up      install slurm-wlm and munge where missing, start munged, slurmctld and
#                                  slurmd with .ci/slurm/slurm.conf, wait until the node is idle
#   scripts/slurm_local.sh down    stop the three daemons
#   scripts/slurm_local.sh status  sinfo and squeue
#
# Both are idempotent: `up` on a running cluster only checks that the node is idle. The rendered config is
# /etc/slurm/slurm.conf, where sbatch, squeue and sacct look; state, logs and completed-job records
# (sacct -c) live in $PRUNEFLOW_SLURM_STATE (default /var/tmp/pruneflow-slurm).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TEMPLATE="$REPO/.ci/slurm/slurm.conf"
STATE="${PRUNEFLOW_SLURM_STATE:-/var/tmp/pruneflow-slurm}"
CONF=/etc/slurm/slurm.conf
HOST="$(hostname -s)"

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }

install_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "slurm-wlm and munge are not installed; run as root to install them"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

start() {
    [ "$(id -u)" -eq 0 ] || die "run as root: the daemons run as root on this one-node cluster"
    install_missing
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm /run/munge /var/log/munge /var/lib/munge
    sed -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$(nproc)|g" -e "s|@STATE@|$STATE|g" "$TEMPLATE" > "$CONF.new"
    if ! cmp -s "$CONF.new" "$CONF"; then
        mv "$CONF.new" "$CONF"
        # A changed config needs the daemons restarted.
        stop_daemons
    else
        rm -f "$CONF.new"
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    if ! munge -n >/dev/null 2>&1; then
        say "starting munged"
        runuser -u munge -- /usr/sbin/munged
    fi
    if ! running "$STATE/slurmctld.pid"; then
        say "starting slurmctld"
        slurmctld
    fi
    if ! running "$STATE/slurmd.pid"; then
        say "starting slurmd"
        slurmd
    fi
    for _ in $(seq 1 60); do
        case "$(node_state)" in
            idle*|mixed*|allocated*)
                say "node $HOST is $(node_state) in partition $(sinfo -h -o %P | head -n1)"
                return ;;
            down*|drain*)
                scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    die "node $HOST did not become idle in 60 s (state: $(node_state)); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

stop_pidfile() {
    local pidfile="$1" name="$2"
    if running "$pidfile"; then
        say "stopping $name"
        local pid
        pid="$(cat "$pidfile")"
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
}

stop_daemons() {
    stop_pidfile "$STATE/slurmd.pid" slurmd
    stop_pidfile "$STATE/slurmctld.pid" slurmctld
}

stop() {
    stop_daemons
    if [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        say "stopping munged"
        kill "$(cat /run/munge/munged.pid)"
    fi
}

case "${1:-}" in
    up) start ;;
    down) stop ;;
    status) sinfo; squeue ;;
    *) die "usage: $0 up|down|status" ;;
esac
