r"""The procedural driving world, written in a real dataset layout.

  python -m drivlm_jax.sim --layout bdd_oia --domain day --num 1000 --out DIR --seed 0
  python -m drivlm_jax.sim --layout nuscenes --domain night+rain --num 10 --out DIR \
      --location singapore-onenorth

--num counts images for bdd_oia and scenes (16 keyframes x 6 cameras) for nuscenes. Runs with
other domains, splits or seeds add to the same DIR. A byte-level BPE `tokenizer.json` trained
on the sim's text is written next to the data.
"""
import argparse
import json
import time

import tqdm

from drivlm_jax.sim import bdd_oia, domains, nuscenes, tokenizer


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__)
  parser.add_argument("--layout", required=True, choices=["bdd_oia", "nuscenes"])
  parser.add_argument("--domain", default="day",
                      help="conditions joined by '+': day|night, fog|rain|snow, "
                           "cam_wide|cam_tele (e.g. night+rain)")
  parser.add_argument("--num", type=int, required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--split", default="train", choices=["train", "val", "test"])
  parser.add_argument("--width", type=int)
  parser.add_argument("--height", type=int)
  parser.add_argument("--location", default="boston-seaport", help="nuscenes log location")
  args = parser.parse_args(argv)
  try:
    domains.parse_domain(args.domain)
  except ValueError as e:
    parser.error(str(e))
  if args.num < 1:
    parser.error("--num must be at least 1")
  progress = lambda it: tqdm.tqdm(it, desc=f"sim {args.layout} {args.domain} {args.split}")
  start = time.time()
  kwargs = dict(out=args.out, domain_name=args.domain, num=args.num, seed=args.seed,
                split=args.split, width=args.width, height=args.height, progress=progress)
  if args.layout == "bdd_oia":
    counts = bdd_oia.write(**kwargs)
  else:
    counts = nuscenes.write(location=args.location, **kwargs)
  tokenizer.write(args.out)
  counts["seconds"] = round(time.time() - start, 2)
  print(json.dumps({"layout": args.layout, "domain": args.domain, "split": args.split,
                    **counts}))


if __name__ == "__main__":
  main()
