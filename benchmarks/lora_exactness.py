"""Merge / unmerge exactness and peft agreement of a trained lora run, on its real weights.

    python benchmarks/lora_exactness.py LORA_RUN --out-dir runs/lora-exact [--n 16]

Prints (as maximum relative errors, |a - b|max / |b|max per tensor, the worst tensor):
1. in memory: merge then unmerge against the base weights (LoRALayer keeps the original: expected 0);
2. on disk: `genlab lora merge` then `genlab lora unmerge` against the base run's weights (float64 subtraction);
3. merged vs unmerged network outputs on N noisy images at random timesteps;
4. peft (PeftModel.from_pretrained of the exported folder on the plain base method) vs genlab outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from genlab.adapters import merge_run, run_adapter, save_adapter, unmerge_run
from genlab.methods.lora import LoRA
from genlab.nn.lora import lora_layers
from genlab.runs import _rebuild_parent, load_run


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def plain_base(lora: LoRA):
    """The base method without adapters, with the weights stored in the lora run (what it was trained on)."""
    base = _rebuild_parent(lora.parent_records["base"])
    state = {k.replace(".base_layer", ""): v for k, v in lora.base.state_dict().items() if ".lora_" not in k}
    base.load_state_dict(state)
    return base.eval()


def outputs(method, x, t, y):
    with torch.no_grad():
        return method.network(x, t, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a lora run of a ddpm base")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--n", type=int, default=16)
    a = p.parse_args()
    out = Path(a.out_dir)
    lora = load_run(a.run, device="cpu").method
    base = plain_base(lora)
    originals = base.state_dict()
    g = torch.Generator().manual_seed(0)
    size, channels = lora.data_info.image_size, lora.data_info.channels
    x = torch.randn(a.n, channels, size, size, generator=g)
    t = torch.randint(0, lora.base.config.num_timesteps, (a.n,), generator=g)
    y = None if lora.num_classes is None else torch.randint(0, lora.num_classes, (a.n,), generator=g)

    unmerged = outputs(lora.base, x, t, y)
    layers = lora_layers(lora.base).values()
    for layer in layers:
        layer.merge()
    merged = outputs(lora.base, x, t, y)
    for layer in layers:
        layer.unmerge()
    now = {k.replace(".base_layer", ""): v for k, v in lora.base.state_dict().items() if ".lora_" not in k}
    in_memory = max(relative(now[k], v) for k, v in originals.items() if v.is_floating_point())

    merged_dir = merge_run(a.run, out / "merged")
    restored = load_run(unmerge_run(merged_dir, out / "restored"), weights="raw", device="cpu").method.state_dict()
    on_disk = max(relative(restored[k], v) for k, v in originals.items() if v.is_floating_point())

    import peft

    folder = save_adapter(run_adapter(load_run(a.run, device="cpu")), out / "peft")
    theirs = outputs(peft.PeftModel.from_pretrained(plain_base(lora), str(folder)).base_model.model, x, t, y)

    print("| check | max relative error |")
    print("|---|---|")
    print(f"| merge then unmerge in memory vs base weights | {in_memory:.3g} |")
    print(f"| `genlab lora merge` then `unmerge` (files) vs base weights | {on_disk:.3g} |")
    print(f"| merged vs unmerged outputs ({a.n} noisy images) | {relative(merged, unmerged):.3g} |")
    print(f"| peft (PeftModel.from_pretrained of the export) vs genlab outputs | {relative(theirs, unmerged):.3g} |")


if __name__ == "__main__":
    main()
