"""The command line: help, the cluster → rules → trace pipeline, bench output, and bad input."""
import json

import pytest

from bench.cli import main
from bench.results import read_jsonl


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", [[], ["bench"], ["rules"], ["trace"], ["cluster"]])
def test_help_explains_every_subcommand(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    assert "usage: kpbench" in capsys.readouterr().out


@pytest.fixture
def cluster_file(tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    status, _, _ = run(capsys, "cluster", "--services", "4", "--endpoints", "2", "--nodes", "2",
                       "--mix", "clusterip", "-o", str(path))
    assert status == 0
    return path


def test_cluster_rules_trace_pipeline(capsys, tmp_path, cluster_file):
    rules = tmp_path / "rules.txt"
    status, _, _ = run(capsys, "rules", "iptables", "--objects", str(cluster_file), "--jump-rules",
                       "-o", str(rules))
    assert status == 0
    text = rules.read_text()
    assert text.startswith("*filter") and text.count("COMMIT") == 2
    # ClusterIP only: nat = 5 + S(2 + 3E) rules.
    assert sum(1 for line in text.splitlines() if line.startswith("-A KUBE")) >= 5 + 4 * (2 + 3 * 2)

    cluster_ip = next(line.split()[1] for line in open(cluster_file) if line.strip().startswith("clusterIP:"))
    status, out, _ = run(capsys, "trace", "iptables", "--objects", str(cluster_file), "--src",
                         "10.128.0.10", "--dst", cluster_ip.strip("'\""), "--dport", "80",
                         "--all-endpoints", "--json")
    assert status == 0
    result = json.loads(out)
    assert len(result["endpoints"]) == 2
    assert result["verdict"] == "ACCEPT"
    assert set(result["counters"]) >= {"entries_visited", "match_calls", "bytes_touched"}


def test_missing_file_is_one_line(capsys, tmp_path):
    status, _, err = run(capsys, "rules", "iptables", "--objects", str(tmp_path / "nope.yaml"))
    assert_one_line_error(status, err, "nope.yaml")


def test_malformed_yaml_names_the_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n")
    status, _, err = run(capsys, "rules", "iptables", "--objects", str(bad))
    assert_one_line_error(status, err, "bad.yaml")


def test_bad_address_on_the_command_line(capsys, tmp_path):
    rules = tmp_path / "r.txt"
    rules.write_text("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")
    status, _, err = run(capsys, "trace", "iptables", "--ruleset", str(rules), "--src", "10.0.0.300",
                         "--dst", "10.0.0.1", "--dport", "80")
    assert_one_line_error(status, err, "--src")


def test_unknown_match_in_ruleset_names_the_line(capsys, tmp_path):
    rules = tmp_path / "r.txt"
    rules.write_text("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m bogus --x 1 -j ACCEPT\nCOMMIT\n")
    status, _, err = run(capsys, "trace", "iptables", "--ruleset", str(rules), "--src", "10.0.0.3",
                         "--dst", "10.0.0.1", "--dport", "80")
    assert_one_line_error(status, err, "r.txt:3")


def test_failed_write_keeps_the_existing_output(capsys, tmp_path):
    out = tmp_path / "rules.txt"
    out.write_text("previous contents\n")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    status, _, err = run(capsys, "rules", "iptables", "--objects", str(bad), "-o", str(out))
    assert_one_line_error(status, err, "bad.json")
    assert out.read_text() == "previous contents\n"


def test_impossible_bench_parameters(capsys, tmp_path):
    status, _, err = run(capsys, "bench", "--services", "0", "--out", str(tmp_path), "--quiet")
    assert_one_line_error(status, err, "--services")


def test_bench_writes_results_and_resumes(capsys, tmp_path):
    args = ["bench", "--modes", "iptables", "ipvs", "nftables", "--services", "30", "60", "--endpoints", "2",
            "--nodes", "3", "--packets", "300", "--out", str(tmp_path), "--no-benchmarks", "--quiet"]
    status, out, _ = run(capsys, *args)
    assert status == 0
    records = read_jsonl(tmp_path / "results.jsonl")
    points = [r for r in records if r["kind"] == "point"]
    assert {r["mode"] for r in points} == {"iptables", "ipvs", "nftables"}
    assert len({r["point_id"] for r in points}) == 3 * 2  # three modes, two sizes
    assert {"service_new", "nonservice_new", "established"} <= {r["workload"] for r in points}
    # iptables and ipvs also send new connections to the first, middle and last service.
    assert {r["workload"] for r in points if r["mode"] == "iptables"} >= {
        "service_new_first", "service_new_middle", "service_new_last"}
    for record in points:
        assert record["sync_full_proxy_rules_duration_seconds"] > 0
        assert record["sync_partial_proxy_rules_duration_seconds"] > 0
        assert record["peak_rss_bytes"] > 0 and record["env"]["git_commit"]
    assert any(r["kind"] == "netprog" for r in records)
    assert (tmp_path / "results.csv").exists() and (tmp_path / "index.html").exists()
    assert "services" in out and "headline" in out
    # A rerun finds every point done and appends nothing.
    assert run(capsys, *args)[0] == 0
    assert len(read_jsonl(tmp_path / "results.jsonl")) == len(records)


def test_unwritable_output_folder_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, _, err = run(capsys, "bench", "--services", "30", "--out", str(blocker / "sub"), "--quiet")
    assert_one_line_error(status, err, "--out", "sub")


@pytest.mark.parametrize("argv, fragment", [
    (["--endpoints", "-3"], "--endpoints"),
    (["--nodes", "0"], "--nodes"),
    (["--cpus", "0"], "--cpus"),
    (["--packets", "0"], "--packets"),
    (["--variants", "iptables:colour=blue"], "--variants"),
    (["--variants", "ipvs:scheduler=fastest"], "--variants"),
    (["--variants", "comments=off"], "--variants"),
])
def test_bad_bench_parameters_are_one_line(capsys, tmp_path, argv, fragment):
    status, _, err = run(capsys, "bench", "--services", "30", *argv, "--out", str(tmp_path), "--quiet")
    assert_one_line_error(status, err, fragment)
    assert not (tmp_path / "results.jsonl").exists()


def test_unknown_mode_is_refused(capsys, tmp_path):
    status, _, err = run(capsys, "bench", "--modes", "bogus", "--out", str(tmp_path), "--quiet")
    assert_one_line_error(status, err, "--modes", "bogus")


def test_ipvs_options_are_refused_in_iptables_mode(capsys, cluster_file):
    status, _, err = run(capsys, "rules", "iptables", "--objects", str(cluster_file), "--ipvs-scheduler", "rr")
    assert_one_line_error(status, err, "--ipvs-scheduler", "iptables")


def test_ipset_file_needs_ipvsadm(capsys, tmp_path, cluster_file):
    sets = tmp_path / "sets.txt"
    sets.write_text("")
    status, _, err = run(capsys, "trace", "ipvs", "--objects", str(cluster_file), "--ipset", str(sets),
                         "--src", "10.0.0.1", "--dst", "10.0.0.2", "--dport", "80")
    assert_one_line_error(status, err, "--ipset")


def test_malformed_ipvsadm_file_names_the_line(capsys, tmp_path):
    saved = tmp_path / "ipvsadm.txt"
    saved.write_text("-A -t 10.96.0.1:80 -s rr\n-a -t 10.96.0.1:80 -r 10.128.0.1:notaport -m -w 1\n")
    status, _, err = run(capsys, "trace", "ipvs", "--ipvsadm", str(saved), "--src", "10.0.0.1",
                         "--dst", "10.96.0.1", "--dport", "80")
    assert_one_line_error(status, err, "ipvsadm.txt:2")


def test_help_lists_the_nftables_mode(capsys):
    with pytest.raises(SystemExit):
        main(["rules", "--help"])
    out = capsys.readouterr().out
    assert "nftables" in out and "--listing" in out


def test_listing_is_an_nftables_option(capsys, cluster_file):
    status, _, err = run(capsys, "rules", "iptables", "--objects", str(cluster_file), "--listing")
    assert_one_line_error(status, err, "--listing", "iptables")


def test_listing_and_previous_do_not_combine(capsys, cluster_file):
    status, _, err = run(capsys, "rules", "nftables", "--objects", str(cluster_file), "--listing",
                         "--previous", str(cluster_file))
    assert_one_line_error(status, err, "--listing", "--previous")


def test_help_lists_the_ipvs_mode(capsys):
    with pytest.raises(SystemExit):
        main(["trace", "--help"])
    out = capsys.readouterr().out
    assert "ipvs" in out and "--ipvsadm" in out and "--ipvs-scheduler" in out
