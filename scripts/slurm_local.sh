#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the tests that run the project's job scripts under it
# (tests/test_slurm.py) and for trying a job script by hand. Needs root (the daemons run as root; munged
# runs as the munge user) and Debian's packages, which `up` installs when they are missing.
#
#   bash scripts/slurm_local.sh up       install if needed, write the config, start munged, slurmctld, slurmd
#   bash scripts/slurm_local.sh down     stop the three daemons (by their PID files, never by name)
#   bash scripts/slurm_local.sh status   sinfo
#
# Environment: SLURM_LOCAL_DIR (state, spool, logs, PID files; default /tmp/neuclip-slurm),
# SLURM_LOCAL_CPUS (CPUs the node offers, default 8: more than this machine's cores, so a 2-task job and an
# array of two such jobs run at once; slurmd takes the configured number with config_overrides).
#
# The configuration is a cluster's where preemption is safe: JobRequeue=1 (a job may requeue itself),
# KillWait=5 (SIGTERM, then SIGKILL 5 s later, at the time limit and on scancel), proctrack/linuxproc and
# task/none (no cgroups: nothing to set up in a container), no accounting. /etc/slurm/slurm.conf is written
# only when it is absent or was written by this script.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/neuclip-slurm}
CPUS=${SLURM_LOCAL_CPUS:-8}
CONF=/etc/slurm/slurm.conf
MARK="# written by scripts/slurm_local.sh"

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and this is not root: install slurmctld slurmd slurm-client munge"
    echo "installing slurmctld slurmd slurm-client munge (Debian packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script: move it away or use that cluster"
    fi
    local host mem
    host=$(hostname -s)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
    cat > "$CONF" <<EOF
$MARK (state in $DIR)
ClusterName=neuclip-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=300
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
NodeName=$host CPUs=$CPUS RealMemory=${mem:-1024} State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    pid_alive /run/munge/munged.pid && return 0
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

up() {
    install_packages
    write_config
    start_munge
    pid_alive "$DIR/slurmctld.pid" || slurmctld
    pid_alive "$DIR/slurmd.pid" || slurmd
    for _ in $(seq 150); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "slurm up: $(sinfo -h -o '%N %c CPUs %T')" >&2
            return 0
        fi
        sleep 0.2
    done
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && return 0
    die "the node did not come up: $(sinfo -h -o '%T %E' 2>&1); logs in $DIR/log"
}

stop_by_pidfile() {
    local file=$1 pid
    pid_alive "$file" || return 0
    pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    stop_by_pidfile "$DIR/slurmd.pid"
    stop_by_pidfile "$DIR/slurmctld.pid"
    stop_by_pidfile /run/munge/munged.pid
    echo "slurm down" >&2
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo ;;
    *) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
