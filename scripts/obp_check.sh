#!/usr/bin/env bash
# Compare bandit.ope's IPS, SNIPS and DR with the Open Bandit Pipeline (obp 0.5.7) on the same
# inputs. obp lives in its own venv (never the product's): it needs Python 3.11, pandas < 3 and
# `--no-deps --ignore-requires-python`. Usage: scripts/obp_check.sh [extra args for obp_check.py]
# (bench/ope_bench.py and bench/ope_memory.py use the same venv, which also gets pyarrow.)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${OBP_VENV:-$HOME/.cache/sms-router/obp-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import obp, pyarrow" 2>/dev/null; then
  python3.11 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.13.0 tqdm matplotlib seaborn pyyaml scikit-learn \
    "pandas<3" scipy pyarrow
  "$venv/bin/pip" install --quiet --no-deps --ignore-requires-python obp==0.5.7
fi
PYTHONPATH="$here" exec "$venv/bin/python" "$here/scripts/obp_check.py" "$@"
