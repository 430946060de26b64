"""Process-level set-up shared by the training and evaluation scripts.

train_swin.py, train_clip.py and cross_dataset_test.py all need the same few things before any
model exists: a command-line parser that refuses misspelt flags, the device and precision, the
distributed process group torchrun asks for, seeding, a console copied into logs/<run>.log, and
whether the model hub can be reached at all.
"""
import argparse
import difflib
import io
import os
import platform
import random
import socket
import sys
import urllib.parse

import numpy as np
import torch
import torch.distributed as dist

from iqa.data.placement import canonical_device
from iqa.data.registry import DataError
from iqa import runs


class UsageError(Exception):
    """A bad flag, file or data set named on the command line; main() prints it and exits 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where the text already explains them or there is none."""

    def _get_help_string(self, action):
        if action.default in (None, False) or 'default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


class SuggestingParser(argparse.ArgumentParser):
    """argparse that refuses unknown flags with a "did you mean" hint: a misspelt flag must stop
    the run, not be ignored (``--no_multi_scale`` for ``--no_multiscale``)."""

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


def resolve_device(flag):
    """torch.device for --device; 'auto' picks CUDA when there is one."""
    if flag == 'auto':
        return canonical_device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(flag)
    except RuntimeError as err:
        raise UsageError(f'--device {flag}: {err}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {flag}: this machine has no usable CUDA GPU (try --device cpu)')
    return canonical_device(device)   # 'cuda' -> cuda:0: compared with tensors' devices


def device_name(device):
    """The GPU's or CPU's model name: timings mean little without it."""
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), name)
    except OSError:
        pass  # not Linux
    return f'CPU {name}, {torch.get_num_threads()} threads'


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


def idle_gpus_warning(visible_gpus, world_size):
    """The warning for a run that leaves GPUs idle (more visible than processes), else None.

    `python train_swin.py` on a 2-GPU machine trains on cuda:0 alone; only torchrun starts one
    process per GPU, so the message says how."""
    if visible_gpus <= world_size:
        return None
    return (f'{visible_gpus} GPUs are visible but {world_size} process{"es" * (world_size != 1)} run'
            f'{"s" * (world_size == 1)}, so {visible_gpus - world_size} GPU(s) stay idle. To use all of them: '
            f'torchrun --nproc_per_node {visible_gpus} <script> ...; to use one on purpose, '
            'set CUDA_VISIBLE_DEVICES=<id>.')


def warn_idle_gpus(device, world_size, warn):
    """Start-up check of both trainers: idle_gpus_warning on a CUDA device, passed to `warn`."""
    if device.type == 'cuda':
        message = idle_gpus_warning(torch.cuda.device_count(), world_size)
        if message:
            warn(message)


def gather_to_all(array, world_size):
    """Concatenate a numpy array from every rank, in rank order (identity for 1 process)."""
    if world_size == 1:
        return array
    parts = [None] * world_size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def to_device(tensor, device):
    """A host tensor on `device` without a blocking copy: on CUDA it is pinned and copied
    asynchronously (a copy from pageable memory waits for the GPU's queue to drain first)."""
    if torch.device(device).type != 'cuda' or tensor.device.type == 'cuda':
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def broadcast_buffers(module, world_size):
    """Copy rank 0's buffers (BatchNorm statistics) to every rank (nothing for 1 process), as the
    DDP wrapper's forward does, so a module evaluated unwrapped scores alike on every rank."""
    if world_size == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def average_gradients(params, world_size):
    """Average the gradients of `params` over the processes (identity for 1 process): after it every
    rank holds the gradient of the whole batch and takes the same optimizer step. Parameters without
    a gradient (unused by the model's forward) have none on every rank and are left alone."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_rank(seed, rank):
    """Give each rank its own random stream (dropout, DropPath) once the model is built, which
    must stay identical on every rank. Rank 0 keeps the stream `seed` started, so one process
    draws what it always drew."""
    if rank > 0:
        seed_everything(seed + 100_003 * rank)


class Tee(io.TextIOBase):
    """Send console output to the terminal and to logs/<run>.log as well.

    `log_file` None keeps the text in memory until `open_log` names the file: a run writes no log
    before its data check passed, yet the log then starts at the run's first line."""

    def __init__(self, stream, log_file=None):
        self.stream, self.log_file = stream, log_file if log_file is not None else io.StringIO()

    def open_log(self, path):
        """Start writing to `path` (appending), with what was printed so far; returns the file."""
        held = self.log_file.getvalue() if isinstance(self.log_file, io.StringIO) else ''
        log_file = open(path, 'a', encoding='utf-8')
        log_file.write(held)
        log_file.flush()
        self.log_file = log_file
        return log_file

    def write(self, text):
        self.stream.write(text)
        self.log_file.write(text)
        self.log_file.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        self.log_file.flush()


def capture_console():
    """Copy stdout and stderr into one in-memory log until `open_run` names its file; returns the
    console streams for `release_console`."""
    held = io.StringIO()
    console = (sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = Tee(console[0], held), Tee(console[1], held)
    return console


def open_run(output_dir, log_dir, run_name, run_dir=None, rank=0, world=1):
    """Create the run folder (a resumed run passes its `run_dir`) and logs/<run>.log, which starts
    with everything printed so far. Called once the data check passed, so a run that stops
    before has neither. Every rank returns rank 0's (run_dir, run_name)."""
    if rank == 0:
        if run_dir is None:
            run_dir, run_name = runs.make_run_dir(output_dir, run_name)
        os.makedirs(log_dir, exist_ok=True)
        sys.stderr.log_file = sys.stdout.open_log(os.path.join(log_dir, f'{run_name}.log'))
    if world > 1:
        names = [run_dir, run_name]
        dist.broadcast_object_list(names, src=0)
        run_dir, run_name = names
    return run_dir, run_name


def release_console(console):
    """Put back the console streams of `capture_console` and close the log file, if one was opened."""
    log_file = getattr(sys.stdout, 'log_file', None)
    sys.stdout, sys.stderr = console
    if log_file is not None and not isinstance(log_file, io.StringIO):
        log_file.close()


def rank_log(rank):
    """log(message) for the trainers: printed (and so logged) by rank 0 only, flushed at once."""
    def log(message):
        if rank == 0:
            print(message, flush=True)
    return log


def log_warnings(log, warnings, ignored):
    """The flag warnings of check_args, and the flags a resumed run ignores."""
    for message in warnings:
        log(f'WARNING: {message}')
    if ignored:
        log('note: resuming uses the run\'s stored configuration; ignored: ' + ', '.join(f'--{k}' for k in ignored))


def stop_run(err, log):
    """A run stopped by bad data (DataError) or missing pretrained weights: say so, exit status 2."""
    log(f'DATA ERROR: {err}' if isinstance(err, DataError) else f'ERROR: {err}')
    raise SystemExit(2)


def end_run(console, world_size):
    """Put the console back (rank 0: `console` from capture_console) and leave the process group."""
    if console is not None:
        release_console(console)
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def use_bf16(precision, device):
    """--precision -> whether bf16 autocast is on (auto: on CUDA only)."""
    return precision == 'bf16' or (precision == 'auto' and device.type == 'cuda')


def set_precision(precision, device):
    """Process-wide numerics for --precision; returns whether bf16 autocast is on.

    On CUDA, TF32 matrix multiplies are off in both modes: fp32 then means fp32 for the
    transformer's matmuls (the original code's numerics, so --no_amp reproduces them), and under
    bf16 the parts kept in fp32 on purpose stay exact. cuDNN's TF32 convolutions stay on, torch's
    default, as the original ran them (ResNet-50 loses much of its speed without them)."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
    return use_bf16(precision, device)


def make_optimizer(groups, args, device):
    """AdamW, fused (one kernel for all parameters) wherever this torch supports it, the CPU
    included, so the optimizer code the GPU runs is the one the CPU tests run."""
    try:
        return torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=True)
    except (RuntimeError, ValueError):   # an older torch without fused AdamW on this device
        return torch.optim.AdamW(groups, weight_decay=args.weight_decay)


PROXY_VARIABLES = ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY', 'all_proxy')


def hub_unreachable():
    """True when the model hub's host name does not resolve and no proxy would resolve it.

    On an offline node huggingface_hub retries a failed request five times with back-off (about
    45 s). A failed name lookup is immediate and means no request can succeed, so the callers then
    put the hub client in offline mode (the local cache still serves weights downloaded earlier)
    and the way-out message comes at once.
    """
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    import huggingface_hub.constants as hub
    host = urllib.parse.urlparse(hub.ENDPOINT).hostname
    if not host:
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False
