"""Process-level set-up shared by the training and evaluation scripts.

train_swin.py, train_clip.py and cross_dataset_test.py all need the same few
things before any model exists: a command-line parser that refuses misspelt
flags, the distributed process group torchrun asks for, seeding, and a console
that is copied into logs/<run>.log. They live here so that no script imports
another script.
"""
import argparse
import difflib
import io
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from data_loader import canonical_device


class SuggestingParser(argparse.ArgumentParser):
    """argparse that refuses unknown flags with a "did you mean" hint.

    The user once lost a night to ``--no_multi_scale`` (should be
    ``--no_multiscale``) being silently ignored by a parse_known_args script.
    """

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            options = [o for action in self._actions for o in action.option_strings]
            lines = []
            for extra in extras:
                flag = extra.split('=', 1)[0]
                if not flag.startswith('-'):
                    lines.append(f'unexpected value {extra!r} (a flag before it takes no value, or a typo?)')
                    continue
                close = difflib.get_close_matches(flag, options, n=2, cutoff=0.75)
                hint = f' -- did you mean {" or ".join(close)}?' if close else ''
                lines.append(f'unknown flag {flag}{hint}')
            self.error('; '.join(lines) + '\nNothing was run. See --help for every flag.')
        return parsed


def setup_distributed(device_flag):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if device_flag == 'auto':
        device_flag = 'cuda' if torch.cuda.is_available() else 'cpu'
    if world == 1:
        return 0, 1, canonical_device(device_flag)
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device_flag.startswith('cuda'):
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
        dist.init_process_group('nccl')
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    return dist.get_rank(), world, device


def gather_to_all(array, world_size):
    """Concatenate a numpy array from every rank, in rank order (identity for 1 process)."""
    if world_size == 1:
        return array
    parts = [None] * world_size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Tee(io.TextIOBase):
    """Send console output to the terminal and to logs/<run>.log as well."""

    def __init__(self, stream, log_file):
        self.stream, self.log_file = stream, log_file

    def write(self, text):
        self.stream.write(text)
        self.log_file.write(text)
        self.log_file.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log_file.flush()


def use_bf16(precision, device):
    """--precision -> whether bf16 autocast is on (auto: on CUDA only)."""
    return precision == 'bf16' or (precision == 'auto' and device.type == 'cuda')


def set_precision(precision, device):
    """Process-wide numerics for --precision; returns whether bf16 autocast is on.

    TF32 is off on CUDA in both modes: fp32 then means fp32 (the original code's numerics, so
    --no_amp reproduces them), and under bf16 the parts kept in fp32 on purpose stay exact."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return use_bf16(precision, device)


def make_optimizer(groups, args, device):
    """AdamW, fused (one kernel for all parameters) wherever this torch supports it, the CPU
    included, so the optimizer code the GPU runs is the one the CPU tests run."""
    try:
        return torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=True)
    except (RuntimeError, ValueError):   # an older torch without fused AdamW on this device
        return torch.optim.AdamW(groups, weight_decay=args.weight_decay)
