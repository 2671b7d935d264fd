"""Chat-formatted generation: batched with a KV cache, or streamed token by token.

Contract:
- `render_prompt(tokenizer, messages)` applies the chat template with the assistant turn
  opened, exactly as training rendered conversations (same template, same system prompt).
- `generate_batch(model, tokenizer, conversations, ...)` returns one completion per
  conversation, decoded without special tokens, stopping at the tokenizer's EOS / end-of-turn
  token; at most `batch_size` sequences are in flight. Greedy unless `temperature > 0`. Greedy
  answers are HF `generate`'s up to float rounding, from continuous batching with the prompts'
  shared prefix encoded once (`_greedy`); sampling, and caches other than plain full attention,
  run HF `generate` on left-padded batches sorted by length.
- `generate_detailed(...)` is the same, and also returns prompt and generated token counts;
  `on_batch(n)`, when given, is called whenever n more answers are finished (progress bars).
- `stream_reply(...)` yields text pieces as they are produced, for `tunesmith chat`.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import deque
from collections.abc import Iterator

import torch

MIN_SHARED_PREFIX = 16  # tokens: a shorter shared prefix saves less than its own forward costs


def render_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _sampling(temperature: float, top_p: float) -> dict:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def generate_batch(model, tokenizer, conversations: list[list[dict]], *args, **kwargs) -> list[str]:
    return generate_detailed(model, tokenizer, conversations, *args, **kwargs)[0]


@torch.no_grad()
def generate_detailed(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 0.95,
    on_batch=None,
) -> tuple[list[str], list[int], list[int]]:
    """Completions plus, per conversation, prompt tokens and generated tokens (up to the stop token)."""
    encoded = [tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_ids(tokenizer)
    if temperature <= 0 and continuous_batching_applies(model):
        new = _greedy(model, encoded, max_new_tokens, batch_size, eos, on_batch)
    else:
        sampling = _sampling(temperature, top_p)
        new = _hf_generate(model, encoded, max_new_tokens, batch_size, eos, pad_id, sampling, on_batch)
    outputs, generated = [], []
    for tokens in new:
        stop = next((n for n, t in enumerate(tokens) if t in eos), None)
        tokens = tokens if stop is None else tokens[: stop + 1]  # the stop token is generated work too
        generated.append(len(tokens))
        outputs.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return outputs, [len(e) for e in encoded], generated


def _hf_generate(model, encoded, max_new_tokens, batch_size, eos, pad_id, sampling, on_batch=None) -> list[list[int]]:
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    new: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = _left_padded([encoded[i] for i in idx], pad_id)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_id,
            **sampling,
        )
        for row, i in enumerate(idx):
            new[i] = out[row, ids.shape[1] :].tolist()
        if on_batch is not None:
            on_batch(len(idx))
    return new


def _left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def continuous_batching_applies(model) -> bool:
    """Whether greedy decoding runs on `_greedy`: full-attention KV caches under sdpa or eager
    attention. Sliding windows, other attention kernels and prompt-learning adapters keep `generate`."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return False
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except (TypeError, ValueError, AttributeError):  # a config the cache cannot read: leave it to `generate`
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _greedy(model, encoded, max_new_tokens, batch_size, eos, on_batch=None) -> list[list[int]]:
    """New token ids per prompt, greedy, at most `batch_size` rows in flight.

    Prompts are prefilled shortest first; a row that stops leaves and the next prompts join, where a
    fixed batch would wait for its longest answer. The prefix every prompt shares (system prompt,
    instruction, worked examples) is encoded once. The rows' caches sit in buffers with room for the
    tokens to come, so a step writes one column where a growing cache copies itself whole."""
    new: list[list[int]] = [[] for _ in encoded]
    if max_new_tokens <= 0 or not encoded:
        return new
    run = _Runner(model, eos, max_new_tokens)
    shared = _shared_prefix(encoded)
    prefix = run.encode_prefix(shared) if shared else None
    pending = deque(sorted(range(len(encoded)), key=lambda i: len(encoded[i])))
    pool = _Pool(run)
    refill = max(1, batch_size // 4)  # prompts join in groups: a join copies the pool's cache once
    reported = 0
    while pending or pool.live:
        room = batch_size - pool.live
        if pending and (not pool.live or room >= refill):
            idx = [pending.popleft() for _ in range(min(room, len(pending)))]
            group = run.prefill(idx, [encoded[i][len(shared) :] for i in idx], prefix, new)
            pool.rebuild(group)
        elif pool.dead and 4 * pool.dead >= len(pool.rows):
            pool.rebuild()  # finished rows still cost a forward each step until they are dropped
        if pool.live:
            pool.step(new)
        done = len(encoded) - len(pending) - pool.live
        if on_batch is not None and done > reported:
            on_batch(done - reported)
            reported = done
    return new


def _shared_prefix(encoded: list[list[int]]) -> list[int]:
    """The longest token prefix of every prompt (each keeps at least one token of its own)."""
    if len(encoded) < 2:
        return []
    first, n = encoded[0], min(len(e) for e in encoded) - 1
    for seq in encoded[1:]:
        n = next((k for k in range(n) if seq[k] != first[k]), n)
    return first[:n] if n >= MIN_SHARED_PREFIX else []


class _Runner:
    """The model's forward as greedy decoding calls it: which cache keyword it takes, the last
    position's logits only, stop tokens and the token budget."""

    def __init__(self, model, eos: list[int], max_new_tokens: int):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(inner.forward).parameters
        self.model, self.config = model, model.config
        self.device = next(model.parameters()).device
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.eos, self.max_new_tokens = set(eos), max_new_tokens

    def forward(self, ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: cache},
            **self.last_only,
        )
        return out.logits[:, -1]

    def encode_prefix(self, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        ids = torch.tensor([tokens], device=self.device)
        self.forward(ids, torch.ones_like(ids), torch.arange(len(tokens), device=self.device)[None], cache)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def prefill(self, idx: list[int], seqs: list[list[int]], prefix, new: list[list[int]]) -> dict:
        """Encode prompts (after the shared prefix) in one left-padded batch; record each first token."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        ids, mask = _left_padded(seqs, pad_id=0)  # padding is masked out: its id does not matter
        ids, mask = ids.to(self.device), mask.to(self.device)
        if prefix is not None:
            for layer, (k, v) in enumerate(prefix):
                cache.update(k.expand(len(seqs), -1, -1, -1), v.expand(len(seqs), -1, -1, -1), layer)
            mask = torch.cat([mask.new_ones(len(seqs), prefix[0][0].shape[-2]), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as `generate` numbers left-padded rows
        first = self.forward(ids, mask, positions[:, -ids.shape[1] :], cache).argmax(-1)
        going = [self.record(new, i, t) for i, t in zip(idx, first.tolist())]
        return {
            "rows": idx,
            "going": going,
            "kv": [(layer.keys, layer.values) for layer in cache.layers],
            "mask": mask,
            "last": first,
            "positions": positions[:, -1:] + 1,
        }

    def record(self, new: list[list[int]], i: int, token: int) -> bool:
        """Append a generated token; whether the sequence goes on."""
        new[i].append(token)
        return token not in self.eos and len(new[i]) < self.max_new_tokens


class _Pool:
    """The rows being decoded: their KV caches right-aligned in buffers with room to grow, the
    attention mask (0 on padding), each row's next position and last token."""

    def __init__(self, run: _Runner):
        self.run = run
        self.rows: list[int] = []  # prompt index per row
        self.going: list[bool] = []
        self.layers: list = []
        self.mask = self.last = self.positions = None
        self.length = 0

    @property
    def live(self) -> int:
        return sum(self.going)

    @property
    def dead(self) -> int:
        return len(self.going) - self.live

    def rebuild(self, group: dict | None = None) -> None:
        """Copy the rows still going, and those of a newly prefilled group, into fresh buffers."""
        run, device = self.run, self.run.device
        keep = torch.tensor([r for r, g in enumerate(self.going) if g], dtype=torch.long, device=device)
        join = torch.tensor([r for r, g in enumerate(group["going"]) if g] if group else [], dtype=torch.long)
        join = join.to(device)
        if len(keep) + len(join) == 0:
            self.__init__(run)
            return
        old_len = self.length if len(keep) else 0
        length = max(old_len, group["mask"].shape[1] if group else 0)
        capacity = length + run.max_new_tokens  # no row generates more after this point

        def merged(old, fresh, seq_dim):
            return _merge(old, old_len, fresh, keep, join, length, capacity, seq_dim)

        fresh_kv = group["kv"] if group else [(None, None)] * len(self.layers)
        self.layers = self.layers or [None] * len(fresh_kv)
        for li, (fk, fv) in enumerate(fresh_kv):
            old = self.layers[li]
            ok, ov = (old.kbuf, old.vbuf) if old is not None else (None, None)
            # layer by layer, each old buffer dropped at once: the peak is one pool plus one layer
            self.layers[li] = _roomy_layer()(merged(ok, fk, 2), merged(ov, fv, 2), length)
            fresh_kv[li] = None
        self.mask = merged(self.mask, group and group["mask"], 1)
        self.last = merged(self.last, group and group["last"], None)
        self.positions = merged(self.positions, group and group["positions"], None)
        self.rows = [self.rows[r] for r in keep.tolist()] + [group["rows"][r] for r in join.tolist()]
        self.going = [True] * len(self.rows)
        self.length = length

    def step(self, new: list[list[int]]) -> None:
        from transformers.cache_utils import Cache

        if self.length == self.mask.shape[1]:
            self.rebuild()  # out of room (rows outlived the budget a rebuild reserves): make more
        self.mask[:, self.length] = 1
        cache = Cache(layers=self.layers)
        logits = self.run.forward(self.last[:, None], self.mask[:, : self.length + 1], self.positions, cache)
        self.length += 1
        self.last, self.positions = logits.argmax(-1), self.positions + 1
        for r, token in enumerate(self.last.tolist()):
            if self.going[r]:
                self.going[r] = self.run.record(new, self.rows[r], token)


def _merge(old, old_len, fresh, keep, join, length, capacity, seq_dim) -> torch.Tensor:
    """Rows `keep` of `old` (filled up to `old_len`) over rows `join` of `fresh`, right-aligned to end
    at column `length` of a zeroed buffer of `capacity` columns (zeros: padding must stay finite,
    since a masked score times a NaN value is still NaN). `seq_dim=None`: plain rows, no columns."""
    if seq_dim is None:
        return torch.cat([_select(t, rows) for t, rows in ((old, keep), (fresh, join)) if len(rows)])
    parts = [_select(old.narrow(seq_dim, 0, old_len), keep)] if len(keep) else []
    parts += [_select(fresh, join)] if len(join) else []
    shape = list(parts[0].shape)
    shape[0], shape[seq_dim] = len(keep) + len(join), capacity
    buf = torch.zeros(shape, dtype=parts[0].dtype, device=parts[0].device)
    row = 0
    for part in parts:
        filled = part.shape[seq_dim]
        buf.narrow(0, row, len(part)).narrow(seq_dim, length - filled, filled).copy_(part)
        row += len(part)
    return buf


def _select(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return t if len(rows) == len(t) else t.index_select(0, rows)  # all rows: no copy of a copy


@functools.cache
def _roomy_layer():
    """The cache layer class, made on first use so that importing this module stays light."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A DynamicLayer over a buffer with room for more tokens: `update` writes the new
        columns in place, where DynamicLayer concatenates (a copy of the whole cache per step)."""

        def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int):
            super().__init__()
            self.kbuf, self.vbuf, self.length = kbuf, vbuf, length
            self.device, self.is_initialized = kbuf.device, True
            self._views()

        def _views(self) -> None:
            self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            self.kbuf[:, :, self.length : self.length + n] = key_states
            self.vbuf[:, :, self.length : self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

    return RoomyLayer


def stream_reply(
    model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95
) -> Iterator[str]:
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        input_ids=ids["input_ids"].to(device),
        attention_mask=ids["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **_sampling(temperature, top_p),
    )
    worker = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs), daemon=True)
    worker.start()
    yield from streamer
    worker.join()
