"""Residual quantisers for the Alignment Tokenization stage (plain ``nn.Module``s) and a vectorised k-means.

:class:`ResidualCodebook` is the paper's tokenizer: ``L`` levels of ``K`` codes living directly in the
behaviour-embedding space, no encoder or decoder. Level 1 quantises the item embedding ``x``; level ``l``
quantises the residual ``r_l = x - (c_1 + ... + c_{l-1})`` left by the earlier levels, choosing the code
nearest to it under the configured distance. The codes themselves are the parameters, so no
straight-through estimator is needed. :class:`RQVAE` wraps the same quantiser in an MLP encoder/decoder with a
reconstruction loss (RQ-VAE as used by TIGER and LC-Rec): the paper's "ED" ablation. Both return a
:class:`Quantized` and expose ``loss(out, x)``, ``encode(x)`` and ``level_inputs(x, level)`` so the
LightningModule and the callbacks never need to know which one they hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.errors import require

Distance = Literal["cosine", "l2"]


def pairwise_distance(x: torch.Tensor, codes: torch.Tensor, distance: Distance) -> torch.Tensor:
    """``[N, K]`` distances between rows of ``x`` ``[N, d]`` and ``codes`` ``[K, d]`` (l2 = squared Euclidean)."""
    if distance == "cosine":
        return 1 - F.normalize(x, dim=-1) @ F.normalize(codes, dim=-1).T
    sq = x.pow(2).sum(-1, keepdim=True) - 2 * x @ codes.T + codes.pow(2).sum(-1)
    return sq.clamp_min(0)


def paired_distance(x: torch.Tensor, y: torch.Tensor, distance: Distance) -> torch.Tensor:
    """Distance between matching rows of ``x`` and ``y`` (``[..., d]`` -> ``[...]``)."""
    if distance == "cosine":
        return 1 - F.cosine_similarity(x, y, dim=-1, eps=1e-8)
    return (x - y).pow(2).sum(-1)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, distance: Distance = "l2") -> torch.Tensor:
    """k-means with k-means++ seeding, fully vectorised apart from the ``k`` seeding steps.

    Centres are plain means of their members under both distances: with cosine assignment a normalised centre
    would lose the residual's scale, and the next level quantises what this level leaves over.

    Args:
        x: ``[N, d]`` points (``N >= k``).
        k: number of centres.
        iters: Lloyd iterations after seeding.
        seed: seed of the seeding draws (same seed, same centres).
        distance: ``l2`` or ``cosine`` assignment.

    Returns:
        ``[k, d]`` centres (float32, on ``x``'s device).
    """
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    generator = torch.Generator().manual_seed(seed)

    def draw(weights: torch.Tensor) -> int:
        total = weights.sum()
        if not torch.isfinite(total) or total <= 0:  # all points already are centres (duplicates): draw uniformly
            weights = torch.ones_like(weights)
        return int(torch.multinomial(weights.cpu(), 1, generator=generator))

    centres = x.new_empty(k, x.shape[1])
    centres[0] = x[draw(torch.ones(n))]
    nearest = pairwise_distance(x, centres[:1], distance)[:, 0]
    for j in range(1, k):
        # k-means++: D^2 sampling (l2 is already squared; cosine distance used as is)
        centres[j] = x[draw(nearest.clamp_min(0))]
        nearest = torch.minimum(nearest, pairwise_distance(x, centres[j : j + 1], distance)[:, 0])
    for _ in range(iters):
        assign = pairwise_distance(x, centres, distance).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0  # an emptied cluster keeps its previous centre
        new = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centres)
        if torch.equal(new, centres):
            break
        centres = new
    return centres


@dataclass
class Quantized:
    """Output of a quantiser for a batch of ``B`` items.

    Attributes:
        codes: ``[B, L]`` chosen code per level.
        inputs: ``[B, L, d]`` the input of each level (the item's latent, then the residuals).
        chosen: ``[B, L, d]`` the chosen code vectors (carry the gradient to the codebooks).
        quantized: ``[B, d]`` the sum of the chosen codes (the item's approximation).
        latent: ``[B, d]`` what was quantised (the embedding itself, or the RQ-VAE encoder output).
        reconstruction: ``[B, d_in]`` the decoder output (RQ-VAE only).
    """

    codes: torch.Tensor
    inputs: torch.Tensor
    chosen: torch.Tensor
    quantized: torch.Tensor
    latent: torch.Tensor
    reconstruction: torch.Tensor | None = None


class ResidualCodebook(nn.Module):
    """``num_levels`` x ``codebook_size`` codes quantising the embedding and then its residuals.

    Args:
        dim: embedding dimension.
        num_levels: number of code levels ``L`` (4 in the paper).
        codebook_size: codes per level ``K`` (256 in the paper).
        distance: ``l2`` (squared Euclidean) or ``cosine`` distance for choosing codes and for the loss.
    """

    def __init__(self, dim: int, num_levels: int = 4, codebook_size: int = 256, distance: Distance = "l2") -> None:
        super().__init__()
        require(dim >= 1, "dim", ">= 1", dim)
        require(num_levels >= 1, "num_levels", ">= 1", num_levels)
        require(codebook_size >= 2, "codebook_size", ">= 2 (one code cannot tell items apart)", codebook_size)
        require(distance in ("l2", "cosine"), "distance", "'l2' or 'cosine'", distance)
        self.dim, self.num_levels, self.codebook_size, self.distance = dim, num_levels, codebook_size, distance
        # small random codes; callbacks.KMeansInit replaces them with data-driven centres before training
        self.codebooks = nn.Parameter(torch.randn(num_levels, codebook_size, dim) * 0.01)
        # persistent flag, so a resumed run (or a loaded checkpoint) never re-initialises trained codes
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # inputs are multiplied by this (set to 1 / RMS row norm of the catalogue by the LightningModule): exported
        # embeddings come at any scale (SVD/LightGCN long tails ~1e-3), and Adam's step size is absolute
        self.register_buffer("input_scale", torch.ones(()))

    @property
    def latent_dim(self) -> int:
        return self.dim

    def config(self) -> dict:
        """Constructor arguments (stored with exported codebooks to rebuild the module)."""
        return {
            "variant": "residual",
            "dim": self.dim,
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "distance": self.distance,
        }

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.input_scale

    def quantize(self, z: torch.Tensor, levels: int | None = None) -> Quantized:
        """Residual quantisation of latents ``z`` ``[B, d]`` through the first ``levels`` levels (all by default)."""
        codes, inputs, chosen = [], [], []
        residual = z
        for level in range(self.num_levels if levels is None else levels):
            book = self.codebooks[level]
            with torch.no_grad():
                index = pairwise_distance(residual.detach(), book, self.distance).argmin(1)
            code = book[index]
            codes.append(index)
            inputs.append(residual)
            chosen.append(code)
            # detached: a level's input is fixed for the loss (see loss()); gradients reach codes via `chosen`
            residual = residual - code.detach()
        chosen_t = torch.stack(chosen, 1)
        return Quantized(torch.stack(codes, 1), torch.stack(inputs, 1), chosen_t, chosen_t.sum(1), z)

    def forward(self, x: torch.Tensor) -> Quantized:
        return self.quantize(self.encode(x))

    @torch.no_grad()
    def level_inputs(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Input of level ``level`` (0-based) for items ``x``: the residual after levels ``0..level-1``."""
        z = self.encode(x)
        return z - self.quantize(z, levels=level).quantized if level else z

    def behaviour_loss(self, out: Quantized) -> torch.Tensor:
        """Sum over levels of ``D(sg(r_l), c_l)``, averaged over the batch.

        The level input is a stop-gradient target: each level's codes move towards the residuals assigned to
        them (online k-means), and a coarse level is never pulled around by a finer level's error. RQ-VAE's
        commitment term ``beta * D(r_l, sg(c_l))`` trains an encoder; here the inputs are fixed behaviour
        embeddings with nothing to train, so it is omitted.
        """
        return paired_distance(out.inputs.detach(), out.chosen, self.distance).sum(1).mean()

    def loss(self, out: Quantized, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"behaviour_loss": self.behaviour_loss(out)}


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class RQVAE(ResidualCodebook):
    """RQ-VAE (LC-Rec style): MLP encoder, the residual codebook in latent space, MLP decoder.

    Loss: ``reconstruction_weight * ||dec(z_q) - x||^2 + sum_l [D(sg(r_l), c_l) + beta * D(r_l, sg(c_l))]``
    with the straight-through estimator ``z_q = z + sg(sum_l c_l - z)`` so the encoder gets the decoder's
    gradient. The paper's "ED" ablation.

    Args:
        dim: input (behaviour embedding) dimension.
        num_levels: code levels.
        codebook_size: codes per level.
        distance: ``l2`` or ``cosine``.
        hidden_dims: encoder hidden widths (the decoder mirrors them).
        latent_dim: dimension of the quantised latent.
        beta: commitment weight.
        reconstruction_weight: weight of the reconstruction loss.
    """

    def __init__(
        self,
        dim: int,
        num_levels: int = 4,
        codebook_size: int = 256,
        distance: Distance = "l2",
        hidden_dims: tuple[int, ...] = (128, 64),
        latent_dim: int = 32,
        beta: float = 0.25,
        reconstruction_weight: float = 1.0,
    ) -> None:
        super().__init__(latent_dim, num_levels, codebook_size, distance)
        self.input_dim, self.hidden_dims, self.beta, self.reconstruction_weight = (
            dim,
            tuple(hidden_dims),
            beta,
            reconstruction_weight,
        )
        self.encoder = mlp([dim, *hidden_dims, latent_dim])
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), dim])

    def config(self) -> dict:
        return {
            "variant": "rqvae",
            "dim": self.input_dim,
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "distance": self.distance,
            "hidden_dims": list(self.hidden_dims),
            "latent_dim": self.dim,
            "beta": self.beta,
            "reconstruction_weight": self.reconstruction_weight,
        }

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x * self.input_scale)

    def forward(self, x: torch.Tensor) -> Quantized:
        out = self.quantize(self.encode(x))
        straight_through = out.latent + (out.quantized - out.latent).detach()
        out.reconstruction = self.decoder(straight_through)
        return out

    def loss(self, out: Quantized, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # residuals were built from detached codes, so D(r_l, sg(c_l)) trains only the encoder
        commitment = paired_distance(out.inputs, out.chosen.detach(), self.distance).sum(1).mean()
        reconstruction = F.mse_loss(out.reconstruction, x * self.input_scale, reduction="none").sum(-1).mean()
        return {
            "behaviour_loss": self.behaviour_loss(out) + self.beta * commitment,
            "reconstruction_loss": self.reconstruction_weight * reconstruction,
        }


def build_quantizer(variant: str = "residual", **config) -> ResidualCodebook:
    """Rebuild a quantiser from :meth:`ResidualCodebook.config` (used when loading an exported codebook)."""
    if variant == "residual":
        return ResidualCodebook(**config)
    if variant == "rqvae":
        config["hidden_dims"] = tuple(config.get("hidden_dims", (128, 64)))
        return RQVAE(**config)
    raise ValueError(f"variant must be 'residual' or 'rqvae', got {variant!r}")
