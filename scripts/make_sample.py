"""Make the small stratified sample committed under data/ (so `dvc repro` works on a fresh clone).

    python scripts/make_sample.py ../shared/data/dogs-vs-cats/train.zip data/sample/dogs-vs-cats-sample.zip

Members keep their Kaggle names (train/cat.N.jpg) and bytes; the archive is stored
uncompressed like the original. Any Kaggle-named zip works: ``--per-class`` images of every
class its names give (``<class>.<n>.<ext>``).
"""

from __future__ import annotations

import argparse
import random
import zipfile
from collections import defaultdict
from pathlib import PurePosixPath

from catdog.data.layouts import kaggle_label


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
        by_class = defaultdict(list)
        for name in sorted(source.namelist()):
            if kaggle_label(name) is not None:
                by_class[kaggle_label(name)].append(name)
        for label, of_label in sorted(by_class.items()):
            for name in sorted(random.Random(f"{args.seed}-{label}").sample(of_label, args.per_class)):
                info = zipfile.ZipInfo(f"train/{PurePosixPath(name).name}", date_time=(2013, 9, 25, 0, 0, 0))
                sample.writestr(info, source.read(name))


if __name__ == "__main__":
    main()
