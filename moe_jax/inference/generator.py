"""Batched generation over the latent cache, plain or with MTP speculative decoding (DeepSeek-V3 report sec. 5.4.3).

    gen = Generator(variables, model_config)       # {"params": ..., "router": ...} (or a params tree)
    result = gen.generate([[1, 5, 9], [1, 7]], max_new_tokens=32, sampling=Sampling(temperature=0.8, top_p=0.9),
                          stop_tokens=[0], speculative=True)
    result.tokens, result.stats["acceptance_rate"], result.stats["tokens_per_step"]

The model decodes itself (`Transformer.apply(..., cache=)`, `method="mtp_step"`); this module drives it. The
whole generation (prefill, then a `lax.while_loop` of decode steps until every sequence has hit a stop token or
`max_new_tokens`) is one jitted function, compiled once per shape bucket: batch, prompt length and
max_new_tokens are each rounded up to a power of two, and the sampling settings, stop tokens and seed are traced.

Speculative decoding. MTP module 1 at position i reads h_i and t_{i+1} and predicts t_{i+2}, so after the main
model has produced the next token x it drafts the one after, d ~ q. One main-model step then runs [x, d]:
  - its logits at x give p(. | ..., x): accept d with probability min(1, p(d) / q(d)); on rejection draw from
    norm(max(p - q, 0)) instead (Leviathan et al. 2023; Chen et al. 2023): the emitted token is distributed
    exactly as p, whatever q is;
  - on acceptance the logits at d give the next token for free: 2 tokens from one main step, else 1.
With temperature 0 both p and q are one-hot (sampling.token_probs), so the rule becomes "accept iff the draft is
the main model's argmax" and the output equals plain greedy decoding token for token. Rejected positions are
rolled back by resetting the cache lengths; the MTP module's cache advances in step with the main model's.
Only the first MTP module drafts (one token per step, as V3 does); deeper modules are not used at inference.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax.inference.sampling import Sampling, sample, token_probs
from moe_jax.model import Transformer
from moe_jax.model.cache import DecodeCache, init_cache, with_length
from moe_jax.model.variables import as_variables

_MIN_BUCKET = 8
_PADDING_SIDES = ("right", "left")


def bucket(n: int, minimum: int = _MIN_BUCKET) -> int:
  """The power of two >= max(n, minimum): one compiled program per bucket."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


class GenerationResult(NamedTuple):
  tokens: list  # per sequence: the generated ids (a stop token that ended the sequence included)
  finish_reason: list  # per sequence: "stop_token" or "max_new_tokens"
  stats: dict  # main_model_steps, generated_tokens, tokens_per_step, drafted, accepted, acceptance_rate, seconds


def _take_at(x_BT, idx_B):
  """x[b, idx[b]] over the second axis, for [B, T, ...] arrays."""
  return jnp.take_along_axis(x_BT, idx_B.reshape((-1,) + (1,) * (x_BT.ndim - 1)), axis=1)[:, 0]


def _write_at(buf_BY, new_BT, at_B):
  return jax.vmap(lambda b, n, a: jax.lax.dynamic_update_slice_in_dim(b, n, a, 0))(buf_BY, new_BT, at_B)


def inference_config(cfg: Any, absorb: bool = True) -> ml_collections.FrozenConfigDict:
  """The config decoding runs under: dropless (with capacity dropping a token's output would depend on the rest of
  the batch), no remat (nothing to differentiate), and the chosen form of attention over the latent cache."""
  c = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return ml_collections.FrozenConfigDict(c | {"moe_dispatch": "dropless", "remat_policy": "none",
                                              "decode_attention": "absorbed" if absorb else "naive"})


class _LoopState(NamedTuple):
  caches: DecodeCache
  out_BY: jax.Array  # generated ids, Y slots (2 of slack for the speculative step)
  n_out_B: jax.Array  # ids generated so far
  done_B: jax.Array
  stopped_B: jax.Array  # ended by a stop token
  last_B: jax.Array  # the newest token: the next main-model input
  draft_B: jax.Array  # speculative: MTP's draft of the token after last_B
  q_BV: jax.Array  # speculative: the distribution the draft was drawn from
  rng: jax.Array
  steps_B: jax.Array  # main-model decode steps taken while the sequence was live
  drafted_B: jax.Array
  accepted_B: jax.Array


def _generate(cfg, speculative: bool, n_bucket: int, variables, prompts_BT, lengths_B, live_B, max_new,
              temperature, top_k, top_p, stops, rng, trace_counter):
  trace_counter[0] += 1  # runs only while tracing
  B, P = prompts_BT.shape
  model = Transformer(cfg)

  def forward(tokens_BT, caches):
    """(logits [B,T,V], final-normed hidden [B,T,D], caches) of the main model over its caches."""
    logits_BTV, aux, caches = model.apply(variables, tokens_BT, cache=caches)
    return logits_BTV, aux["hidden"], caches

  def draft(hidden_BTD, next_BT, caches):
    logits_BTV, _, caches = model.apply(variables, hidden_BTD, next_BT, caches, method=Transformer.mtp_step)
    return logits_BTV, caches

  probs = functools.partial(token_probs, temperature=temperature, top_k=top_k, top_p=top_p)
  is_stop = lambda t_B: jnp.any(t_B[:, None] == stops[None, :], axis=-1)  # noqa: E731
  caches = init_cache(cfg, B, P + n_bucket + 2)

  # Prefill: the right-padded prompts in one pass; pad slots beyond each length are masked and later overwritten.
  logits_BTV, hidden_BTD, caches = forward(prompts_BT, caches)
  caches = with_length(caches, lengths_B, caches.mtp_length_B)  # the MTP block has not run yet
  rng, k_first, k_draft = jax.random.split(rng, 3)
  first_B = sample(k_first, probs(_take_at(logits_BTV, lengths_B - 1)))
  n_out_B = jnp.ones((B,), jnp.int32)
  stopped_B = is_stop(first_B)
  V = cfg.vocab_size
  draft_B, q_BV = jnp.zeros((B,), jnp.int32), jnp.zeros((B, V if speculative else 1), jnp.float32)
  if speculative:  # MTP over the prompt: position i reads h_i and t_{i+1} (the sampled token after the last one)
    next_BT = jnp.pad(prompts_BT[:, 1:], ((0, 0), (0, 1)))
    next_BT = jnp.where(jnp.arange(P)[None] == (lengths_B - 1)[:, None], first_B[:, None], next_BT)
    mtp_logits_BTV, caches = draft(hidden_BTD, next_BT, caches)
    caches = with_length(caches, lengths_B)
    q_BV = probs(_take_at(mtp_logits_BTV, lengths_B - 1))
    draft_B = sample(k_draft, q_BV)
  zeros = jnp.zeros((B,), jnp.int32)
  state = _LoopState(caches, jnp.zeros((B, n_bucket + 2), jnp.int32).at[:, 0].set(first_B), n_out_B,
                     ~live_B | stopped_B | (n_out_B >= max_new), stopped_B, first_B, draft_B, q_BV, rng, zeros, zeros,
                     zeros)

  def emit(s: _LoopState, caches, rng, new_BT, n_new_B, new_length_B) -> _LoopState:
    """Appends the first n_new tokens of new_BT to live sequences, stopping at a stop token or max_new."""
    live_B = ~s.done_B
    n_new_B = jnp.minimum(n_new_B, max_new - s.n_out_B)
    out_BY = jnp.where(live_B[:, None], _write_at(s.out_BY, new_BT, s.n_out_B), s.out_BY)
    last_B = jnp.take_along_axis(new_BT, (n_new_B - 1)[:, None], -1)[:, 0]
    n_out_B = jnp.where(live_B, s.n_out_B + n_new_B, s.n_out_B)
    stopped_B = s.stopped_B | (live_B & is_stop(last_B))  # a stop token can only be last
    caches = with_length(caches, jnp.where(live_B, new_length_B, s.caches.length_B))
    return s._replace(caches=caches, out_BY=out_BY, n_out_B=n_out_B, stopped_B=stopped_B,
                      done_B=s.done_B | stopped_B | (n_out_B >= max_new), last_B=jnp.where(live_B, last_B, s.last_B),
                      rng=rng, steps_B=s.steps_B + live_B)

  def plain_step(s: _LoopState) -> _LoopState:
    rng, key = jax.random.split(s.rng)
    logits_BTV, _, caches = forward(s.last_B[:, None], s.caches)
    tok_B = sample(key, probs(logits_BTV[:, 0]))
    return emit(s, caches, rng, tok_B[:, None], jnp.ones_like(tok_B), s.caches.length_B + 1)

  def speculative_step(s: _LoopState) -> _LoopState:
    rng, k_accept, k_resid, k_bonus, k_draft = jax.random.split(s.rng, 5)
    L_B = s.caches.length_B
    logits_BTV, hidden_BTD, caches = forward(jnp.stack([s.last_B, s.draft_B], 1), s.caches)
    p0_BV, p1_BV = probs(logits_BTV[:, 0]), probs(logits_BTV[:, 1])
    p_draft_B = jnp.take_along_axis(p0_BV, s.draft_B[:, None], -1)[:, 0]
    q_draft_B = jnp.take_along_axis(s.q_BV, s.draft_B[:, None], -1)[:, 0]
    accept_B = jax.random.uniform(k_accept, (B,)) * q_draft_B < p_draft_B  # u < p(d) / q(d)
    resid_BV = jnp.maximum(p0_BV - s.q_BV, 0.0)
    resid_sum_B1 = jnp.sum(resid_BV, -1, keepdims=True)
    resid_BV = jnp.where(resid_sum_B1 > 0, resid_BV / jnp.maximum(resid_sum_B1, 1e-30), p0_BV)
    tok1_B = jnp.where(accept_B, s.draft_B, sample(k_resid, resid_BV))
    tok2_B = sample(k_bonus, p1_BV)
    n_new_B = jnp.where(accept_B & ~is_stop(tok1_B), 2, 1)
    # MTP at positions L (h_L, tok1) and L+1 (h_{L+1}, tok2); the latter is rolled back with the main cache on
    # rejection. MTP at position j predicts t_{j+2}, and the newest token sits at L+1+accept: draft from L+accept.
    mtp_logits_BTV, caches = draft(hidden_BTD, jnp.stack([tok1_B, tok2_B], 1), caches)
    acc_i = accept_B.astype(jnp.int32)
    q_BV = probs(_take_at(mtp_logits_BTV, acc_i))
    s = s._replace(draft_B=jnp.where(s.done_B, s.draft_B, sample(k_draft, q_BV)),
                   q_BV=jnp.where(s.done_B[:, None], s.q_BV, q_BV),
                   drafted_B=s.drafted_B + ~s.done_B, accepted_B=s.accepted_B + (accept_B & ~s.done_B))
    return emit(s, caches, rng, jnp.stack([tok1_B, tok2_B], 1), n_new_B, L_B + 1 + acc_i)

  step = speculative_step if speculative else plain_step
  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), step, state)
  return state.out_BY, state.n_out_B, state.stopped_B, state.steps_B, state.drafted_B, state.accepted_B


def generation_program(cfg: Any, speculative: bool, n_bucket: int, trace_counter: list | None = None):
  """The jitted whole generation for `cfg` (an `inference_config`) and a max_new_tokens bucket: (variables,
  prompts [B, P], lengths [B], live [B], max_new, temperature, top_k, top_p, stop ids [S], rng key) -> (out [B, Y],
  n_out [B], stopped [B], steps [B], drafted [B], accepted [B]). What `Generator` runs, and what
  `moe_jax.aot` compiles ahead of time."""
  return jax.jit(functools.partial(_generate, cfg, speculative, n_bucket,
                                   trace_counter=[0] if trace_counter is None else trace_counter))


class Generator:
  """Generation for one model: compiles once per (batch, prompt, max_new_tokens) bucket and mode.

  variables: {"params": ..., "router": ...} as `Transformer.init` returns them. max_len: the longest sequence (prompt
  + generated) allowed; defaults to the model's max_position_embeddings. absorb: weight-absorbed attention over the
  latent cache (False rebuilds per-head K/V: for checking and benchmarks).
  """

  def __init__(self, variables: Any, model_config: Any, *, max_len: int | None = None, absorb: bool = True):
    self.variables = as_variables(variables)
    self.config = inference_config(model_config, absorb)
    self.max_len = int(max_len or model_config.max_position_embeddings)
    self.traces = [0]  # compilations so far (a test checks one per bucket)
    self._fns: dict = {}

  def _fn(self, speculative: bool, n_bucket: int):
    key = (speculative, n_bucket)
    if key not in self._fns:
      self._fns[key] = generation_program(self.config, speculative, n_bucket, self.traces)
    return self._fns[key]

  def generate(self, prompts, *, max_new_tokens: int, lengths: Sequence[int] | None = None,
               padding_side: str = "right", sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
               speculative: bool = False, seed: int = 0) -> GenerationResult:
    """prompts: a list of id lists, or a padded [B, P] int array with `lengths` (padded on `padding_side`)."""
    rows = self._prompt_rows(prompts, lengths, padding_side)
    sampling = Sampling(*sampling).validate()
    V = self.config.vocab_size
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    for i, r in enumerate(rows):
      if len(r) == 0:
        raise ValueError(f"prompt {i} is empty; start it with at least one token (e.g. <bos>)")
      if len(r) > self.max_len:
        raise ValueError(f"prompt {i} has {len(r)} tokens; the cache holds max_len={self.max_len}")
      if len(r) + max_new_tokens > self.max_len:
        raise ValueError(f"prompt {i} ({len(r)} tokens) + max_new_tokens={max_new_tokens} exceeds the cache "
                         f"max_len={self.max_len}; lower max_new_tokens or raise max_len")
      if min(r) < 0 or max(r) >= V:
        raise ValueError(f"prompt {i} holds ids outside [0, vocab_size={V})")
    if speculative and self.config.num_nextn_predict_layers < 1:
      raise ValueError("speculative decoding drafts with the MTP module, and this model has none "
                       "(num_nextn_predict_layers=0)")
    B, Bb = len(rows), bucket(len(rows), 1)
    Pb, Nb = bucket(max(map(len, rows))), bucket(max_new_tokens)
    prompts_BT = np.zeros((Bb, Pb), np.int32)
    lengths_B = np.ones((Bb,), np.int32)
    for i, r in enumerate(rows):
      prompts_BT[i, :len(r)] = r
      lengths_B[i] = len(r)
    stop_list = sorted(set(int(t) for t in stop_tokens))
    stops = np.full((bucket(len(stop_list)),), -1, np.int32)  # -1 never matches: padding to the bucket
    stops[:len(stop_list)] = stop_list
    t0 = time.perf_counter()
    out = self._fn(bool(speculative), Nb)(
        self.variables, prompts_BT, lengths_B, np.arange(Bb) < B, jnp.int32(max_new_tokens),
        jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
        jnp.asarray(stops), jax.random.key(seed))
    out_BY, n_out_B, stopped_B, steps_B, drafted_B, accepted_B = jax.device_get(out)
    seconds = time.perf_counter() - t0
    tokens = [out_BY[i, :n_out_B[i]].tolist() for i in range(B)]
    generated = int(n_out_B[:B].sum())
    steps = int(steps_B[:B].sum())
    drafted, accepted = int(drafted_B[:B].sum()), int(accepted_B[:B].sum())
    stats = {"generated_tokens": generated, "main_model_steps": steps,
             # the first token of each sequence comes from the prefill pass, not a decode step
             "tokens_per_step": (generated - B) / steps if steps else None,
             "seconds": seconds, "tokens_per_second": generated / seconds}
    if speculative:
      stats |= {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else None}
    reasons = ["stop_token" if stopped_B[i] else "max_new_tokens" for i in range(B)]
    return GenerationResult(tokens, reasons, stats)

  @staticmethod
  def _prompt_rows(prompts, lengths, padding_side) -> list[list[int]]:
    if padding_side not in _PADDING_SIDES:
      raise ValueError(f"padding_side={padding_side!r} is not one of {_PADDING_SIDES}")
    if lengths is None:
      if isinstance(prompts, np.ndarray) or isinstance(prompts, jax.Array):
        raise ValueError("a padded prompt array needs `lengths` (tokens per row)")
      return [list(map(int, r)) for r in prompts]
    arr = np.asarray(prompts)
    if arr.ndim != 2 or len(lengths) != arr.shape[0]:
      raise ValueError(f"padded prompts must be [batch, length] with one length per row; got {arr.shape} and "
                       f"{len(lengths)} lengths")
    if any(not 0 <= n <= arr.shape[1] for n in lengths):
      raise ValueError(f"lengths must lie in [0, {arr.shape[1]}]; got {list(lengths)}")
    if padding_side == "right":
      return [arr[i, :n].tolist() for i, n in enumerate(lengths)]
    return [arr[i, arr.shape[1] - n:].tolist() for i, n in enumerate(lengths)]
