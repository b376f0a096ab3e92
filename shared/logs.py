"""Third-party output that says nothing about the user's models, dropped at the source.

transformers' config `__repr__` (evaluated for an info line even when info is off) builds a
default-constructed config of the same class to diff against; for Idefics3 / SmolVLM that default
fails transformers' own token-id validation and warns "pad_token_id must be ... (between 0 and
31999), got 128002" on every command, about a config nobody loaded. Warnings raised inside that
default construction are dropped; the same warning about a loaded model's config still shows.
"""

from __future__ import annotations

import logging
import sys


class _DefaultConfigNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or "must be `None` or an integer within" not in record.getMessage():
            return True
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "to_diff_dict":
                return False
            frame = frame.f_back
        return True


def install() -> None:
    """Idempotent. Also turns off transformers' per-file "Loading weights" / "Writing model shards"
    bars: lmod's own bars say what runs, and nested bars leave escape codes in logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _DefaultConfigNoise) for f in logger.filters):
        logger.addFilter(_DefaultConfigNoise())


class _LocalRayAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def quiet_local_ray() -> None:
    """For a Ray cluster lmod starts and stops itself: Ray's notice that token authentication is
    on by default (printed at every start) is dropped; token authentication stays on."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _LocalRayAuthNotice) for f in logger.filters):
        logger.addFilter(_LocalRayAuthNotice())
