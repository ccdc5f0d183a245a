"""Triton kernels on the CPU in tests: Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter is chosen when a kernel is decorated, so it must be on while a test module imports triton and the
kernels. It is switched on only without CUDA (on a GPU the same tests run the compiled kernels), and only while that
module imports and runs, so other tests see the environment as it was.

    from triton_interpret import CPU, DEVICE, InterpreterEnv, interpreted
    _ENV = InterpreterEnv()                # on now (without CUDA)
    from s2megatron.model import rope      # then the kernels
    rope = interpreted(rope, "_rope_row_kernel")   # decorated again if imported earlier without the interpreter
    _interpreter_env = _ENV.fixture()      # on again while this module's tests run, restored after
    ...
    _ENV.restore()                         # last line of the module: restored after its import
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

CPU = not torch.cuda.is_available()
DEVICE = "cpu" if CPU else "cuda"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InterpreterEnv:
    """Switches ``TRITON_INTERPRET`` on (without CUDA) and restores the value it had before."""

    def __init__(self):
        self.saved = os.environ.get("TRITON_INTERPRET")
        self.on()

    def on(self) -> None:
        if CPU:
            os.environ["TRITON_INTERPRET"] = "1"

    def restore(self) -> None:
        if self.saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self.saved

    def fixture(self):
        """A module-scoped autouse fixture: the interpreter on while the module's tests run."""
        @pytest.fixture(autouse=True, scope="module")
        def _interpreter_env():
            self.on()
            yield
            self.restore()
        return _interpreter_env


def interpreted(module, kernel_name: str):
    """``module`` with its Triton kernels (``kernel_name`` is one of them) decorated under the interpreter, when
    running without CUDA. Triton decorates a kernel when it is defined, so a kernel module (and triton's own
    library functions such as ``tl.sum``) imported earlier in this process without the interpreter is reloaded.
    Call with the interpreter on (after :class:`InterpreterEnv`)."""
    if not CPU:
        return module
    import triton.language as tl
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.sum, InterpretedFunction):
        importlib.reload(tl_standard)
        for name, fn in vars(tl_standard).items():
            if isinstance(fn, InterpretedFunction) and hasattr(tl, name):
                setattr(tl, name, fn)
    if not isinstance(getattr(module, kernel_name), InterpretedFunction):
        module = importlib.reload(module)
    return module


def backend_fixture(module):
    """A fixture that runs a test twice: on ``module``'s Triton kernels (compiled, or under the interpreter) and on
    its PyTorch fallback (``module._use_triton`` patched to False). The test receives ``"triton"`` or ``"torch"``."""
    @pytest.fixture(params=["triton", "torch"])
    def backend(request, monkeypatch):
        if request.param == "torch":
            monkeypatch.setattr(module, "_use_triton", lambda x: False)
        else:
            assert module._use_triton(torch.empty(1, device=DEVICE))
        return request.param
    return backend


def compiled_in_fresh_process(code: str, timeout: int = 300):
    """What ``code`` prints as JSON on its last line, run in a fresh Python without the interpreter (the
    interpreter replaces the jit helpers a kernel calls, so compiling a kernel for a GPU needs a process of its
    own), from the repository root with ``bench/`` importable (``kernel_resources``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = f"import sys; sys.path.insert(0, {os.path.join(_REPO, 'bench')!r})\n"
    res = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, cwd=_REPO,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
