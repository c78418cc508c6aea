"""transformers integration: `AutoModelForCausalLM.from_pretrained(<kbit folder or repo>)` after
`import kbitrt` returns the model with its quantized linears as KbitLinear, and `save_pretrained`
writes a kbit folder again.

Importing transformers takes seconds, so `import kbitrt` only calls `install()`: it registers the
"kbit" quantization config and quantizer at once if transformers' quantizer registry is already
imported, else from an import hook the moment transformers imports it.

How loading works (transformers v5): the quantizer's `preprocess_model` gets the checkpoint files;
we open their folder with kbitrt's reader (which validates it) and put, at every quantized linear, a
placeholder whose buffers have exactly the stored names, dtypes and shapes, so transformers' own
loader fills them (mmap, threads, device_map) without any conversion op. After loading each
placeholder becomes a KbitLinear (codebook padded, dq8 scales decoded). The stored forms of what
that changes are kept on the module, so saving writes the exact tensors that were read.

An any-precision (bitplane-v1) folder loads at its top width, or at width K with
`from_pretrained(path, quantization_config=KbitConfig(bits=K))` (KbitConfig from
kbitrt.runtime.hf_quantizer): every plane is read, the top K are repacked into KbitLinear and the
rest freed. Such a model is not saved back (it is no longer the file it came from).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

_REGISTRY = "transformers.quantizers.auto"
_done = False


def install() -> None:
    """Register with transformers now if its quantizer registry is loaded, else when it loads."""
    if _REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs `register()` right after `transformers.quantizers.auto` has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register  # the loader object belongs to this spec only
        return spec


def register() -> None:
    """Add "kbit" to transformers' quantization config and quantizer registries (idempotent)."""
    global _done
    if _done:
        return
    try:
        from transformers.quantizers import auto
    except ImportError as e:  # a transformers without pluggable quantizers: kbitrt still works
        warnings.warn(f"kbitrt: cannot register with transformers ({e}); "
                      "use kbitrt.runtime.loader.load_model instead", stacklevel=2)
        return
    from kbitrt.runtime.hf_quantizer import KbitConfig, KbitHfQuantizer

    if "kbit" not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config("kbit")(KbitConfig)
    if "kbit" not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer("kbit")(KbitHfQuantizer)
    # from_pretrained(path, quantization_config=KbitConfig(bits=K)) on a kbit folder: transformers
    # keeps the folder's config and copies the passed one's loading attributes (the width of an
    # any-precision model) for config types listed here
    types = getattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple) and KbitConfig not in types:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = types + (KbitConfig,)
    _done = True

