"""Neural image compression: a CompressAI hyperprior shared by PnG, one rate-distortion lambda and entropy model per task."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bitstream import LatentIndexes
from ..data import ImageSet
from ..metrics import ms_ssim, psnr, quantize
from ..png import SharedNetwork
from ._family import Codec, Family, register_family

__all__ = ["CODECS", "LatentGain", "NICFamily", "lambda_of"]

# CompressAI's MSE lambdas for its quality levels 1..8 (the bmshj2018/mbt2018 zoo).
QUALITY_LAMBDAS = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}
# Each codec's class in ``compressai.models``. CompressAI is imported only when a codec is built: importing it loads
# its point-cloud datasets (torch_geometric) and scipy.stats too, about 4 s on 2 cores, which SISR processes skip.
CODECS = {"scale-hyperprior": "ScaleHyperprior", "mean-scale-hyperprior": "MeanScaleHyperprior"}
_QUALITY = re.compile(r"q([1-8])")
_LAMBDA = re.compile(r"lambda=([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)")
# Both hyperprior codecs downsample by 2^6 overall; inputs are padded to a multiple of this.
_STRIDE = 64


def lambda_of(task: str) -> float:
    """Rate-distortion lambda of a NIC task: ``q1``..``q8`` (CompressAI's levels) or ``lambda=0.013``.

    >>> lambda_of("q4"), lambda_of("lambda=0.02")
    (0.013, 0.02)
    """
    if match := _QUALITY.fullmatch(task):
        return QUALITY_LAMBDAS[int(match.group(1))]
    if (match := _LAMBDA.fullmatch(task)) and float(match.group(1)) > 0:
        return float(match.group(1))
    raise ValueError(f"NIC task {task!r} is not q1..q8 or lambda=<positive number>")


class LatentGain(nn.Module):
    """A gain per latent channel, as in CompressAI's variable-rate hyperprior: the analysis transform's output is
    multiplied by it before quantisation (so the quantisation step is its inverse), the synthesis transform's input
    divided by it; the hyper-analysis sees the latent as without it, and the latent's scales (and means) the
    hyper-synthesis makes are multiplied by it. It is not a convolution, so PnG keeps one per task: a later rate
    moves its step without touching the blocks it shares with earlier rates.

    :meth:`attach` applies it through forward hooks on the four transforms, so CompressAI's forward, compress and
    decompress and pngrow's ONNX graphs of each transform all apply it. A model saved before it existed loads with
    its built gain of 1 in every task, which computes what that model did.

    >>> from torch import nn
    >>> codec = nn.Module(); codec.g_a, codec.h_a, codec.h_s, codec.g_s = (nn.Identity() for _ in range(4))
    >>> gain = LatentGain(2); gain.attach(codec, hyper_outputs=1)
    >>> with torch.no_grad(): _ = gain.log_gain.fill_(math.log(2.0))
    >>> codec.g_a(torch.ones(1, 2, 1, 1)).flatten().tolist(), codec.g_s(torch.ones(1, 2, 1, 1)).flatten().tolist()
    ([2.0, 2.0], [0.5, 0.5])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(channels))

    def gain(self, like: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """The gain shaped (1, C * repeat, 1, 1) in ``like``'s dtype."""
        return self.log_gain.exp().repeat(repeat).view(1, -1, 1, 1).to(like.dtype)

    def attach(self, codec: nn.Module, hyper_outputs: int) -> None:
        """Apply the gain in ``codec``'s transforms; the hyper-synthesis makes ``hyper_outputs`` tensors of the
        latent's size (scales; scales and means), each multiplied by the gain."""
        codec.g_a.register_forward_hook(_MultipliedOutput(self, 1))
        codec.h_a.register_forward_pre_hook(_DividedInput(self))
        codec.h_s.register_forward_hook(_MultipliedOutput(self, hyper_outputs))
        codec.g_s.register_forward_pre_hook(_DividedInput(self))


class _MultipliedOutput:
    """A forward hook multiplying a transform's output by the gain. An object rather than a closure, so that
    ``copy.deepcopy`` of the model copies it with the gain it multiplies by."""

    def __init__(self, gain: LatentGain, repeat: int) -> None:
        self.latent_gain, self.repeat = gain, repeat

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.latent_gain.gain(output, self.repeat)


class _DividedInput:
    """A forward pre-hook dividing a transform's input by the gain (see :class:`_MultipliedOutput`)."""

    def __init__(self, gain: LatentGain) -> None:
        self.latent_gain = gain

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (inputs[0] / self.latent_gain.gain(inputs[0]), *inputs[1:])


def _bits(likelihoods: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(torch.log(v).sum() for v in likelihoods.values()) / -math.log(2)


@register_family("nic")
class NICFamily(Family, Codec):
    """Multi-rate compression: ``lambda * 255^2 * MSE + bpp`` per task; bpp on evaluation from real bitstreams.

    Convolutions of the analysis, synthesis and hyper transforms are shared by PnG; biases, GDNs, the latent's gain
    (:class:`LatentGain`) and the entropy bottleneck (and the Gaussian conditional's tables) are task-local, i.e.
    each rate has its own quantisation step and entropy model.
    """

    # Lowest rate first: each later rate inherits the training of the blocks it reuses (and starts from the previous
    # rate's entropy model), so at the default budget the rates come out ordered in bpp and PSNR (issue 18).
    default_tasks = ("q2", "q4", "q6")
    arch_defaults: dict[str, Any] = {"codec": "scale-hyperprior", "N": 64, "M": 96, "patch": 128}
    cost_size = 256
    latency_size = 256
    size_multiple = _STRIDE
    # bfloat16 where the device computes it, in NHWC: 1.89x the steps per second of float32 on an AVX-512 BF16 CPU,
    # no worse after 600 steps (docs/benchmark.md, "training speed"); float32 elsewhere.
    train_defaults: dict[str, Any] = {"grow_steps": 300, "prune_steps": 100, "finetune_steps": 100, "batch_size": 8,
                                      "precision": "native", "channels_last": True}
    metric_directions = {"psnr": "maximize", "ms_ssim": "maximize", "bpp": "minimize", "rd_loss": "minimize"}
    quality_metric = "rd_loss"
    # As CompressAI's training example. Unclipped, a hyperprior's gradient norm ranges from 1 to over 500 (spikes of
    # 10 to 50 times the median), and PnG's first task from a trained base diverged to NaN 48 steps into pruning;
    # clipped, it ends at 26 dB (docs/benchmark.md).
    grad_clip_norm = 1.0
    lazy_imports = ("compressai.models",)
    added_tensors = ("latent_gain.log_gain",)

    def __init__(self, tasks: list[str], **arch: Any) -> None:
        super().__init__(tasks, **arch)
        if self.arch["codec"] not in CODECS:
            raise ValueError(f"unknown NIC codec {self.arch['codec']!r} (known: {', '.join(CODECS)})")
        if self.arch["patch"] % _STRIDE:
            raise ValueError(f"NIC patch {self.arch['patch']} is not a multiple of {_STRIDE}, the codec's stride")

    def check_task(self, task: str) -> None:
        lambda_of(task)

    def rd_lambda(self, task: str) -> float:
        """``task``'s lambda (see :func:`lambda_of`)."""
        return lambda_of(task)

    def patch_size(self, task: str) -> int:
        return self.arch["patch"]

    def build_model(self) -> nn.Module:
        with warnings.catch_warnings():
            # CompressAI 1.2.8 scripts a helper with torch.jit.script at import, which torch 2.14 deprecates.
            warnings.simplefilter("ignore", FutureWarning)
            import compressai.models
        codec = getattr(compressai.models, CODECS[self.arch["codec"]])(N=self.arch["N"], M=self.arch["M"])
        codec.latent_gain = LatentGain(self.arch["M"])
        codec.latent_gain.attach(codec, hyper_outputs=2 if self.arch["codec"] == "mean-scale-hyperprior" else 1)
        return codec

    def wrap(self, model: nn.Module) -> SharedNetwork:
        return SharedNetwork(model)

    def loss(self, shared: SharedNetwork, task: str, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = shared(task, batch)
        bpp = _bits(out["likelihoods"]) / (batch.shape[0] * batch.shape[2] * batch.shape[3])
        mse = F.mse_loss(out["x_hat"], batch)
        loss = lambda_of(task) * 255**2 * mse + bpp
        return loss, {"rd_loss": loss.item(), "bpp": bpp.item(), "mse": mse.item()}

    def aux_parameters(self, shared: SharedNetwork) -> list[nn.Parameter]:
        return [p for n, p in shared.model.named_parameters() if n.endswith("quantiles")]

    def aux_loss(self, shared: SharedNetwork) -> torch.Tensor:
        return shared.model.aux_loss()

    def after_begin(self, shared: SharedNetwork, task: str, previous: str | None) -> None:
        """A rate's latent gain starts at ``previous``'s times sqrt(lambda / previous lambda): where the rate is high,
        the quantisation step that minimises ``lambda * MSE + rate`` goes as 1 / sqrt(lambda), so the rate starts
        near its own operating point rather than the previous rate's (docs/benchmark.md)."""
        if previous is None:
            return
        with torch.no_grad():
            shared.model.latent_gain.log_gain.add_(0.5 * math.log(lambda_of(task) / lambda_of(previous)))

    def before_commit(self, shared: SharedNetwork, task: str) -> None:
        shared.activate(task)
        shared.model.update(force=True)

    @torch.no_grad()
    def compress(self, shared: SharedNetwork, task: str, image: torch.Tensor) -> dict[str, Any]:
        """Entropy-code a (1, 3, H, W) image in [0, 1] with ``task``'s rate; returns CompressAI's strings and shape."""
        shared.activate(task)
        h, w = image.shape[-2:]
        padded = F.pad(image, (0, -w % _STRIDE, 0, -h % _STRIDE), mode="replicate")
        return shared.model.compress(padded)

    @torch.no_grad()
    def decompress(self, shared: SharedNetwork, task: str, coded: dict[str, Any], size: tuple[int, int],
                   indexes: np.ndarray | None = None) -> torch.Tensor:
        """Decode what :meth:`compress` returned with ``task``'s entropy model, cropped to ``size`` (H, W): as
        CompressAI's ``decompress``, the latent with ``indexes`` where given."""
        if indexes is None:
            shared.activate(task)
            return shared.model.decompress(coded["strings"], coded["shape"])["x_hat"][..., : size[0], : size[1]]
        model, scales, means = self._hyper_decode(shared, task, coded)
        chosen = torch.from_numpy(indexes).to(scales.device)
        y_hat = model.gaussian_conditional.decompress(coded["strings"][0], chosen, scales.dtype, means)
        return model.g_s(y_hat).clamp_(0, 1)[..., : size[0], : size[1]]

    @torch.no_grad()
    def coding_indexes(self, shared: SharedNetwork, task: str, coded: dict[str, Any]) -> LatentIndexes:
        """The scales the hyper-synthesis makes of ``coded``'s hyper-latent, the Gaussian conditional's boundaries
        and its indexes of those scales (see :meth:`Codec.coding_indexes`)."""
        model, scales, _ = self._hyper_decode(shared, task, coded)
        indexes = model.gaussian_conditional.build_indexes(scales)
        return LatentIndexes(scales.cpu().numpy(), model.gaussian_conditional.scale_table[:-1].cpu().numpy(),
                             indexes.cpu().numpy())

    def _hyper_decode(self, shared: SharedNetwork, task: str,
                      coded: dict[str, Any]) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        """``task``'s model, and the latent's scales (before their lower bound) and means (None for the scale
        hyperprior) that its hyper-synthesis makes of ``coded``'s hyper-latent."""
        shared.activate(task)
        model = shared.model
        params = model.h_s(model.entropy_bottleneck.decompress(coded["strings"][1], coded["shape"]))
        if self.arch["codec"] == "mean-scale-hyperprior":
            scales, means = params.chunk(2, 1)
            return model, scales, means
        return model, params, None

    @torch.no_grad()
    def restore(self, shared: SharedNetwork, task: str, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Code ``image`` at ``task``'s rate and decode it; figures: the bitstream's bytes and bits per pixel."""
        x = image[None].float().div(255).to(shared.device)
        coded = self.compress(shared, task, x)
        num_bytes = sum(len(s) for strings in coded["strings"] for s in strings)
        rec = quantize(self.decompress(shared, task, coded, x.shape[-2:]))
        return rec[0].mul(255).round().to(torch.uint8).cpu(), {"bytes": num_bytes, "bpp": 8 * num_bytes / x[0, 0].numel()}

    def evaluate(self, shared: SharedNetwork, task: str, images: ImageSet) -> dict[str, float]:
        """Mean PSNR and MS-SSIM (RGB), bpp from real bitstreams, and the rate-distortion loss
        ``lambda * 255^2 * MSE + bpp``."""
        psnrs, similarity, bpps, rd = [], [], [], []
        for image in images.images:
            rec, figures = self.restore(shared, task, image)
            x, y = image.float().div(255), rec.float().div(255)
            psnrs.append(psnr(y[None], x[None]))
            similarity.append(ms_ssim(y[None], x[None]))
            bpps.append(figures["bpp"])
            rd.append(lambda_of(task) * 255**2 * F.mse_loss(y, x).item() + figures["bpp"])
        n = len(psnrs)
        return {"psnr": sum(psnrs) / n, "ms_ssim": sum(similarity) / n, "bpp": sum(bpps) / n, "rd_loss": sum(rd) / n}

    def cost_inputs(self, task: str) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, 3, self.cost_size, self.cost_size),)
