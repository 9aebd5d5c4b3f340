"""``dsoft data ...``: build, convert and check data sets.

    dsoft data synth OUT --identities 1000 --samples-per-identity 20 --image-size 112
    dsoft data synth OUT --vectors --identities 1000000 --samples-per-identity 2 --dim 128
    dsoft data from-npy features.npy labels.npy OUT --dtype float16
    dsoft data from-rec /data/ms1m/train.rec OUT --workers 8
    dsoft data from-folder /data/faces OUT --workers 4
    dsoft data align /data/raw /data/aligned --landmarks /data/raw/landmarks.txt   # -> OUT/<identity>/<image>
    dsoft data from-folder /data/raw OUT --landmarks /data/raw/landmarks.txt       # align while converting
    dsoft data make-bin OUT.bin --synthetic 300 --pairs 3000 --image-size 112
    dsoft data make-bin OUT_pairs.txt --folder /data/val --pairs 100000
    dsoft data verify OUT            # shards (size, sha256, samples, labels) + classes.tsv against the manifest

A converter rerun into the same OUT resumes only the conversion recorded there (same source
listing, options and converter version); another is refused unless --overwrite replaces it.
`data align` does the same with the alignment recorded in OUT/alignment.json.
"""
from __future__ import annotations

import argparse

from dsoft_dist.observability import get_logger

log = get_logger(__name__)


def _shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes (default 1)")
    p.add_argument("--bad-data", choices=("skip", "fail"), default="skip", help="skip+count or stop at bad items")
    p.add_argument("--overwrite", action="store_true", help="remove the conversion already in OUT and redo all "
                   "(without it a rerun resumes only the same source and options, and refuses another)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (bars are drawn on a terminal only)")


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float16", "float32"), help="vectors: stored dtype (default float16)")


def _shard_kw(args) -> dict:
    return dict(per_shard=args.per_shard, workers=args.workers, policy=args.bad_data, overwrite=args.overwrite,
                progress=not args.no_progress)


def register(subparsers) -> None:
    """Adds ``dsoft data`` and its subcommands."""
    data = subparsers.add_parser("data", help="build, convert and check data sets",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for add in (_add_synth, _add_from_npy, _add_from_rec, _add_from_folder, _add_align, _add_make_bin,
                _add_verify):
        add(sub)  # in this order: it is the order of `dsoft data --help`


def _add_synth(sub) -> None:
    """Adds ``dsoft data synth``."""
    p = sub.add_parser("synth", help="write synthetic identities (images or feature vectors) to WebDataset shards")
    p.add_argument("out")
    p.add_argument("--identities", type=int, required=True, help="number of identities (classes) to write")
    p.add_argument("--samples-per-identity", type=int, default=20, help="samples written per identity (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the identities and of the sample order (default 0)")
    p.add_argument("--eval", action="store_true", help="use the unseen evaluation identity range")
    p.add_argument("--image-size", type=int, help="images: side in pixels (default 112)")
    p.add_argument("--difficulty", choices=("easy", "medium", "hard"), help="images: nuisance preset (default medium)")
    p.add_argument("--format", choices=("jpg", "png", "webp"), help="images: encoding (default jpg)")
    p.add_argument("--vectors", action="store_true", help="write feature vectors (data.synthetic_mode=vectors's "
                   "source) instead of images")
    p.add_argument("--dim", type=int, help="vectors: values per vector (default 128)")
    _dtype_arg(p)
    _shard_args(p)
    p.set_defaults(func=_synth)


def _add_from_npy(sub) -> None:
    """Adds ``dsoft data from-npy``."""
    p = sub.add_parser("from-npy", help="(N, D) features.npy + (N,) labels.npy -> vector shards")
    p.add_argument("features", help=".npy of shape (N, D), read memory-mapped")
    p.add_argument("labels", help=".npy of N integer class ids in [0, C)")
    p.add_argument("out")
    p.add_argument("--num-classes", type=int, default=0, help="C (default: max label + 1)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the row order (default: seeded shuffle)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row shuffle (default 0)")
    _dtype_arg(p)
    _shard_args(p)
    p.set_defaults(func=_from_npy)


def _image_source_args(p: argparse.ArgumentParser) -> None:
    """SRC, OUT and the options of reading images that from-rec and from-folder share."""
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: seeded shuffle)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default 0)")
    p.add_argument("--check-decode", action="store_true", help="fully decode every image while converting")


def _add_from_rec(sub) -> None:
    """Adds ``dsoft data from-rec``."""
    p = sub.add_parser("from-rec", help="InsightFace train.rec/.idx -> shards")
    _image_source_args(p)
    _shard_args(p)
    p.set_defaults(func=_from_rec)


def _add_from_folder(sub) -> None:
    """Adds ``dsoft data from-folder``."""
    p = sub.add_parser("from-folder", help="ROOT/<identity>/<image> -> shards")
    _image_source_args(p)
    p.add_argument("--landmarks", metavar="FILE", help="align each image on the fly: a landmark file of "
                   "IDENTITY/IMAGE x1 y1 ... x5 y5 [SCORE] lines (see `dsoft data align`)")
    p.add_argument("--align-size", type=int, help="with --landmarks: crop side in pixels (default 112)")
    _min_score_arg(p)
    _shard_args(p)
    p.set_defaults(func=_from_folder)


def _add_align(sub) -> None:
    """Adds ``dsoft data align``."""
    p = sub.add_parser("align", help="five-point alignment: ROOT/<identity>/<image> + landmark file -> "
                       "OUT/<identity>/<image> crops for from-folder")
    p.add_argument("src", help="raw images as ROOT/<identity>/<image>")
    p.add_argument("out", help="where the crops go, as OUT/<identity>/<image> (a new or empty folder, or this "
                   "alignment's own to resume it)")
    p.add_argument("--landmarks", metavar="FILE", required=True, help="one line per image: IDENTITY/IMAGE (relative "
                   "to ROOT) x1 y1 ... x5 y5 [SCORE]: eyes, nose tip, mouth corners, the image's left first")
    p.add_argument("--size", type=int, default=112, help="crop side in pixels; the template scales (default 112)")
    p.add_argument("--format", choices=("jpg", "png"), help="encode every crop so (JPEG quality 95; default: "
                   "each image's own format and name)")
    _min_score_arg(p)
    p.add_argument("--workers", type=int, default=1, help="parallel aligning processes (default 1)")
    p.add_argument("--bad-data", choices=("skip", "fail"), default="skip", help="skip+count or stop at images "
                   "that are missing or do not decode")
    p.add_argument("--overwrite", action="store_true", help="remove the alignment already in OUT and redo all "
                   "(without it a rerun resumes only the same images, landmarks and options, and refuses another)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (bars are drawn on a terminal only)")
    p.set_defaults(func=_align)


def _add_make_bin(sub) -> None:
    """Adds ``dsoft data make-bin``."""
    p = sub.add_parser("make-bin", help="verification .bin (or a pair list if OUT ends in .txt)")
    p.add_argument("out")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="ROOT/<identity>/<image>")
    src.add_argument("--shards", help="shard folder (with manifest), pattern or list file")
    src.add_argument("--synthetic", type=int, metavar="N", help="N unseen synthetic identities")
    p.add_argument("--pairs", type=int, default=6000, help="pairs to write, half same-identity (default 6000)")
    p.add_argument("--per-identity", type=int, default=10, help="images per identity (synthetic/shards)")
    p.add_argument("--image-size", type=int, default=112, help="synthetic image size")
    p.add_argument("--difficulty", choices=("easy", "medium", "hard"), default="medium",
                   help="synthetic: nuisance preset (default medium)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair (and synthetic image) draw (default 0)")
    p.set_defaults(func=_make_bin)


def _add_verify(sub) -> None:
    """Adds ``dsoft data verify``."""
    p = sub.add_parser("verify", help="check shards against their manifest (sizes, sha256, sample counts, labels, "
                       "classes.tsv, conversion fingerprints)")
    p.add_argument("manifest", help="manifest.json or its folder")
    p.add_argument("--no-checksums", action="store_true", help="check sizes only: read no shard (no sha256, "
                   "sample count or label check)")
    p.set_defaults(func=_verify)


def _min_score_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-score", type=float, metavar="S", help="skip (and count) faces whose detector score is "
                   "below S; every landmark line then needs a score")


def _refuse(args, names: tuple[str, ...], why: str) -> None:
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {why}")


def _synth(args) -> int:
    from dsoft_dist.data.synthetic import EVAL_IDENTITY_OFFSET

    offset = EVAL_IDENTITY_OFFSET if args.eval else 0
    if args.vectors:
        from dsoft_dist.data.vectors import synth_vectors_to_shards

        _refuse(args, ("image_size", "difficulty", "format"), "apply to images only: drop them, or drop --vectors")
        synth_vectors_to_shards(args.out, args.identities, args.samples_per_identity,
                                dim=128 if args.dim is None else args.dim,
                                dtype=args.dtype or "float16", seed=args.seed, identity_offset=offset,
                                **_shard_kw(args))
        return 0
    from dsoft_dist.data.convert import synth_to_shards

    _refuse(args, ("dim", "dtype"), "apply to --vectors only: add --vectors, or drop them")
    synth_to_shards(args.out, args.identities, args.samples_per_identity,
                    image_size=112 if args.image_size is None else args.image_size,
                    seed=args.seed, identity_offset=offset, difficulty=args.difficulty or "medium",
                    fmt=args.format or "jpg", **_shard_kw(args))
    return 0


def _from_npy(args) -> int:
    from dsoft_dist.data.vectors import from_npy

    from_npy(args.features, args.labels, args.out, dtype=args.dtype or "float16", shuffle=not args.no_shuffle,
             seed=args.seed, num_classes=args.num_classes, **_shard_kw(args))
    return 0


def _from_rec(args) -> int:
    from dsoft_dist.data.convert import from_rec

    from_rec(args.src, args.out, shuffle=not args.no_shuffle, seed=args.seed, check_decode=args.check_decode,
             **_shard_kw(args))
    return 0


def _from_folder(args) -> int:
    from dsoft_dist.data.convert import from_folder

    if args.landmarks is None:
        _refuse(args, ("align_size", "min_score"), "apply to --landmarks only: add --landmarks FILE, or drop them")
    from_folder(args.src, args.out, shuffle=not args.no_shuffle, seed=args.seed, check_decode=args.check_decode,
                landmarks=args.landmarks, align_size=112 if args.align_size is None else args.align_size,
                min_score=args.min_score, **_shard_kw(args))
    return 0


def _align(args) -> int:
    from dsoft_dist.data.align_folder import align_folder

    align_folder(args.src, args.out, args.landmarks, size=args.size, fmt=args.format, min_score=args.min_score,
                 policy=args.bad_data, overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress)
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
    from dsoft_dist.data.manifest import load_manifest, verify_folder, verify_shards

    manifest = load_manifest(args.manifest)
    problems = verify_folder(manifest) + verify_shards(manifest, checksums=not args.no_checksums)
    for problem in problems:
        log.error("%s", problem)
    log.info("%s: %d shards, %d samples, %d classes: %s", manifest.root, len(manifest.shards), manifest.num_samples,
             manifest.num_classes, "OK" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0
