"""Token-weighted Hessian accumulation for GPTQ-style quantization of one linear layer.

For a linear layer y = W x with inputs x_j in R^d (one per calibration token j), GPTQ minimizes the layer's
output error  Σ_j ||(W - Ŵ) x_j||²  =  tr(ΔW (Σ_j x_j x_jᵀ) ΔWᵀ), so all it needs from the data is the
second-moment matrix of the inputs (Frantar et al., "GPTQ", arXiv 2210.17323, eq. 1-2). Methods that care more
about some tokens than others weigh each token by w_j >= 0:

    H = 2 / Σ_j w_j  ·  Σ_j w_j x_j x_jᵀ                                                            (d, d)

  * plain GPTQ:  w_j = 1 for every token (H = 2/n Σ x xᵀ, as in the original code);
  * VEQ-MA (arXiv 2602.01037): w_j = p_j^λ · α_j on the tokens routed to an expert (router prob, modality);
  * FAQ (ECMFQ reconstruction, docs/methods.md §4.2): w_j = per-token fusion weight.
The caller builds the weight vector; this file only accumulates. Rows are scaled by sqrt(w_j) and summed with
one matmul: (sqrt(w) ⊙ X)ᵀ (sqrt(w) ⊙ X) = Σ_j w_j x_j x_jᵀ.

Sum first, divide once: `add()` keeps the raw sum S = Σ w_j x_j x_jᵀ, the token count and Σ w_j, and
`finalize()` divides at the end. (The original code keeps a running average, rescaling H on every batch; the
sum is simpler and, in float64, exact to rounding.) The factor 2/Σw does not change GPTQ's result (its damping
is relative to mean(diag H) and the update rule is scale-invariant); it fixes the scale of reported losses.

Speed (the driver's `compute_dtype=float32`): the products run at the float32 matmul rate and only their sum is
float64. `add()` then keeps the scaled rows and `flush()` multiplies them in one (d, n) @ (n, d) product, so an
expert that receives 50 tokens per sample still gets products of hundreds of rows (a float64 product on this
kind of CPU runs at about half the float32 rate, and a product of 50 rows at about half the rate of 500). The
driver flushes after fixed blocks of calibration samples, so the partial products do not depend on how the
samples are split between processes (distributed.py): only the float64 order of their sum does.

The token weightings (plain_weights, veq_ma_weights, faq_weights) are here, each a few lines: the methods
table in gptq.py points at them. FAQ's weights come from attention probabilities (fusion_scores, fusion_weights).

LayerCapture runs one decoder layer with hooks on its linears and feeds every input's tokens, weighted, into one
Hessian per input (model.py's layer_structure says which linears share one: q/k/v, an expert's gate/up); an
expert's linears see only the tokens routed to it, with p_j their router weight, as the router's Routing assigns
them (arch/blocks.py's expert_assignments, the same function the expert loop runs on).
finalize() never falls back when an expert got no tokens (it raises); the driver decides, and reports, what to do
(a pooled Hessian: pooled_hessian).
Read next: quant/grid.py (what the solver's codes become). Tests: python -m pytest -q tests/test_hessian.py
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.blocks import expert_assignments, layer_structure
from quant.grid import compute_dtype


class Hessian:
    """Accumulates S = Σ_j w_j x_j x_jᵀ over batches of inputs x (..., d) of one linear layer.

    dtype: accumulation dtype; float64 costs 2x memory but makes the sum order-independent to ~1e-16, which
    matters when many small weights are summed (millions of tokens, VEQ-MA's p^λ).
    compute_dtype: dtype of the products; None: dtype, each add() one product into S (rows cast to dtype).
    Otherwise add() keeps the rows, cast to compute_dtype and scaled by sqrt(w) (x itself when it already is
    in compute_dtype and unweighted: do not change it in place before flush()), until flush() (or finalize())
    adds their one product into S.
    device: where S lives, which must be the inputs' device (pass x.device; None: torch's default device)."""

    def __init__(self, d: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 compute_dtype: torch.dtype | None = None):
        self.d = d
        self.S = torch.zeros(d, d, dtype=dtype, device=device)  # (d, d) raw weighted sum, not normalized
        self.weight_sum = torch.zeros((), dtype=torch.float64, device=device)  # Σ w_j (a tensor: no GPU sync)
        self._n_tokens = 0
        self.compute_dtype = compute_dtype
        self._rows: list[torch.Tensor] = []  # scaled rows waiting for flush() (compute_dtype set)

    @property
    def n_tokens(self) -> int:
        """Tokens added so far (weighted or not; a token with weight 0 still counts here)."""
        return self._n_tokens

    @torch.no_grad()
    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None):
        """Add inputs x (..., d), flattened over all leading dims to n tokens, with optional weights (n,) >= 0."""
        if self.S is None:
            raise ValueError("Hessian.add: this accumulator was already released by finalize(release=True)")
        if x.shape[-1] != self.d:
            raise ValueError(f"Hessian.add: x has last dim {x.shape[-1]}, expected d={self.d} (wrong layer input?)")
        X = x.reshape(-1, self.d).to(self.compute_dtype or self.S.dtype)  # (n, d)
        n = X.shape[0]
        if weight is None:
            self.weight_sum += n
        else:
            w = weight.reshape(-1).to(device=X.device, dtype=torch.float64)  # (n,)
            if w.numel() != n:
                raise ValueError(f"Hessian.add: weight has {w.numel()} entries for {n} tokens of x {tuple(x.shape)}")
            if not bool((w >= 0).all()):  # also catches NaN weights (NaN >= 0 is False)
                raise ValueError("Hessian.add: token weights must be finite and >= 0 (their square roots scale the rows)")
            X = X * w.sqrt().to(X.dtype)[:, None]  # row j scaled by sqrt(w_j), so XᵀX = Σ w_j x_j x_jᵀ
            self.weight_sum += w.sum()
        if self.compute_dtype is None:
            self.S.addmm_(X.T, X)  # (d, n) @ (n, d)
        else:
            self._rows.append(X)  # may be x itself: the caller must not change x in place before flush()
        self._n_tokens += n

    @torch.no_grad()
    def flush(self):
        """Add the kept rows' product XᵀX (compute_dtype) into S. A no-op when nothing is kept."""
        if not self._rows:
            return
        X = self._rows[0] if len(self._rows) == 1 else torch.cat(self._rows)
        self._rows = []
        self.S += X.T @ X  # the float32 product, added in S's dtype (no converted copy)

    @torch.no_grad()
    def merge(self, other: "Hessian"):
        """Add another accumulator's sums into this one (e.g. pooling all experts of a layer)."""
        if other.d != self.d:
            raise ValueError(f"Hessian.merge: d={other.d} does not match d={self.d}")
        self.flush()
        if isinstance(other, Hessian):  # (distributed.py merges plain sums received from another rank)
            other.flush()
        self.S += other.S.to(self.S)
        self.weight_sum += other.weight_sum.to(self.weight_sum.device)
        self._n_tokens += other.n_tokens

    @torch.no_grad()
    def finalize(self, *, release: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """H = 2/Σw · S (d, d), in `dtype` (default: the accumulation dtype). Raises if nothing (or only zero
        weight) was added, or if the sum is not finite: never a silent identity. release=True scales S in
        place and hands it over (no (d, d) copy; the accumulator cannot be used afterwards): at real width the
        Hessians of a 128-expert layer take 4.9 GB in float64, so a second copy matters."""
        if self.S is None:
            raise ValueError("Hessian.finalize: this accumulator was already released by finalize(release=True)")
        self.flush()
        total = float(self.weight_sum)
        if self._n_tokens == 0 or total <= 0:
            raise ValueError(f"Hessian.finalize: no calibration tokens ({self._n_tokens} tokens, weight sum "
                             f"{total}); use a pooled Hessian and flag it, or skip this layer explicitly")
        if not bool(torch.isfinite(self.S).all()):
            raise ValueError("Hessian.finalize: the accumulated sum has NaN/inf (non-finite layer inputs?)")
        if not release:
            return (self.S * (2.0 / total)).to(dtype or self.S.dtype)
        H, self.S = self.S.mul_(2.0 / total), None
        return H.to(dtype or H.dtype)


@torch.no_grad()
def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ). With H ∝ Σ x xᵀ this is ||(W - Ŵ) X||² / ||W X||²: the layer's relative
    output error on the calibration tokens, without the tokens. In H's dtype (float32 in the driver: a reported
    figure, good to ~1e-6 relative; float64 would double the time of the two (out, in, in) matmuls, which at
    real width took about a quarter of a 128-expert layer's quantization time)."""
    dtype = compute_dtype(H)
    W, H = W.to(dtype), H.to(dtype)
    dW = W - W_hat.to(dtype)
    return float(((dW @ H) * dW).sum(dtype=torch.float64) / ((W @ H) * W).sum(dtype=torch.float64))


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Boolean mask (d,) of input channels that were exactly zero for every weighted token (H_jj == 0).
    GPTQ sets H_jj = 1 and zeroes W[:, j] for them: the weights there never met any input."""
    return torch.diagonal(H) == 0


# ----------------------------------------------------------------------------------------------------------
# FAQ: fusion-aware token weights (ECMFQ, reconstructed from its abstract; docs/methods.md §4.2)


@torch.no_grad()
def fusion_scores(probs: torch.Tensor, is_vis: torch.Tensor) -> torch.Tensor:
    """FAQ's raw score φ (T,) of each token of one sample, from the layer's attention probabilities
    probs (nh, T, T) (causal, rows = queries), averaged over heads to A (T, T):
      * vision token v:  φ_v = mean of A[t, v] over the text tokens t > v (the text that can read it);
      * text token t:    φ_t = Σ_{v vision} A[t, v] (the attention mass it pays to the image).
    A vision token no text token follows, and every text token of a text-only sample, scores 0."""
    A = probs.float().mean(dim=0)  # (T, T)
    T = A.shape[0]
    vis = is_vis.to(A.device).bool()
    text = ~vis
    phi = (A[:, vis].sum(dim=1) * text).double()  # text rows: mass on vision columns
    after = torch.arange(T, device=A.device)[:, None] > torch.arange(T, device=A.device)[None, :]  # [t, v]: t > v
    readers = after & text[:, None]  # (T, T): text query t that can see key v
    n_readers = readers.sum(dim=0)  # (T,)
    vis_score = (A * readers).sum(dim=0) / n_readers.clamp(min=1)
    return torch.where(vis, vis_score.double(), phi)


def fusion_weights(scores: list[torch.Tensor], is_vis: list[torch.Tensor], eta: float = 0.5) -> list[torch.Tensor]:
    """FAQ's token weights for a calibration set: w_j = (1 − η) + η · φ_j / mean(φ over the same modality, all
    samples). Per modality the weights are finite, >= 1 − η > 0 and average exactly 1, so FAQ moves weight
    between tokens of one modality, not between modalities. A modality whose scores are all 0 (e.g. no image in
    the set) gets w = 1. scores, is_vis: one (T,) tensor per sample. Returns one (T,) float64 tensor per sample."""
    if not 0 <= eta < 1:
        raise ValueError(f"eta={eta}: FAQ's mixing weight must be in [0, 1) (1 would give zero-weight tokens)")
    phi, vis = torch.cat([s.double() for s in scores]), torch.cat([v.bool().to(scores[0].device) for v in is_vis])
    w = torch.ones_like(phi)
    for mask in (vis, ~vis):
        mean = phi[mask].mean() if bool(mask.any()) else phi.new_zeros(())
        if float(mean) > 0:
            w[mask] = (1 - eta) + eta * phi[mask] / mean
    return list(w.split([len(s) for s in scores]))


# ----------------------------------------------------------------------------------------------------------
# Token weights: c_j of each token in a linear's Hessian (docs/methods.md §2.2, §3.3, §4.2). The signature:
#   fn(q: gptq.Settings, gamma, is_vis (n,) bool, p (n,) | None, fusion (n,) | None) -> (n,) float64 or None (all 1)


def plain_weights(q, gamma: float, is_vis, p=None, fusion=None):
    """GPTQ: every token weighs 1."""
    return None


def veq_ma_weights(q, gamma: float, is_vis, p=None, fusion=None):
    """VEQ-MA (arXiv 2602.01037, eq. 7): c_j = p_j^λ · α_j on an expert's routed tokens, with p_j the router
    weight of that expert for token j and α_j = γ for text, 1 for image tokens; non-expert linears get α_j alone
    (or nothing with plain_dense)."""
    o = q.options
    alpha = torch.where(is_vis, 1.0, gamma if o["modality"] else 1.0).double()
    if p is None:  # attention, shared expert, dense MLP
        return None if o["plain_dense"] else alpha
    affinity = p.double() ** o["lam"] if o["affinity"] else torch.ones_like(alpha)
    return affinity * alpha


def faq_weights(q, gamma: float, is_vis, p=None, fusion=None):
    """FAQ (docs/methods.md §4.2): c_j = w_j · p_j on experts, w_j elsewhere, with w_j the fusion weight of the
    token (fusion_weights)."""
    return fusion.double() if p is None else fusion.double() * p.double()


# ----------------------------------------------------------------------------------------------------------
# Capture: the Hessians of every linear of one decoder layer


@dataclass
class LayerInput:
    """One calibration sample flowing through the decoder: hidden states (1, T, D), the per-forward inputs,
    and which positions are image tokens (T,)."""

    x: torch.Tensor
    ctx: object
    is_vis: torch.Tensor
    is_answer: torch.Tensor | None = None  # (T,) answer tokens (labels != -100), for MBQ's loss


def no_timer(phase: str):
    """A phase timer that does nothing: the driver's default (bench/streaming.py passes one that records seconds)."""
    return contextlib.nullcontext()


def new_hessian(d: int, device) -> Hessian:
    """The driver's accumulator: float64 sums of float32 products."""
    return Hessian(d, dtype=torch.float64, compute_dtype=torch.float32, device=device)


class LayerCapture:
    """Forward hooks on every nn.Linear of one decoder layer and on its router, accumulating one Hessian per
    input of layer_structure (keyed by its first reader), each token weighted by weigh(is_vis, p, fusion)."""

    def __init__(self, layer: nn.Module, weigh, timer=no_timer):
        self.timer, self.weigh = timer, weigh
        self.structure = layer_structure(layer)
        self.n_experts = len(self.structure.experts)
        self.input_of = {name: inp for inp in self.structure.inputs for name in inp.readers}
        self.H: dict[str, Hessian] = {}  # input key (its first reader) -> accumulator
        self.tokens: dict[str, list[int]] = {}  # input key -> [n_text, n_vis]
        self.moe_inputs: list[torch.Tensor] = []
        self.pool: Hessian | None = None  # all tokens entering the MoE block: built by pooled_hessian if needed
        self.is_vis, self.fusion, self.assigned, self._seen = None, None, None, {}
        self.flop = 0  # floating-point operations of the Hessian products (bench/streaming.py's rate)
        self.handles = [layer.get_submodule(name).register_forward_pre_hook(self._linear_hook(name))
                        for name in self.input_of]
        if self.structure.router is not None:  # kept float
            self.handles.append(layer.get_submodule(self.structure.router).register_forward_hook(self._router_hook))

    def start_sample(self, is_vis, fusion=None):
        """is_vis (T,) of the next sample; fusion (T,) its FAQ weights (methods with fusion only)."""
        self.is_vis, self.fusion, self.assigned, self._seen = is_vis, fusion, None, {}

    def run_block(self, layer, block: list, fusion: list | None):
        """The float layer on a block of samples (DecoderLayer.forward_many: attention per sample, the MLP on
        all their tokens), the hooks told which tokens each linear's input holds; then the block's products."""
        vis = [s.is_vis for s in block]
        fus = fusion if fusion is not None else [None] * len(block)
        layer.forward_many([s.x for s in block], [s.ctx for s in block],
                           before_attention=lambda j: self.start_sample(vis[j], fus[j]),
                           before_mlp=lambda: self.start_sample(torch.cat(vis), None if fusion is None else
                                                                torch.cat(fusion)))
        self.flush()

    def _router_hook(self, module, args, routing):
        x = args[0].reshape(-1, args[0].shape[-1])
        weights = routing.topk_weight.float()
        self.assigned = [(tok, weights[tok, slot]) for tok, slot in
                         expert_assignments(routing.topk_idx, self.n_experts)]  # expert e: its tokens, their p
        self.moe_inputs.append(x.detach())  # for pooled_hessian, should an expert get (almost) no tokens

    def _linear_hook(self, name):
        inp = self.input_of[name]
        key = inp.readers[0]

        def hook(module, args):
            with self.timer("hessians"):
                add(args)

        def add(args):
            if key in self._seen:  # another reader of this input already added it in this forward
                if self._seen[key] is not args[0]:
                    raise RuntimeError(f"{name} and {key} read different tensors, but layer_structure says "
                                       "they share one input: fix the layer's description")
                return
            self._seen[key] = args[0]
            x = args[0].reshape(-1, args[0].shape[-1])
            tok, p = slice(None), None
            if inp.expert is not None:
                tok, p = self.assigned[inp.expert]
            is_vis, fusion = self.is_vis[tok], None if self.fusion is None else self.fusion[tok]
            if key not in self.H:
                self.H[key] = new_hessian(x.shape[-1], x.device)
                self.tokens[key] = [0, 0]
            self.H[key].add(x, self.weigh(is_vis, p, fusion))
            self.flop += 2 * x.shape[0] * x.shape[1] ** 2  # the (d, n) @ (n, d) product
            self.tokens[key][0] += int((~is_vis).sum())
            self.tokens[key][1] += int(is_vis.sum())
        return hook

    def flush(self):
        """Multiply out every Hessian's kept rows (after each block of samples)."""
        with self.timer("hessians"):
            for H in self.H.values():
                H.flush()

    def remove(self):
        for h in self.handles:
            h.remove()

    def starved(self, min_tokens: int, all_experts: bool, prefix: str) -> dict[str, bool]:
        """Input key -> whether it is solved from the pooled Hessian: an expert with fewer than min_tokens routed
        tokens, or every expert with all_experts. A non-expert input no token reached is an error."""
        out = {}
        for inp in self.structure.inputs:
            key = inp.readers[0]
            if inp.expert is None and key not in self.H:
                raise RuntimeError(f"{prefix}{key}: no calibration token reached this linear")
            out[key] = inp.expert is not None and (all_experts or
                                                   (self.H[key].n_tokens if key in self.H else 0) < min_tokens)
        return out

    def final_hessian(self, layer, key: str, starved: bool) -> torch.Tensor:
        """The float32 Hessian the solver takes: the captured one (its float64 sum released), or the pooled one."""
        return pooled_hessian(layer, self.input_of[key], self) if starved else \
            self.H[key].finalize(release=True, dtype=torch.float32)

    def release_moe_inputs(self):
        """The pooled Hessians are built: the layer's MoE inputs can go."""
        self.moe_inputs, self.pool = [], None


def pooled_hessian(layer, inp, cap: LayerCapture) -> torch.Tensor:
    """For an expert with (almost) no routed tokens: the Hessian of what its input would be if every MoE token
    were routed to it (gate/up: the MoE input; down: that expert's activations on the MoE input)."""
    s = cap.structure.swiglu_of(inp.readers[0])
    if inp.readers[0] != s.down_proj:  # gate/up: every MoE token, computed once per layer
        if cap.pool is None:
            cap.pool = new_hessian(cap.moe_inputs[0].shape[-1], cap.moe_inputs[0].device)
            for x in cap.moe_inputs:
                cap.pool.add(x)
                cap.pool.flush()
        return cap.pool.finalize(dtype=torch.float32)
    expert = layer.get_submodule(s.name)
    H = new_hessian(expert.down_proj.in_features, expert.down_proj.weight.device)
    for x in cap.moe_inputs:
        H.add(F.silu(expert.gate_proj(x)) * expert.up_proj(x))
        H.flush()
    return H.finalize(release=True, dtype=torch.float32)
