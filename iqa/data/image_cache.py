"""Decode once: image files -> one uint8 tensor (N, 3, H, W), cached on disk.

Each image is decoded and resized a single time (as torchvision Resize does on a PIL image)
and kept as uint8; patches are cut from it later (iqa.data.patches). Problems with individual
images are collected and reported together (the first 20 and a count) before training
starts, or skipped with a warning on request.

A cached set is memory-mapped, not read: every process on the machine (each DDP rank, each
run of a queue) and every split (ImageRows) reads the same pages of the page cache, so a
data set costs its size once per machine in host RAM, not once per process and split.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from iqa.data.registry import DataError
from iqa.files import atomic_write

CACHE_VERSION = 1
MAX_LISTED_PROBLEMS = 20


def load_images(paths: Sequence[str | os.PathLike], resize_hw: tuple[int, int] | None = (512, 384), *,
                cache_dir: str | os.PathLike | None = '.cache/images', num_workers: int | None = None,
                skip_bad: bool = False, min_hw: tuple[int, int] | None = None,
                progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """Decode and resize every image once -> (uint8 tensor (N, 3, H, W) on CPU, kept indices).

    resize_hw is (height, width) as in torchvision Resize((512, 384)) on a PIL image
    (PIL bilinear with antialiasing, so the pixels are the same); None keeps the native size,
    which must then be the same for all images. Decoding runs in `num_workers` threads (PIL
    releases the GIL while decoding and resizing) with a progress bar, and the result is
    stored in `cache_dir` under a key made of the file list, the resize and every file's size
    and mtime: a second call over unchanged files reads the tensor back instead of decoding
    (cache_dir=None turns the disk cache off; a relative cache_dir is relative to the current
    working directory).

    `min_hw` is the smallest stored size the caller can use (the patch size): a resize_hw below
    it is an error; at native size, each image below it is a bad image. Images that are
    absent, unreadable, truncated, of another size than most (resize_hw=None) or too small are
    all collected first: by default DataError lists the first 20 and the count; with
    skip_bad=True they are dropped with a printed warning, and the returned kept indices
    (into `paths`) say which images the tensor holds.
    """
    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise DataError('load_images: no image paths given')
    resize_hw = _check_hw(resize_hw, 'resize_hw')
    min_hw = _check_hw(min_hw, 'min_hw')
    if resize_hw is not None and min_hw is not None and (resize_hw[0] < min_hw[0] or resize_hw[1] < min_hw[1]):
        raise DataError(f'resize_hw {resize_hw[0]}x{resize_hw[1]} (HxW) is smaller than the '
                        f'{min_hw[0]}x{min_hw[1]} patches to cut from it: resize larger or use smaller patches')
    stats = [_file_stat(p) for p in paths]
    key = _cache_key(paths, stats, resize_hw)
    cache = Path(cache_dir) if cache_dir is not None else None

    decoded = _cache_read(cache, key) if cache is not None else None
    if decoded is None:
        decoded = _decode_all(paths, stats, resize_hw, num_workers, progress)
        if cache is not None and _cache_write(cache, key, decoded, paths, resize_hw):
            # the decoding process maps the file it wrote too, so it holds no private copy
            # besides the one in the page cache that the other processes read
            decoded = _cache_read(cache, key, quiet=True) or decoded
    images, kept, problems, orig_hw = decoded

    if min_hw is not None and resize_hw is None:
        # At native size an image smaller than the patch cannot give one; resized images are
        # all resize_hw, checked against min_hw above (small files are scaled up, as torchvision
        # Resize does).
        small = [(int(i), f'image is {h}x{w} (HxW), smaller than the {min_hw[0]}x{min_hw[1]} patch')
                 for i, (h, w) in zip(kept, orig_hw[kept]) if h < min_hw[0] or w < min_hw[1]]
        if small:
            problems = sorted(problems + small)
            drop = {i for i, _ in small}
            keep_rows = [j for j, i in enumerate(kept) if int(i) not in drop]
            images, kept = images[keep_rows], kept[keep_rows]
    if problems:
        report = _problem_report(problems, paths)
        if not skip_bad:
            raise DataError(report + '\nFix or remove these files, or pass skip_bad=True '
                                     '(train_swin.py --skip_bad_images) to leave them out.')
        print(f'warning: skipping {len(problems)} of {n} images (skip_bad): {report}',
              file=sys.stderr, flush=True)
    if len(kept) == 0:
        raise DataError(f'none of the {n} images can be used')
    return images, kept


def _check_hw(hw, what: str) -> tuple[int, int] | None:
    if hw is None:
        return None
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise DataError(f'{what} must be (height, width), got {hw!r}') from None
    if h <= 0 or w <= 0:
        raise DataError(f'{what} must be positive (height, width), got {hw!r}')
    return h, w


def _file_stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _cache_key(paths: Sequence[str], stats, resize_hw) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({'version': CACHE_VERSION, 'resize_hw': resize_hw}).encode())
    for p, st in zip(paths, stats):
        h.update(f'\n{os.path.abspath(p)}\t{st}'.encode())
    return h.hexdigest()[:32]


def _problem_report(problems: list[tuple[int, str]], paths: Sequence[str]) -> str:
    lines = [f'{len(problems)} of {len(paths)} images cannot be used:']
    lines += [f'  {paths[i]}: {reason}' for i, reason in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f'  ... and {len(problems) - MAX_LISTED_PROBLEMS} more')
    return '\n'.join(lines)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode.

    16-bit grayscale is scaled (PIL's own conversion clips it to white); transparent images
    are composited on white, how they look on a page, rather than exposing whatever colour
    the transparent pixels happen to hold; CMYK, palette, 1-bit, YCbCr and LAB go through PIL.
    """
    mode = im.mode
    if mode == 'RGB' and 'transparency' not in im.info:
        return im
    if mode.startswith('I') or mode == 'F':
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith('I;16') or (mode == 'I' and a.max(initial=0) > 255):
            a = a / 257.0
        elif mode == 'F' and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L').convert('RGB')
    if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        rgba = im.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return im.convert('RGB')


def _decode(path: str, resize_hw: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 array, resized like torchvision Resize on a PIL image, and the file's size."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        orig_hw = (im.height, im.width)
        rgb = to_rgb(im)
    if resize_hw is not None and (rgb.height, rgb.width) != resize_hw:
        rgb = rgb.resize((resize_hw[1], resize_hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(rgb), orig_hw


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 32))


def _decode_all(paths, stats, resize_hw, num_workers, progress):
    """Decode all images in threads straight into one preallocated tensor."""
    from tqdm import tqdm
    n = len(paths)
    workers = max(1, min(num_workers or _default_workers(), n))
    problems: list[tuple[int, str]] = [(i, 'file not found') for i, st in enumerate(stats) if st is None]
    todo = [i for i, st in enumerate(stats) if st is not None]
    orig_hw = np.zeros((n, 2), dtype=np.int64)
    started = time.perf_counter()

    if resize_hw is None:
        # Native size: read the headers first and keep the size most images share.
        def probe(i):
            with Image.open(paths[i]) as im:
                return im.height, im.width
        sizes = {}
        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(probe, i): i for i in todo}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    sizes[i] = fut.result()
                except Exception as e:
                    problems.append((i, f'cannot read image ({type(e).__name__}: {e})'))
        if not sizes:
            return torch.empty((0, 3, 1, 1), dtype=torch.uint8), np.zeros(0, np.int64), sorted(problems), orig_hw
        target = Counter(sizes.values()).most_common(1)[0][0]
        for i, hw in sizes.items():
            if hw != target:
                problems.append((i, f'image is {hw[0]}x{hw[1]} (HxW) but most images are '
                                    f'{target[0]}x{target[1]}; pass resize_hw to resize them all'))
        todo = sorted(i for i, hw in sizes.items() if hw == target)
    else:
        target = resize_hw

    h, w = target
    images = torch.empty((n, 3, h, w), dtype=torch.uint8)
    ok = np.zeros(n, dtype=bool)

    def work(i):
        arr, hw = _decode(paths[i], resize_hw)
        if arr.shape[:2] != (h, w):
            raise ValueError(f'decoded size {arr.shape[0]}x{arr.shape[1]} differs from its header')
        # Write HWC pixels into the CHW slot of the shared tensor (numpy view, no extra copy).
        np.copyto(images[i].permute(1, 2, 0).numpy(), arr)
        return hw

    bar = tqdm(total=len(todo), desc='decoding images', unit='img', disable=not progress,
               mininterval=1.0, file=sys.stderr)
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(work, i): i for i in todo}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                orig_hw[i] = fut.result()
                ok[i] = True
            except Exception as e:  # every failure is reported together, by file
                problems.append((i, f'cannot decode image ({type(e).__name__}: {e})'))
            bar.update(1)
    bar.close()

    kept = np.flatnonzero(ok)
    if len(kept) < n:
        # Compact in place (row j <= kept[j]), so memory is not doubled.
        for j, i in enumerate(kept):
            if j != i:
                images[j] = images[i]
        images = images[:len(kept)]
    seconds = time.perf_counter() - started
    gib = images.numel() / 2**30
    print(f'decoded {len(kept)} of {n} images to a uint8 tensor {tuple(images.shape)} '
          f'({gib:.2f} GiB in memory) in {seconds:.1f} s with {workers} threads', flush=True)
    return images, kept, sorted(problems), orig_hw


def _atomic_write(path: Path, write: Callable) -> None:
    """iqa.files.atomic_write (temp file, fsync, rename), creating the folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def _cache_files(cache: Path, key: str) -> tuple[Path, Path]:
    return cache / f'{key}.npy', cache / f'{key}.json'


def _cache_write(cache: Path, key: str, decoded, paths, resize_hw) -> bool:
    images, kept, problems, orig_hw = decoded
    data_file, meta_file = _cache_files(cache, key)
    meta = {'version': CACHE_VERSION, 'key': key, 'shape': list(images.shape),
            'resize_hw': resize_hw, 'n_paths': len(paths), 'first_path': os.path.abspath(paths[0]),
            'kept': kept.tolist(), 'problems': problems, 'orig_hw': orig_hw.tolist(),
            'created': time.strftime('%Y-%m-%d %H:%M:%S')}
    try:
        # Data first; the metadata file marks the entry complete.
        _atomic_write(data_file, lambda f: np.lib.format.write_array(f, images.numpy(), allow_pickle=False))
        _atomic_write(meta_file, lambda f: f.write(json.dumps(meta).encode()))
    except OSError as e:
        # A full disk must not stop training: the decoded images are already in memory.
        print(f'warning: could not write the image cache in {cache} ({e}); continuing without it',
              file=sys.stderr, flush=True)
        return False
    print(f'image cache written: {data_file} ({images.numel() / 2**30:.2f} GiB)', flush=True)
    return True


def _cache_read(cache: Path, key: str, quiet: bool = False):
    data_file, meta_file = _cache_files(cache, key)
    if not (data_file.is_file() and meta_file.is_file()):
        return None
    started = time.perf_counter()
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get('version') != CACHE_VERSION or meta.get('key') != key:
            return None
        # Read-only map: pages come from the page cache on first touch and are shared with every
        # other process mapping the file; a write into the images is a bug and faults loudly
        # rather than silently making a private copy.
        array = np.load(data_file, mmap_mode='r', allow_pickle=False)
        if list(array.shape) != meta['shape'] or array.dtype != np.uint8:
            raise ValueError(f'shape {array.shape} {array.dtype}, expected {meta["shape"]} uint8')
    except Exception as e:
        print(f'warning: ignoring unreadable image cache {data_file} ({e}); decoding again',
              file=sys.stderr, flush=True)
        return None
    with warnings.catch_warnings():
        # torch warns that it cannot write-protect a tensor over a read-only array; the map is
        # protected by the operating system instead
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        images = torch.from_numpy(array)
    kept = np.asarray(meta['kept'], dtype=np.int64)
    problems = [(int(i), str(r)) for i, r in meta['problems']]
    orig_hw = np.asarray(meta['orig_hw'], dtype=np.int64).reshape(-1, 2)
    if not quiet:
        print(f'image cache hit: {data_file} {tuple(images.shape)} ({images.numel() / 2**30:.2f} GiB) '
              f'memory-mapped in {time.perf_counter() - started:.1f} s', flush=True)
    return images, kept, problems, orig_hw


class ImageRows:
    """Rows of a decoded uint8 image tensor (N, 3, H, W), selected without copying them.

    A split is a list of rows into the images of its data set: `images[rows]` would copy them
    (KonIQ's training split alone is 3.9 GiB, per process), whereas ImageRows keeps the index
    and patches are cut from the shared (memory-mapped) tensor directly. Accepted wherever
    decoded images are (TrainPatchSampler, eval_patch_batches, predict_scores, place_images,
    the memory plan): `shape`, `len`, `numel`, `device` and `dtype` describe the selected rows,
    and `.to(device)` gathers them, in order, into one tensor there.
    """

    GATHER_CHUNK = 64   # images per host->device copy in .to(): no full host copy on the way

    def __init__(self, images: torch.Tensor, rows):
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= images.shape[0]):
            raise DataError(f'ImageRows: rows must be in 0..{images.shape[0] - 1}, '
                            f'got {rows.min()}..{rows.max()}')
        self.images, self.rows = images, rows

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows),) + tuple(self.images.shape[1:]))

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def dtype(self) -> torch.dtype:
        return self.images.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self) -> int:
        return self.images.dim()

    def numel(self) -> int:
        return len(self.rows) * int(np.prod(self.images.shape[1:]))

    def to(self, device: str | torch.device) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        for a in range(0, len(self.rows), self.GATHER_CHUNK):
            chunk = torch.from_numpy(self.rows[a:a + self.GATHER_CHUNK])
            out[a:a + len(chunk)].copy_(self.images.index_select(0, chunk.to(self.images.device)))
        return out


def as_rows(images: torch.Tensor | ImageRows) -> tuple[torch.Tensor, np.ndarray | None]:
    """(contiguous tensor, rows into it or None for all of them) of decoded images or ImageRows."""
    if isinstance(images, ImageRows):
        return images.images.contiguous(), images.rows
    return images.contiguous(), None
