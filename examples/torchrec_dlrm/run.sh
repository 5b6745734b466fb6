#!/usr/bin/env bash
# TorchRec's reference DLRM trainer (facebookresearch/dlrm, torchrec_dlrm/dlrm_main.py) with CAFE
# swapped in, as its README launches it: torchx dist.ddp, 2 processes, here on CPU with gloo.
#
# Usage: examples/torchrec_dlrm/run.sh /path/to/dlrm-checkout [extra dlrm_main.py args...]
#
# Fetches nothing. Copies the checkout's torchrec_dlrm/ to a temporary directory, applies
# cafe.patch there (the checkout is left untouched) and runs two jobs on random data:
#   (a) one-hot: the dot-product DLRM with the README's Adagrad flags;
#   (b) DCN + multi-hot: DLRM_DCN with the MLPerf DLRM v2 multi-hot sizes (uniform), whose
#       int32 ids the CAFE collection must accept.
# Tables follow the Criteo 1TB sizes capped at 200k rows (Multihot builds a lookup table per
# row) at --cafe_compression_ratio 100. Each job prints "AUROC over val/test set" on rank 0;
# the labels are random, so AUROC near 0.5 is the expected value. A failed job stops the script
# with torchx's non-zero exit code. Extra arguments go to both jobs (later flags win).
# Needs the repo's venv (torchx, torchrun, cafe_torchrec) or an equivalent environment.
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1/torchrec_dlrm/dlrm_main.py" ]]; then
    echo "usage: $0 /path/to/dlrm-checkout [extra dlrm_main.py args...]" >&2
    echo "(the checkout must hold torchrec_dlrm/dlrm_main.py)" >&2
    exit 2
fi
DLRM=$(cd "$1" && pwd)
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
if [[ -f "$REPO/.venv/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$REPO/.venv/bin/activate"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$DLRM/torchrec_dlrm" "$WORK/"
patch -s -d "$WORK" -p1 < "$HERE/cafe.patch"
cd "$WORK/torchrec_dlrm"

SIZES=200000,39060,17295,7424,20265,3,7122,1543,63,200000,200000,200000,10,2209,11938,155,4,976,14,200000,200000,200000,200000,12973,108,36
MULTI_HOT=3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1
COMMON=(--num_embeddings_per_feature "$SIZES" --embedding_dim 64 --batch_size 256 --epochs 1
        --limit_train_batches 40 --cafe_compression_ratio 100 --print_sharding_plan)

echo "== (a) one-hot DLRM"
torchx run -s local_cwd dist.ddp -j 1x2 --script dlrm_main.py -- \
    "${COMMON[@]}" --adagrad --learning_rate 0.006 "$@"

echo "== (b) DCN + multi-hot DLRM"
torchx run -s local_cwd dist.ddp -j 1x2 --script dlrm_main.py -- \
    "${COMMON[@]}" --interaction_type=dcn --dcn_num_layers=3 --dcn_low_rank_dim=64 \
    --multi_hot_sizes "$MULTI_HOT" --multi_hot_distribution_type uniform \
    --adagrad --learning_rate 0.005 "$@"
