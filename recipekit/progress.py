"""The one progress bar: bytes written, with rate and ETA (tqdm), and one off switch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def byte_progress(total: int, *, disable: bool = False, desc: str = "writing"
                  ) -> Iterator[Callable[[int], None]]:
    """Yield a callback that advances a bytes bar (on stderr); silent when ``disable`` or not
    a TTY."""
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              disable=disable or None, dynamic_ncols=True, leave=False) as bar:
        yield bar.update
