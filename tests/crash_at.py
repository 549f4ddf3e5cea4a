"""`python tests/crash_at.py MODULE ATTRIBUTE N rs5m-arguments...`: runs the rs5m CLI, but ends the whole
process with os._exit(137) on the N-th call of MODULE.ATTRIBUTE ("Class.method" works too). os._exit runs no
finally blocks, flushes nothing and leaves temporaries behind, as a SIGKILL or a lost machine would, but at an
exact point of the code, which a signal from outside cannot aim at."""

from __future__ import annotations

import functools
import importlib
import os
import sys

from rs5m.cli import main


def crash_on_call(module_name: str, attribute: str, nth: int) -> None:
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def crashing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            os._exit(137)
        return original(*args, **kwargs)

    setattr(owner, name, crashing)


if __name__ == "__main__":
    crash_on_call(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    sys.exit(main(sys.argv[4:]))
