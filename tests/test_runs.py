"""Run folders and child runs: a child keeps its frozen parents in its own checkpoint and loads without
their folders; children take their data and preset family from their parent; Run's one-line repr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import genlab.config
from genlab import api
from genlab.cli import main
from genlab.config import to_dict
from genlab.errors import ConfigError, GenlabError
from genlab.inversion import render
from genlab.runs import guidance_classifier, load_run
from genlab.train.checkpoint import STATE_FILE, latest_checkpoint
from tiny_configs import TINY_DCGAN, TINY_ENCODER, TINY_KL_AE, TINY_LDM, TINY_VQ

TINY_GPT = ["model.net.dim=32", "model.net.num_layers=2", "model.net.num_heads=2", "train.batch_size=32",
            "train.lr=3e-3", "train.log_every=5", "train.sample_n=4", "train.threads=1"]


def _digits(n: int = 4) -> torch.Tensor:
    from genlab.data import DataConfig, load_data

    return load_data(DataConfig(source="digits", split="test", limit=n)).to_model_range()


def _output(run) -> torch.Tensor:
    """What the child run produces: samples, or for the gan-encoder, the GAN's images of its inversions."""
    if run.config.method == "gan-encoder":
        with torch.no_grad():
            return render(run.method.gan, run.method.invert(_digits()), run.method.space)
    return run.sample(3, seed=0)


# (parent method, its overrides, child method, the parent's role, the child's overrides)
FAMILIES = {
    "ldm": ("kl-ae", TINY_KL_AE, "autoencoder", TINY_LDM),
    "gpt": ("vqvae", TINY_VQ + ["train.sample_n=4"], "codes", TINY_GPT),
    "gan-encoder": ("gan", TINY_DCGAN, "gan", TINY_ENCODER),
}


@pytest.mark.parametrize("child", sorted(FAMILIES))
def test_a_child_run_keeps_working_after_its_parent_folder_is_deleted(tmp_path, child):
    parent, parent_overrides, role, child_overrides = FAMILIES[child]
    parent_dir, child_dir, old_dir = tmp_path / "parent", tmp_path / "child", tmp_path / "old-child"
    api.train(parent, data="digits", overrides=parent_overrides + ["train.steps=3"], run_dir=parent_dir, progress=False)
    api.train(child, overrides=child_overrides + [f"model.{role}={parent_dir}", "train.steps=3"], run_dir=child_dir,
              progress=False)
    # The child's state.json holds the parent's config, shape and provenance (its weights are in the child's tensors).
    record = json.loads((latest_checkpoint(child_dir) / STATE_FILE).read_text())["parents"][role]
    parent_run = load_run(parent_dir)
    assert record["method"] == parent and record["config"] == to_dict(parent_run.config)
    assert record["path"] == str(parent_dir.resolve()) and record["step"] == 3 == parent_run.step
    assert record["data_info"]["image_size"] == 8
    before = _output(load_run(child_dir))
    # A checkpoint written before parents were stored still loads, from the parent folder its config names.
    shutil.copytree(child_dir, old_dir)
    state_file = latest_checkpoint(old_dir) / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["parents"]
    state_file.write_text(json.dumps(state))
    assert torch.equal(_output(load_run(old_dir)), before)

    shutil.rmtree(parent_dir)
    assert torch.equal(_output(load_run(child_dir)), before)  # rebuilt from the child's own copy
    with pytest.raises(GenlabError, match=f"{parent_dir}: no such run folder"):
        load_run(old_dir)  # the old behaviour: the parent folder was needed
    if child == "ldm":  # resuming needs no parent folder either
        resumed = api.train(child, overrides=["train.steps=4"], run_dir=child_dir, resume=True, progress=False)
        assert resumed.step == 4 and resumed.method.parent_records[role]["path"] == str(parent_dir.resolve())


def test_classifier_guidance_resolves_a_run_folder_and_names_a_missing_capability(tmp_path):
    kl_ae = tmp_path / "kl-ae"
    api.train("kl-ae", data="digits", overrides=TINY_KL_AE + ["train.steps=1"], run_dir=kl_ae, progress=False)
    with pytest.raises(ConfigError, match=f"{kl_ae}: a kl-ae run cannot guide sampling .*'NoiseAwareClassifier'"
                                          ".*which noisy-classifier has") as e:
        guidance_classifier(str(kl_ae))
    assert "\n" not in str(e.value)
    method = load_run(kl_ae).method
    assert guidance_classifier(method) is method  # a method passes through: DDPM receives methods only


def test_run_repr_is_one_line_with_method_step_weights_and_path(tmp_path):
    path = tmp_path / "kl-ae"
    api.train("kl-ae", data="digits", overrides=TINY_KL_AE + ["train.steps=2"], run_dir=path, progress=False)
    assert repr(load_run(path)) == f"Run(method='kl-ae', step=2, weights='raw', path='{path}')"  # no EMA: raw


CHILD_ROLES = {"ldm": "autoencoder", "pixelcnn": "codes", "gpt": "codes", "gan-encoder": "gan"}


@pytest.mark.parametrize("child", sorted(CHILD_ROLES))
def test_a_child_takes_its_parents_data_and_data_specific_preset(tmp_path, monkeypatch, child):
    role = CHILD_ROLES[child]
    parent = tmp_path / "parent"  # only its config is read to configure the child
    parent.mkdir()
    parent_data = {"source": "fashion-mnist", "root": "/data/root", "image_size": 16, "channels": 3}
    (parent / "config.yaml").write_text(yaml.safe_dump({"method": "x", "data": parent_data}))
    presets = tmp_path / "presets"
    presets.mkdir()
    stem = child.replace("-", "_")
    (presets / f"{stem}_small.yaml").write_text("train:\n  steps: 11\n")
    (presets / f"{stem}_fashion_mnist_small.yaml").write_text("train:\n  steps: 22\n")
    monkeypatch.setattr(genlab.config, "preset_dir", lambda: presets)

    cfg, preset = api.train_config(child, preset="small", overrides=[f"{role}={parent}"])  # as --{role} RUN sets it
    assert preset == presets / f"{stem}_fashion_mnist_small.yaml" and cfg.train.steps == 22
    assert {k: getattr(cfg.data, k) for k in parent_data} == parent_data
    assert getattr(cfg.model, role) == str(parent.resolve())
    # --data wins over the parent's: its own preset family (none for digits: the generic one).
    cfg, preset = api.train_config(child, data="digits", preset="small", overrides=[f"model.{role}={parent}"])
    assert preset == presets / f"{stem}_small.yaml" and cfg.train.steps == 11 and cfg.data.source == "digits"


def test_train_prints_the_preset_file_it_used(tmp_path, capsys, monkeypatch):
    from tiny_configs import TINY_DDPM

    monkeypatch.chdir(tmp_path)
    assert main(["train", "ddpm", "--data", "digits", "--run-dir", "a", "--no-progress", *TINY_DDPM,
                 "train.steps=1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["preset: none (defaults)", "a"]
    (tmp_path / "tiny.yaml").write_text("train:\n  steps: 1\n")
    assert main(["train", "ddpm", "--data", "digits", "--preset", "tiny.yaml", "--run-dir", "b", "--no-progress",
                 *TINY_DDPM]) == 0
    assert capsys.readouterr().out.splitlines() == ["preset: tiny.yaml", "b"]


@pytest.mark.slow
def test_ldm_on_an_mnist_kl_ae_uses_the_mnist_preset(tmp_path, capsys, data_root):
    """`genlab train ldm --autoencoder RUN --preset small` on a kl-ae trained on mnist picks ldm_mnist_small.yaml."""
    kl_ae, ldm = tmp_path / "kl-ae", tmp_path / "ldm"
    assert main(["train", "kl-ae", "--data", "mnist", "--data-root", str(data_root), "--run-dir", str(kl_ae),
                 "--no-progress", *TINY_KL_AE, "data.limit=64", "train.steps=1"]) == 0
    capsys.readouterr()
    assert main(["train", "ldm", "--autoencoder", str(kl_ae), "--preset", "small", "--run-dir", str(ldm),
                 "--no-progress", *TINY_LDM, "model.unet.attention_resolutions=[]", "data.limit=64",
                 "train.steps=1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("preset: ") and printed[0].endswith("ldm_mnist_small.yaml"), printed
    cfg = load_run(ldm).config
    assert cfg.data.source == "mnist" and cfg.data.root == str(data_root)
    assert cfg.model.class_conditional  # ldm_mnist_small's, not ldm_small's


def test_heldout_images_of_a_folder_without_test_split_name_the_option_that_picks_others(tmp_path):
    """A folder run has no test/ by default: the error names --data and FOLDER:train, and that choice works."""
    import types

    from PIL import Image

    from genlab.data import DataConfig
    from genlab.errors import DataError
    from genlab.runs import heldout_images

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(torch.full((8, 8), 40 * i, dtype=torch.uint8).numpy()).save(tmp_path / "imgs" / f"{i}.png")
    source = f"folder:{tmp_path / 'imgs'}"
    run = types.SimpleNamespace(config=types.SimpleNamespace(data=DataConfig(source=source)))
    with pytest.raises(DataError) as info:
        heldout_images(run)
    assert "\n" not in str(info.value) and "--data" in str(info.value) and f"{source}:train" in str(info.value)
    held = heldout_images(run, f"{source}:train")
    assert sorted(held.images.flatten(1)[:, 0].tolist()) == [0, 40, 80]


def _tiny_ddpm(tmp_path):
    from tiny_configs import TINY_DDPM

    api.train("ddpm", data="digits", overrides=[*TINY_DDPM, "train.steps=2"], run_dir=tmp_path / "ddpm", progress=False)
    return load_run(tmp_path / "ddpm")


def test_sampling_falls_back_to_the_eager_network_with_one_warning_when_compilation_fails(tmp_path, monkeypatch):
    run = _tiny_ddpm(tmp_path)
    eager = run.sample(6, seed=3, batch_size=4, sampler="ddim", steps=3)

    def broken(fn, *args, **kwargs):  # what inductor does without a C++ compiler: fail at the first call
        def call(*a, **k):
            raise RuntimeError("no working C++ compiler\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match=r"^torch.compile failed \(RuntimeError: no working C\+\+ compiler\); "
                                            "sampling with the eager network$") as caught:
        fallback = run.sample(6, seed=3, batch_size=4, sampler="ddim", steps=3, compile=True)
    assert len(caught) == 1  # once: the second batch goes straight to the eager network
    assert torch.equal(fallback, eager)  # the failed batch is redrawn from the same noise
    assert run.method.backbone._compiled_call_impl is None


def test_compile_refuses_a_run_without_a_denoiser_network(tmp_path):
    path = tmp_path / "gan"
    api.train("gan", data="digits", overrides=TINY_DCGAN + ["train.steps=1"], run_dir=path, progress=False)
    with pytest.raises(ConfigError, match="--compile applies to diffusion runs .* a gan run has none"):
        load_run(path).sample(2, compile=True)


@pytest.mark.slow
def test_compiled_sampling_agrees_with_eager_sampling(tmp_path):
    run = _tiny_ddpm(tmp_path)
    for sampler, steps in (("ddim", 4), ("dpmpp-2m", 3)):  # integer and fractional timesteps
        eager = run.sample(4, seed=1, sampler=sampler, steps=steps)
        compiled = run.sample(4, seed=1, sampler=sampler, steps=steps, compile=True)
        assert run.method.backbone._compiled_call_impl is not None  # it did compile, no fallback
        assert float((compiled - eager).abs().max()) < 1e-4  # float32 reassociation only
    # One graph per timestep dtype, then none: DPM-Solver++'s float timesteps of other values, and a second
    # call, run the compiled graph (a recompile per step would fall back to eager after dynamo's limit).
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    run.sample(4, seed=2, sampler="dpmpp-2m", steps=5, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_sampling_draws_a_last_partial_batch_eagerly(tmp_path, monkeypatch):
    run = _tiny_ddpm(tmp_path)
    eager = run.sample(10, seed=2, batch_size=4, sampler="ddim", steps=2)
    seen = []

    def recording(fn, *args, **kwargs):  # stands in for torch.compile: records the batch shapes it is called with
        def call(*a, **k):
            seen.append(len(a[0]))
            return fn(*a, **k)
        return call

    monkeypatch.setattr(torch, "compile", recording)
    compiled = run.sample(10, seed=2, batch_size=4, sampler="ddim", steps=2, compile=True)
    assert set(seen) == {4} and len(seen) == 2 * 2  # two full batches of two steps; the batch of 2 ran eagerly
    assert torch.equal(compiled, eager)
    assert run.method.backbone._compiled_call_impl is not None  # compiled again after the eager remainder


def test_a_class_conditional_run_asked_no_class_draws_every_class_in_turn(tmp_path):
    from tiny_configs import TINY_DDPM

    api.train("ddpm", data="digits", overrides=[*TINY_DDPM, "train.steps=2", "model.class_conditional=true",
                                                "model.p_uncond=0.2"], run_dir=tmp_path / "cfg", progress=False)
    run = load_run(tmp_path / "cfg")
    options = dict(sampler="ddim", steps=3, batch_size=4)
    default = run.sample(10, seed=1, **options)
    assert torch.equal(default, run.sample(10, seed=1, labels="all", **options))  # 0, 1, ..., 9
    # the null class (what label dropout trained, and what this drew before) stays one option away: w = 0
    null_class = run.sample(10, seed=1, labels="all", guidance_scale=0.0, **options)
    assert (default - null_class).abs().max() > 1e-3
