"""Whole-model decoding over latent caches, sampling, generation and MTP speculative decoding.

References are independent of the code under test: the full-sequence `Transformer.apply` (logits, MTP logits,
greedy continuation recomputed from scratch at every step), a numpy rendering of temperature / top-k / top-p,
and exact token distributions enumerated with the full forward for the statistical test.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from helpers import init_params, random_bias, tiny_config
from moe_jax.inference import Generator, Sampling, token_probs
from moe_jax.inference import inference_config, init_cache
from moe_jax.inference.scoring import evaluate_perplexity
from moe_jax.model import Transformer


def _small_vocab_model(vocab: int, seed: int = 0, **overrides):
  """A debug model with a tiny vocabulary (drafts get accepted often) and a wide init (peaked distributions)."""
  cfg = tiny_config(vocab_size=vocab, dtype="float32", initializer_range=0.15, num_hidden_layers=2, **overrides)
  model, variables = init_params(cfg, seed)
  return cfg, model, random_bias(variables)


def test_cached_prefill_and_decode_equal_full_forward():
  """Scanned (stacked) parameters, decoded by the same Transformer (nn.scan over stacked caches); the absorbed
  and naive attention forms are compared per layer in test_inference_cache.py, and unrolled parameters are
  decoded by the generation tests below."""
  cfg = tiny_config(dtype="float32", scan_layers=True, num_hidden_layers=3, initializer_range=0.1)
  model, variables = init_params(cfg, seed=3)
  variables = random_bias(variables)
  B, T, P = 2, 11, 5
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
  full, aux = jax.jit(model.apply)(variables, tokens)
  decoder = Transformer(inference_config(cfg))
  step = jax.jit(lambda toks, c: decoder.apply(variables, toks, cache=c))
  mtp_step = jax.jit(lambda h, toks, c: decoder.apply(variables, h, toks, c, method="mtp_step"))
  caches = init_cache(cfg, B, 16)
  out, out_aux, caches = step(tokens[:, :P], caches)
  logits, hidden = [out], [out_aux["hidden"]]
  for t in range(P, T):
    out, out_aux, caches = step(tokens[:, t:t + 1], caches)
    logits.append(out)
    hidden.append(out_aux["hidden"])
  chex.assert_trees_all_close(jnp.concatenate(logits, 1), full, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(caches.length_B, [T, T])
  # MTP over its own cache: position i reads h_i and t_{i+1}; in two chunks (prefill + 1-token steps).
  nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  h = jnp.concatenate(hidden, 1)
  mtp_a, _, caches = mtp_step(h[:, :7], nxt[:, :7], caches)
  mtp_b, _, caches = mtp_step(h[:, 7:], nxt[:, 7:], caches)
  got = jnp.concatenate([mtp_a, mtp_b], 1)[:, :T - 1]  # the last has no real t_{i+1}
  chex.assert_trees_all_close(got, aux["mtp_logits"][0][:, :T - 1], atol=2e-5, rtol=1e-5)


def _np_filtered_probs(logits, temperature, top_k, top_p):
  """float64 numpy reference for temperature -> top-k -> top-p (nucleus) -> renormalise; greedy = argmax."""
  logits = np.asarray(logits, np.float64)
  if temperature <= 0:
    return np.eye(logits.shape[-1])[logits.argmax(-1)]
  out = []
  for row in logits / temperature:
    order = np.argsort(-row)
    keep = np.zeros(row.shape, bool)
    kept = order[:top_k] if top_k else order
    p = np.exp(row[kept] - row[kept].max())
    p /= p.sum()
    mass = 0.0
    for j, pj in zip(kept, p):
      if mass >= top_p:
        break
      keep[j] = True
      mass += pj
    q = np.where(keep, np.exp(row - row.max()), 0.0)
    out.append(q / q.sum())
  return np.stack(out)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 4, 0.6)])
def test_token_probs_match_numpy_reference(temperature, top_k, top_p):
  logits = jax.random.normal(jax.random.key(4), (6, 11)) * 2.0
  got = jax.jit(token_probs)(logits, temperature, top_k, top_p)
  np.testing.assert_allclose(got, _np_filtered_probs(logits, temperature, top_k, top_p), atol=1e-6)


@pytest.fixture(scope="module")
def small_vocab():
  cfg, model, variables = _small_vocab_model(vocab=16, seed=1)
  return cfg, model, variables, Generator(variables, cfg)


def _last_logits_fn(model, variables):
  """prefixes (list of id lists) -> float64 logits after each prefix, from the full forward (causal, so right
  padding to one length changes nothing before it; one compilation)."""
  apply = jax.jit(lambda toks: model.apply(variables, toks, mtp=False)[0])

  def fn(prefixes):
    padded = np.zeros((bucket_rows(len(prefixes)), 32), np.int32)
    for i, p in enumerate(prefixes):
      padded[i, :len(p)] = p
    logits = np.asarray(apply(padded), np.float64)
    return np.stack([logits[i, len(p) - 1] for i, p in enumerate(prefixes)])

  return fn


def bucket_rows(n):
  return 64 if n <= 64 else n


def _greedy_reference(last_logits, prompt, n):
  """Greedy continuation recomputing the full forward over the whole sequence at every step."""
  toks = list(prompt)
  for _ in range(n):
    toks.append(int(np.argmax(last_logits([toks])[0])))
  return toks[len(prompt):]


def test_greedy_plain_and_speculative_equal_full_forward_greedy(small_vocab):
  cfg, model, variables, gen = small_vocab
  prompts = [[1, 5, 9, 2, 3], [7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
  N = 10
  last_logits = _last_logits_fn(model, variables)
  want = [_greedy_reference(last_logits, p, N) for p in prompts]
  plain = gen.generate(prompts, max_new_tokens=N)
  assert plain.tokens == want
  assert plain.finish_reason == ["max_new_tokens"] * 3
  assert plain.stats["tokens_per_step"] == 1.0
  spec = gen.generate(prompts, max_new_tokens=N, speculative=True)
  assert spec.tokens == want
  # The acceptance path must have been exercised, and each accepted draft saves a main-model step.
  s = spec.stats
  assert 0 < s["accepted"] <= s["drafted"] and s["acceptance_rate"] == s["accepted"] / s["drafted"]
  assert 3 * (N - 1) - s["accepted"] <= s["main_model_steps"] < 3 * (N - 1)
  assert s["tokens_per_step"] > 1.0
  # Left-padded array input gives the same continuations.
  P = max(map(len, prompts))
  padded = np.zeros((3, P), np.int32)
  for i, p in enumerate(prompts):
    padded[i, P - len(p):] = p
  left = gen.generate(padded, lengths=[len(p) for p in prompts], padding_side="left", max_new_tokens=N,
                      speculative=True)
  assert left.tokens == want


def test_speculative_drafts_are_the_full_forward_mtp_argmax():
  """Greedy drafting, step by step: each draft is the argmax of the MTP module's full-forward logits at the
  position before the newest token (MTP at j reads t_{j+1} and predicts t_{j+2}), accepted iff it is the next
  greedy token; an acceptance skips the bonus token's draft. So the drafted and accepted counts are fixed by the
  full forward, and they check that generation feeds the MTP module its prompt at the right positions (the
  previous generator ran the MTP prefill at offset slots, attending to empty ones: 22 drafted / 5 accepted here
  against the full forward's 25 / 2)."""
  cfg, model, variables = _small_vocab_model(vocab=6, seed=2)  # drafts often accepted
  prompts = [[1, 5, 3, 2, 3], [1, 2], [3, 1, 4, 1, 5, 3, 2, 0, 5, 3, 5]]
  N = 10
  out = Generator(variables, cfg).generate(prompts, max_new_tokens=N, speculative=True)
  mtp_logits = jax.jit(lambda t: model.apply(variables, t)[1]["mtp_logits"][0])
  drafted = accepted = 0
  for prompt, generated in zip(prompts, out.tokens):
    seq = prompt + generated
    mtp_TV = np.asarray(mtp_logits(jnp.asarray([seq + [0] * (32 - len(seq))])))[0]
    n = len(prompt)  # index of the newest token: the prefill's
    while n - len(prompt) + 1 < N:
      drafted += 1
      hit = int(np.argmax(mtp_TV[n - 1])) == seq[n + 1]
      accepted += hit
      n += 2 if hit else 1
  assert 0 < accepted < drafted
  assert (out.stats["drafted"], out.stats["accepted"]) == (drafted, accepted)


def test_stop_tokens_and_one_compile_per_bucket(small_vocab):
  cfg, model, variables, gen = small_vocab
  prompt = [2, 4, 6]
  free = gen.generate([prompt, [5]], max_new_tokens=12)
  stop = free.tokens[0][4]
  first = free.tokens[0].index(stop)
  traces = gen.traces[0]
  # Different prompt lengths (same bucket), sampling settings and stop tokens: no new compilation.
  out = gen.generate([prompt + [1], [5]], max_new_tokens=12, stop_tokens=[stop])
  out = gen.generate([prompt, [5]], max_new_tokens=12, stop_tokens=[stop, 99])
  assert out.tokens[0] == free.tokens[0][:first + 1] and out.finish_reason[0] == "stop_token"
  gen.generate([prompt, [5, 6]], max_new_tokens=9, sampling=Sampling(0.8, 3, 0.9), seed=1)
  assert gen.traces[0] == traces


@pytest.mark.parametrize("speculative", [False, True])
def test_sampling_matches_the_target_distribution(speculative):
  """Chi-square of the first three sampled tokens against the exact joint distribution from the full forward.

  With speculative decoding the second token is MTP's draft accepted with probability min(1, p/q) or a draw from
  norm(max(p - q, 0)), and the third a bonus token: both must still follow p exactly.
  """
  V, n, temperature, top_p = 6, 6000, 1.0, 0.95
  cfg, model, variables = _small_vocab_model(vocab=V, seed=2)
  prompt = [1, 3, 0, 2]

  last_logits = _last_logits_fn(model, variables)

  def target(prefixes):
    return _np_filtered_probs(last_logits(prefixes), temperature, 0, top_p)

  p1 = target([prompt])[0]
  p2 = target([prompt + [a] for a in range(V)])
  p3 = target([prompt + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
  joint = p1[:, None, None] * p2[:, :, None] * p3
  gen = Generator(variables, cfg)
  out = gen.generate([prompt] * n, max_new_tokens=3, sampling=Sampling(temperature, 0, top_p),
                     speculative=speculative, seed=7)
  seqs = np.asarray(out.tokens)
  counts = np.zeros((V, V, V))
  np.add.at(counts, tuple(seqs.T), 1)

  def chi2_pvalue(expected_probs):
    e, o = expected_probs.ravel() * n, counts.ravel()
    small = e < 5  # pool sparse cells so the chi-square approximation holds
    e = np.append(e[~small], e[small].sum())
    o = np.append(o[~small], o[small].sum())
    return scipy.stats.chisquare(o, e * o.sum() / e.sum()).pvalue

  assert chi2_pvalue(joint) > 1e-3
  if speculative:
    assert 0 < out.stats["acceptance_rate"] < 1
    # The test can fail: the same counts against the distribution at another temperature are rejected.
    q1 = _np_filtered_probs(np.log(np.maximum(p1, 1e-30))[None], 1.5, 0, 1.0)[0]
    assert chi2_pvalue(q1[:, None, None] * p2[:, :, None] * p3) < 1e-6


def test_generate_rejects_bad_requests(small_vocab):
  cfg, _, variables, gen = small_vocab
  with pytest.raises(ValueError, match="max_len=256"):
    gen.generate([[1] * 250], max_new_tokens=10)
  with pytest.raises(ValueError, match="cache holds max_len"):
    gen.generate([[1] * 300], max_new_tokens=1)
  with pytest.raises(ValueError, match="empty"):
    gen.generate([[]], max_new_tokens=1)
  with pytest.raises(ValueError, match="vocab_size=16"):
    gen.generate([[1, 16]], max_new_tokens=1)
  with pytest.raises(ValueError, match="padding_side"):
    gen.generate(np.ones((1, 3), np.int32), lengths=[3], padding_side="middle", max_new_tokens=1)
  with pytest.raises(ValueError, match="top_p"):
    gen.generate([[1]], max_new_tokens=1, sampling=Sampling(1.0, 0, 0.0))
  no_mtp = tiny_config(num_nextn_predict_layers=0)
  p = jax.eval_shape(lambda: Transformer(no_mtp).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))  # no compute
  with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
    Generator(p, no_mtp).generate([[1]], max_new_tokens=2, speculative=True)


def test_perplexity_scores_every_token_once(small_vocab):
  """Windows, padding and batching against a plain per-window full forward (no padding, no batch)."""
  cfg, model, variables, _ = small_vocab
  rng = np.random.default_rng(5)
  docs = [[0] + rng.integers(1, 16, n).tolist() for n in (4, 22, 8)]
  S = 8
  apply = jax.jit(lambda toks: model.apply(variables, toks, mtp=False)[0])
  nll, count = 0.0, 0
  for doc in docs:
    for start in range(0, len(doc) - 1, S):
      window = doc[start:start + S + 1]
      logits = apply(jnp.asarray([window[:-1]]))
      logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), -1)
      nll -= sum(float(logp[i, t]) for i, t in enumerate(window[1:]))
      count += len(window) - 1
  assert count == sum(len(d) - 1 for d in docs)
  got = evaluate_perplexity(variables, cfg, docs, n_bytes=100, seq_len=S, batch_size=3)
  assert got["tokens"] == count
  np.testing.assert_allclose(got["nll"], nll / count, rtol=1e-5)
  np.testing.assert_allclose(got["bits_per_byte"], nll / np.log(2) / 100, rtol=1e-5)
