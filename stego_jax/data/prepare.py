"""CLI: validate a raw dataset layout and write prepared (five-cropped) splits as ArrayRecord + manifest.

  python -m stego_jax.data.prepare cocostuff27 --source RAW --out DIR [--crop five --ratio 0.5]
  python -m stego_jax.data.prepare --config configs/<name>.py --source RAW --out DIR
"""

from __future__ import annotations

import logging
import sys
import time

from absl import flags

from stego_jax import cli
from stego_jax.data import prepared, sources


def prepare(dataset: str, source_dir: str, out_dir: str, *, splits: list[str], crop: str | None = "five",
            ratio: float = 0.5, jpeg_quality: int = 75, skip_corrupt: bool = False, num_workers: int = 4,
            check_files: bool = True) -> dict:
    """Validate every split first (so nothing is written for an incomplete download), then write each.

    Returns the per-split manifest entries.
    """
    if dataset not in sources.RAW_SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {sorted(sources.RAW_SOURCES)}")
    srcs = {split: sources.RAW_SOURCES[dataset](source_dir, split) for split in splits}
    if check_files:
        for src in srcs.values():
            files = [src.describe(i) for i in range(len(src))]
            files += [p for p in getattr(src, "label_paths", []) if p]
            hint = {"cocostuff27": sources.COCO_HINT, "cityscapes27": sources.CITYSCAPES_HINT,
                    "potsdam3": sources.POTSDAM_HINT, "potsdam": sources.POTSDAM_HINT}.get(dataset,
                                                                                           sources.FOLDER_HINT)
            if not skip_corrupt:
                sources.require_files(files, dataset, source_dir,
                                 hint + " (or pass --skip-corrupt to leave out the missing files)")
    entries = {}
    for split, src in srcs.items():
        t0 = time.time()
        entries[split] = prepared.write_split(src, out_dir, split, crop=crop, ratio=ratio, jpeg_quality=jpeg_quality,
                                              skip_corrupt=skip_corrupt, num_workers=num_workers, dataset=dataset)
        logging.info("%s/%s: %d records from %d images in %.1f s (%d skipped)", dataset, split,
                     entries[split]["count"], len(src), time.time() - t0, len(entries[split]["skipped"]))
    return entries


def _define(fv: flags.FlagValues, argv) -> None:
    cli.define_config(fv, argv, required=False,
                      help_string="experiment config (optional): its data.name, data.crop_type and "
                                  "data.crop_ratio replace DATASET, --crop and --ratio")
    flags.DEFINE_string("source", None, "raw dataset directory (e.g. the unzipped cocostuff/)", flag_values=fv,
                        required=True)
    flags.DEFINE_string("out", None, "output directory (manifest.json + <split>.array_record)", flag_values=fv,
                        required=True)
    flags.DEFINE_enum("crop", "five", ["five", "none"], "five-crop (official) or none", flag_values=fv)
    flags.DEFINE_float("ratio", 0.5, "five-crop size as a fraction of H and W", lower_bound=0.0, upper_bound=1.0,
                       flag_values=fv)
    flags.DEFINE_list("splits", ["train", "val"], "comma-separated splits", flag_values=fv)
    flags.DEFINE_integer("jpeg-quality", 75, "JPEG quality of crops (PIL default 75, official)", lower_bound=1,
                         upper_bound=100, flag_values=fv)
    flags.DEFINE_bool("skip-corrupt", False, "skip unreadable files (logged and counted)", flag_values=fv)
    flags.DEFINE_integer("num-workers", 4, "decoding threads", lower_bound=1, flag_values=fv)


def _main(fv: flags.FlagValues, rest: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if fv.config is not None:
        if rest:
            print(f"error: give the dataset by --config or as DATASET, not both (got {rest})", file=sys.stderr)
            return 2
        dataset, crop, ratio = fv.config.data.name, fv.config.data.get("crop_type"), fv.config.data.crop_ratio
        crop = None if crop in (None, "none") else crop
    elif len(rest) == 1:
        dataset, crop, ratio = rest[0], None if fv.crop == "none" else fv.crop, fv.ratio
    else:
        print(f"error: name the dataset: python -m stego_jax.data.prepare DATASET --source RAW --out DIR, "
              f"DATASET one of {sorted(sources.RAW_SOURCES)} (or --config C)", file=sys.stderr)
        return 2
    try:
        entries = prepare(dataset, fv.source, fv.out, splits=[s for s in fv.splits if s], crop=crop, ratio=ratio,
                          jpeg_quality=fv["jpeg-quality"].value, skip_corrupt=fv["skip-corrupt"].value,
                          num_workers=fv["num-workers"].value)
    except (sources.RawLayoutError, sources.CorruptFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, e in entries.items():
        print(f"{split}: {e['count']} records -> {fv.out}/{e['file']}" +
              (f" ({len(e['skipped'])} unreadable files skipped)" if e["skipped"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`argv` without the program name); returns the exit status."""
    return cli.run("stego_jax.data.prepare", __doc__, _define, _main, argv, positional=None)


if __name__ == "__main__":
    sys.exit(main())
