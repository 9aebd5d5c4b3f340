"""``dsoft data ...``: build, convert and check data sets.

    dsoft data synth OUT --identities 1000 --samples-per-identity 20 --image-size 112
    dsoft data from-rec /data/ms1m/train.rec OUT --workers 8
    dsoft data from-folder /data/faces OUT --workers 4
    dsoft data make-bin OUT.bin --synthetic 300 --pairs 3000 --image-size 112
    dsoft data make-bin OUT_pairs.txt --folder /data/val --pairs 100000
    dsoft data verify OUT            # shard sizes + sha256 against the manifest
"""
from __future__ import annotations

import argparse

from dsoft_dist.observability import get_logger

log = get_logger(__name__)


def _shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes (default 1)")
    p.add_argument("--bad-data", choices=("skip", "fail"), default="skip", help="skip+count or stop at bad items")
    p.add_argument("--overwrite", action="store_true", help="rewrite finished shards instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _shard_kw(args) -> dict:
    return dict(per_shard=args.per_shard, workers=args.workers, policy=args.bad_data, overwrite=args.overwrite,
                progress=not args.no_progress)


def register(subparsers) -> None:
    """Adds ``dsoft data`` and its subcommands."""
    data = subparsers.add_parser("data", help="build, convert and check data sets",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("synth", help="write synthetic identities to WebDataset shards")
    p.add_argument("out")
    p.add_argument("--identities", type=int, required=True)
    p.add_argument("--samples-per-identity", type=int, default=20)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", choices=("easy", "medium", "hard"), default="medium")
    p.add_argument("--eval", action="store_true", help="use the unseen evaluation identity range")
    p.add_argument("--format", choices=("jpg", "png", "webp"), default="jpg")
    _shard_args(p)
    p.set_defaults(func=_synth)

    for name, helptext in (("from-rec", "InsightFace train.rec/.idx -> shards"),
                           ("from-folder", "ROOT/<identity>/<image> -> shards")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("src")
        p.add_argument("out")
        p.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: seeded shuffle)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--check-decode", action="store_true", help="fully decode every image while converting")
        _shard_args(p)
        p.set_defaults(func=_from_rec if name == "from-rec" else _from_folder)

    p = sub.add_parser("make-bin", help="verification .bin (or a pair list if OUT ends in .txt)")
    p.add_argument("out")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="ROOT/<identity>/<image>")
    src.add_argument("--shards", help="shard folder (with manifest), pattern or list file")
    src.add_argument("--synthetic", type=int, metavar="N", help="N unseen synthetic identities")
    p.add_argument("--pairs", type=int, default=6000)
    p.add_argument("--per-identity", type=int, default=10, help="images per identity (synthetic/shards)")
    p.add_argument("--image-size", type=int, default=112, help="synthetic image size")
    p.add_argument("--difficulty", choices=("easy", "medium", "hard"), default="medium")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_bin)

    p = sub.add_parser("verify", help="check shards against their manifest (sizes, sha256)")
    p.add_argument("manifest", help="manifest.json or its folder")
    p.add_argument("--no-checksums", action="store_true")
    p.set_defaults(func=_verify)


def _synth(args) -> int:
    from dsoft_dist.data.convert import synth_to_shards
    from dsoft_dist.data.synthetic import EVAL_IDENTITY_OFFSET

    synth_to_shards(args.out, args.identities, args.samples_per_identity, image_size=args.image_size, seed=args.seed,
                    identity_offset=EVAL_IDENTITY_OFFSET if args.eval else 0, difficulty=args.difficulty,
                    fmt=args.format, **_shard_kw(args))
    return 0


def _from_rec(args) -> int:
    from dsoft_dist.data.convert import from_rec

    from_rec(args.src, args.out, shuffle=not args.no_shuffle, seed=args.seed, check_decode=args.check_decode,
             **_shard_kw(args))
    return 0


def _from_folder(args) -> int:
    from dsoft_dist.data.convert import from_folder

    from_folder(args.src, args.out, shuffle=not args.no_shuffle, seed=args.seed, check_decode=args.check_decode,
                **_shard_kw(args))
    return 0


def _make_bin(args) -> int:
    from dsoft_dist.data import verification as v

    if args.folder:
        groups = v.collect_folder(args.folder)
    elif args.shards:
        groups = v.collect_shards(args.shards, max_per_identity=args.per_identity)
    else:
        groups = v.collect_synthetic(args.synthetic, args.per_identity, args.image_size, args.seed, args.difficulty)
    pairs = v.sample_pairs(groups, args.pairs, args.seed)
    if args.out.endswith(".txt"):
        v.write_pair_list(args.out, pairs, copy_images=not args.folder)
    else:
        v.write_bin(args.out, pairs)
    return 0


def _verify(args) -> int:
    from dsoft_dist.data.manifest import load_manifest, verify_shards

    manifest = load_manifest(args.manifest)
    problems = verify_shards(manifest, checksums=not args.no_checksums)
    for problem in problems:
        log.error("%s", problem)
    log.info("%s: %d shards, %d samples, %d classes: %s", manifest.root, len(manifest.shards), manifest.num_samples,
             manifest.num_classes, "OK" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0
