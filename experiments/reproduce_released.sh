#!/usr/bin/env bash
# Evaluate a released STEGO checkpoint with stego_jax: download it, import it (torch-free) and
# evaluate it with the official protocol, then print the published numbers beside ours.
#
#   experiments/reproduce_released.sh DATASET [--dry-run]
#
# DATASET: cocostuff27 (cocostuff27_vit_base_5.ckpt), cityscapes27 (cityscapes_vit_base_1.ckpt) or
# potsdam3 (potsdam_test.ckpt).
# Environment (relative paths are taken from the directory you run the script in):
#   DATA_DIR  prepared data, as experiments/reproduce_<DATASET>.sh prepares it (default:
#             <repo>/data/cocostuff27_five, data/cityscapes27_five or data/potsdam3)
#   WORKDIR   the imported run and its results (default: <repo>/runs/released_<checkpoint>)
#   PYTHON    interpreter with stego_jax installed (default: <repo>/.venv/bin/python, else python3)
#   STEGO_JAX_CACHE  where the checkpoint is downloaded (default: ~/.cache/stego_jax/weights)
set -euo pipefail

# shellcheck source=experiments/reproduce_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/reproduce_lib.sh"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
DATASET="${1:-}"
case "$DATASET" in
  -h|--help) usage; exit 0 ;;
  cocostuff27) CKPT=cocostuff27_vit_base_5; PREPARED=cocostuff27_five; PREP="--crop five --ratio 0.5" ;;
  cityscapes27) CKPT=cityscapes_vit_base_1; PREPARED=cityscapes27_five; PREP="--crop five --ratio 0.5" ;;
  potsdam3) CKPT=potsdam_test; PREPARED=potsdam3; PREP="--crop none" ;;
  *) echo "error: DATASET must be cocostuff27, cityscapes27 or potsdam3, got '$DATASET' (--help)" >&2; exit 2 ;;
esac
shift
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done

DATA_DIR="$(abspath "${DATA_DIR:-$REPO/data/$PREPARED}")"
WORKDIR="$(abspath "${WORKDIR:-$REPO/runs/released_$CKPT}")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

if [[ ! -f "$DATA_DIR/manifest.json" ]]; then
  msg="no prepared $DATASET data in $DATA_DIR. Prepare it first, e.g. with the prepare step of
  experiments/reproduce_$DATASET.sh, or: $PYTHON -m stego_jax.data.prepare $DATASET --source RAW --out $DATA_DIR $PREP"
  if (( DRY_RUN )); then echo "note (dry run): $msg"; else echo "error: $msg" >&2; exit 1; fi
fi

if [[ -f "$WORKDIR/config.json" ]]; then
  echo "== 1/2 $CKPT already imported in $WORKDIR (delete it to import again); its data.root -> $DATA_DIR"
  run "$PYTHON" -c 'import json, sys; p = sys.argv[1] + "/config.json"; c = json.load(open(p)); c["data"]["root"] = sys.argv[2]; json.dump(c, open(p, "w"), indent=2)' "$WORKDIR" "$DATA_DIR"
else
  echo "== 1/2 download and import $CKPT.ckpt (no torch needed)"
  run "$PYTHON" -m stego_jax.official "$CKPT" --workdir "$WORKDIR" "--data_root=$DATA_DIR"
fi

echo "== 2/2 evaluate (official protocol: 320 px, flip, cluster/linear probes, dense CRF)"
run "$PYTHON" -m stego_jax.evaluate --workdir "$WORKDIR"

echo
echo "== ours (released $CKPT.ckpt, evaluated by stego_jax): $WORKDIR/results.md"
if (( DRY_RUN )); then
  echo "(dry run: nothing measured)"
else
  sed -n '1,/^Per-class/p' "$WORKDIR/results.md" | sed '$d'
fi
echo "== published numbers (docs/official_results.md; compare the \"cluster+crf\" and \"linear+crf\" rows)"
echo "| setting | Unsup. Acc | Unsup. mIoU | Linear Acc | Linear mIoU | source |"
echo "|---|---:|---:|---:|---:|---|"
case "$DATASET" in
  cocostuff27) echo "| cocostuff27_vit_base_5.ckpt, official eval script | 56.93 | 28.19 | 76.13 | 41.07 | STEGO issue #3 |" ;;
  cityscapes27) echo "| Cityscapes-27, ViT-B/8, paper | 73.2 | 21.0 | – | – | the paper's Papers with Code page |" ;;
  potsdam3) echo "| potsdam_test.ckpt, official eval script | 77.03 | 62.57 | 85.85 | 74.83 | STEGO issue #39 |" ;;
esac
