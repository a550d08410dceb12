"""`kpbench report`: the page, PNGs and Markdown from a real sweep, bad input, missing modes,
and the page as headless Chromium renders it."""
import base64
import html
import json
import re
import shutil
import subprocess

import matplotlib.image
import pandas as pd
import pytest

from bench.cli import main
from bench.plots import MODE_STYLE
from bench.results import FORMAT_VERSION, read_jsonl

SWEPT = ("iptables", "ipvs", "nftables")


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A small real sweep by `kpbench bench`, which ends by writing the report: three sizes (so
    fits exist), two endpoint counts, three modes. Returns the output folder."""
    out = tmp_path_factory.mktemp("sweep")
    status = main(["bench", "--modes", *SWEPT, "--services", "20", "60", "180", "--endpoints", "1", "3",
                   "--nodes", "3", "--packets", "200", "--out", str(out), "--no-benchmarks", "--quiet"])
    assert status == 0
    return out


@pytest.fixture(scope="module")
def records(report):
    return read_jsonl(report / "results.jsonl")


def images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def test_page_is_self_contained_with_every_figure_embedded(report):
    page = (report / "index.html").read_text()
    assert "<script" not in page and "<link" not in page and "url(" not in page
    sources = images(page)
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    pngs = {p.name for p in report.glob("*.png")}
    assert len(sources) == len(pngs)
    assert {"first_packet_latency.png", "latency_distribution.png", "other_workloads.png",
            "work_counters.png", "memory.png", "sync_times.png"} <= pngs
    # Network programming latency needs netprog records: drawn when the sweep wrote them, else noted.
    assert ("network_programming.png" in pngs) != (
        "network programming latency against nodes: not in these results" in html.unescape(page))
    assert page.count("Regenerate: <code>kpbench bench ") == len(sources)


def test_summary_names_modes_winners_machine_and_missing_sections(report):
    page = html.unescape((report / "index.html").read_text())
    headline = re.search(r'<table id="headline">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><td>([^<]*)</td>", headline)
    assert rows == list(SWEPT)
    winners = re.search(r'<table id="winners">(.*?)</table>', page, re.S).group(1)
    assert len(re.findall("<tr>", winners)) == 1 + 3  # the header and one row per size
    assert "<dt>CPU</dt>" in page and "<dt>git commit</dt>" in page
    # Three sizes per series: the p50 growth exponent is fitted for every mode.
    assert "needs 3 sizes" not in headline


def test_summary_markdown_has_the_headline_table(report):
    text = (report / "summary.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| mode | services measured | first packet p50, ns")
    assert [row.split(" | ")[0] for row in table[1:4]] == [f"| {mode}" for mode in SWEPT]
    assert "Regenerate: `kpbench report --results" in text


def test_regenerate_command_is_the_sweep_that_made_the_results(records, report):
    from bench.report import bench_command, results_frame

    frame = results_frame(records, "results.jsonl")
    assert bench_command(frame, report / "results.jsonl") == (
        f"kpbench bench --modes {' '.join(SWEPT)} --services 20 60 180 --endpoints 1 3 --nodes 3 "
        f"--packets 200 --seed 0 --out {report}")


def test_regenerate_command_names_the_profile_that_covers_the_results(tmp_path):
    from bench.report import bench_command, results_frame
    from bench.sweep import profile_points

    quick = profile_points("quick", ["nftables"], seed=7)
    frame = results_frame([{"format": FORMAT_VERSION, "kind": "point", "workload": "service_new",
                            "point_id": p.point_id, "mode": p.mode, "services": p.services,
                            "endpoints": p.endpoints, "nodes": p.nodes, "packets": p.packets, "seed": p.seed,
                            "cpus": p.cpus, "variant": p.variant} for p in quick[:3]], "results.jsonl")
    assert bench_command(frame, tmp_path / "results.jsonl") == (
        f"kpbench bench --profile quick --modes nftables --seed 7 --out {tmp_path}")


def test_report_of_some_modes_names_the_missing_ones(records, tmp_path, capsys):
    # iptables only, without sync fields or netprog records, plus a copy labelled as an eBPF
    # reference model: the report shows what is there and says what is not.
    only = [{k: v for k, v in r.items() if not k.startswith("sync_") and k != "service_add_seconds"}
            for r in records if r.get("mode") == "iptables" and r["kind"] == "point"]
    reference = [{**r, "mode": "ebpf", "reference_model": True} for r in only]
    results = write_jsonl(tmp_path / "results.jsonl", only + reference)
    status, out, err = run(capsys, "report", "--results", results, "--out", tmp_path / "out")
    assert status == 0, err
    page = html.unescape((tmp_path / "out" / "index.html").read_text())
    missing = re.search(r"Not in these results: <strong>([^<]*)</strong>", page).group(1).split(", ")
    assert {"iptables-nft", "ipvs", "nftables", "userspace"} <= set(missing) and "iptables" not in missing
    headline = re.search(r'<table id="headline">(.*?)</table>', page, re.S).group(1)
    assert re.findall(r"<tr><td>([^<]*)</td>", headline) == ["ebpf (reference model)", "iptables"]
    # The reference model never "wins": only kube-proxy's modes compete.
    winners = re.search(r'<table id="winners">(.*?)</table>', page, re.S).group(1)
    assert "ebpf" not in winners and "iptables" in winners
    assert "rule sync time against services: not in these results" in page
    assert "network programming latency against nodes: not in these results" in page
    assert not (tmp_path / "out" / "sync_times.png").exists()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert set(re.search(r"Not in these results: ([^.\n]*)", summary).group(1).split(", ")) == set(missing)


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _older(records):
    return [{**r, "format": FORMAT_VERSION - 1} for r in records]


@pytest.mark.parametrize("name, content, fragments", [
    ("empty", lambda records: "", ["is empty"]),
    ("truncated", lambda records: "".join(json.dumps(r) + "\n" for r in records)[:-40],
     ["results.jsonl:6:", "not JSON Lines"]),
    ("foreign", lambda records: '{"apiVersion": "v1", "kind": "List"}\n', ["record 1", "not a kpbench"]),
    ("yaml", lambda records: "apiVersion: v1\nkind: Service\n", ["not JSON Lines"]),
    ("older", lambda records: "".join(json.dumps(r) + "\n" for r in _older(records)),
     ["record 1", "format", "older kpbench"]),
    ("no points", lambda records: json.dumps({"format": FORMAT_VERSION, "kind": "benchmark"}) + "\n",
     ["no sweep points"]),
])
def test_bad_results_file_is_one_line_and_keeps_the_old_report(records, tmp_path, capsys, name, content,
                                                                fragments):
    results = tmp_path / "results.jsonl"
    results.write_text(content(records[:6]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("the previous report")
    status, _, err = run(capsys, "report", "--results", results, "--out", out)
    assert_one_line_error(status, err, str(results), *fragments)
    assert (out / "index.html").read_text() == "the previous report"
    assert not list(out.glob("*.png"))


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--results FILE" in text and "--out DIR" in text and "index.html" in text


def test_missing_results_file(tmp_path, capsys):
    status, _, err = run(capsys, "report", "--results", tmp_path / "nope.jsonl", "--out", tmp_path)
    assert_one_line_error(status, err, "nope.jsonl", "no such file")


def test_complexity_and_crossover_tables_follow_the_analysis_contract(records, monkeypatch):
    """bench.analysis's complexity() and crossovers() frames become the report's tables; the
    summary keeps the first-packet, memory and sync crossovers."""
    from bench import report

    fits = pd.DataFrame([{"mode": "iptables", "workload": "service_new", "metric": "ns_p50",
                          "against": "services", "slope": 0.987, "ci_low": 0.9, "ci_high": 1.07,
                          "r2": 0.9991, "n": 3}])
    crossings = pd.DataFrame([
        {"metric": "ns_p50", "workload": "service_new", "mode_a": "iptables", "mode_b": "nftables",
         "services": 123.4},
        {"metric": "ns_mean", "workload": "established", "mode_a": "ipvs", "mode_b": "iptables",
         "services": 2000.0}])
    monkeypatch.setattr(report, "complexity", lambda frame: fits)
    monkeypatch.setattr(report, "crossovers", lambda frame: crossings)
    frame = report.results_frame(records, "results.jsonl")
    complexity, crossover, summary = report.analysis_sections(frame)
    assert complexity.tables[0].columns == list(fits.columns)
    assert complexity.tables[0].rows == [["iptables", "service_new", "ns_p50", "services", "0.99", "0.90",
                                          "1.07", "0.999", "3"]]
    assert crossover.tables[0].rows[1] == ["ns_mean", "established", "ipvs", "iptables", "2,000"]
    assert summary.rows == [["ns_p50", "service_new", "iptables", "nftables", "123"]]
    monkeypatch.setattr(report, "crossovers", lambda frame: crossings.iloc[0:0])
    complexity, crossover, summary = report.analysis_sections(frame)
    assert summary is None and crossover.notes == ["no crossovers within the sizes measured."]


def test_every_mode_has_its_own_marker_and_line_style():
    modes = ("iptables", "ipvs", "nftables", "userspace", "ebpf")
    assert set(modes) <= set(MODE_STYLE)
    for part in ("marker", "linestyle", "hatch", "colour"):
        values = [repr(getattr(MODE_STYLE[m], part)) for m in modes]
        assert len(set(values)) == len(modes), part


# ------------------------------------------------------------------ model vs kernel

class FakeKernel:
    """Stands in for the namespaces, the tools and the kernel so that runner.measure_tool and
    runner.validate build their records for real without root: connect times grow by
    ``ns_per_position`` per service further down KUBE-SERVICES, and the kernel's rule counters
    are the model's (plus one packet on one rule with ``off_by_one``)."""

    def __init__(self, prepared, ns_per_position, off_by_one=False):
        from bench.realkernel import counters, runner

        self.prepared, self.off_by_one = prepared, off_by_one
        self.position = {tuple(t[:2]): i for i, t in enumerate(prepared.targets)}
        self.ns_per_position = ns_per_position
        connections = runner.validation_connections(prepared, VALIDATION, prepared.seed + 7)
        model = counters.model_nft_counters if prepared.mode == "nftables" else counters.model_iptables_counters
        self.counters = model(prepared.updated_text, prepared.cluster.config.node_ips, connections, prepared.seed)

    def connect(self, addresses, sports=None):
        return [30_000 + self.ns_per_position * self.position.get(tuple(a), 0) for a in addresses]

    def round_trips(self, address, rounds):
        return [20_000] * rounds

    def kernel_counters(self, *args):
        counts, texts = dict(self.counters[0]), self.counters[1]
        if self.off_by_one:
            rule = next(key for key, count in counts.items() if count)
            counts[rule] += 1
        return counts, texts


VALIDATION = 8


def kernel_record(tool, services, ns_per_position, off_by_one=False):
    """A kernel_point record from runner.measure_tool with the FakeKernel in place of the kernel."""
    import contextlib
    import types

    from bench.realkernel import counters, runner

    prepared = runner.prepare("nftables" if tool == "nftables" else "iptables", services, 3, seed=0)
    fake = FakeKernel(prepared, ns_per_position, off_by_one)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "_topology", lambda p: contextlib.nullcontext(types.SimpleNamespace(node="node")))
        patch.setattr(runner, "_start_backends", lambda topology, ports: None)
        patch.setattr(runner, "_Client", lambda topology: fake)
        patch.setattr(runner, "run", lambda *args, **kwargs: None)
        patch.setattr(runner, "_timed", lambda *args: 0.25)
        patch.setattr(counters, "kernel_iptables_counters", fake.kernel_counters)
        patch.setattr(counters, "kernel_nft_counters", fake.kernel_counters)
        return runner.measure_tool(tool, prepared, connections=6, rounds=3, validation=VALIDATION)


def stamped(records):
    return [{"format": FORMAT_VERSION, **r} for r in records]


def cells(table_html):
    return [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table_html)[1:]]


@pytest.fixture(scope="module")
def kernel_records():
    """iptables-legacy at 60 and 120 services, nftables at 60, iptables-nft at 60 with one
    kernel counter off by one, and an iptables-nft point whose rule load timed out (as
    `kpbench kernel` records it)."""
    agreeing = [kernel_record("iptables-legacy", 60, 40), kernel_record("iptables-legacy", 120, 40),
                kernel_record("nftables", 60, 5)]
    wrong = kernel_record("iptables-nft", 60, 90, off_by_one=True)
    timed_out = {"source": "kernel", "kind": "kernel_point", "mode": "iptables", "tool": "iptables-nft",
                 "services": 5000, "endpoints": 1, "nodes": 3, "seed": 0, "load_timed_out": True,
                 "load_timeout_seconds": 60.0}
    return agreeing + [wrong, timed_out]


@pytest.fixture(scope="module")
def kernel_report(records, kernel_records, tmp_path_factory):
    """The sweep's report with the kernel records added."""
    out = tmp_path_factory.mktemp("kernel")
    write_jsonl(out / "results.jsonl", records + stamped(kernel_records))
    assert main(["report", "--results", str(out / "results.jsonl"), "--out", str(out)]) == 0
    page = html.unescape((out / "index.html").read_text())
    section = re.search(r'<section id="model-vs-kernel">(.*?)</section>', page, re.S).group(1)
    return out, page, section


def kernel_rows(section):
    table = re.search(r'<table id="model-vs-kernel-table">(.*?)</table>', section, re.S).group(1)
    return {(row[0], row[2]): row for row in cells(table)}


def test_model_vs_kernel_section_lists_each_tool_with_its_ratio_and_agreement(kernel_report, kernel_records):
    out, page, section = kernel_report
    rows = kernel_rows(section)
    assert set(rows) == {(r["tool"], f"{r['services']:,}") for r in kernel_records}
    agreeing = [r for r in kernel_records if r.get("counters_agree")]
    for record in agreeing:
        row = rows[(record["tool"], f"{record['services']:,}")]
        assert row[1] == record["mode"]
        assert row[10] == f"{record['rules_compared']:,}/{record['rules_compared']:,} ✓"
        overall = record["kernel_ns_per_rule_overall"] / record["model_ns_per_rule_overall"]
        assert row[9] == f"{overall:.2f}×"
        if record["kernel_ns_per_rule"] is None:  # nftables: no slope, its rules visited barely differ
            assert row[4:7] == ["—", "—", "—"]
        else:
            assert row[4] == f"{record['model_ns_per_rule']:,.1f}"
            assert row[6] == f"{record['kernel_ns_per_rule'] / record['model_ns_per_rule']:.2f}×"
    # iptables' rules visited grow with the position, so both have a slope; nftables' do not.
    assert [r["kernel_ns_per_rule"] is None for r in agreeing] == [False, False, True]
    assert "not measured: the rule load took over 60 s" in rows[("iptables-nft", "5,000")]
    # The figure, its PNG and the command that measures these kernel points again.
    assert (out / "model_vs_kernel.png").exists()
    assert (f"Regenerate: <code>kpbench kernel --modes iptables nftables --services 60 120 5000 --connections 6 "
            f"--nodes 3 --seed 0 --out {out} && kpbench report ") in section
    summary = re.search(r'<ul id="kernel-summary">(.*?)</ul>', page, re.S).group(1)
    markdown = (out / "summary.md").read_text()
    for tool in ("iptables-legacy", "iptables-nft", "nftables"):
        assert f"<li>{tool} at " in summary and f"- {tool} at " in markdown
    assert "iptables-legacy at 120 services: kernel " in summary


def test_a_counter_disagreement_is_flagged(kernel_report, kernel_records):
    out, page, section = kernel_report
    wrong = next(r for r in kernel_records if r.get("counters_agree") is False)
    assert wrong["disagreement_count"] == 1
    row = kernel_rows(section)[("iptables-nft", "60")]
    assert row[10] == f"{wrong['rules_agreeing']:,}/{wrong['rules_compared']:,} ✗ 1 disagree"
    assert re.search(r'<td class="num disagree">[^<]*✗', section)
    assert section.count("✗") == 1
    rule = wrong["disagreements"][0]
    assert (f'<p class="alert">iptables-nft at 60 services: 1 of {wrong["rules_compared"]:,} rule counters '
            f"disagree with the model — {rule['rule']} ({rule['text']}): kernel {rule['kernel']}, "
            f"model {rule['model']}.</p>") in section
    alert = re.search(r'<p class="alert" id="kernel-alert">([^<]*)</p>', page).group(1)
    assert "DISAGREE" in alert and "at 1 of 4 points (iptables-nft 60 services)" in alert
    assert f"**{alert}**" in (out / "summary.md").read_text()
    assert "every rule counter agrees" not in page


def test_the_summary_says_when_every_counter_agrees(records, kernel_records):
    from bench.report import kernel_summary, results_frame

    agreeing = [r for r in kernel_records if r.get("counters_agree") is not False]
    sentences, alert = kernel_summary(results_frame(records + stamped(agreeing), "results.jsonl"))
    compared = sum(r.get("rules_compared", 0) for r in agreeing)
    assert alert is None
    assert sentences[0] == (f"Real kernel: every rule counter agrees with the model (3 points, {compared:,} rule "
                            "counters compared; tools iptables-legacy, nftables).")


def test_kernel_points_that_all_timed_out_are_listed_not_drawn(records, kernel_records, tmp_path):
    from bench.report import kernel_section, kernel_summary, results_frame

    timed_out = [r for r in kernel_records if r.get("load_timed_out")]
    frame = results_frame(records + stamped(timed_out), "results.jsonl")
    section = kernel_section(frame, tmp_path, tmp_path / "results.jsonl", "kpbench report")
    assert [row[:4] for row in section.tables[0].rows] == [
        ["iptables-nft", "iptables", "5,000", "not measured: the rule load took over 60 s"]]
    assert any("model vs kernel: not in these results" in note for note in section.notes)
    assert not section.figures and not list(tmp_path.glob("*.png"))
    sentences, alert = kernel_summary(frame)
    assert alert is None and sentences == ["Real kernel: no point was measured (every rule load took longer "
                                           "than `kpbench kernel --load-timeout`; see Model vs kernel)."]


def test_results_without_kernel_records_say_so_with_the_command(report):
    page = html.unescape((report / "index.html").read_text())
    section = re.search(r'<section id="model-vs-kernel">(.*?)</section>', page, re.S).group(1)
    assert "Real-kernel measurements are not in these results" in section
    assert f"`kpbench kernel --modes iptables nftables ipvs --out {report}`" in section
    assert "<table" not in section and not (report / "model_vs_kernel.png").exists()
    assert "Not compared with the real kernel in these results" in page
    assert "Not compared with the real kernel" in (report / "summary.md").read_text()


def test_a_real_kernel_run_appears_in_the_section(records, tmp_path, capsys):
    """A tiny `kpbench kernel` run in the real kernel (root and iptables/nft needed)."""
    import os

    from bench.realkernel import prereq
    from bench.report import kernel_section, load_results

    if os.geteuid() != 0:
        pytest.skip("`kpbench kernel` needs root")
    tools = [t for t in ("iptables-legacy", "iptables-nft", "nftables") if prereq.tool_status(t) is None]
    if not tools:
        pytest.skip("none of iptables-legacy, iptables-nft, nft is installed (apt-get install iptables nftables)")
    results = write_jsonl(tmp_path / "results.jsonl", records)
    status, _, err = run(capsys, "kernel", "--modes", "iptables", "nftables", "--services", "60",
                         "--connections", "5", "--rounds", "5", "--validation", "8", "--nodes", "3",
                         "--out", tmp_path, "--quiet")
    assert status == 0, err
    section = kernel_section(load_results(results), tmp_path, results, "kpbench report")
    rows = section.tables[0].rows
    assert [row[0] for row in rows] == tools
    assert all(row[10].endswith("✓") for row in rows) and not section.alerts
    assert (tmp_path / "model_vs_kernel.png").exists()


# ------------------------------------------------------------------ the page in a real browser

# Injected into a copy of the page: records script errors and console.error calls, and once the
# page has loaded writes what the test checks into the DOM, which --dump-dom then prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || "resource failed")), true);
const realError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); realError(...args); };
window.addEventListener("load", () => {
  const pictures = [...document.images];
  const probe = document.createElement("pre");
  probe.id = "kpb-probe";
  probe.textContent = JSON.stringify({
    images: pictures.length,
    broken: pictures.filter(p => !p.complete || p.naturalWidth === 0).map(p => p.alt),
    errors: window.__errors,
    rows: [...document.querySelectorAll("#headline tbody tr")].map(r => r.cells[0].textContent.trim()),
  });
  document.body.appendChild(probe);
});
</script>"""


def chromium(tmp_path, *args):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium not found: `make browser` installs Debian's chromium package "
                    "(needs root and apt-get)")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_page_renders_in_headless_chromium(kernel_report, tmp_path):
    """The page with a model-vs-kernel section (and every other section)."""
    report = kernel_report[0]
    page = report / "index.html"
    shot = tmp_path / "screenshot.png"
    rendered = chromium(tmp_path, "--hide-scrollbars", "--window-size=1280,2000", f"--screenshot={shot}",
                        page.as_uri())
    assert shot.exists(), rendered.stderr
    console = [line for line in rendered.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280) and pixels.std() > 0.05  # not a blank page

    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    dumped = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="kpb-probe">(.*?)</pre>', dumped.stdout, re.S)
    assert found, dumped.stderr[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["images"] == len(list(report.glob("*.png"))) and result["broken"] == []
    assert result["errors"] == []
    assert result["rows"] == list(SWEPT)
