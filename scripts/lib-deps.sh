# shellcheck shell=bash
# lib-deps.sh: the Debian packages blockfence needs, and installing the
# missing ones (Debian 12, apt-get, as root). Sourced by scripts/test,
# scripts/lib-demo.sh and .ci/run, so a fresh machine needs nothing typed
# by hand beyond the README's commands.

# To build: the udev crate links libudev (headers and its pkg-config file).
# shellcheck disable=SC2034 # used by the scripts that source this file
DEPS_BUILD=(libudev-dev pkg-config)
# To run the tests: ext4 tools (mkfs.ext4, debugfs, e2mmpstatus, dumpe2fs,
# resize2fs), losetup/blkid/wipefs/mount/unshare, fuser, ps, PostgreSQL and
# curl for the demo test.
# shellcheck disable=SC2034
DEPS_TEST=(e2fsprogs util-linux mount psmisc procps postgresql-15 curl)

# deps_missing PKG...: prints the packages not installed.
deps_missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

# deps_ensure PKG...: installs the missing ones with apt-get (root), or says
# what to run and fails (not root).
deps_ensure() {
    local -a need
    mapfile -t need < <(deps_missing "$@")
    ((${#need[@]})) || return 0
    if [[ $(id -u) != 0 ]]; then
        echo "missing Debian packages: ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
        return 1
    fi
    command -v apt-get >/dev/null || { echo "missing ${need[*]} and no apt-get (Debian 12 expected)" >&2; return 1; }
    echo "== installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
        { echo "apt-get install ${need[*]} failed; install them by hand" >&2; return 1; }
}
