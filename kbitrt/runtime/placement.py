"""Models larger than one device: `--device-map auto|balanced|sequential|FILE` and `--max-memory`.

Native backend: the decoder is split into units, `embed` (token and position embeddings), one per
`layers.N`, and `head` (final norm and lm_head), and each unit gets a device, as accelerate's
device maps do: `cuda:N` (held and run there), `cpu` and `disk` (held in RAM or in files under a
temporary folder, and run on the main device, where each forward brings the unit's weights in and
drops them after). Activations (hidden states, positions, rotary tables, masks) are handed from
device to device by forward pre-hooks; each layer's KV cache lives on the device that runs it.
Where no GPU is visible (or `--device cpu`) the main device is the CPU: `cpu` units run in place
and `disk` units are read from their files at every forward.

transformers backend: `from_pretrained(folder, device_map=..., max_memory=...)` through kbitrt's
registered quantizer, so accelerate places and offloads the modules (kbit weights cannot go to
disk there: the quantizer refuses it).

`--max-memory 0=20GiB,cpu=60GiB` is accelerate's syntax (a GPU index, `cpu` or `disk`, and a
size: `GiB`/`MiB` powers of 2, `GB`/`MB` powers of 10, or bytes). The default budget is 90% of a
GPU's free memory and of the RAM available; KV caches and activations are not counted, so leave
room for them with `--max-memory`.
"""

from __future__ import annotations

import json
import re
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kbitrt.convert.staging import temp_folder
from kbitrt.errors import KbitError

STRATEGIES = ("auto", "balanced", "sequential")
_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TIB": 2**40,
          "GB": 10**9, "MB": 10**6, "KB": 10**3, "TB": 10**12, "B": 1, "": 1}


class PlacementError(KbitError):
    """A device map or memory budget that cannot be honoured; one clear line."""


# ------------------------------------------------------------------------------------- parsing

def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m or m.group(2) not in _UNITS:
        raise PlacementError(f"--max-memory: {text!r} is not a size (e.g. 20GiB, 500MB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def device_key(text: str | int) -> str:
    """`0`, `cuda`, `cuda:0` -> `cuda:0`; `cpu`, `disk` as they are."""
    t = str(text).strip().lower()
    if t.isdigit():
        return f"cuda:{t}"
    if t == "cuda":
        return "cuda:0"
    if t in ("cpu", "disk") or re.fullmatch(r"cuda:\d+", t):
        return t
    raise PlacementError(f"device {text!r}: use a GPU index (0, 1, ...), cuda:N, cpu or disk")


def parse_max_memory(text: str | dict | None) -> dict[str, int]:
    """`0=20GiB,cpu=60GiB` -> {"cuda:0": bytes, "cpu": bytes}."""
    if not text:
        return {}
    items = text.items() if isinstance(text, dict) else (
        part.split("=", 1) if "=" in part else (part, None) for part in str(text).split(",") if part.strip())
    out = {}
    for key, value in items:
        if value is None:
            raise PlacementError(f"--max-memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB")
        out[device_key(key)] = parse_size(value)
    return out


def accelerate_max_memory(budgets: dict[str, int]) -> dict:
    """Our budgets in accelerate's keys (GPU indices as ints)."""
    return {int(k.split(":")[1]) if k.startswith("cuda:") else k: v for k, v in budgets.items()}


def read_device_map(text: str) -> str | dict:
    """A strategy name, or the JSON file's {module or unit: device} map."""
    if text in STRATEGIES:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise PlacementError(f"--device-map {text!r}: use auto, balanced, sequential or a JSON file")
    try:
        mapping = json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise PlacementError(f"--device-map {path}: not JSON ({str(e) or 'nested too deep'})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise PlacementError(f"--device-map {path}: give a JSON object {{module: device}}")
    return mapping


# ------------------------------------------------------------------------------------ devices

def visible_gpus(device: str | None) -> list[str]:
    """The GPUs a map may use: none for --device cpu, one for cuda:N, else every visible one."""
    d = (device or "auto").lower()
    if d == "cpu" or not torch.cuda.is_available():
        if d.startswith("cuda"):
            raise PlacementError(f"--device {device}: no CUDA GPU is available here")
        return []
    if d.startswith("cuda:"):
        return [device_key(d)]
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def default_budgets(gpus: list[str]) -> dict[str, int]:
    out = {g: int(torch.cuda.mem_get_info(torch.device(g))[0] * 0.9) for g in gpus}
    out["cpu"] = int(_available_ram() * 0.9)
    out["disk"] = 1 << 62
    return out


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def main_device(devices) -> torch.device:
    """Where offloaded units run and inputs/outputs live: the first GPU used, else the CPU."""
    gpus = sorted({d for d in devices if d.startswith("cuda")}, key=lambda d: int(d.split(":")[1]))
    return torch.device(gpus[0] if gpus else "cpu")


# ------------------------------------------------------------------------------ native: plan

def native_units(model: nn.Module) -> dict[str, list[str]]:
    """unit -> names of the decoder's modules it holds, in forward order."""
    names = {n for n, _ in model.named_children()}
    units = {"embed": [n for n in ("tok_emb", "pos_emb", "project_in", "emb_norm") if n in names]}
    units.update({f"layers.{i}": [f"layers.{i}"] for i in range(len(model.layers))})
    units["head"] = [n for n in ("norm", "project_out", "lm_head") if n in names]
    return units


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(recurse=True))
    out.update({n: b for n, b in module.named_buffers(recurse=True) if b is not None})
    return out


def unit_bytes(model: nn.Module, modules: list[str], run_on_cpu: bool, seen: set[int]) -> int:
    """Bytes a unit holds; on the CPU a KbitLinear also keeps its dequantized weight."""
    from kbitrt.runtime.linear import KbitLinear

    total = 0
    for name in modules:
        mod = model.get_submodule(name)
        for t in _tensors(mod).values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        if run_on_cpu:
            for sub in mod.modules():
                if isinstance(sub, KbitLinear):
                    total += sub.in_features * sub.out_features * sub.outlier_weight.element_size()
    return total


def plan_native(model: nn.Module, device_map: str | dict, budgets: dict[str, int],
                gpus: list[str]) -> dict[str, str]:
    """unit -> device: the given map (checked), or a greedy fill in forward order."""
    units = native_units(model)
    # one tensor, or one k-bit table (runtime/embedding.py), read by both
    tied = model.lm_head is getattr(model.tok_emb, "table", None) \
        or getattr(model.lm_head, "weight", None) is model.tok_emb.weight
    if isinstance(device_map, dict):
        plan = {}
        for unit, dev in device_map.items():
            if unit not in units:
                raise PlacementError(f"--device-map: {unit!r} is not a unit of this model; "
                                     f"units are embed, layers.0..layers.{len(model.layers) - 1}, head")
            plan[unit] = device_key(dev)
        missing = [u for u in units if u not in plan]
        if missing:
            raise PlacementError(f"--device-map gives no device for {', '.join(missing[:4])}")
        for dev in plan.values():
            if dev.startswith("cuda") and dev not in gpus:
                raise PlacementError(f"--device-map: {dev} is not a usable GPU here "
                                     f"(visible: {', '.join(gpus) or 'none'})")
        if tied and plan["head"] != plan["embed"]:
            raise PlacementError("--device-map: this model ties lm_head to the embedding: "
                                 "put head and embed on one device")
        return plan
    main = main_device(gpus)
    order = gpus + ["cpu", "disk"]
    limits = {d: budgets.get(d, 0) for d in order}
    seen: set[int] = set()
    sizes = {u: unit_bytes(model, mods, main.type == "cpu", seen) for u, mods in units.items()}
    plan = _balance(sizes, gpus, limits) if device_map == "balanced" and len(gpus) > 1 else None
    plan = plan or _fill(sizes, order, limits)
    offloaded = [u for u, d in plan.items() if d in ("cpu", "disk")]
    if gpus and offloaded:  # offloaded units run on the main GPU: leave room for the largest
        limits[str(main)] -= max(size for u, size in sizes.items() if u != "embed")
        plan = _fill(sizes, order, limits)
    if tied:
        plan["head"] = plan["embed"]
    return plan


def _balance(sizes: dict[str, int], gpus: list[str], limits: dict[str, int]) -> dict[str, str] | None:
    """Contiguous slices of about equal bytes, one per GPU (a unit goes where the middle of its
    byte range falls); None when a slice exceeds its GPU's budget (then fill greedily)."""
    share = max(1, sum(sizes.values())) / len(gpus)
    plan, start, used = {}, 0, dict.fromkeys(gpus, 0)
    for unit, size in sizes.items():
        gpu = gpus[min(len(gpus) - 1, int((start + size / 2) // share))]
        plan[unit], start = gpu, start + size
        used[gpu] += size
    return plan if all(used[g] <= limits[g] for g in gpus) else None


def _fill(sizes: dict[str, int], order: list[str], limits: dict[str, int]) -> dict[str, str]:
    plan, i, used = {}, 0, {d: 0 for d in order}
    for unit, size in sizes.items():
        while i < len(order) - 1 and used[order[i]] + size > limits[order[i]]:
            i += 1
        plan[unit] = order[i]
        used[order[i]] += size
    return plan


def describe(plan: dict[str, str], main: torch.device) -> str:
    """`embed,layers.0-5 -> cuda:0; layers.6-11 -> disk (run on cuda:0)`."""
    groups: list[tuple[str, list[str]]] = []
    for unit, dev in plan.items():
        if groups and groups[-1][0] == dev:
            groups[-1][1].append(unit)
        else:
            groups.append((dev, [unit]))
    parts = []
    for dev, units in groups:
        layers = [u for u in units if u.startswith("layers.")]
        names = [u for u in units if not u.startswith("layers.")]
        if layers:
            a, b = layers[0].split(".")[1], layers[-1].split(".")[1]
            names.insert(1 if units[0] == "embed" else 0, f"layers.{a}" + (f"-{b}" if a != b else ""))
        ran = f" (run on {main})" if dev in ("cpu", "disk") and dev != main.type else ""
        parts.append(f"{','.join(names)} -> {dev}{ran}")
    return "device map: " + "; ".join(parts)


# ----------------------------------------------------------------------------- native: apply

class _Mover:
    """Moves a forward's inputs to a device; a tensor moved once per forward is reused by every
    later unit on the same device (masks and rotary tables are shared by all layers)."""

    def __init__(self):
        self.memo: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        self.memo.clear()

    def to(self, obj, device: torch.device):
        if isinstance(obj, torch.Tensor):
            if obj.device == device:
                return obj
            key = (id(obj), str(device))
            hit = self.memo.get(key)
            if hit is None or hit[0] is not obj:
                hit = (obj, obj.to(device, non_blocking=True))
                self.memo[key] = hit
            return hit[1]
        if isinstance(obj, (tuple, list)):
            return type(obj)(self.to(x, device) for x in obj)
        if isinstance(obj, dict):
            return {k: self.to(v, device) for k, v in obj.items()}
        return obj


class _Offloaded:
    """One module whose tensors live in RAM or in a safetensors file and visit `device` for each
    forward: swapped in by a pre-hook, swapped back out (to RAM, or to meta) by a post-hook."""

    def __init__(self, module: nn.Module, device: torch.device, file: Path | None, shared: dict):
        """`shared`: original tensor id -> (original, resting form), so a tied tensor (embedding
        and lm_head) rests as one object, counted once."""
        from safetensors.torch import save_file

        self.module, self.device, self.file = module, device, file
        held = _tensors(module)
        self.names = list(held)
        if file is not None:
            save_file({n: t.detach().contiguous() for n, t in held.items()}, str(file))
        self.resting = {}
        for name, t in held.items():
            if id(t) not in shared:
                rest = t.detach().to("meta") if file is not None else (
                    t.detach().pin_memory() if device.type == "cuda" else t.detach())
                if isinstance(t, nn.Parameter):
                    rest = nn.Parameter(rest, requires_grad=False)
                shared[id(t)] = (t, rest)
            self.resting[name] = shared[id(t)][1]
        self._set(self.resting)

    def _set(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            owner, _, attr = name.rpartition(".")
            mod = self.module.get_submodule(owner) if owner else self.module
            if attr in mod._parameters:
                mod._parameters[attr] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[attr] = t

    def load(self, module, args):
        if self.file is not None:
            from safetensors import safe_open

            with safe_open(str(self.file), framework="pt", device=str(self.device)) as f:
                self._set({n: f.get_tensor(n) for n in self.names})
        else:
            self._set({n: t.to(self.device, non_blocking=True) for n, t in self.resting.items()})

    def unload(self, module, args, output):
        self._set(self.resting)
        for sub in self.module.modules():  # a CPU KbitLinear's dequantized copy goes too
            if hasattr(sub, "_w_cache"):
                sub._w_cache = None
        return output


def place_native(model: nn.Module, plan: dict[str, str]) -> torch.device:
    """Put each unit where `plan` says and hook the hand-over; returns the main device."""
    from kbitrt.model.kv_cache import KVCache

    main = main_device(plan.values())
    units = native_units(model)
    mover = _Mover()
    run_on: dict[str, torch.device] = {}
    offload_dir, shared = None, {}
    for unit, dev in plan.items():
        for name in units[unit]:
            module = model.get_submodule(name)
            if dev == "disk" or (dev == "cpu" and main.type == "cuda"):
                if dev == "disk" and offload_dir is None:
                    offload_dir = temp_folder("kbit-offload-")  # gone on exit and SIGTERM
                    weakref.finalize(model, shutil.rmtree, offload_dir, True)
                file = offload_dir / f"{name}.safetensors" if dev == "disk" else None
                off = _Offloaded(module, main, file, shared)
                module.register_forward_pre_hook(off.load)
                module.register_forward_hook(off.unload)
                run_on[name] = main
            else:
                module.to(torch.device(dev))
                run_on[name] = torch.device(dev)

            def move_inputs(mod, args, kwargs, device=run_on[name]):
                return mover.to(args, device), mover.to(kwargs, device)

            # registered after the loader's hook: prepend so inputs move before weights arrive
            module.register_forward_pre_hook(move_inputs, with_kwargs=True, prepend=True)
    if getattr(model, "inv_freq", None) is not None:
        model.inv_freq = model.inv_freq.to(main)
    if getattr(model, "slopes", None) is not None:
        model.slopes = model.slopes.to(main)

    def start(mod, args, kwargs):
        mover.reset()
        return mover.to(args, main), mover.to(kwargs, main)

    def finish(mod, args, kwargs, output):
        mover.reset()
        return output.to(main)

    model.register_forward_pre_hook(start, with_kwargs=True)
    model.register_forward_hook(finish, with_kwargs=True)
    layer_device = [run_on[f"layers.{i}"] for i in range(len(model.layers))]
    args = model.args

    def setup_caches(batch: int, max_len: int) -> None:
        """Static KV caches, each on the device that runs its layer."""
        if args.positions == "learned" and max_len > args.max_positions:
            raise ValueError(f"{max_len} tokens exceed the model's {args.max_positions} positions")
        dtype = model.kv_dtype or next(t.dtype for t in _tensors(model.layers[0]).values()
                                       if t.is_floating_point())
        for layer, device in zip(model.layers, layer_device):
            layer.attn.kv_cache = KVCache(batch, args.n_kv_heads, max_len, args.head_dim, dtype, device)

    model.setup_caches = setup_caches
    model.device_map = dict(plan)
    return main


# ------------------------------------------------------------------------------------ entry

@dataclass
class Placed:
    model: nn.Module  # the native Decoder, or the transformers model itself
    device: torch.device  # the main device: inputs go there, logits come back there
    note: str
    weight_bytes: int


def build_placed(source, config, backend: str, build, device: str | torch.device | None,
                 dtype: torch.dtype | None, device_map: str | dict, max_memory: str | dict | None,
                 default_dtype, cpu_weights: str = "auto") -> tuple[Placed, torch.dtype]:
    """The loader's hook: build (on the CPU) and place a model by a device map."""
    mapping = read_device_map(device_map) if isinstance(device_map, str) else device_map
    gpus = visible_gpus(str(device) if device is not None else None)
    budgets = {**default_budgets(gpus), **parse_max_memory(max_memory)}
    for key in budgets:
        if key.startswith("cuda") and key not in gpus:
            raise PlacementError(f"--max-memory names {key}, not a usable GPU here "
                                 f"(visible: {', '.join(gpus) or 'none'})")
    main = main_device(gpus) if not isinstance(mapping, dict) else main_device(
        device_key(v) for v in mapping.values())
    dtype = dtype or default_dtype(main, source.config)
    if backend == "transformers":
        return _placed_transformers(source, device, mapping, budgets, max_memory, dtype), dtype
    with torch.no_grad():
        model = build(source, config, torch.device("cpu"), dtype, cpu_weights)
    seen: set[int] = set()
    weight_bytes = sum(unit_bytes(model, mods, False, seen) for mods in native_units(model).values())
    plan = plan_native(model, mapping, budgets, gpus)
    main = place_native(model, plan)
    return Placed(model, main, describe(plan, main), weight_bytes), dtype


def accelerate_kwargs(device, device_map: str | dict, max_memory, budgets=None) -> dict:
    """from_pretrained's device_map/max_memory for our options (a map file read, sizes parsed)."""
    mapping = read_device_map(device_map) if isinstance(device_map, str) else device_map
    gpus = visible_gpus(str(device) if device is not None else None)
    kwargs = {"device_map": mapping}
    if max_memory or not gpus:  # with GPUs and no --max-memory, accelerate's own defaults
        budgets = budgets or {**default_budgets(gpus), **parse_max_memory(max_memory)}
        given = parse_max_memory(max_memory)
        kwargs["max_memory"] = accelerate_max_memory(
            {k: v for k, v in budgets.items() if k != "disk" and (k in given or k == "cpu" or k in gpus)})
    return kwargs


def _from_pretrained(path, kwargs: dict):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlacementError(f"--device-map (transformers): {first}") from None


def _hf_map_note(hf) -> tuple[torch.device, str]:
    # transformers records hf_device_map only when it dispatched over several devices
    hf_map = dict(getattr(hf, "hf_device_map", None) or {"": str(next(hf.parameters()).device)})
    main = main_device(device_key(v) for v in hf_map.values())
    groups: dict[str, int] = {}
    for dev in hf_map.values():
        groups[device_key(dev)] = groups.get(device_key(dev), 0) + 1
    if len(hf_map) == 1:
        return main, f"device map (accelerate): all -> {device_key(next(iter(hf_map.values())))}"
    return main, "device map (accelerate): " + "; ".join(f"{n} module(s) -> {d}" for d, n in groups.items())


def _placed_transformers(source, device, mapping, budgets, max_memory, dtype) -> Placed:
    path = getattr(source, "path", None)
    if path is None:
        raise PlacementError("--device-map with the transformers backend needs a model folder")
    hf = _from_pretrained(path, {**accelerate_kwargs(device, mapping, max_memory, budgets), "dtype": dtype})
    main, note = _hf_map_note(hf)
    seen = {id(t): t.numel() * t.element_size() for t in list(hf.parameters()) + list(hf.buffers())}
    return Placed(hf.eval(), main, note, sum(seen.values()))  # the loader wraps it (TransformersLM)


def load_hf_placed(path, device, dtype, device_map, max_memory, default_dtype):
    """A plain (unquantized) HF model split by accelerate, and its tokenizer (eval baselines)."""
    from transformers import AutoTokenizer

    kwargs = accelerate_kwargs(device, device_map, max_memory)
    gpus = visible_gpus(str(device) if device is not None else None)
    config = json.loads((Path(path) / "config.json").read_text())
    kwargs["dtype"] = dtype or default_dtype(main_device(gpus), config)
    return _from_pretrained(path, kwargs).eval(), AutoTokenizer.from_pretrained(path)
