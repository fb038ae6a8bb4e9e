# shellcheck shell=bash
# Sourced by scripts/run and scripts/test: make sure $ROOT/.venv exists, works, and holds the
# project as described by the current pyproject.toml. Needs only python3 (3.11+) on PATH.

_tether_python_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

_tether_find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        if [[ -n $candidate ]] && command -v "$candidate" >/dev/null 2>&1 \
            && _tether_python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "error: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

ensure_venv() {
    local root=$1
    local venv="$root/.venv"
    local stamp="$venv/.tether-pyproject.sha256"
    local python want have

    # A venv whose python is gone or too old (moved repo, upgraded system) is rebuilt.
    if ! _tether_python_ok "$venv/bin/python"; then
        python=$(_tether_find_python) || return 1
        echo "==> creating $venv with $python"
        rm -rf "$venv"
        if ! "$python" -m venv "$venv"; then
            rm -rf "$venv"
            echo "error: '$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            return 1
        fi
    fi

    # Reinstall only when pyproject.toml changed since the last successful install.
    want=$("$venv/bin/python" -c 'import hashlib, sys
print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$root/pyproject.toml")
    have=$(cat "$stamp" 2>/dev/null || true)
    if [[ $want != "$have" || ! -x $venv/bin/tether ]]; then
        echo "==> installing the project and its test tools into $venv"
        rm -f "$stamp"
        (cd "$root" && PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q -e '.[test]') \
            || return 1
        echo "$want" >"$stamp"
    fi
}
