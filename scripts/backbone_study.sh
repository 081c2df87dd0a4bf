#!/bin/bash
# Default-backbone study (docs/speed.md): for each candidate, one `dvc repro` of the default pipeline
# in a throwaway clone, then its accuracy / log loss on 2,500 held-out Kaggle images (none of them
# in the committed sample).   ZIP=path/to/train.zip bash scripts/backbone_study.sh
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
zip=$(realpath "${ZIP:-$repo/../shared/data/dogs-vs-cats/train.zip}")
export PATH=$repo/.venv/bin:$PATH TQDM_DISABLE=1
for cfg in lite0-gradient:efficientnet_lite0:224:gradient:30 lite0-logistic:efficientnet_lite0:224:logistic:1 \
           lite1-logistic:efficientnet_lite1:240:logistic:1 lite2-logistic:efficientnet_lite2:260:logistic:1 \
           lite2-gradient:efficientnet_lite2:260:gradient:30; do
  IFS=: read -r name arch size head epochs <<< "$cfg"
  dir=$(mktemp -d)/$name
  git clone -q "$repo" "$dir"
  cd "$dir"
  python - "$arch" "$size" "$head" "$epochs" <<'PY'
import sys, yaml
arch, size, head, epochs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
raw = yaml.safe_load(open("params.yaml"))
raw["data"]["cache_size"] = size
raw["train"].update(arch=arch, image_size=size, head=head, epochs=epochs, mode="features")
open("params.yaml", "w").write(yaml.safe_dump(raw, sort_keys=False))
PY
  start=$(date +%s.%N)
  dvc repro > repro.log 2>&1
  seconds=$(python -c "print(round($(date +%s.%N) - $start, 1))")
  held=$(python scripts/heldout_accuracy.py "$zip" --per-class 1250)
  echo "$name repro_s=$seconds test=$(tr -d '\n ' < reports/evaluate/metrics.json) heldout=$held"
done
