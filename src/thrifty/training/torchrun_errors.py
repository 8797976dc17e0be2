"""How a process of a torchrun job reports that it stopped, so the user reads one message.

When one rank stops with a clear error (output_dir in use, a full disk, bad data), the
others learn of it only as a broken connection in their next collective: gloo raises a
RuntimeError "Connection closed by peer", and each rank printed a 25-line traceback
after the real message. Here such a rank prints one line that points at the message.

torchrun then prints its own summary last, whose "Root Cause" shows what the failed
rank wrote to TORCHELASTIC_ERROR_FILE ("To enable traceback see ..." without one): every
rank records its one line there, so the summary's root cause is the first rank's own
message. Nothing here imports torch: the CLI starts without it.
"""

from __future__ import annotations

import json
import os
import time

# What gloo's (and the TCP store's) errors say when another process of the job is gone.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def rank_label() -> str:
    """" (rank R)" under torchrun with more than one process, else ""."""
    return f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def another_rank_failed(error: BaseException) -> bool:
    """Whether `error` is this rank's collective breaking because another rank stopped."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(error, RuntimeError):
        return False
    return type(error).__module__.startswith("torch.distributed") or any(s in str(error) for s in PEER_GONE)


def peer_failure_line() -> str:
    return (f"error{rank_label()}: stopped because another process of this torchrun job stopped; "
            "its message is above.")


def record_for_torchrun(line: str, consequence: bool = False) -> None:
    """Write `line` where torchrun's failure summary reads it (no-op outside torchrun).
    The summary's root cause is the record with the earliest timestamp, in whole seconds:
    a consequence of another rank's failure is stamped a second later, so it never ties."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()) + int(consequence))
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": stamp}}}
    try:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(data, file)
    except OSError:
        pass  # the summary then says less; the message itself was printed already
