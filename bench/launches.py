"""Which launches a benchmark's calls took: the Hopper launchers return False where they decline (the Triton kernel
runs instead), and a benchmark of a Hopper kernel must say which kernel it timed."""
from __future__ import annotations


def record_launches(module, name: str) -> list:
    """Replace ``module.name`` (a launcher) by a wrapper that appends each call's return to the returned list."""
    launches = []
    real = getattr(module, name)

    def recording(*args):
        launches.append(real(*args))
        return launches[-1]

    setattr(module, name, recording)
    return launches
