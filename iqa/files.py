"""Atomic file writes: a crash or a full disk leaves the previous file as it was, never half a file.

Every file is written to a temp file in the same folder, flushed and fsync'ed, then os.replace'd over
the target. This module imports neither torch nor numpy, so the SLURM bookkeeping on a login node
uses the same writer as the trainers.
"""
import csv
import io
import json
import math
import os
import secrets


def _fsync_dir(folder):
    """fsync a folder so the rename itself survives a power cut (POSIX only; best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory; the data is already safe
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call write(file) on a temp file next to `path`, then move it over `path`.

    The temp file is in the same folder so os.replace is an atomic rename on one filesystem.
    It is created with O_EXCL and mode 0o666 so the umask gives it the same permissions as a
    normal open() (tempfile.mkstemp would make it 0o600). On any exception, including
    KeyboardInterrupt, the temp file is removed, `path` is untouched and the exception propagates.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    while True:
        tmp = os.path.join(folder, f'.{name}.{secrets.token_hex(4)}.tmp')
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with open(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path, data):
    """Write bytes to `path` atomically (all or nothing; see `atomic_write`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        # bytes(5) would silently write five zero bytes
        raise TypeError(f'data for {path} must be bytes, got {type(data).__name__}')
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    """Write a str to `path` atomically, UTF-8 (the user's notes and logs contain Chinese)."""
    atomic_write_bytes(path, text.encode('utf-8'))


def _json_safe(obj):
    """numpy scalars/arrays -> Python numbers/lists, NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, 'tolist') and type(obj).__module__ == 'numpy':   # ndarray and numpy scalars
        return _json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path, obj):
    """Write `obj` as indented JSON atomically, with a trailing newline.

    NaN and inf become null: Python's json would write the bare word NaN, which jq, JavaScript
    and most JSON readers reject. numpy scalars/arrays are converted. The object is serialised
    before the file is opened, so an unserialisable value never touches the disk.
    """
    text = json.dumps(_json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + '\n')


def atomic_write_csv(path, columns, rows):
    """A per-epoch CSV (metrics.csv, training_log.csv) in `columns` order, written whole each
    epoch so a crash never leaves half a row; None is written as an empty cell."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator='\n', extrasaction='ignore')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if row.get(k) is None else row[k]) for k in columns})
    atomic_write_text(path, buf.getvalue())
