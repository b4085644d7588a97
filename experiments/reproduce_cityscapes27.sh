#!/usr/bin/env bash
# Reproduce STEGO on Cityscapes-27: prepare (five-crops) -> k-NN table -> train -> evaluate,
# then print our results beside the paper's (docs/official_results.md).
#
#   experiments/reproduce_cityscapes27.sh [--dry-run] [--config.x=y ...]
#
# Environment (relative paths are taken from the directory you run the script in):
#   DATA_RAW  Cityscapes (leftImg8bit/ + gtFine/)       (default: <repo>/data/raw/cityscapes)
#   DATA_DIR  prepared five-crops + nns/ k-NN tables    (default: <repo>/data/cityscapes27_five)
#   WORKDIR   checkpoints, logs, results.md, overlays   (default: <repo>/runs/cityscapes27_vitb8)
#   CONFIG    experiment config                         (default: configs/cityscapes27_vitb8.py, the
#             released cityscapes_vit_base_1.ckpt setting: ViT-B/8, dim 100, batch 32, 7000 steps)
#   PYTHON    interpreter with stego_jax installed      (default: <repo>/.venv/bin/python, else python3)
#   FORCE_KNN=1 recompute the k-NN tables even if they exist
# Arguments of the form --config.x=y are passed to knn, train and evaluate (e.g. --config.batch_size=32).
# Training resumes from the last checkpoint in WORKDIR when run again.
set -euo pipefail

# shellcheck source=experiments/reproduce_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/reproduce_lib.sh"
reproduce_paths cityscapes cityscapes27_five configs/cityscapes27_vitb8.py
DATASET=cityscapes27

RAW_TITLE="Cityscapes"
RAW_DIRS=(leftImg8bit/train gtFine/train leftImg8bit/val gtFine/val)
RAW_FILES=()

# What to download and how to unpack it, printed below the missing paths.
raw_help() {
  local parent; parent="$(dirname "$DATA_RAW")"
  cat <<EOF
Either register at https://www.cityscapes-dataset.com/downloads/, download leftImg8bit_trainvaltest.zip
(11 GB) and gtFine_trainvaltest.zip (241 MB) and unzip both into DATA_RAW:
  mkdir -p $DATA_RAW && cd $DATA_RAW
  unzip -n /path/to/leftImg8bit_trainvaltest.zip && unzip -n /path/to/gtFine_trainvaltest.zip
or download the official STEGO bundle (same layout; if wget fails, azcopy works for this blob storage):
  mkdir -p $parent
  wget -c -P $parent $ZIP_URL
  unzip $parent/cityscapes.zip -d $parent    # -> $parent/cityscapes/{leftImg8bit,gtFine}/
then run again with DATA_RAW set to the directory that holds leftImg8bit/ and gtFine/.
EOF
}

PREPARE_NOTE="five-crops of the training images (ratio 0.5), uncropped validation images"
PREPARE_ARGS=(--crop five --ratio 0.5)

paper_table() {
cat <<'EOF'
== the paper's numbers (STEGO, Cityscapes-27; compare the "cluster+crf" row above)
| setting                                                        | Unsup. Acc | Unsup. mIoU | Linear Acc | Linear mIoU |
|----------------------------------------------------------------|-----------:|------------:|-----------:|------------:|
| ViT-B/8, paper / released ckpt (configs/cityscapes27_vitb8.py) |       73.2 |        21.0 |          – |           – |
Source: the paper's Papers with Code page (docs/official_results.md); no public source found for the linear-probe numbers.
Cityscapes-27 is labelIds 7..33 (27 classes), not the usual 19-class trainId protocol.
EOF
}

reproduce_main "$@"
