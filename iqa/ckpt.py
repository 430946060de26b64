"""Checkpoint files of both trainers: one saver, one loader, the RNG state, an atomic torch.save.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
torch.load(weights_only=True), which cannot run code hidden in a file, reads it back:
{"format", "state_dict", "config", "epoch", "round", "metrics", "code_version", "optimizer",
"rng_state", "best", "early_stopping", "round_complete", ...}. "format" names the system:
SWIN_FORMAT (train_swin.py) or CLIP_FORMAT (train_clip.py, which adds "model_config" and
"label_scales"). Bare model state_dicts (older files) load too.

Every file is written atomically (iqa.files.atomic_write): a full disk or a crash mid-save leaves
the previous file intact, and a failed save is reported and skipped instead of ending the run.
"""
import collections
import math
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch

from iqa.files import atomic_write

SWIN_FORMAT = 'swin-iqa-checkpoint/1'
CLIP_FORMAT = 'clip-iqa-checkpoint/1'
FORMATS = (SWIN_FORMAT, CLIP_FORMAT)
CHECKPOINT_FORMAT = SWIN_FORMAT
BARE_FORMAT = 'bare-state-dict'
LAST_NAME = 'last.pkl'
# keys every loaded checkpoint has (None where the file does not say)
CHECKPOINT_KEYS = ('state_dict', 'config', 'epoch', 'round', 'metrics', 'code_version',
                   'optimizer', 'scheduler', 'rng_state', 'best', 'early_stopping', 'round_complete')
# prefixes that wrappers add to every parameter name: DistributedDataParallel, torch.compile
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


class BestFileName:
    """The name of a best checkpoint, from the two test numbers that describe it (4 decimals,
    found again by `pattern`): best_model_srcc_0.9378_plcc_0.9485.pkl for Swin,
    best_model_srccq_0.8123_srccc_0.7456.pkl for CLIP."""

    def __init__(self, template, finite=True):
        self.template = template
        self.finite = finite   # refuse NaN/inf in the name (the Swin trainer never selects one)
        number = r'(?:-?\d+\.\d{4}|nan)'
        self.pattern = re.compile('^' + re.escape(template).replace(r'\{\}', number) + '$')

    def __call__(self, a, b):
        a, b = float(a), float(b)
        if self.finite and not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f'cannot name a best checkpoint after a non-finite metric: {a}, {b}')
        return self.template.format(f'{a:.4f}', f'{b:.4f}')


SWIN_BEST = BestFileName('best_model_srcc_{}_plcc_{}.pkl')
CLIP_BEST = BestFileName('best_model_srccq_{}_srccc_{}.pkl', finite=False)
BEST_PATTERN = SWIN_BEST.pattern


def best_checkpoint_name(srcc, plcc):
    """'best_model_srcc_0.9378_plcc_0.9485.pkl' (the Swin trainer's name)."""
    return SWIN_BEST(srcc, plcc)


# --------------------------------------------------------------------------- atomic torch.save

def _oserror_in_chain(e):
    """The OSError that caused e, if any (torch wraps it in a RuntimeError, see below)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def atomic_torch_save(obj, path):
    """torch.save(obj, path), atomically: a full disk mid-save leaves the old file intact.

    torch's C++ zip writer turns an OSError raised by the file's write() (e.g. ENOSPC) into
    "RuntimeError: [enforce fail at inline_container.cc] unexpected pos ..."; we re-raise the
    original OSError so callers can tell a full disk from a bug and say so plainly.
    """
    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            cause = _oserror_in_chain(e)
            if cause is None:
                raise
            raise cause from None

    atomic_write(path, write)


# --------------------------------------------------------------------------- RNG state

def capture_rng_state():
    """RNG states of python, numpy and torch (CPU and CUDA) in a weights_only-loadable form.

    numpy's state tuple holds an ndarray, and torch.load(weights_only=True) refuses ndarrays,
    so it is stored as lists/ints; torch's states are uint8 tensors already.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        'python': [py_version, list(py_internal), py_gauss],
        'numpy': [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def gather_rng_states(world_size):
    """capture_rng_state of this process (1 process), or the list of every rank's, in rank order
    (called by every rank: a collective). Each rank draws its own dropout, so each one's state is
    kept for --resume."""
    state = capture_rng_state()
    if world_size == 1:
        return state
    import torch.distributed as dist
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(state, rank=0):
    """Inverse of capture_rng_state / gather_rng_states (for --resume): a list holds one state per
    rank and each rank takes its own (rank 0's where the list is shorter); a single state (1
    process, or a file from before states were kept per rank) goes to every rank. CUDA states are
    restored only when the number of GPUs matches, since a state per device cannot be mapped onto
    a different count."""
    if isinstance(state, (list, tuple)):
        state = state[rank] if rank < len(state) else state[0]
    py_version, py_internal, py_gauss = state['python']
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state['numpy']
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda') or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def check_weights_only_safe(obj, where='checkpoint'):
    """Return a copy of `obj` that torch.load(weights_only=True) can read, or raise TypeError.

    numpy scalars (np.float64 from a metric, np.int64 from an index) are turned into Python
    numbers, since weights_only loading refuses them and the file would not load later. Anything
    else that is not a tensor, number, string, bytes, None, dtype/device/Size or a
    dict/list/tuple of those raises TypeError naming where it sits, e.g.
    "checkpoint['rng_state']['numpy'][1] is a numpy.ndarray", before anything is written.
    """
    if isinstance(obj, np.generic):  # first: np.float64 is also a float
        return obj.item()
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(
            obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[check_weights_only_safe(k, f'{where} key {k!r}')] = check_weights_only_safe(v, f'{where}[{k!r}]')
        if isinstance(out, collections.OrderedDict) and hasattr(obj, '_metadata'):
            out._metadata = obj._metadata  # per-module versions that load_state_dict reads
        return out
    if isinstance(obj, (list, tuple)):
        items = [check_weights_only_safe(v, f'{where}[{i}]') for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f'{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which '
                    f'torch.load(weights_only=True) cannot read back; store tensors, numbers, '
                    f'strings, lists or dicts instead (e.g. array.tolist())')



# --------------------------------------------------------------------------- saving

def _free_space(folder):
    try:
        return f'{shutil.disk_usage(folder).free / 1e9:.1f} GB free on that disk'
    except OSError:
        return 'free space unknown'


def _warn_stderr(message):
    print(message, file=sys.stderr, flush=True)


class CheckpointSaver:
    """Saves best and last checkpoints of one run folder, keeping disk use bounded.

    save_best writes a file named by `best_name` (a BestFileName) and then deletes all but the
    newest `keep` best files (an existing folder's best files count too, so --resume keeps the
    limit). save_last writes last.pkl (the training state for --resume), replacing the previous one.
    Every file gets "format": `fmt`.

    A save that fails with OSError (a full disk, a quota, an I/O error) is reported through
    `warn` (default: stderr) and returns None: the previous files are intact and loadable, and
    training continues, because losing one checkpoint is better than losing the whole run.
    Other exceptions (e.g. TypeError for content that could not be loaded back) are bugs and raise.
    """

    def __init__(self, run_dir, keep=1, warn=None, fmt=SWIN_FORMAT, best_name=SWIN_BEST):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f'keep must be an integer >= 1 (how many best checkpoints to keep), got {keep!r}')
        if fmt not in FORMATS:
            raise ValueError(f'unknown checkpoint format {fmt!r}; one of {FORMATS}')
        self.run_dir = os.fspath(run_dir)
        self.keep = keep
        self.warn = warn or _warn_stderr
        self.format = fmt
        self.best_name = best_name
        self.errors = []  # one message per failed save, e.g. for summary.json
        os.makedirs(self.run_dir, exist_ok=True)
        found = [os.path.join(self.run_dir, f) for f in os.listdir(self.run_dir) if best_name.pattern.match(f)]
        # the best files this saver manages, oldest first; the retention deletes from the front.
        self.best_paths = sorted(found, key=os.path.getmtime)

    @property
    def best_path(self):
        """Path of the newest best checkpoint, or None."""
        return self.best_paths[-1] if self.best_paths else None

    @property
    def last_path(self):
        """Path of last.pkl if it exists, else None."""
        path = os.path.join(self.run_dir, LAST_NAME)
        return path if os.path.exists(path) else None

    def _save(self, checkpoint, path, previous):
        if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
            raise ValueError(f'a checkpoint must be a dict with a "state_dict" key, got '
                             f'{type(checkpoint).__name__}' + (f' with keys {sorted(checkpoint)}'
                                                               if isinstance(checkpoint, dict) else ''))
        checkpoint = check_weights_only_safe({'format': self.format, **checkpoint})
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as e:
            reason = e.strerror or str(e)
            message = (f'could not save checkpoint {path}: {reason} ({_free_space(self.run_dir)}); '
                       f'{previous}; training continues')
            self.errors.append(message)
            self.warn(message)
            return None
        return path

    def save_best(self, checkpoint, a, b):
        """Write a new best checkpoint named after the two test numbers (Swin: srcc, plcc; CLIP:
        srcc_q, srcc_c); return its path, or None if it failed."""
        path = os.path.join(self.run_dir, self.best_name(a, b))
        previous = (f'the previous best {self.best_path} is intact' if self.best_path
                    else 'there is no earlier best checkpoint')
        if self._save(checkpoint, path, previous) is None:
            return None
        # same name again (an improvement below 4 decimals) replaced the file: do not delete it
        self.best_paths = [p for p in self.best_paths if p != path] + [path]
        for old in self.best_paths[:-self.keep]:
            try:
                os.remove(old)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.warn(f'could not delete old best checkpoint {old}: {e.strerror or e}')
                continue
            self.best_paths.remove(old)
        return path

    def save_last(self, checkpoint):
        """Write last.pkl (full training state); return its path, or None if it failed."""
        path = os.path.join(self.run_dir, LAST_NAME)
        previous = (f'the previous {path} is intact' if os.path.exists(path)
                    else f'there is no earlier {LAST_NAME}')
        return self._save(checkpoint, path, previous)


def save_epoch(saver, checkpoint, *, best, improved, name_keys, selection, log, optimizer, bad_epochs, state,
               round_complete, rng_state=None, **extra):
    """Save one epoch of either trainer: a new best checkpoint when the epoch improved (named after
    best[k] for k in name_keys; its path goes into `best`), then last.pkl with the training state
    --resume needs, plus `extra`. round_complete: the round ended with this epoch (early stop or its
    last epoch), so --resume from this file starts the next round instead of running this one past
    its end and overwriting its best checkpoint. rng_state: gather_rng_states' result (default:
    this process's state)."""
    if improved:
        path = saver.save_best(checkpoint, *(best[k] for k in name_keys))
        if path is not None:
            best['checkpoint'] = path
            log(f'  new best ({selection}) saved: {path}')
    checkpoint.update(optimizer=optimizer.state_dict(), rng_state=rng_state or capture_rng_state(), best=best,
                      early_stopping={'bad_epochs': bad_epochs}, rounds=state['rounds'],
                      round_complete=bool(round_complete),
                      train_seconds=time.time() - state['start_time'] + state.get('seconds_before', 0.0), **extra)
    saver.save_last(checkpoint)


# --------------------------------------------------------------------------- loading

def _is_state_dict(obj):
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def strip_wrapper_prefixes(state_dict):
    """Remove 'module.' (DistributedDataParallel) and '_orig_mod.' (torch.compile) from keys.

    A prefix is stripped only when *every* key has it, so a model with a real submodule called
    'module' is left alone. Repeats, so 'module._orig_mod.' goes too. The state_dict's
    _metadata (per-module versions that load_state_dict reads) is renamed the same way.
    """
    for _ in range(4):  # at most a couple of nested wrappers in practice
        prefix = next((p for p in _WRAPPER_PREFIXES
                       if state_dict and all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        metadata = getattr(state_dict, '_metadata', None)
        state_dict = collections.OrderedDict((k[len(prefix):], v) for k, v in state_dict.items())
        if metadata is not None:
            renamed = collections.OrderedDict()
            for k, v in metadata.items():
                if k == prefix[:-1]:
                    renamed[''] = v  # the wrapped model's own root entry
                elif k.startswith(prefix):
                    renamed[k[len(prefix):]] = v
                # else: the wrapper's root entry, meaningless for the bare model
            state_dict._metadata = renamed
    return state_dict


_EXPECTED = ('expected a checkpoint saved by train_swin.py or train_clip.py (a dict with "format": '
             f'"{SWIN_FORMAT}" or "{CLIP_FORMAT}") or a bare model state_dict (parameter name -> tensor)')


def load_checkpoint(path, map_location='cpu', weights_only=True):
    """Load a checkpoint file as a dict with every key of CHECKPOINT_KEYS plus 'format' and 'path'.

    Accepts this project's format and the user's old files: a bare state_dict, or one wrapped as
    {'model': sd} / {'state_dict': sd} / {'model_state_dict': sd}. Keys missing from the file are
    None ('config' None means: infer the model from the weights, models_swin.infer_model_config).
    'format' is SWIN_FORMAT, CLIP_FORMAT or BARE_FORMAT. Wrapper prefixes are stripped from state_dict.
    CLIP files written before the shared saver kept the early-stopping count as 'bad_epochs'; it is
    returned as 'early_stopping' like every other file's.

    weights_only=True (default) refuses files holding arbitrary Python objects, because unpickling
    those can run code. Every file this project or the user's train_swin.py wrote loads this way;
    pass weights_only=False only for a file you trust that needs it (the error tells you).
    Raises FileNotFoundError for a missing file, ValueError naming the path for anything else.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if os.path.isdir(path):
        raise ValueError(f'{path} is a folder; {_EXPECTED} (in a run folder: best_model_srcc_*.pkl or {LAST_NAME})')
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        detail = str(e)
        unsupported = re.search(r'Unsupported global: GLOBAL (\S+)', detail)
        if unsupported:
            raise ValueError(
                f'{path} contains a Python object ({unsupported.group(1)}) that '
                f'torch.load(weights_only=True) refuses, because unpickling it can run code; if '
                f'you trust this file, load it with load_checkpoint(path, weights_only=False)') from None
        first_line = detail.strip().splitlines()[0] if detail.strip() else type(e).__name__
        raise ValueError(f'could not read {path} ({os.path.getsize(path)} bytes): it is truncated, '
                         f'corrupt or not a PyTorch file ({type(e).__name__}: {first_line[:200]}); '
                         f'{_EXPECTED}') from None

    if isinstance(obj, dict) and isinstance(obj.get('format'), str):
        fmt = obj['format']
        if fmt not in FORMATS:
            raise ValueError(f'{path} has checkpoint format {fmt!r}; this code reads '
                             f'{" and ".join(map(repr, FORMATS))} and bare state_dicts')
        if not _is_state_dict(obj.get('state_dict')):
            raise ValueError(f'{path} says format {fmt!r} but its "state_dict" is '
                             f'not a dict of parameter name -> tensor')
        out = {k: obj.get(k) for k in CHECKPOINT_KEYS}
        out.update({k: v for k, v in obj.items() if k not in out})
        if out['early_stopping'] is None and obj.get('bad_epochs') is not None:
            out['early_stopping'] = {'bad_epochs': obj['bad_epochs']}
    elif _is_state_dict(obj):
        out = dict.fromkeys(CHECKPOINT_KEYS)
        out['state_dict'] = obj
        fmt = BARE_FORMAT
    else:
        inner = None
        if isinstance(obj, dict):
            inner = next((k for k in ('state_dict', 'model', 'model_state_dict')
                          if _is_state_dict(obj.get(k))), None)
        if inner is None:
            what = (f'a dict with keys {sorted(map(str, obj))[:10]}' if isinstance(obj, dict)
                    else f'a {type(obj).__name__}')
            raise ValueError(f'{path} holds {what}, not a checkpoint; {_EXPECTED}')
        # a wrapped old file: keep what it says about itself, the rest stays None
        out = dict.fromkeys(CHECKPOINT_KEYS)
        out.update({k: obj[k] for k in ('epoch', 'config', 'optimizer', 'metrics') if k in obj})
        out['state_dict'] = obj[inner]
        fmt = BARE_FORMAT
    out['format'] = fmt
    out['state_dict'] = strip_wrapper_prefixes(out['state_dict'])
    out['path'] = path
    return out


def restore_training_state(resume, model, optimizer, rank=0):
    """Load a last.pkl's model, optimizer and this rank's RNG state into this process, for --resume.
    Returns (epochs done, best record, epochs without improvement)."""
    model.load_state_dict(resume['state_dict'])
    optimizer.load_state_dict(resume['optimizer'])
    restore_rng_state(resume['rng_state'], rank)
    return resume['epoch'], resume['best'], (resume['early_stopping'] or {}).get('bad_epochs', 0)
