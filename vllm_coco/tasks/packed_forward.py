"""One forward of packed tree rows on top of their parents' KV (tasks/prefix_lm.py, step 3).

A row is a radix-tree node alone, or the node's subtree laid out depth first; each token sees the
row's past (its parent's KV), its own node's earlier tokens and its ancestors' inside the row (a
tree mask). Sliding-window layers get the same mask cut to their window. The transformers pieces
used here (`DynamicCache(ddp_cache_data=...)`, `cache.layers[i].keys/.values`, the per-layer-type
mask mapping) are checked against the installed version by tests/test_prefix_lm.py.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from vllm_coco.core.errors import CocoError


def layer_kinds(config) -> set[str]:
    """The attention kinds of the model's layers: "full_attention" and/or "sliding_attention" (every
    layer windowed when the config has a window and no per-layer types, as Mistral's)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    kinds = set(types) if types else {"sliding_attention" if window is not None else "full_attention"}
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown or ("sliding_attention" in kinds and window is None):
        what = ", ".join(sorted(unknown)) or "sliding_attention without a sliding_window"
        raise CocoError(f"the coco-hf scorer builds full and sliding-window attention masks only, and this model has "
                        f"{what} layers; evaluate it with --backend hf-stock (lm-eval's own hf model)")
    return kinds


def tree_rows(segments, p_len: list[int]):
    """(ids [rows, L], positions [rows, L], see [rows, L, P + L]: query may attend key) of the rows."""
    lens = [sum(len(n.tokens) for n in seg) for seg in segments]
    p_max, l_max, b = max(p_len), max(lens), len(segments)
    ids = torch.zeros(b, l_max, dtype=torch.long)  # [rows, L]
    pos = torch.zeros(b, l_max, dtype=torch.long)  # [rows, L]
    see = torch.zeros(b, l_max, p_max + l_max, dtype=torch.bool)  # [rows, L, P + L]
    diag = torch.arange(l_max)
    see[:, diag, p_max + diag] = True  # every query sees itself (padding rows too: no empty softmax)
    for r, seg in enumerate(segments):
        see[r, : lens[r], : p_len[r]] = True
        ids[r, : lens[r]] = torch.tensor([t for n in seg for t in n.tokens])
        pos[r, : lens[r]] = torch.tensor([n.start + i for n in seg for i in range(len(n.tokens))])
        # which row segment each token is in, and which segments are ancestors-or-self of which
        index = {n.id: k for k, n in enumerate(seg)}
        anc = torch.eye(len(seg), dtype=torch.bool)  # [S, S]: anc[k, j] = segment j is k's ancestor or k
        for k, n in enumerate(seg[1:], 1):
            anc[k] = anc[index[n.parent.id]]
            anc[k, k] = True
        which = torch.repeat_interleave(torch.arange(len(seg)), torch.tensor([len(n.tokens) for n in seg]))
        causal = torch.ones(lens[r], lens[r], dtype=torch.bool).tril_()  # [L_r, L_r]
        see[r, : lens[r], p_max: p_max + lens[r]] = anc[which[:, None], which[None, :]] & causal
    return ids, pos, see


def attention_mask(see: torch.Tensor, pos: torch.Tensor, config, dtype: torch.dtype, device):
    """The additive mask [rows, 1, L, P + L] the model takes: one tensor, or, with full and window
    layers mixed (Qwen2 max_window_layers, Gemma2), HF's per-layer-type mapping."""
    kinds = layer_kinds(config)
    window = getattr(config, "sliding_window", None)
    b, l_max, width = see.shape
    p_max = width - l_max
    masks = {"full_attention": see}
    if "sliding_attention" in kinds:  # a key more than `window` positions back is out of a window layer
        windowed = see
        if p_max + l_max > window:
            keys = torch.cat([torch.arange(p_max).expand(b, p_max), pos], 1)  # [rows, P + L] sequence positions
            windowed = see & (keys[:, None, :] > pos[:, :, None] - window)
            diag = torch.arange(l_max)
            windowed[:, diag, p_max + diag] = True
        masks["sliding_attention"] = windowed
    low = torch.finfo(dtype).min
    masks = {k: torch.zeros(m.shape, dtype=dtype).masked_fill_(~m, low)[:, None].to(device)
             for k, m in masks.items() if k in kinds}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def past_cache(past: list, p_len: list[int], num_layers: int) -> DynamicCache:
    """The rows' parents' KV, right-padded to the longest, as one cache ([rows, kvh, P, d] per layer)."""
    p_max = max(p_len)
    if p_max == 0:
        return DynamicCache()
    layers = []
    for layer in range(num_layers):
        k0 = next(p for p in past if p is not None)[layer][0]
        k = k0.new_zeros(len(past), k0.shape[0], p_max, k0.shape[2])  # [rows, kvh, P, d]
        v = k.clone()
        for r, p in enumerate(past):
            if p is not None:
                k[r, :, : p_len[r]], v[r, :, : p_len[r]] = p[layer]
        layers.append((k, v))
    return DynamicCache(ddp_cache_data=layers)


def path_kv(cache: DynamicCache, nodes, segments, past: list, p_max: int) -> list:
    """Per single-node row with children: per layer (k, v) over the whole path, [kvh, P+L, d]; None
    for leaves and packed rows, whose subtree is done."""
    out = []
    for r, n in enumerate(nodes):
        if not n.children or len(segments[r]) > 1:
            out.append(None)
            continue
        per_layer = []
        for layer, cl in enumerate(cache.layers):
            k = cl.keys[r, :, p_max: p_max + len(n.tokens)]  # [kvh, L_r, d]
            v = cl.values[r, :, p_max: p_max + len(n.tokens)]
            if past[r] is not None:
                k, v = torch.cat([past[r][layer][0], k], 1), torch.cat([past[r][layer][1], v], 1)
            per_layer.append((k.clone(), v.clone()))
        out.append(per_layer)
    return out


def packed_forward(model, conditions, batch, segments, kv: dict, device):
    """One forward of the batch's rows ((condition, node) each; `segments[r]` the row's nodes) on top
    of their parents' KV (`kv`: (condition, node id) -> per layer (k, v)). Returns (hidden
    [rows, L, hidden], path_kv of each row)."""
    nodes = [n for _, n in batch]
    past = [kv[(c, n.parent.id)] if n.parent is not None else None for c, n in batch]
    p_len = [n.start for n in nodes]
    ids, pos, see = tree_rows(segments, p_len)
    mask = attention_mask(see, pos, model.config, model.dtype, device)
    cache = past_cache(past, p_len, len(conditions.widths))
    with conditions.rows([c for c, _ in batch]):
        out = model.model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device),
                          past_key_values=cache, use_cache=True)
    return out.last_hidden_state, path_kv(cache, nodes, segments, past, max(p_len))
