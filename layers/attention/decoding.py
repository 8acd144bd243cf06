"""Decoding states: what an attention kind keeps of the past to decode the next token (a transformers cache layer).

The default, a transformers `DynamicLayer`, keeps every key and value: a decoded token then costs
O(position) (dense attention needs them all: it is the baseline). A kind that needs less says so with
a `decode_state()` method returning a fresh state, one per layer, that `install_states` puts into a
new transformers cache (the one `generate` or the LM builds); `SelfAttention` then calls
`state.attend(kernel, q, k, v, ...)` instead of concatenating keys. The states here:

- `WindowState`: the last `window - 1` keys and values (a sliding window: local attention);
- `FeatureSumState`: a running sum over the past of phi(k) [v, 1]^T (linear attention: Performer).
  The kind computes the features; the state only adds and rolls back;
- `BucketState`: for each key head, the last `chunk` keys of every LSH bucket of every hash round (causal
  angular LSH reads no other key again): at most n_hashes x n_buckets x chunk keys. (SMYRF hashing keeps
  every key: its causal key transform divides by the largest key norm so far, which needs them all);
- `WindowAndSumState`: Scatterbrain with a window support: the last `window - 1` keys plus the feature sum
  over the keys before them. With an LSH support Scatterbrain keeps every key (a DynamicLayer, O(position)
  per token).

All are `CacheLayerMixin`s, so generate's beam search (reorder), num_return_sequences (repeat),
assisted decoding (crop after `activate_past_recording`) work on them as on transformers' own layers.
Each kind's module defines its `decode_state` (returning None keeps every key); a kind without one keeps every key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin, DynamicLayer


class DecodingState:
    """A cache layer that attends itself: `attend` replaces `cache.update` + the kind's forward.

    `_rows(fn)` applies fn to every tensor of the state whose first dimension is the batch: the batch operations
    of generate (beam reorder, repeat, select) and offloading follow from it."""

    def _rows(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def offload(self):
        self._rows(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._rows(lambda t: t.to(self.device, non_blocking=True))

    def attend(self, kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_padding_mask: torch.Tensor | None, kv_length: int, **kw):
        """The kind's output for queries q (the last q_len positions) given the new keys/values k, v
        (b, kv_heads, q_len, d) and this state of the past; the state then includes k, v.
        key_padding_mask: (batch, kv_length) over every position so far (True = attend), or None."""
        raise NotImplementedError


class WindowState(DecodingState, DynamicLayer):
    """A sliding-window key/value cache: keeps the last `window - 1` positions (a query at p sees keys p - window < j
    <= p), so its size and a decoded token's cost do not grow with the position."""

    is_sliding = True

    def __init__(self, window: int):
        super().__init__()
        if window < 1:
            raise ValueError(f"window = {window} must be >= 1")
        self.window = window
        self.cumulative_length = 0  # positions seen (reset() zeroes it)
        self.record_past = False  # assisted decoding: keep keys until crop() so that rejected ones can be removed

    def activate_past_recording(self) -> None:
        self.record_past = True

    def _last(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.window - 1
        return x[:, :, x.shape[-2] - keep:] if x.shape[-2] > keep else x

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """The keys/values a query of this step may need (the kept past + the new ones); keeps the last window - 1."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = (keys, values) if self.record_past else (self._last(keys), self._last(values))
        return keys, values

    def attend(self, kernel, q, k, v, key_padding_mask, kv_length, return_weights: bool = False, **kw):
        k, v = self.update(k, v)
        kept = k.shape[-2]  # the last `kept` of the kv_length positions
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, kv_length - kept:]
            if bool(key_padding_mask.all()):
                key_padding_mask = None
        if key_padding_mask is not None:
            kw["key_padding_mask"] = key_padding_mask
        if not return_weights:
            return kernel(q, k, v, causal=True, **kw)
        out, weights = kernel(q, k, v, causal=True, return_weights=True, **kw)
        return out, F.pad(weights, (kv_length - kept, 0))  # zero weight on the keys no longer kept

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = min(self.cumulative_length, self.window - 1)
        return kept + query_length, self.cumulative_length - kept

    def get_max_length(self) -> int:
        return self.window

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove positions (0: only trim back to the window). Positions already dropped
        from the window cannot come back: dropping them needs activate_past_recording() first."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): a window cache is cropped by a negative count of positions")
        if not self.is_initialized:
            return
        if tokens_to_remove < 0:
            held = self.keys.shape[-2]
            if not self.record_past and held < min(self.cumulative_length, self.window - 1 - tokens_to_remove):
                raise RuntimeError("crop() would need keys this window cache no longer holds: call "
                                   "activate_past_recording() before decoding steps that may be rolled back")
            self._drop_last(-tokens_to_remove)
            self.cumulative_length += tokens_to_remove
        self._trim()

    def _drop_last(self, n: int) -> None:
        self.keys, self.values = self.keys[:, :, :-n], self.values[:, :, :-n]

    def _trim(self) -> None:
        """Back to the window's last window - 1 positions."""
        self.keys, self.values = self._last(self.keys), self._last(self.values)

    def _rows(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)


class PositionCount:
    """The sequence-length answers of a state that counts its positions in `length` (no mask offset, no maximum)."""

    length = 0

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1


class FeatureSumState(DecodingState, PositionCount, CacheLayerMixin):
    """The running sum over the past of phi(k_j) [v_j, 1]^T, (batch, heads, features, head_dim + 1) in float32:
    linear attention's whole memory of the past. The kind's `attend_with_state(q, k, v, sum, key_padding_mask,
    keep_features)` returns (output, the sum after the new keys, their (phi(k), [v, 1]) if asked); rolling back
    (assisted decoding, after activate_past_recording) keeps those of the positions since the last crop."""

    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.sum: torch.Tensor | None = None  # (b, h, m, e)
        self.length = 0
        self.record_past = False
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (phi_k, v1) since the last crop, if recording
        self._before: torch.Tensor | None = None  # the sum before them

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a FeatureSumState keeps no keys: the attention kind attends through attend()")

    def attend(self, kernel, q, k, v, key_padding_mask, kv_length, **kw):
        if kw:
            raise ValueError(f"{type(kernel).__name__} decoding takes no options {sorted(kw)}")
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, kv_length - q.shape[-2]:]  # the new keys' (the past is summed)
        before = self.sum
        out, self.sum, features = kernel.attend_with_state(q, k, v, before, key_padding_mask,
                                                           keep_features=self.record_past)
        if self.record_past:
            if not self._pending:
                self._before = before
            self._pending.append(features)
        self.length += q.shape[-2]
        return out

    @staticmethod
    def _add(total: torch.Tensor | None, phi_k: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        step = phi_k.transpose(-1, -2) @ v1  # (b, h, m, e)
        return step if total is None else total + step

    def activate_past_recording(self) -> None:
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove positions (they must be since the last crop, with past recording on)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): a feature-sum state is cropped by a negative count")
        if tokens_to_remove < 0:
            pending = sum(p.shape[-2] for p, _ in self._pending)
            if -tokens_to_remove > pending:
                raise RuntimeError(f"crop({tokens_to_remove}): only the {pending} positions since the last crop can be "
                                   f"removed (call activate_past_recording() first)")
            phi_k = torch.cat([p for p, _ in self._pending], -2)[:, :, :pending + tokens_to_remove]
            v1 = torch.cat([x for _, x in self._pending], -2)[:, :, :pending + tokens_to_remove]
            self.sum = self._add(self._before, phi_k, v1) if phi_k.shape[-2] else self._before
            self.length += tokens_to_remove
        self._pending, self._before = [], None

    def reset(self) -> None:
        self.sum, self.length, self._pending, self._before = None, 0, [], None

    def _rows(self, fn) -> None:
        self.sum = None if self.sum is None else fn(self.sum)
        self._before = None if self._before is None else fn(self._before)
        self._pending = [(fn(p), fn(x)) for p, x in self._pending]


class BucketState(DecodingState, PositionCount, CacheLayerMixin):
    """LSH attention's past: for each key head, the last `chunk` keys of every bucket (at most n_buckets x chunk).

    A causal LSH query at position p attends to the `chunk` latest keys j < p of its own bucket (plus itself):
    older keys of a bucket are never read again, so the kind run on the kept keys (in position order) followed by
    the new ones gives the same output as on every key. Padding keys are kept like the others (they take a
    place in their bucket's chunk, as in the full computation) with their mask; the rows of a batch hold
    different counts, so the front is filled with `filler` slots, masked out and sorted before every real key
    (they never take a real key's place). A decoded token then costs O(n_buckets x chunk), whatever the position.
    """

    is_sliding = True
    is_croppable = True
    supports_early_init = False

    def __init__(self, chunk: int, n_buckets: int, rotations, n_hashes: int = 1):
        super().__init__()
        self.chunk, self.n_buckets, self.rotations, self.n_hashes = chunk, n_buckets, rotations, n_hashes
        self.length = 0
        self.record_past = False
        # (b, kv_heads, slots, d) keys / values; (b, kv_heads, slots) position (-1: filler) and padding mask
        self.keys = self.values = self.pos = self.real = None

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        dev = key_states.device
        self.device, self.is_initialized = dev, True
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, d)
        self.pos = torch.zeros(b, h, 0, dtype=torch.long, device=dev)
        self.real = torch.zeros(b, h, 0, dtype=torch.bool, device=dev)

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a BucketState is read through attend(): it keeps only the keys LSH attention will read")

    def attend(self, kernel, q, k, v, key_padding_mask, kv_length, return_weights: bool = False, **kw):
        if kw:
            raise ValueError(f"LSH decoding takes no options {sorted(kw)}")
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        b, h, s, d = q.shape
        kv_h = k.shape[1]
        new_pos = torch.arange(self.length, self.length + s, device=q.device).expand(b, kv_h, s)
        new_real = (torch.ones(b, s, dtype=torch.bool, device=q.device) if key_padding_mask is None
                    else key_padding_mask[:, kv_length - s:].bool())[:, None].expand(b, kv_h, s)
        keys, values = torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2)
        pos, real = torch.cat([self.pos, new_pos], 2), torch.cat([self.real, new_real], 2)
        n = keys.shape[2]
        # Each key head is a batch row of its own (its kept keys differ), its query heads the row's heads.
        rows = b * kv_h
        extra = {"return_weights": True} if return_weights else {}
        out = kernel(q.reshape(rows, h // kv_h, s, d), keys.reshape(rows, 1, n, d), values.reshape(rows, 1, n, d),
                     causal=True, key_padding_mask=real.reshape(rows, n), **extra)
        weights = None
        if return_weights:
            out, w = out  # (rows, group, s, n) over the kept keys: onto the positions (fillers have weight 0)
            full = w.new_zeros(rows, h // kv_h, s, kv_length)
            index = pos.reshape(rows, 1, 1, n).clamp_min(0).expand_as(w)
            weights = full.scatter_add_(-1, index, w).view(b, h, s, kv_length)
        self.length += s
        self.keys, self.values, self.pos, self.real = keys, values, pos, real
        if not self.record_past:
            self._prune()
        out = out.reshape(b, h, s, d)
        return (out, weights) if return_weights else out

    def _prune(self) -> None:
        """Keep, per key head, the last `chunk` keys of each bucket of each hash round (fillers first, then by
        position)."""
        pos = self.pos
        n = pos.shape[-1]
        if n == 0:
            return
        keep = torch.zeros_like(self.real)
        for buckets in self._buckets(self.keys):
            keep |= last_of_each_bucket(buckets, pos, self.chunk, self.length + 1)
        slots = int(keep.sum(-1).max())
        rank = torch.where(keep, pos, -1).sort(dim=-1, stable=True).indices[..., n - slots:]  # fillers, then by pos
        kept = keep.gather(-1, rank)
        self.pos = torch.where(kept, pos.gather(-1, rank), -1)
        self.real = self.real.gather(-1, rank) & kept
        index = rank[..., None].expand(*rank.shape, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, index), self.values.gather(2, index)

    def _buckets(self, keys: torch.Tensor) -> list[torch.Tensor]:
        """Each hash round's bucket (b, kv_heads, n) of the keys: the rounds' rows of the kind's projection."""
        from layers.attention.lsh import hash_buckets

        if self.rotations is None:
            return [hash_buckets(keys, None)]
        weight = self.rotations.weight
        rows = weight.shape[0] // self.n_hashes
        return [hash_buckets(keys, weight[r * rows:(r + 1) * rows]) for r in range(self.n_hashes)]

    def activate_past_recording(self) -> None:
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove positions (recorded since the last crop), then keep only what LSH reads."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): a bucket state is cropped by a negative count of positions")
        if tokens_to_remove < 0:
            if not self.record_past:
                raise RuntimeError("crop() would need keys this bucket state no longer holds: call "
                                   "activate_past_recording() before decoding steps that may be rolled back")
            self.length += tokens_to_remove
            self.keys, self.values = self.keys[:, :, :tokens_to_remove], self.values[:, :, :tokens_to_remove]
            self.pos, self.real = self.pos[:, :, :tokens_to_remove], self.real[:, :, :tokens_to_remove]
        if self.is_initialized:
            self._prune()

    def reset(self) -> None:
        self.keys = self.values = self.pos = self.real = None
        self.length, self.is_initialized = 0, False

    def _rows(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values, self.pos, self.real = (fn(t) for t in (self.keys, self.values, self.pos, self.real))



class WindowAndSumState(WindowState):
    """Scatterbrain's past with a window support (no LSH support): the last `window - 1` keys and values (its exact
    support and their low-rank features) and the running sum of phi(k) [v, 1]^T over the keys before them (the
    low-rank part of every older key). A decoded token costs O(window x features), whatever the position.

    The combination (one shared scale per query, the window's correction of the low-rank term) is
    scatterbrain.py's `_attend` restated on these two parts, from its own pieces (`WindowSupport`, the FAVOR+
    features); tests compare it with the full recomputation.
    """

    def __init__(self, window: int, features, chunk: int):
        super().__init__(window)
        self.features, self.chunk = features, chunk
        self.real: torch.Tensor | None = None  # (b, held): the kept keys' padding mask
        self.heads = 0
        self.sum: torch.Tensor | None = None  # (b, heads, m, e) over the keys older than the kept ones

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a WindowAndSumState is read through attend()")

    def attend(self, kernel, q, k, v, key_padding_mask, kv_length, **kw):
        if kw:
            raise ValueError(f"scatterbrain decoding takes no options {sorted(kw)}")
        if not self.is_initialized:
            self.lazy_initialization(k, v)
            self.real = torch.zeros(k.shape[0], 0, dtype=torch.bool, device=k.device)
        s = q.shape[-2]
        new_real = (torch.ones(q.shape[0], s, dtype=torch.bool, device=q.device) if key_padding_mask is None
                    else key_padding_mask[:, kv_length - s:].bool())
        self.keys, self.values = torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2)
        self.real = torch.cat([self.real, new_real], 1)
        self.cumulative_length += s
        self.heads = q.shape[1]  # query heads: the sum is per query head (key heads repeated)
        out = self._attend(q, self.keys, self.values, self.real)
        if not self.record_past:
            self._trim()
        return out

    def _attend(self, q, k, v, real):
        from layers.attention.common import normalise, repeat_kv_heads, with_ones
        from layers.attention.performer import favor_features, linear_attention
        from layers.attention.scatterbrain import WindowSupport

        k, v = repeat_kv_heads(q, k, v)
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, vf = q.float(), k.float(), v.float()
            phi_q, stab = favor_features(qf, self.features.weight, is_query=True)
            phi_k, _ = favor_features(kf, self.features.weight, is_query=False)
            phi_k = phi_k * real[:, None, :, None]
            v1 = with_ones(vf)
            support = WindowSupport(qf, kf, self.window, True, None if bool(real.all()) else real)
            top = torch.maximum(stab, support.top()).detach()
            lr_scale = torch.exp(stab - top)
            acc = linear_attention(phi_q, phi_k, v1, True, self.chunk, self.sum) * lr_scale
            acc = acc + support.correction(phi_q * lr_scale, phi_k, v1, top)
        return normalise(acc).to(q.dtype)

    def _trim(self) -> None:
        """Move the keys older than the window into the sum."""
        from layers.attention.common import with_ones
        from layers.attention.performer import favor_features

        drop = self.keys.shape[2] - (self.window - 1)
        if drop <= 0:
            return
        k, v, real = self.keys[:, :, :drop], self.values[:, :, :drop], self.real[:, :drop]
        group = self.heads // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        with torch.autocast(k.device.type, enabled=False):
            phi_k, _ = favor_features(k.float(), self.features.weight, is_query=False)
            step = (phi_k * real[:, None, :, None]).transpose(-1, -2) @ with_ones(v.float())
        self.sum = step if self.sum is None else self.sum + step
        self.keys, self.values, self.real = self.keys[:, :, drop:], self.values[:, :, drop:], self.real[:, drop:]

    def _drop_last(self, n: int) -> None:
        super()._drop_last(n)
        self.real = self.real[:, :-n]

    def get_max_length(self) -> int:
        return -1  # the sum covers every position

    def reset(self) -> None:
        super().reset()
        self.real = self.sum = None

    def _rows(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values, self.real = fn(self.keys), fn(self.values), fn(self.real)
            self.sum = None if self.sum is None else fn(self.sum)


def last_of_each_bucket(buckets: torch.Tensor, pos: torch.Tensor, chunk: int, span: int) -> torch.Tensor:
    """(..., n) bool: the `chunk` latest positions (pos >= 0; -1 marks a filler) of each bucket, per row."""
    n = pos.shape[-1]
    code = torch.where(pos >= 0, buckets * span + pos, -1)  # fillers last in the descending order
    sorted_code, order = code.sort(-1, descending=True)
    bucket = torch.where(sorted_code >= 0, sorted_code // span, -1)
    idx = torch.arange(n, device=pos.device).expand_as(bucket)
    starts = torch.ones_like(bucket, dtype=torch.bool)
    starts[..., 1:] = bucket[..., 1:] != bucket[..., :-1]
    first = torch.where(starts, idx, 0).cummax(-1).values  # where each bucket's run begins
    keep_sorted = (idx - first < chunk) & (sorted_code >= 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def decoding_state(kernel) -> CacheLayerMixin | None:
    """A fresh decoding state for this attention kind, or None when it keeps every key (a DynamicLayer)."""
    make = getattr(kernel, "decode_state", None)
    return make() if make is not None else None


def install_states(cache, attentions) -> None:
    """Give each layer of a fresh transformers cache (nothing stored yet) the decoding state its attention kind
    chooses, where the cache would keep every key in a plain DynamicLayer. `attentions`: the model's SelfAttention
    modules in layer order. Other caches (static, offloaded, sliding, a cache already holding keys) are left as
    they are: the kinds then read the keys such a cache returns."""
    layers = getattr(cache, "layers", None)
    if layers is None or getattr(cache, "offloading", False):
        return
    if any(getattr(layer, "is_initialized", True) for layer in layers):
        return
    if not layers:
        if getattr(cache, "layer_class_to_replicate", None) is not DynamicLayer:
            return
        states = [decoding_state(attn.kernel) for attn in attentions]
        if all(s is None for s in states):
            return
        cache.layers = [DynamicLayer() if s is None else s for s in states]
        cache.layer_class_to_replicate = None
        return
    for i, (layer, attn) in enumerate(zip(layers, attentions, strict=False)):  # (a cache may hold more)
        if type(layer) is DynamicLayer:
            state = decoding_state(attn.kernel)
            if state is not None:
                layers[i] = state
