"""Experts that do not fit stay in the package file: a bounded cache of resident experts per MoE layer.

The package stores each layer's experts stacked, ``layers.{i}.moe.experts.{proj}.{weight,scales,biases}`` of
shape [E, ...], so expert e of a tensor is the byte slice ``start + e * size / E`` (``size / E`` bytes).
A cached layer holds ``capacity`` slots, arrays of shape [capacity, ...] laid out as the stacked experts
are; routing picks experts, the misses are copied from the memory-mapped model.safetensors into slots
(evicting by ``policy``), and the gathered matmuls run on the slots with the expert ids mapped to slot ids.

A forward whose layer needs more distinct experts than there are slots (a long prefill chunk) runs in
rounds of at most ``capacity`` experts; every (token, expert) product is the same row computation as
with all experts resident, so the output is the same bit for bit. An expert budget
(``edgeinfer.moe.ExpertBudget``) caps the distinct experts a forward touches per layer, and so its misses:
``max_touched`` in the statistics shows it.

Capacity is per layer, not one pool for all layers: the slots are one stacked array per layer (the
gathered matmul's operand), and on the trained tiny MoE (balanced routing) one pool of the same total
size and LFU eviction measured no better than per-layer LRU, except in the 2-slot plain-decoding row
(benchmarks/moe_cache.py replays the recorded routing under each, docs/BENCHMARKS.md "MoE expert cache").
"""

from __future__ import annotations

import mmap
from collections import OrderedDict

import mlx.core as mx
import numpy as np

from ..errors import EdgeInferError

POLICIES = ("lru", "lfu")
_NP = {"U32": np.uint32, "F16": np.float16, "F32": np.float32, "BF16": np.uint16, "I32": np.int32, "U8": np.uint8}


class SlotPolicy:
    """Which resident keys to evict: ``lru`` the least recently used, ``lfu`` the least often used (ties:
    least recently). Pure bookkeeping, shared by the runtime cache and the benchmark's replay of a routing
    trace, so that the simulated and the measured hit rates come from the same code."""

    def __init__(self, capacity: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise EdgeInferError(f"expert cache policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.capacity, self.policy = int(capacity), policy
        self.slot: OrderedDict = OrderedDict()  # key -> slot, in recency order (oldest first)
        self.uses: dict = {}  # key -> times used (kept after eviction: LFU remembers history)
        self.hits = self.misses = 0

    def admit(self, keys: list) -> list[tuple]:
        """Makes ``keys`` (at most ``capacity``, distinct) resident and marks them used; returns the misses as
        (key, slot) for the caller to fill. Keys of the same call are never evicted for each other."""
        assert len(keys) <= self.capacity
        want = set(keys)
        free = sorted(set(range(self.capacity)) - set(self.slot.values()))
        loads = []
        for key in keys:
            if key in self.slot:
                self.hits += 1
            else:
                self.misses += 1
                if free:
                    s = free.pop(0)
                else:
                    victims = [k for k in self.slot if k not in want]
                    if self.policy == "lfu":
                        # min() keeps the first of equals: the least recently used among the least used
                        victim = min(victims, key=lambda k: self.uses.get(k, 0))
                    else:
                        victim = victims[0]
                    s = self.slot.pop(victim)
                self.slot[key] = s
                loads.append((key, s))
            self.slot.move_to_end(key)
            self.uses[key] = self.uses.get(key, 0) + 1
        return loads


class ExpertCache:
    """Resident slots for the experts of ``layers`` (MoE layer indices), filled on demand from ``pkg``'s
    model.safetensors through a read-only memory map. ``capacity``: slots per layer (at least the model's
    top-k, at most its experts). Experts are held as the all-resident MoE block holds them: quantized as
    stored (scales in ``dtype``) or dequantized to ``dtype`` (``dequantize``)."""

    def __init__(self, pkg, spec, layers, capacity: int, policy: str, dequantize: bool, dtype, qparams, top_k: int):
        from ..memory import safetensors_index

        E = int(spec.num_experts)
        capacity = int(capacity)
        if not top_k <= capacity <= E:
            raise EdgeInferError(f"the expert cache needs between {top_k} (top-k) and {E} experts per layer, not {capacity}: "
                                 f"a token's {top_k} experts must be resident together")
        self.E, self.capacity, self.policy_name = E, capacity, policy
        self.dequantize, self.dtype = dequantize, dtype
        self.path = str(pkg.weights_path)
        index = safetensors_index(pkg.weights_path)
        with open(self.path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.page = mmap.PAGESIZE
        self.layers = list(layers)
        self.first = self.layers[0] if self.layers else None
        self.tensors: dict[int, dict] = {}  # layer -> proj -> (weight, scales, biases) slices or None
        self.slots: dict[int, dict] = {}  # layer -> proj -> [arrays of shape [capacity, ...]]
        self.policies = {i: SlotPolicy(capacity, policy) for i in self.layers}
        self.expert_bytes = 0  # stored bytes of one expert of one layer (its three projections)
        for i in self.layers:
            self.tensors[i], self.slots[i] = {}, {}
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"layers.{i}.moe.experts.{proj}"
                parts = []
                for suffix in ("weight", "scales", "biases"):
                    t = index.get(f"{name}.{suffix}")
                    if t is None:
                        if suffix == "weight":
                            raise EdgeInferError(f"the package's weights lack the tensor {name}.weight")
                        continue
                    if t["shape"][0] != E or (t["end"] - t["start"]) % E:
                        raise EdgeInferError(f"{name}.{suffix} is not stacked over {E} experts: shape {t['shape']}")
                    parts.append((t["start"], (t["end"] - t["start"]) // E, t["dtype"], t["shape"][1:]))
                self.tensors[i][proj] = (parts, qparams(name) if len(parts) == 3 else None)
                if i == self.first:
                    self.expert_bytes += sum(p[1] for p in parts)
                # empty slots: zeros of the resident layout, so that the buffers exist (and count) from load on
                self.slots[i][proj] = [mx.zeros([capacity] + list(a.shape), a.dtype) for a in self._convert(i, proj, 0, read=False)]
                mx.eval(self.slots[i][proj])
        self.bytes_read = 0
        self.tokens = 0
        self.forwards = 0
        self.max_touched = 0  # the most distinct experts one layer needed in one forward
        self.max_misses = 0  # the most misses of one layer in one forward
        self.trace: list | None = None  # set to a list to record (layer, tokens, experts needed) per forward

    # -- reading -------------------------------------------------------------------------------------
    def _slice(self, start: int, size: int, dt: str, shape, e: int, read: bool) -> mx.array:
        if not read:
            return mx.zeros(shape, _MX[dt])
        lo = start + e * size
        a = np.frombuffer(self.map, dtype=_NP[dt], count=size // np.dtype(_NP[dt]).itemsize, offset=lo)
        arr = mx.array(a.reshape(shape))  # a copy: the mapped pages may go again
        self.bytes_read += size
        # Drop the mapped pages from this process's resident set: the slot holds the copy now.
        p0 = lo // self.page * self.page
        try:
            self.map.madvise(mmap.MADV_DONTNEED, p0, lo + size - p0)
        except (AttributeError, OSError, ValueError):
            pass
        return arr.view(mx.bfloat16) if dt == "BF16" else arr

    def _convert(self, i: int, proj: str, e: int, read: bool = True) -> list[mx.array]:
        """Expert e of layer i's projection, as the slots hold it: [weight, scales, biases] kept quantized, or
        [weight] dequantized to ``dtype`` ([out, in], as the stacked tensor stores it)."""
        parts, q = self.tensors[i][proj]
        arrays = [self._slice(*p, e, read) for p in parts]
        if q is None:
            return [arrays[0].astype(self.dtype)]
        wt, s, b = arrays
        bits, group = q
        if self.dequantize:
            return [mx.dequantize(wt, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits).astype(self.dtype)]
        sdt = s.dtype if self.dtype == mx.bfloat16 else self.dtype
        return [wt, s.astype(sdt), b.astype(sdt)]

    def experts(self, i: int) -> dict:
        """Layer i's slots in the MoE block's ``experts`` format: proj -> (weight, quant or None)."""
        out = {}
        for proj, arrays in self.slots[i].items():
            _, q = self.tensors[i][proj]
            if len(arrays) == 1:
                out[proj] = (arrays[0].swapaxes(-1, -2), None)
            else:
                bits, group = q
                out[proj] = (arrays[0], (arrays[1], arrays[2], group, bits))
        return out

    def _fill(self, i: int, loads: list[tuple]) -> None:
        for e, slot in loads:
            for proj, arrays in self.slots[i].items():
                for a, new in zip(arrays, self._convert(i, proj, e)):
                    a[slot] = new
            mx.eval([a for arrays in self.slots[i].values() for a in arrays])

    # -- running ---------------------------------------------------------------------------------------
    def run(self, block, i: int, x: mx.array, idx: mx.array) -> mx.array:
        """Layer i's expert outputs [T, k, H] for routing ``idx`` [T, k], with the experts read into slots as
        needed (``block`` is the layer's MoEBlock; its gathered matmuls run on the slots)."""
        ids = np.array(idx)  # routing decides what to read: wait for it
        pol = self.policies[i]
        needed = [int(e) for e in np.unique(ids)]
        # the resident ones first, so that a forward in several rounds evicts only what it has used
        needed.sort(key=lambda e: e not in pol.slot)
        self.max_touched = max(self.max_touched, len(needed))
        if self.trace is not None:
            self.trace.append((i, int(x.shape[0]), sorted(needed)))
        misses0 = pol.misses
        if i == self.first:
            self.tokens += int(x.shape[0])
            self.forwards += 1
        out = None
        for r in range(0, len(needed), self.capacity):
            group = needed[r : r + self.capacity]
            self._fill(i, pol.admit(group))
            table = np.zeros(self.E, np.int32)
            for e in group:
                table[e] = pol.slot[e]
            y = block._experts(x, mx.array(table)[idx], self.experts(i))
            if out is None:
                out = y
            else:
                inside = mx.array(np.isin(ids, group))[..., None]
                out = mx.where(inside, y, out)
            if len(needed) > self.capacity:
                mx.eval(out)  # before the next round overwrites the slots
        self.max_misses = max(self.max_misses, pol.misses - misses0)
        return out

    # -- statistics -------------------------------------------------------------------------------------
    @property
    def hits(self) -> int:
        return sum(p.hits for p in self.policies.values())

    @property
    def misses(self) -> int:
        return sum(p.misses for p in self.policies.values())

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for slots in self.slots.values() for arrays in slots.values() for a in arrays)

    def stats(self) -> dict:
        n = self.hits + self.misses
        return dict(capacity=self.capacity, experts=self.E, layers=len(self.layers), policy=self.policy_name,
                    hits=self.hits, misses=self.misses, hit_rate=self.hits / n if n else 0.0,
                    bytes_read=self.bytes_read, tokens=self.tokens, forwards=self.forwards,
                    bytes_per_token=self.bytes_read / self.tokens if self.tokens else 0.0,
                    resident_bytes=self.resident_bytes, expert_bytes=self.expert_bytes,
                    max_touched=self.max_touched, max_misses=self.max_misses)


_MX = {"BF16": mx.bfloat16, "U32": mx.uint32, "F16": mx.float16, "F32": mx.float32, "I32": mx.int32, "U8": mx.uint8}
