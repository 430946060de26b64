"""Patch batches from the decoded uint8 images: random crops, flips and colour jitter for
training (TrainPatchSampler), fixed, centre or seeded crops for evaluation (eval_patch_batches),
normalised with the ImageNet mean and std on the device.

Crop positions, flips and jitter factors are drawn per patch from generators seeded by
(seed, epoch, rank), so a batch depends only on those and never on the device or placement.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from iqa.data.image_cache import ImageRows, as_rows
from iqa.data.placement import canonical_device, place_images
from iqa.data.registry import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# RGB -> YIQ. The Y row is torchvision's grayscale weights, so saturation and contrast match
# ColorJitter; hue is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.2989, 0.587, 0.114],
                        [0.5959, -0.2746, -0.3213],
                        [0.2115, -0.5227, 0.3112]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
GRAY_WEIGHTS = _RGB_TO_YIQ[0]
JITTER = {'brightness': 0.1, 'contrast': 0.1, 'saturation': 0.1, 'hue': 0.05}  # ColorJitter(0.1, 0.1, 0.1, 0.05) of the HyperIQA-style pipeline


def _generator(*entropy: int) -> torch.Generator:
    """A CPU generator fully determined by the integers given (seed, epoch, rank, ...)."""
    words = [int(v) & 0xFFFFFFFFFFFFFFFF for v in entropy]
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFFFFFFFFFFFFFF)


def _check_images(images_u8: torch.Tensor | ImageRows, patch_size: int, what: str) -> None:
    if not isinstance(images_u8, (torch.Tensor, ImageRows)) or images_u8.dim() != 4 or images_u8.shape[1] != 3 \
            or images_u8.dtype != torch.uint8:
        shape = tuple(images_u8.shape) if isinstance(images_u8, torch.Tensor) else type(images_u8).__name__
        raise DataError(f'{what}: expected a uint8 tensor (N, 3, H, W) from load_images (or ImageRows of '
                        f'one), got {shape}')
    if images_u8.shape[0] == 0:
        raise DataError(f'{what}: no images')
    h, w = images_u8.shape[2:]
    if patch_size < 1 or h < patch_size or w < patch_size:
        raise DataError(f'{what}: images are {h}x{w} (HxW), smaller than patch_size {patch_size}; '
                        f'load them with a larger resize_hw or use a smaller patch_size')


# (x / 255 - mean) / std as one multiply and one add; clip bounds of [0, 1] in normalized units.
_NORM_SCALE = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1)
_NORM_SHIFT = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
_NORM_LOW = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
_NORM_HIGH = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
JITTER_CHUNK = 8   # patches per jitter step on CPU: their float copies stay in cache


_DEVICE_CONSTANTS: dict = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gray weights (3,), normalization scale (3, 1, 1), shift (3, 1, 1)) on `device`, copied
    there once per process: a .to(device) or torch.tensor(..., device=gpu) per batch is a
    blocking host->device copy, two hidden synchronisations per training step."""
    key = str(device)
    if key not in _DEVICE_CONSTANTS:
        _DEVICE_CONSTANTS[key] = (torch.tensor(GRAY_WEIGHTS, dtype=torch.float32).to(device),
                                  _NORM_SCALE.to(device), _NORM_SHIFT.to(device))
    return _DEVICE_CONSTANTS[key]


def _jitter_factors(gen: torch.Generator, n: int) -> torch.Tensor:
    """(n, 4) brightness, contrast, saturation factors in [0.9, 1.1] and hue shift in [-0.05, 0.05],
    drawn like torchvision ColorJitter(0.1, 0.1, 0.1, 0.05) per patch."""
    u = torch.rand((n, 4), generator=gen, dtype=torch.float64)
    j = JITTER
    lo = torch.tensor([1 - j['brightness'], 1 - j['contrast'], 1 - j['saturation'], -j['hue']],
                      dtype=torch.float64)
    hi = torch.tensor([1 + j['brightness'], 1 + j['contrast'], 1 + j['saturation'], j['hue']],
                      dtype=torch.float64)
    return lo + u * (hi - lo)


def _jitter_maps(factors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour jitter + ImageNet normalization of uint8 pixels x as a per-patch affine map:

        out = M x + shift + m0 * g,   m0 = the patch's mean gray level in [0, 1]

    Returns M (n, 3, 3) and g (n, 3) as float32 on `device`. Brightness scales, saturation
    blends with the gray value, contrast blends with the patch's mean gray (the m0 term),
    hue rotates the YIQ chroma plane: all linear and all keep the gray axis, so they commute
    and the random order torchvision draws does not matter. Compared with torchvision's
    ColorJitter, hue is rotated in YIQ instead of shifted in HSV, and values are clipped to
    [0, 1] once at the end instead of after every step.
    """
    f64 = torch.float64
    b, c, s, h = factors.to(f64).cpu().unbind(1)
    n = factors.shape[0]
    gray = torch.tensor(np.outer(np.ones(3), GRAY_WEIGHTS), dtype=f64)    # x -> (Y, Y, Y)
    saturation = s.view(n, 1, 1) * torch.eye(3, dtype=f64) + (1 - s).view(n, 1, 1) * gray
    cos, sin = torch.cos(2 * math.pi * h), torch.sin(2 * math.pi * h)
    one, zero = torch.ones_like(h), torch.zeros_like(h)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(n, 3, 3)
    hue = torch.tensor(_YIQ_TO_RGB, dtype=f64) @ rotation @ torch.tensor(_RGB_TO_YIQ, dtype=f64)
    chroma = hue @ saturation
    inv_std = 1.0 / torch.tensor(IMAGENET_STD, dtype=f64)
    matrix = (b * c).view(n, 1, 1) * chroma * (inv_std.view(1, 3, 1) / 255.0)
    # contrast pulls towards the mean gray level (after brightness): a gray offset
    gray_dir = ((1 - c) * b).view(n, 1) * chroma.sum(dim=2) * inv_std.view(1, 3)
    return matrix.float().to(device), gray_dir.float().to(device)


def _apply_jitter(x: torch.Tensor, matrix: torch.Tensor, gray_dir: torch.Tensor, out: torch.Tensor) -> None:
    """out (n, 3, P) = clip(M x + shift + m0 g) for float pixel values x (n, 3, P) in 0..255."""
    gray_weights, _, shift = _constants(x.device)
    gray_mean = x.mean(dim=2) @ gray_weights / 255.0
    offset = gray_dir * gray_mean.view(-1, 1) + shift.view(1, 3)
    torch.baddbmm(offset.unsqueeze(2), matrix, x, out=out)
    for ch in range(3):   # three scalar clamps: much faster on CPU than one clamp with tensor bounds
        out[:, ch].clamp_(_NORM_LOW[ch], _NORM_HIGH[ch])


def _patch_views(images: torch.Tensor, index, top, left, flip, p: int) -> Iterator[torch.Tensor]:
    """(3, p, p) uint8 views of the crops (mirrored copies where flip); images contiguous."""
    _, _, h, w = images.shape
    plane = h * w
    # as_strided's offset counts from the start of the storage, not of this tensor: a view such
    # as images[5:6] (contiguous, storage_offset 5 * 3 * plane) must add its own offset, or every
    # view of one storage yields the crops of its first image.
    base = images.storage_offset()
    for k, (i, t, l) in enumerate(zip(index, top, left)):
        # as_strided: one call instead of four-way slicing, which dominates at this size
        view = images.as_strided((3, p, p), (plane, w, 1), base + i * 3 * plane + t * w + l)
        yield view.flip(-1) if flip is not None and flip[k] else view


def _cut_normalized_cpu(images: torch.Tensor, index, top, left, flip, p: int,
                        jitter: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Normalized float32 patches (m, 3, p, p) from uint8 CPU images, patch by patch.

    Each patch is converted, normalized (or jittered) while its 600 KB are still in cache;
    whole-batch operations would stream the 19 MB batch through memory several times and
    run several times slower on a small CPU.
    """
    m = len(index)
    out = torch.empty((m, 3, p, p))
    views = _patch_views(images, index, top, left, flip, p)
    if jitter is None:
        for k, view in enumerate(views):
            out[k].copy_(view).mul_(_NORM_SCALE).add_(_NORM_SHIFT)
        return out
    matrix, gray_dir = jitter
    scratch = torch.empty((min(m, JITTER_CHUNK), 3, p * p))
    for a in range(0, m, JITTER_CHUNK):
        n = min(JITTER_CHUNK, m - a)
        x = scratch[:n]
        for k in range(n):
            x[k].view(3, p, p).copy_(next(views))
        _apply_jitter(x, matrix[a:a + n], gray_dir[a:a + n], out[a:a + n].view(n, 3, p * p))
    return out


def _cut_uint8(images: torch.Tensor, index, top, left, flip, p: int, pin: bool = False) -> torch.Tensor:
    """uint8 crops (m, 3, p, p) on the images' device (pinned for a later copy to a GPU)."""
    out = torch.empty((len(index), 3, p, p), dtype=torch.uint8, device=images.device, pin_memory=pin)
    for k, view in enumerate(_patch_views(images, index, top, left, flip, p)):
        out[k].copy_(view)
    return out


def _normalize_batch(crops_u8: torch.Tensor,
                     jitter: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Whole-batch normalization (+ jitter) of uint8 crops: the GPU path, where a few large
    kernels beat many small ones. Same arithmetic as _cut_normalized_cpu."""
    m, _, p, _ = crops_u8.shape
    x = crops_u8.float()
    if jitter is None:
        _, scale, shift = _constants(x.device)
        return x.mul_(scale).add_(shift)
    matrix, gray_dir = jitter
    out = torch.empty_like(x)
    _apply_jitter(x.view(m, 3, p * p), matrix, gray_dir, out.view(m, 3, p * p))
    return out


def _patches(images: torch.Tensor, index, top, left, flip, p: int,
             jitter: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device,
             pin: bool = False) -> torch.Tensor:
    """Normalized (optionally jittered, with _jitter_maps on `device`) float32 patches on `device`.

    CPU: patch by patch (cache-friendly). GPU: uint8 crops, then whole-batch kernels.
    """
    if images.device.type == 'cpu' and device.type == 'cpu':
        return _cut_normalized_cpu(images, index, top, left, flip, p, jitter)
    crops = _cut_uint8(images, index, top, left, flip, p, pin).to(device, non_blocking=True)
    return _normalize_batch(crops, jitter)


class TrainPatchSampler:
    """Training batches of random patches cut from the decoded images, like a torchvision
    RandomHorizontalFlip + RandomCrop + ColorJitter + Normalize pipeline but batched.

    Each epoch every image gives `patch_num` patches and all (image, patch) pairs are
    shuffled together, as in the original HyperIQA loader. Crop position, flip and jitter
    are drawn per patch from a generator seeded by (seed, epoch, rank), so an epoch is
    reproducible. With world_size > 1 the images are dealt out afresh each epoch (from
    (seed, epoch), the same on all ranks) so ranks hold disjoint shares; a rank with one
    image fewer repeats some of its own pairs so every rank yields the same number of batches.
    """

    def __init__(self, images_u8: torch.Tensor | ImageRows, mos, *, patch_size: int = 224, patch_num: int = 25,
                 batch_size: int = 32, color_jitter: bool = True, seed: int = 0,
                 device: str | torch.device = 'cpu', rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, place: bool = True):
        _check_images(images_u8, patch_size, 'TrainPatchSampler')
        n = images_u8.shape[0]
        mos = np.asarray(mos, dtype=np.float64).ravel()
        if len(mos) != n:
            raise DataError(f'TrainPatchSampler: {n} images but {len(mos)} scores')
        if patch_num < 1 or batch_size < 1:
            raise DataError(f'TrainPatchSampler: patch_num and batch_size must be >= 1, '
                            f'got {patch_num} and {batch_size}')
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f'TrainPatchSampler: rank {rank} is not in 0..{world_size - 1}')
        if n < world_size:
            raise DataError(f'TrainPatchSampler: {n} images cannot be shared by {world_size} processes')
        self.device = canonical_device(device)
        # place=False: the caller's memory plan decided where the images live; cut patches there.
        # ImageRows left on the host stay an index into the shared images (no copy): positions
        # 0..n-1 of the split draw the patches, self.rows maps them to rows of self.images.
        self.images, self.rows = as_rows(place_images(images_u8, self.device) if place else images_u8)
        self.n = n
        self._pin = self.images.device.type == 'cpu' and self.device.type == 'cuda'
        self.mos = torch.from_numpy(mos).float().to(self.device)
        self.patch_size, self.patch_num, self.batch_size = patch_size, patch_num, batch_size
        self.color_jitter, self.seed, self.drop_last = color_jitter, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.pairs_per_rank = math.ceil(n / world_size) * patch_num
        if drop_last and self.pairs_per_rank < batch_size:
            raise DataError(f'TrainPatchSampler: {self.pairs_per_rank} patches per epoch are fewer than '
                            f'batch_size {batch_size} with drop_last')

    def __len__(self) -> int:
        if self.drop_last:
            return self.pairs_per_rank // self.batch_size
        return math.ceil(self.pairs_per_rank / self.batch_size)

    def epoch_pairs(self, epoch: int) -> torch.Tensor:
        """Image index of each patch of this rank's epoch, in the order they are served."""
        n = self.n
        shared = _generator(self.seed, epoch)                    # same on every rank
        mine = torch.randperm(n, generator=shared)[self.rank::self.world_size]
        pairs = mine.repeat_interleave(self.patch_num)
        own = _generator(self.seed, epoch, self.rank, 1)
        short = self.pairs_per_rank - len(pairs)
        if short > 0:
            pairs = torch.cat([pairs, pairs[torch.randperm(len(pairs), generator=own)[:short]]])
        return pairs[torch.randperm(len(pairs), generator=own)]

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (patches float32 (B, 3, p, p) normalized, mos float32 (B,), image index int64 (B,)),
        all on the sampler's device."""
        pairs = self.epoch_pairs(epoch)
        n_pairs, p = len(pairs), self.patch_size
        h, w = self.images.shape[2:]
        # The whole epoch's crop positions, flips and jitter factors, drawn at once.
        gen = _generator(self.seed, epoch, self.rank, 2)
        top = torch.randint(0, h - p + 1, (n_pairs,), generator=gen).tolist()
        left = torch.randint(0, w - p + 1, (n_pairs,), generator=gen).tolist()
        flip = (torch.rand(n_pairs, generator=gen) < 0.5).tolist()
        # per-patch jitter maps for the epoch at once: many tiny matrix ops, cheap in bulk
        jitter = _jitter_maps(_jitter_factors(gen, n_pairs), self.device) if self.color_jitter else None
        index = (pairs.numpy() if self.rows is None else self.rows[pairs.numpy()]).tolist()   # rows to cut
        index_dev = pairs.to(self.device)
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            patches = _patches(self.images, index[sl], top[sl], left[sl], flip[sl], p,
                               None if jitter is None else (jitter[0][sl], jitter[1][sl]),
                               self.device, self._pin)
            yield patches, self.mos[index_dev[sl]], index_dev[sl]


EVAL_CROPS = ('fixed', 'center', 'random')


def eval_crops_per_image(crop: str, patch_num: int) -> int:
    """Crops actually cut per image: `patch_num`, except 1 for 'center'.

    The CenterCrop protocol (--test_crop center) would score `--test_patch_num` identical
    centre crops; their mean is the score of one, so one is scored (the same number, patch_num
    times less work).
    """
    return 1 if crop == 'center' else patch_num


def eval_patch_batches(images_u8: torch.Tensor | ImageRows, *, patch_size: int = 224, patch_num: int = 25,
                       batch_size: int = 64, random_crop: bool = False, seed: int = 0,
                       device: str | torch.device = 'cpu',
                       image_ids: Sequence[int] | np.ndarray | None = None,
                       crop: str | None = None, place: bool = True
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (patches float32 (B, 3, p, p) normalized, image index int64 (B,)) on `device`:
    `patch_num` crops of every image, image after image; average the predictions per index.

    crop (None = 'random' if random_crop else 'fixed'):
      'fixed': pseudo-random positions that depend only on the image's index (and the sizes),
          so every evaluation of a model sees the same, spread-out patches;
      'random' (--test_random_crop, the paper protocol): positions drawn from
          `seed` (pass seed + epoch for fresh crops each epoch);
      'center' (torchvision CenterCrop): the centre crop, top =
          round((H - p) / 2), left = round((W - p) / 2); cut once per image (see
          eval_crops_per_image).
    No flip and no colour jitter. `image_ids` (e.g. one process's share under DDP) limits
    the images evaluated; their indices and crops are those of a run over all images.
    place=True moves host images to a GPU device when they fit (place_images); place=False
    cuts patches where the images are (a memory plan already decided). ImageRows are image
    0..len-1 here, cut from their rows of the shared tensor, the same crops as a copy would give.
    """
    crop = crop or ('random' if random_crop else 'fixed')
    if crop not in EVAL_CROPS:
        raise DataError(f'eval_patch_batches: crop must be one of {", ".join(EVAL_CROPS)}, got {crop!r}')
    _check_images(images_u8, patch_size, 'eval_patch_batches')
    if patch_num < 1 or batch_size < 1:
        raise DataError(f'eval_patch_batches: patch_num and batch_size must be >= 1, '
                        f'got {patch_num} and {batch_size}')
    device = canonical_device(device)
    n, _, h, w = images_u8.shape
    p = patch_size
    patch_num = eval_crops_per_image(crop, patch_num)
    if crop == 'center':
        # torchvision's center_crop: int(round((size - crop) / 2.0)), Python's round included
        top = np.full(n * patch_num, int(round((h - p) / 2.0)), dtype=np.int64)
        left = np.full(n * patch_num, int(round((w - p) / 2.0)), dtype=np.int64)
    else:
        # Row i of a sequential stream is the same whatever n is, so positions are per image.
        rng = np.random.default_rng(seed if crop == 'random' else 20_240_601)
        u = rng.random((n, patch_num, 2))
        top = np.floor(u[..., 0] * (h - p + 1)).astype(np.int64).ravel()
        left = np.floor(u[..., 1] * (w - p + 1)).astype(np.int64).ravel()
    ids = np.arange(n, dtype=np.int64) if image_ids is None else np.asarray(image_ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise DataError(f'eval_patch_batches: image_ids must be in 0..{n - 1}, got {ids.min()}..{ids.max()}')
    top = top.reshape(n, patch_num)[ids].ravel()
    left = left.reshape(n, patch_num)[ids].ravel()
    index = np.repeat(ids, patch_num)
    images, rows = as_rows(place_images(images_u8, device) if place else images_u8)
    cut = index if rows is None else rows[index]
    pin = images.device.type == 'cpu' and device.type == 'cuda'
    index_dev = torch.from_numpy(index).to(device)   # one copy, not one per batch
    for start in range(0, len(index), batch_size):
        sl = slice(start, start + batch_size)
        patches = _patches(images, cut[sl].tolist(), top[sl].tolist(), left[sl].tolist(), None, p, None,
                           device, pin)
        yield patches, index_dev[sl]
