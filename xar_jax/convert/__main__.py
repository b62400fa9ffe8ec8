r"""Command line: convert released PyTorch checkpoints into Orbax params directories.

python -m xar_jax.convert xar --src xAR-H.pth --out ckpt/xar_h      # EMA weights by default
python -m xar_jax.convert vae --src kl16.ckpt --out ckpt/vae
python -m xar_jax.convert inception \
    --src weights-inception-2015-12-05-6726825d.pth --out ckpt/inception

--overwrite replaces only a directory this command wrote earlier (it refuses anything else).
.pth/.ckpt files are unpickled with torch's weights_only=True and a small allow-list, so a
malicious file cannot run code; --allow_unsafe_pickle lifts that for a file you trust.
"""

from __future__ import annotations

import argparse
import importlib
import sys

KINDS = {
    "xar": "xar_jax.convert.xar",
    "vae": "xar_jax.convert.vae",
    "inception": "xar_jax.convert.inception",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xar_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=sorted(KINDS), help="which network the checkpoint holds")
    parser.add_argument("--src", required=True, help=".pth / .ckpt / .npz file to read")
    parser.add_argument("--out", required=True, help="directory to write (must not exist)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out written by an earlier conversion (anything else is refused)",
    )
    parser.add_argument(
        "--allow_unsafe_pickle",
        action="store_true",
        help="unpickle --src with torch.load(weights_only=False): it may run code the file "
        "carries; only for files you trust",
    )
    parser.add_argument(
        "--no-ema",
        action="store_true",
        help="xar only: convert the raw 'model' weights instead of 'model_ema'",
    )
    args = parser.parse_args(argv)
    module = importlib.import_module(KINDS[args.kind])
    kwargs = {"overwrite": args.overwrite, "allow_unsafe_pickle": args.allow_unsafe_pickle}
    if args.kind == "xar":
        kwargs["use_ema"] = not args.no_ema
    elif args.no_ema:
        parser.error("--no-ema applies to 'xar' checkpoints only")
    try:
        module.convert_file(args.src, args.out, **kwargs)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {args.kind} params to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
