"""The HTML report without a browser: inline images that decode, metrics equal to metrics.json, escaping."""

from __future__ import annotations

import base64
import io
import json
import shlex
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from report_fixtures import make_run

from genlab.cli import main
from genlab.config import build_config, to_dict
from genlab.errors import GenlabError
from genlab.methods import get_method
from genlab.report import write_report
from genlab.report.html import read_run, reconstructed_command, render_report


class Page(HTMLParser):
    """The parts of the page the tests check: images, metric cells, tags seen, text."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []
        self.cells: list[dict] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self._cell: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs)
        if tag == "td" and "metric" in (attrs.get("class") or "").split():
            self._cell = {**attrs, "shown": ""}
        if tag == "span" and attrs.get("class") == "std" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["shown"] += data


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> tuple[Path, str]:
    """A hand-made run folder and its report's HTML (rendered once: plotting costs seconds)."""
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    return run, write_report(run).read_text()


def decoded_image(src: str) -> Image.Image:
    head, _, payload = src.partition(",")
    assert head == "data:image/png;base64", head[:40]
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image


def test_every_image_is_an_inline_png_and_the_sample_grids_are_the_files(one_run):
    run, html = one_run
    page = Page(html)
    images = [decoded_image(img["src"]) for img in page.images]
    assert all(im.width > 0 and im.height > 0 for im in images)
    grids = {img["src"] for img in page.images if img.get("class") == "grid"}
    files = {"data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in (run / "samples").glob("*.png")}
    assert grids == files
    assert [img["alt"] for img in page.images if img.get("class") == "plot"][1:] == [
        "sampler sweep: FID vs steps", "guidance sweep: fid, class_accuracy vs guidance scale"]  # after the curves
    assert all(not src.startswith(("http", "//")) for src in (img["src"] for img in page.images))


def test_metrics_table_shows_every_number_of_metrics_json(one_run):
    run, html = one_run
    page = Page(html)
    entries = json.loads((run / "metrics.json").read_text())["entries"]
    expected = [(name, value) for e in entries for name, value in e["metrics"].items()]
    shown = [(c["data-metric"], float(c["data-value"])) for c in page.cells]
    assert sorted(shown) == sorted(expected)
    for cell in page.cells:
        assert float(cell["shown"]) == pytest.approx(float(cell["data-value"]), rel=1e-5)
    text = "".join(page.text)
    assert '"extractor": "mnist"' in text and '"guidance_scale": 2.0' in text  # the full protocol


def test_hostile_strings_are_escaped(tmp_path):
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    run = make_run(tmp_path / "run<u>", source=hostile)
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "time": 0, "kind": "health", "values": {"warning": hostile}}) + "\n")
    text = write_report(run, tmp_path / "r.html").read_text()
    page = Page(text)
    assert "script" not in page.tags and "u" not in page.tags
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert "onerror" not in {k for img in page.images for k in img}
    assert hostile in "".join(page.text)  # shown to the reader as text


def test_the_same_run_gives_the_same_bytes(one_run, tmp_path):
    run, html = one_run
    assert write_report(run, tmp_path / "again.html").read_text() == html


def test_warnings_and_status_come_from_the_log(one_run):
    page = Page(one_run[1])
    text = "".join(page.text)
    assert "exploding gradients: grad_norm 1e5 > 1e4" in text
    assert "step 20 of 20, finished" in text


def test_several_runs_share_one_table_and_show_grids_at_common_steps(tmp_path):
    a = make_run(tmp_path / "a", steps=(10, 20))
    b = make_run(tmp_path / "b", loss_scale=2.0, steps=(20, 30))
    page = Page(write_report([a, b], tmp_path / "r.html").read_text())
    side_by_side = [img["alt"] for img in page.images if img.get("alt", "").startswith(("a at", "b at"))]
    assert side_by_side == ["a at step 20", "b at step 20"]
    n_metrics = sum(len(e["metrics"]) for e in json.loads((a / "metrics.json").read_text())["entries"])
    assert len(page.cells) == 2 * n_metrics * 2  # the comparison table, then each run's own


def test_reconstructed_command_rebuilds_the_config(tmp_path):
    overrides = ["train.steps=7", "train.lr=0.003", "model.unet.channel_mult=[1,2]", "model.prediction=v",
                 "train.eval_ref=mnist:test"]
    cfg = build_config("ddpm", get_method("ddpm").Config, overrides=overrides)
    cfg.data.source = "digits"
    words = shlex.split(reconstructed_command(to_dict(cfg)))
    assert words[:5] == ["genlab", "train", "ddpm", "--data", "digits"]
    again = build_config("ddpm", get_method("ddpm").Config, overrides=words[5:])
    again.data.source = "digits"
    assert to_dict(again) == to_dict(cfg)


def test_the_recorded_cli_command_is_shown(tmp_path):
    run = make_run(tmp_path / "run")
    lines = (run / "log.jsonl").read_text().splitlines()
    start = json.loads(lines[0])
    start["values"]["argv"] = ["/x/bin/genlab", "train", "ddpm", "--data", "digits", "train.steps=20"]
    (run / "log.jsonl").write_text("\n".join([json.dumps(start)] + lines[1:]) + "\n")
    assert read_run(run).command == "genlab train ddpm --data digits train.steps=20"


def test_cli_refuses_bad_input_in_one_line(one_run, tmp_path, capsys):
    run, _ = one_run
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a genlab run folder" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and len(err.strip().splitlines()) == 1
    with pytest.raises(GenlabError):
        write_report([])


def test_a_run_of_an_unknown_method_shows_every_value():
    command = reconstructed_command({"method": "future-gan", "data": {"source": "digits"}, "train": {"lr": 0.1}})
    assert command == "genlab train future-gan --data digits train.lr=0.1"


def test_runs_with_the_same_folder_name_are_told_apart_by_path(tmp_path):
    a, b = make_run(tmp_path / "a" / "run"), make_run(tmp_path / "b" / "run", steps=(10,))
    page = Page(render_report([read_run(a), read_run(b)]))
    side_by_side = [img["alt"] for img in page.images if img.get("alt", "").startswith(str(tmp_path))]
    assert side_by_side == [f"{a} at step 10", f"{b} at step 10"]


def test_a_sampler_sweep_file_in_the_run_replaces_the_steps_sweep(tmp_path):
    run = make_run(tmp_path / "run")
    points = [{"sampler": s, "steps": k, "nfe": 2 * k - 1 if s == "heun" else k, "n": 300, "seed": 0, "fid": 50.0 / k,
               "extractor": "mnist"} for s in ("ddim", "heun") for k in (5, 10)]
    (run / "sampler_sweep.json").write_text(json.dumps(points))
    assert read_run(run).nfe_sweep == points
    page = Page(render_report([read_run(run)]))
    assert [img["alt"] for img in page.images if "sweep" in img.get("alt", "")] == [
        "sampler sweep: FID vs NFE", "guidance sweep: fid, class_accuracy vs guidance scale"]
    (run / "sampler_sweep.json").write_text(json.dumps({"not": "a sweep"}))
    assert read_run(run).nfe_sweep == []
