"""PixelCNN and GPT priors over VQ codes: sampling draws the model's distribution, training lowers the
NLL, resume is exact, the VQ parent stays frozen, samples are reproducible.

The VQ parent here is a stand-in (``FakeVQ``: 2x2 mean pooling quantised to K grey levels), injected
by monkeypatching ``genlab.runs`` (``load_run`` and ``get_method``) for a run folder that holds only a config.yaml.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from genlab import api, runs
from genlab.config import build_config
from genlab.data import load_data
from genlab.errors import ConfigError
from genlab.methods import DataInfo, Method, get_method
from genlab.methods.capabilities import DiscreteCodes
from genlab.methods.prior import GPTPrior, PixelCNNPrior, sample_from_logits
from genlab.noise import ImageNoise
from genlab.train.checkpoint import latest_checkpoint, load_checkpoint
from genlab.train.runlog import read_log

K = 6  # codebook size of the stand-in parent

TINY = {
    "pixelcnn": ["model.net.hidden_channels=16", "model.net.num_layers=3", "model.net.kernel_size=3",
                 "model.net.head_channels=32"],
    "gpt": ["model.net.dim=32", "model.net.num_layers=2", "model.net.num_heads=2"],
}
COMMON = ["train.batch_size=32", "train.lr=3e-3", "train.lr_schedule=constant",
          "train.warmup_steps=5", "train.log_every=5", "train.sample_n=4", "train.threads=1"]


@dataclass
class FakeVQConfig:
    """The stand-in VQ method has nothing to configure."""


class FakeVQ(Method, DiscreteCodes):
    """Stand-in VQ method on 8x8 grey images: 2x2 mean pooling, nearest of K grey levels; 4x4 codes."""

    name = "fake-vq"
    Config = FakeVQConfig
    codebook_size = K
    code_shape = (4, 4)

    def __init__(self, config: FakeVQConfig | None = None, data_info: DataInfo | None = None):
        super().__init__(config or FakeVQConfig(), data_info or DataInfo(channels=1, image_size=8, num_classes=10))
        self.levels = nn.Parameter(torch.linspace(-1, 1, K))  # a parameter, so freezing is observable

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 2)[:, 0]  # (N, 4, 4)
        return (pooled[..., None] - self.levels).abs().argmin(-1)  # (N, 4, 4)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.levels[codes][:, None], scale_factor=2, mode="nearest")  # (N, 1, 8, 8)


@pytest.fixture
def fake_parent(monkeypatch, tmp_path) -> str:
    """A VQ run folder (config.yaml only) that genlab.runs loads as a FakeVQ (method 'fake-vq'); others load for real."""
    folder = tmp_path / "fake-vq"
    folder.mkdir()
    (folder / "config.yaml").write_text("method: fake-vq\ndata:\n  source: digits\n")
    real_get_method, real_load_run = runs.get_method, runs.load_run

    def load_run(path, *args, **kwargs):
        if Path(path).resolve() == folder.resolve():
            cfg = build_config("fake-vq", FakeVQConfig, overrides=["data.source=digits"])
            return runs.Run(path=folder, config=cfg, method=FakeVQ().eval(), step=0, weights="ema")
        return real_load_run(path, *args, **kwargs)

    monkeypatch.setattr(runs, "get_method", lambda name: FakeVQ if name == "fake-vq" else real_get_method(name))
    monkeypatch.setattr(runs, "load_run", load_run)
    return str(folder)


def _method(name: str, codes: str, *overrides: str):
    cls = get_method(name)
    cfg = build_config(name, cls.Config, overrides=COMMON + TINY[name] + [f"model.codes={codes}", *overrides])
    torch.manual_seed(0)
    return runs.build_method(cfg, DataInfo(channels=1, image_size=8, num_classes=10))


def _digit_codes(n: int = 256) -> torch.Tensor:
    images = load_data(build_config("ddpm", get_method("ddpm").Config, overrides=["data.source=digits"]).data)
    return FakeVQ().encode_codes(images.to_model_range()[:n])  # (n, 4, 4)


# ------------------------------------------------------------------ sampling from logits


def test_sample_from_logits_matches_the_tempered_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        counts = torch.bincount(sample_from_logits(logits, g, temperature=temperature), minlength=5)
        expected = torch.softmax(logits[0].double() / temperature, -1) * len(logits)
        assert stats.chisquare(counts.numpy(), expected.double().numpy()).pvalue > 1e-3
    # top_k keeps the k most likely codes, renormalised.
    counts = torch.bincount(sample_from_logits(logits, g, top_k=2), minlength=5)
    assert counts[[1, 2, 4]].sum() == 0
    p = torch.softmax(logits[0, [0, 3]].double(), -1) * len(logits)
    assert stats.chisquare(counts[[0, 3]].numpy(), p.double().numpy()).pvalue > 1e-3


def test_low_temperature_is_argmax_and_bad_values_are_rejected():
    logits = torch.randn(500, 9, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    assert torch.equal(sample_from_logits(logits, g, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_from_logits(logits, g, temperature=1e-4), logits.argmax(-1))
    with pytest.raises(ConfigError, match="temperature"):
        sample_from_logits(logits, g, temperature=-1.0)
    with pytest.raises(ConfigError, match="top_k"):
        sample_from_logits(logits, g, top_k=0)


# ------------------------------------------------------------------ the sampling loop of each prior

# A known first-order Markov chain over the raster order: row a holds the logits of the code that
# follows code a (row K: of the first code, after the start token). Mild logits keep every cell's
# expected count large enough for the chi-square approximation.
TABLE = 0.7 * torch.randn(K + 1, K, generator=torch.Generator().manual_seed(7))  # (K + 1, K)


class MarkovPixelCNN(nn.Module):
    """A 'PixelCNN' whose logit at each position is TABLE[code at the previous raster position]."""

    def forward(self, codes, y=None):
        n, h, w = codes.shape
        flat = codes.reshape(n, h * w)
        previous = torch.cat([torch.full((n, 1), K), flat[:, :-1]], dim=1)  # (n, L)
        return TABLE[previous].reshape(n, h, w, K).permute(0, 3, 1, 2)  # (n, K, h, w)


class MarkovGPT(nn.Module):
    """A 'GPT' whose next-code logits are TABLE[last input token]; start token K."""

    blocks = ()

    def start_tokens(self, n, y, device):
        return torch.full((n,), K, dtype=torch.long, device=device)

    def step(self, tokens, cache):
        return TABLE[tokens]  # (n, K)


def _sampled_codes(method, n, **options) -> torch.Tensor:
    seen = []
    decode = method.parent.decode_codes
    method.parent.decode_codes = lambda codes: (seen.append(codes), decode(codes))[1]
    method.sample(n, generator=torch.Generator().manual_seed(0), **options)
    return seen[0].reshape(n, -1)  # (n, L) raster order


@pytest.mark.parametrize("name, net", [("pixelcnn", MarkovPixelCNN), ("gpt", MarkovGPT)])
def test_sampling_draws_the_model_distribution_in_raster_order(fake_parent, name, net):
    method = _method(name, fake_parent)
    method.net = net()
    temperature = 0.8
    codes = _sampled_codes(method, 3000, temperature=temperature)  # (3000, 16)
    probs = torch.softmax(TABLE / temperature, dim=-1)  # (K + 1, K)
    previous = torch.cat([torch.full((len(codes), 1), K), codes[:, :-1]], dim=1)
    counts = torch.zeros(K + 1, K)
    counts.index_put_((previous.flatten(), codes.flatten()), torch.ones(codes.numel()), accumulate=True)
    expected = counts.sum(1, keepdim=True) * probs
    assert expected.min() > 5
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert stats.chi2.sf(chi2, df=(K + 1) * (K - 1)) > 1e-3
    # Greedy decoding follows the argmax chain from the start token.
    greedy = _sampled_codes(method, 2, temperature=0.0)
    chain, a = [], K
    for _ in range(16):
        a = int(TABLE[a].argmax())
        chain.append(a)
    assert greedy.tolist() == [chain, chain]
    # The config's defaults apply when no option is given: top_k = 1 is greedy as well.
    method.config.top_k = 1
    assert _sampled_codes(method, 2).tolist() == [chain, chain]


# ------------------------------------------------------------------ configuration and the frozen parent


@pytest.mark.parametrize("name", ["pixelcnn", "gpt"])
def test_missing_codes_is_a_one_line_error(name):
    cls = get_method(name)
    cfg = build_config(name, cls.Config)
    with pytest.raises(ConfigError, match="--codes RUN") as e:
        cls(cfg.model, DataInfo(channels=1, image_size=8, num_classes=10))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["pixelcnn", "gpt"])
def test_parent_is_frozen_and_stays_in_eval_mode(fake_parent, name):
    method = _method(name, fake_parent)
    assert isinstance(method, {"pixelcnn": PixelCNNPrior, "gpt": GPTPrior}[name])
    assert not method.parent.levels.requires_grad
    optimised = {id(p) for params in method.optimizer_groups().values() for p in params}
    assert id(method.parent.levels) not in optimised
    assert optimised == {id(p) for p in method.net.parameters()}
    method.train()
    assert method.net.training and not method.parent.training
    assert "parent.levels" in method.state_dict()  # the parent's weights travel with the checkpoint


def test_sampling_options_are_checked(fake_parent):
    method = _method("gpt", fake_parent)
    with pytest.raises(ConfigError, match="steps"):
        method.sample(2, steps=10)
    with pytest.raises(ConfigError, match="class-conditional"):
        method.sample(2, labels=torch.tensor([1, 2]))
    overrides = COMMON + [f"model.codes={fake_parent}", "model.class_conditional=true"]
    conditional = build_config("gpt", GPTPrior.Config, overrides=overrides).model
    with pytest.raises(ConfigError, match="labelled"):
        GPTPrior(conditional, DataInfo(channels=1, image_size=8, num_classes=None), {"codes": FakeVQ()})
    with pytest.raises(ConfigError, match="VQ run's data"):
        GPTPrior(method.config, DataInfo(channels=3, image_size=8), {"codes": FakeVQ()})


@pytest.mark.parametrize("name", ["pixelcnn", "gpt"])
def test_class_conditional_prior_learns_from_the_labels(fake_parent, name):
    method = _method(name, fake_parent, "model.class_conditional=true")
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    labels = torch.tensor([1, 1, 3, 3, 3, 7, 7, 1])
    ctx = SimpleNamespace(step=0, optimize=lambda loss: loss.backward())
    out = method.training_step({"image": images, "label": labels}, ctx)
    assert out["bits_per_dim"] == pytest.approx(out["loss"].item() / math.log(2))
    if name == "gpt":
        rows = method.net.token_embedding.weight.grad[K:]  # the 10 class tokens
    else:
        rows = method.net.layers[0].class_bias.weight.grad  # (10, 4C)
    used = rows.abs().sum(1) > 0
    assert used.tolist() == [c in (1, 3, 7) for c in range(10)]  # exactly the classes of the batch
    # One step moves the class rows a little: over 32 images x 16 codes some draw flips with the label.
    a = method.sample(32, generator=torch.Generator().manual_seed(0), labels=torch.zeros(32, dtype=torch.long))
    b = method.sample(32, generator=torch.Generator().manual_seed(0), labels=torch.full((32,), 9))
    assert not torch.equal(a, b)


def test_small_pixelcnn_preset_sees_every_earlier_position_of_a_7x7_map():
    from genlab.models.pixelcnn import GatedPixelCNN

    cfg = build_config("pixelcnn", PixelCNNPrior.Config, preset="small").model
    torch.manual_seed(0)
    net = GatedPixelCNN(cfg.net, num_codes=16)
    x = net.embed(torch.randint(0, 16, (1, 7, 7))).detach().requires_grad_(True)
    logits = net.logits_from_embedding(x)  # (1, 16, 7, 7)
    (grad,) = torch.autograd.grad(logits[0, :, 6, 0].sum(), x)  # first position of the last row
    seen = grad[0].abs().sum(0).flatten() > 0  # (49,)
    assert seen[:42].all() and not seen[42:].any()


# ------------------------------------------------------------------ training through the one trainer


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]["model"]


@pytest.mark.parametrize("name", ["pixelcnn", "gpt"])
def test_training_on_digits_lowers_the_code_nll_and_samples_reproducibly(fake_parent, tmp_path, name):
    overrides = [f"model.codes={fake_parent}", "train.steps=40", "train.lr=6e-3", "train.ema_decay=null"]
    run = api.train(name, data="digits", overrides=COMMON + TINY[name] + overrides, run_dir=tmp_path / "r", progress=False)
    codes = _digit_codes()
    with torch.no_grad():
        before = _method(name, fake_parent).nll(codes).item()
        after = run.method.nll(codes).item()
    assert abs(before - math.log(K)) < 0.2  # an untrained prior is close to uniform over the K codes
    assert after < 0.7 * before
    # The log reports nats per code and bits per code-map dimension.
    records = [r for r in read_log(tmp_path / "r" / "log.jsonl") if r["kind"] == "train"]
    assert records[-1]["values"]["bits_per_dim"] == pytest.approx(records[-1]["values"]["loss"] / math.log(2))
    assert records[-1]["values"]["loss"] < 0.75 * records[0]["values"]["loss"]
    torch.testing.assert_close(run.method.parent.levels, torch.linspace(-1, 1, K))  # untouched
    # Samples are reproducible from a seed, whatever the batching, and are decoded codes.
    x = run.sample(6, seed=0, batch_size=4)
    assert torch.equal(x, run.sample(6, seed=0, batch_size=4))
    assert not torch.equal(x, run.sample(6, seed=1, batch_size=4))
    assert x.shape == (6, 1, 8, 8) and torch.isin(x, torch.linspace(-1, 1, K)).all()


@pytest.mark.parametrize("name", ["pixelcnn", "gpt"])
def test_resume_gives_the_same_weights_as_straight_training(fake_parent, tmp_path, name):
    common = COMMON + TINY[name] + [f"model.codes={fake_parent}", "train.checkpoint_every=5", "train.ema_decay=0.9"]
    api.train(name, data="digits", overrides=common + ["train.steps=10"], run_dir=tmp_path / "a", progress=False)
    api.train(name, data="digits", overrides=common + ["train.steps=5"], run_dir=tmp_path / "b", progress=False)
    api.train(name, overrides=["train.steps=10"], run_dir=tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("net.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = load_checkpoint(latest_checkpoint(tmp_path / "a"))[0]["ema_net"]
    ema_b = load_checkpoint(latest_checkpoint(tmp_path / "b"))[0]["ema_net"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_prior_on_a_real_vqvae_run(tmp_path):
    """End to end on genlab's vqvae: the prior trains on its codes, keeps its weights, decodes its samples."""
    pytest.importorskip("genlab.methods.vq", reason="the vqvae method is not available")
    vq = api.train("vqvae", data="digits", run_dir=tmp_path / "vq", progress=False, overrides=[
        "model.net.base_channels=8", "model.net.channel_mult=[1,2]", "model.net.norm_groups=4",
        "model.quantizer.codebook_size=16", "model.quantizer.dim=4", "train.batch_size=32", "train.steps=10",
        "train.lr=3e-3", "train.threads=1", "train.sample_n=4", "train.log_every=5"])
    prior = api.train("gpt", run_dir=tmp_path / "gpt", progress=False,  # --data defaults to the VQ run's
                      overrides=[f"model.codes={tmp_path / 'vq'}", *COMMON, *TINY["gpt"], "train.steps=10"])
    assert prior.config.data.source == "digits"
    assert prior.method.num_codes == 16 and prior.method.code_shape == vq.method.code_shape == (4, 4)
    parent, reference = prior.method.parent.state_dict(), vq.method.state_dict()
    assert parent.keys() == reference.keys()
    assert all(torch.equal(parent[k].cpu(), reference[k].cpu()) for k in reference)  # frozen: the VQ run's EMA weights
    codes = prior.method.sample_codes(5, ImageNoise.from_generator(torch.Generator().manual_seed(3), 5), temperature=1.0)
    x = prior.method.sample(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, vq.method.decode_codes(codes).clamp(-1, 1))
