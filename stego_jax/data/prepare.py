"""CLI: validate a raw dataset layout and write prepared (five-cropped) splits as ArrayRecord + manifest.

  python -m stego_jax.data.prepare cocostuff27 --source RAW --out DIR [--crop five --ratio 0.5]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m stego_jax.data.prepare", description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=sorted(sources.RAW_SOURCES))
    p.add_argument("--source", required=True, help="raw dataset directory (e.g. the unzipped cocostuff/)")
    p.add_argument("--out", required=True, help="output directory (manifest.json + <split>.array_record)")
    p.add_argument("--crop", default="five", choices=["five", "none"], help="five-crop (official) or none")
    p.add_argument("--ratio", type=float, default=0.5, help="five-crop size as a fraction of H and W")
    p.add_argument("--splits", default="train,val", help="comma-separated splits")
    p.add_argument("--jpeg-quality", type=int, default=75, help="JPEG quality of crops (PIL default 75, official)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable files (logged and counted)")
    p.add_argument("--num-workers", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        entries = prepare(args.dataset, args.source, args.out, splits=[s for s in args.splits.split(",") if s],
                          crop=None if args.crop == "none" else args.crop, ratio=args.ratio,
                          jpeg_quality=args.jpeg_quality, skip_corrupt=args.skip_corrupt,
                          num_workers=args.num_workers)
    except (sources.RawLayoutError, sources.CorruptFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, e in entries.items():
        print(f"{split}: {e['count']} records -> {args.out}/{e['file']}" +
              (f" ({len(e['skipped'])} unreadable files skipped)" if e["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
