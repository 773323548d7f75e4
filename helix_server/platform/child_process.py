"""Run one function in a short-lived child interpreter, so this process never imports its packages.

A server holds every module it ever imported: modules are not unloaded, and their objects pin the
allocator's arenas. Reading a checkpoint's config and tokenizer with transformers imports ~30 MiB of
modules that serving never calls again, so `ChildCall` reads them in a fresh interpreter and brings
back only the (pickled) result. When the package is already imported here (a test, a notebook), the
call runs in this process instead: the child would save nothing.

The child is this interpreter (`sys.executable`) with this process's `sys.path`, so it imports the
same helix_server. Its stderr is this process's (warnings and log lines show as before); its result
or exception comes back on stdout.
"""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
from typing import Any

# The child's program: read (sys.path, module, function, args) from stdin, write (ok, value) to stdout.
# Whatever the function prints (Python or native code) goes to stderr: stdout carries the result only.
_CHILD = """
import os, pickle, sys
path, module, function, args = pickle.load(sys.stdin.buffer)
sys.path[:] = path
result_out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.stdout = sys.stderr
try:
    import importlib
    outcome = (True, getattr(importlib.import_module(module), function)(*args))
except BaseException as exc:
    try:
        pickle.dumps(exc)
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    outcome = (False, exc)
result_out.write(pickle.dumps(outcome))
result_out.close()
"""


class ChildCall:
    """`module.function(*args)`, started now in a child interpreter (or, when `keep_out` is already
    imported here or no process can be started, run here at `result()`), its result collected by
    `result()`.

    The function's exceptions are raised again by `result()` with their own type. The arguments and
    the result must pickle.
    """

    def __init__(self, module: str, function: str, *args: Any, keep_out: str) -> None:
        self.module, self.function, self.args = module, function, args
        self._process: subprocess.Popen | None = None
        self._outcome: tuple[bool, Any] | None = None  # (returned, value or exception), once known
        if keep_out not in sys.modules and sys.executable:
            payload = pickle.dumps((list(sys.path), module, function, args))  # before a child exists
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
            except OSError:  # no process can be started here: the call runs in this one
                self._process = None
        self.in_child = self._process is not None
        if self._process is not None:
            stdin, self._process.stdin = self._process.stdin, None  # written once: `communicate` reads only
            stdin.write(payload)
            stdin.close()

    def result(self, timeout: float | None = None) -> Any:
        """The function's return value (waits for the child the first time); raises what the
        function raised. Later calls give the same outcome."""
        if self._outcome is None:
            self._outcome = self._run(timeout)
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def _run(self, timeout: float | None) -> tuple[bool, Any]:
        if self._process is None:
            try:
                return True, getattr(importlib.import_module(self.module), self.function)(*self.args)
            except Exception as exc:  # noqa: BLE001 - kept, and raised by every result()
                return False, exc
        try:
            out, _ = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            raise
        if self._process.returncode != 0 or not out:
            raise RuntimeError(
                f"the child process running {self.module}.{self.function} exited with status "
                f"{self._process.returncode} (its error output is above)"
            )
        try:
            return pickle.loads(out)
        except (pickle.UnpicklingError, TypeError, AttributeError, ImportError) as exc:  # pickles, does not unpickle
            raise RuntimeError(f"{self.module}.{self.function} failed in a child process: {exc}") from None

    def cancel(self) -> None:
        """Stop the child, if one runs; `result()` must not be called after."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.communicate()


def call_keeping_out(package: str, module: str, function: str, *args: Any) -> Any:
    """`module.function(*args)`, run so that this process does not import `package` for it."""
    return ChildCall(module, function, *args, keep_out=package).result()
