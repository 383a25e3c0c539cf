"""Property-based fuzzing of user input (issue 12 point 8): every config override and sampling option either
works or raises the project's one-line GenlabError, never another exception."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from genlab.config import DataConfig, TrainConfig, build_config, leaf_keys, list_presets  # noqa: E402
from genlab.errors import GenlabError  # noqa: E402
from genlab.methods import METHODS, DataInfo, get_method  # noqa: E402
from genlab.runs import Run  # noqa: E402

from oneline import one_line  # noqa: E402
from tiny_configs import TINY_DDPM  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)  # a fixed, fast sample of inputs for every `make test`
SOAK = settings(FUZZ, max_examples=1000, derandomize=False)  # fresh inputs each time: `pytest -m slow`

# Values of every kind a hostile user types: negative, zero, nan, inf, huge, strings, lists, mappings.
EDGES = st.sampled_from([0, -1, -5, 0.0, -0.5, math.nan, math.inf, -math.inf, 1e308, 2**63, -(2**64), 10**400])
NUMBERS = st.one_of(EDGES, st.integers(-3, 3), st.integers(), st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=12),
                    st.sampled_from(["nan", "-inf", "1e4", "1e999", "0x10", "[", "{a: 1}", "null", "~", "", "'"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))


def _as_text(value) -> str:
    """The value as it is typed after `key=` (raw strings are typed as they are)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and abs(value) > 10**300:
        return str(value)  # yaml.safe_dump refuses nothing, but keep huge ints literal
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _keys(method: str) -> list[str]:
    sections = {"data": DataConfig, "train": TrainConfig, "model": get_method(method).Config}
    return [f"{s}.{k}" for s, cls in sections.items() for k in leaf_keys(cls)]


METHOD_NAMES = sorted(m for m in METHODS if _keys(m))


@st.composite
def overrides(draw):
    method = draw(st.sampled_from(METHOD_NAMES))
    keys = _keys(method)
    key_names = st.one_of(st.sampled_from([k for k in keys if k.startswith("train.")]), st.sampled_from(keys),
                          st.sampled_from([k.split(".")[-1] for k in keys] + ["nokey", "train", "model.nokey"]))
    pairs = draw(st.lists(st.tuples(key_names, VALUES), min_size=1, max_size=3))
    preset = draw(st.sampled_from([None, *list_presets(method)]))
    return method, preset, [f"{key}={_as_text(value)}" for key, value in pairs]


@FUZZ
@given(overrides())
def test_config_overrides_work_or_raise_one_line_genlab_errors(case):
    _check_overrides(*case)


@pytest.mark.slow
@SOAK
@given(overrides())
def test_many_config_overrides_work_or_raise_one_line_genlab_errors(case):
    _check_overrides(*case)


def _check_overrides(method, preset, texts):
    try:
        cfg = build_config(method, get_method(method).Config, preset=preset, overrides=texts)
    except GenlabError as e:
        one_line(str(e))
        return
    for value in (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip, cfg.train.time_limit):
        assert value is None or math.isfinite(value)  # what passes is usable: no nan slips through
    assert cfg.train.steps >= 1 and cfg.train.batch_size >= 1 and cfg.train.checkpoint_every >= 1
    assert cfg.train.lr > 0 and cfg.train.keep_checkpoints >= 1 and cfg.train.log_every >= 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Run:
    """An untrained class-conditional tiny DDPM held in memory: sampling options are checked, not image quality."""
    method_cls = get_method("ddpm")
    cfg = build_config("ddpm", method_cls.Config, overrides=[*TINY_DDPM, "model.class_conditional=true"])
    torch.manual_seed(0)
    method = method_cls(cfg.model, DataInfo(channels=1, image_size=8, num_classes=10, source="digits"))
    return Run(path=tmp_path_factory.mktemp("fuzz"), config=cfg, method=method.eval(), step=0, weights="raw")


INTS = st.one_of(st.none(), st.integers(-2, 3), st.sampled_from([2**63, -(2**63) - 1, 10**30]))
FLOATS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 4))


@st.composite
def sampling_options(draw):
    options = {"sampler": draw(st.one_of(st.none(), st.sampled_from(["ddpm", "ddim", "euler", "heun", "dpmpp-2m",
                                                                      "nope", ""]))),
               "steps": draw(st.one_of(INTS, st.just(101))), "eta": draw(FLOATS),
               "guidance_scale": draw(FLOATS), "truncation": draw(FLOATS), "temperature": draw(FLOATS),
               "top_k": draw(INTS), "rules": draw(st.one_of(st.none(), st.lists(st.sampled_from(
                   ["symmetry:2", "brightness", "ink:x", "nope", "symmetry:nan", ":"]), max_size=2)))}
    n = draw(st.integers(-1, 3))
    label = draw(st.one_of(st.none(), st.just("all"), st.integers(-2, 11)))
    if label is not None:
        options["labels"] = label if label == "all" else torch.full((max(n, 0),), label, dtype=torch.long)
    negative = draw(st.one_of(st.none(), st.integers(-2, 11)))
    if negative is not None:
        options["negative_labels"] = torch.full((max(n, 0),), negative, dtype=torch.long)
    return n, draw(st.one_of(st.integers(-2, 3), st.sampled_from([2**63, -(2**63) - 1, 10**30]))), draw(st.integers(-1, 3)), {
        k: v for k, v in options.items() if v is not None}


@FUZZ
@given(sampling_options())
def test_sampling_options_work_or_raise_one_line_genlab_errors(tiny_run, case):
    _check_sampling(tiny_run, *case)


@pytest.mark.slow
@SOAK
@given(sampling_options())
def test_many_sampling_options_work_or_raise_one_line_genlab_errors(tiny_run, case):
    _check_sampling(tiny_run, *case)


def _check_sampling(tiny_run, n, seed, batch_size, options):
    try:
        images = tiny_run.sample(n, seed=seed, batch_size=batch_size, **options)
    except GenlabError as e:
        one_line(str(e))
        return
    assert images.shape == (n, 1, 8, 8)  # what passes is honoured: n images of the run's shape
