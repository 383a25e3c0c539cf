"""Guidance wrappers (CFG, classifier, rules) checked against Gaussian models whose scores are closed form.

Two classes with x_0 | y ~ N(mu_y, s^2) per pixel. At noise level t (x_t = a x_0 + b eps,
V = a^2 s^2 + b^2) the conditional eps is b (x_t - a mu_y) / V, the class posterior of the mixture
p(x_0) = (N(mu_0, s^2) + N(mu_1, s^2)) / 2 is a logistic function of x_t, and the Bayes classifier
log p(y | x_t) is known, so every guided eps can be computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from genlab.diffusion import (
    RULES,
    SAMPLERS,
    NoiseSchedule,
    Rule,
    classifier_free_guidance,
    classifier_guidance,
    classifier_log_prob_gradient,
    classifier_mean_shift,
    num_function_evaluations,
    parse_rule,
    register_rule,
    rule_guidance,
    sample,
)
from genlab.diffusion.guidance import brightness_rule, ink_rule, region_rule, symmetry_rule
from genlab.errors import ConfigError

MUS = (-0.4, 0.5)  # class means
S = 0.3
NULL = 2  # the null label of a 2-class model


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("linear", 1000)


def _noise(shape=(4096, 1, 1, 1), seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gaussian_eps(schedule, x_t, t, mu):
    a, b = schedule.signal_noise_scales(t, x_t)
    return b * (x_t - a * mu) / (a**2 * S**2 + b**2)


def mixture_eps(schedule, x_t, t):
    """E[eps | x_t] for the two-class mixture: b (x_t - a E[mu_y | x_t]) / V."""
    a, b = schedule.signal_noise_scales(t, x_t)
    var = a**2 * S**2 + b**2
    w1 = torch.sigmoid(a * (MUS[1] - MUS[0]) * (x_t - a * (MUS[0] + MUS[1]) / 2) / var)  # p(y = 1 | x_t)
    return b * (x_t - a * (MUS[0] + w1 * (MUS[1] - MUS[0]))) / var


def labelled_model(schedule, unconditional="gaussian", calls=None):
    """denoise_with_labels(x_t, t, y): class y's exact eps; the null label answers the unconditional
    model: a Gaussian at the midpoint ("gaussian") or the true two-class mixture ("mixture")."""

    def denoise(x_t, t, y):
        if calls is not None:
            calls.append(len(x_t))
        y = y.reshape(-1, *([1] * (x_t.dim() - 1)))
        conditional = torch.where(y == 1, gaussian_eps(schedule, x_t, t, MUS[1]), gaussian_eps(schedule, x_t, t, MUS[0]))
        if unconditional == "gaussian":
            null = gaussian_eps(schedule, x_t, t, (MUS[0] + MUS[1]) / 2)
        else:
            null = mixture_eps(schedule, x_t, t)
        return torch.where(y == NULL, null, conditional)

    return denoise


def bayes_classifier_logits(schedule):
    """log N(x_t; a mu_y, V) per class, summed over pixels: logits of the exact p(y | x_t) (equal priors)."""

    def logits(x_t, t):
        a, b = schedule.signal_noise_scales(t, x_t)
        var = a**2 * S**2 + b**2
        return torch.stack([(-((x_t - a * mu) ** 2) / (2 * var)).flatten(1).sum(1) for mu in MUS], dim=1)

    return logits


def run(name, denoise, x, schedule, steps, seed=1, eta=0.0, **kwargs):
    """One sampler by name with a fixed generator (no clipping: the data are unbounded here)."""
    clip = {"clip_denoised": False} if name in ("ddpm", "ddim") else {}
    eta = {"eta": eta} if name == "ddim" else {}
    return sample(name, denoise, x, schedule, steps, generator=torch.Generator().manual_seed(seed), **clip, **eta, **kwargs)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance


@pytest.mark.parametrize("name, steps, w", [("dpmpp-2m", 30, 0.0), ("dpmpp-2m", 30, 1.0), ("dpmpp-2m", 30, 2.5),
                                           ("ddpm", 1000, 2.5)])  # DDPM with fewer steps shrinks the std
def test_cfg_moves_samples_to_the_mean_the_guided_score_implies(schedule, w, name, steps):
    """Conditional N(mu_1, s^2), unconditional N(m, s^2) (m the midpoint): at every t both p_t are
    Gaussians of variance V, so the guided score -(x - a mu_1)/V - (w - 1)((x - a mu_1) - (x - a m))/V
    = -(x - a (w mu_1 + (1 - w) m)) / V is the exact score of N(w mu_1 + (1 - w) m, s^2): samples
    must have that mean and std s (within Monte-Carlo error). w = 2.5 puts it beyond mu_1."""
    m = (MUS[0] + MUS[1]) / 2
    labels = torch.ones(4096, dtype=torch.long)
    guided = classifier_free_guidance(labelled_model(schedule), labels, w, null_label=NULL)
    out = run(name, guided, _noise(), schedule, steps)
    expected = w * MUS[1] + (1 - w) * m
    n = out.numel()
    assert abs(out.mean().item() - expected) < 4 * S / math.sqrt(n) + 3e-3, (out.mean().item(), expected)
    assert abs(out.std().item() - S) < 4 * S / math.sqrt(2 * n) + 3e-3


def test_negative_labels_replace_the_unconditional_branch(schedule):
    """Against class 0 instead of the null model: the guided mean is w mu_1 + (1 - w) mu_0."""
    labels, negative = torch.ones(4096, dtype=torch.long), torch.zeros(4096, dtype=torch.long)
    guided = classifier_free_guidance(labelled_model(schedule), labels, 2.0, null_label=NULL, negative_labels=negative)
    out = run("dpmpp-2m", guided, _noise(), schedule, 30)
    assert abs(out.mean().item() - (2 * MUS[1] - MUS[0])) < 4 * S / 64 + 5e-3  # 4096 samples


def test_cfg_on_the_true_mixture_pushes_past_the_component_and_matches_the_formula(schedule):
    """With the real unconditional model (the mixture), eps_guided must equal eps_u + w (eps_c - eps_u)
    pointwise, and w > 1 must push the samples beyond the conditional mean (away from class 0)."""
    labels = torch.ones(2048, dtype=torch.long)
    model = labelled_model(schedule, unconditional="mixture")
    guided = classifier_free_guidance(model, labels, 3.0, null_label=NULL)
    x, t = 1.3 * _noise((2048, 1, 1, 1), seed=3), torch.full((2048,), 400)
    eps_c, eps_u = gaussian_eps(schedule, x, t, MUS[1]), mixture_eps(schedule, x, t)
    torch.testing.assert_close(guided(x, t), eps_u + 3.0 * (eps_c - eps_u), rtol=0, atol=1e-12)
    plain = run("ddim", classifier_free_guidance(model, labels, 1.0, null_label=NULL), _noise((2048, 1, 1, 1)), schedule, 100)
    pushed = run("ddim", guided, _noise((2048, 1, 1, 1)), schedule, 100)
    assert abs(plain.mean().item() - MUS[1]) < 0.03
    assert pushed.mean().item() > MUS[1] + 0.03


@pytest.mark.parametrize("name", SAMPLERS)
def test_cfg_makes_one_batched_network_call_per_step(schedule, name):
    calls = []
    labels = torch.ones(8, dtype=torch.long)
    guided = classifier_free_guidance(labelled_model(schedule, calls=calls), labels, 3.0, null_label=NULL)
    run(name, guided, _noise((8, 1, 1, 1)), schedule, 6)
    assert calls == [16] * num_function_evaluations(name, 6)


@pytest.mark.parametrize("name", SAMPLERS)
def test_cfg_at_zero_is_the_unconditional_model_in_one_unbatched_pass(schedule, name):
    calls = []
    labels, x = torch.ones(8, dtype=torch.long), _noise((8, 1, 1, 1), seed=6)
    model = labelled_model(schedule, calls=calls)
    out = run(name, classifier_free_guidance(model, labels, 0.0, null_label=NULL), x, schedule, 6)
    assert calls == [8] * num_function_evaluations(name, 6)
    unconditional = run(name, lambda x_t, t: model(x_t, t, torch.full_like(labels, NULL)), x, schedule, 6)
    assert torch.equal(out, unconditional)


# ---------------------------------------------------------------------------------------------
# No-op scales are exactly the unguided sampler


def _zero_gradient_classifier(x_t, t):
    """Logits that do not depend on x_t: grad log p(y | x_t) is exactly zero."""
    return (0.0 * x_t).flatten(1).sum(1, keepdim=True) + torch.tensor([[0.3, -1.2]], dtype=x_t.dtype)


@pytest.mark.parametrize("name", SAMPLERS)
def test_no_op_guidance_equals_the_unguided_sampler_exactly(schedule, name):
    x = _noise((64, 1, 2, 2), seed=4)
    labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(5))
    model = labelled_model(schedule)

    def plain(x_t, t):
        return model(x_t, t, labels)

    def run(*args, **kwargs):  # DDIM stochastic here, so that its generator use is covered too
        return globals()["run"](*args, eta=0.5, **kwargs)

    reference = run(name, plain, x, schedule, 8)
    assert torch.equal(run(name, classifier_free_guidance(model, labels, 1.0, null_label=NULL), x, schedule, 8), reference)
    gradient = classifier_log_prob_gradient(bayes_classifier_logits(schedule), labels)
    assert torch.equal(run(name, classifier_guidance(plain, schedule, gradient, 0.0), x, schedule, 8), reference)
    assert torch.equal(run(name, rule_guidance(plain, schedule, [parse_rule("symmetry:0")]), x, schedule, 8), reference)
    zero = classifier_log_prob_gradient(_zero_gradient_classifier, labels)
    if name == "ddpm":
        shifted = run(name, plain, x, schedule, 8, mean_shift=classifier_mean_shift(zero, 5.0))
    else:
        shifted = run(name, classifier_guidance(plain, schedule, zero, 5.0), x, schedule, 8)
    assert torch.equal(shifted, reference)
    # ... and a real scale does change the samples (the equalities above are not vacuous)
    strong = classifier_free_guidance(model, labels, 3.0, null_label=NULL)
    assert (run(name, strong, x, schedule, 8) - reference).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Classifier guidance


def test_bayes_classifier_guidance_turns_the_mixture_into_the_conditional(schedule):
    """score(x_t | y) = score(x_t) + grad log p(y | x_t): at scale 1 the exact classifier's gradient
    makes the unconditional eps the conditional one, eps_u - sqrt(1 - abar) grad = eps_y, at integer
    and fractional t."""
    x = 1.5 * _noise((256, 1, 1, 1), seed=6)  # one pixel: mixture_eps is per pixel, the classifier per image
    labels = torch.randint(0, 2, (256,), generator=torch.Generator().manual_seed(7))
    gradient = classifier_log_prob_gradient(bayes_classifier_logits(schedule), labels)
    guided = classifier_guidance(lambda x_t, t: mixture_eps(schedule, x_t, t), schedule, gradient, 1.0)
    for t in (torch.full((256,), 10), torch.full((256,), 637), torch.full((256,), 423.25, dtype=torch.float64)):
        mu = torch.tensor(MUS, dtype=x.dtype)[labels].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(guided(x, t), gaussian_eps(schedule, x, t, mu), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, steps", [("ddpm", 500), ("ddim", 100), ("heun", 30)])
def test_classifier_guided_samples_come_from_the_labelled_class(schedule, name, steps):
    """DDPM (mean shift, Alg. 1) and the eps-shift samplers (Alg. 2): guiding the mixture model with
    the exact classifier at scale 1 samples class y: per-class mean mu_y and std s."""
    labels = torch.arange(4096) % 2
    gradient = classifier_log_prob_gradient(bayes_classifier_logits(schedule), labels)

    def mixture(x_t, t):
        return mixture_eps(schedule, x_t, t)

    x = _noise(seed=8)
    if name == "ddpm":
        out = run(name, mixture, x, schedule, steps, mean_shift=classifier_mean_shift(gradient, 1.0))
    else:
        out = run(name, classifier_guidance(mixture, schedule, gradient, 1.0), x, schedule, steps)
    for y in (0, 1):
        values = out[labels == y]
        assert abs(values.mean().item() - MUS[y]) < 4 * S / math.sqrt(values.numel()) + 5e-3
        assert abs(values.std().item() - S) < 0.02


# ---------------------------------------------------------------------------------------------
# Rules


def test_rule_guidance_takes_one_gradient_step_of_the_rules_on_x0(schedule):
    """The guided eps must predict x0_hat - grad_{x0} sum_i w_i rule_i(x0_hat) at the same x_t: the
    gradient checked by central finite differences (float64) of the weighted rule losses."""
    rules = [parse_rule("brightness:2:target=0.8"), parse_rule("symmetry:1.5"), parse_rule("ink:0.7:target=0.1"),
             parse_rule("region:3:box=0,0,0.5,0.75")]

    def denoise(x_t, t):
        return mixture_eps(schedule, x_t, t)

    x = 0.7 * _noise((3, 1, 4, 4), seed=9)
    t = torch.tensor([100, 300, 700])  # a per-sample abar
    guided = rule_guidance(denoise, schedule, rules)
    a, b = schedule.signal_noise_scales(t, x)
    x0_hat = (x - b * denoise(x, t)) / a

    def total_loss(x0):
        return sum(r.weight * r.loss(x0).sum() for r in rules)

    numeric = torch.zeros_like(x)
    h = 1e-6
    for index in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[index] = h
        step = step.reshape(x.shape)
        numeric.view(-1)[index] = (total_loss(x0_hat + step) - total_loss(x0_hat - step)) / (2 * h)
    x0_guided = (x - b * guided(x, t)) / a
    torch.testing.assert_close(x0_guided, x0_hat - numeric, rtol=1e-5, atol=1e-7)


def test_brightness_rule_guidance_brightens_the_samples(schedule):
    def denoise(x_t, t):
        return gaussian_eps(schedule, x_t, t, MUS[0])

    x = _noise((512, 1, 2, 2), seed=10)
    plain = run("ddim", denoise, x, schedule, 50)
    bright = run("ddim", rule_guidance(denoise, schedule, [parse_rule("brightness:50:target=0.9")]), x, schedule, 50)
    assert plain.mean().item() < MUS[0] + 0.03  # intensity ~0.3
    assert bright.mean().item() > plain.mean().item() + 0.2


def test_builtin_rules_on_hand_made_images():
    black = -torch.ones(1, 1, 4, 4)
    white = torch.ones(1, 1, 4, 4)
    grey = torch.full((1, 1, 4, 4), 0.2)  # intensity 0.6
    symmetric = torch.tensor([[1.0, -1.0, -1.0, 1.0]]).repeat(4, 1)[None, None]
    left = torch.tensor([[1.0, 1.0, -1.0, -1.0]]).repeat(4, 1)[None, None]  # mirror differs by 2 everywhere
    assert symmetry_rule(symmetric).item() == 0
    assert symmetry_rule(left).item() == pytest.approx(4.0)
    assert brightness_rule(grey, target=0.6).item() == pytest.approx(0.0, abs=1e-12)
    assert brightness_rule(black, target=0.25).item() == pytest.approx(0.0625)
    assert ink_rule(white, target=1.0).item() == pytest.approx(torch.sigmoid(torch.tensor(-10.0)).item() ** 2, rel=1e-2)
    assert ink_rule(left, target=0.5).item() == pytest.approx(0.0, abs=1e-12)  # half the pixels are ink
    # region (x0, y0, x1, y1): the left half; `left` is white there, its mirror is black there
    assert region_rule(left, box=(0, 0, 0.5, 1)).item() == pytest.approx(1.0)
    assert region_rule(left.flip(-1), box=(0, 0, 0.5, 1)).item() == 0
    top = torch.where(torch.arange(4)[:, None] < 1, 1.0, -1.0).expand(4, 4)[None, None]  # white top row
    assert region_rule(top, box=(0, 0.25, 1, 1)).item() == 0 and region_rule(top, box=(0, 0, 1, 0.25)).item() == 1
    assert brightness_rule(torch.cat([black, white])).tolist() == pytest.approx([0.25, 0.25])  # (N,)


def _double_rule(x0, scale=1.0):
    return scale * x0.flatten(1).mean(1)


def test_parse_rule_syntax_and_user_rules():
    assert set(RULES) >= {"brightness", "symmetry", "ink", "region"}
    rule = parse_rule("symmetry:2")
    assert rule.fn is symmetry_rule and rule.weight == 2 and rule.params == {}
    rule = parse_rule("brightness:1:target=0.3")
    assert rule.fn is brightness_rule and rule.weight == 1 and rule.params == {"target": 0.3}
    assert parse_rule("brightness:target=0.3").weight == 1
    assert parse_rule("region:5:box=0,0,0.5,0.5").params == {"box": (0, 0, 0.5, 0.5)}
    rule = parse_rule(f"{__name__}:_double_rule:0.5:scale=3")
    assert rule.fn is _double_rule and rule.weight == 0.5 and rule.params == {"scale": 3.0}
    register_rule("double-test", _double_rule)
    try:
        assert parse_rule("double-test:4").fn is _double_rule
    finally:
        RULES.pop("double-test")
    rule = parse_rule((_double_rule, 2.5))
    assert isinstance(rule, Rule) and rule.weight == 2.5
    for bad, word in [("nosuchrule", "unknown rule"), ("symmetry:abc=", "KEY=VALUE"), ("brightness:1:x", "KEY=VALUE"),
                      ("no_such_module_xyz:fn", "cannot be imported"), ("", "NAME")]:
        with pytest.raises(ConfigError, match=word):
            parse_rule(bad)
    with pytest.raises(ConfigError, match="box"):
        region_rule(torch.zeros(1, 1, 4, 4), box=(0.5, 0, 0.2, 1))
