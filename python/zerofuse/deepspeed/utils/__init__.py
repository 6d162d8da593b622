"""deepspeed.utils: the logger, log_dist and RepeatingLoader (and
zero_to_fp32 as a submodule)."""
import logging
import os
import sys

from ...runtime.dataloader import RepeatingLoader


def _make_logger():
    log = logging.getLogger("DeepSpeed")
    if not log.handlers:
        handler = logging.StreamHandler(stream=sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] "
                                               "%(message)s"))
        log.addHandler(handler)
        log.setLevel(os.environ.get("DS_LOG_LEVEL", "INFO").upper())
        log.propagate = False
    return log


logger = _make_logger()


def _dist_message(message, ranks):
    """DeepSpeed's rule: "[Rank r] message" when there is no process group, or
    this rank is in `ranks` (ranks=[-1]: every rank); None otherwise."""
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else -1
    ranks = ranks or []
    should = not initialized or (ranks and (ranks[0] == -1 or rank in set(ranks)))
    return f"[Rank {rank}] {message}" if should else None


def log_dist(message, ranks=None, level=logging.INFO):
    text = _dist_message(message, ranks)
    if text is not None:
        logger.log(level, text)


def print_dist(message, ranks=None):
    text = _dist_message(message, ranks)
    if text is not None:
        print(text)


_logged_once = set()


def log_dist_once(message, ranks=None, level=logging.INFO):
    key = (message, tuple(ranks) if ranks else None, level)
    if key not in _logged_once:
        _logged_once.add(key)
        log_dist(message, ranks, level)


logger.log_dist_once = log_dist_once


def set_log_level_from_string(log_level, custom_logger=None):
    (custom_logger or logger).setLevel(log_level.upper())


__all__ = ["RepeatingLoader", "log_dist", "log_dist_once", "logger", "print_dist", "set_log_level_from_string"]
