"""The README's commands, run as a new user would run them.

The commands come from the README's fenced bash blocks, found under their headings, so a
README command that stops working fails here. Each runs in a fresh folder with its own HOME
(whose ~/.cache/dino_dist is the suite's demo cache), through bash, with the console scripts
that `pip install -e ".[dev]"` installed. The only changes are shortenings: a few optimizer
steps instead of 1,280 (`train.max_steps`), one probe epoch, and the step of the demo's final
checkpoint replaced by the shortened run's. The set-up commands are CI's own (`.ci/run`).

A second test reads every command of the README and docs/*.md without running it: each
option must exist in the command's `--help`, and each training command's config and
overrides must load.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, subprocess_env

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))

FIRST_STEPS, RESUMED_STEPS, TORCHRUN_STEPS = 3, 5, 2
# What a new user's demo run would take minutes for; the rest of each command is the README's.
SHORT = [f"train.max_steps={FIRST_STEPS}", "log.every_steps=1", "eval.batch_size=256"]
RESUME_SHORT = [f"train.max_steps={RESUMED_STEPS}", "log.every_steps=1", "eval.knn_at_end=false"]
README_FINAL_STEP = 1280  # the demo's last checkpoint, named in the README's commands


# ---------------------------------------------------------------- reading the Markdown


def fenced_blocks(text: str, language: str) -> list[tuple[str, list[str]]]:
    """(the `## ` heading above it, its lines) for every ```<language> block."""
    blocks, heading, lines = [], "", None
    for line in text.splitlines():
        if lines is None:
            if line.startswith("## "):
                heading = line[3:].strip()
            elif line.strip() == f"```{language}":
                lines = []
        elif line.startswith("```"):
            blocks.append((heading, lines))
            lines = None
        else:
            lines.append(line)
    return blocks


def commands(lines: list[str]) -> list[str]:
    """Shell commands of a block: continuation lines joined, blank and comment lines left out."""
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            joined.append(command)
    return joined


def section(heading_start: str, language: str = "bash") -> list[str]:
    """The lines of the first block under the README heading that starts with `heading_start`."""
    for heading, lines in fenced_blocks(README.read_text(), language):
        if heading.startswith(heading_start):
            return lines
    raise AssertionError(f"README.md has no ```{language} block under a heading starting "
                         f"{heading_start!r}")


def with_words(command: str, words: list[str]) -> str:
    """`command` with `words` appended before any trailing comment."""
    code = command.split(" #", 1)[0].rstrip()
    return " ".join([code, *words])


def shortened_step(text: str, step: int) -> str:
    """The README's final demo step (1280) replaced by the shortened run's."""
    return (text.replace(f"step_{README_FINAL_STEP:08d}", f"step_{step:08d}")
            .replace(f"step{README_FINAL_STEP}", f"step{step}")
            .replace(f"step {README_FINAL_STEP}", f"step {step}"))


def sample_pattern(sample: str) -> re.Pattern:
    """A line of the README's sample output as a pattern: timestamp dropped, numbers, paths,
    the device and the parenthesised stop reason free, `...` anything."""
    parts = []
    for word in sample.split()[1:]:
        if word == "...":
            parts.append(".*")
        elif "/" in word and not re.fullmatch(r"\d+/\d+", word):
            parts.append(r"\S+")
        elif word in ("cpu;", "cpu"):
            parts.append(r"\S+")
        elif re.fullmatch(r"\(\w+\)", word):
            parts.append(r"\(\w+\)")
        else:
            pieces = re.split(r"(\d+(?:\.\d+)?(?:e[+-]\d+)?)", word)
            parts.append("".join(r"[0-9.e+-]+" if i % 2 else re.escape(piece)
                                 for i, piece in enumerate(pieces)))
    return re.compile(r"\s+".join(parts))


# ---------------------------------------------------------------- running as a new user


class NewUser:
    """A fresh working folder and HOME; commands run through bash, as typed."""

    def __init__(self, root: Path, demo_cache: Path):
        self.cwd = root / "work"
        self.home = root / "home"
        self.cwd.mkdir(parents=True)
        (self.home / ".cache").mkdir(parents=True)
        demo_cache.mkdir(parents=True, exist_ok=True)
        (self.home / ".cache" / "dino_dist").symlink_to(demo_cache, target_is_directory=True)
        self.env = subprocess_env()
        self.env.pop("DINO_DIST_CACHE", None)  # the default place under HOME, as for a user
        self.env["HOME"] = str(self.home)
        self.env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + self.env["PATH"]

    def run(self, script: str, timeout: int = 300) -> str:
        result = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, (
            f"README command failed ({result.returncode}):\n{script}\n--- stdout\n"
            f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}")
        return result.stdout


def assert_in_order(patterns: list[re.Pattern], output: str) -> None:
    lines = output.splitlines()
    at = 0
    for pattern in patterns:
        while at < len(lines) and not pattern.search(lines[at]):
            at += 1
        assert at < len(lines), f"no line matching {pattern.pattern!r} (in order) in:\n{output}"
        at += 1


def step_lines(output: str, last: int) -> list[str]:
    return re.findall(rf"step (\d+)/{last} ", output)


@pytest.fixture
def new_user(tmp_path, tmp_path_factory) -> NewUser:
    # The demo images are made once per test session (the folder tests/conftest.py gives
    # DINO_DIST_CACHE), so the runs below reuse what other tests of this worker generated.
    return NewUser(tmp_path, tmp_path_factory.getbasetemp() / "cache")


def test_the_readme_commands_as_a_new_user_runs_them(new_user):
    # First run: `dino-train` alone, and what the README shows it prints.
    first = commands(section("First run"))
    assert first == ["dino-train"], first
    out = new_user.run(with_words(first[0], SHORT))
    samples = [line for line in section("First run", "text") if line.strip() != "..."]
    assert samples, "the README shows what the first run prints"
    assert_in_order([sample_pattern(line) for line in samples], out)
    assert step_lines(out, FIRST_STEPS) == [str(s) for s in range(1, FIRST_STEPS + 1)]
    run = new_user.cwd / "runs" / "demo"
    for name in ("config.yaml", "metrics.jsonl", "log.txt", "tb", "training_summary.json",
                 f"checkpoints/step_{FIRST_STEPS:08d}.pt"):
        assert (run / name).exists(), name

    # Many GPUs: the demo on two processes, as the README writes it.
    torchrun = [c for c in commands(section("Many GPUs")) if "--config" not in c]
    assert len(torchrun) == 1 and torchrun[0].startswith("torchrun "), torchrun
    out = new_user.run(with_words(torchrun[0], [f"train.max_steps={TORCHRUN_STEPS}",
                                                 "log.every_steps=1", "eval.knn_at_end=false"]))
    assert "rank 0 of 2" in out
    assert step_lines(out, TORCHRUN_STEPS) == ["1", "2"]  # printed once, by rank 0
    output_dir = re.search(r"train\.output_dir=(\S+)", torchrun[0]).group(1)
    assert (new_user.cwd / output_dir / "checkpoints" / f"step_{TORCHRUN_STEPS:08d}.pt").is_file()

    # Resume: the same command again, here allowed two more steps.
    resume = commands(section("Resume"))
    assert resume == first, resume
    out = new_user.run(with_words(resume[0], RESUME_SHORT))
    said = re.search(r"`(resumed from [^`]+)`", README.read_text().split("## Resume")[1])
    assert said, "the README's Resume section quotes the line a resumed run prints"
    said = " ".join(said.group(1).split())
    assert re.search(re.escape(said).replace("…", ".+"), out), f"{said!r} not printed:\n{out}"
    assert f"resumed from runs/demo/checkpoints/step_{FIRST_STEPS:08d}.pt (step {FIRST_STEPS}," in out
    assert step_lines(out, RESUMED_STEPS) == [str(s) for s in range(FIRST_STEPS + 1,
                                                                      RESUMED_STEPS + 1)]
    assert (run / "checkpoints" / f"step_{RESUMED_STEPS:08d}.pt").is_file()

    # Evaluate: k-NN, the linear probe (one epoch) and attention maps of the checkpoint.
    evaluate = commands(section("Evaluate"))
    setting = [c for c in evaluate if re.fullmatch(r"[A-Z_]+=\S+", c)]
    by_tool = {c.split()[0]: c for c in evaluate if c not in setting}
    assert set(by_tool) == {"dino-knn", "dino-linear", "dino-attention"}, evaluate
    prefix = "".join(f"{s}\n" for s in setting)
    out = new_user.run(prefix + shortened_step(by_tool["dino-knn"], RESUMED_STEPS))
    assert re.search(r"^k-NN k=20 T=0\.07: top-1 [\d.]+% top-5 [\d.]+% "
                     r"\(600 val images, 2600 train images\)$", out, re.M), out
    out = new_user.run(prefix + with_words(shortened_step(by_tool["dino-linear"], RESUMED_STEPS),
                                           ["--epochs", "1"]))
    assert re.search(r"^linear probe, epoch 1: top-1 [\d.]+% top-5 [\d.]+% \(val\); output in "
                     r"\S+linear/step_0+5$", out.strip(), re.M), out
    out = new_user.run(prefix + shortened_step(by_tool["dino-attention"], RESUMED_STEPS))
    written = out.split()
    assert written and all((new_user.cwd / path).is_file() for path in written), out
    assert any(path.endswith("grid.png") for path in written), out

    # Export: the backbone under DINO's names (the line the README shows), then for timm.
    block = section("Export")
    export = commands(block)
    assert len(export) == 2 and all(c.startswith("dino-export ") for c in export), export
    shown = [line[2:] for line in block if line.startswith("# wrote ")]
    assert len(shown) == 1, "the README shows what dino-export prints"
    out = new_user.run(shortened_step(export[0], RESUMED_STEPS))
    assert out.strip() == shortened_step(shown[0], RESUMED_STEPS)
    weights = torch.load(run / f"teacher_backbone_step{RESUMED_STEPS}.pth", weights_only=True)
    assert "cls_token" in weights and "blocks.0.attn.qkv.weight" in weights
    out = new_user.run(shortened_step(export[1], RESUMED_STEPS))
    assert out.startswith(f"wrote runs/demo/teacher_backbone_step{RESUMED_STEPS}_timm.pth: ")
    assert "timm.create_model('vit_small_patch16_224'" in out


# ---------------------------------------------------------------- every documented command


def _help_of(command: str) -> str:
    """The --help text of a command, produced in this process (nothing is run)."""
    from dino_dist.cli import attention, bench, export, knn, linear, plot, shard, submit, train

    show_help = {"train": train.parse_args, "knn": knn.parse_args, "linear": linear.parse_args,
                 "attention": attention.parse_args, "bench": bench.parse_args,
                 "submit": submit.parse_args, "export": export.main, "plot": plot.main,
                 "shard": shard.parse_args}[command]
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        show_help(["--help"])
    return text.getvalue()


def program_and_arguments(words: list[str]) -> tuple[str, list[str]] | None:
    """Which of our commands a documented line runs, and the words it gets; None for other
    programs (pip, pytest, tensorboard, the benchmark scripts, shell variables)."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value before the command
    if not words:
        return None
    head = words[0]
    if head.startswith("dino-"):
        return head[len("dino-"):], words[1:]
    if head == "torchrun":
        module = words[words.index("-m") + 1]
        name = "train" if module == "dino_dist.train" else module.rsplit(".", 1)[-1]
        return name, words[words.index("-m") + 2:]
    if head == "python" and len(words) > 1 and words[1] == "launch/submit.py":
        return "submit", words[2:]
    if head == "sbatch":
        return "train", words[words.index("slurm/train.sbatch") + 1:]
    return None


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for page in [README, *DOCS]:
        for _heading, lines in fenced_blocks(page.read_text(), "bash"):
            found += [(page.name, command) for command in commands(lines)]
    return found


def test_every_documented_command_has_its_options_and_its_config_loads():
    from dino_dist.config import load_config

    checked, helps = 0, {}
    for page, line in documented_commands():
        parsed = program_and_arguments(shlex.split(line, comments=True))
        if parsed is None:
            continue
        name, words = parsed
        words = [w for w in words if w != "..."]
        if name not in helps:
            helps[name] = _help_of(name)
        for word in words:
            if word.startswith("--"):
                option = word.split("=", 1)[0]
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[name]), \
                    f"{page}: {option} is not an option of {name}: {line}"
        if name in ("train", "submit"):
            config = words[words.index("--config") + 1] if "--config" in words else None
            if config is not None:
                assert (REPO / config).is_file(), f"{page}: no config {config}: {line}"
            overrides = [w for w in words if "=" in w and not w.startswith("-")]
            load_config(str(REPO / config) if config else None, overrides)
        checked += 1
    assert checked >= 20, f"only {checked} documented commands found"


# ---------------------------------------------------------------- links between the pages


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    found = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_link_between_the_pages_arrives():
    for page in [README, *DOCS]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target} does not exist"
            if anchor:
                assert anchor in anchors(linked.read_text()), \
                    f"{page.name}: no heading for #{anchor} in {linked.name}"
