"""The per-class checks and the split of the decoded images into train, val and test.

Images with identical pixels (byte-identical files among them) form one group that lands in one
split. A group under two labels is rejected as ``conflicting_labels``, every copy. With given splits,
a copy in ``val/`` or ``test/`` of an image of an earlier split (train < val < test) is rejected as
``duplicate_across_splits``: the given split is kept, but nothing is tested on what was trained on.
Carved splits are stratified per class over groups, seeded, and independent of listing order. A
class with fewer than ``data.min_per_class`` usable images (or a given split without any of a
class) is an error naming it.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict

from tqdm import tqdm

from catdog.core.errors import CatdogError
from catdog.core.params import DataParams
from catdog.data.layouts import SPLITS, Candidate

IMBALANCE_WARNING = 3  # largest / smallest class


def limit_per_class(candidates: list[Candidate], classes: list[str], limit: int | None, seed: int) -> list[Candidate]:
    if limit is None:
        return candidates
    chosen = []
    for label in classes:
        of_label = [c for c in candidates if c.label == label]
        random.Random(f"{seed}-{label}").shuffle(of_label)
        chosen += of_label[:limit]
    return sorted(chosen, key=lambda c: c.path)


def reject_conflicts(candidates: list[Candidate], results: list[tuple]) -> None:
    """Same pixels under two labels: every copy ``conflicting_labels``. With given splits, a copy in a
    later split than another (train < val < test): ``duplicate_across_splits``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, (md5, _) in enumerate(results):
        if md5 is not None:
            groups[md5].append(index)
    order = {None: 0, **{name: position for position, name in enumerate(SPLITS)}}
    for members in groups.values():
        if len({candidates[i].label for i in members}) > 1:
            for index in members:
                results[index] = (None, "conflicting_labels")
            continue
        first = min(order[candidates[i].split] for i in members)
        for index in members:
            if order[candidates[index].split] > first:
                results[index] = (None, "duplicate_across_splits")


def check_class_counts(kept: list[tuple[Candidate, str]], classes: list[str], minimum: int, given: set[str]) -> None:
    counts = Counter(candidate.label for candidate, _ in kept)
    for label in classes:
        if counts[label] < minimum:
            raise CatdogError(
                f"only {counts[label]} usable {label!r} image(s), need data.min_per_class={minimum}: "
                "add images or lower the param"
            )
    in_split = Counter((candidate.split, candidate.label) for candidate, _ in kept)
    for split_name in sorted(given, key=SPLITS.index):
        for label in classes:
            if not in_split[(split_name, label)]:
                carve = f", or leave {split_name}/ out to carve it from train/" if split_name != "train" else ""
                raise CatdogError(f"the given {split_name}/ folder has no usable {label!r} image: add some{carve}")


def split(
    kept: list[tuple[Candidate, str]], classes: list[str], data: DataParams, given: set[str]
) -> tuple[list[str], int]:
    """Split per kept image (given ones kept, the rest stratified and seeded) and how many groups merged.

    Images with identical pixels form one group and land in one split, so the same photo can
    never be both trained on and tested on. Group order depends only on content and names,
    never on listing order.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for index, (_, md5) in enumerate(kept):
        groups[md5].append(index)
    assignment = [""] * len(kept)
    by_label: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        candidate = kept[members[0]][0]
        if candidate.split in ("val", "test"):
            for index in members:
                assignment[index] = candidate.split
        else:
            by_label[candidate.label].append(members)

    fractions = {"test": data.test_fraction, "val": data.val_fraction}
    for label in classes:
        label_groups = sorted(by_label[label], key=lambda members: kept[members[0]][0].path)
        random.Random(f"{data.seed}-{label}").shuffle(label_groups)
        # at least one of each class in a carved split (min_per_class >= 3 leaves one for train)
        carved = [
            name
            for name in ("test", "val")
            if name not in given
            for _ in range(max(1, round(len(label_groups) * fractions[name])))
        ]
        for position, members in enumerate(label_groups):
            for index in members:
                assignment[index] = carved[position] if position < len(carved) else "train"
    merged = sum(1 for members in groups.values() if len(members) > 1)
    return assignment, merged


def warn_if_imbalanced(splits: dict[str, dict[str, int]], classes: list[str]) -> None:
    totals = {label: sum(counts[label] for counts in splits.values()) for label in classes}
    largest, smallest = max(totals, key=totals.get), min(totals, key=totals.get)
    if totals[largest] > IMBALANCE_WARNING * totals[smallest]:
        tqdm.write(
            f"warning: imbalanced classes: {totals[largest]} {largest!r} vs {totals[smallest]} {smallest!r} images "
            f"(more than {IMBALANCE_WARNING}:1); accuracy flatters the largest class, see balanced accuracy"
        )
