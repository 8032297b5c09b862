"""Progress bars: one per wait. A stage's library loops draw their own (extraction, fitting, scoring);
a tool with a bar of its own (predict, the demo) asks the library for none, so its bar is the only one."""
from __future__ import annotations

from tqdm import tqdm


def progress_bar(iterable=None, *, show: bool = True, **options) -> tqdm:
    """tqdm(iterable, **options), or the same without drawing when `show` is False. (disable=False is
    never passed: an explicit value would override TQDM_DISABLE, which the tests and benches set.)"""
    return tqdm(iterable, **options) if show else tqdm(iterable, disable=True, **options)
