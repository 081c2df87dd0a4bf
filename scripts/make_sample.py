"""Make the small stratified sample committed under data/ (so `dvc repro` works on a fresh clone).

    python scripts/make_sample.py ../shared/data/dogs-vs-cats/train.zip data/sample/dogs-vs-cats-sample.zip

Members keep their Kaggle names (train/cat.N.jpg) and bytes; the archive is stored
uncompressed like the original.
"""

from __future__ import annotations

import argparse
import random
import zipfile
from pathlib import PurePosixPath


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="Kaggle-layout train.zip")
    parser.add_argument("output", help="sample zip to write")
    parser.add_argument("--per-class", type=int, default=350)
    parser.add_argument("--seed", type=int, default=2013)
    args = parser.parse_args()

    with (
        zipfile.ZipFile(args.source) as source,
        zipfile.ZipFile(args.output, "w", compression=zipfile.ZIP_STORED) as sample,
    ):
        names = sorted(n for n in source.namelist() if n.endswith(".jpg"))
        for label in ("cat", "dog"):
            of_label = [n for n in names if PurePosixPath(n).name.startswith(f"{label}.")]
            for name in sorted(random.Random(f"{args.seed}-{label}").sample(of_label, args.per_class)):
                info = zipfile.ZipInfo(f"train/{PurePosixPath(name).name}", date_time=(2013, 9, 25, 0, 0, 0))
                sample.writestr(info, source.read(name))


if __name__ == "__main__":
    main()
