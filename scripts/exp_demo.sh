#!/usr/bin/env bash
# Four DVC experiments on the committed sample, then the comparisons the README shows:
# `dvc exp show --only-changed` at 120 columns, `dvc metrics diff` and `dvc plots diff` of two of them.
#
#   scripts/exp_demo.sh                     # the default params: four full pipeline runs
#   CATDOG_DEMO_SET="-S train.epochs=2 -S train.image_size=64 -S data.cache_size=64" \
#       scripts/exp_demo.sh                 # a quick check: these -S apply to every experiment
#
# Runs in a temporary clone of this repository's HEAD, so the workspace, its mlflow.db and DVC's
# experiment refs stay untouched. Each experiment is `dvc exp run --temp` from HEAD: it differs from
# the baseline only in its own -S params. The clone is kept; its path is printed at the end.
set -euo pipefail

repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d /tmp/catdog-exp-demo.XXXXXX)
git clone --quiet --no-checkout "$repo" "$work/catdog"
cd "$work/catdog"
git checkout --quiet "$(git -C "$repo" rev-parse HEAD)"
export PYTHONPATH="$work/catdog/src${PYTHONPATH:+:$PYTHONPATH}"  # the stages import the clone's code
# shellcheck disable=SC2206  # word splitting of the override is intended
extra=(${CATDOG_DEMO_SET:-})

experiment() {  # NAME -S key=value ...
  local name=$1
  shift
  echo "== dvc exp run --temp -n $name $* ${extra[*]}" >&2
  dvc exp run --temp --quiet -n "$name" "$@" "${extra[@]}" >&2
}

experiment lr-1e-3 -S train.lr=0.001
experiment lr-3e-4 -S train.lr=0.0003
experiment epochs-10 -S train.epochs=10
experiment lr-1e-3-tta -S train.lr=0.001 -S evaluate.tta=true   # train restored from DVC's run-cache

echo '$ dvc exp show --only-changed'
COLUMNS=120 dvc exp show --only-changed --no-pager
echo
echo '$ dvc metrics diff lr-1e-3 lr-3e-4'
dvc metrics diff lr-1e-3 lr-3e-4
echo
echo '$ dvc plots diff lr-1e-3 lr-3e-4 -o plots-diff'
dvc plots diff lr-1e-3 lr-3e-4 -o plots-diff >/dev/null
echo "wrote $work/catdog/plots-diff/index.html"
