# shellcheck shell=bash
# lib-nodes.sh: simulated nodes sharing one block volume, for benchmarks and
# demos. The shell counterpart of tests/common/mod.rs; same binary, same order.
#
#   image file --> blockfence-fusepath (per node) DIR/mnt/disk
#              --> loop device (per node, losetup --direct-io=on) --> node's I/O
#
# Usage (as root, after `cargo build`):
#   . scripts/lib-nodes.sh
#   bf_image_create /tmp/demo/shared.img 64M
#   bf_node_start /tmp/demo/shared.img /tmp/demo/node-a      # prints /dev/loopN
#   bf_node_start /tmp/demo/shared.img /tmp/demo/node-b
#   dev_a=$(bf_node_device /tmp/demo/node-a)
#   bf_node_mode /tmp/demo/node-a slow 200      # or: ok | stall | eio
#   bf_node_status /tmp/demo/node-a
#   bf_node_crash /tmp/demo/node-a "$daemon_pid"  # eio first, then SIGKILL
#   bf_node_stop /tmp/demo/node-a               # eio, losetup -d, SIGTERM, umount -l
#
# Call bf_node_start directly, not inside $(...): the FUSE process it starts
# in the background must belong to your shell.
#
# A node directory holds: mnt/ (the FUSE mount, mnt/disk), control.sock,
# fusepath.log, pid, device. Nothing is global: stopping a node touches only
# what its directory names.
#
# Environment:
#   BF_FUSEPATH       the binary (default: $CARGO_TARGET_DIR or ./target,
#                     release build if present, else debug)
#   BF_READY_TIMEOUT  seconds to wait for READY (default 20)
#   BF_STOP_TIMEOUT   seconds to wait for the FUSE process to exit (default 20)

BF_READY_TIMEOUT=${BF_READY_TIMEOUT:-20}
BF_STOP_TIMEOUT=${BF_STOP_TIMEOUT:-20}

bf__err() { echo "lib-nodes: $*" >&2; }

# The blockfence-fusepath binary.
bf_fusepath() {
    if [[ -n ${BF_FUSEPATH:-} ]]; then
        echo "$BF_FUSEPATH"
        return
    fi
    local here target
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    target=${CARGO_TARGET_DIR:-$here/target}
    for b in "$target/release/blockfence-fusepath" "$target/debug/blockfence-fusepath"; do
        if [[ -x $b ]]; then
            echo "$b"
            return
        fi
    done
    bf__err "blockfence-fusepath not built: run 'cargo build' or set BF_FUSEPATH"
    return 1
}

# bf_image_create IMG SIZE: a sparse image (SIZE as for truncate: 64M, 1G).
bf_image_create() {
    local img=$1 size=$2
    mkdir -p "$(dirname "$img")" && truncate -s "$size" "$img"
}

# bf_node_start IMG DIR: FUSE path + direct-io loop device for one node.
# Waits for the READY line (an event, not a sleep); prints the loop device.
bf_node_start() {
    local img=$1 dir=$2 bin fd line pid dev
    bin=$(bf_fusepath) || return 1
    if [[ -e $dir/pid ]]; then
        bf__err "$dir already holds a node (pid $(cat "$dir/pid")); bf_node_stop it first"
        return 1
    fi
    mkdir -p "$dir/mnt" || return 1
    rm -f "$dir/stdout.fifo" && mkfifo "$dir/stdout.fifo" || return 1
    "$bin" --backing "$img" --mountpoint "$dir/mnt" --control "$dir/control.sock" \
        </dev/null >"$dir/stdout.fifo" 2>>"$dir/fusepath.log" &
    pid=$!
    echo "$pid" >"$dir/pid"
    exec {fd}<"$dir/stdout.fifo"
    if ! read -r -t "$BF_READY_TIMEOUT" -u "$fd" line || [[ $line != READY* ]]; then
        exec {fd}<&-
        rm -f "$dir/stdout.fifo"
        bf__err "blockfence-fusepath for $dir did not get READY; log:"
        cat "$dir/fusepath.log" >&2
        bf_node_stop "$dir"
        return 1
    fi
    # Only the READY line is ever written to stdout.
    exec {fd}<&-
    rm -f "$dir/stdout.fifo"
    echo "$line" >>"$dir/fusepath.log"
    if ! dev=$(losetup --direct-io=on -f --show "$dir/mnt/disk"); then
        bf__err "losetup on $dir/mnt/disk failed"
        bf_node_stop "$dir"
        return 1
    fi
    echo "$dev" >"$dir/device"
    echo "$dev"
}

# bf_node_device DIR: the node's loop device.
bf_node_device() { cat "$1/device"; }

# bf_node_send DIR COMMAND...: one control command; prints the answer.
bf_node_send() {
    local dir=$1 bin
    shift
    bin=$(bf_fusepath) || return 1
    "$bin" --control "$dir/control.sock" --send "$*"
}

# bf_node_mode DIR ok|stall|eio|slow MS
bf_node_mode() { bf_node_send "$@"; }

# bf_node_status DIR: "ok mode=M held=H active=A done=D failed=F"
bf_node_status() { bf_node_send "$1" status; }

# bf_node_crash DIR PID: cut the node's path (eio), then SIGKILL PID.
# A process blocked on a stalled path cannot die before its I/O is released:
# that is why the cut comes first.
bf_node_crash() {
    local dir=$1 pid=$2
    bf_node_mode "$dir" eio >/dev/null || bf__err "cannot cut $dir (already stopped?)"
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

# bf__wait_gone PID SECONDS: wait for a (possibly non-child) process to end.
bf__wait_gone() {
    local pid=$1 left=$(($2 * 20))
    while kill -0 "$pid" 2>/dev/null; do
        ((left-- > 0)) || return 1
        sleep 0.05
    done
}

# bf__is_mounted DIR: whether DIR is a mount point (per mountinfo).
bf__is_mounted() {
    local mnt
    mnt=$(realpath -m "$1")
    awk -v m="$mnt" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# bf_node_stop DIR: eio (nothing stays blocked), detach the loop device,
# SIGTERM the FUSE process (SIGKILL after BF_STOP_TIMEOUT), unmount leftovers.
bf_node_stop() {
    local dir=$1 pid="" dev=""
    [[ -e $dir/pid ]] && pid=$(cat "$dir/pid")
    [[ -e $dir/device ]] && dev=$(cat "$dir/device")
    if [[ -S $dir/control.sock ]]; then
        bf_node_mode "$dir" eio >/dev/null 2>&1 || true
    fi
    if [[ -n $dev ]]; then
        # Only if it is still ours (device names are reused).
        if losetup -n -O BACK-FILE "$dev" 2>/dev/null | grep -qF "$dir/mnt/disk"; then
            losetup -d "$dev" || bf__err "losetup -d $dev failed"
        fi
        rm -f "$dir/device"
    fi
    if [[ -n $pid ]]; then
        if kill -TERM "$pid" 2>/dev/null && ! bf__wait_gone "$pid" "$BF_STOP_TIMEOUT"; then
            bf__err "FUSE process $pid ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null
            bf__wait_gone "$pid" "$BF_STOP_TIMEOUT"
        fi
        wait "$pid" 2>/dev/null
        rm -f "$dir/pid"
    fi
    # Not mountpoint(1): it stats the directory, which fails on a dead FUSE
    # mount ("Transport endpoint is not connected").
    if bf__is_mounted "$dir/mnt"; then
        umount -l "$dir/mnt" || bf__err "umount -l $dir/mnt failed"
    fi
    return 0
}
