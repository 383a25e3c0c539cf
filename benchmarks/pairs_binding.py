"""Where the order of two digits is lost on mnist-pairs: in the text encoder's states, or in the run.

    PYTHONPATH=src python benchmarks/pairs_binding.py --probe [--encoder minilm]
    PYTHONPATH=src python benchmarks/pairs_binding.py --negative-swapped RUN --scales 4,8 --per-prompt 50
    PYTHONPATH=src python benchmarks/pairs_binding.py --per-template RUN --scales 4 --per-prompt 4 --sampler ddpm --steps 50

``--probe``: every caption of the 90 ordered digit pairs x 2 arrangements x 6 templates (1,080) goes through the
text encoder; each digit token's state is labelled "first digit" (left / top) or "second", and a logistic
regression (scikit-learn) learns the label from the state. Printed: accuracy on held-out digit pairs (every
template seen) per template, and accuracy on each template held out entirely. A state that encodes only where a
digit is *mentioned* scores near 100 % on the templates that mention the left digit first and near 0 % on a
held-out template that mentions it second ("an 8 to the right of a 3").

``--negative-swapped RUN``: the composition block of `genlab eval` (20 spatial prompts, N = per-prompt / 2 each)
sampled with classifier-free guidance against the caption with the two digits swapped, instead of the empty
prompt; scored as `genlab eval` scores composition (each half classified by the mnist evaluator).

``--per-template RUN``: composition per caption template. Every pair of the composition block (K, K+3) with
every one of the 12 templates (6 side by side, 6 stacked), ``per-prompt`` samples each; a row per template, with
whether the template names the left / top digit first (a model that only follows the order of mention gets
the order right exactly there).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch


def probe(kind: str) -> None:
    from sklearn.linear_model import LogisticRegression

    from genlab.data.captions import PAIR_TEMPLATES, pair_caption
    from genlab.methods.text_conditioning import text_encoder_for
    from genlab.text.encoders import TextEncoderConfig

    encoder = text_encoder_for(TextEncoderConfig(kind=kind, max_length=24), "mnist-pairs").eval()
    asks = [(a, b, kind_, t) for a, b in itertools.permutations(range(10), 2) for kind_ in PAIR_TEMPLATES
            for t in range(len(PAIR_TEMPLATES[kind_]))]
    captions = [pair_caption(*ask) for ask in asks]
    with torch.no_grad():
        states = encoder.encode(captions).tokens  # (N, L, D)
    ids, _ = encoder.tokenizer.encode(captions, encoder.max_length)
    digit_id = {d: encoder.tokenizer.encode([str(d)], encoder.max_length)[0][0, 1].item() for d in range(10)}
    features, first, pair, template = [], [], [], []
    for i, (a, b, kind_, t) in enumerate(asks):
        row = ids[i].tolist()
        for digit, is_first in ((a, 1), (b, 0)):
            features.append(states[i, row.index(digit_id[digit])].numpy())
            first.append(is_first)
            pair.append(10 * min(a, b) + max(a, b))
            template.append(kind_ * 6 + t)
    x, y, pair, template = np.array(features), np.array(first), np.array(pair), np.array(template)
    held = pair % 3 == 0  # a third of the unordered digit pairs, both orders, held out
    model = LogisticRegression(max_iter=5000).fit(x[~held], y[~held])
    print(f"{kind}: first-vs-second on held-out digit pairs, every template seen: {model.score(x[held], y[held]):.3f}")
    for t in range(12):
        kind_, k = divmod(t, 6)
        seen = model.score(x[held & (template == t)], y[held & (template == t)])
        alone = LogisticRegression(max_iter=5000).fit(x[template != t], y[template != t]).score(x[template == t], y[template == t])
        print(f"| {PAIR_TEMPLATES[kind_][k]} | {seen:.3f} | {alone:.3f} |")


def negative_swapped(run_dir: str, scales: list[float], per_prompt: int, sampler: str, steps: int) -> None:
    from genlab import api
    from genlab.data.captions import pair_caption
    from genlab.evaluation.common import resolve_extractor
    from genlab.evaluation.text_to_image import _samples_u8, composition_asks, composition_scores

    run = api.load_run(run_dir, device="cpu")
    classifier = resolve_extractor(None, "mnist", "cpu")
    prompts, classes, arrangement, asks, reps = composition_asks(per_prompt)  # the composition block's prompts
    swapped = [pair_caption(b, a, kind, t) for a, b, kind, t in asks for _ in range(reps)]
    for w in scales:
        options = {"guidance_scale": w, "sampler": sampler, "steps": steps, "negative_prompts": swapped}
        images = _samples_u8(run, prompts, 0, 250, options, False)
        print(f"{run_dir} w={w} negative=swapped caption:", composition_scores(images, classes, arrangement, classifier))


def per_template(run_dir: str, scales: list[float], per_prompt: int, sampler: str, steps: int) -> None:
    from genlab import api
    from genlab.data.captions import PAIR_TEMPLATES, pair_caption
    from genlab.evaluation.common import resolve_extractor
    from genlab.evaluation.text_to_image import COMPOSITION_PAIRS, _samples_u8, composition_scores

    run = api.load_run(run_dir, device="cpu")
    classifier = resolve_extractor(None, "mnist", "cpu")
    asks = [(a, b, kind, t) for kind in PAIR_TEMPLATES for t in range(len(PAIR_TEMPLATES[kind])) for a, b in COMPOSITION_PAIRS]
    prompts = [pair_caption(*ask) for ask in asks for _ in range(per_prompt)]
    classes = torch.tensor([[a, b] for a, b, _, _ in asks]).repeat_interleave(per_prompt, 0)
    arrangement = torch.tensor([kind for _, _, kind, _ in asks]).repeat_interleave(per_prompt)
    per = len(COMPOSITION_PAIRS) * per_prompt  # samples of one template
    for w in scales:
        images = _samples_u8(run, prompts, 0, 250, {"guidance_scale": w, "sampler": sampler, "steps": steps}, False)
        print(f"{run_dir} w={w} {sampler} {steps}: composition per template, {per} samples each")
        print("| template | left / top digit named first | composition | swapped |\n|---|---|---|---|")
        for k, (kind, t) in enumerate((kind, t) for kind in PAIR_TEMPLATES for t in range(len(PAIR_TEMPLATES[kind]))):
            rows = slice(k * per, (k + 1) * per)
            score = composition_scores(images[rows], classes[rows], arrangement[rows], classifier)
            template = PAIR_TEMPLATES[kind][t]
            in_order = template.index("{a}") < template.index("{b}")
            print(f"| {template} | {'yes' if in_order else 'no'} | {score['composition_accuracy']:.3f} | {score['composition_swapped']:.3f} |")
        print("all:", composition_scores(images, classes, arrangement, classifier))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", action="store_true")
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--negative-swapped", metavar="RUN")
    p.add_argument("--per-template", metavar="RUN")
    p.add_argument("--scales", default="4,8")
    p.add_argument("--per-prompt", type=int, default=50)
    p.add_argument("--sampler", default="dpmpp-2m")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        probe(args.encoder)
    if args.per_template:
        per_template(args.per_template, [float(s) for s in args.scales.split(",")], args.per_prompt, args.sampler, args.steps)
    if args.negative_swapped:
        negative_swapped(args.negative_swapped, [float(s) for s in args.scales.split(",")], args.per_prompt,
                         args.sampler, args.steps)


if __name__ == "__main__":
    main()
