#!/usr/bin/env bash
# Create the benchmark-only environments for the peer libraries (idempotent).
# Each peer lives in its own venv under benchmarks/.envs/, never in the project's .venv.
# Every torch-based peer is installed in the same pip command as torch==2.13.0 so
# that pip can never swap in a CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
envs="$here/../.envs"
python="${PYTHON:-python3}"
mkdir -p "$envs"

make_env() {  # name, then pip arguments; skipped when the stamp for those arguments exists
    local name="$1"; shift
    # ONLY="traker kronfluence" limits the run to the named environments.
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    local stamp="$envs/$name/.installed-$(echo "$*" | cksum | cut -d' ' -f1)"
    [ -e "$stamp" ] && return 0
    rm -rf "${envs:?}/$name"
    "$python" -m venv "$envs/$name"
    "$envs/$name/bin/python" -m pip install --quiet --upgrade pip
    "$envs/$name/bin/python" -m pip install --quiet "$@"
    touch "$stamp"
}

# captum and dattri share one environment (both accept numpy 2).
make_env torch-peers "torch==2.13.0" "captum==0.9.0" "dattri==0.3.0"
# kronfluence (EK-FAC/K-FAC) pulls torchvision: torch pinned in the same command.
make_env kronfluence "torch==2.13.0" "kronfluence==1.0.1"
# traker (TRAK) without its CUDA-only [fast] extra: BasicProjector on CPU.
make_env traker "torch==2.13.0" "traker==0.3.2"
# pyDVL pins numpy < 2: its own environment.
make_env pydvl "torch==2.13.0" "pydvl[influence]==0.10.0" "numpy<2"
# Influenciae 0.3.0 declares TensorFlow < 2.10; it runs on TF 2.21 with Keras 2 (tf_keras)
# and TF_USE_LEGACY_KERAS=1, so it and tf_keras go in without their declared dependencies.
make_env influenciae "tensorflow-cpu==2.21.*"
if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" influenciae "* ]]; then exit 0; fi
stamp="$envs/influenciae/.installed-influenciae-0.3.0"
if [ ! -e "$stamp" ]; then
    "$envs/influenciae/bin/python" -m pip install --quiet --no-deps "tf_keras==2.21.*" "influenciae==0.3.0"
    "$envs/influenciae/bin/python" -m pip install --quiet matplotlib  # imported by influenciae.plots
    touch "$stamp"
fi
