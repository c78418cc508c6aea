"""A faster Triton interpreter for the tests (the CUDA twin runs whole generate loops through it).

Triton's interpreter re-patches `triton.language` on every call of a @triton.jit device function
(`_patch_lang`: `inspect.getmembers` over the whole module), although the launch that runs the
kernel has patched that very module already and keeps it patched until the launch ends. Our word
kernels call ~1,100 small device functions per launch (bit-field helpers), so half of a launch's
time went there (cProfile: 3,348 `_patch_builtin` calls, 1.34 of 2.76 s for 3 launches). This
skips the re-patch for device functions whose module sees `triton.language` only as `tl`, which the
launch patched; Triton's own jit functions (whose globals hold `triton.language.core`, which a
launch does not patch) keep the original path. Nothing else changes: same rewritten function, same
arguments, same error wrapping.
"""

from __future__ import annotations


def skip_repatching_in_device_calls() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpretedFunction.__call__
    if getattr(original, "kbit_fast", False):
        return

    def device_call(self, *args, **kwargs):
        if any(v is tl.core for v in self.fn.__globals__.values()):
            return original(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # the interpreter's own wrapping, as in the original
            raise interpreter.InterpreterError(repr(e)) from e

    device_call.kbit_fast = True
    interpreter.InterpretedFunction.__call__ = device_call
