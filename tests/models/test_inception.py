"""The FID Inception network: pytorch-fid's state dict layout, the TF graph's preprocessing, TF pooling quirks."""

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from genlab.errors import ConfigError, DataError, GenlabError
from genlab.models import inception
from genlab.models.inception import FIDInceptionV3, load_fid_inception, resize_bilinear_tf1

# Representative entries of pytorch-fid's pt_inception-2015-12-05-6726825d.pth, read from pytorch-fid's
# fid_inception_v3(): torchvision's Inception3(num_classes=1008, aux_logits=False) with FIDInceptionA/C/E_1/E_2
# blocks (same parameters as torchvision's blocks). Conv weights are (out, in, kh, kw); BatchNorm eps 0.001.
PYTORCH_FID_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.bn.running_mean": (96,),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# 94 conv+BN units x (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var) + fc.weight + fc.bias.
PYTORCH_FID_NUM_TENSORS = 94 * 5 + 2
# Exports made with torch >= 0.4.1 add one bn.num_batches_tracked per BatchNorm.
PYTORCH_FID_NUM_BATCHES_TRACKED = 94


def _randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Well-scaled random weights (He init, non-trivial BatchNorm statistics), so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * math.sqrt(2 / fan_in))
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) / math.sqrt(module.in_features))
                module.bias.copy_(torch.randn(module.bias.shape, generator=g))
    return model.eval()


def _torchvision_inception(state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """torchvision's Inception3 as pytorch-fid builds it (1008 classes, no aux head); random or given weights."""
    kwargs = dict(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    if state is None:
        return _randomize_(torchvision.models.inception_v3(**kwargs))
    with torch.device("meta"):
        model = torchvision.models.inception_v3(**kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    """A state dict with pytorch-fid's keys and shapes (built the way pytorch-fid builds its model), random values."""
    return _torchvision_inception().state_dict()


def _fid_inception(state: dict[str, torch.Tensor], input_size: int = 299) -> FIDInceptionV3:
    with torch.device("meta"):
        model = FIDInceptionV3(input_size=input_size)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def test_pytorch_fid_state_dict_loads_strictly_with_exact_keys_and_shapes(reference_state):
    tensors = [k for k in reference_state if not k.endswith("num_batches_tracked")]
    assert len(tensors) == PYTORCH_FID_NUM_TENSORS
    assert len(reference_state) - len(tensors) == PYTORCH_FID_NUM_BATCHES_TRACKED
    for key, shape in PYTORCH_FID_SHAPES.items():
        assert tuple(reference_state[key].shape) == shape, key

    with torch.device("meta"):
        model = FIDInceptionV3()
    ours = model.state_dict()
    assert set(ours) == set(reference_state)
    assert all(ours[k].shape == reference_state[k].shape for k in ours)
    model.load_state_dict(reference_state, strict=True, assign=True)
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, reference_state["Mixed_7c.branch_pool.conv.weight"])
    assert model.Conv2d_1a_3x3.bn.eps == 0.001  # TF's BatchNorm epsilon, part of the graph


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_fid_inception_reads_weights_files_with_or_without_batch_counters(tmp_path, suffix, reference_state):
    from safetensors.torch import save_file

    without_counters = {k: v for k, v in reference_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(without_counters, path)
    else:
        save_file(without_counters, str(path))
    model = load_fid_inception(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in without_counters.items())


def test_weights_env_var_is_used(tmp_path, monkeypatch):
    path = tmp_path / "fid.pth"
    path.write_bytes(b"")  # only located here, not read
    monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(path))
    assert inception.fid_inception_weights_path() == path


def test_missing_weights_file_gives_one_line_error_without_inner_traceback(tmp_path):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(GenlabError) as info:
        load_fid_inception(missing)
    message = str(info.value)
    assert "\n" not in message
    assert str(missing) in message and inception.FID_WEIGHTS_URL in message and inception.WEIGHTS_ENV_VAR in message


def test_failed_download_gives_one_line_error_saying_what_to_fetch_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution\nsecond line")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DataError) as info:
        load_fid_inception()
    target = tmp_path / "hub" / "checkpoints" / inception.FID_WEIGHTS_FILENAME
    assert calls == [(inception.FID_WEIGHTS_URL, str(target), inception.FID_WEIGHTS_SHA256_PREFIX)]
    message = str(info.value)
    assert "\n" not in message and "name resolution" in message
    assert inception.FID_WEIGHTS_URL in message and str(target) in message and inception.WEIGHTS_ENV_VAR in message
    # Raised `from None`: no chained "During handling of the above exception" traceback from torch.hub.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_cached_weights_are_used_without_downloading(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / inception.FID_WEIGHTS_FILENAME
    cached.parent.mkdir()
    cached.write_bytes(b"")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    assert inception.fid_inception_weights_path() == cached


def test_wrong_state_dict_names_the_mismatch(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1008), "extra": torch.zeros(1)}, path)
    with pytest.raises(DataError, match=r"missing \['Conv2d_1a_3x3.bn.bias'.*unexpected \['extra'\].*wrong shapes \['fc.weight'\]") as info:
        load_fid_inception(path)
    assert "\n" not in str(info.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read FID Inception weights"):
        load_fid_inception(path)


def test_resize_is_tf1_legacy_bilinear_on_a_linear_ramp():
    # TF1 ResizeBilinear(align_corners=False): output pixel i samples input coordinate i * in / out, with the
    # upper neighbour clamped to the last pixel. On a ramp a*row + b*col this gives a*min(i*H/out, H-1) + ...
    h, w, out = 28, 20, 299
    rows = torch.arange(h, dtype=torch.float32)[:, None]
    cols = torch.arange(w, dtype=torch.float32)[None, :]
    ramp = (0.03 * rows - 0.05 * cols).expand(2, 3, h, w)  # (2, 3, 28, 20)
    resized = resize_bilinear_tf1(ramp, (out, out))
    i = torch.arange(out, dtype=torch.float64)
    expected = 0.03 * (i * h / out).clamp(max=h - 1)[:, None] - 0.05 * (i * w / out).clamp(max=w - 1)[None, :]
    torch.testing.assert_close(resized, expected.float().expand(2, 3, out, out), atol=2e-6, rtol=0)
    # PyTorch's align_corners=False uses half-pixel centres, which is not what the TF graph does.
    half_pixel = F.interpolate(ramp, size=(out, out), mode="bilinear", align_corners=False)
    assert (half_pixel - resized).abs().max() > 0.01


def test_resize_downsampling_picks_tf1_taps():
    # 8 -> 3: sources 0, 8/3, 16/3 (no half-pixel offset): rows 0, lerp(2, 3, 2/3), lerp(5, 6, 1/3).
    x = torch.arange(8, dtype=torch.float32).pow(2)[None, None, :, None].expand(1, 1, 8, 8)
    y = resize_bilinear_tf1(x, (3, 8))[0, 0, :, 0]
    expected = torch.tensor([0.0, 4 + (9 - 4) * 2 / 3, 25 + (36 - 25) * 1 / 3])
    torch.testing.assert_close(y, expected)


def test_preprocess_maps_minus_one_one_images_to_the_graph_input():
    # The graph sees (p - 128) / 128 of pixels p = (x + 1) * 127.5, i.e. x * 255/256 - 1/256, after its resize.
    model = FIDInceptionV3()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(model.preprocess(x), x * 255 / 256 - 1 / 256, atol=1e-6, rtol=0)
    assert model.preprocess(torch.full((1, 3, 8, 8), -1.0)).eq(-1).all()  # black pixel 0 -> -1
    torch.testing.assert_close(model.preprocess(torch.ones(1, 3, 8, 8)), torch.full((1, 3, 299, 299), 127 / 128))
    # Small images: the same affine map of the TF1-resized image; grey images become 3 equal channels.
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = resize_bilinear_tf1(grey, (299, 299)) * 255 / 256 - 1 / 256
    torch.testing.assert_close(model.preprocess(grey), expected.expand(2, 3, 299, 299), atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="got shape"):
        model.preprocess(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ConfigError, match="input_size must be >= 75"):
        FIDInceptionV3(input_size=64)


def _spike(channels: int, size: int, row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, channels, size, size)
    x[:, :, row, col] = 1.0
    return x


def _pooled_spike(size: int, row: int, col: int, mode: str) -> torch.Tensor:
    """Closed form of a 3x3 stride-1 'SAME' pool of a unit spike: max -> 1, TF average -> 1 / (real pixels in window)."""
    pooled = torch.zeros(size, size)
    for i in range(max(row - 1, 0), min(row + 2, size)):
        for j in range(max(col - 1, 0), min(col + 2, size)):
            real = (3 - (i == 0) - (i == size - 1)) * (3 - (j == 0) - (j == size - 1))
            pooled[i, j] = 1.0 if mode == "max" else 1.0 / real
    return pooled


@pytest.mark.parametrize(
    "make_block, in_channels, pool_channels, mode",
    [
        (lambda: inception.InceptionA(192, pool_features=32), 192, 32, "avg"),  # Mixed_5b: no zero padding in the mean
        (lambda: inception.InceptionC(768, channels_7x7=128), 768, 192, "avg"),  # Mixed_6b
        (lambda: inception.InceptionE(1280, pool="avg"), 1280, 192, "avg"),  # Mixed_7b
        (lambda: inception.InceptionE(2048, pool="max"), 2048, 192, "max"),  # Mixed_7c: the graph's max pool
    ],
    ids=["A", "C", "E_1", "E_2"],
)
def test_pool_branches_follow_tensorflow(make_block, in_channels, pool_channels, mode):
    block = _randomize_(make_block())
    size = 6
    for row, col in [(0, 0), (2, 3), (5, 1)]:  # corner, interior, edge
        x = _spike(in_channels, size, row, col)
        with torch.no_grad():
            out = block(x)[:, -pool_channels:]  # the pool branch is concatenated last
            pooled = _pooled_spike(size, row, col, mode).expand(1, in_channels, size, size)
            expected = block.branch_pool(pooled)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fid_inception_uses_the_tensorflow_blocks(reference_state):
    model = _fid_inception(reference_state)
    pools = {name: getattr(model, name).pool for name in ["Mixed_7b", "Mixed_7c"]}
    assert pools == {"Mixed_7b": "avg", "Mixed_7c": "max"}
    assert all(isinstance(getattr(model, f"Mixed_5{k}"), inception.InceptionA) for k in "bcd")
    assert all(isinstance(getattr(model, f"Mixed_6{k}"), inception.InceptionC) for k in "bcde")


@pytest.mark.parametrize(
    "ours, theirs, compare",
    [
        (lambda: inception.InceptionA(192, 32), lambda: torchvision.models.inception.InceptionA(192, 32), "interior"),
        (lambda: inception.InceptionB(288), lambda: torchvision.models.inception.InceptionB(288), "all"),
        (lambda: inception.InceptionC(768, 160), lambda: torchvision.models.inception.InceptionC(768, 160), "interior"),
        (lambda: inception.InceptionD(768), lambda: torchvision.models.inception.InceptionD(768), "all"),
        (lambda: inception.InceptionE(2048, "max"), lambda: torchvision.models.inception.InceptionE(2048), "not_pool"),
    ],
    ids=["A", "B", "C", "D", "E_2"],
)
def test_blocks_match_torchvision_wiring_where_pooling_agrees(ours, theirs, compare):
    # torchvision's blocks (the ones pytorch-fid patches) average-pool with the padding counted: their outputs
    # agree with ours away from the border, everywhere for the unpatched B and D blocks, and on all but the
    # pool branch of the max-pooling E_2 block.
    block = _randomize_(ours())
    reference = theirs()
    reference.load_state_dict(block.state_dict(), strict=True)
    reference.eval()
    x = torch.randn(2, next(block.parameters()).shape[1], 9, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = block(x), reference(x)
    if compare == "interior":
        a, b = a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1]
    elif compare == "not_pool":
        a, b = a[:, :-192], b[:, :-192]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if compare != "all":
        assert not torch.allclose(block(x), reference(x), atol=1e-3)  # and the patch does change the border / pool


def test_network_flow_matches_pytorch_fid_construction(reference_state):
    # pytorch-fid's fid_inception_v3(): torchvision's Inception3 (stem, max pools, global pool, fc) with the patched
    # blocks swapped in. Built here with our blocks, it must give our logits; a 75 px input keeps this fast.
    model = _fid_inception(reference_state, input_size=75)
    reference = _torchvision_inception(reference_state)
    for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b", "Mixed_7c"]:
        setattr(reference, name, getattr(model, name))
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        logits = model(x)
        features = model.features(x)
        expected = reference(model.preprocess(x))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, model.fc(features))
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    assert logits.std() > 0.1  # the comparison is between non-trivial numbers
