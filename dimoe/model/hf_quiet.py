"""Silence transformers' own reporting around loads and saves whose outcome this library checks.

`save_pretrained` draws a "Writing model shards" progress bar and `from_pretrained` prints a
load report table (e.g. every unused text-tower weight when the vision half of a SigLIP is read);
in `make demo` and in Ray worker logs both are noise. Callers that silence a load check its
missing keys themselves (`output_loading_info=True`), so nothing a user must see is hidden.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off inside the block, restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
