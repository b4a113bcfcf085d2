#!/usr/bin/env bash
# The one setup command: a Rust toolchain (rustup if cargo is missing), uv (from PyPI if missing), then the
# locked Python environment in .venv with rustbpe compiled by maturin from ./rustbpe.
# Needs only Python 3.10+, a C compiler and network access to PyPI and crates.io. Safe to re-run: uv
# rebuilds rustbpe only when its sources change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    # rustup downloads from sh.rustup.rs and static.rust-lang.org, not from PyPI or crates.io: where only the
    # package registries are reachable, install Rust first (e.g. Debian's cargo) and this step is skipped.
    echo "setup: no Rust toolchain found; installing one with rustup from sh.rustup.rs (README.md: setup)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . "$HOME/.cargo/env"
fi

if command -v uv >/dev/null 2>&1; then
    UV=(uv)
else
    PYTHON=$(command -v python3 || command -v python) || { echo "setup: Python 3.10+ is required" >&2; exit 1; }
    if ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
        echo "setup: installing uv from PyPI"
        "$PYTHON" -m pip install --user --quiet uv 2>/dev/null \
            || "$PYTHON" -m pip install --user --quiet --break-system-packages uv
    fi
    UV=("$PYTHON" -m uv)
fi

"${UV[@]}" sync --locked
echo "setup: ready. Python environment: .venv (activate with: source .venv/bin/activate)"
