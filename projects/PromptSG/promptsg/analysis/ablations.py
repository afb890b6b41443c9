"""The paper's ablations (Tables 3-5) on the embedded synthetic benchmark as tables of rows (a
config of projects/PromptSG/configs/Synthetic/ with overrides), and their summary over seeds
(tools/run_ablations.py): mean and standard deviation of mAP and Rank-1 per test prompt and of the
alignment at the end of training (``promptsg.modeling.diagnostics``), as a markdown table.

Each row runs as ``tools/train_net.py`` in a subprocess (``run_one``), once per seed; a run already
finished in the work folder is reused, an interrupted one resumed.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from ..modeling.diagnostics import alignment_report
from ..utils.errors import InputError
from ..utils.records import machine_words
from .guidance import guidance_figures

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # projects/PromptSG
TRAIN_NET = os.path.join(os.path.dirname(os.path.dirname(PROJECT)), "tools", "train_net.py")
SYNTHETIC = os.path.join(PROJECT, "configs", "Synthetic")
PROMPTSG = os.path.join(SYNTHETIC, "promptsg_small_vit.yml")
BASELINE = os.path.join(SYNTHETIC, "clip_baseline_small_vit.yml")
CLIPREID = os.path.join(SYNTHETIC, "clipreid_small_vit.yml")
NO_MIM = ["MODEL.PROMPTSG.MIM.CROSS_LAYERS", "0", "MODEL.PROMPTSG.MIM.SELF_LAYERS", "0"]
ID_AND_TRIPLET = ["MODEL.LOSSES.NAME", '("CrossEntropyLoss", "TripletLoss")']
REA = ["INPUT.REA.ENABLED", "True"]
OLD = REA + ["MODEL.LOSSES.SUPCON.POSITIVES", "mean", "MODEL.PROMPTSG.PSEUDO_TOKEN_INIT", "unit",
             "MODEL.LOSSES.SUPCON.TEMPERATURE", "0.07"]

SHARE = ["MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE", "0.5"]


def fusion(name):
    return ["MODEL.PROMPTSG.MIM.FUSION", name]


# table -> [(row key, paper label, config, overrides)]
# learned_map's map as it was until 2026-12-08 (Base-PromptSG.yml now sets keys, prior and power).
PLAIN_MAP = ["MODEL.PROMPTSG.MIM.MAP_KEYS", "", "MODEL.PROMPTSG.MIM.MAP_PRIOR", "",
             "MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER", "1.0"]
TABLES = {
    "ablations": [
        ("clip_baseline", "CLIP baseline (ID + triplet, no text)", BASELINE, []),
        ("supcon_no_mim", "Table 3 d: + L_SupCon, no MIM", PROMPTSG, NO_MIM),
        ("i2t_only", "Table 3 c: L_i2t only (w/o L_t2i)", PROMPTSG, ["MODEL.LOSSES.SUPCON.T2I", "False"]),
        ("t2i_only", "Table 3 b: L_t2i only (w/o L_i2t)", PROMPTSG, ["MODEL.LOSSES.SUPCON.I2T", "False"]),
        ("full", "Table 3 a / Table 5: PromptSG, 1 cross + 2 self (default: MIM.FUSION learned_map)", PROMPTSG, []),
        ("paper_recipe", "... Eq. 7 as written (MIM.FUSION attention; ablations/paper_recipe.yml)", PROMPTSG,
         fusion("attention")),
        ("wo_composed", "Table 4: training w/o composed (simplified prompt, no L_SupCon)", PROMPTSG,
         ID_AND_TRIPLET + ["MODEL.PROMPTSG.COMPOSE_TRAIN", "False"]),
        ("mim_1cross", "Table 5: 1 cross, 0 self (MIM.FUSION attention: the cross-attention's output)", PROMPTSG,
         ["MODEL.PROMPTSG.MIM.SELF_LAYERS", "0"] + fusion("attention")),
        ("mim_1cross_1self", "Table 5: 1 cross, 1 self", PROMPTSG, ["MODEL.PROMPTSG.MIM.SELF_LAYERS", "1"]),
        ("simplified_share", "Beyond the paper: half the MIM queries simplified in training", PROMPTSG, SHARE),
    ],
    # The MIM's wiring where the paper is silent (MODEL.PROMPTSG.MIM.FUSION). The rows of wirings since
    # removed are in docs/EXPERIMENTS.md with the commits that ran them.
    "wiring": [
        ("clip_baseline", "CLIP baseline (ID + triplet, no text)", BASELINE, []),
        ("attention", "attention: x = A(q, P) (Eq. 7)", PROMPTSG, fusion("attention")),
        ("learned_map", "learned_map (default): log(M a) on v's logits, a from the keys before the encoder's last "
         "block times its CLS attention squared", PROMPTSG, fusion("learned_map")),
        ("learned_map_plain", "learned_map as the default was until 2026-12-08: a from the final patch tokens, no "
         "prior", PROMPTSG, fusion("learned_map") + PLAIN_MAP),
        ("learned_map_pool", "map_pool: learned_map_plain + L_SupCon on the map's pool of the patches, training the "
         "map only (weight 0.5; ablations/map_pool.yml)", PROMPTSG,
         fusion("learned_map") + PLAIN_MAP + ["MODEL.LOSSES.SUPCON.MAP_SCALE", "0.5"]),
    ],
    # PromptSG beside the paper's main competitor, CLIP-ReID (two stages), and the CLIP baseline.
    "methods": [
        ("clip_baseline", "CLIP baseline (ID + triplet, no text)", BASELINE, []),
        ("clip_reid", "CLIP-ReID (stage 1: identity prompts; stage 2: ID + triplet + image-to-text)", CLIPREID, []),
        ("full", "PromptSG (default: MIM.FUSION learned_map), simplified prompt at test", PROMPTSG, []),
    ],
    # The schedule search (``schedule_rows``) is filled in below.
    "schedule": [],
    # The experiments behind the defaults (docs/EXPERIMENTS.md, "What was wrong"); OLD is the main job as
    # it was: SupCon averaged over the positives, s* at BatchNorm's unit scale, random erasing.
    "diagnosis": [
        ("base", "CLIP baseline, ID + triplet (defaults)", BASELINE, []),
        ("base_rea", "CLIP baseline with random erasing", BASELINE, REA),
        ("base_rea_id_only", "... and the ID loss only", BASELINE, REA + ["MODEL.LOSSES.NAME", '("CrossEntropyLoss",)']),
        ("base_rea_triplet_on_v", "... and the triplet on v only (no visual states)", BASELINE,
         REA + ["MODEL.PROMPTSG.TRIPLET_ON_VISUAL_STATES", "False"]),
        ("base_rea_soft_margin", "... and a soft-margin triplet", BASELINE, REA + ["MODEL.LOSSES.TRI.MARGIN", "0.0"]),
        ("base_rea_lr_5e-5", "... and encoder lr 5e-5 (10x lower)", BASELINE, REA + ["SOLVER.BASE_LR", "0.00005"]),
        ("old", "PromptSG as it was (SupCon mean over positives, unit s*, erasing)", PROMPTSG, OLD),
        ("old_sum", "... with SupCon summed over the positives (Eq. 5-6)", PROMPTSG,
         REA + ["MODEL.PROMPTSG.PSEUDO_TOKEN_INIT", "unit"]),
        ("old_sum_token", "... and s* starting at the word-embedding scale", PROMPTSG, REA),
        ("old_sum_token_tau_0.03", "... with tau 0.03 instead of CLIP's 0.071", PROMPTSG,
         REA + ["MODEL.LOSSES.SUPCON.TEMPERATURE", "0.03"]),
        ("old_sum_token_tau_0.01", "... with tau 0.01", PROMPTSG, REA + ["MODEL.LOSSES.SUPCON.TEMPERATURE", "0.01"]),
        ("old_supcon_only", "... L_SupCon alone", PROMPTSG, REA + ["MODEL.LOSSES.NAME", '("SupConLoss",)']),
        ("old_supcon_only_frozen_v", "... L_SupCon alone, encoder frozen (lr 5e-8), heads lr 5e-3", PROMPTSG,
         REA + ["MODEL.LOSSES.NAME", '("SupConLoss",)', "SOLVER.BASE_LR", "0.00000005",
                "SOLVER.HEADS_LR_FACTOR", "100000.0"]),
        ("defaults", "PromptSG now: summed SupCon, s* at word scale, no erasing", PROMPTSG, []),
    ],
}
# A small schedule search, the same for every model it compares: the demo's batch of 64 (16 identities x
# 4) and a batch of 32 (8 x 4), at the demo's 12 epochs (steps at 8 and 11) and at twice them.
LONG = ["SOLVER.MAX_EPOCH", "24", "SOLVER.STEPS", "[16, 22]", "SOLVER.CHECKPOINT_PERIOD", "24",
        "TEST.EVAL_PERIOD", "24"]
SCHEDULES = [("b64_e12", "batch 64, 12 epochs (the demo's)", []),
             ("b32_e12", "batch 32, 12 epochs", ["SOLVER.IMS_PER_BATCH", "32"]),
             ("b64_e24", "batch 64, 24 epochs", LONG),
             ("b32_e24", "batch 32, 24 epochs", ["SOLVER.IMS_PER_BATCH", "32"] + LONG)]


def schedule_rows(models):
    """Each of the wiring table's rows ``models`` under each of the SCHEDULES."""
    wiring = {key: (label, config, overrides) for key, label, config, overrides in TABLES["wiring"]}
    return [(f"{key}_{name}", f"{wiring[key][0].split(':')[0]}, {label}", wiring[key][1], wiring[key][2] + extra)
            for key in models for name, label, extra in SCHEDULES]


TABLES["schedule"] = schedule_rows(["clip_baseline", "learned_map", "learned_map_pool"])
METRICS = ("mAP", "Rank-1")
ALIGNMENT = ("supcon_over_chance", "align_i2t_top1", "align_t2i_top1", "collapse_v_cos", "collapse_text_cos",
             "pseudo_token_norm_ratio")


def row_prompts(config, overrides):
    """The test-time prompts of a row: ("visual",) without a MIM (the feature is v), else the
    simplified prompt and, where f_theta is trained, the composed one."""
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    if config in (BASELINE, CLIPREID) or pairs.get("MODEL.PROMPTSG.MIM.CROSS_LAYERS") == "0":
        return ("visual",)
    if pairs.get("MODEL.PROMPTSG.COMPOSE_TRAIN") == "False":
        return ("simplified",)
    return ("simplified", "composed")


def train_net(args, log_path, threads=None):
    """tools/train_net.py with ``args`` (``threads`` torch threads, default torch's), its output to
    ``log_path``; raises with the log's tail on failure."""
    cmd = [sys.executable, TRAIN_NET, *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (log: {log_path}):\n{tail}")


def read_json(path):
    """The JSON file ``path``."""
    with open(path) as f:
        return json.load(f)


def run_one(row, seed, common, work_dir, threads=None):
    """Train (or reuse) one row with one seed and evaluate it with its prompts (``threads`` torch
    threads); returns its record."""
    key, label, config, overrides = row
    out_dir = os.path.join(work_dir, key, f"seed{seed}")
    os.makedirs(out_dir, exist_ok=True)
    record = {"row": key, "seed": seed, "output_dir": out_dir}
    results_path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(results_path):
        start = time.perf_counter()
        # --resume: a run interrupted before its results continues from its last checkpoint.
        train_net(["--config-file", config, "--resume", *common, *overrides, "SEED", str(seed),
                   "OUTPUT_DIR", out_dir],
                  os.path.join(out_dir, "train.out"), threads)
        record["train_seconds"] = time.perf_counter() - start
    else:   # reused: from the run's first file (its config) to its last (the results)
        record["train_seconds"] = os.path.getmtime(results_path) - os.path.getmtime(os.path.join(out_dir, "config.yaml"))
    prompts = row_prompts(config, overrides)
    results = read_json(results_path)
    record["results"] = {prompts[0]: {m: results[m] for m in METRICS}}   # train_net's own
    if "timing" in results:      # the training's own seconds: stage 1 apart, the evaluations left out
        record["timing"] = results["timing"]
    if "composed" in prompts:
        composed_dir = os.path.join(out_dir, "composed")
        composed_path = os.path.join(composed_dir, "eval_results.json")
        if os.path.isfile(composed_path):
            record["eval_seconds"] = (os.path.getmtime(composed_path)
                                      - os.path.getmtime(os.path.join(composed_dir, "config.yaml")))
        else:
            os.makedirs(composed_dir, exist_ok=True)
            start = time.perf_counter()
            train_net(["--config-file", config, "--eval-only", *common, *overrides,
                       "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"),
                       "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed", "OUTPUT_DIR", composed_dir],
                      os.path.join(composed_dir, "eval.out"), threads)
            record["eval_seconds"] = time.perf_counter() - start
        record["results"]["composed"] = {m: read_json(composed_path)[m] for m in METRICS}
    report, _ = alignment_report(out_dir)
    record["alignment"] = {k: report[k] for k in ALIGNMENT if k in report}
    return record


def summarise(records):
    """mean and std over the seeds of every metric of one row."""
    values = {}
    for r in records:
        for prompt, metrics in r["results"].items():
            for m, v in metrics.items():
                values.setdefault(f"{prompt}/{m}", []).append(v)
        for k, v in r["alignment"].items():
            values.setdefault(f"alignment/{k}", []).append(v)
        for k, v in r.get("timing", {}).items():
            values.setdefault(f"timing/{k}", []).append(v / 60)     # minutes
        for k, v in guidance_figures(r["guidance"]).items() if "guidance" in r else ():
            values.setdefault(f"guidance/{k}", []).append(v)
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
            for k, v in values.items()}


def merge(documents):
    """One table from the JSONs of several ``tools/run_ablations.py`` invocations (path -> its parsed
    JSON), for seeds run at different times or on different machines: (table, rows, records), the
    rows in their table's order and the records sorted by row and seed. The files must be of one
    table, define each row alike (the same config and overrides, so that every seed of a row is the
    same experiment) and hold each (row, seed) once. Raises InputError naming the file and the
    table, row or seed at fault."""
    table, rows, owner, records = None, {}, {}, []
    for path, document in documents.items():
        if not isinstance(document, dict) or not {"table", "rows", "runs"} <= set(document):
            raise InputError(f"{path}: not a JSON written by tools/run_ablations.py (no table, rows and runs)")
        if table is None:
            table = document["table"]
        elif document["table"] != table:
            raise InputError(f"{path}: table {document['table']!r}, not {table!r} as in the files before it")
        for key, definition in document["rows"].items():
            if key in rows and rows[key] != definition:
                raise InputError(f"{path}: row {key!r} is defined otherwise than in {owner[key]} "
                                 f"(config or overrides differ)")
            rows.setdefault(key, definition)
            owner.setdefault(key, path)
        for run in document["runs"]:
            if run["row"] not in document["rows"]:
                raise InputError(f"{path}: a run of row {run['row']!r}, which the file does not define")
            same = [(p, r) for p, r in records if (r["row"], r["seed"]) == (run["row"], run["seed"])]
            if same:
                raise InputError(f"{path}: row {run['row']!r} seed {run['seed']} is also in {same[0][0]}")
            records.append((path, run))
    if table not in TABLES:
        raise InputError(f"{next(iter(documents))}: unknown table {table!r}; the tables are {sorted(TABLES)}")
    order = [key for key, *_ in TABLES[table]]
    unknown = sorted(set(rows) - set(order))
    if unknown:
        raise InputError(f"{owner[unknown[0]]}: row {unknown[0]!r} is not a row of table {table!r}")
    records.sort(key=lambda item: (order.index(item[1]["row"]), item[1]["seed"]))
    return table, {key: rows[key] for key in order if key in rows}, [run for _, run in records]


def split_taken(spec):
    """``--merge``'s ``FILE.json:ROW,ROW`` -> (FILE.json, [ROW, ROW]); a bare path -> (path, None)."""
    path, colon, names = spec.rpartition(":")
    if not colon or not path.endswith(".json"):
        return spec, None
    return path, [name for name in names.split(",") if name]


def taking(path, document, names):
    """``document`` (a JSON of this tool, read from ``path``) with only the rows ``names`` and their
    runs: its other rows are neither merged nor checked, so that a row re-run after a default
    changed can be merged beside an older file's other rows. Raises InputError for a name it lacks."""
    absent = [key for key in names if key not in document.get("rows", {})]
    if absent:
        raise InputError(f"{path}: no row {absent[0]!r} to take (its rows: {', '.join(document.get('rows', {}))})")
    return {**document, "rows": {k: v for k, v in document["rows"].items() if k in names},
            "runs": [run for run in document.get("runs", []) if run["row"] in names]}


def merged_table(paths, table=None, rows=None):
    """``tools/run_ablations.py --merge``: the JSONs ``paths`` of several invocations as one table
    (``merge``; ``FILE.json:ROW,ROW`` takes only those rows of a file, ``taking``), restricted to
    ``rows`` if given; ``table`` if given must be theirs. Returns a dict: table, seeds, rows,
    records, summaries, sources (each file's command, date, commit, machine and runs), and text,
    the markdown tables with each source named under them (and any row with fewer seeds than the
    heading). Raises InputError naming the file, row or option at fault."""
    documents = {}
    for spec in paths:
        path, names = split_taken(spec)
        try:
            document = read_json(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot be read as JSON ({exc})") from None
        documents[path] = taking(path, document, names) if names and isinstance(document, dict) and "rows" in document \
            else document
    found, definitions, records = merge(documents)
    if table and table != found:
        raise InputError(f"{paths[0]}: table {found!r}, not --table {table}")
    if rows:
        missing = [key for key in rows if key not in definitions]
        if missing:
            raise InputError(f"--rows {missing[0]}: no run of it in {' '.join(paths)}")
        definitions = {key: value for key, value in definitions.items() if key in rows}
        records = [r for r in records if r["row"] in definitions]
    seeds = sorted({r["seed"] for r in records})
    row_seeds = {key: [r["seed"] for r in records if r["row"] == key] for key in definitions}
    summaries = {key: summarise([r for r in records if r["row"] == key]) for key in definitions}
    sources = [{"file": path, **{k: d.get(k) for k in ("command", "date", "commit", "machine", "jobs",
                                                      "torch_threads_per_run", "overrides")},
                "runs": [(r["row"], r["seed"]) for r in d["runs"]]} for path, d in documents.items()]
    named = "\n".join(f"- {s['file']}: " + (f"`{s['command']}`" if s["command"] else "(no command recorded)")
                      + f"; {s['date']}, commit {s['commit']}, {machine_words(s)}, "
                      f"{s['torch_threads_per_run']} torch thread(s) per run, {s['jobs']} at a time"
                      + (f"; overrides {' '.join(s['overrides'])}" if s["overrides"] else "") for s in sources)
    # a row with fewer seeds than the table's heading says is named
    named += "".join(f"\n\nRow {key} has seeds {', '.join(map(str, got))} only."
                     for key, got in row_seeds.items() if got != seeds)
    return {"table": found, "seeds": seeds, "rows": definitions, "records": records, "summaries": summaries,
            "sources": sources,
            "text": tables_text(found, summaries, seeds, any("guidance" in r for r in records)),
            "sources_text": named}


def tables_text(table, summaries, seeds, with_guidance):
    """The markdown of a table's summaries, with the guidance table after it when measured."""
    text = markdown(table, summaries, seeds)
    return text + "\n\n" + guidance_markdown(table, summaries, seeds) if with_guidance else text


def cell(summary, key, scale=1.0, digits=1):
    """mean ± std of ``summary[key]`` over the seeds ("-" if absent)."""
    if key not in summary:
        return "-"
    s = summary[key]
    if len(s["runs"]) == 1:
        return f"{scale * s['mean']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def markdown(table, summaries, seeds):
    """The summary as a markdown table (mean +- std over the seeds)."""
    if table == "methods":
        return methods_markdown(summaries, seeds)

    lines = [f"| Row ({'seed' if len(seeds) == 1 else f'{len(seeds)} seeds:'} {', '.join(map(str, seeds))}) | mAP, simplified / visual-only | "
             f"mAP, composed | Rank-1, simplified / visual-only | Rank-1, composed | "
             f"loss_supcon / chance at the end | image->prompt top-1 | pairwise cos of v |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for key, label, _, _ in TABLES[table]:
        if key not in summaries:
            continue
        s = summaries[key]
        first = "simplified" if "simplified/mAP" in s else "visual"
        lines.append(f"| {label} | {cell(s, first + '/mAP')} | {cell(s, 'composed/mAP')} | "
                     f"{cell(s, first + '/Rank-1')} | {cell(s, 'composed/Rank-1')} | "
                     f"{cell(s, 'alignment/supcon_over_chance', digits=2)} | "
                     f"{cell(s, 'alignment/align_i2t_top1', digits=2)} | {cell(s, 'alignment/collapse_v_cos', digits=2)} |")
    return "\n".join(lines)


def methods_markdown(summaries, seeds):
    """The methods table: accuracy and each stage's training minutes (results.json's timing)."""
    lines = [f"| Model ({len(seeds)} seeds: {', '.join(map(str, seeds))}) | mAP | Rank-1 | "
             "Training, stage 1 (min) | Training, stage 2 / the one stage (min) |", "|:--|--:|--:|--:|--:|"]
    for key, label, _, _ in TABLES["methods"]:
        if key in summaries:
            s = summaries[key]
            first = "simplified" if "simplified/mAP" in s else "visual"
            lines.append(f"| {label} | {cell(s, first + '/mAP')} | {cell(s, first + '/Rank-1')} | "
                         f"{cell(s, 'timing/stage1_seconds')} | {cell(s, 'timing/train_seconds')} |")
    return "\n".join(lines)


GUIDANCE_COLUMNS = [
    ("simplified_mAP", "mAP, simplified", 1),
    ("composed_minus_simplified", "composed - simplified", 1),
    ("other_identity_drop", "mAP lost to another identity's prompt", 1),
    ("no_person_change", 'mAP change with "A photo of a car."', 1),
    ("attention_share", "simplified prompt's share in the person", 3),
    ("attention_margin", "... minus the baseline's last block", 3),
    ("read_share", "v's last-block attention share in the person", 3),
    ("own_words_change", "mAP change, image + its words", 1),
    ("other_words_change", "mAP change, image + another's words", 1),
]


def guidance_markdown(table, summaries, seeds):
    """What the prompt does at test (``promptsg.analysis.guidance``), per row with a MIM: mean +- std
    over the seeds of each figure the targets read."""
    lines = [f"| Row ({len(seeds)} seeds: {', '.join(map(str, seeds))}) | "
             + " | ".join(label for _, label, _ in GUIDANCE_COLUMNS) + " |",
             "|:--|" + "--:|" * len(GUIDANCE_COLUMNS)]
    for key, label, _, _ in TABLES[table]:
        s = summaries.get(key, {})
        if "guidance/simplified_mAP" not in s:
            continue
        cells = []
        for name, _, digits in GUIDANCE_COLUMNS:
            v = s.get(f"guidance/{name}")
            cells.append("-" if v is None else f"{v['mean']:+.{digits}f} ± {v['std']:.{digits}f}"
                         if name not in ("simplified_mAP", "attention_share", "read_share")
                         else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markers(table):
    """The comments a README's copy of ``table`` lies between."""
    return f"<!-- ablations:{table}:start -->", f"<!-- ablations:{table}:end -->"


def replace_between_markers(path, table, text):
    """``text`` in place of what lies between ``table``'s markers in the file ``path``."""
    start, end = markers(table)
    with open(path) as f:
        content = f.read()
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(before + start + "\n" + text + "\n" + end + after)

