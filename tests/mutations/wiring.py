#!/usr/bin/env python
"""Mutation check of the model tests: each wiring bug below, applied alone to a copy of the
package, must make ``tests/test_promptsg_model.py`` fail.

    python tests/mutations/wiring.py            # prints one line per mutation, exits 1 if one survives

The bugs are realistic one-line slips in how the model wires the paper's formulas together (the
formulas themselves have their own tests): the wrong tensor into a loss or a module, a dropped
factor, a mean for a sum.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "projects" / "PromptSG" / "promptsg"

# (name, file in the package, text, replacement)
MUTATIONS = [
    ("tokens query read at position 0, not at the EOT token", "modeling/meta_arch.py",
     "tokens, tokens.shape[1] - 1)", "tokens, 0)"),
    ("lambda dropped from Eq. 10", "modeling/meta_arch.py",
     'loss_dict["loss_supcon"] = sc["scale"] * symmetric_supcon_loss(', 'loss_dict["loss_supcon"] = symmetric_supcon_loss('),
    ("SupCon on the MIM output instead of v", "modeling/meta_arch.py",
     'visual.embedding, text, batch_targets, sc["temperature"]',
     'outputs["features"], text, batch_targets, sc["temperature"]'),
    ("v detached before f_theta", "modeling/meta_arch.py",
     "self.heads.inversion(visual.embedding)", "self.heads.inversion(visual.embedding.detach())"),
    ("visual-state triplets averaged, not summed", "modeling/meta_arch.py",
     "sum(triplet(s) for s in states)", "sum(triplet(s) for s in states) / len(states)"),
    ("MIM self-attention over the query alone", "modeling/interaction.py",
     "x = torch.cat([query, patches], dim=1)", "x = query"),
    ("visual-only model: triplet on the embedding twice", "modeling/meta_arch.py",
     "states = visual.states if has_mim else visual.states[:-1]", "states = visual.states"),
    ("f_theta fed ln_post(CLS) instead of v", "modeling/meta_arch.py",
     "self.heads.inversion(visual.embedding)", "self.heads.inversion(visual.states[1])"),
    ("the query added back to the cross-attention output (x = q + A(q, P))", "modeling/interaction.py",
     "    x = block.ls_1(few_query_attention(", "    x = query + block.ls_1(few_query_attention("),
    ("the prompt's map cut from the blocks before the last (plain blocks)", "modeling/interaction.py",
     "x = block_forward(blk, x, read_bias)", "x = blk(x)"),
    ("the map-pool loss reaches the encoders (patches not detached)", "modeling/interaction.py",
     "query, patches_fixed = query.detach(), patches.detach()", "patches_fixed = patches"),
    ("the prompt's map cut from the read row of the last block", "modeling/interaction.py",
     "return query_row_forward(self.blocks[-1], x, 0, read_bias)", "return query_row_forward(self.blocks[-1], x, 0)"),
    ("the map's bias computed but v's row left unbiased", "modeling/interaction.py",
     "read = few_query_attention(block.attn, normed[:, :1], normed, read_bias)",
     "read = few_query_attention(block.attn, normed[:, :1], normed)"),
    ("the map's logits not standardised", "modeling/interaction.py",
     "z = self.map_contrast * z", "z = self.map_contrast * logits"),
    ("the map's prior (MIM.MAP_PRIOR) not added to its logits", "modeling/interaction.py",
     "z = z + self.prior_power * log_prior.float()", "z = z"),
    ("the prior's power (MIM.MAP_PRIOR_POWER) dropped", "modeling/interaction.py",
     "z = z + self.prior_power * log_prior.float()", "z = z + log_prior.float()"),
    ("the map's prior trained through (the encoder's attention shaped by the MIM)", "modeling/interaction.py",
     "log_prior = None if log_prior is None else log_prior.detach()", "pass"),
    ("the map's keys (MIM.MAP_KEYS) ignored: the map made from the patches", "modeling/interaction.py",
     "log_map = self.log_prompt_map(query, keys, log_prior)", "log_map = self.log_prompt_map(query, patches, log_prior)"),
    ("the penultimate keys taken after the last block", "modeling/clip_backbone.py",
     "visual.ln_post(x_prev[:, 1:]) @ visual.proj", "x[:, 1:] @ visual.proj"),
]


def run_tests(package_root, targets=("tests/test_promptsg_model.py",)):
    env = dict(os.environ, PYTHONPATH=str(package_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *targets]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def copy_package(tmp, mutation=None):
    """A copy of the package in ``tmp`` with one mutation applied, checked to be what imports;
    beside it a link to the project's configs (the package reads its tiny CLIP configs there)."""
    copy = Path(tmp) / "promptsg"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if not (Path(tmp) / "configs").exists():
        (Path(tmp) / "configs").symlink_to(PACKAGE.parent / "configs")
    if mutation is not None:
        name, filename, text, replacement = mutation
        source = (copy / filename).read_text()
        if source.count(text) != 1:
            sys.exit(f"mutation {name!r}: {text!r} is not in {filename} exactly once")
        (copy / filename).write_text(source.replace(text, replacement))
    probe = subprocess.run([sys.executable, "-c", "import promptsg; print(promptsg.__file__)"],
                           env=dict(os.environ, PYTHONPATH=tmp), capture_output=True, text=True, cwd=REPO)
    if not probe.stdout.startswith(tmp):
        sys.exit(f"the copy is not the package imported: {probe.stdout or probe.stderr}")


def check(mutations, kind="mutations"):
    """Apply each (name, file, text, replacement, tests) alone to a copy of the package and run
    its tests; prints one line each and returns 1 if one survived (0 if all were caught)."""
    survived = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy_package(tmp)
        clean = run_tests(tmp, sorted({t for *_, tests in mutations for t in tests}))
        if clean.returncode != 0:
            sys.exit(f"the tests fail without any of the {kind}:\n" + clean.stdout[-2000:])
        for name, filename, text, replacement, tests in mutations:
            copy_package(tmp, (name, filename, text, replacement))
            result = run_tests(tmp, tests)
            # pytest's exit code 1: tests ran and one failed (2-4: collection or usage errors).
            if result.returncode not in (0, 1):
                sys.exit(f"{name!r}: pytest could not run the tests:\n{result.stdout[-2000:]}")
            caught = result.returncode == 1
            failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
            survived += not caught
            print(f"{'caught  ' if caught else 'SURVIVED'} {name}: {failed[0] if failed else ''}", flush=True)
    print(f"{len(mutations) - survived} of {len(mutations)} {kind} caught")
    return 1 if survived else 0


def main():
    return check([(*m, ["tests/test_promptsg_model.py"]) for m in MUTATIONS])


if __name__ == "__main__":
    sys.exit(main())
