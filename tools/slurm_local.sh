#!/usr/bin/env bash
# Install, configure and start a one-host Slurm on this machine: munged, slurmctld and slurmd on loopback, as root,
# without systemd or cgroups (containers, CI runners, a workstation). Used by tests/test_slurm.py.
#
#   sudo bash tools/slurm_local.sh
#
# Installs Debian's slurm-wlm and munge when missing, writes /etc/slurm/slurm.conf for this host (one node, one
# partition "debug" with all CPUs (and GPUs, when nvidia-smi lists some), requeue allowed, no accounting), creates
# a munge key, starts the daemons directly and waits until `sinfo` shows the node idle.
# Idempotent: when this host's Slurm already answers and its configuration is the one this script writes (or is
# not one this script wrote: a real cluster's), nothing is touched. Exits non-zero with a message when something
# cannot be installed (exit 3: not root, no apt-get, apt-get failed) or started (exit 1).
# Environment: SLURM_LOCAL_CPUS (node CPUs; default nproc, at least 2 so that a 2-task job fits),
# SLURM_LOCAL_CRED_EXPIRE (credential lifetime, which is also how long a requeued job waits before it starts
# again; default 10 s, Slurm's own default is 120 s), SLURM_LOCAL_TIMEOUT (seconds to wait for the node; default
# 60), SLURM_LOCAL_FORCE=1 (rewrite the configuration and restart the daemons in any case).
set -euo pipefail

log() { echo "slurm_local: $*" >&2; }
fail() {  # exit 1: installed but cannot be configured or started
    echo "slurm_local: error: $*" >&2
    exit 1
}
cannot_install() {  # exit 3: Slurm cannot be installed here (tests skip on this code)
    echo "slurm_local: error: $*" >&2
    exit 3
}

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARK="# Written by tools/slurm_local.sh"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
HOST=$(hostname -s 2>/dev/null || hostname)
[[ -n "$HOST" ]] || fail "cannot determine this host's name"

# -- the configuration for this host ------------------------------------------------------------------------------
cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
((cpus >= 2)) || cpus=2
overrides=""
((cpus != $(nproc))) && overrides="SlurmdParameters=config_overrides"  # not what the host reports: trust config
total_mb=$(free -m | awk '/^Mem:/ {print $2}')
[[ "$total_mb" =~ ^[0-9]+$ ]] || fail "cannot read the memory size from free -m"
margin=$((total_mb / 10 > 1024 ? 1024 : total_mb / 10))
memory=$((total_mb - margin))

gres_types="" node_gres="" gres_conf=""
if command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && ((gpus > 0)); then
    gres_types="GresTypes=gpu"
    node_gres="Gres=gpu:$gpus"
    gres_conf=$(printf '%s\nAutoDetect=off\nNodeName=%s Name=gpu File=/dev/nvidia[0-%d]' "$MARK" "$HOST" $((gpus - 1)))
fi

new_conf=$(cat <<EOF
$MARK: a one-host Slurm for tests (no systemd, no cgroups, no accounting).
ClusterName=dsmoe-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job starts again only once its old credential expired (Slurm's default: 120 s).
AuthInfo=cred_expire=${SLURM_LOCAL_CRED_EXPIRE:-10}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
$gres_types
$overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmdTimeout=300
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory $node_gres State=UNKNOWN
PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP
EOF
)

node_state() { timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 || true; }

# -- already up? ----------------------------------------------------------------------------------------------------
if [[ "${SLURM_LOCAL_FORCE:-0}" != 1 ]] && command -v sinfo >/dev/null; then
    state=$(node_state)
    if [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]; then
        if ! head -n1 "$CONF" 2>/dev/null | grep -qF "$MARK"; then
            log "Slurm is already running here with a configuration of its own (node $HOST is $state): using it"
            exit 0
        fi
        if [[ "$(cat "$CONF")" == "$new_conf" ]]; then
            log "Slurm is already running here (node $HOST is $state); nothing to do"
            exit 0
        fi
        log "Slurm is running with an older configuration of this script: rewriting it and restarting"
    fi
fi

[[ $(id -u) -eq 0 ]] || cannot_install "must run as root (installs packages, writes $CONF, starts daemons as root)"

# -- install --------------------------------------------------------------------------------------------------------
missing=0
for cmd in slurmctld slurmd sbatch srun scontrol munged munge; do command -v "$cmd" >/dev/null || missing=1; done
if ((missing)); then
    command -v apt-get >/dev/null || cannot_install "Slurm is not installed and there is no apt-get to install slurm-wlm, munge"
    log "installing slurm-wlm and munge with apt-get (log: /tmp/slurm_local-apt.log)"
    # Keep the packages' init scripts from starting daemons during the install (there is no configuration yet).
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge \
            >>/tmp/slurm_local-apt.log 2>&1
    }
    : >/tmp/slurm_local-apt.log
    ok=1
    apt_install || { apt-get update -q >>/tmp/slurm_local-apt.log 2>&1 || true; apt_install; } || ok=0
    ((own_policy)) && rm -f "$policy"
    if ((!ok)); then
        tail -n 20 /tmp/slurm_local-apt.log >&2
        cannot_install "apt-get install slurm-wlm munge failed (log: /tmp/slurm_local-apt.log)"
    fi
    for cmd in slurmctld slurmd sbatch srun scontrol munged munge; do
        command -v "$cmd" >/dev/null || cannot_install "$cmd is still missing after installing slurm-wlm and munge"
    done
fi

# -- munge ----------------------------------------------------------------------------------------------------------
MUNGE_USER=root
id munge >/dev/null 2>&1 && MUNGE_USER=munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --force --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown "$MUNGE_USER:$MUNGE_USER" /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
chmod 400 /etc/munge/munge.key

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    pidfile=/run/munge/munged.pid
    if [[ -f $pidfile ]] && [[ "$(cat "/proc/$(cat $pidfile)/comm" 2>/dev/null)" == munged ]]; then
        kill "$(cat $pidfile)" || true
        sleep 1
    fi
    log "starting munged (as $MUNGE_USER)"
    if [[ $MUNGE_USER == munge ]]; then
        runuser -u munge -- munged --force >/tmp/slurm_local-munged.log 2>&1 || true
    else
        munged --force >/tmp/slurm_local-munged.log 2>&1 || true
    fi
    for _ in $(seq 20); do munge_ok && break; sleep 0.5; done
    munge_ok || { cat /tmp/slurm_local-munged.log >&2; fail "munged did not start (munge -n | unmunge fails)"; }
fi

# -- slurm.conf -----------------------------------------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
if [[ -f $CONF ]] && ! head -n1 "$CONF" | grep -qF "$MARK"; then
    cp "$CONF" "$CONF.before-slurm_local"
    log "kept the previous $CONF as $CONF.before-slurm_local"
fi
printf '%s\n' "$new_conf" >"$CONF.new" && mv "$CONF.new" "$CONF"
if [[ -n $gres_conf ]]; then printf '%s\n' "$gres_conf" >"$CONF_DIR/gres.conf"; else rm -f "$CONF_DIR/gres.conf"; fi
log "wrote $CONF ($HOST: $cpus CPUs, $memory MB${node_gres:+, $node_gres})"

# -- daemons --------------------------------------------------------------------------------------------------------
stop_daemon() {  # the process of a pid file, if it is that daemon
    local pidfile=$1 name=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if [[ -n $pid ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}
stop_daemon "$RUN_DIR/slurmd.pid" slurmd
stop_daemon "$RUN_DIR/slurmctld.pid" slurmctld

log "starting slurmctld"
slurmctld || { tail -n 20 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null; fail "slurmctld did not start"; }
for _ in $(seq 40); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
timeout 5 scontrol ping 2>/dev/null | grep -q UP ||
    { tail -n 20 "$LOG_DIR/slurmctld.log" >&2; fail "slurmctld does not answer (log: $LOG_DIR/slurmctld.log)"; }

log "starting slurmd"
slurmd || { tail -n 20 "$LOG_DIR/slurmd.log" >&2 2>/dev/null; fail "slurmd did not start"; }

deadline=$((SECONDS + TIMEOUT))
while ((SECONDS < deadline)); do
    state=$(node_state)
    if [[ $state =~ ^(idle|mixed|allocated)$ ]]; then
        log "Slurm is up: node $HOST is $state (logs in $LOG_DIR)"
        exit 0
    fi
    if [[ $state =~ (down|drain|fail) ]]; then  # e.g. left down by an earlier, unclean shutdown
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 1
done
tail -n 20 "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
fail "node $HOST did not become idle within ${TIMEOUT}s (state: '$(node_state)'; logs in $LOG_DIR)"
