#!/usr/bin/env bash
# A throw-away 3-node RabbitMQ cluster for tests, entirely separate from the
# machine's default node (rabbit@localhost on 5672/15672/25672), which this
# script never stops, restarts, reconfigures or even talks to.
#
#   cluster.sh start      DIR BASEPORT   start hq1..hq3@localhost, cluster them, wait until all
#                                        three run; print "NAME AMQP_PORT MGMT_PORT" per node
#   cluster.sh stop-node  DIR N [--kill] stop node N (1..3): `rabbitmqctl stop` (the whole Erlang
#                                        VM exits), or SIGKILL of its beam.smp with --kill; waits
#                                        until the other nodes see it down
#   cluster.sh start-node DIR N          start node N again, wait until it runs and is back in
#                                        the cluster; print its "NAME AMQP_PORT MGMT_PORT" line
#   cluster.sh stop       DIR            stop every node started from DIR (idempotent)
#   cluster.sh status     DIR            "NAME AMQP_PORT MGMT_PORT running|app-stopped|down"
#
# Ports for node i (1..3): AMQP BASEPORT+i-1, Erlang distribution BASEPORT+10+i-1,
# management HTTP BASEPORT+20+i-1, all on 127.0.0.1 (e.g. BASEPORT=5700: 5700-5702,
# 5710-5712, 5720-5722). User guest/guest.
#
# Environment:
#   CLUSTER_PREFIX         node name prefix (default "hq" -> hq1@localhost..hq3@localhost);
#                          "auto" derives a prefix from DIR (hq<6 hex>n1..3) so that clusters
#                          from two DIRs can run side by side. Fixed at `start`, kept in DIR.
#   CLUSTER_START_TIMEOUT  seconds to wait for a node to boot/join (default 180)
#   CLUSTER_STOP_GRACE     seconds to wait for a node to stop before SIGKILL (default 30)
#   CLUSTER_KEEP_ON_FAILURE=1  leave the nodes running when `start` fails (for debugging)
#   HOOKQ_CLUSTER_ROOT     a root holding another RabbitMQ (e.g. /opt/rmq4, made by .ci/rabbitmq4:
#                          RabbitMQ 4.x); unset or empty = the machine's own RabbitMQ. Fixed at
#                          `start`, kept in DIR (later commands use the root `start` used).
#
# With HOOKQ_CLUSTER_ROOT=ROOT: the nodes and every rabbitmqctl/rabbitmq-diagnostics call run
# with `chroot --userspec=<ROOT's rabbitmq uid:gid> ROOT` and ROOT's /usr/lib/rabbitmq/bin, with
# HOME=ROOT's ~rabbitmq, so they share the Erlang cookie of ROOT's own node (not the host's).
# DIR must then lie inside ROOT (e.g. ROOT/tmp/hookq-cluster-1234): the nodes see their files
# under DIR minus the ROOT prefix; nothing is mounted or copied for them. ROOT/proc must be
# mounted (as .ci/rabbitmq4 does): `start` bind-mounts /proc there when it is not, and `stop`
# unmounts it again once nothing runs from ROOT. The default prefix is "hq4-" (hq4-1@localhost..),
# the ports of ROOT's own node (rabbit4@localhost: 5682, 15682, 25682) are refused, the nodes'
# soft open-files limit is raised to the hard one, and the caller picks a BASEPORT apart from
# the 3.10 clusters' (e.g. 5800). Must run as root (chroot).
#
# Everything lives under DIR/rmq/<node>/ (config, enabled plugins, mnesia, logs, pid file),
# owned by the `rabbitmq` user; DIR/cluster.state records prefix and base port, and
# DIR/cluster.log keeps this script's progress lines. `start` wipes DIR/rmq first. The nodes
# run as `rabbitmq` with HOME=~rabbitmq, so they share the Erlang cookie of the default
# node, and `rabbitmqctl -n hq1@localhost ...` works from root as usual.
# Progress and errors go to stderr; only the node lines go to stdout. Exit 0 on success,
# 1 on failure, 2 on bad usage. Must run as root (or as the rabbitmq user).
#
# Node loss: `stop-node` uses `rabbitmqctl stop`: the node's Erlang VM exits, its AMQP and
# HTTP listeners close at once, its TCP links to the peers close, and the peers mark it
# down and re-elect quorum queue leaders immediately (no net_ticktime wait). `stop_app`
# was not chosen: it leaves the VM up and connected, which is not a lost node. `--kill`
# (SIGKILL) is the crash variant: same immediate detection, no graceful shutdown at all.

set -euo pipefail

PROG=${0##*/}
RMQ_BIN=/usr/lib/rabbitmq/bin   # inside ROOT when there is one
RMQ_USER=rabbitmq
# ROOT: the root the RabbitMQ we run lives in ("" = this machine's own, /). From the
# environment for `start`, from DIR's state file for the other commands (pick_root).
ROOT=
START_TIMEOUT=${CLUSTER_START_TIMEOUT:-180}
STOP_GRACE=${CLUSTER_STOP_GRACE:-30}
NODES=(1 2 3)

# Progress goes to stderr and, once DIR is known, to DIR/cluster.log (kept for post-mortems
# when a caller throws stderr away).
LOGFILE=
log() {
    local line; line="$(date +%H:%M:%S) [$PROG] $*"
    printf '%s\n' "$line" >&2
    if [[ -n $LOGFILE ]]; then printf '%s\n' "$line" >>"$LOGFILE" 2>/dev/null || true; fi
}
die() { log "ERROR: $*"; exit 1; }
usage() {
    sed -n '5,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- environment checks

check_env() {
    command -v jq >/dev/null || die "jq is required (apt-get install jq)"
    if [[ -n $ROOT ]]; then check_env_root; return; fi
    [[ -x $RMQ_BIN/rabbitmq-server && -x $RMQ_BIN/rabbitmqctl ]] ||
        die "RabbitMQ not found in $RMQ_BIN (is the Debian package rabbitmq-server installed?)"
    RMQ_HOME=$(getent passwd "$RMQ_USER" | cut -d: -f6) ||
        die "no '$RMQ_USER' user on this machine"
    [[ -n $RMQ_HOME && -d $RMQ_HOME ]] || die "home of '$RMQ_USER' ($RMQ_HOME) does not exist"
    if [[ $(id -u) -eq 0 ]]; then
        AS_RMQ=(runuser -u "$RMQ_USER" --)
    elif [[ $(id -un) == "$RMQ_USER" ]]; then
        AS_RMQ=()
    else
        die "run as root (or as the $RMQ_USER user): the nodes run as $RMQ_USER"
    fi
    # The Erlang cookie: all our nodes and the CLI use ~rabbitmq/.erlang.cookie (the one the
    # default node uses). Create it up front if missing, so three nodes booting at the same
    # time don't race to create three different ones.
    local cookie=$RMQ_HOME/.erlang.cookie
    if ! "${AS_RMQ[@]}" test -r "$cookie"; then
        if [[ -e $cookie ]]; then
            die "$cookie exists but is not readable by $RMQ_USER"
        fi
        log "creating Erlang cookie $cookie"
        (umask 077; tr -dc 'A-Z' </dev/urandom | head -c 20 >"$cookie")
        chmod 400 "$cookie"
        [[ $(id -u) -eq 0 ]] && chown "$RMQ_USER:" "$cookie"
    fi
}

# Same for a RabbitMQ in ROOT: its files, its rabbitmq user (by number: names are looked up
# in ROOT's /etc/passwd, not the host's), its cookie, and ROOT/proc.
check_env_root() {
    [[ $(id -u) -eq 0 ]] || die "HOOKQ_CLUSTER_ROOT=$ROOT: run as root (chroot)"
    [[ -d $ROOT && $ROOT != / ]] || die "HOOKQ_CLUSTER_ROOT=$ROOT is not a directory (make it with .ci/rabbitmq4)"
    [[ -x $ROOT$RMQ_BIN/rabbitmq-server && -x $ROOT$RMQ_BIN/rabbitmqctl ]] ||
        die "RabbitMQ not found in $ROOT$RMQ_BIN (make the root with .ci/rabbitmq4)"
    local pw
    pw=$(awk -F: -v u="$RMQ_USER" '$1 == u { print $3 ":" $4 ":" $6 }' "$ROOT/etc/passwd") || true
    [[ $pw =~ ^([0-9]+):([0-9]+):(/.*)$ ]] || die "no '$RMQ_USER' user in $ROOT/etc/passwd"
    RMQ_UIDGID=${BASH_REMATCH[1]}:${BASH_REMATCH[2]}
    RMQ_HOME=${BASH_REMATCH[3]}                      # as the nodes see it
    [[ -d $ROOT$RMQ_HOME ]] || die "home of '$RMQ_USER' ($ROOT$RMQ_HOME) does not exist"
    AS_RMQ=(chroot "--userspec=$RMQ_UIDGID" "$ROOT")
    # ROOT's node made its cookie when it first started; make one as it would otherwise.
    local cookie=$ROOT$RMQ_HOME/.erlang.cookie
    if [[ ! -e $cookie ]]; then
        log "creating Erlang cookie $cookie"
        (umask 077; tr -dc 'A-Z' </dev/urandom | head -c 20 >"$cookie")
        chmod 400 "$cookie"
        chown "$RMQ_UIDGID" "$cookie"
    fi
    "${AS_RMQ[@]}" test -r "$RMQ_HOME/.erlang.cookie" ||
        die "$cookie is not readable by $RMQ_USER ($RMQ_UIDGID) in $ROOT"
}

# ROOT/proc: the Erlang VM and the CLI need it. Mounted by whoever started ROOT's own node;
# when not, we bind-mount it and leave a mark in DIR so that `stop` unmounts it.
proc_mounted() { mountpoint -q "$ROOT/proc"; }
ensure_proc() {
    [[ -n $ROOT ]] || return 0
    proc_mounted && return 0
    log "bind-mounting /proc on $ROOT/proc"
    timeout 30 mount --bind /proc "$ROOT/proc" || die "cannot bind-mount /proc on $ROOT/proc"
    : >"$DIR/proc.mounted"
}
# Pids of processes running in ROOT (any, not only ours).
root_pids() {
    local real p
    real=$(readlink -f "$ROOT")
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/root" 2>/dev/null) == "$real" ]] && echo "${p#/proc/}"
    done
    return 0
}
release_proc() {
    [[ -n $ROOT && -f $DIR/proc.mounted ]] || return 0
    if proc_mounted; then
        if [[ -n $(root_pids) ]]; then
            log "leaving $ROOT/proc mounted: processes still run in $ROOT"
            return 0
        fi
        timeout 30 umount "$ROOT/proc" || { log "cannot unmount $ROOT/proc"; return 0; }
        log "unmounted $ROOT/proc"
    fi
    rm -f "$DIR/proc.mounted"
}

# The path under which the nodes (in ROOT) see the host path $1.
inner() { if [[ -n $ROOT ]]; then echo "${1#"$ROOT"}"; else echo "$1"; fi; }

# For `start`: ROOT from HOOKQ_CLUSTER_ROOT; DIR must lie inside it.
root_from_env() {
    ROOT=${HOOKQ_CLUSTER_ROOT:-}
    [[ -n $ROOT ]] || return 0
    ROOT=$(realpath -m -- "$ROOT")
    [[ $ROOT != / ]] || { ROOT=; return 0; }
    [[ $DIR == "$ROOT"/* ]] ||
        die "with HOOKQ_CLUSTER_ROOT=$ROOT, DIR must lie inside it (e.g. $ROOT/tmp/hookq-cluster), so that the nodes see it; got $DIR"
}

# For the other commands: the root recorded at `start`; HOOKQ_CLUSTER_ROOT when DIR holds no
# state (e.g. `stop` on a DIR whose state file is gone).
pick_root() {
    if [[ -f $STATE ]] && grep -q '^ROOT=' "$STATE"; then
        ROOT=$(sed -n 's/^ROOT=//p' "$STATE")
    elif [[ -f $STATE ]]; then
        ROOT=   # written before roots existed: the machine's own RabbitMQ
    else
        ROOT=${HOOKQ_CLUSTER_ROOT:-}
        [[ -z $ROOT ]] || ROOT=$(realpath -m -- "$ROOT")
        [[ $ROOT != / ]] || ROOT=
    fi
    if [[ -n ${HOOKQ_CLUSTER_ROOT:-} && $(realpath -m -- "$HOOKQ_CLUSTER_ROOT") != "${ROOT:-/}" ]]; then
        log "note: HOOKQ_CLUSTER_ROOT=$HOOKQ_CLUSTER_ROOT ignored: the cluster in $DIR was started with root '${ROOT:-/}'"
    fi
    return 0
}

# The environment of every rabbitmq process we start: nothing inherited from the caller
# (a caller's RABBITMQ_* variables must not leak into our nodes or CLI calls).
BASE_ENV=()
set_base_env() {
    BASE_ENV=(HOME="$RMQ_HOME" PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8
              ERL_EPMD_ADDRESS=127.0.0.1)
}

# rabbitmqctl / rabbitmq-diagnostics as the rabbitmq user (its cookie), bounded in time.
ctl()  { timeout -k 5 "${CTL_TIMEOUT:-90}" "${AS_RMQ[@]}" env -i "${BASE_ENV[@]}" "$RMQ_BIN/rabbitmqctl" "$@" 9>&-; }
diag() { timeout -k 5 "${CTL_TIMEOUT:-90}" "${AS_RMQ[@]}" env -i "${BASE_ENV[@]}" "$RMQ_BIN/rabbitmq-diagnostics" "$@" 9>&-; }

# ctl with up to 3 tries for the cluster-forming steps; its output is shown only on failure.
ctl_retry() {
    local try out
    for try in 1 2 3; do
        if out=$(ctl "$@" 2>&1); then return 0; fi
        log "rabbitmqctl $* failed (try $try/3): $(tail -n 5 <<<"$out" | tr '\n' ' ')"
        sleep 2
    done
    printf '%s\n' "$out" >&2
    return 1
}

# ---------------------------------------------------------------- DIR, state, names, ports

setup_dir() {   # $1 = DIR; sets DIR, DATA, STATE
    [[ -n ${1:-} ]] || usage
    DIR=$(realpath -m -- "$1")
    [[ $DIR != / ]] || die "DIR must not be /"
    DATA=$DIR/rmq
    STATE=$DIR/cluster.state
    if [[ -d $DIR ]]; then LOGFILE=$DIR/cluster.log; fi
}

lock_dir() {    # serialise commands on the same DIR
    exec 9>>"$DIR/.cluster.lock"
    flock -w 600 9 || die "another $PROG command holds $DIR/.cluster.lock"
}

load_state() {  # sets PREFIX, BASEPORT; fails when DIR holds no cluster
    [[ -f $STATE ]] || return 1
    PREFIX=$(sed -n 's/^PREFIX=//p' "$STATE")
    BASEPORT=$(sed -n 's/^BASEPORT=//p' "$STATE")
    [[ $PREFIX =~ ^[A-Za-z][A-Za-z0-9_-]*$ && $BASEPORT =~ ^[0-9]+$ ]] ||
        die "$STATE is corrupt"
}

node_name() { echo "${PREFIX}$1@localhost"; }
amqp_port() { echo $((BASEPORT + $1 - 1)); }
dist_port() { echo $((BASEPORT + 10 + $1 - 1)); }
mgmt_port() { echo $((BASEPORT + 20 + $1 - 1)); }
node_dir()  { echo "$DATA/${PREFIX}$1"; }

check_node_index() {
    [[ ${1:-} =~ ^[123]$ ]] || { echo "$PROG: N must be 1, 2 or 3 (got '${1:-}')" >&2; exit 2; }
}

# PIDs of beam.smp processes that we started from this DIR for node $1 (a full node name),
# or for any node when $1 is empty. Identified by the marker variables we put in their
# environment: rabbitmq 3.10 does not show the node name on the beam.smp command line.
our_beams() {
    local want=${1:-} p env
    for p in $(pgrep -x beam.smp || true); do
        p=/proc/$p
        env=$(tr '\0' '\n' 2>/dev/null <"$p/environ") || continue   # gone / zombie
        grep -qxF "HQ_CLUSTER_DIR=$DIR" <<<"$env" || continue
        if [[ -n $want ]]; then
            grep -qxF "RABBITMQ_NODENAME=$want" <<<"$env" || continue
        fi
        echo "${p#/proc/}"
    done
}

beam_alive() { [[ -n $(our_beams "$1") ]]; }

# Is the rabbit application fully booted on node $1?
app_running() { CTL_TIMEOUT=20 diag -q -n "$1" check_running >/dev/null 2>&1; }

# Names epmd knows (short names, e.g. "hq1"); empty when epmd is not running.
epmd_names() { epmd -names 2>/dev/null | sed -n 's/^name \([^ ]*\) at port.*/\1/p' || true; }

port_in_use() { [[ -n $(ss -Hltn "( sport = :$1 )" 2>/dev/null) ]]; }

# running_nodes as seen by node $1, one per line (empty on failure)
running_nodes_seen_by() {
    CTL_TIMEOUT=30 ctl -q -n "$1" cluster_status --formatter json 2>/dev/null |
        jq -r '.running_nodes[]?' 2>/dev/null || true
}

print_node_line() { echo "$(node_name "$1") $(amqp_port "$1") $(mgmt_port "$1")"; }

# ---------------------------------------------------------------- one node

write_node_files() {   # $1 = index
    local i=$1 d; d=$(node_dir "$i")
    mkdir -p "$d/mnesia" "$d/log"
    cat >"$d/rabbitmq.conf" <<EOF
# generated by $PROG for $(node_name "$i")
# (the machine's /etc/rabbitmq/rabbitmq.conf pins 5672: this file replaces it)
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$i")
loopback_users = none
management.tcp.ip = 127.0.0.1
management.tcp.port = $(mgmt_port "$i")
# queue/message stats in the management API every second instead of every 5 s
collect_statistics_interval = 1000
log.file.level = info
log.console = false
EOF
    echo '[rabbitmq_management].' >"$d/enabled_plugins"
    # Our own (empty) rabbitmq-env.conf: the machine's /etc/rabbitmq/rabbitmq-env.conf sets
    # NODENAME=rabbit@localhost, which must not reach our nodes. What else it sets (epmd and
    # distribution on 127.0.0.1) is set explicitly in node_env.
    echo "# generated by $PROG: keeps /etc/rabbitmq/rabbitmq-env.conf away from this node" \
        >"$d/rabbitmq-env.conf"
}

node_env() {   # $1 = index; prints nothing, sets NODE_ENV
    local i=$1 d; d=$(inner "$(node_dir "$i")")   # the node's view of its directory
    NODE_ENV=("${BASE_ENV[@]}"
        HQ_CLUSTER_DIR="$DIR"
        RABBITMQ_NODENAME="$(node_name "$i")"
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        RABBITMQ_NODE_PORT="$(amqp_port "$i")"
        RABBITMQ_DIST_PORT="$(dist_port "$i")"
        RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
        RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
        RABBITMQ_MNESIA_BASE="$d/mnesia"
        RABBITMQ_LOG_BASE="$d/log"
        RABBITMQ_PID_FILE="$d/node.pid"
        ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}")
}

launch_node() {   # $1 = index: start the VM detached, do not wait
    local i=$1 d; d=$(node_dir "$i")
    node_env "$i"
    echo "=== $(date '+%F %T') starting $(node_name "$i")" >>"$d/startup.log"
    # stdout/stderr go to a file: a detached VM must not keep the caller's pipes open
    # (or `$(cluster.sh start ...)` would never return); fd 9 (our lock) is closed for it.
    # In ROOT: the soft open-files limit up to the hard one (RabbitMQ warns below 65536 and
    # a caller's 1024 would be kept; on the host the 3.10 nodes keep what they get, as before).
    if ! (if [[ -n $ROOT ]]; then ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true; fi
          exec "${AS_RMQ[@]}" env -i "${NODE_ENV[@]}" "$RMQ_BIN/rabbitmq-server" -detached) \
            >>"$d/startup.log" 2>&1 </dev/null 9>&-; then
        show_node_logs "$i"
        die "rabbitmq-server -detached failed for $(node_name "$i")"
    fi
}

show_node_logs() {   # $1 = index
    local i=$1 d n; d=$(node_dir "$i"); n=$(node_name "$i")
    {
        echo "----- $d/startup.log (tail)"
        tail -n 20 "$d/startup.log" 2>/dev/null || true
        echo "----- $d/log/$n.log (tail)"
        tail -n 30 "$d/log/$n.log" 2>/dev/null || true
        echo "-----"
    } >&2
}

# Wait until node $1's rabbit app is fully booted; deadline $2 (epoch seconds).
await_node() {
    local i=$1 deadline=$2 n left out; n=$(node_name "$i")
    while :; do
        left=$((deadline - $(date +%s)))
        if ((left <= 0)); then
            show_node_logs "$i"
            if grep -q 'Waiting for Mnesia tables' "$(node_dir "$i")/log/$n.log" 2>/dev/null; then
                die "$n did not finish booting within ${START_TIMEOUT}s: it waits for the tables of a peer that is down (start the node that stopped last first; this VM keeps waiting and joins when that peer is back)"
            fi
            die "$n did not finish booting within ${START_TIMEOUT}s"
        fi
        if ! beam_alive "$n"; then
            # the VM may take a moment to appear after -detached; give it 10 s
            if (( $(date +%s) - ${LAUNCHED_AT[$i]:-0} > 10 )); then
                show_node_logs "$i"
                die "$n: its Erlang VM exited during boot (see the logs above)"
            fi
            sleep 1; continue
        fi
        ((left > 15)) && left=15
        if out=$(CTL_TIMEOUT=$((left + 10)) ctl -q -n "$n" await_startup --timeout "$left" 2>&1); then
            return 0
        fi
        sleep 1
    done
}

# Wait until observer $1 lists (want=in) or does not list (want=out) every node in $4...
# as running; deadline $3 (epoch seconds).
await_membership() {
    local observer=$1 want=$2 deadline=$3 seen t ok
    shift 3
    while :; do
        seen=$(running_nodes_seen_by "$observer")
        ok=1
        if [[ -z $seen ]]; then ok=0; fi
        for t in "$@"; do
            if [[ $want == in ]]; then grep -qxF "$t" <<<"$seen" || ok=0
            else grep -qxF "$t" <<<"$seen" && ok=0
            fi
        done
        ((ok)) && return 0
        (( $(date +%s) < deadline )) || return 1
        sleep 1
    done
}

# Stop node with full name $1 (index $2): graceful `rabbitmqctl stop`, SIGKILL after the grace.
stop_one() {
    local n=$1 pids t
    pids=$(our_beams "$n")
    [[ -n $pids ]] || return 0
    CTL_TIMEOUT=$((STOP_GRACE + 5)) ctl -q -n "$n" stop --idempotent >/dev/null 2>&1 || true
    t=$(( $(date +%s) + STOP_GRACE ))
    while beam_alive "$n" && (( $(date +%s) < t )); do sleep 0.5; done
    pids=$(our_beams "$n")
    if [[ -n $pids ]]; then
        log "$n still running ${STOP_GRACE}s after 'rabbitmqctl stop': SIGKILL $(echo $pids)"
        kill -KILL $pids 2>/dev/null || true
        t=$(( $(date +%s) + 10 ))
        while beam_alive "$n" && (( $(date +%s) < t )); do sleep 0.2; done
        beam_alive "$n" && die "could not kill $n (pids $(echo $pids))"
    fi
    return 0
}

# ---------------------------------------------------------------- commands

cmd_start() {
    [[ $# -eq 2 ]] || usage
    setup_dir "$1"
    local base=$2 i p n t0 deadline
    [[ $base =~ ^[0-9]+$ ]] || die "BASEPORT must be a number (got '$base')"
    ((base >= 1024 && base + 22 <= 65535)) || die "BASEPORT must be in 1024..65513 (got $base)"
    root_from_env
    check_env; set_base_env
    mkdir -p "$DIR"
    LOGFILE=$DIR/cluster.log
    log "=== start $DIR $base${ROOT:+ (RabbitMQ in $ROOT)}"
    lock_dir

    # A cluster from this DIR already running?
    if [[ -n $(our_beams "") ]]; then
        die "nodes started from $DIR are still running ($(our_beams "" | xargs)); run '$PROG stop $DIR' first"
    fi

    local default_prefix=hq
    [[ -n $ROOT ]] && default_prefix=hq4-
    case ${CLUSTER_PREFIX:-$default_prefix} in
        auto) PREFIX="hq$(printf '%s' "$DIR" | sha1sum | cut -c1-6)n" ;;
        *) PREFIX=${CLUSTER_PREFIX:-$default_prefix} ;;
    esac
    [[ $PREFIX =~ ^[A-Za-z][A-Za-z0-9_-]*$ ]] || die "bad CLUSTER_PREFIX '$PREFIX'"
    BASEPORT=$base
    [[ $(node_name 1) != rabbit@* && $PREFIX != rabbit ]] || die "prefix '$PREFIX' would clash with the default node"
    [[ -z $ROOT || $PREFIX != rabbit4 ]] || die "prefix '$PREFIX' would clash with $ROOT's own node (rabbit4@localhost)"

    # Ports: never the default node's (5672 AMQP, 15672 HTTP, 25672 dist), epmd (4369), the
    # CLI tools' own distribution range (35672-35682); and nothing else may listen there.
    for i in "${NODES[@]}"; do
        for p in $(amqp_port "$i") $(dist_port "$i") $(mgmt_port "$i"); do
            if ((p == 4369 || p == 5672 || p == 15672 || p == 25672 || (p >= 35672 && p <= 35682))); then
                die "BASEPORT $base gives port $p, which the default node, epmd or the CLI tools use; pick another BASEPORT (e.g. 5700)"
            fi
            if [[ -n $ROOT ]] && ((p == 5682 || p == 15682 || p == 25682)); then
                die "BASEPORT $base gives port $p, which $ROOT's own node (rabbit4@localhost) uses; pick another BASEPORT (e.g. 5800)"
            fi
            port_in_use "$p" && die "port $p (from BASEPORT $base) is already in use: $(ss -Hltnp "( sport = :$p )" | head -1)"
        done
    done
    # Node names: two clusters from two DIRs cannot both be hq1..hq3.
    local names; names=$(epmd_names)
    for i in "${NODES[@]}"; do
        if grep -qxF "${PREFIX}$i" <<<"$names"; then
            die "node name $(node_name "$i") is already registered with epmd (a cluster from another DIR?); stop it, or set CLUSTER_PREFIX=auto or another prefix"
        fi
    done

    ensure_proc
    # The rabbitmq user must reach DIR (mktemp -d makes it 0700).
    if ! "${AS_RMQ[@]}" test -x "$(inner "$DIR")"; then
        if [[ $(stat -c %u "$DIR") -eq $(id -u) ]]; then
            log "making $DIR traversable (o+x) so that $RMQ_USER can reach $DATA"
            chmod o+x "$DIR"
        fi
        "${AS_RMQ[@]}" test -x "$(inner "$DIR")" ||
            die "user $RMQ_USER cannot reach $DIR (a parent directory is not traversable); use a DIR under ${ROOT:+$ROOT}/tmp"
    fi

    # Fresh data every start (an old DATA would make the nodes come up already clustered).
    rm -rf -- "$DATA"
    mkdir -p "$DATA"
    printf 'PREFIX=%s\nBASEPORT=%s\nDIR=%s\n' "$PREFIX" "$BASEPORT" "$DIR" >"$STATE"
    [[ -n $ROOT ]] && printf 'ROOT=%s\n' "$ROOT" >>"$STATE"
    for i in "${NODES[@]}"; do write_node_files "$i"; done
    if [[ -n $ROOT ]]; then
        chown -R "$RMQ_UIDGID" "$DATA"
    elif [[ $(id -u) -eq 0 ]]; then
        chown -R "$RMQ_USER:" "$DATA"
    fi
    chmod 755 "$DATA"

    # From here on, a failure stops whatever we started.
    if [[ ${CLUSTER_KEEP_ON_FAILURE:-0} != 1 ]]; then
        trap 'rc=$?; if ((rc != 0)); then log "start failed: stopping the nodes started from $DIR"; stop_all || true; release_proc || true; fi' EXIT
    fi

    t0=$(now)
    declare -gA LAUNCHED_AT
    for i in "${NODES[@]}"; do
        log "starting $(node_name "$i"): amqp $(amqp_port "$i"), dist $(dist_port "$i"), management $(mgmt_port "$i")"
        LAUNCHED_AT[$i]=$(date +%s)
        launch_node "$i"
    done
    deadline=$(( $(date +%s) + START_TIMEOUT ))
    for i in "${NODES[@]}"; do
        await_node "$i" "$deadline"
        log "$(node_name "$i") booted ($(elapsed "$t0")s)"
    done

    # Join 2 and 3 to 1: stop_app both, join_cluster one after the other (concurrent joins
    # to the same node can conflict), then start_app both at once.
    n=$(node_name 1)
    local m pids=() pid
    for i in 2 3; do
        m=$(node_name "$i")
        ctl_retry -q -n "$m" stop_app & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || die "stop_app on node 2 or 3 failed"; done
    for i in 2 3; do
        m=$(node_name "$i")
        ctl_retry -q -n "$m" join_cluster "$n" || die "join_cluster $n on $m failed"
    done
    pids=()
    for i in 2 3; do
        m=$(node_name "$i")
        ctl_retry -q -n "$m" start_app & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || die "start_app on node 2 or 3 failed"; done
    log "$(node_name 2) and $(node_name 3) joined $n ($(elapsed "$t0")s)"
    await_membership "$n" in "$deadline" "$(node_name 1)" "$(node_name 2)" "$(node_name 3)" ||
        die "$n does not list all three nodes as running within ${START_TIMEOUT}s (it lists: $(running_nodes_seen_by "$n" | xargs))"
    # the management listener of each node answers (tests use it right away)
    for i in "${NODES[@]}"; do
        until curl -fsS -o /dev/null -u guest:guest "http://127.0.0.1:$(mgmt_port "$i")/api/overview"; do
            (( $(date +%s) < deadline )) || die "management API of $(node_name "$i") on port $(mgmt_port "$i") does not answer"
            sleep 1
        done
    done
    trap - EXIT
    log "cluster of 3 nodes running ($(elapsed "$t0")s)"
    for i in "${NODES[@]}"; do print_node_line "$i"; done
}

cmd_stop_node() {
    [[ $# -ge 2 && $# -le 3 ]] || usage
    setup_dir "$1"; check_node_index "$2"
    local i=$2 mode=${3:-} n t0 pids peer deadline j
    [[ -z $mode || $mode == --kill ]] || usage
    pick_root
    check_env; set_base_env
    load_state || die "no cluster was started from $DIR"
    lock_dir
    n=$(node_name "$i")
    if ! beam_alive "$n"; then
        log "$n is already down"
        return 0
    fi
    # a peer that still runs, to see the node go
    peer=
    for j in "${NODES[@]}"; do
        [[ $j == "$i" ]] && continue
        if beam_alive "$(node_name "$j")" && app_running "$(node_name "$j")"; then peer=$(node_name "$j"); break; fi
    done
    t0=$(now)
    if [[ $mode == --kill ]]; then
        pids=$(our_beams "$n")
        log "SIGKILL $n (beam.smp $(echo $pids))"
        kill -KILL $pids 2>/dev/null || true
        deadline=$(( $(date +%s) + 10 ))
        while beam_alive "$n" && (( $(date +%s) < deadline )); do sleep 0.2; done
        beam_alive "$n" && die "$n survived SIGKILL"
    else
        log "stopping $n (rabbitmqctl stop: the whole Erlang VM exits)"
        stop_one "$n"
    fi
    log "$n: VM gone ($(elapsed "$t0")s)"
    if [[ -n $peer ]]; then
        await_membership "$peer" out $(( $(date +%s) + 120 )) "$n" ||
            die "$peer still lists $n as running 120 s after it stopped"
        log "$peer sees $n down ($(elapsed "$t0")s)"
    fi
}

cmd_start_node() {
    [[ $# -eq 2 ]] || usage
    setup_dir "$1"; check_node_index "$2"
    local i=$2 n t0 deadline j peer
    pick_root
    check_env; set_base_env
    load_state || die "no cluster was started from $DIR"
    [[ -d $(node_dir "$i")/mnesia ]] || die "no data for $(node_name "$i") in $DATA"
    lock_dir
    ensure_proc
    n=$(node_name "$i")
    t0=$(now)
    deadline=$(( $(date +%s) + START_TIMEOUT ))
    declare -gA LAUNCHED_AT
    LAUNCHED_AT[$i]=$(date +%s)
    if beam_alive "$n"; then
        if app_running "$n"; then
            log "$n already running"
        else
            log "$n: VM up but rabbit app stopped: start_app"
            ctl_retry -q -n "$n" start_app || die "start_app on $n failed"
        fi
    else
        for j in $(amqp_port "$i") $(dist_port "$i") $(mgmt_port "$i"); do
            port_in_use "$j" && die "port $j of $n is taken by another process: $(ss -Hltnp "( sport = :$j )" | head -1)"
        done
        log "starting $n"
        launch_node "$i"
    fi
    await_node "$i" "$deadline"
    log "$n booted ($(elapsed "$t0")s)"
    # back in the cluster: listed as running by itself and by one other running node
    await_membership "$n" in "$deadline" "$n" || die "$n does not see itself running"
    for j in "${NODES[@]}"; do
        [[ $j == "$i" ]] && continue
        peer=$(node_name "$j")
        beam_alive "$peer" && app_running "$peer" || continue
        await_membership "$peer" in "$deadline" "$n" ||
            die "$peer does not list $n as running within ${START_TIMEOUT}s"
        log "$peer lists $n as running"
        break
    done
    until curl -fsS -o /dev/null -u guest:guest "http://127.0.0.1:$(mgmt_port "$i")/api/overview"; do
        (( $(date +%s) < deadline )) || die "management API of $n on port $(mgmt_port "$i") does not answer"
        sleep 1
    done
    log "$n is back in the cluster ($(elapsed "$t0")s)"
    print_node_line "$i"
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    setup_dir "$1"
    [[ -d $DIR ]] || { log "$DIR does not exist: nothing to stop"; return 0; }
    pick_root
    check_env; set_base_env
    lock_dir
    stop_all
    release_proc
}

# Stop every VM started from DIR: `rabbitmqctl stop` to all at once, SIGKILL after the grace.
stop_all() {
    local t0 i n names=() pids bg=() deadline
    t0=$(now)
    if load_state; then
        for i in "${NODES[@]}"; do names+=("$(node_name "$i")"); done
    fi
    # plus any VM started from DIR whatever its name (e.g. a state file removed by hand)
    for pids in $(our_beams ""); do
        n=$(tr '\0' '\n' 2>/dev/null <"/proc/$pids/environ" | sed -n 's/^RABBITMQ_NODENAME=//p')
        [[ -n $n && " ${names[*]} " != *" $n "* ]] && names+=("$n")
    done
    for n in "${names[@]}"; do
        [[ $n == rabbit@* || $n == rabbit4@* ]] && continue   # never, whatever the state file says
        beam_alive "$n" || continue
        log "stopping $n"
        CTL_TIMEOUT=$((STOP_GRACE + 5)) ctl -q -n "$n" stop --idempotent >/dev/null 2>&1 &
        bg+=($!)
    done
    deadline=$(( $(date +%s) + STOP_GRACE ))
    while [[ -n $(our_beams "") ]] && (( $(date +%s) < deadline )); do sleep 0.5; done
    pids=$(our_beams "")
    if [[ -n $pids ]]; then
        log "still running ${STOP_GRACE}s after 'rabbitmqctl stop': SIGKILL $(echo $pids)"
        kill -KILL $pids 2>/dev/null || true
        deadline=$(( $(date +%s) + 10 ))
        while [[ -n $(our_beams "") ]] && (( $(date +%s) < deadline )); do sleep 0.2; done
    fi
    for pids in "${bg[@]}"; do kill "$pids" 2>/dev/null || true; wait "$pids" 2>/dev/null || true; done
    pids=$(our_beams "")
    [[ -z $pids ]] || die "could not stop beam.smp $(echo $pids) started from $DIR"
    log "no node from $DIR is running ($(elapsed "$t0")s)"
}

cmd_status() {
    [[ $# -eq 1 ]] || usage
    setup_dir "$1"
    local i n st
    pick_root
    check_env; set_base_env
    load_state || die "no cluster was started from $DIR"
    for i in "${NODES[@]}"; do
        n=$(node_name "$i")
        if ! beam_alive "$n"; then st=down
        elif app_running "$n"; then st=running
        else st=app-stopped
        fi
        echo "$(print_node_line "$i") $st"
    done
}

case ${1:-} in
    start)      shift; cmd_start "$@" ;;
    stop-node)  shift; cmd_stop_node "$@" ;;
    start-node) shift; cmd_start_node "$@" ;;
    stop)       shift; cmd_stop "$@" ;;
    status)     shift; cmd_status "$@" ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
