"""The HTML report: every section with its embedded picture, the Markdown summary, the CLI."""

import base64
from html.parser import HTMLParser

import pytest

from bora_pyro.cli import main
from bora_pyro.reports import to_inference_data
from bora_pyro.reports.html import SECTIONS, write_report
from bora_pyro.testing import char_tokenizer, tiny_causal_lm
from tests.reports.conftest import HIDDEN


class _Sections(HTMLParser):
    """Collect, per <section id=...>, its heading, image sources and table rows."""

    def __init__(self):
        super().__init__()
        self.sections, self.current, self.in_h2, self.row = {}, None, False, None
        self.links = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = self.sections.setdefault(attrs["id"], {"h2": "", "img": [], "rows": []})
        elif tag == "h2":
            self.in_h2 = True
        elif tag == "img" and self.current is not None:
            self.current["img"].append(attrs["src"])
        elif tag == "tr" and self.current is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.row.append("")
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None
        elif tag == "h2":
            self.in_h2 = False
        elif tag == "tr" and self.row is not None:
            self.current["rows"].append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.in_h2 and self.current is not None:
            self.current["h2"] += data
        elif self.row:
            self.row[-1] += data.strip()


def _parse(path):
    parser = _Sections()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _by_size(result):
    """Task names, fewest training documents first (the table's order)."""
    n_train = result.corpus.split("train").docs_per_task
    return [result.tasks[i] for i in n_train.argsort(kind="stable")]


def _check_report(path, tasks, *, extra_columns=()):
    parser = _parse(path)
    assert list(parser.sections) == [sid for sid, _ in SECTIONS]
    for sid, heading in SECTIONS:
        section = parser.sections[sid]
        assert section["h2"] == heading
        if sid == "tasks":
            assert section["img"] == []
        else:
            (src,) = section["img"]
            prefix = "data:image/png;base64,"
            assert src.startswith(prefix)
            png = base64.b64decode(src[len(prefix):])
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, sid
    # Self-contained: nothing but embedded pictures and in-page anchors.
    assert all(link.startswith(("data:", "#")) for link in parser.links), parser.links
    header, *rows = parser.sections["tasks"]["rows"]
    assert [r[0] for r in rows] == tasks + ["overall"]
    for column in ("shrinkage", "rel. distance", "perplexity", "ECE", *extra_columns):
        assert column in header, header
    markdown = path.with_suffix(".md").read_text(encoding="utf-8")
    for _, heading in SECTIONS:
        assert f"## {heading}" in markdown
    return header, rows, markdown


def test_map_report_with_baselines(map_result, baselines, tmp_path):
    path = map_result.report(tmp_path / "out" / "report.html", baselines=baselines)
    assert path == tmp_path / "out" / "report.html"
    header, rows, markdown = _check_report(path, _by_size(map_result), extra_columns=("ppl tau=0", "ppl tau=inf"))
    # The baseline column holds the baseline's own test perplexity.
    expected = baselines["tau=0"].evaluate("test")
    column = header.index("ppl tau=0")
    for row in rows[:-1]:
        value = expected.loc[expected["task"] == row[0], "perplexity"].iloc[0]
        assert row[column] == f"{value:.2f}"
    assert rows[-1][column] == f"{expected['perplexity'].iloc[-1]:.2f}"  # overall
    header_line = next(line for line in markdown.splitlines() if line.startswith("| task"))
    assert [c.strip() for c in header_line.strip("|").split("|")][:3] == ["task", "train docs", "train tokens"]
    overall = next(line for line in markdown.splitlines() if line.startswith("| overall"))
    assert f"{expected['perplexity'].iloc[-1]:.2f}" in overall


def test_svi_report_has_intervals(svi_result, tmp_path):
    path = write_report(svi_result, tmp_path, num_samples=10, predictive_samples=2, max_docs_per_task=5)
    assert path == tmp_path / "report.html"
    _check_report(path, _by_size(svi_result), extra_columns=("ppl 2.5%", "ppl 97.5%"))


def test_a_given_inference_data_is_used_not_recomputed(svi_result, tmp_path, monkeypatch):
    import bora_pyro.reports.html as html

    idata = to_inference_data(svi_result, num_samples=10, predictive_samples=2, max_docs_per_task=5)
    monkeypatch.setattr(html, "to_inference_data", lambda *a, **k: pytest.fail("recomputed"))
    path = write_report(svi_result, tmp_path, idata=idata, max_docs_per_task=5)
    _check_report(path, _by_size(svi_result), extra_columns=("ppl 2.5%", "ppl 97.5%"))
    with pytest.raises(ValueError, match="InferenceData of this result"):
        write_report(svi_result, tmp_path, idata="nope")


def test_report_path_must_be_html_or_a_folder(map_result, tmp_path):
    with pytest.raises(ValueError, match=r"path='.*report.txt' must end in .html"):
        map_result.report(tmp_path / "report.txt")


def test_cli_report_with_a_baseline(map_result, baselines, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_causal_lm("llama", hidden_size=HIDDEN).save_pretrained(model_dir)  # the same seeded weights
    char_tokenizer().save_pretrained(model_dir)
    run, run0 = map_result.save(tmp_path / "run"), baselines["tau=0"].save(tmp_path / "run0")
    out = tmp_path / "cli" / "r.html"
    code = main(["report", str(run), "--baseline", f"tau=0={run0}", "--model", str(model_dir),
                 "--device", "cpu", "--max-docs", "3", "--fisher-docs", "5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    header, rows, _ = _check_report(out, _by_size(map_result), extra_columns=("ppl tau=0",))
    # Reloaded from disk with the same base weights: the same perplexities as the fitted result.
    expected = map_result.evaluate("test", max_docs_per_task=3)
    column = header.index("perplexity")
    for row in rows[:-1]:
        assert row[column] == f"{expected.loc[expected['task'] == row[0], 'perplexity'].iloc[0]:.2f}"
    with pytest.raises(SystemExit):
        main(["report", str(run), "--baseline", "no-equals-sign"])
