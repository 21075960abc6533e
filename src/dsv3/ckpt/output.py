"""One discipline for every directory dsv3 writes a model into (`dsv3 convert`, `fp8-cast-bf16`,
`quantize-fp8`, and what later writers produce): the output is whole or absent, never a mix, and nothing
that dsv3 did not write is deleted.

    with model_output(out, inputs=[src], overwrite=args.overwrite, writer="convert") as tmp:
        ...write every file of the new model into tmp...

- The new model is written into a hidden sibling directory (`.NAME.partial.XXXX`), and a record of what was
  written (`.dsv3-output.json`: the writer and the file names) goes in last. Only then does it take the
  output's place: with one atomic exchange of the two directories where the kernel offers it (Linux
  `renameat2(RENAME_EXCHANGE)`), so a kill at any moment leaves the output as the old model or the new one.
  Elsewhere two renames, with the old directory put back by the next writer if a kill fell between them.
- An output that is not empty and holds no such record (not ours) is refused unless `overwrite` is given.
  Either way, the old directory's files that are not its model (anything but model*.safetensors, their index
  and what the record lists: a LoRA adapter, notes) are carried into the new one. The model's weight files
  are not: they are the model being replaced.
- An output that is an input, lies inside one, or contains one (paths resolved, symlinks followed) is
  refused: the input is read while the output is written.
- Left-overs of killed writers for this output (`.NAME.partial.*`, `.NAME.old.*`) are removed the next time
  one writes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

from .io import _umask, fsync_dir
from .pretrained import INDEX, MODEL_WEIGHTS

RECORD = ".dsv3-output.json"


class OutputError(ValueError):
    """An output directory that may not be written as asked."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_paths(output: str, inputs: Iterable[str]) -> None:
    """Refuse an output that is an input, lies inside one or contains one (resolved paths)."""
    out = os.path.realpath(output)
    for inp in inputs:
        src = os.path.realpath(inp)
        if _inside(out, src) or _inside(src, out):
            what = "is" if out == src else ("lies inside" if _inside(out, src) else "contains")
            raise OutputError(f"the output {output!r} {what} the input {inp!r} (resolved: {out} and {src}): the "
                              "input is read while the output is written; choose another output directory")


def read_record(path: str) -> dict | None:
    """The record of a directory dsv3 wrote, or None (not ours, or written before records existed)."""
    try:
        with open(os.path.join(path, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), list) else None


def _is_weights(name: str) -> bool:
    """A model's weights (what a new model replaces): model.safetensors, its shards and index. Other
    .safetensors files (a LoRA adapter's) are not."""
    return bool(MODEL_WEIGHTS.match(name)) or name in (INDEX, RECORD)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE). -> False where not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or filesystem without the exchange
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _leftovers(parent: str, name: str) -> tuple[list[str], list[str]]:
    partial = [os.path.join(parent, d) for d in os.listdir(parent) if d.startswith(f".{name}.partial.")]
    old = [os.path.join(parent, d) for d in os.listdir(parent) if d.startswith(f".{name}.old.")]
    return partial, old


def _recover(final: str) -> None:
    """Clean up after killed writers of `final`: an old model renamed aside with no new one in place is put
    back; partial outputs and replaced models are removed."""
    parent, name = os.path.split(final)
    partial, old = _leftovers(parent, name)
    if not os.path.lexists(final) and old:
        os.rename(max(old, key=os.path.getmtime), final)
        partial, old = _leftovers(parent, name)
    for d in partial + old:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def model_output(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 writer: str = "dsv3") -> Iterator[str]:
    """Write a model directory whole or not at all (see the module's docstring): yields the directory to
    write into; on leaving the block without an error, puts it in place of `path`."""
    path = os.fspath(path)
    check_paths(path, [os.fspath(i) for i in inputs])
    final = os.path.realpath(path)  # the very path the check resolved (`link/../x` is not `x` here)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    with _lock(parent, name, path):
        yield from _write(path, final, parent, name, overwrite, writer)


@contextlib.contextmanager
def _lock(parent: str, name: str, path: str) -> Iterator[None]:
    """One writer at a time per output (an advisory lock on `.NAME.lock` beside it, kept: removing a lock
    file races with the next writer's open): a second one is refused at once, not left to undo the first."""
    fd = os.open(os.path.join(parent, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # (no flock: Windows)
            pass
        except OSError:
            raise OutputError(f"another process is writing {path!r} right now; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def _write(path: str, final: str, parent: str, name: str, overwrite: bool, writer: str) -> Iterator[str]:
    if os.path.ismount(final):  # refused before anything is written, not when the swap fails at the end
        raise OutputError(f"the output {path!r} is a mount point: a new model is written beside its output and "
                          "swapped in, which cannot cross filesystems; write into a directory inside it")
    _recover(final)
    if os.path.exists(final) and not os.path.isdir(final):
        raise OutputError(f"the output {path!r} exists and is not a directory")
    old_entries = sorted(os.listdir(final)) if os.path.isdir(final) else []
    old_record = read_record(final) if old_entries else None
    if old_entries and old_record is None and not overwrite:
        shown = ", ".join(old_entries[:4]) + (", ..." if len(old_entries) > 4 else "")
        raise OutputError(f"the output {path!r} is not empty ({shown}) and was not written by dsv3: choose an "
                          "empty or new directory, or pass --overwrite to replace the model in it (its other "
                          "files are kept)")
    ours_before = set(old_record["files"]) if old_record else set()
    staging = tempfile.mkdtemp(prefix=f".{name}.partial.", dir=parent)
    try:
        yield staging
        written = sorted(os.listdir(staging))
        # what the old directory held that is not a model's (not weights, not what we wrote): carried along,
        # hard-linked so that the old directory stays whole until the swap
        for entry in old_entries:
            if entry in written or entry in ours_before or _is_weights(entry):
                continue
            src, dst = os.path.join(final, entry), os.path.join(staging, entry)
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
        with open(os.path.join(staging, RECORD), "w", encoding="utf-8") as f:
            json.dump({"writer": writer, "files": written}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staging, 0o777 & ~_umask())
        fsync_dir(staging)
        if not os.path.isdir(final):
            os.rename(staging, final)
        elif _exchange(staging, final):
            shutil.rmtree(staging, ignore_errors=True)  # (the old model, now under the staging name)
        else:
            aside = tempfile.mkdtemp(prefix=f".{name}.old.", dir=parent)
            os.rmdir(aside)
            os.rename(final, aside)
            os.rename(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
