# Shared by experiments/reproduce_*.sh. A script sources this file, calls `reproduce_paths`, defines
# DATASET, RAW_TITLE, RAW_DIRS, RAW_FILES, raw_help, PREPARE_NOTE, PREPARE_ARGS and paper_table, then calls
# `reproduce_main "$@"`: argument parsing, prepare -> k-NN -> train -> evaluate, and the results
# beside the paper's numbers.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# An absolute path; relative ones are taken from the directory the script runs in.
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

# Sets DATA_RAW, DATA_DIR, WORKDIR, CONFIG and PYTHON from the environment or their defaults, and
# ZIP_URL. $1: the name of the official STEGO bundle (data/raw/<name>, <name>.zip); $2: the
# prepared directory under data/; $3: the default config (its name is the run directory's).
reproduce_paths() {
  DATA_RAW="$(abspath "${DATA_RAW:-$REPO/data/raw/$1}")"
  DATA_DIR="$(abspath "${DATA_DIR:-$REPO/data/$2}")"
  WORKDIR="$(abspath "${WORKDIR:-$REPO/runs/$(basename "$3" .py)}")"
  CONFIG="${CONFIG:-$3}"
  if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
  fi
  ZIP_URL="https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data/$1.zip"
}

# The directories (RAW_DIRS) and files (RAW_FILES) of the raw layout missing under DATA_RAW, one a line.
missing_raw() {
  local f missing=()
  for f in "${RAW_DIRS[@]+"${RAW_DIRS[@]}"}"; do
    [[ -d "$DATA_RAW/$f" ]] || missing+=("$DATA_RAW/$f/")
  done
  for f in "${RAW_FILES[@]+"${RAW_FILES[@]}"}"; do
    [[ -f "$DATA_RAW/$f" ]] || missing+=("$DATA_RAW/$f")
  done
  printf '%s\n' "${missing[@]+"${missing[@]}"}"
}

# Prints a command; runs it unless --dry-run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if (( DRY_RUN )); then return 0; fi
  "$@"
}

reproduce_main() {
  DRY_RUN=0
  OVERRIDES=()
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      --config.*=*) OVERRIDES+=("$arg") ;;
      -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) echo "error: unknown argument '$arg' (expected --dry-run, --help or --config.x=y)" >&2; exit 2 ;;
    esac
  done

  cd "$REPO"  # configs/ paths are relative to the repository root

  [[ -f "$CONFIG" ]] || { echo "error: config file $CONFIG not found in $REPO" >&2; exit 2; }

  # 1. Data: the prepared directory, or the raw bundle to prepare it from.
  if [[ -f "$DATA_DIR/manifest.json" ]]; then
    echo "== prepared data found in $DATA_DIR (delete it to prepare again)"
  else
    missing="$(missing_raw)"
    if [[ -n "$missing" ]]; then
      msg="$RAW_TITLE raw data not found. Missing:
$(sed 's/^/  /' <<<"$missing")
$(raw_help)"
      if (( DRY_RUN )); then
        echo "note (dry run): $msg" | sed '2,$s/^/  /'
      else
        echo "error: $msg" >&2
        exit 1
      fi
    fi
    echo "== 1/4 prepare: $PREPARE_NOTE"
    run "$PYTHON" -m stego_jax.data.prepare "$DATASET" --source "$DATA_RAW" --out "$DATA_DIR" "${PREPARE_ARGS[@]}"
  fi

  if (( ! DRY_RUN )); then
    "$PYTHON" -c "import stego_jax" 2>/dev/null || {
      echo "error: $PYTHON cannot import stego_jax; run 'make venv' (or pip install -e .) in $REPO, or set PYTHON" >&2
      exit 1; }
    "$PYTHON" -c "import jax; d = jax.devices(); print('== devices:', d)
if d[0].platform == 'cpu': print('warning: no GPU/TPU found; training ViT-S/8 on a CPU takes days')"
  fi

  # 2. k-NN table of the training crops (frozen DINO, GAP, cosine top-30). Skipped if already there.
  # (The check reads the config file without the overrides, so --config.data.*/model.*/knn.* always recompute.)
  knn_done=0
  knn_overrides=0
  for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    case "$o" in --config.data.*|--config.model.*|--config.knn.*) knn_overrides=1 ;; esac
  done
  if (( ! DRY_RUN && ! knn_overrides )) && [[ "${FORCE_KNN:-0}" != 1 ]]; then
    knn_done="$("$PYTHON" - "$CONFIG" "$DATA_DIR" <<'EOF'
import os, sys
from stego_jax.config import load_config_file
from stego_jax.knn import knn_filename
c = load_config_file(sys.argv[1])
name = knn_filename(c.model.backbone, c.model.patch_size, c.data.name, "train", c.data.crop_type, c.data.res)
print(int(os.path.exists(os.path.join(c.knn.dir or os.path.join(sys.argv[2], "nns"), name))))
EOF
)"
  fi
  if [[ "$knn_done" == 1 ]]; then
    echo "== 2/4 k-NN table found in $DATA_DIR/nns (FORCE_KNN=1 recomputes it)"
  else
    echo "== 2/4 k-NN table"
    run "$PYTHON" -m stego_jax.knn --config "$CONFIG" "--config.data.root=$DATA_DIR" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
  fi

  echo "== 3/4 train (resumes from $WORKDIR/checkpoints)"
  run "$PYTHON" -m stego_jax.train --config "$CONFIG" --workdir "$WORKDIR" "--config.data.root=$DATA_DIR" \
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}"

  echo "== 4/4 evaluate (official protocol: 320 px, flip, cluster/linear probes, dense CRF)"
  run "$PYTHON" -m stego_jax.evaluate --config "$CONFIG" --workdir "$WORKDIR" "--config.data.root=$DATA_DIR" \
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}"

  echo
  echo "== ours ($CONFIG): $WORKDIR/results.md"
  if (( DRY_RUN )); then
    echo "(dry run: nothing measured)"
  else
    sed -n '1,/^Per-class/p' "$WORKDIR/results.md" | sed '$d'
  fi
  paper_table
}
