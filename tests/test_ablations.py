"""The ablation tables of tools/run_ablations.py (promptsg.analysis.ablations): which test prompts a
row is scored with, a finished row reused without training, the summary over seeds against
statistics written out here, and the README's copy of a table replaced between its markers."""
import json
import os
import types

import pytest

from promptsg.analysis import ablations


def rows(table):
    return {key: (key, label, config, overrides) for key, label, config, overrides in ablations.TABLES[table]}


def test_a_row_is_scored_with_the_prompts_its_model_has():
    table = rows("ablations")
    assert ablations.row_prompts(*table["clip_baseline"][2:]) == ("visual",)
    assert ablations.row_prompts(*table["supcon_no_mim"][2:]) == ("visual",)          # no MIM: the feature is v
    assert ablations.row_prompts(*table["wo_composed"][2:]) == ("simplified",)        # f_theta never trained
    assert ablations.row_prompts(*table["full"][2:]) == ("simplified", "composed")
    assert all(os.path.isfile(config) for _, _, config, _ in ablations.TABLES["ablations"])


def write_json(path, value, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    os.utime(path, (mtime, mtime))


def test_a_finished_row_is_reused_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(ablations, "train_net", lambda args, log: pytest.fail(f"trained again: {args}"))
    monkeypatch.setattr(ablations, "alignment_report", lambda out_dir: ({"supcon_over_chance": 0.4, "iteration": 9},
                                                                        "a line"))
    run = tmp_path / "full" / "seed1"
    write_json(run / "config.yaml", {}, 1000)
    write_json(run / "results.json", {"mAP": 61.5, "Rank-1": 70.0, "mINP": 30.0}, 1600)
    write_json(run / "composed" / "config.yaml", {}, 2000)
    write_json(run / "composed" / "eval_results.json", {"mAP": 72.5, "Rank-1": 80.0}, 2030)
    record = ablations.run_one(rows("ablations")["full"], 1, [], str(tmp_path))
    assert record == {"row": "full", "seed": 1, "output_dir": str(run), "train_seconds": 600, "eval_seconds": 30,
                      "results": {"simplified": {"mAP": 61.5, "Rank-1": 70.0},
                                  "composed": {"mAP": 72.5, "Rank-1": 80.0}},
                      "alignment": {"supcon_over_chance": 0.4}}


def test_summary_is_the_mean_and_sample_deviation_over_seeds():
    records = [{"results": {"simplified": {"mAP": m}}, "alignment": {"collapse_v_cos": c}}
               for m, c in ((40.0, 0.2), (44.0, 0.4), (48.0, 0.9))]
    summary = ablations.summarise(records)
    assert summary["simplified/mAP"] == {"mean": 44.0, "std": pytest.approx(4.0), "runs": [40.0, 44.0, 48.0]}
    assert summary["alignment/collapse_v_cos"]["mean"] == pytest.approx(0.5)
    assert summary["alignment/collapse_v_cos"]["std"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5)
    assert ablations.summarise(records[:1])["simplified/mAP"]["std"] == 0.0


def test_table_gives_mean_and_spread_and_a_dash_where_a_row_has_no_figure():
    one = {"visual/mAP": {"mean": 59.94, "std": 1.26, "runs": [1, 2]},
           "visual/Rank-1": {"mean": 63.5, "std": 0.5, "runs": [1, 2]}}
    text = ablations.markdown("ablations", {"clip_baseline": one}, [0, 1])
    lines = text.splitlines()
    assert lines[0].startswith("| Row (2 seeds: 0, 1) |") and len(lines) == 3
    assert lines[2] == "| CLIP baseline (ID + triplet, no text) | 59.9 ± 1.3 | - | 63.5 ± 0.5 | - | - | - | - |"


def test_readme_table_is_replaced_between_its_markers(tmp_path):
    start, end = ablations.markers("wiring")
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{start}\nold table\n{end}\nafter\n")
    ablations.replace_between_markers(str(readme), "wiring", "| new |")
    assert readme.read_text() == f"before\n{start}\n| new |\n{end}\nafter\n"


def test_the_tool_measures_guidance_and_writes_its_record(tmp_path, monkeypatch):
    """``tools/run_ablations.py --guidance`` end to end, training and the measurement stubbed: each
    run with a composed prompt gets its guidance (with the same seed's baseline where one has
    finished), and the JSON and markdown carry the command and commit of the invocation."""
    from tiny_runs import load_tool

    tool = load_tool("tools/run_ablations.py")
    monkeypatch.setattr(tool, "subprocess", types.SimpleNamespace(run=lambda *a, **k: None))   # no pretraining
    monkeypatch.setattr(tool.DATASET_REGISTRY, "get", lambda name: lambda root: None)
    baseline = tmp_path / "wiring" / "clip_baseline" / "seed3"
    baseline.mkdir(parents=True)
    (baseline / "model_final.pth").write_bytes(b"")

    def run_one(row, seed, common, work_dir, threads):
        results = {"visual": {"mAP": 60.0}} if row[0] == "clip_baseline" else {
            "simplified": {"mAP": 67.0}, "composed": {"mAP": 67.5}}
        return {"row": row[0], "seed": seed, "output_dir": f"{work_dir}/{row[0]}/seed{seed}",
                "train_seconds": 60.0, "results": results, "alignment": {}}

    measured = []

    class Guidance:
        def __init__(self, root):
            pass

        def measure(self, output_dir, baseline_dir):
            measured.append((output_dir, baseline_dir))
            figures = {key: {"mAP": 67.0, "Rank-1": 70.0} for key in
                       ("simplified", "composed", "no_person", "own_words", "other_words")}
            return dict(figures, other_identity={"mAP": 64.5, "Rank-1": 70.0}, attention_share=0.7,
                        baseline_last_block_share=0.6)

    monkeypatch.setattr(tool, "run_one", run_one)
    monkeypatch.setattr(tool, "PromptGuidance", Guidance)
    out = tmp_path / "wiring.json"
    tool.main(["--table", "wiring", "--rows", "clip_baseline", "learned_map", "--seeds", "3", "--guidance",
               "--work-dir", str(tmp_path), "--out", str(out), "--device", "cpu"])
    assert measured == [(f"{tmp_path}/wiring/learned_map/seed3", str(baseline))]
    written = json.loads(out.read_text())
    assert written["command"].startswith("python tools/run_ablations.py --table wiring --seeds 3 --rows")
    assert written["runs"][1]["guidance"]["other_identity"]["mAP"] == 64.5
    markdown = out.with_suffix(".md").read_text()
    assert f"commit {written['commit']}" in markdown
    assert "| +2.5 ± 0.0 |" in markdown and "| +0.100 ± 0.000 |" in markdown   # 67.0 - 64.5; 0.7 - 0.6


def ablation_json(path, runs, table="schedule", overrides=("SOLVER.IMS_PER_BATCH", "32"), commit="abc1234"):
    """A JSON as tools/run_ablations.py writes it, with ``runs`` = [(row, seed, mAP)]."""
    rows = {row: {"label": row, "config": "projects/PromptSG/configs/Synthetic/x.yml", "overrides": list(overrides)}
            for row, _, _ in runs}
    document = {"table": table, "seeds": sorted({seed for _, seed, _ in runs}), "date": "2026-12-07",
                "commit": commit, "command": f"python tools/run_ablations.py --table {table}", "jobs": 2,
                "torch_threads_per_run": 1, "overrides": [],
                "machine": {"platform": "Linux", "processor": "x86_64", "cpus": 2},     # an older record: no cpu
                "rows": rows,
                "runs": [{"row": row, "seed": seed, "results": {"visual": {"mAP": m, "Rank-1": m + 5}},
                          "alignment": {}} for row, seed, m in runs]}
    if commit == "0000000":
        del document["command"]                           # records before 2026-12-07 may lack it
    path.write_text(json.dumps(document))
    return str(path)


def test_merge_makes_one_table_of_seeds_run_apart(tmp_path):
    """``tools/run_ablations.py --merge``: the runs of two invocations become one table whose mean and
    sample deviation are over all five seeds, in the table's row order, each source named."""
    from tiny_runs import load_tool

    first = ablation_json(tmp_path / "s012.json", [("clip_baseline_b32_e24", s, m) for s, m in
                                                   ((0, 77.0), (1, 76.0), (2, 78.0))], commit="1111111")
    second = ablation_json(tmp_path / "s34.json", [("learned_map_b32_e24", 3, 80.0),
                                                   ("clip_baseline_b32_e24", 4, 75.0),
                                                   ("clip_baseline_b32_e24", 3, 79.0)], commit="0000000")
    out = tmp_path / "merged" / "s01234.json"
    summaries = load_tool("tools/run_ablations.py").main(["--merge", first, second, "--out", str(out)])
    baseline = summaries["clip_baseline_b32_e24"]["visual/mAP"]
    assert baseline["runs"] == [77.0, 76.0, 78.0, 79.0, 75.0]                  # by seed
    assert baseline["mean"] == pytest.approx(77.0)
    assert baseline["std"] == pytest.approx((10 / 4) ** 0.5)                   # squares 0, 1, 1, 4, 4 over n - 1
    written = json.loads(out.read_text())
    assert written["seeds"] == [0, 1, 2, 3, 4]
    assert [(r["row"], r["seed"]) for r in written["runs"]][:2] == [("clip_baseline_b32_e24", 0),
                                                                   ("clip_baseline_b32_e24", 1)]
    assert [(r["row"], r["seed"]) for r in written["runs"]][-1] == ("learned_map_b32_e24", 3)
    assert [s["commit"] for s in written["merged_from"]] == ["1111111", "0000000"]
    markdown = out.with_suffix(".md").read_text()
    assert "| Row (5 seeds: 0, 1, 2, 3, 4) |" in markdown and "| 77.0 ± 1.6 |" in markdown
    assert f"- {first}: `python tools/run_ablations.py --table schedule`; 2026-12-07, commit 1111111, " \
           "2-CPU x86_64 machine, 1 torch thread(s) per run, 2 at a time" in markdown
    assert f"- {second}: (no command recorded); 2026-12-07, commit 0000000" in markdown
    assert "Row learned_map_b32_e24 has seeds 3 only." in markdown                # fewer than the heading's
    assert "Row clip_baseline_b32_e24 has" not in markdown
    # --rows picks rows of the merged table
    picked = load_tool("tools/run_ablations.py").main(["--merge", first, second, "--rows", "learned_map_b32_e24",
                                                       "--out", str(out)])
    assert list(picked) == ["learned_map_b32_e24"] and json.loads(out.read_text())["seeds"] == [3]


def test_merge_takes_a_row_of_an_older_file_beside_a_newer_run_of_its_other_row(tmp_path):
    """``--merge old.json:ROW new.json``: a row re-run after a default changed is merged beside an older
    file's other row. The older file's run of the re-run row (the same row and seed) is not read: not
    averaged in, not refused, not named among the sources. Without the selection the clash is refused."""
    older = ablation_json(tmp_path / "old.json", [("clip_baseline_b32_e24", 0, 77.0), ("learned_map_b32_e24", 0, 79.0),
                                                  ("clip_baseline_b32_e24", 1, 75.0)], commit="1111111")
    newer = ablation_json(tmp_path / "new.json", [("learned_map_b32_e24", 0, 83.0), ("learned_map_b32_e24", 1, 81.0)],
                          commit="2222222")
    merged = ablations.merged_table([older + ":clip_baseline_b32_e24", newer])
    assert merged["summaries"]["learned_map_b32_e24"]["visual/mAP"]["runs"] == [83.0, 81.0]
    assert merged["summaries"]["clip_baseline_b32_e24"]["visual/mAP"]["runs"] == [77.0, 75.0]
    assert [s["file"] for s in merged["sources"]] == [older, newer]
    assert merged["sources"][0]["runs"] == [("clip_baseline_b32_e24", 0), ("clip_baseline_b32_e24", 1)]
    with pytest.raises(ablations.InputError, match="row 'learned_map_b32_e24' seed 0 is also in"):
        ablations.merged_table([older, newer])
    with pytest.raises(ablations.InputError, match=f"^{older}: no row 'full' to take"):
        ablations.merged_table([older + ":full", newer])
    assert ablations.split_taken("a/b.json:x,y") == ("a/b.json", ["x", "y"])
    assert ablations.split_taken("a:b/c.json") == ("a:b/c.json", None)     # a colon in a directory name


@pytest.mark.parametrize("case, message", [
    ("same seed", "row 'clip_baseline_b32_e24' seed 1 is also in"),
    ("other table", "table 'wiring', not 'schedule'"),
    ("other overrides", "row 'clip_baseline_b32_e24' is defined otherwise than in"),
    ("not a table", "not a JSON written by tools/run_ablations.py"),
    ("unknown row", "row 'no_such_row' is not a row of table 'schedule'"),
])
def test_merge_refuses_runs_that_are_not_one_table_naming_the_file(tmp_path, case, message):
    first = ablation_json(tmp_path / "a.json", [("clip_baseline_b32_e24", 0, 77.0), ("clip_baseline_b32_e24", 1, 76.0)])
    second = tmp_path / "b.json"
    if case == "same seed":
        ablation_json(second, [("clip_baseline_b32_e24", 1, 70.0)])
    elif case == "other table":
        ablation_json(second, [("clip_baseline", 2, 60.0)], table="wiring")
    elif case == "other overrides":
        ablation_json(second, [("clip_baseline_b32_e24", 2, 70.0)], overrides=("SOLVER.IMS_PER_BATCH", "64"))
    elif case == "not a table":
        second.write_text(json.dumps({"mAP": 70.0}))
    else:
        ablation_json(second, [("no_such_row", 2, 70.0)])
    documents = {path: json.loads(open(path).read()) for path in (first, str(second))}
    with pytest.raises(ablations.InputError, match=message) as raised:
        ablations.merge(documents)
    assert str(raised.value).startswith(f"{second}: ")          # the file at fault, first


def test_merge_takes_no_training_options_and_needs_an_output(tmp_path, capsys):
    from tiny_runs import load_tool

    tool = load_tool("tools/run_ablations.py")
    for extra, message in ((["--guidance", "--out", "x.json"], "--merge takes no --guidance"),
                           ([], "--merge needs --out")):
        with pytest.raises(SystemExit):
            tool.main(["--merge", "a.json", *extra])
        assert message in capsys.readouterr().err
    with pytest.raises(tool.InputError, match="missing.json: cannot be read as JSON"):
        tool.main(["--merge", str(tmp_path / "missing.json"), "--out", str(tmp_path / "m.json")])
    one = ablation_json(tmp_path / "a.json", [("clip_baseline_b32_e24", 0, 77.0)])
    with pytest.raises(tool.InputError, match="--rows learned_map_b32_e24: no run of it in"):
        tool.main(["--merge", one, "--rows", "learned_map_b32_e24", "--out", str(tmp_path / "m.json")])
