"""An independent float64 numpy rendering of the DeepSeek-V3 equations, written from the reports, for tests.

It shares no code with moe_jax: RoPE by complex multiplication, attention by explicit loops over heads,
routing and experts by loops over tokens. Parameters are read from moe_jax's (unrolled) param tree.
"""

import math

import numpy as np


def rmsnorm(x, g, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def silu(x):
  return x / (1 + np.exp(-x))


def yarn_inv_freq(cfg):
  """YaRN NTK-by-parts: keep theta_j below the ramp, theta_j / s above it, blend linearly in between."""
  d, base = cfg.qk_rope_head_dim, cfg.rope_theta
  theta = base ** (-np.arange(0, d, 2) / d)
  rs = cfg.rope_scaling
  if rs is None:
    return theta, 1.0
  def corr(rot):
    return d * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))
  lo, hi = max(math.floor(corr(rs.beta_fast)), 0), min(math.ceil(corr(rs.beta_slow)), d - 1)
  ramp = np.clip((np.arange(d // 2) - lo) / max(hi - lo, 1e-3), 0, 1)
  m = lambda ms: 0.1 * ms * math.log(rs.factor) + 1
  return theta * (1 - ramp) + theta / rs.factor * ramp, m(rs.mscale) / m(rs.mscale_all_dim)


def rope(x, pos, freq):
  """Interleaved pairs as complex numbers: (x0 + i x1) * e^{i p theta}."""
  inv_freq, attn_factor = freq
  z = x[..., 0::2] + 1j * x[..., 1::2]
  ang = pos[:, None] * inv_freq[None]
  shape = (pos.shape[0],) + (1,) * (x.ndim - 2) + (inv_freq.shape[0],)
  z = z * np.exp(1j * ang).reshape(shape) * attn_factor
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def rope_half(x, pos, freq):
  """The half-split layout (the DSA indexer's): pairs (x_j, x_{j + d/2}) as complex numbers."""
  inv_freq, attn_factor = freq
  h = x.shape[-1] // 2
  z = x[..., :h] + 1j * x[..., h:]
  shape = (pos.shape[0],) + (1,) * (x.ndim - 2) + (inv_freq.shape[0],)
  z = z * np.exp(1j * pos[:, None] * inv_freq[None]).reshape(shape) * attn_factor
  return np.concatenate([z.real, z.imag], axis=-1)


def layernorm(x, g, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b


def index_selection(p, x, cq, pos, seg, cfg, freq):
  """DSA's lightning indexer: for each query t the set of the top-`index_topk` visible tokens by
  I_t,s = sum_j w_t,j ReLU(q_t,j . k_s / sqrt(D^I)), w = weights_proj(x) / sqrt(H^I)."""
  T, R, Di, Hi = x.shape[0], cfg.qk_rope_head_dim, cfg.index_head_dim, cfg.index_n_heads
  q = np.einsum("tq,qhd->thd", cq, p["wq_b"])
  q = np.concatenate([rope_half(q[..., :R], pos, freq), q[..., R:]], -1)
  k = layernorm(x @ p["wk"], p["k_norm"]["scale"], p["k_norm"]["bias"])
  k = np.concatenate([rope_half(k[..., :R], pos, freq), k[..., R:]], -1)
  w = (x @ p["weights_proj"]) / math.sqrt(Hi)
  chosen = []
  for t in range(T):
    js = [j for j in range(t + 1) if seg[j] == seg[t]]
    score = {j: sum(w[t, h] * max(q[t, h] @ k[j] / math.sqrt(Di), 0.0) for h in range(Hi)) for j in js}
    chosen.append(set(sorted(js, key=lambda j: -score[j])[:cfg.index_topk]))
  return chosen


def mla(p, x, pos, seg, cfg, scale, freq):
  T = x.shape[0]
  H, N = cfg.num_attention_heads, cfg.qk_nope_head_dim
  if cfg.q_lora_rank is not None:
    cq = rmsnorm(x @ p["wq_a"], p["q_norm"]["scale"], 1e-6)
    qn, qr = np.einsum("tq,qhn->thn", cq, p["wq_b_nope"]), np.einsum("tq,qhr->thr", cq, p["wq_b_rope"])
  else:
    qn, qr = np.einsum("td,dhn->thn", x, p["wq_nope"]), np.einsum("td,dhr->thr", x, p["wq_rope"])
  qr = rope(qr, pos, freq)
  ckv = rmsnorm(x @ p["w_dkv"], p["kv_norm"]["scale"], 1e-6)
  kr = rope(x @ p["w_kr"], pos, freq)
  kn, v = np.einsum("tc,chn->thn", ckv, p["w_uk"]), np.einsum("tc,chv->thv", ckv, p["w_uv"])
  chosen = index_selection(p["indexer"], x, cq, pos, seg, cfg, freq) if cfg.get("index_n_heads") else None
  out = np.zeros((T, H, v.shape[-1]))
  for h in range(H):
    for t in range(T):
      js = [j for j in range(t + 1) if seg[j] == seg[t] and (chosen is None or j in chosen[t])]
      s = np.array([(qn[t, h] @ kn[j, h] + qr[t, h] @ kr[j]) * scale for j in js])
      w = np.exp(s - s.max())
      w /= w.sum()
      out[t, h] = sum(wi * v[j, h] for wi, j in zip(w, js))
  return np.einsum("thv,hvd->td", out, p["wo"])


def gqa(p, x, pos, seg, cfg, scale, freq):
  """Multi-head / grouped-query attention with MLA's head dims: RoPE on the last qk_rope_head_dim of each head;
  query head h reads key/value head h // (H / kv heads)."""
  T = x.shape[0]
  H, N = cfg.num_attention_heads, cfg.qk_nope_head_dim
  q, k, v = (np.einsum("td,dhe->the", x, p[n]) for n in ("wq", "wk", "wv"))
  q = np.concatenate([q[..., :N], rope(q[..., N:], pos, freq)], -1)
  k = np.concatenate([k[..., :N], rope(k[..., N:], pos, freq)], -1)
  group = H // k.shape[1]
  out = np.zeros((T, H, v.shape[-1]))
  for h in range(H):
    for t in range(T):
      js = [j for j in range(t + 1) if seg[j] == seg[t]]
      s = np.array([q[t, h] @ k[j, h // group] * scale for j in js])
      w = np.exp(s - s.max())
      w /= w.sum()
      out[t, h] = sum(wi * v[j, h // group] for wi, j in zip(w, js))
  return np.einsum("thv,hvd->td", out, p["wo"])


def swiglu(p, x):
  return (silu(x @ p["wi_gate"]) * (x @ p["wi_up"])) @ p["wo"]


def route(logits, bias, cfg):
  """One token: V3 sigmoid + noaux_tc group-limited top-K. Returns (experts, weights)."""
  s = 1 / (1 + np.exp(-logits))
  b = s + bias
  G, M = cfg.n_group, cfg.n_routed_experts // cfg.n_group
  gscore = [np.sort(b[g * M:(g + 1) * M])[-2:].sum() for g in range(G)]
  kept = np.argsort(gscore)[::-1][: cfg.topk_group]
  cand = [e for g in kept for e in range(g * M, (g + 1) * M)]
  chosen = sorted(cand, key=lambda e: -b[e])[: cfg.num_experts_per_tok]
  w = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor
  return chosen, w


def moe(p, x, cfg):
  out = np.zeros_like(x)
  bias = p["router"].get("e_score_correction_bias", np.zeros(cfg.n_routed_experts))
  for t in range(x.shape[0]):
    chosen, w = route(x[t] @ p["router"]["kernel"], bias, cfg)
    for e, we in zip(chosen, w):
      out[t] += we * ((silu(x[t] @ p["wi_gate"][e]) * (x[t] @ p["wi_up"][e])) @ p["wo"][e])
  return out + swiglu(p["shared_experts"], x)


def block(p, x, pos, seg, cfg, scale, freq):
  eps = cfg.rms_norm_eps
  attn = mla if cfg.get("attention_type", "mla") == "mla" else gqa
  h = x + attn(p["attn"], rmsnorm(x, p["attn_norm"]["scale"], eps), pos, seg, cfg, scale, freq)
  f_in = rmsnorm(h, p["ffn_norm"]["scale"], eps)
  return h + (moe(p["moe"], f_in, cfg) if "moe" in p else swiglu(p["mlp"], f_in))


def forward(params, tokens, cfg, pos=None, seg=None):
  """One sequence [T]: (logits [T, V], mtp_logits [J, T, V]) per the V3 report, eqs. 21-23 for MTP.
  params: the params tree with each router's e_score_correction_bias merged in (helpers.merged_params)."""
  T = tokens.shape[0]
  freq = yarn_inv_freq(cfg)
  scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
  if cfg.rope_scaling is not None:
    scale *= (0.1 * cfg.rope_scaling.mscale_all_dim * math.log(cfg.rope_scaling.factor) + 1) ** 2
  pos = np.arange(T) if pos is None else pos
  seg = np.ones(T, int) if seg is None else seg
  eps = cfg.rms_norm_eps
  E, head = params["embedding"], params["lm_head"][:, :cfg.vocab_size]  # the true vocabulary's columns
  x = E[tokens]
  for i in range(cfg.first_k_dense_replace):
    x = block(params[f"dense_layers_{i}"], x, pos, seg, cfg, scale, freq)
  for i in range(cfg.num_hidden_layers - cfg.first_k_dense_replace):
    x = block(params[f"moe_layers_{i}"], x, pos, seg, cfg, scale, freq)
  h = rmsnorm(x, params["final_norm"]["scale"], eps)
  logits = h @ head
  mtp = []
  for k in range(1, cfg.num_nextn_predict_layers + 1):
    p = params[f"mtp_{k - 1}"]
    nxt = np.concatenate([tokens[k:], np.zeros(k, int)])[:T]
    hp = np.concatenate([rmsnorm(E[nxt], p["enorm"]["scale"], eps), rmsnorm(h, p["hnorm"]["scale"], eps)], -1)
    hk = block(p["block"], hp @ p["eh_proj"], pos, seg, cfg, scale, freq)
    h = rmsnorm(hk, p["head_norm"]["scale"], eps)
    mtp.append(h @ head)
  return logits, np.stack(mtp) if mtp else None
