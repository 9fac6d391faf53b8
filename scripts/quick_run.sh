#!/usr/bin/env bash
# The quick run: the whole DAG at CPU size on real CIFAR-10, as a DVC experiment.
#   bash scripts/quick_run.sh                      # uses ../shared/data/cifar10-jpeg.tar.gz
#   bash scripts/quick_run.sh path/to/cifar-10-python.tar.gz   (or "official" to download)
# Inception weights: the official file if it is in data/inception/, else a random-weight file
# generated here, whose FID is flagged as not comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
source_arg=${1:-../shared/data/cifar10-jpeg.tar.gz}
official=data/inception/pt_inception-2015-12-05-6726825d.pth
random=data/inception/inception-random-seed0.pth
extra=(-S "data.source=$source_arg")
if [ -f "$official" ]; then
  extra+=(-S "fid.inception_weights=$official")
elif [ ! -f "$random" ]; then
  python scripts/make_random_inception.py "$random"
fi
if [ "$source_arg" = official ] || [[ "$source_arg" == *cifar-10-python* ]]; then
  extra+=(-S "data.md5=c58f30108f718f92721af3b95e74349a")
fi
eval "set -- $(python scripts/overrides.py configs/quick.yaml)"
dvc exp run "$@" "${extra[@]}"
