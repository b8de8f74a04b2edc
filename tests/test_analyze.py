"""`fxptqat analyze` and ErrorReport.to_html: the report a person opens, tested by reading it."""

import json
import textwrap
from html.parser import HTMLParser

import pytest
import torch

import fxptqat as fq
from fxptqat.analyze import parse_bits, parse_policy, sensitivity
from fxptqat.cli import main

pytest.importorskip("matplotlib")

USER_FILE = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.conv2(x)) + x
            return self.fc(x.mean((2, 3)))


    class Untraceable(Net):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return super().forward(x)
            return super().forward(-x)


    def _data():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 1, 8, 8, generator=g),) for _ in range(3)], torch.randint(0, 4, (8,), generator=g)


    def build():
        torch.manual_seed(0)
        batches, labels = _data()

        def evaluate(m):
            with torch.no_grad():
                return float(-torch.nn.functional.cross_entropy(m(batches[0][0]), labels))

        return Net().eval(), batches[0], batches, evaluate


    def no_eval():
        torch.manual_seed(0)
        batches, _ = _data()
        return {"model": Net().eval(), "example_inputs": batches[0], "batches": batches}


    def untraceable():
        batches, _ = _data()
        return Untraceable().eval(), batches[0], batches


    def wrong():
        return 42


    def raises():
        raise RuntimeError("the user's data is missing")
''')


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.urls, self.cells, self.rows = [], [], [], []
        self._in_body = self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.urls.append(attrs[key])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self._row = []
        if tag == "td" and self._row is not None:
            self._row.append(attrs.get("data-v"))

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(USER_FILE)
    return path


def test_cli_writes_a_self_contained_report_of_every_weighted_node(user_file, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", f"{user_file}:build", "--out", str(out), "--lower", "torch", "--no-progress"]) == 0
    assert "parity ok" in capsys.readouterr().out
    text = (out / "report.html").read_text()
    page = _Page()
    page.feed(text)
    names = [row[1] for row in page.rows]
    assert names == ["conv1", "conv2", "fc"]  # every weighted node, in graph order
    assert len(page.images) == 5 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not [u for u in page.urls if not u.startswith("data:")]  # nothing fetched from anywhere
    assert "http://" not in text and "https://" not in text and "<script src" not in text
    assert all(row[-3] not in (None, "") for row in page.rows)  # parity per node
    assert all(row[-1] not in (None, "") for row in page.rows)  # sensitivity per node
    doc = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in doc["report"]["rows"]] == names
    assert doc["parity"]["ok"] and doc["parity"]["coverage"] == 1.0
    assert set(doc["sensitivity"]) == set(names)
    assert {"prepare", "calibrate", "measure_error", "sensitivity", "check_parity"} <= set(doc["timings_s"])
    for png in ("error_mse.png", "error_sqnr.png", "error_growth.png", "parity.png", "sensitivity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dict_without_evaluate_gives_no_sensitivity_column(user_file, tmp_path):
    out = tmp_path / "r"
    assert main(["analyze", f"{user_file}:no_eval", "--out", str(out), "--policy", "adaptive",
                 "--bits", "W8A8", "--no-progress"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["sensitivity"] is None and doc["parity"] is None
    assert "all but this node" not in (out / "report.html").read_text()


@pytest.mark.parametrize("target, args, message", [
    ("missing.py:build", [], "no such file"),
    ("{file}", [], "PATH.py:FUNCTION"),
    ("{file}:nope", [], "has no function 'nope'"),
    ("{file}:wrong", [], "returned int"),
    ("{file}:raises", [], "calling it raised RuntimeError: the user's data is missing"),
    ("{file}:untraceable", [], "trac"),
    ("{file}:build", ["--bits", "W9"], "weight_bits=9"),
    ("{file}:build", ["--bits", "int4"], "W<weight bits>A<activation bits>"),
    ("{file}:build", ["--policy", "fraction"], "needs a value"),
])
def test_bad_input_gets_one_message_and_exit_code_2(user_file, tmp_path, capsys, target, args, message):
    code = main(["analyze", target.format(file=user_file), "--out", str(tmp_path / "o"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fxptqat: error:") and message.lower() in err.lower(), err
    assert "Traceback" not in err


def test_report_to_html_from_python(tmp_path):
    from helpers import make_small_net

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 6, 6, generator=g),) for _ in range(2)]
    qat = fq.prepare(make_small_net(), batches[0])
    fq.calibrate(qat, batches)
    report = fq.measure_error(qat, batches)
    selection = fq.select_trainable(qat, report, policy=fq.Threshold(1e-3))
    report.to_html(tmp_path / "r.html", selection=selection, policy=fq.Threshold(1e-3), plots=False)
    page = _Page()
    page.feed((tmp_path / "r.html").read_text())
    assert [row[1] for row in page.rows] == [r.name for r in report.rows] and not page.images
    modes = [row[12] for row in page.rows]
    assert modes == ["QAT" if r.name in selection.trainable else "frozen" for r in report.rows]
    # "why" states the rule with the node's own value
    whys = [row[13] for row in page.rows]
    assert all("isolated mse" in w and "θ=0.001" in w for w in whys)
    assert all(("<" in w) == (m == "QAT") for w, m in zip(whys, modes, strict=True))


def test_sensitivity_restores_the_quantizers_and_matches_a_direct_evaluation():
    from helpers import make_small_net

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 6, 6, generator=g),) for _ in range(2)]
    model = make_small_net()
    qat = fq.prepare(model, batches[0])
    fq.calibrate(qat, batches)
    (x,) = batches[0]
    with torch.no_grad():
        ref = model(x)

    def evaluate(m):
        with torch.no_grad():
            return -float(((m(x) - ref) ** 2).mean())

    before = evaluate(qat)
    result = sensitivity(qat, evaluate)
    assert evaluate(qat) == before  # every quantizer as it was
    nodes = [n.name for n, _ in fq.meta.quantized_nodes(qat)]
    assert set(result) == set(nodes)
    # all quantized minus the score with all but one node: the node's share, never all zero
    assert any(abs(v["all_but"]) > 0 for v in result.values())
    assert all(v["only"] >= -1e-12 for v in result.values())  # float scores best on this metric


def test_parsers():
    assert parse_bits("W4A8") == {"weight_bits": 4, "act_bits": 8}
    assert parse_bits("w8") == {"weight_bits": 8, "act_bits": None}
    assert parse_policy("threshold=0.02") == fq.Threshold(0.02)
    assert parse_policy("count=3") == fq.Count(3)
    with pytest.raises(fq.ConfigError, match="choose one of"):
        parse_policy("lowest")
