"""Where the decoded images live on a CUDA run: one policy, plan_image_memory, for every caller.

Placement never changes a score: patches are cut and normalised by the same kernels whether
the uint8 images sit on the GPU or are staged from host memory (iqa.data.patches._patches).
"""
from __future__ import annotations

from typing import Sequence

import torch


def canonical_device(device: str | torch.device) -> torch.device:
    """The device with its index filled in: 'cuda' -> cuda:<current device> (cuda:0 without CUDA).

    torch.device('cuda') != torch.device('cuda:0') although tensors made on the first are on
    the second, so a device compared with a tensor's .device must be canonical first, or images
    already on the GPU compare as host images.
    """
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


GIB = 2 ** 30
PLAN_RESERVE_FRACTION = 0.10   # of the card kept free: allocator fragmentation, eval batches, cuDNN workspaces
PLAN_RESERVE_MIN = 1 * GIB
PLAN_NCCL_RESERVE = 1 * GIB    # NCCL's own buffers (outside PyTorch's allocator) with several processes


def plan_image_memory(free_bytes: int, total_bytes: int, step_bytes: int,
                      image_sets: Sequence[tuple[str, int]], world_size: int = 1, images_on: str = 'auto',
                      device: str = 'cuda:0') -> dict:
    """Decide, once and for all image sets together, which live on the GPU.

    A pure function of the card's free and total memory (bytes, measured after the model is
    built), `step_bytes` (what one training step still needs on top of that: the measured peak
    of a forward + backward minus what was allocated before, plus AdamW's two state tensors),
    the image sets as (name, bytes) in priority order (training images first: they are read
    every step; then val/test; a cross-test set last) and the number of processes. Each
    process holds its own copy of every set, on its own GPU or in host memory.

    images_on: 'auto' places sets in priority order while they fit the budget (free memory
    minus the step, minus a reserve of 10% of the card, at least 1 GiB, plus 1 GiB for NCCL
    with several processes), skipping a set that does not fit for a smaller one after it;
    'gpu' places every set and says when that exceeds the budget; 'cpu' keeps all on the host,
    where batches are cut and staged through small pinned buffers.

    Returns {'where': {name: 'gpu' | 'host'}, 'fits': bool, 'budget_bytes': int, 'lines': [str]}.
    'fits' is False when the step alone does not fit, or when 'gpu' asked for more than the budget.
    """
    if images_on not in ('auto', 'gpu', 'cpu'):
        raise ValueError(f"images_on must be 'auto', 'gpu' or 'cpu', got {images_on!r}")
    reserve = max(PLAN_RESERVE_MIN, int(PLAN_RESERVE_FRACTION * total_bytes))
    if world_size > 1:
        reserve += PLAN_NCCL_RESERVE
    budget = int(free_bytes - step_bytes - reserve)
    where, used = {}, 0
    for name, size in image_sets:
        if images_on == 'gpu' or (images_on == 'auto' and used + size <= budget):
            where[name] = 'gpu'
            used += size
        else:
            where[name] = 'host'
    fits = budget >= 0 and used <= budget
    gib = lambda b: f'{b / GIB:.1f} GiB'
    lines = [f'GPU memory plan for {device} ({gib(total_bytes)} card, {gib(free_bytes)} free after the model; '
             f'a training step needs {gib(step_bytes)}; {gib(reserve)} kept free): {gib(max(budget, 0))} for images, '
             f'--images_on {images_on}']
    for name, size in image_sets:
        why = ''
        if where[name] == 'host':
            why = ' (--images_on cpu)' if images_on == 'cpu' else ' (does not fit; batches staged through pinned buffers)'
        lines.append(f'  {name:<8} {gib(size):>9}  {"GPU" if where[name] == "gpu" else "host memory"}{why}')
    host = sum(size for name, size in image_sets if where[name] == 'host')
    lines.append(f'  on the GPU {gib(used)} per process; in host memory {gib(host)} per process'
                 + (f' x {world_size} processes = {gib(host * world_size)}' if world_size > 1 else ''))
    if budget < 0:
        lines.append(f'  WARNING: the training step alone needs {gib(step_bytes + reserve)} with the reserve, more than '
                     f'the {gib(free_bytes)} free: lower --batch_size (and raise --grad_accum_steps)')
    elif used > budget:
        lines.append(f'  WARNING: --images_on gpu places {gib(used)}, more than the {gib(budget)} budget: '
                     'expect out-of-memory errors; --images_on auto keeps what does not fit on the host')
    return {'where': where, 'fits': fits, 'budget_bytes': budget, 'lines': lines}


def place_images(images_u8: torch.Tensor, device: str | torch.device, *, step_bytes: int = 0,
                 images_on: str = 'auto', name: str = 'images') -> torch.Tensor:
    """Keep the uint8 images where patches are cut, as plan_image_memory decides for this one set.

    Every caller that does not plan its sets itself (cross_dataset_test.py through
    evaluation.predict_scores, TrainPatchSampler and eval_patch_batches with place=True) is
    placed by this rule, so there is one policy. `step_bytes` is what the work on the device
    still needs besides the images: 0 for evaluation, whose batches the plan's reserve covers
    (PLAN_RESERVE_FRACTION); memory PyTorch holds in its cache counts as free.

    Images already on a GPU stay there, and host images stay unpinned: batches are staged in
    small pinned buffers, whereas pinning a whole set would lock up to twice its size in
    page-locked memory (the allocator rounds up).
    """
    device = canonical_device(device)
    if device.type != 'cuda' or images_u8.device.type == 'cuda':
        return images_u8
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    plan = plan_image_memory(free, total, step_bytes, [(name, images_u8.numel())], 1, images_on, str(device))
    if plan['where'][name] == 'gpu':
        return images_u8.to(device)
    print(f'note: {name}: {images_u8.numel() / GIB:.1f} GiB of images stay in host memory: the memory plan '
          f'leaves {max(plan["budget_bytes"], 0) / GIB:.1f} GiB for images on {device} ({free / GIB:.1f} GiB free); '
          'batches are staged through pinned buffers', flush=True)
    return images_u8
