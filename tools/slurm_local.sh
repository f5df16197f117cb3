#!/usr/bin/env bash
# Install, configure and start a Slurm on this machine, as root, without systemd or cgroups (containers, CI
# runners, a workstation): one node on loopback, or several nodes, each in network and UTS namespaces of its own.
# Used by tests/test_slurm.py.
#
#   sudo bash tools/slurm_local.sh                      # one node: this host, on 127.0.0.1
#   sudo SLURM_LOCAL_NODES=2 bash tools/slurm_local.sh  # two nodes, dsmoe-n1 and dsmoe-n2, on a virtual network
#   sudo bash tools/slurm_local.sh --down               # stop the daemons; remove the nodes' namespaces and links
#
# Installs Debian's slurm-wlm and munge when missing, writes /etc/slurm/slurm.conf (one partition "debug" with all
# nodes, requeue allowed, no accounting), creates a munge key, starts the daemons directly and waits until `sinfo`
# shows every node idle. One node is this host with all its CPUs (and GPUs, when nvidia-smi lists some).
# Several nodes: node i is a network namespace dsmoe-n<i> with hostname dsmoe-n<i> (a UTS namespace), address
# $SLURM_LOCAL_NET.<10+i> on a veth linked to a bridge dsmoe-br ($SLURM_LOCAL_NET.1, where slurmctld listens), its
# name in /etc/hosts (a marked block) and its own slurmd; the tasks Slurm starts on a node run in its namespaces,
# so ranks on different nodes talk over that network, not over loopback. Only these addresses are used.
# Idempotent: when this host's Slurm already answers and its configuration is the one this script writes (or is
# not one this script wrote: a real cluster's), nothing is touched, except that a node whose slurmd is gone (or
# whose namespace is) is set up and started again. Exits non-zero with a message when something cannot be
# installed (exit 3: not root, no apt-get, apt-get failed) or started (exit 1).
# Environment: SLURM_LOCAL_NODES (nodes; default 1), SLURM_LOCAL_NET (the nodes' /24 as three octets; default
# 10.213.0), SLURM_LOCAL_CPUS (CPUs of each node; default nproc, at least 2 so that a 2-task job fits),
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

NODES=${SLURM_LOCAL_NODES:-1}
[[ $NODES =~ ^[1-9][0-9]?$ ]] || fail "SLURM_LOCAL_NODES must be a number of nodes from 1 to 99, not '$NODES'"
NET=${SLURM_LOCAL_NET:-10.213.0}
[[ $NET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || fail "SLURM_LOCAL_NET must be three octets (e.g. 10.213.0)"
BRIDGE=dsmoe-br
NODE_PREFIX=dsmoe-n
HOSTS_BEGIN="# dsmoe slurm_local nodes: begin"
HOSTS_END="# dsmoe slurm_local nodes: end"
node_name() { echo "$NODE_PREFIX$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }

# -- daemons and the nodes' namespaces ------------------------------------------------------------------------------
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
namespace_exists() { [[ -e /run/netns/$1 ]]; }
node_slurmd_alive() {  # a slurmd runs in node $1's network namespace
    local name pid
    name=$(node_name "$1")
    namespace_exists "$name" || return 1
    for pid in $(ip netns pids "$name" 2>/dev/null); do
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmd ]] && return 0
    done
    return 1
}
remove_node() {  # node $1: every process in its namespace killed, the namespace and its link gone
    local name
    name=$(node_name "$1")
    if namespace_exists "$name"; then
        ip netns pids "$name" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns delete "$name" 2>/dev/null || true
    fi
    ip link delete "$name-v" 2>/dev/null || true
    rm -f "$RUN_DIR/slurmd-$name.pid"
}
write_hosts_block() {  # the nodes' names ($@: node numbers) in /etc/hosts between the markers; none: no block
    local kept block="" i
    kept=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' /etc/hosts)
    if (($# > 0)); then
        block="$HOSTS_BEGIN"$'\n'
        for i in "$@"; do block+="$(node_addr "$i") $(node_name "$i")"$'\n'; done
        block+="$HOSTS_END"$'\n'
    fi
    printf '%s\n%s' "$kept" "$block" >/etc/hosts  # in place: /etc/hosts may be a mount point
}
remove_all_nodes() {  # every dsmoe-n<i> namespace and link, the bridge and the /etc/hosts block
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        if [[ $ns =~ ^$NODE_PREFIX([0-9]+)$ ]]; then remove_node "${BASH_REMATCH[1]}"; fi
    done
    ip link delete "$BRIDGE" 2>/dev/null || true
    if grep -qxF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null; then write_hosts_block; fi
}
add_node_network() {  # node $1: its namespace, a veth to the bridge, its address (idempotent)
    local name addr
    name=$(node_name "$1")
    addr=$(node_addr "$1")
    namespace_exists "$name" || ip netns add "$name" || fail "cannot create the network namespace $name"
    if ! ip link show "$name-v" >/dev/null 2>&1; then
        ip netns exec "$name" ip link delete eth0 2>/dev/null || true
        ip link add "$name-v" type veth peer name eth0 netns "$name" || fail "cannot create the link of $name"
    fi
    { ip link set "$name-v" master "$BRIDGE" && ip link set "$name-v" up; } || fail "cannot attach $name to $BRIDGE"
    ip netns exec "$name" ip link set lo up
    ip netns exec "$name" ip addr replace "$addr/24" dev eth0
    ip netns exec "$name" ip link set eth0 up || fail "cannot bring up $name's eth0"
}
start_node_slurmd() {  # node $1's slurmd inside its namespaces (where it stays when it goes to the background)
    local name
    name=$(node_name "$1")
    mkdir -p "$SPOOL_DIR/$name"
    # nsenter, not `ip netns exec`: that mounts a sysfs of its own, without the /sys/fs/cgroup slurmd looks for
    # shellcheck disable=SC2016
    nsenter --net="/run/netns/$name" unshare --uts -- sh -c 'hostname "$1" && exec slurmd -N "$1"' sh "$name" ||
        { tail -n 20 "$LOG_DIR/slurmd-$name.log" >&2 2>/dev/null; fail "slurmd of $name did not start"; }
}

if [[ "${1:-}" == --down ]]; then
    [[ $(id -u) -eq 0 ]] || fail "--down must run as root"
    stop_daemon "$RUN_DIR/slurmd.pid" slurmd
    remove_all_nodes
    stop_daemon "$RUN_DIR/slurmctld.pid" slurmctld
    log "stopped slurmctld and slurmd; removed the nodes' namespaces, links and /etc/hosts entries"
    exit 0
fi
[[ $# -eq 0 ]] || fail "unknown argument '$1' (usage: slurm_local.sh [--down])"

# -- the configuration ----------------------------------------------------------------------------------------------
cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
((cpus >= 2)) || cpus=2
overrides=""
((cpus != $(nproc) || NODES > 1)) && overrides="SlurmdParameters=config_overrides"  # not what the host reports
total_mb=$(free -m | awk '/^Mem:/ {print $2}')
[[ "$total_mb" =~ ^[0-9]+$ ]] || fail "cannot read the memory size from free -m"
margin=$((total_mb / 10 > 1024 ? 1024 : total_mb / 10))
memory=$(((total_mb - margin) / NODES))

gres_types="" node_gres="" gres_conf=""
if ((NODES == 1)) && command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') &&
    ((gpus > 0)); then
    gres_types="GresTypes=gpu"
    node_gres="Gres=gpu:$gpus"
    gres_conf=$(printf '%s\nAutoDetect=off\nNodeName=%s Name=gpu File=/dev/nvidia[0-%d]' "$MARK" "$HOST" $((gpus - 1)))
fi

if ((NODES == 1)); then
    title="a one-host Slurm for tests"
    ctld_addr=127.0.0.1
    node_names=$HOST
    node_lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory $node_gres State=UNKNOWN"
    spool=$SPOOL_DIR
    slurmd_files="SlurmdPidFile=$RUN_DIR/slurmd.pid"$'\n'"SlurmdLogFile=$LOG_DIR/slurmd.log"
else
    title="a $NODES-node Slurm for tests, each node in network namespaces of its own"
    ctld_addr=$NET.1
    node_names=$(for i in $(seq "$NODES"); do node_name "$i"; done)
    node_lines=$(for i in $(seq "$NODES"); do
        echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$memory State=UNKNOWN"
    done)
    spool="$SPOOL_DIR/%n"
    slurmd_files="SlurmdPidFile=$RUN_DIR/slurmd-%n.pid"$'\n'"SlurmdLogFile=$LOG_DIR/slurmd-%n.log"
fi

new_conf=$(cat <<EOF
$MARK: $title (no systemd, no cgroups, no accounting).
ClusterName=dsmoe-local
SlurmctldHost=$HOST($ctld_addr)
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
SlurmdSpoolDir=$spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
$slurmd_files
SlurmctldLogFile=$LOG_DIR/slurmctld.log
$node_lines
PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP
EOF
)

node_states() { timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null || true; }
all_nodes_up() {  # every node of this configuration idle or at work
    local states name
    states=$(node_states)
    for name in $node_names; do
        grep -qE "^$name (idle|mixed|allocated|completing)$" <<<"$states" || return 1
    done
}
nodes_without_slurmd() {  # several nodes: the numbers of those whose namespace or slurmd is gone
    local i
    ((NODES > 1)) || return 0
    for i in $(seq "$NODES"); do node_slurmd_alive "$i" || echo "$i"; done
}

# -- already up? ----------------------------------------------------------------------------------------------------
restart_ctld=1
if [[ "${SLURM_LOCAL_FORCE:-0}" != 1 ]] && command -v sinfo >/dev/null &&
    timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
    if ! head -n1 "$CONF" 2>/dev/null | grep -qF "$MARK"; then
        log "Slurm is already running here with a configuration of its own: using it"
        exit 0
    fi
    if [[ "$(cat "$CONF")" == "$new_conf" ]]; then
        if [[ -z "$(nodes_without_slurmd)" ]] && all_nodes_up; then
            log "Slurm is already running here ($(echo $node_names) up); nothing to do"
            exit 0
        fi
        restart_ctld=0  # the same configuration: start only what is missing
    else
        log "Slurm is running with another configuration of this script: rewriting it and restarting"
    fi
fi

[[ $(id -u) -eq 0 ]] || cannot_install "must run as root (installs packages, writes $CONF, starts daemons as root)"

# -- install --------------------------------------------------------------------------------------------------------
missing=0
for cmd in slurmctld slurmd sbatch srun scontrol munged munge; do command -v "$cmd" >/dev/null || missing=1; done
if ((missing)); then
    command -v apt-get >/dev/null ||
        cannot_install "Slurm is not installed and there is no apt-get to install slurm-wlm, munge"
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

# -- slurm.conf and the nodes' network ------------------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
if ((restart_ctld)); then
    if [[ -f $CONF ]] && ! head -n1 "$CONF" | grep -qF "$MARK"; then
        cp "$CONF" "$CONF.before-slurm_local"
        log "kept the previous $CONF as $CONF.before-slurm_local"
    fi
    printf '%s\n' "$new_conf" >"$CONF.new" && mv "$CONF.new" "$CONF"
    if [[ -n $gres_conf ]]; then printf '%s\n' "$gres_conf" >"$CONF_DIR/gres.conf"; else rm -f "$CONF_DIR/gres.conf"; fi
    log "wrote $CONF ($NODES node(s), $cpus CPUs and $memory MB each${node_gres:+, $node_gres})"
    stop_daemon "$RUN_DIR/slurmd.pid" slurmd
    remove_all_nodes  # those of an earlier configuration
    stop_daemon "$RUN_DIR/slurmctld.pid" slurmctld
fi
lost=$(nodes_without_slurmd)
if ((NODES > 1)); then
    { command -v ip && command -v nsenter && command -v unshare; } >/dev/null ||
        fail "several nodes need ip (iproute2), nsenter and unshare (util-linux)"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || fail "cannot create the bridge $BRIDGE (network namespaces need root)"
    fi
    { ip addr replace "$NET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up; } || fail "cannot bring up $BRIDGE"
    for i in $lost; do
        remove_node "$i"  # whatever is left of it
        add_node_network "$i"
    done
    # shellcheck disable=SC2046
    write_hosts_block $(seq "$NODES")
fi

# -- daemons --------------------------------------------------------------------------------------------------------
if ((restart_ctld)); then
    log "starting slurmctld"
    slurmctld || { tail -n 20 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null; fail "slurmctld did not start"; }
    for _ in $(seq 40); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
    timeout 5 scontrol ping 2>/dev/null | grep -q UP ||
        { tail -n 20 "$LOG_DIR/slurmctld.log" >&2; fail "slurmctld does not answer (log: $LOG_DIR/slurmctld.log)"; }
fi
if ((NODES == 1)); then
    if [[ "$(cat "/proc/$(cat "$RUN_DIR/slurmd.pid" 2>/dev/null)/comm" 2>/dev/null)" != slurmd ]]; then
        log "starting slurmd"
        slurmd || { tail -n 20 "$LOG_DIR/slurmd.log" >&2 2>/dev/null; fail "slurmd did not start"; }
    fi
else
    for i in $lost; do
        log "starting the slurmd of $(node_name "$i") ($(node_addr "$i"))"
        start_node_slurmd "$i"
    done
fi

deadline=$((SECONDS + TIMEOUT))
while ((SECONDS < deadline)); do
    if all_nodes_up; then
        log "Slurm is up: $(echo $node_names) (logs in $LOG_DIR)"
        exit 0
    fi
    states=$(node_states)
    for name in $node_names; do  # left down by an earlier, unclean shutdown, or a lost node started again
        if grep -qE "^$name .*(down|drain|fail)" <<<"$states"; then
            scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
        fi
    done
    sleep 1
done
tail -n 20 "$LOG_DIR"/slurmd*.log >&2 2>/dev/null || true
fail "not every node became idle within ${TIMEOUT}s (sinfo: '$(node_states | tr '\n' ';')'; logs in $LOG_DIR)"
