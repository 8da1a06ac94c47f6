# shellcheck shell=bash
# lib-demo.sh: two simulated nodes running PostgreSQL on one shared volume
# under blockfence; the harness of scripts/demo.sh and scripts/bench-failover.
#
#   shared image --> node-a: FUSE path + loop device   (lib-nodes.sh)
#                \-> node-b: FUSE path + loop device
#                \-> view:   read-only loop device (lease sampling only)
#
# A node is: its own cgroup v2 directory (freeze = stall, cgroup.kill = kill
# every process), its own mount namespace (unshare -m --propagation private)
# holding its daemon (`blockfence daemon`, restarted if it dies) and a
# supervisor loop (what Kubernetes does for a pod: restart it) running
#   blockfence run --volume pg --mount $BF_MNT -- setpriv --reuid=postgres ... postgres ...
# on its own 127.0.0.1 port. Its watchdog emulator (blockfence-watchdog-emu)
# runs OUTSIDE the node's cgroup and namespace, since it plays the hardware:
# when the daemon stops feeding it, it "resets" the node (demo_node_crash).
#
# Needs: root, cgroup v2 (pure or hybrid at /sys/fs/cgroup/unified), FUSE,
# loop devices, PostgreSQL 15, e2fsprogs, util-linux, curl, cargo.
#
# Time: every timestamp is /proc/uptime (one kernel, one clock for all the
# simulated nodes; read with the `read` builtin, no fork), 10 ms resolution.
#
# Files in $BF_DEMO_DIR (kept with --keep; `bash scripts/lib-demo.sh cleanup
# DIR` removes a kept run):
#   events.log   "T kind node detail": faults, pod/daemon starts and exits
#   samples.log  "T lease holder=H state=S gen=G" and "T node N mounted=M
#                rw=R path=P shut=X could_write=C" on every change, "T DOUBLE
#                ..." for every sample in which two nodes could write (or one
#                could while the lease names the other)
#   acked.log    "n T node S": every insert the client saw committed, at T,
#                first tried at S
#   node-X/      lib-nodes.sh node dir + cgroup, pid files, daemon.log,
#                pod.log, watchdog.log, pathmode
#
# Environment:
#   BF_BIN_DIR         where blockfence, blockfence-fusepath and
#                      blockfence-watchdog-emu are (default: build release)
#   BF_DEMO_PORT       first PostgreSQL port (default 15432; node-b: +1)
#   BF_DEMO_SIZE       image size (default 512M)
#   BF_WATCHDOG_MS     watchdog timeout (default 1000; must leave the reset
#                      before the peer's takeover: lease + fence + this < host_dead)
#   BF_DEMO_STANDIN=1  no daemon: `blockfence lease acquire --mmp-clean` and
#                      a plain mount stand in for `blockfence run` (harness
#                      development only; it does not fence)

BF_DEMO_LIB=$(realpath "${BASH_SOURCE[0]}")
BF_DEMO_ROOT=$(cd "$(dirname "$BF_DEMO_LIB")/.." && pwd)
# shellcheck source=lib-nodes.sh
. "$BF_DEMO_ROOT/scripts/lib-nodes.sh"

BF_PG_BIN=${BF_PG_BIN:-/usr/lib/postgresql/15/bin}
BF_DEMO_PORT=${BF_DEMO_PORT:-15432}
BF_DEMO_SIZE=${BF_DEMO_SIZE:-512M}
BF_WATCHDOG_MS=${BF_WATCHDOG_MS:-1000}
BF_DEMO_NODES=(node-a node-b)
declare -A BF_OTHER=([node-a]=node-b [node-b]=node-a)
export BF_PG_BIN BF_DEMO_PORT BF_DEMO_SIZE BF_WATCHDOG_MS
[[ -n ${BF_DEMO_STANDIN:-} ]] && export BF_DEMO_STANDIN

demo_err() { echo "lib-demo: $*" >&2; }
demo_die() {
    demo_err "$@"
    exit 1
}

# demo_event KIND NODE DETAIL...: one line in events.log.
demo_event() {
    local now
    read -r now _ </proc/uptime
    echo "$now $*" >>"$BF_DEMO_DIR/events.log"
}

# ---------------------------------------------------------------- prerequisites

demo_require_root() {
    [[ $(id -u) == 0 ]] || demo_die "must run as root: it attaches loop devices, mounts FUSE and ext4, creates cgroups and mount namespaces (try: sudo $0)"
}

# demo_install_deps: apt-get install only what is missing.
demo_install_deps() {
    local -a pkgs=()
    [[ -x $BF_PG_BIN/postgres && -x $BF_PG_BIN/pg_ctl && -x $BF_PG_BIN/initdb ]] || pkgs+=(postgresql-15)
    command -v psql >/dev/null || pkgs+=(postgresql-client-15)
    command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || pkgs+=(e2fsprogs)
    for c in unshare nsenter losetup runuser lsblk; do
        command -v "$c" >/dev/null || { pkgs+=(util-linux mount); break; }
    done
    command -v mount >/dev/null || pkgs+=(mount)
    command -v curl >/dev/null || pkgs+=(curl)
    command -v ss >/dev/null || pkgs+=(iproute2)
    # The demo builds blockfence first: libudev-dev and pkg-config.
    # shellcheck source=lib-deps.sh
    . "$(dirname "${BASH_SOURCE[0]}")/lib-deps.sh"
    deps_ensure "${DEPS_BUILD[@]}" || demo_die "cannot install ${DEPS_BUILD[*]}"
    if ((${#pkgs[@]})); then
        echo "installing missing packages: ${pkgs[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" ||
            demo_die "apt-get install ${pkgs[*]} failed; install them by hand"
    fi
    [[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || demo_die "/dev/fuse missing (modprobe fuse)"
    [[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || demo_die "/dev/loop-control missing (modprobe loop)"
    demo_cgroup_base >/dev/null || demo_die "no cgroup v2 hierarchy (mount -t cgroup2 none /sys/fs/cgroup/unified)"
}

# demo_cgroup_base: the cgroup v2 mount point.
demo_cgroup_base() {
    local b
    for b in /sys/fs/cgroup /sys/fs/cgroup/unified; do
        [[ -e $b/cgroup.controllers ]] && { echo "$b"; return 0; }
    done
    return 1
}

# demo_build: sets BF_BIN, BF_EMU, BF_FUSEPATH (building release if needed).
demo_build() {
    if [[ -z ${BF_BIN_DIR:-} ]]; then
        echo "building blockfence (release)..."
        (cd "$BF_DEMO_ROOT" && cargo build --release --quiet --bins) || demo_die "cargo build failed"
        BF_BIN_DIR=${CARGO_TARGET_DIR:-$BF_DEMO_ROOT/target}/release
    fi
    BF_BIN=$BF_BIN_DIR/blockfence
    BF_EMU=$BF_BIN_DIR/blockfence-watchdog-emu
    export BF_FUSEPATH=$BF_BIN_DIR/blockfence-fusepath
    local b
    for b in "$BF_BIN" "$BF_EMU" "$BF_FUSEPATH"; do
        [[ -x $b ]] || demo_die "$b not built"
    done
    if [[ -z ${BF_DEMO_STANDIN:-} ]] && ! "$BF_BIN" daemon --help >/dev/null 2>&1; then
        demo_die "this blockfence has no 'daemon' subcommand yet (set BF_DEMO_STANDIN=1 for the stand-in)"
    fi
    export BF_BIN BF_EMU BF_BIN_DIR
}

demo_check_ports() {
    local p
    for p in "$BF_DEMO_PORT" $((BF_DEMO_PORT + 1)); do
        [[ -z $(ss -Hltn "sport = :$p") ]] || demo_die "port $p is in use; set BF_DEMO_PORT"
    done
}

# ---------------------------------------------------------------- setup

# demo_node_dir NODE
demo_node_dir() { echo "$BF_DEMO_DIR/$1"; }
demo_node_port() {
    case $1 in
    node-a) echo "$BF_DEMO_PORT" ;;
    node-b) echo $((BF_DEMO_PORT + 1)) ;;
    esac
}
demo_other() { [[ $1 == node-a ]] && echo node-b || echo node-a; }

# demo_setup DIR [TEMPLATE]: image (a copy of TEMPLATE, or new and
# formatted), both nodes' paths, the read-only view. Not booted yet.
demo_setup() {
    BF_DEMO_DIR=$1
    local template=${2:-} n dir
    export BF_DEMO_DIR
    mkdir -p "$BF_DEMO_DIR" && chmod 755 "$BF_DEMO_DIR"
    : >"$BF_DEMO_DIR/events.log"
    : >"$BF_DEMO_DIR/samples.log"
    : >"$BF_DEMO_DIR/acked.log"
    BF_MNT=$BF_DEMO_DIR/pg
    mkdir -p "$BF_MNT"
    export BF_MNT
    if [[ -n $template ]]; then
        cp --sparse=always "$template" "$BF_DEMO_DIR/shared.img" || return 1
    else
        bf_image_create "$BF_DEMO_DIR/shared.img" "$BF_DEMO_SIZE" || return 1
    fi
    for n in "${BF_DEMO_NODES[@]}"; do
        dir=$(demo_node_dir "$n")
        # Not in $(...): the FUSE process must belong to this shell.
        bf_node_start "$BF_DEMO_DIR/shared.img" "$dir" >/dev/null || return 1
        echo ok >"$dir/pathmode"
        lsblk -dno MAJ:MIN "$(bf_node_device "$dir")" | tr -d ' ' >"$dir/majmin"
    done
    losetup -r --direct-io=on -f --show "$BF_DEMO_DIR/shared.img" >"$BF_DEMO_DIR/view.dev" ||
        return 1
    if [[ -z $template ]]; then
        "$BF_BIN" format "$(bf_node_device "$(demo_node_dir node-a)")" --force \
            --node node-a --node node-b >>"$BF_DEMO_DIR/format.log" 2>&1 ||
            { cat "$BF_DEMO_DIR/format.log" >&2; return 1; }
    fi
}

# demo__spawn_ready LOG PREFIX CMD...: starts CMD in the background with its
# stdout in LOG, returns once its first line starts with PREFIX (an event,
# not a sleep). Sets BF_SPAWNED to its pid.
demo__spawn_ready() {
    local log=$1 prefix=$2 fifo fd line
    shift 2
    fifo=$log.fifo
    rm -f "$fifo" && mkfifo "$fifo" || return 1
    "$@" >"$fifo" 2>>"$log.err" &
    BF_SPAWNED=$!
    exec {fd}<"$fifo"
    rm -f "$fifo"
    if ! read -r -t 20 -u "$fd" line || [[ $line != "$prefix"* ]]; then
        exec {fd}<&-
        demo_err "$1 did not print $prefix: ${line:-nothing}"
        return 1
    fi
    echo "$line" >>"$log"
    # The rest of its output, until it exits (the drain ends with it).
    cat <&"$fd" >>"$log" 2>/dev/null &
    exec {fd}<&-
}

# demo_node_boot NODE [initdb]: cgroup, watchdog emulator, then the node's
# namespace with its daemon and supervisor loop. With `initdb`, the node
# first initialises the database through `blockfence run`.
demo_node_boot() {
    local node=$1 mode=${2:-} dir cg
    dir=$(demo_node_dir "$node")
    cg=$(demo_cgroup_base)/blockfence-demo-$$-$node-$RANDOM
    mkdir "$cg" || return 1
    echo "$cg" >"$dir/cgroup"
    rm -f "$dir/go" && mkfifo "$dir/go"
    mkdir -p "$dir/sock" && chown postgres: "$dir/sock"
    echo ok >"$dir/pathmode"
    if [[ -z ${BF_DEMO_STANDIN:-} ]]; then
        demo__spawn_ready "$dir/watchdog.log" READY "$BF_EMU" --path "$dir/watchdog" \
            --timeout-ms "$BF_WATCHDOG_MS" --node "$node" \
            --on-expire "bash -c '. \"$BF_DEMO_LIB\"; BF_DEMO_DIR=\"$BF_DEMO_DIR\" demo_node_crash $node watchdog'" ||
            return 1
        echo "$BF_SPAWNED" >"$dir/watchdog.pid"
    fi
    # Join the cgroup first, then the new mount namespace, then the node's main.
    setsid bash -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' _ "$cg" \
        unshare -m --propagation private -- \
        bash -c '. "$1"; demo__node_main "${@:2}"' _ "$BF_DEMO_LIB" "$BF_DEMO_DIR" "$node" "$mode" \
        </dev/null >>"$dir/node.log" 2>&1 &
    echo $! >"$dir/init.pid"
    disown $! # it is killed with its cgroup; no job notice
    demo_event boot "$node" "cgroup=$cg"
}

# demo_node_go NODE: lets the node's supervisor loop start its pod.
demo_node_go() { timeout 20 bash -c 'echo go >"$1"' _ "$(demo_node_dir "$1")/go"; }

# ---------------------------------------------------------------- inside a node

# demo__node_main DEMO_DIR NODE MODE: PID 1 of a simulated node (its own cgroup
# and mount namespace). Runs the daemon loop and the pod loop.
demo__node_main() {
    BF_DEMO_DIR=$1
    local node=$2 mode=$3 dir dev
    BF_MNT=$BF_DEMO_DIR/pg
    dir=$(demo_node_dir "$node")
    dev=$(bf_node_device "$dir")
    if [[ -z ${BF_DEMO_STANDIN:-} ]]; then
        demo__daemon_loop "$node" "$dir" "$dev" &
    fi
    if [[ $mode == initdb ]]; then
        demo__initdb "$node" "$dir" "$dev"
    fi
    demo__pod_loop "$node" "$dir" "$dev" &
    wait
}

demo__daemon_loop() {
    local node=$1 dir=$2 dev=$3 rc
    while :; do
        "$BF_BIN" daemon --node-name "$node" --socket "$dir/api.sock" --volume "pg=$dev" \
            --watchdog "$dir/watchdog" --watchdog-timeout-ms "$BF_WATCHDOG_MS" \
            >>"$dir/daemon.log" 2>&1 &
        echo $! >"$dir/daemon.pid"
        demo_event daemon_start "$node" "pid=$!"
        wait $!
        rc=$?
        demo_event daemon_exit "$node" "rc=$rc"
        sleep 0.2 # a crash-looping daemon must not spin
    done
}

# demo__session NODE DIR DEV -- COMMAND...: one `blockfence run` session
# (or its stand-in).
demo__session() {
    local node=$1 dir=$2 dev=$3
    shift 4
    if [[ -n ${BF_DEMO_STANDIN:-} ]]; then
        demo__standin_run "$node" "$dir" "$dev" "$@"
    else
        # The pod: its own mount and PID namespaces, without CAP_SYS_ADMIN
        # (it cannot mount ext4), so the node's daemon mounts the volume into
        # its namespace (--daemon-mount), as in Kubernetes.
        unshare --mount --propagation private --pid --fork -- \
            setpriv --bounding-set -sys_admin --inh-caps -sys_admin -- \
            "$BF_BIN" run --daemon-mount --volume pg --mount "$BF_MNT" --socket "$dir/api.sock" \
            --holder "pg-$node" --stop-signal INT --stop-timeout 20 -- "$@"
    fi
}

demo__initdb() {
    local node=$1 dir=$2 dev=$3 rc
    while [[ -z ${BF_DEMO_STANDIN:-} && ! -S $dir/api.sock ]]; do sleep 0.1; done
    demo__session "$node" "$dir" "$dev" -- bash -c '
        set -e
        install -d -o postgres -g postgres -m 700 "$1/data"
        runuser -u postgres -- "$2/initdb" -D "$1/data" -U postgres -A trust >/dev/null
        ' _ "$BF_MNT" "$BF_PG_BIN" >>"$dir/pod.log" 2>&1
    rc=$?
    demo_event initdb_done "$node" "rc=$rc"
}

# The pod: restarted after every exit, as Kubernetes restarts a container.
demo__pod_loop() {
    local node=$1 dir=$2 dev=$3 port rc
    port=$(demo_node_port "$node")
    read -r _ <"$dir/go"
    while :; do
        demo_event pod_start "$node" ""
        # setpriv, not runuser: runuser stays as a parent that ignores SIGINT
        # (the fast-shutdown stop signal) and SIGKILLs 2 s after a SIGTERM;
        # setpriv execs, so `blockfence run` signals the postmaster itself.
        demo__session "$node" "$dir" "$dev" -- setpriv --reuid=postgres --regid=postgres --init-groups -- "$BF_PG_BIN/postgres" \
            -D "$BF_MNT/data" -p "$port" -k "$dir/sock" -c listen_addresses=127.0.0.1 \
            -c shared_buffers=16MB -c max_connections=20 -c max_wal_size=64MB \
            >>"$dir/pod.log" 2>&1
        rc=$?
        demo_event pod_exit "$node" "rc=$rc"
        sleep 0.5 # restart back-off
    done
}

# Stand-in for `blockfence run` while the daemon does not exist: lease +
# MMP clean + plain mount. It does not fence: for harness development only.
demo__standin_run() {
    local node=$1 dir=$2 dev=$3 line lease_pid cpid rc
    shift 3
    coproc LEASE { exec "$BF_BIN" lease acquire "$dev" --node "$node" --mmp-clean; }
    lease_pid=$LEASE_PID
    while read -r -u "${LEASE[0]}" line; do
        [[ $line == *'"mmp_clean'* ]] && break
    done
    mount -o noatime,errors=remount-ro "$dev" "$BF_MNT" || { kill "$lease_pid"; return 1; }
    "$@" &
    cpid=$!
    wait -n "$cpid" "$lease_pid"
    if kill -0 "$cpid" 2>/dev/null; then
        fuser -k -9 -m "$BF_MNT" >/dev/null 2>&1
        umount -l "$BF_MNT"
        return 4
    fi
    wait "$cpid"
    rc=$?
    umount "$BF_MNT" || umount -l "$BF_MNT"
    kill -TERM "$lease_pid"
    wait "$lease_pid"
    return "$rc"
}

# ---------------------------------------------------------------- faults

# demo_path_mode NODE ok|eio|stall: the node's storage path (recorded for the sampler).
demo_path_mode() {
    local dir
    dir=$(demo_node_dir "$1")
    bf_node_mode "$dir" "$2" >/dev/null || demo_err "cannot set $1's path to $2"
    echo "$2" >"$dir/pathmode"
}

# demo_node_crash NODE [WHY]: the node dies: its path is cut (eio) first, so
# nothing stays blocked in the kernel, then every process of its cgroup is
# killed (also when frozen). Returns once the cgroup is empty.
demo_node_crash() {
    local node=$1 why=${2:-crash} dir cg
    dir=$(demo_node_dir "$node")
    cg=$(cat "$dir/cgroup" 2>/dev/null) || return 0
    demo_event node_kill "$node" "$why"
    demo_path_mode "$node" eio
    [[ -d $cg ]] || return 0
    echo 1 >"$cg/cgroup.kill"
    echo 0 >"$cg/cgroup.freeze"
    demo__wait_cgroup_empty "$cg" 20
    demo_event node_dead "$node" "$why"
}

demo__wait_cgroup_empty() {
    local cg=$1 left=$(($2 * 20)) key val populated=1
    while :; do
        populated=0
        while read -r key val; do
            [[ $key == populated ]] && populated=$val
        done <"$cg/cgroup.events" 2>/dev/null
        ((populated)) || return 0
        ((left-- > 0)) || { demo_err "$cg still has processes"; return 1; }
        sleep 0.05
    done
}

demo_node_freeze() {
    local cg
    cg=$(cat "$(demo_node_dir "$1")/cgroup")
    echo 1 >"$cg/cgroup.freeze"
    demo_event node_frozen "$1" ""
}

# demo_postmaster_pid NODE: from postmaster.pid, read through the node's own
# mount namespace (/proc/PID/root).
demo_postmaster_pid() {
    local pid
    pid=$(demo__ns_pid "$1") || return 1
    head -n1 "/proc/$pid/root$BF_MNT/data/postmaster.pid" 2>/dev/null
}

# demo__ns_pid NODE: a process of the node (its mount namespace).
demo__ns_pid() {
    local cg pid
    cg=$(cat "$(demo_node_dir "$1")/cgroup" 2>/dev/null) || return 1
    read -r pid <"$cg/cgroup.procs" 2>/dev/null && [[ -n $pid ]] && echo "$pid"
}

# demo_api NODE METHOD PATH [BODY]: the node daemon's HTTP API.
demo_api() {
    local dir
    dir=$(demo_node_dir "$1")
    curl -sS --max-time 5 --unix-socket "$dir/api.sock" -X "$2" \
        ${4:+-H 'content-type: application/json' --data "$4"} "http://x$3"
}

# ---------------------------------------------------------------- observers

# demo_sampler_start: every ~50 ms (paced by `blockfence inspect --watch` on
# the read-only view), the lease and each node's mount table; writes changes
# and double-writer moments to samples.log.
demo_sampler_start() {
    # No inherited stdout: a reader of this script's output must see EOF.
    demo__sampler </dev/null >/dev/null 2>>"$BF_DEMO_DIR/sampler.err" &
    echo $! >"$BF_DEMO_DIR/sampler.pid"
}

demo__sampler() {
    local fd line now lease="" prev_lease="" holder state gen n dir majmin pid mi m rw mode shut cw ns
    local -a pids seen_ns
    local -A prev_node=() could=() mounted_rw=() mounted=() rwm=() modes=()
    local cgp l
    local samples=0 fault_node=""
    exec {fd}< <(exec "$BF_BIN" inspect "$(cat "$BF_DEMO_DIR/view.dev")" --json --watch \
        --interval-ms 50 2>>"$BF_DEMO_DIR/sampler.err")
    echo $! >"$BF_DEMO_DIR/inspect.pid"
    while IFS= read -r -u "$fd" line; do
        read -r now _ </proc/uptime
        holder=unreadable state=unreadable gen=unknown
        # The owner record, not "lease": a dead holder's slot still says Hold.
        if [[ $line =~ \"owner\":\{\"generation\":([0-9]+),\"holder\":(null|\"([^\"]*)\"),\"params\":\{[^\}]*\},\"slot\":[^,]*,\"state\":\"([a-z_]+)\" ]]; then
            gen=${BASH_REMATCH[1]}
            holder=${BASH_REMATCH[3]:-none}
            state=${BASH_REMATCH[4]}
            [[ $state == held ]] || holder=none
        fi
        lease="holder=$holder state=$state gen=$gen"
        [[ $lease != "$prev_lease" ]] && echo "$now lease $lease" >>"$BF_DEMO_DIR/samples.log"
        prev_lease=$lease
        [[ -e $BF_DEMO_DIR/fault ]] && read -r fault_node _ <"$BF_DEMO_DIR/fault"
        for n in "${BF_DEMO_NODES[@]}"; do
            dir=$BF_DEMO_DIR/$n
            read -r majmin <"$dir/majmin"
            read -r mode <"$dir/pathmode" 2>/dev/null || mode=unknown
            m=0 rw=0
            # Every mount namespace of the node's processes: the pod has its
            # own (the daemon mounts the volume into it).
            pids=() seen_ns=()
            [[ -e $dir/cgroup ]] && { read -r cgp <"$dir/cgroup"; mapfile -t pids <"$cgp/cgroup.procs"; } 2>/dev/null
            for pid in "${pids[@]}"; do
                ns=$(readlink "/proc/$pid/ns/mnt" 2>/dev/null) || continue
                [[ " ${seen_ns[*]} " == *" $ns "* ]] && continue
                seen_ns+=("$ns")
                mapfile -t mi <"/proc/$pid/mountinfo" 2>/dev/null || continue
                for l in "${mi[@]}"; do
                    # id parent maj:min root mountpoint opts ... - fstype source superopts
                    if [[ $l =~ ^[0-9]+\ [0-9]+\ $majmin\ [^\ ]+\ [^\ ]+\ (r[ow])[^\ ]*\ (.*\ )?-\ [^\ ]+\ [^\ ]+\ (r[ow]) ]]; then
                        m=1
                        [[ ${BASH_REMATCH[1]} == rw && ${BASH_REMATCH[3]} == rw ]] && rw=1
                    fi
                done
            done
            mounted[$n]=$m
            rwm[$n]=$rw
            modes[$n]=$mode
            mounted_rw[$n]=$((rw == 1 ? 1 : 0))
            [[ $mode == eio ]] && mounted_rw[$n]=0
        done
        for n in "${BF_DEMO_NODES[@]}"; do
            shut=0
            # The kernel log is read only when it matters: after a fault on
            # this node, or when another node could write too.
            if ((mounted_rw[$n])) && { [[ $n == "$fault_node" ]] || ((mounted_rw[${BF_OTHER[$n]}])) ||
                [[ $holder != "$n" ]]; }; then
                demo__is_shut_down "$BF_DEMO_DIR/$n" && shut=1
            fi
            cw=$((mounted_rw[$n] && !shut ? 1 : 0))
            could[$n]=$cw
            line="mounted=${mounted[$n]} rw=${rwm[$n]} path=${modes[$n]} shut=$shut could_write=$cw"
            [[ $line != "${prev_node[$n]:-}" ]] && echo "$now node $n $line" >>"$BF_DEMO_DIR/samples.log"
            prev_node[$n]=$line
        done
        if ((could[node-a] && could[node-b])); then
            echo "$now DOUBLE both node-a and node-b could write ($lease)" >>"$BF_DEMO_DIR/samples.log"
        fi
        for n in "${BF_DEMO_NODES[@]}"; do
            if ((could[$n])) && [[ $holder == "${BF_OTHER[$n]}" ]]; then
                echo "$now DOUBLE $n could write while the lease names $holder ($lease)" >>"$BF_DEMO_DIR/samples.log"
            fi
        done
        samples=$((samples + 1))
        echo "$samples" >"$BF_DEMO_DIR/samples.count"
    done
}

# demo__is_shut_down NODE_DIR: the kernel log's last word on the node's ext4
# mount is a shutdown (or an error remount read-only).
demo__is_shut_down() {
    local dev last
    dev=$(basename "$(cat "$1/device")")
    last=$(dmesg --notime 2>/dev/null | grep -E "EXT4-fs \($dev\): (mounted filesystem|shut down requested|Remounting filesystem read-only)" | tail -n1)
    [[ $last == *"shut down"* || $last == *Remounting* ]]
}

# demo_client_start: inserts n = 1, 2, ... one committed statement each,
# into whichever node answers (the last good one first), retrying the same n
# until acknowledged; every acknowledged n goes to acked.log with its time.
demo_client_start() {
    demo__client </dev/null >/dev/null 2>>"$BF_DEMO_DIR/client.err" &
    echo $! >"$BF_DEMO_DIR/client.pid"
}

demo__client() {
    local n=1 prefer=node-a node now start
    export PGCONNECT_TIMEOUT=2 PGUSER=postgres PGDATABASE=postgres
    while [[ ! -e $BF_DEMO_DIR/client.stop ]]; do
        local ok=0
        read -r start _ </proc/uptime
        for node in "$prefer" "${BF_OTHER[$prefer]}"; do
            if timeout -k 0.2 1.5 psql -h 127.0.0.1 -p "$(demo_node_port "$node")" -X -qAt \
                -v ON_ERROR_STOP=1 -c "INSERT INTO t (n) VALUES ($n)" >/dev/null 2>&1; then
                read -r now _ </proc/uptime
                echo "$n $now $node $start" >>"$BF_DEMO_DIR/acked.log"
                n=$((n + 1))
                prefer=$node
                ok=1
                break
            fi
        done
        ((ok)) || sleep 0.05
    done
}

demo_client_stop() {
    local pid
    touch "$BF_DEMO_DIR/client.stop"
    pid=$(cat "$BF_DEMO_DIR/client.pid" 2>/dev/null) || return 0
    wait "$pid" 2>/dev/null
    rm -f "$BF_DEMO_DIR/client.pid"
}

# demo_psql NODE SQL...: one statement on a node (short timeouts).
demo_psql() {
    local node=$1
    shift
    PGCONNECT_TIMEOUT=2 timeout -k 0.2 5 psql -h 127.0.0.1 -p "$(demo_node_port "$node")" \
        -U postgres -d postgres -X -qAt -v ON_ERROR_STOP=1 -c "$*"
}

# demo_wait_ready NODE SECONDS: until the node's PostgreSQL answers.
demo_wait_ready() {
    local left=$(($2 * 10))
    until demo_psql "$1" "SELECT 1" >/dev/null 2>&1; do
        ((left-- > 0)) || return 1
        sleep 0.1
    done
}

# demo_wait_log FILE REGEX SECONDS: until a line of FILE matches; prints it.
# A plain loop rather than `timeout tail -F | grep`: bash does not act on a
# Ctrl-C whose foreground child (timeout) exits normally, so the trap would
# not run.
demo_wait_log() {
    local left=$(($3 * 10)) line
    until line=$(grep -m1 -E -- "$2" "$1" 2>/dev/null); do
        ((left-- > 0)) || return 1
        sleep 0.1
    done
    echo "$line"
}

# demo_active_node: the node with the volume mounted (per its mount table).
demo_active_node() {
    local n last
    last=$(grep -E " node node-[ab] " "$BF_DEMO_DIR/samples.log" | awk '{s[$3]=$4} END {for (n in s) if (s[n]=="mounted=1") print n}')
    for n in $last; do echo "$n"; return 0; done
    return 1
}

# ---------------------------------------------------------------- a whole run

# demo_start DIR [TEMPLATE]: everything up to a running client on node-a with
# node-b waiting. Returns non-zero (with a message) on any failure.
demo_start() {
    local dir=$1 template=${2:-}
    demo_check_ports
    demo_setup "$dir" "$template" || return 1
    if [[ -z $template ]]; then
        demo_node_boot node-a initdb || return 1
        demo_wait_log "$BF_DEMO_DIR/events.log" " initdb_done node-a " 120 | grep -q "rc=0" ||
            { demo_err "initdb failed; see $BF_DEMO_DIR/node-a/pod.log"; return 1; }
    else
        demo_node_boot node-a || return 1
    fi
    demo_node_boot node-b || return 1
    demo_sampler_start
    demo_node_go node-a
    demo_wait_ready node-a 60 || { demo_err "PostgreSQL on node-a did not start; see $BF_DEMO_DIR/node-a/pod.log"; return 1; }
    demo_psql node-a "CREATE TABLE IF NOT EXISTS t (n int NOT NULL, at timestamptz DEFAULT now())" >/dev/null ||
        return 1
    demo_node_go node-b
    demo_client_start
}

# demo_inject SCENARIO NODE: the fault; records it (time, node) in events.log
# and in $BF_DEMO_DIR/fault for the sampler.
demo_inject() {
    local scenario=$1 node=$2 pid
    echo "$node $scenario" >"$BF_DEMO_DIR/fault"
    demo_event fault "$node" "$scenario"
    case $scenario in
    handover) demo_api "$node" POST /v1/volumes/pg/handover "{\"to_node\":\"$(demo_other "$node")\"}" >>"$BF_DEMO_DIR/events.api" 2>&1 ;;
    db-crash)
        pid=$(demo_postmaster_pid "$node") || { demo_err "no postmaster on $node"; return 1; }
        kill -KILL "$pid"
        ;;
    daemon-crash) kill -KILL "$(cat "$(demo_node_dir "$node")/daemon.pid")" ;;
    node-crash) demo_node_crash "$node" fault ;;
    node-stall) demo_node_freeze "$node" ;;
    path-loss) demo_path_mode "$node" eio ;;
    *) demo_err "unknown scenario $scenario"; return 1 ;;
    esac
}

# demo_fault_time: the fault's time (uptime seconds).
demo_fault_time() { awk '$2 == "fault" { print $1; exit }' "$BF_DEMO_DIR/events.log"; }

# demo_wait_insert_after T SECONDS [OLD]: until an insert first tried after T
# is acknowledged (one in flight at T proves nothing about a takeover); with
# OLD, one that demo_timeline OLD counts as its first_insert.
demo_wait_insert_after() {
    demo_wait_log "$BF_DEMO_DIR/acked.log" "." "$2" >/dev/null # at least one line
    local left=$(($2 * 10))
    until awk -v t="$1" '$4 > t { f = 1 } END { exit !f }' "$BF_DEMO_DIR/acked.log" &&
        { [[ -z ${3:-} ]] || ! demo_timeline "$3" | grep -q '^first_insert -$'; }; do
        ((left-- > 0)) || return 1
        sleep 0.1
    done
}

# demo_timeline OLD: "key value" lines (seconds from the fault, or "-"):
# fence release takeover mount first_insert first_insert_node.
# first_insert: the first acknowledged insert first tried after the fault on
# the peer, or on OLD once its pod has exited and come back (a database
# crash); an insert OLD still served before it stopped does not count.
demo_timeline() {
    local old=$1 new t0
    new=${BF_OTHER[$old]}
    t0=$(demo_fault_time)
    awk -v t0="$t0" -v old="$old" -v new="$new" '
        FILENAME ~ /events.log$/ && $1 >= t0 && $2 == "pod_exit" && $3 == old && back == "" { back = $1 }
        FILENAME ~ /samples.log$/ && $1 >= t0 {
            if ($2 == "node" && $3 == old && $NF == "could_write=0" && fence == "") fence = $1 - t0
            if ($2 == "lease" && $3 != ("holder=" old) && release == "") release = $1 - t0
            if ($2 == "lease" && $3 == ("holder=" new) && takeover == "") takeover = $1 - t0
            if ($2 == "node" && $3 == new && $4 == "mounted=1" && mount == "") mount = $1 - t0
        }
        FILENAME ~ /acked.log$/ && $4 > t0 && first == "" &&
            ($3 == new || (back != "" && $4 > back)) { first = $2 - t0; firstnode = $3 }
        END {
            f = "%.2f"
            printf "fence %s\nrelease %s\ntakeover %s\nmount %s\nfirst_insert %s\nfirst_insert_node %s\n",
                fence == "" ? "-" : sprintf(f, fence), release == "" ? "-" : sprintf(f, release),
                takeover == "" ? "-" : sprintf(f, takeover), mount == "" ? "-" : sprintf(f, mount),
                first == "" ? "-" : sprintf(f, first), firstnode == "" ? "-" : firstnode
        }' "$BF_DEMO_DIR/events.log" "$BF_DEMO_DIR/samples.log" "$BF_DEMO_DIR/acked.log"
}

# demo_verify [NODE]: every acknowledged n is in table t on NODE (default:
# the node that acknowledged the last insert, once it answers). Prints
# "acked N", "lost N" and the missing rows; returns 1 if any is missing.
demo_verify() {
    local node=${1:-} present missing
    [[ -n $node ]] || node=$(tail -n1 "$BF_DEMO_DIR/acked.log" | awk '{ print $3 }')
    present=$BF_DEMO_DIR/present.txt
    demo_wait_ready "$node" 30
    demo_psql "$node" "SELECT DISTINCT n FROM t ORDER BY n" >"$present" ||
        { echo "acked $(wc -l <"$BF_DEMO_DIR/acked.log")"; echo "lost unknown (cannot query $node)"; return 1; }
    missing=$(awk '{ print $1 }' "$BF_DEMO_DIR/acked.log" | sort -n | comm -23 - <(sort -n "$present"))
    echo "acked $(wc -l <"$BF_DEMO_DIR/acked.log")"
    echo "lost $(printf '%s' "$missing" | grep -c .)"
    [[ -z $missing ]] || { echo "missing rows: $(echo $missing | head -c 400)"; return 1; }
}

# demo_double_count: samples in which two nodes could write.
demo_double_count() { grep -c " DOUBLE " "$BF_DEMO_DIR/samples.log"; }

# ---------------------------------------------------------------- teardown

# demo_cleanup [DIR]: stops everything demo_start created (from the pid and
# path files alone, so it also works on a run kept with --keep) and removes DIR.
demo_cleanup() {
    local dir=${1:-$BF_DEMO_DIR} n nd cg pid f
    [[ -n $dir && -d $dir ]] || return 0
    BF_DEMO_DIR=$dir
    touch "$dir/client.stop"
    for f in client.pid sampler.pid inspect.pid; do
        pid=$(cat "$dir/$f" 2>/dev/null) && kill "$pid" 2>/dev/null
    done
    for n in "${BF_DEMO_NODES[@]}"; do
        nd=$dir/$n
        # The watchdog first: a node being torn down is not a node to reset.
        pid=$(cat "$nd/watchdog.pid" 2>/dev/null) && kill "$pid" 2>/dev/null
        cg=$(cat "$nd/cgroup" 2>/dev/null) || continue
        if [[ -d $cg ]]; then
            [[ -S $nd/control.sock ]] && bf_node_mode "$nd" eio >/dev/null 2>&1
            echo 1 >"$cg/cgroup.kill" 2>/dev/null
            echo 0 >"$cg/cgroup.freeze" 2>/dev/null
            demo__wait_cgroup_empty "$cg" 20
            rmdir "$cg" 2>/dev/null || demo_err "cannot remove cgroup $cg"
        fi
    done
    if [[ -s $dir/view.dev ]]; then
        losetup -d "$(cat "$dir/view.dev")" 2>/dev/null
        rm -f "$dir/view.dev"
    fi
    for n in "${BF_DEMO_NODES[@]}"; do
        [[ -e $dir/$n/pid ]] && bf_node_stop "$dir/$n"
    done
    if awk -v m="$dir/pg" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        umount -l "$dir/pg"
    fi
    rm -rf "$dir"
}

# Run as a script: `bash scripts/lib-demo.sh cleanup DIR` removes a kept run.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    case ${1:-} in
    cleanup) [[ -n ${2:-} ]] && demo_cleanup "$2" ;;
    *) echo "usage: bash scripts/lib-demo.sh cleanup DIR" >&2; exit 2 ;;
    esac
fi
