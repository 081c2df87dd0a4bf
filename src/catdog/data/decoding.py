"""Decoding prepare's images in worker processes, one per core, into its uint8 cache ``[N, size, size, 3]``.

Each worker writes its rows straight into the memmapped cache and returns each image's pixel md5 or
its reject reason. A file larger than ``data.max_image_bytes`` (a zip member by its declared size) is
rejected as ``too_large`` before it is read, and reading stops at that cap (``images.read_bounded``).
A decode worker killed by the system (out of memory) stops prepare with one line naming its image.
The worker functions live at module level so that any start method (fork, spawn, forkserver) finds them.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import zipfile
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from catdog.core.errors import CatdogError
from catdog.core.params import DataParams
from catdog.data.images import BadImage, decode_image, read_bounded, read_file
from catdog.data.layouts import Candidate

_worker_state: dict = {}


def _init_worker(source, cache_file, count, size, min_size, max_bytes, current, slot) -> None:
    _worker_state.update(
        archive=zipfile.ZipFile(source) if os.path.isfile(source) else None,
        root=Path(source),
        images=np.lib.format.open_memmap(cache_file, mode="r+", dtype=np.uint8, shape=(count, size, size, 3)),
        size=size,
        min_size=min_size,
        max_bytes=max_bytes,
        current=current,  # shared: 1 + the index this worker is decoding (names it if the worker dies)
        slot=slot,
    )


def _read(name: str) -> bytes:
    """The file's bytes, refused before reading when over ``data.max_image_bytes``."""
    state = _worker_state
    if state["archive"] is None:
        return read_file(state["root"] / name, state["max_bytes"])
    info = state["archive"].getinfo(name)
    with state["archive"].open(info) as stream:
        return read_bounded(stream, info.file_size, state["max_bytes"])


def _decode_one(task: tuple[int, str]) -> tuple[int, str | None, str]:
    """Returns (index, pixel md5 or None, reject reason or '')."""
    index, name = task
    state = _worker_state
    state["current"][state["slot"]] = index + 1
    try:
        pixels = decode_image(_read(name), state["size"], state["min_size"])
    except BadImage as exc:
        return index, None, exc.reason
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError):  # unreadable member or file
        return index, None, "unreadable"
    state["images"][index] = pixels
    return index, hashlib.md5(pixels.tobytes()).hexdigest(), ""


def _decode_chunk(tasks: list[tuple[int, str]]) -> list[tuple[int, str | None, str]]:
    return [_decode_one(task) for task in tasks]


def decode_all(source: Path, candidates: list[Candidate], data: DataParams, scratch: Path) -> list[tuple]:
    """Decode candidate i into row i of ``scratch``; returns (pixel md5 or None, reject reason) per candidate."""
    size, count = data.cache_size, len(candidates)
    np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(count, size, size, 3)).flush()
    workers = min(data.workers or os.cpu_count() or 1, count)
    init_args = (str(source), str(scratch), count, size, data.min_image_size, data.max_image_bytes)
    tasks = [(i, c.path) for i, c in enumerate(candidates)]
    results = [None] * count
    progress = {"total": count, "desc": "decode", "unit": "img", "mininterval": 1.0}
    if workers == 1:
        _init_worker(*init_args, multiprocessing.RawArray("q", 1), 0)
        decoded = map(_decode_one, tasks)
    else:
        decoded = _decode_in_pools(tasks, workers, init_args, [c.path for c in candidates])
    try:
        for index, md5, reason in tqdm(decoded, **progress):
            results[index] = (md5, reason)
    finally:
        _worker_state.clear()
    return results


def _decode_in_pools(tasks, workers: int, init_args: tuple, names: list[str]):
    """Decode results in any order, each worker in a one-process pool fed two chunks at a time: a worker
    that dies (the kernel's OOM killer) is then known, and so is the image it was on."""
    current = multiprocessing.RawArray("q", workers)
    size = max(1, min(64, len(tasks) // (workers * 8)))
    chunks = iter([tasks[start : start + size] for start in range(0, len(tasks), size)])
    with ExitStack() as stack:
        pools = [
            stack.enter_context(ProcessPoolExecutor(1, initializer=_init_worker, initargs=(*init_args, current, k)))
            for k in range(workers)
        ]
        running = {}

        def feed(slot: int) -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                running[pools[slot].submit(_decode_chunk, chunk)] = slot

        for slot in [*range(workers), *range(workers)]:
            feed(slot)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                slot = running.pop(future)
                try:
                    yield from future.result()
                except BrokenProcessPool:
                    for other in running:
                        other.cancel()
                    doing = f"while decoding {names[current[slot] - 1]}" if current[slot] else "before decoding"
                    raise CatdogError(
                        f"a decode worker was killed {doing} (out of memory?): remove that file, "
                        "lower data.max_image_bytes or data.workers"
                    ) from None
                feed(slot)


def store_cache(scratch: Path, keep: list[int], cache_file: Path) -> None:
    """``scratch`` without the rows of rejected files, as ``cache_file``."""
    decoded = np.load(scratch, mmap_mode="r")
    if len(keep) == len(decoded):
        del decoded
        scratch.replace(cache_file)
        return
    images = np.lib.format.open_memmap(cache_file, mode="w+", dtype=np.uint8, shape=(len(keep), *decoded.shape[1:]))
    for start in range(0, len(keep), 1024):
        images[start : start + 1024] = decoded[keep[start : start + 1024]]
    images.flush()
    del decoded, images
    scratch.unlink()
