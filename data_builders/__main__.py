r"""Builds a dataset into array_record files that `tfds.data_source` reads.

  python -m data_builders build bdd_oia --manual_dir M --data_dir D [--strict]
  python -m data_builders build nuscenes_drive --manual_dir M --data_dir D --config six_cam
"""
import argparse
import glob
import json
import os
import sys
import tempfile
import time

import tensorflow_datasets as tfds

import data_builders
from data_builders import common

BUILDERS = {"bdd_oia": data_builders.BddOia, "nuscenes_drive": data_builders.NuscenesDrive}


def build(name, manual_dir, data_dir, config=None, strict=False):
  """Builds (or reuses) the dataset; returns ({split: examples}, {skip reason: count})."""
  cls = BUILDERS[name]
  kwargs = {"config": config or "front"} if name == "nuscenes_drive" else {}
  before = _tfds_temp_dirs()
  try:
    builder = cls(data_dir=data_dir, file_format="array_record", **kwargs)
    builder.strict = strict
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
  finally:
    # tfds makes an empty temp folder per builder of an unprepared dataset (for the dataset
    # info it would fetch from its bucket, which is off): remove those left empty.
    for folder in _tfds_temp_dirs() - before:
      try:
        os.rmdir(folder)
      except OSError:   # not empty, or gone
        pass
  skips = getattr(builder, "skips", None)
  return ({s: info.num_examples for s, info in builder.info.splits.items()},
          skips.counts if skips else {})


def _tfds_temp_dirs() -> set:
  return set(glob.glob(os.path.join(tempfile.gettempdir(), "tmp*tfds")))


def check_source(name, manual_dir, data_dir) -> str:
  """A --data_dir holds one folder's build (tfds reuses whatever it holds, silently): the
  first build records its folder in <data_dir>/<name>.source; another folder is an error.
  -> that record's path."""
  record = os.path.join(data_dir, f"{name}.source")
  if os.path.exists(record):
    with open(record) as f:
      built = f.read().strip()
    if built != os.path.abspath(manual_dir):
      raise common.BuildError(f"{data_dir} holds {name} built from {built}, not "
                              f"{os.path.abspath(manual_dir)}: pass another --data_dir, or "
                              f"delete it to rebuild")
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build")
  b.add_argument("name", choices=sorted(BUILDERS))
  b.add_argument("--manual_dir", required=True)
  b.add_argument("--data_dir", required=True)
  b.add_argument("--config", choices=["front", "six_cam"])
  b.add_argument("--strict", action="store_true", help="every skip is an error")
  args = parser.parse_args(argv)
  if args.config and args.name != "nuscenes_drive":
    parser.error("--config applies to nuscenes_drive only")
  if not os.path.isdir(args.manual_dir):
    parser.error(f"--manual_dir {args.manual_dir}: no such folder")
  start = time.time()
  try:
    record = check_source(args.name, args.manual_dir, args.data_dir)
    splits, skipped = build(args.name, args.manual_dir, args.data_dir, args.config, args.strict)
  except common.BuildError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  with open(record, "w") as f:
    f.write(os.path.abspath(args.manual_dir) + "\n")
  print(json.dumps({"dataset": args.name, "splits": splits, "skipped": skipped,
                    "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
  main()
