#!/usr/bin/env bash
# demo.sh: active/passive PostgreSQL on one shared volume under blockfence,
# and a hard kill of the active node, on one machine.
#
# What it does: builds blockfence (release), creates one sparse image and two
# simulated nodes (each its own FUSE storage path + loop device, mount
# namespace, cgroup, daemon and watchdog emulator; see scripts/lib-demo.sh),
# formats the volume, runs initdb once through `blockfence run`, then starts
# PostgreSQL on both nodes under a restart loop (only the lease holder's
# starts; the other waits in `blockfence run`). A client inserts numbered
# rows, one committed INSERT each, into whichever node answers. Then it kills
# the active node hard (its storage path cut to EIO, then every process of its
# cgroup SIGKILLed), waits for the other node to take over and checks that
# every acknowledged row is there.
#
# Needs: root; Debian 12 (installs postgresql-15, e2fsprogs, util-linux, curl
# with apt-get only if missing); cargo; FUSE, loop devices, cgroup v2.
#
# Usage: scripts/demo.sh [--quick] [--keep]
#   --quick  fewer inserts before and after the fault (for tests/demo.rs)
#   --keep   leave everything (nodes, mounts, logs) running for inspection;
#            remove it later with: bash scripts/lib-demo.sh cleanup DIR
#
# Output: a timeline in seconds from the fault (all times on the machine's
# monotonic clock, which the simulated nodes share):
#   fence         the killed node can no longer write (volume unmounted or
#                 read-only, its path cut, or the filesystem shut down)
#   takeover      the lease area names the other node
#   mount         the other node has mounted the volume
#   first insert  the client's first acknowledged insert after the fault
# then the rows acknowledged and lost, and the number of 50 ms samples in
# which two nodes could write (see lib-demo.sh). The last lines are
# machine-readable: RESULT acked=N, acked_after_fault=N, lost=N,
# double_writer_samples=N. Exit status: 0 when no acknowledged row was lost
# and no two nodes could ever write at once; 1 otherwise.

set -u
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib-demo.sh
. "$here/lib-demo.sh"

quick=0 keep=0
for a in "$@"; do
    case $a in
    --quick) quick=1 ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) demo_die "unknown option $a (see --help)" ;;
    esac
done
((quick)) && { before=3; after=2; } || { before=10; after=5; }

demo_require_root
demo_install_deps
demo_build
demo_check_ports

BF_DEMO_DIR=$(mktemp -d /tmp/blockfence-demo.XXXXXX)
on_exit() {
    local rc=$?
    if ((keep)); then
        echo "kept: $BF_DEMO_DIR (remove with: bash $here/lib-demo.sh cleanup $BF_DEMO_DIR)"
    else
        demo_cleanup "$BF_DEMO_DIR"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'echo "interrupted"; exit 130' INT TERM

echo "work directory: $BF_DEMO_DIR"
echo "starting two nodes, formatting, initdb through blockfence run..."
demo_start "$BF_DEMO_DIR" || demo_die "setup failed (logs in $BF_DEMO_DIR; rerun with --keep to inspect)"
demo_wait_insert_after 0 60 || demo_die "no insert was acknowledged within 60 s"
old=$(demo_active_node) || demo_die "no node has the volume mounted"
echo "PostgreSQL runs on $old; inserting for ${before} s..."
sleep "$before"

echo "hard kill of $old: storage path cut to EIO, then every process of its cgroup killed"
demo_inject node-crash "$old" || demo_die "fault injection failed"
t0=$(demo_fault_time)
demo_wait_insert_after "$t0" 60 "$old" || echo "no insert was acknowledged within 60 s of the fault"
sleep "$after"
demo_client_stop
new=$(demo_other "$old")

declare -A tl
while read -r k v; do tl[$k]=$v; done < <(demo_timeline "$old")
echo
echo "timeline, seconds from the fault:"
printf '  %-14s %6s  %s\n' fault 0.00 "$old killed (path cut, all processes SIGKILLed)" \
    fence "${tl[fence]}" "$old can no longer write" \
    takeover "${tl[takeover]}" "the lease names $new" \
    mount "${tl[mount]}" "$new has mounted the volume" \
    "first insert" "${tl[first_insert]}" "acknowledged by ${tl[first_insert_node]}"
echo

verify=$(demo_verify)
verify_rc=$?
acked=$(awk '$1 == "acked" { print $2 }' <<<"$verify")
lost=$(awk '$1 == "lost" { print $2 }' <<<"$verify")
after_fault=$(awk -v t="$t0" '$4 > t' "$BF_DEMO_DIR/acked.log" | wc -l)
double=$(demo_double_count)
samples=$(cat "$BF_DEMO_DIR/samples.count" 2>/dev/null || echo 0)
echo "rows: $acked acknowledged ($after_fault after the fault), $lost lost"
grep '^missing' <<<"$verify"
echo "moments when two nodes could write: $double (of $samples samples, every ~50 ms)"
((double)) && grep " DOUBLE " "$BF_DEMO_DIR/samples.log" | head -n 5
echo "RESULT acked=$acked"
echo "RESULT acked_after_fault=$after_fault"
echo "RESULT lost=$lost"
echo "RESULT double_writer_samples=$double"
if ((verify_rc != 0 || double != 0 || after_fault == 0)); then
    echo "FAILED (logs: rerun with --keep)"
    exit 1
fi
echo "OK: no acknowledged row lost, never two writers"
