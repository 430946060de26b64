"""One training epoch of the Swin trainer and what it needs: the loss check and the memory probe.

train_swin.py runs it every epoch; benchmarks/bench_train.py and benchmarks/gpu_check.py run it
on their own data, so what they measure is what the trainer runs.
"""
import argparse
import contextlib
import math
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from iqa import metrics as iqa_metrics
from iqa.losses import total_loss
from iqa.runtime import gather_to_all

# The Swin trainer's defaults for what a training step does: train_swin.py's flags default to
# them and the benchmarks train with them, so both run the same step.
TRAIN_DEFAULTS = {'model_size': 'base', 'epochs': 10, 'batch_size': 32, 'eval_batch_size': 64, 'patch_size': 224,
                  'grad_accum_steps': 1, 'max_grad_norm': 1.0, 'lr': 5e-6, 'lr_ratio': 10, 'weight_decay': 2e-4,
                  'lr_scheduler': 'cosine', 'min_lr_ratio': 0.01, 'warmup_epochs': 0, 'loss_type': 'l1',
                  'ranking_loss_alpha': 0.0, 'ranking_loss_margin': 0.1, 'compile': False}


def train_settings(**changes):
    """TRAIN_DEFAULTS with `changes`, as the namespace train_one_epoch and the loss read."""
    unknown = set(changes) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f'unknown training settings {sorted(unknown)}')
    return argparse.Namespace(**{**TRAIN_DEFAULTS, **changes})


# Reading a value back from the GPU (loss.item(), .cpu()) waits for all queued work, which
# stops the data for the next batch from being prepared while the GPU computes. So losses and
# predictions stay on the device and are read every CHECK_EVERY steps (progress bar, NaN check).
CHECK_EVERY = 25


def check_losses(losses, first_step, epoch, world=1):
    """Raise FloatingPointError at the first non-finite loss of `losses` (device tensors).

    With several processes all of them decide together: the first bad step is all-reduced,
    so every rank raises at the same check. A rank that stopped alone would leave the others
    waiting in the next collective until torchrun tears the job down, with no summary written.
    """
    if not losses:   # an epoch of a multiple of CHECK_EVERY steps was checked in full already
        return
    values = torch.stack(losses)
    bad = ~torch.isfinite(values)
    n = len(losses)
    first_bad = torch.where(bad.any(), bad.int().argmax(), n).reshape(1)   # stays on the device
    if world > 1:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    i = int(first_bad.item())
    if i < n:
        value = values[i].item()
        where = f'at epoch {epoch + 1}, step {first_step + i + 1}'
        if math.isfinite(value):
            raise FloatingPointError(f'loss is not finite on another process {where}')
        raise FloatingPointError(f'loss is {value} {where}')


def train_one_epoch(model, optimizer, sampler, epoch, args, device, amp, rank, world, progress_desc,
                    loss_fn=total_loss):
    """One pass over every (image, patch) pair. Returns (mean loss, train SRCC, patches/s, seconds).
    loss_fn(pred, mos, args) is the training loss (default: the --loss_type / --ranking_loss_alpha mix)."""
    model.train()
    losses, preds, targets = [], [], []
    checked = 0
    n_patches = 0
    start = time.perf_counter()
    bar = tqdm(total=len(sampler), desc=progress_desc, unit='batch', file=sys.__stderr__,
               disable=rank != 0, mininterval=1.0, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for step, (patches, mos, _) in enumerate(sampler.batches(epoch)):
        last_of_group = (step + 1) % args.grad_accum_steps == 0 or step + 1 == len(sampler)
        sync = contextlib.nullcontext() if last_of_group or world == 1 else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                pred = model(patches).float()
            loss = loss_fn(pred, mos, args)
            (loss / args.grad_accum_steps).backward()
        if last_of_group:
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        preds.append(pred.detach())
        targets.append(mos)
        n_patches += patches.shape[0]
        bar.update(1)
        if (step + 1) % CHECK_EVERY == 0:
            check_losses(losses[checked:], checked, epoch, world)
            checked = len(losses)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f'{torch.stack(losses).mean().item():.4f}',
                            patches_s=f'{n_patches * world / max(elapsed, 1e-9):.0f}', refresh=False)
    bar.close()
    check_losses(losses[checked:], checked, epoch, world)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    pred_all = gather_to_all(torch.cat(preds).cpu().numpy(), world)
    mos_all = gather_to_all(torch.cat(targets).cpu().numpy(), world)
    loss_all = gather_to_all(torch.stack(losses).cpu().numpy(), world)
    return float(np.mean(loss_all)), iqa_metrics.srcc(pred_all, mos_all), n_patches * world / seconds, seconds


def compile_model(model):
    """torch.compile as the trainer compiles: static shapes (training batches are all --batch_size
    with drop_last, evaluation batches are padded to one size), so each mode compiles once and
    never again (BENCHMARKS.md: what compiles when). The benchmarks compile with it too."""
    return torch.compile(model, dynamic=False)


def measure_step_bytes(model, args, device, amp):
    """GPU memory one training step needs beyond what is allocated now: the peak of a forward +
    backward on a random batch of --batch_size, minus the current allocation, plus AdamW's two
    fp32 state tensors per parameter (created at the first optimizer step). 0 off CUDA.

    The probe leaves no trace: RNG states and buffers (BatchNorm statistics) are restored and
    the gradients dropped, so a run is the same with or without it.
    """
    if device.type != 'cuda':
        return 0
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.random.fork_rng(devices=[device]):
        x = torch.randn(args.batch_size, 3, args.patch_size, args.patch_size, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x).float()
        total_loss(pred, torch.rand(args.batch_size, device=device), args).backward()
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    adam_state = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return int(peak - before + adam_state)


def count_flops(model, x):
    """FLOPs of one forward pass, counted by torch.utils.flop_counter.FlopCounterMode.

    It counts matrix multiplies and convolutions at 2 FLOPs per multiply-add (elementwise ops,
    softmax and norms are not counted); fvcore/thop/ptflops count multiply-adds and call them
    FLOPs, so GMACs = FLOPs / 2 is the number comparable with the usual "Swin-B 15.4G".
    """
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
