"""Logging setup: one logger per module, level from $P2PTRAIN_LOGLEVEL; user-facing
output goes through click.echo, never through logging."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("P2PTRAIN_LOGLEVEL", "WARNING")).upper()
    # read by hivemind when it is first imported: its INFO lines are not for users
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "DEBUG" if level == "DEBUG" else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("p2ptrain").setLevel(level)
    # progress of long operations (state downloads) is for users: shown unless they ask for less
    from p2ptrain.swarm.progress import PROGRESS_LOGGER
    if logging.getLevelName(level) == logging.WARNING:
        logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)
    # hivemind under torch 2.13 warns about torch.jit.script at import; not actionable for users
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="hivemind")
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    if level != "DEBUG":
        for noisy in ("hivemind", "bitsandbytes", "asyncio"):
            logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING)
                                              if isinstance(logging.getLevelName(level), int) else logging.WARNING)
