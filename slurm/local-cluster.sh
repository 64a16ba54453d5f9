#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the tests and for trying the SLURM path on a
# workstation: Debian's slurmctld + slurmd + munge, bound to loopback, no systemd, no cgroups,
# no accounting database.
#
#   slurm/local-cluster.sh start    # install (apt) if needed, configure, start; idempotent
#   slurm/local-cluster.sh status   # exit 0 when the node accepts jobs
#   slurm/local-cluster.sh stop     # stop the daemons this script started
#
# Needs root (it writes /etc/slurm/slurm.conf and starts daemons). LOCAL_SLURM_CPUS sets the
# CPUs the node advertises (default 8, more than the cores, so several small jobs run side by
# side); LOCAL_SLURM_STATE holds spool, logs and pid files (default /var/lib/dino-local-slurm).
set -euo pipefail

STATE=${LOCAL_SLURM_STATE:-/var/lib/dino-local-slurm}
CPUS=${LOCAL_SLURM_CPUS:-8}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

MARKER="# Written by slurm/local-cluster.sh"

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# Never take over a machine's own SLURM: only a config this script wrote may be replaced.
check_not_foreign() {
    if [ -f "$CONF" ] && [ "$(head -c ${#MARKER} "$CONF")" != "$MARKER" ]; then
        die "$CONF exists and was not written by this script: this machine has its own SLURM; use it, or move the file away"
    fi
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "SLURM is not installed and installing needs root: run as root"
    command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, slurm-client and munge yourself"
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 \
             && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; } \
        || die "apt-get could not install the SLURM packages"
}

# The node name becomes torch's MASTER_ADDR, so it must resolve.
check_hostname() {
    getent hosts "$NODE" >/dev/null \
        || die "host name '$NODE' does not resolve: add '127.0.0.1 $NODE' to /etc/hosts"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    pid_alive /run/munge/munged.pid && return 0
    # --force: a stale socket from an earlier run must not stop munged from starting.
    runuser -u munge -- munged --force
}

write_config() {
    local memory
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
    [ -n "$memory" ] || die "slurmd -C did not report RealMemory"
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    cat >"$CONF.new" <<EOF
$MARKER: one node on loopback, no cgroups, no accounting database.
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire before it can start again (default 120 s; 5 is the least).
AuthInfo=cred_expire=5
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
EnforcePartLimits=ALL
JobRequeue=1
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then
        rm "$CONF.new"
    else
        mv "$CONF.new" "$CONF"
        # A changed config is read at start: restart what runs with the old one.
        stop_daemons quiet
    fi
}

start_daemons() {
    pid_alive "$STATE/slurmctld.pid" || slurmctld
    pid_alive "$STATE/slurmd.pid" || slurmd -N "$NODE"
}

node_ready() {
    local state
    state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -n 1)
    # A trailing '*' (idle*) means slurmctld cannot reach slurmd yet.
    case "$state" in idle|mix|alloc|comp) return 0;; *) return 1;; esac
}

wait_ready() {
    local i
    for i in $(seq 1 60); do
        if node_ready; then return 0; fi
        # A node drained or down from an earlier run comes back once the daemons are up.
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        sleep 0.5
    done
    say "node $NODE not ready; last lines of the logs:"
    tail -n 5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    return 1
}

stop_daemons() {
    local name pidfile
    for name in slurmd slurmctld; do
        pidfile="$STATE/$name.pid"
        if pid_alive "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in $(seq 1 50); do pid_alive "$pidfile" || break; sleep 0.1; done
            [ "${1:-}" = quiet ] || say "stopped $name"
        fi
    done
}

stop_munge() {
    if pid_alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)"
        say "stopped munged"
    fi
}

case "${1:-}" in
    start)
        check_not_foreign
        if node_ready 2>/dev/null; then say "already running (node $NODE)"; exit 0; fi
        install_packages
        check_hostname
        start_munge
        write_config
        start_daemons
        wait_ready || die "SLURM did not come up (see $STATE/log)"
        say "running: node $NODE, partition local, $CPUS CPUs; logs in $STATE/log"
        ;;
    stop)
        check_not_foreign
        stop_daemons
        stop_munge
        ;;
    status)
        if command -v sinfo >/dev/null && node_ready; then
            sinfo -N -o '%N %t %c %m %P'
        else
            say "not running"; exit 1
        fi
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
