"""prepare: a labelled image set (zip or folder) -> validated, de-duplicated, split, decoded cache.

The stage, in this order: find the source's layout, labels and classes (``catdog.data.layouts``,
whose docstring has the rules; the layout found is printed in one line and recorded as ``layout`` in
summary.json), apply the user's corrections (``data.exclude``, ``data.relabel``:
``catdog.data.corrections``; counted as ``excluded`` and ``relabelled`` in summary.json), take
``data.limit_per_class`` images per class if set, decode every image in worker
processes into the uint8 cache (``catdog.data.decoding``), then reject conflicting labels and copies
across given splits, check the per-class counts and split (``catdog.data.splitting``). Whatever
stops prepare leaves no half-written ``data/prepared``.

Outputs (``paths.prepared``):
  manifest.csv   one row per kept image: path, label, split, pixel_md5; row i is images[i]
  images.npy     uint8 [N, cache_size, cache_size, 3]: decoded once, read by train/evaluate
  rejected.csv   path, reason for every file that was skipped
  summary.json   layout, classes, images per split and class, rejects per reason, ignored files, corrections
and the headline metrics ``paths.prepare_metrics`` (images per split).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter

from tqdm import tqdm

from catdog.core import reports
from catdog.core.params import DataParams, Params
from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.data.corrections import apply_corrections
from catdog.data.decoding import decode_all, store_cache
from catdog.data.layouts import SPLITS, Listing, choose_classes, list_candidates, resolve_source
from catdog.data.splitting import check_class_counts, limit_per_class, reject_conflicts, split, warn_if_imbalanced


def run(params: Params, paths: Paths) -> dict:
    data = params.data
    source = resolve_source(data.source, paths.root)
    listing = list_candidates(source, data.labels)
    corrected = apply_corrections(
        listing.candidates, paths.root / data.exclude, paths.root / data.relabel, data.classes
    )
    listing = dataclasses.replace(listing, candidates=corrected.candidates)
    candidates, classes, other_classes = choose_classes(listing, data.classes, data.source)
    candidates = limit_per_class(candidates, classes, data.limit_per_class, data.seed)
    tqdm.write(f"layout: {listing.layout} ({listing.description}); classes: {', '.join(classes)}")

    out = paths.prepared
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        summary = _prepare(source, listing, candidates, classes, data, paths)
        summary.update(other_classes_ignored=other_classes, excluded=corrected.excluded)
        summary["relabelled"] = corrected.relabelled
        reports.write_json(paths.prepare_summary, summary)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written
        raise
    reports.write_json(
        paths.prepare_metrics, {f"{name}_images": sum(counts.values()) for name, counts in summary["splits"].items()}
    )
    if corrected.excluded or corrected.relabelled:
        tqdm.write(
            f"corrections: {corrected.excluded} image(s) left out (data.exclude), "
            f"{corrected.relabelled} relabelled (data.relabel)"
        )
    for reason, count in sorted(summary["rejected"].items()):
        tqdm.write(f"warning: skipped {count} file(s): {reason} (see {paths.rejected})")
    warn_if_imbalanced(summary["splits"], classes)
    return summary


def _prepare(source, listing: Listing, candidates, classes, data: DataParams, paths: Paths) -> dict:
    scratch = paths.images.with_suffix(".decoding.npy")
    results = decode_all(source, candidates, data, scratch)
    reject_conflicts(candidates, results)
    keep = [i for i, (md5, _) in enumerate(results) if md5 is not None]
    kept = [(candidates[i], results[i][0]) for i in keep]
    rejected = listing.rejected + [(c.path, reason) for c, (md5, reason) in zip(candidates, results) if md5 is None]
    check_class_counts(kept, classes, data.min_per_class, listing.given_splits)
    splits, merged_groups = split(kept, classes, data, listing.given_splits)
    store_cache(scratch, keep, paths.images)
    reports.write_csv(
        paths.manifest,
        ["path", "label", "split", "pixel_md5"],
        ([c.path, c.label, s, md5] for (c, md5), s in zip(kept, splits)),
    )
    reports.write_csv(paths.rejected, ["path", "reason"], sorted(rejected))
    integrity.record(paths, classes)
    summary = summarize(kept, classes, splits, rejected, listing.unlabelled, merged_groups, data.cache_size)
    return {"layout": listing.layout, **summary}


def summarize(kept, classes, splits, rejected, unlabelled, merged_groups, cache_size) -> dict:
    counts = Counter(zip(splits, (candidate.label for candidate, _ in kept)))
    return {
        "images": len(kept),
        "cache_size": cache_size,
        "classes": classes,
        "splits": {s: {label: counts[(s, label)] for label in classes} for s in SPLITS},
        "rejected": dict(sorted(Counter(reason for _, reason in rejected).items())),
        "rejected_total": len(rejected),
        "unlabelled_ignored": unlabelled,
        "duplicate_groups_merged": merged_groups,
    }
