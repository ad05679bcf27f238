"""The EPD diffusion (SPEC 3.7, Eq. 14, 16): DiffIR's MLP denoiser and a short DDPM chain on (B, dim) vectors.

Schedule index i = 0..T-1 (the paper's t = i + 1). With `steps` = k < T the chain uses the last k indices,
k-1..0: it starts at noise level k-1 (q_sample at k-1 in training) and ends at 0, as in DiffIR's shorter runs.
"""

from __future__ import annotations

import torch
from torch import nn

from lldif.models.config import PriorConfig
from lldif.models.pnet import check_shape


class Denoiser(nn.Module):
    """[c, t/(10 T), z_t] -> Linear + LReLU, then `blocks` x (Linear + LReLU); no residual (DiffIR's `denoise`).
    With `linear_output`, the last LReLU is left out: DiffIR's ends in one because the prior it predicts leaves
    PNET_S1 through one, which a normalised prior (zero mean, either sign) does not."""

    def __init__(self, dim: int, blocks: int, timesteps: int = 4, linear_output: bool = False):
        super().__init__()
        self.dim = dim
        self.max_period = timesteps * 10
        layers: list[nn.Module] = [nn.Linear(2 * dim + 1, dim), nn.LeakyReLU(0.1, inplace=True)]
        for _ in range(blocks):
            layers += [nn.Linear(dim, dim), nn.LeakyReLU(0.1, inplace=True)]
        self.resmlp = nn.Sequential(*(layers[:-1] if linear_output else layers))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z_t (B, dim), t (B,) schedule indices, c (B, dim) -> (B, dim)."""
        check_shape(z_t, "z_t", (None, self.dim))
        check_shape(c, "c", (z_t.shape[0], self.dim))
        check_shape(t, "t", (z_t.shape[0],))
        time = t.to(z_t.dtype).view(-1, 1) / self.max_period
        return self.resmlp(torch.cat([c, time, z_t], dim=1))


class PriorDiffusion(nn.Module):
    """Schedule buffers plus the denoiser; `training_prior` is the stage-2 chain, `sample` the inference chain."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        if config.prediction not in ("x0", "eps"):
            raise ValueError(f"config.prediction must be 'x0' or 'eps', got {config.prediction!r}")
        if config.steps < 1:
            raise ValueError(f"config.steps must be >= 1, got {config.steps}")
        self.dim, self.timesteps = config.dim, config.steps
        self.prediction = config.prediction
        self.use_diffusion = config.use_diffusion
        self.insert_noise = config.insert_noise
        self.stochastic_reverse = config.stochastic_reverse

        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.steps, dtype=torch.float64) ** 2
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            "posterior_variance": betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.denoiser = Denoiser(config.dim, config.denoiser_blocks, config.steps, config.normalize != "none") \
            if config.use_diffusion else None

    def _steps(self, steps: int | None) -> int:
        steps = self.timesteps if steps is None else steps
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps}, got {steps}")
        return steps

    def q_sample(self, z: torch.Tensor, t: int, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 14 at schedule index t: sqrt(abar_t) z + sqrt(1 - abar_t) noise."""
        check_shape(z, "z", (None, self.dim))
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        check_shape(noise, "noise", tuple(z.shape))
        return self.sqrt_alphas_cumprod[t] * z + self.sqrt_one_minus_alphas_cumprod[t] * noise

    def predict_x0(self, z_t: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """x0-hat from an eps prediction: (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (z_t - self.sqrt_one_minus_alphas_cumprod[t] * eps) / self.sqrt_alphas_cumprod[t]

    def step(self, z_t: torch.Tensor, t: int, output: torch.Tensor) -> torch.Tensor:
        """Posterior mean of z_{t-1} given the denoiser `output` (x0-hat or eps-hat per `prediction`), Eq. 16."""
        if self.prediction == "x0":
            return self.posterior_mean_coef1[t] * output + self.posterior_mean_coef2[t] * z_t
        # Eq. 16 as written; equals the x0 form with x0-hat = predict_x0(z_t, t, output)
        scale = self.betas[t] / self.sqrt_one_minus_alphas_cumprod[t]
        return (z_t - scale * output) / self.alphas[t].sqrt()

    def reverse(self, c: torch.Tensor, z_T: torch.Tensor, steps: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Run indices steps-1..0 from z_T (with gradient) and return Z-hat_0 (B, dim)."""
        if self.denoiser is None:
            raise RuntimeError("reverse needs the denoiser, which use_diffusion=False leaves out")
        steps = self._steps(steps)
        check_shape(c, "c", (None, self.dim))
        check_shape(z_T, "z_T", tuple(c.shape))
        z = z_T
        for i in reversed(range(steps)):
            t = torch.full((z.shape[0],), i, device=z.device, dtype=torch.long)
            z = self.step(z, i, self.denoiser(z, t, c))
            if self.stochastic_reverse and i > 0:
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = z + self.posterior_variance[i].sqrt() * noise
        return z

    def training_prior(self, z_teacher: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None = None,
                       *, steps: int | None = None) -> torch.Tensor:
        """Stage 2: start from q_sample(Z, steps-1) ("insert noise") or N(0, I), then reverse."""
        check_shape(c, "c", (None, self.dim))
        if not self.use_diffusion:
            return c
        check_shape(z_teacher, "z_teacher", tuple(c.shape))
        steps = self._steps(steps)
        if self.insert_noise:
            z_T = self.q_sample(z_teacher.detach(), steps - 1, generator=generator)
        else:
            z_T = torch.randn(c.shape, generator=generator, device=c.device, dtype=c.dtype)
        return self.reverse(c, z_T, steps, generator)

    def sample(self, c: torch.Tensor, generator: torch.Generator | None = None, *,
               steps: int | None = None) -> torch.Tensor:
        """Inference: reverse from N(0, I); a seeded `generator` makes it repeatable."""
        check_shape(c, "c", (None, self.dim))
        if not self.use_diffusion:
            return c
        z_T = torch.randn(c.shape, generator=generator, device=c.device, dtype=c.dtype)
        return self.reverse(c, z_T, steps, generator)
