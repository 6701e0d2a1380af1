"""Pure-PyTorch HGRN2 scan: the per-step loop that is the oracle, and a chunked form fast enough for CPU.

Both work on a resolved gate: g = log(lambda) and the key k = 1 - lambda, made by `hgrn2_gate`.
Shapes: q, k, g [B, T, H, K]; v [B, T, H, V]; state [B, H, K, V]. They compute in float32, or in
float64 when given float64 (that is how the tests use them as the oracle), and autograd does the rest.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def hgrn2_gate(f: Tensor, lower_bound: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log(lambda) and k = 1 - lambda from forget logits f and the layer's lower bound b.

    lambda = b + (1 - b) * sigmoid(f) is formed in log space, so a gate near 0 never underflows, and
    k = (1 - b) * sigmoid(-f) never suffers the cancellation of 1 - lambda near lambda = 1.
    `lower_bound` is [H, K] (or broadcastable to f); None means no bound (the first layer).
    """
    f = f.to(torch.promote_types(f.dtype, torch.float32))
    if lower_bound is None:
        return F.logsigmoid(f), torch.sigmoid(-f)
    b = lower_bound.to(f.dtype)
    log_lambda = torch.logaddexp(b.log(), torch.log1p(-b) + F.logsigmoid(f))
    return log_lambda, (1 - b) * torch.sigmoid(-f)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def naive_recurrence(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t; o_t = scale * q_t S_t, one step at a time."""
    B, T, H, K = q.shape
    dtype = _compute_dtype(q)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(T):
        state = g[:, t].exp()[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    return torch.stack(outputs, 1), state


def chunked_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 16,
    block_size: int = 8,
) -> tuple[Tensor, Tensor]:
    """The same recurrence, chunk by chunk: exact, and every exponent it takes is <= 0.

    Inside a chunk o_t = sum_{s<=t} (q_t . (k_s * exp(G_t - G_s))) v_s, G the in-chunk cumulative log
    gate. exp(G_t) * exp(-G_s) would overflow with gates near 0, so the chunk is cut into blocks and
    each query block b is anchored at its first step a_b: for keys of earlier blocks the decay splits
    into exp(G_t - G_a) * exp(G_a - G_s), both <= 1, and becomes a matmul. Pairs inside one block take
    their decay elementwise. Between chunks the state carries the rest.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, c = chunk_size, block_size
    if C % c:
        raise ValueError(f"chunk_size {C} must be a multiple of block_size {c}")
    nb = C // c
    dtype = _compute_dtype(q)
    pad = -T % C
    # Padded steps have k = 0 and g = 0 (lambda = 1): they leave the state as it is.
    q, k, v, g = (F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    N = (T + pad) // C
    # [B, T, H, D] -> [B, H, N, C, D]
    q, k, v, g = (x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4) for x in (q, k, v, g))
    G = g.cumsum(dim=3)

    blocked = lambda x: x.unflatten(3, (nb, c))  # [B, H, N, C, D] -> [B, H, N, nb, c, D]
    anchor = G[..., ::c, :]  # [B, H, N, nb, K]
    q_anchored = blocked(q * (G - anchor.repeat_interleave(c, dim=3)).exp())
    earlier = torch.arange(C, device=q.device) < torch.arange(0, C, c, device=q.device)[:, None]  # [nb, C]
    k_log_decay = (anchor[..., :, None, :] - G[..., None, :, :]).masked_fill(~earlier[..., None], float("-inf"))
    k_anchored = k[..., None, :, :] * k_log_decay.exp()  # [B, H, N, nb, C, K]
    scores = q_anchored @ k_anchored.transpose(-1, -2)  # [B, H, N, nb, c, C]

    in_block = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    Gb, qb, kb = blocked(G), blocked(q), blocked(k)
    pair_log_decay = (Gb[..., :, None, :] - Gb[..., None, :, :]).masked_fill(~in_block[..., None], float("-inf"))
    diagonal = (qb[..., :, None, :] * kb[..., None, :, :] * pair_log_decay.exp()).sum(-1)  # [B, H, N, nb, c, c]
    own_block = torch.eye(nb, dtype=dtype, device=q.device)[:, None, :, None]  # [nb, 1, nb, 1]
    scores = scores + (diagonal[..., None, :] * own_block).flatten(-2)
    out_intra = scores.flatten(3, 4) @ v  # scores [B, H, N, C, C]

    q_from_start = q * G.exp()
    k_to_end = k * (G[..., -1:, :] - G).exp()
    chunk_decay = G[..., -1, :].exp()[..., None]  # [B, H, N, K, 1]
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    out_inter = []
    for n in range(N):
        out_inter.append(q_from_start[:, :, n] @ state)
        state = chunk_decay[:, :, n] * state + k_to_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    out = (out_intra + torch.stack(out_inter, 2)) * scale
    out = out.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return out, state
