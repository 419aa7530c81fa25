#!/usr/bin/env bash
# Installs what the tests need (QEMU's tools are the oracle) and runs every
# check: formatting, clippy, the whole test suite, and a build of the benches.
set -euo pipefail
cd "$(dirname "$0")/.."

need_qemu() {
    for t in qemu-img qemu-io; do
        command -v "$t" >/dev/null 2>&1 || return 0
    done
    # The tests are written against QEMU 10.x (qemu-img map/info output).
    qemu-img --version | head -1 | grep -Eq 'version (9|[1-9][0-9])\.' || return 0
    return 1
}

if need_qemu; then
    echo "== installing qemu-utils (10.x from bookworm-backports when available)"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    # Add bookworm-backports to the machine's existing Debian source.
    if grep -qs bookworm /etc/os-release && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        if [ -f /etc/apt/sources.list.d/debian.sources ]; then
            $SUDO sed -i '0,/^Suites: bookworm\b/s/^Suites: bookworm\b.*/& bookworm-backports/' /etc/apt/sources.list.d/debian.sources
        elif [ -f /etc/apt/sources.list ]; then
            grep -E '^deb [^ ]+ bookworm main' /etc/apt/sources.list | head -1 \
                | sed 's/ bookworm main/ bookworm-backports main/' | $SUDO tee -a /etc/apt/sources.list >/dev/null
        fi
    fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq -t bookworm-backports qemu-utils 2>/dev/null \
        || $SUDO apt-get install -y -qq qemu-utils
fi
qemu-img --version | head -1

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test (default backend: io_uring where available)"
cargo test --workspace
echo "== cargo test (pread fallback backend)"
IMGPULL_IO_BACKEND=pread cargo test --workspace
echo "== cargo bench --no-run"
cargo bench --workspace --no-run
