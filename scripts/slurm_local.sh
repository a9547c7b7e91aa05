#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying and testing Slurm sweeps (run as root).
#
#   scripts/slurm_local.sh up      install slurm-wlm, slurmdbd, munge and mariadb-server where missing; start
#                                  munged, MariaDB, slurmdbd, slurmctld and slurmd with .ci/slurm/*.conf;
#                                  wait until the node is idle
#   scripts/slurm_local.sh down    stop the Slurm daemons, munged and MariaDB
#   scripts/slurm_local.sh status  sinfo and squeue
#
# Both are idempotent: `up` on a running cluster only checks that the node is idle. The rendered config is
# /etc/slurm/slurm.conf, where sbatch, squeue and sacct look (and slurmdbd.conf beside it); state and logs
# live in $PRUNEFLOW_SLURM_STATE (default /var/tmp/pruneflow-slurm).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TEMPLATES="$REPO/.ci/slurm"
STATE="${PRUNEFLOW_SLURM_STATE:-/var/tmp/pruneflow-slurm}"
CONF=/etc/slurm/slurm.conf
HOST="$(hostname -s)"

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }

install_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "slurm-wlm and munge are not installed; run as root to install them"
    say "installing slurm-wlm, slurmdbd, munge and mariadb-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

# Render a template from .ci/slurm into $2; fails (returns 1) when that changed the file.
render() {
    sed -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$(nproc)|g" -e "s|@STATE@|$STATE|g" "$TEMPLATES/$1" > "$2.new"
    if cmp -s "$2.new" "$2"; then
        rm -f "$2.new"
        return 0
    fi
    mv "$2.new" "$2"
    return 1
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

start() {
    [ "$(id -u)" -eq 0 ] || die "run as root: the daemons run as root on this one-node cluster"
    install_missing
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm /run/munge /var/log/munge /var/lib/munge
    local changed=0
    render slurm.conf "$CONF" || changed=1
    render slurmdbd.conf /etc/slurm/slurmdbd.conf || changed=1
    chmod 0600 /etc/slurm/slurmdbd.conf
    # A changed config needs the daemons restarted.
    [ "$changed" -eq 0 ] || stop_daemons
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
    if ! mysqladmin ping >/dev/null 2>&1; then
        say "starting MariaDB"
        /etc/init.d/mariadb start >/dev/null
    fi
    mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'pruneflow-local';
              GRANT ALL ON pruneflow_slurm_acct.* TO 'slurm'@'localhost';"
    if ! running "$STATE/slurmdbd.pid"; then
        say "starting slurmdbd"
        slurmdbd
        for _ in $(seq 1 30); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx pruneflow-local; then
        sacctmgr -i add cluster pruneflow-local >/dev/null
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
    stop_pidfile "$STATE/slurmdbd.pid" slurmdbd
}

stop() {
    stop_daemons
    if [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        say "stopping munged"
        kill "$(cat /run/munge/munged.pid)"
    fi
    if mysqladmin ping >/dev/null 2>&1; then
        say "stopping MariaDB"
        /etc/init.d/mariadb stop >/dev/null
    fi
}

case "${1:-}" in
    up) start ;;
    down) stop ;;
    status) sinfo; squeue ;;
    *) die "usage: $0 up|down|status" ;;
esac
