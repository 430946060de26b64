"""Where the decoded images live on a CUDA run: one policy, plan_image_memory, for every caller.

Placement never changes a score: patches are cut and normalised by the same kernels whether
the uint8 images sit on the GPU or are staged from host memory (iqa.data.patches._patches).

A card is not assumed to belong to one process: runs_sharing_gpu() reads how many runs the
queue started on it (IQA_GPU_SHARED, set by iqa.launch), and each plans within its share.
plan_and_place measures what a training step and an evaluation batch need (an out-of-memory
probe ends the run with advice, not a traceback), plans, prints the plan and moves the sets.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

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
GPU_SHARED_ENV = 'IQA_GPU_SHARED'   # set by iqa.launch: the number of runs on this run's card


def runs_sharing_gpu(environ: Mapping[str, str] | None = None) -> int:
    """How many runs share this process's GPU: IQA_GPU_SHARED (run_experiments.sh --gpus 0,0 sets
    2), 1 when unset. A value that is not a positive integer is an error, not a guess: planning
    for the whole card while another run uses half of it is how both run out of memory."""
    value = (os.environ if environ is None else environ).get(GPU_SHARED_ENV, '').strip()
    if not value:
        return 1
    try:
        runs = int(value)
    except ValueError:
        runs = 0
    if runs < 1:
        raise ValueError(f'{GPU_SHARED_ENV}={value!r}: expected the number of runs sharing this GPU (1, 2, ...)')
    return runs


def plan_image_memory(free_bytes: int, total_bytes: int, step_bytes: int,
                      image_sets: Sequence[tuple[str, int]], world_size: int = 1, images_on: str = 'auto',
                      device: str = 'cuda:0', *, eval_bytes: int = 0, gpu_shared: int = 1,
                      own_bytes: int = 0) -> dict:
    """Decide, once and for all image sets together, which live on the GPU.

    A pure function of the card's free and total memory (bytes, measured after the model is
    built), `step_bytes` (what one training step still needs on top of that: the measured peak
    of a forward + backward minus what was allocated before, plus AdamW's two state tensors),
    `eval_bytes` (the measured peak of one evaluation forward of --eval_batch_size patches),
    the image sets as (name, bytes) in priority order (training images first: they are read
    every step; then val/test; a cross-test set last) and the number of processes. Each
    process holds its own copy of every set, on its own GPU or in host memory.

    gpu_shared: how many runs share this card (runs_sharing_gpu). Each plans within its share,
    total / gpu_shared minus `own_bytes` (what this process holds already: the model), and
    never beyond what is free now; the free memory alone would let the run that starts first
    take what the other one needs. The reserve is taken of the share.

    The step and the evaluation batch are both counted: gradients and AdamW's state outlive
    the step, and the allocator cannot always reuse the blocks cached for one batch shape for
    the other.

    images_on: 'auto' places sets in priority order while they fit the budget (the available
    memory minus the step and the evaluation batch, minus a reserve of 10% of the card or of
    its share, at least 1 GiB, plus 1 GiB for NCCL with several processes), skipping a set that
    does not fit for a smaller one after it; 'gpu' places every set and says when that exceeds
    the budget; 'cpu' keeps all on the host, where batches are cut and staged through small
    pinned buffers.

    Returns {'where': {name: 'gpu' | 'host'}, 'fits': bool, 'budget_bytes': int, 'lines': [str]}.
    'fits' is False when the step and the evaluation batch alone do not fit, or when 'gpu' asked
    for more than the budget.
    """
    if images_on not in ('auto', 'gpu', 'cpu'):
        raise ValueError(f"images_on must be 'auto', 'gpu' or 'cpu', got {images_on!r}")
    if gpu_shared < 1:
        raise ValueError(f'gpu_shared must be >= 1, got {gpu_shared}')
    share = total_bytes // gpu_shared
    available = min(free_bytes, share - own_bytes) if gpu_shared > 1 else free_bytes
    reserve = max(PLAN_RESERVE_MIN, int(PLAN_RESERVE_FRACTION * share))
    if world_size > 1:
        reserve += PLAN_NCCL_RESERVE
    budget = int(available - step_bytes - eval_bytes - reserve)
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
             f'a training step needs {gib(step_bytes)}, an evaluation batch {gib(eval_bytes)}; {gib(reserve)} '
             f'kept free): {gib(max(budget, 0))} for images, --images_on {images_on}']
    if gpu_shared > 1:
        lines.append(f'  the card is shared by {gpu_shared} runs ({GPU_SHARED_ENV}={gpu_shared}): this run plans '
                     f'within its share of {gib(share)} ({gib(max(available, 0))} after the model)')
    for name, size in image_sets:
        why = ''
        if where[name] == 'host':
            why = ' (--images_on cpu)' if images_on == 'cpu' else ' (does not fit; batches staged through pinned buffers)'
        lines.append(f'  {name:<8} {gib(size):>9}  {"GPU" if where[name] == "gpu" else "host memory"}{why}')
    host = sum(size for name, size in image_sets if where[name] == 'host')
    lines.append(f'  on the GPU {gib(used)} per process; in host memory {gib(host)} per process'
                 + (f' x {world_size} processes = {gib(host * world_size)}' if world_size > 1 else ''))
    if budget < 0:
        where_from = "this run's share" if gpu_shared > 1 else 'free'
        lines.append(f'  WARNING: the training step and an evaluation batch alone need '
                     f'{gib(step_bytes + eval_bytes + reserve)} with the reserve, more than the {gib(available)} '
                     f'{where_from}: lower --batch_size (and raise --grad_accum_steps) or --eval_batch_size'
                     + (f', or run fewer than {gpu_shared} runs on this card (run_experiments.sh --gpus)'
                        if gpu_shared > 1 else ''))
    elif used > budget:
        lines.append(f'  WARNING: --images_on gpu places {gib(used)}, more than the {gib(budget)} budget: '
                     'expect out-of-memory errors; --images_on auto keeps what does not fit on the host')
    return {'where': where, 'fits': fits, 'budget_bytes': budget, 'lines': lines}


def place_images(images_u8: torch.Tensor, device: str | torch.device, *, step_bytes: int = 0,
                 images_on: str = 'auto', name: str = 'images') -> torch.Tensor:
    """Keep the uint8 images where patches are cut, as plan_image_memory decides for this one set.

    Every caller that does not plan its sets itself (cross_dataset_test.py through
    iqa.evaluation.predict_scores, TrainPatchSampler and eval_patch_batches with place=True) is
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


def measure_eval_bytes(model: torch.nn.Module, batch_size: int, patch_size: int, device: torch.device,
                       amp: bool) -> int:
    """GPU memory one evaluation forward of `batch_size` patches needs beyond what is allocated
    now (no gradients, eval mode, bf16 autocast when `amp`, as predict_scores runs it). 0 off CUDA.

    Eval mode updates no buffer and draws no random number the run sees (the RNG is forked), so
    a run is the same with or without the probe.
    """
    if device.type != 'cuda':
        return 0
    was_training = model.training
    model.eval()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.random.fork_rng(devices=[device]), torch.no_grad(), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            x = torch.randn(batch_size, 3, patch_size, patch_size, device=device)
            model(x).float()
            del x
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    finally:
        model.train(was_training)


def oom_advice(what: str, device: str, *, batch_size: int, eval_batch_size: int, images_on: str,
               gpu_shared: int = 1) -> str:
    """What to try when the probe of `what` ('step' or 'eval') ran out of memory on `device`."""
    if what == 'eval':
        head = (f'out of memory on {device} measuring an evaluation batch of --eval_batch_size {eval_batch_size}: '
                f'try --eval_batch_size {max(1, eval_batch_size // 2)} (evaluation scores do not depend on it)')
    else:
        head = (f'out of memory on {device} measuring a training step of --batch_size {batch_size}: try '
                f'--batch_size {max(1, batch_size // 2)} with --grad_accum_steps 2 (the same effective batch)')
    tips = []
    if images_on != 'cpu':
        tips.append('--images_on cpu (keeps every image set in host memory)')
    if gpu_shared > 1:
        tips.append(f'fewer runs on this card: {gpu_shared} share it ({GPU_SHARED_ENV}={gpu_shared}; '
                    'run_experiments.sh --gpus lists one entry per run)')
    tips.append('a card with more free memory (nvidia-smi shows what else runs on it)')
    return head + '; or ' + '; or '.join(tips) + '.'


def probe_bytes(measure: Callable[[], int], what: str, device: str, **advice) -> int:
    """measure() -> bytes, or SystemExit with oom_advice(what, device, **advice) when the probe
    itself runs out of GPU memory: the plan exists to say what to change, so an out-of-memory
    probe says it too instead of ending in a traceback."""
    try:
        return int(measure())
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()   # a no-op off CUDA
        raise SystemExit('ERROR: ' + oom_advice(what, device, **advice)) from None


def plan_and_place(image_sets: Mapping[str, object], *, device: torch.device, measure_step: Callable[[], int],
                   measure_eval: Callable[[], int], world_size: int, images_on: str, batch_size: int,
                   eval_batch_size: int, log: Callable[[str], None] = print,
                   gpu_shared: int | None = None) -> dict:
    """Measure a training step and an evaluation batch, plan where each image set lives
    (plan_image_memory, within this run's share of a shared card), log the plan and move the
    GPU sets there. image_sets: {name: uint8 tensor or ImageRows} in priority order. Returns
    {name: the set where it now lives}; host sets are returned as given (ImageRows stay views).

    A probe that runs out of memory ends the run with advice (probe_bytes). gpu_shared
    defaults to runs_sharing_gpu() (IQA_GPU_SHARED).
    """
    if device.type != 'cuda':
        return dict(image_sets)
    gpu_shared = runs_sharing_gpu() if gpu_shared is None else gpu_shared
    advice = dict(batch_size=batch_size, eval_batch_size=eval_batch_size, images_on=images_on,
                  gpu_shared=gpu_shared)
    step = probe_bytes(measure_step, 'step', str(device), **advice)
    eval_bytes = probe_bytes(measure_eval, 'eval', str(device), **advice)
    free, total = torch.cuda.mem_get_info(device)
    # memory PyTorch holds in its cache counts as free: it is reused before the card is asked again
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    to_place = [(name, t.numel()) for name, t in image_sets.items() if t.device.type != 'cuda']
    plan = plan_image_memory(free, total, step, to_place, world_size, images_on, str(device),
                             eval_bytes=eval_bytes, gpu_shared=gpu_shared,
                             own_bytes=torch.cuda.memory_allocated(device))
    for line in plan['lines']:
        log(line)
    return {name: t.to(device) if plan['where'].get(name) == 'gpu' else t for name, t in image_sets.items()}
