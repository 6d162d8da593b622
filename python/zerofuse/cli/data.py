"""Text corpora for `zerofuse train`, as bytes (a byte-level model needs no
tokenizer and no download): by default the Python standard library's source
files of the interpreter running it; or a text file / directory of text files.
The split is deterministic: every 20th file (in sorted order) is validation,
or the last 5% of a single file."""
import os
import sysconfig

import torch

MAX_BYTES = 64 * 1024 * 1024  # more than enough for the models `zerofuse train` makes


class DataError(ValueError):
    """A problem with --data, reported as one line."""


def _text_files(root):
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
                             and not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return files


def _read(path):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return None if b"\0" in data[:8192] else data  # binary files are not text


def stdlib_sources():
    root = sysconfig.get_paths()["stdlib"]
    return [p for p in _text_files(root) if p.endswith(".py")]


def load_corpus(path=None):
    """(train bytes, validation bytes, description) as uint8 tensors."""
    if path is None:
        files, where = stdlib_sources(), f"the Python standard library ({sysconfig.get_paths()['stdlib']})"
    elif os.path.isfile(path):
        data = _read(path)
        if not data:
            raise DataError(f"--data {path} is empty or not a text file")
        cut = max(1, int(len(data) * 0.95))
        return _bytes(data[:cut]), _bytes(data[cut:]), f"{path} ({len(data):,} bytes)"
    elif os.path.isdir(path):
        files, where = _text_files(path), path
    else:
        raise DataError(f"--data {path} does not exist")
    train, val, total = [], [], 0
    for i, f in enumerate(files):
        data = _read(f)
        if not data:
            continue
        (val if i % 20 == 0 else train).append(data)
        total += len(data)
        if total >= MAX_BYTES:
            break
    if not train:
        raise DataError(f"{where} contains no text files")
    if not val:  # a handful of files: take the last one for validation
        val.append(train.pop())
        if not train:
            train, val = [val[0][: len(val[0]) * 19 // 20]], [val[0][len(val[0]) * 19 // 20:]]
    return _bytes(b"\n".join(train)), _bytes(b"\n".join(val)), f"{where}: {len(files):,} files, {total:,} bytes"


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def sample_batch(data: torch.Tensor, rows: int, context: int, seed: int, step: int):
    """`rows` windows of context + 1 bytes at offsets drawn from (seed, step):
    the same global batch whatever the number of processes."""
    if data.numel() < context + 2:
        raise DataError(f"the data ({data.numel()} bytes) is shorter than one window of {context + 1} bytes; "
                        "use more data or a smaller --context")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - context - 1, (rows,), generator=g)
    windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]
