"""The copy floor (read the inputs once, write the output's bytes, sync) and the read floor.

Why it exists: a tool that only moves tensors cannot beat the cost of reading its inputs and
writing its output through the page cache and onto the disk. Timing that on the same machine,
in the same benchmark run, turns "recipekit took 12 s" into "recipekit took 1.3x what moving
the bytes costs", which stays comparable across machines and disks.

What it does, as a separate process (so its start-up counts like every tool's): reads every
input file once, front to back, in 16 MiB ``readinto`` chunks (recipekit's copy chunk), writes
each chunk to one output file, and keeps writing the last chunk read until the file holds
``--bytes`` bytes (an upscale writes more than it reads, a merge less); then ``fsync`` of the
file and a global ``sync()``, as the benchmark's method asks.

With ``--no-sync`` the copy floor skips the ``fsync`` and ``sync()``: the *page-cache copy
floor*, what moving the bytes costs without waiting for the disk, whose write speed on a shared
VM moves the synced floor several-fold within an hour (the reference of ``recipekit
--no-fsync``).

The *read floor* (no ``--out``) only reads: every input once, front to back, in the same 16
MiB ``readinto`` chunks, from a process that imports nothing else. It is the reference of the
commands that read every value and write nothing (`inspect`, `diff`, `verify --stats`):
their target is at most 2x the time of reading the bytes (issue 18 item 6).

Usage::

    python bench/floor.py --out OUT_FILE --bytes N INPUT [INPUT ...]   # copy floor
    python bench/floor.py --no-sync --out OUT_FILE --bytes N INPUT ...  # page-cache copy floor
    python bench/floor.py INPUT [INPUT ...]                            # read floor
"""

from __future__ import annotations

import argparse
import os
import sys

CHUNK = 16 * 1024 * 1024


def copy_floor(inputs: list[str], out: str, nbytes: int, *, sync: bool = True) -> int:
    """Read ``inputs`` once and write ``nbytes`` bytes to ``out``; return the bytes read.
    ``sync``: end with ``fsync`` and ``sync()`` (without: the page-cache copy alone)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    read = written = 0
    last = view[:0]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for path in inputs:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    read += n
                    last = view[:n]
                    written += _write(fd, last[:max(0, nbytes - written)])
        while written < nbytes:
            if not last:
                last = view  # no input at all: write zeros
            written += _write(fd, last[:nbytes - written])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync:
        os.sync()
    return read


def read_floor(inputs: list[str]) -> int:
    """Read ``inputs`` once, front to back; return the bytes read."""
    view = memoryview(bytearray(CHUNK))
    read = 0
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                read += n
    return read


def _write(fd: int, data: memoryview) -> int:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Copy- and read-floor references for "
                                     "bench/run.py.")
    parser.add_argument("--out", help="output file to write (without it: the read floor)")
    parser.add_argument("--bytes", type=int, help="bytes to write (with --out)")
    parser.add_argument("--no-sync", action="store_true",
                        help="with --out: no fsync or sync() at the end (the page-cache copy)")
    parser.add_argument("inputs", nargs="+", help="input files, each read once")
    args = parser.parse_args(argv)
    if args.out is None:
        read_floor(args.inputs)
    elif args.bytes is None:
        parser.error("--out needs --bytes")
    else:
        copy_floor(args.inputs, args.out, args.bytes, sync=not args.no_sync)
    return 0


if __name__ == "__main__":
    sys.exit(main())
