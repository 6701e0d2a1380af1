"""The HGRN2 backbone: token mixer (HGRU2), channel mixer (GLU), pre-norm blocks and the layer stack.

Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion". Per layer, with heads of size
e = expand_ratio: q = SiLU(x W_q), lambda = b + (1 - b) sigmoid(x W_f), i = x W_i,
S_t = Diag(lambda_t) S_{t-1} + (1 - lambda_t)^T i_t, o_t = q_t S_t, y = W_o RMSNorm(o). The lower
bounds b rise with depth (a softmax over layers, cumulated), so higher layers remember longer.
The heads (LM, image, sequence classifier) embed their inputs and call `HGRN2`.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from kernels import hgrn2_scan, hgrn2_step


@dataclass
class HGRN2Config:
    """Sizes and options of the backbone; the YAML configs set these under `model.init_args.backbone`."""

    d_model: int = 512
    n_layers: int = 8
    expand_ratio: int = 64
    """Head size e: the state of a head is e x e, and there are d_model / e heads."""
    mlp_hidden: int | None = None
    """GLU hidden size; None picks 8/3 d_model rounded up to a multiple of 64 (SwiGLU's usual size)."""
    mlp_act: Literal["silu", "gelu", "none"] = "silu"
    """"silu" is SwiGLU (fla); "none" the bilinear GLU of the official code."""
    norm: Literal["rmsnorm", "layernorm", "batchnorm"] = "rmsnorm"
    """Norm of the blocks and the final norm; "batchnorm" (over channels) is what the LRA recipes use,
    and `--trainer.sync_batchnorm true` makes it the paper's SyncBatchNorm under DDP."""
    norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path: float = 0.0
    """Stochastic depth: the rate rises linearly to this value at the last layer."""
    use_lower_bound: bool = True
    direction: Literal["causal", "bidirectional", "2d"] = "causal"
    """"bidirectional" (vision, LRA): a forward and a reverse scan, summed. "2d": the sequence is a
    row-major grid (see `grid`) scanned forward and backward along rows and along columns, summed."""
    grid: tuple[int, int] | None = None
    """(rows, columns) of the token grid, for direction "2d"."""
    scale: float | None = None
    """Factor on q inside the scan; None is expand_ratio ** -0.5 (fla), 1.0 is the official code's."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        sizes = {"d_model": self.d_model, "n_layers": self.n_layers, "expand_ratio": self.expand_ratio,
                 "mlp_hidden": 1 if self.mlp_hidden is None else self.mlp_hidden}
        if any(value < 1 for value in sizes.values()):
            raise ValueError(f"backbone sizes must be positive, got {sizes}")
        if self.d_model % self.expand_ratio:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of expand_ratio ({self.expand_ratio}): "
                f"the heads are d_model / expand_ratio"
            )
        if self.direction == "2d" and self.grid is None:
            raise ValueError('direction "2d" needs grid: (rows, columns) of the token grid')
        if not 0 <= self.dropout < 1 or not 0 <= self.drop_path < 1:
            raise ValueError(f"dropout and drop_path must be in [0, 1), got {self.dropout} and {self.drop_path}")

    @property
    def n_heads(self) -> int:
        return self.d_model // self.expand_ratio

    @property
    def glu_hidden(self) -> int:
        return self.mlp_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class TokenBatchNorm(nn.Module):
    """BatchNorm over the channels of [B, T, d] tokens (statistics over batch and time), as BatchNorm1d of the
    [B T, d] rows: no transposes, and the output keeps the input's layout (a transposed output made the compiled
    blocks' next linear view a non-contiguous tensor).

    It holds a plain BatchNorm1d rather than being one: `--trainer.sync_batchnorm true` swaps every
    BatchNorm module for a SyncBatchNorm, which would drop an overridden forward.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)


def make_norm(config: HGRN2Config, dim: int | None = None) -> nn.Module:
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return TokenBatchNorm(dim, eps=config.norm_eps)


class HGRU2(nn.Module):
    """The token mixer: gated linear recurrence with an e x e outer-product state per head."""

    def __init__(self, config: HGRN2Config):
        super().__init__()
        self.config = config
        d = config.d_model
        self.in_proj = nn.Linear(d, 3 * d, bias=False)  # q (output gate), f (forget logits), i (input)
        self.out_norm = RMSNorm(d, config.norm_eps)
        self.out_proj = nn.Linear(d, d, bias=False)
        # How to run, not architecture: the scan's backward may rebuild its chunk states instead of keeping them,
        # and the scan may be the PyTorch form on any device (the reference the kernels are checked against).
        self.recompute_scan_states = False
        self.scan_backend = "auto"

    def forward(
        self,
        x: Tensor,
        lower_bound: Tensor | None,
        state: Tensor | None = None,
        mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, d] -> [B, T, d]. A given `state` [B, H, e, e] (float32) is advanced in place.

        `mask` [B, T] (true on real tokens) zeroes the input at padded steps: the state then stays zero
        through trailing padding, so a reverse scan starts at each sequence's true end.
        `cu_seqlens` [N + 1]: x [1, T, d] holds N sequences packed end to end (then `state` is [N, H, e, e]).
        """
        B, T, _ = x.shape
        H, e = self.config.n_heads, self.config.expand_ratio
        q, f, i = self.in_proj(x).view(B, T, 3, H, e).unbind(2)
        q = F.silu(q)
        if mask is not None:
            i = i * mask[:, :, None, None].to(i.dtype)
        # The bounds are a cumulated softmax, in [0, 1) by construction (`HGRN2.lower_bounds`): checking them would
        # make the host wait for the GPU at every eager scan.
        scan = dict(lower_bound=lower_bound, scale=self.config.scale, cu_seqlens=cu_seqlens,
                    recompute_states=self.recompute_scan_states, backend=self.scan_backend, check_bound=False)
        if state is not None and self.config.direction != "causal":
            raise ValueError("a non-causal layer sees the whole sequence at once; it has no recurrent state")
        if self.config.direction == "2d":
            if cu_seqlens is not None:
                raise ValueError('packed sequences (cu_seqlens) have no grid: direction "2d" takes [B, rows * cols]')
            o = _grid_scan(q, f, i, self.config.grid, scan)
        elif self.config.direction == "bidirectional":
            o = hgrn2_scan(q, f, i, **scan)[0] + hgrn2_scan(q, f, i, reverse=True, **scan)[0]
        elif state is None:
            o, _ = hgrn2_scan(q, f, i, **scan)
        elif T == 1 and cu_seqlens is None:
            o = hgrn2_step(q, f, i, state, lower_bound, scale=self.config.scale)
        else:
            o, final_state = hgrn2_scan(q, f, i, initial_state=state, output_final_state=True, **scan)
            state.copy_(final_state)
        return self.out_proj(self.out_norm(o.reshape(B, T, -1)))


def _grid_scan(q: Tensor, f: Tensor, i: Tensor, grid: tuple[int, int], scan: dict) -> Tensor:
    """Forward and reverse scans along the rows and along the columns of a row-major grid, summed."""
    B, T, H, e = q.shape
    rows, cols = grid
    if rows * cols != T:
        raise ValueError(f"grid {rows} x {cols} does not match the sequence length {T}")
    along_rows = [x.reshape(B * rows, cols, H, -1) for x in (q, f, i)]
    along_cols = [x.reshape(B, rows, cols, H, -1).transpose(1, 2).reshape(B * cols, rows, H, -1) for x in (q, f, i)]
    o_rows = hgrn2_scan(*along_rows, **scan)[0] + hgrn2_scan(*along_rows, reverse=True, **scan)[0]
    o_cols = hgrn2_scan(*along_cols, **scan)[0] + hgrn2_scan(*along_cols, reverse=True, **scan)[0]
    o_cols = o_cols.reshape(B, cols, rows, H, -1).transpose(1, 2)
    return o_rows.reshape(B, T, H, -1) + o_cols.reshape(B, T, H, -1)


class GLU(nn.Module):
    """The channel mixer: W_3 (act(W_1 x) * W_2 x)."""

    def __init__(self, config: HGRN2Config):
        super().__init__()
        self.act = {"silu": F.silu, "gelu": F.gelu, "none": nn.Identity()}[config.mlp_act]
        self.in_proj = nn.Linear(config.d_model, 2 * config.glu_hidden, bias=False)
        self.out_proj = nn.Linear(config.glu_hidden, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.in_proj(x).chunk(2, dim=-1)
        return self.out_proj(self.act(gate) * up)


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch, rescale the survivors.

    The keep probability is a tensor (a buffer, not saved): torch.compile then treats it as an input, so the
    blocks of a stack, each with its own rate, share one compiled graph instead of one each."""

    def __init__(self, rate: float):
        super().__init__()
        self.active = rate > 0
        self.register_buffer("keep_prob", torch.tensor(1 - rate), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.active:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) < self.keep_prob
        return x * (keep / self.keep_prob).to(x.dtype)


class Block(nn.Module):
    """Pre-norm residual block: x += HGRU2(norm x); x += GLU(norm x)."""

    def __init__(self, config: HGRN2Config, drop_path: float):
        super().__init__()
        self.mixer_norm = make_norm(config)
        self.mixer = HGRU2(config)
        self.mlp_norm = make_norm(config)
        self.mlp = GLU(config)
        self.dropout = nn.Dropout(config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: Tensor,
        lower_bound: Tensor | None,
        state: Tensor | None = None,
        mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        x = x + self.drop_path(self.dropout(self.mixer(self.mixer_norm(x), lower_bound, state, mask, cu_seqlens)))
        return x + self.drop_path(self.dropout(self.mlp(self.mlp_norm(x))))


class HGRN2(nn.Module):
    """The layer stack with its learned forget-gate lower bounds and a final norm; inputs are embedded."""

    def __init__(self, config: HGRN2Config):
        super().__init__()
        self.config = config
        drop_rates = torch.linspace(0, config.drop_path, config.n_layers).tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in drop_rates)
        # Zeros give a uniform softmax: layer l starts with bound l / n_layers.
        self.lower_bound_logits = nn.Parameter(torch.zeros(config.n_layers, config.d_model))
        self.final_norm = make_norm(config)
        # Training memory, not architecture (so not in the config, which checkpoints compare): recompute each
        # block's activations in the backward instead of keeping them.
        self.checkpoint_blocks = False

    def compile_blocks(self) -> None:
        """Compile each block with torch.compile, fusing its norms, gates, activations and residual adds around the
        scans, which stay custom ops (no graph break). Blocks that differ only in their weights share a graph; the
        first step waits for the compilation."""
        for block in self.blocks:
            block.compile()

    def lower_bounds(self) -> list[Tensor | None]:
        """b_l = sum_{j<l} softmax(Gamma)_j per channel. Layer 0's bound is exactly 0: it gets None."""
        if not self.config.use_lower_bound:
            return [None] * self.config.n_layers
        p = self.lower_bound_logits.float().softmax(dim=0)
        # Rounding can make the sum reach 1.0 when the upper layers' share is tiny; a bound of exactly 1
        # freezes the layer and gives infinite gradients, so keep it a hair below.
        bounds = (p.cumsum(dim=0) - p).clamp(max=1 - 1e-6).unbind(0)
        return [None, *bounds[1:]]

    def forward(
        self,
        x: Tensor,
        states: list[Tensor] | None = None,
        mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, d] -> [B, T, d]. Given `states` (one per layer, from `new_states`), they advance in place.
        Given `mask` [B, T] (true on real tokens, padding after them), no padded step reaches a real one.
        Given `cu_seqlens` [N + 1], x [1, T, d] is N sequences packed end to end, each scanned on its own
        (with `states` of N rows): prompts of different lengths run together with no padding at all."""
        for layer, (block, bound) in enumerate(zip(self.blocks, self.lower_bounds())):
            if self.checkpoint_blocks and self.training and states is None:
                x = torch.utils.checkpoint.checkpoint(block, x, bound, None, mask, cu_seqlens, use_reentrant=False)
            else:
                x = block(x, bound, None if states is None else states[layer], mask, cu_seqlens)
        return self.final_norm(x)

    def scan_flops_per_token(self) -> int:
        """Training FLOPs of the scans per token (forward and backward: 3x the forward's 4 d e of the state
        update and readout), per scan direction; the projections are counted with the Linear layers."""
        directions = {"causal": 1, "bidirectional": 2, "2d": 4}[self.config.direction]
        return 12 * self.config.d_model * self.config.expand_ratio * self.config.n_layers * directions

    def new_states(self, batch_size: int, device: torch.device | str | None = None) -> list[Tensor]:
        """Zero recurrent states, float32 [B, H, e, e] per layer, for token-by-token decoding."""
        H, e = self.config.n_heads, self.config.expand_ratio
        return [torch.zeros(batch_size, H, e, e, device=device) for _ in self.blocks]


def init_weights(module: nn.Module, std: float) -> None:
    """The paper code's initialisation: normal(0, std) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
