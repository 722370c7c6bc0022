"""The README's commands are real: every `pneumonia-kfp ...`, `make ...` and benchmark command it shows
uses a subcommand, flags, make targets and make variables that exist; its table of contents reaches every
section. Nothing is run: the CLI's argparse parser, the benchmarks' parsers and the Makefile are inspected."""
import argparse
import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"

FLAG = re.compile(r"^--?[A-Za-z][\w-]*")
ENV_PREFIX = r"(?:[A-Z][A-Z0-9_]*=\S+\s+)*"
CLI = re.compile(rf"^{ENV_PREFIX}(?:\.venv/bin/)?pneumonia-kfp\s+(?P<rest>.*)$")
MAKE = re.compile(rf"^{ENV_PREFIX}make\s+(?P<rest>.*)$")
BENCHMARK = re.compile(rf"^{ENV_PREFIX}(?:\.venv/bin/)?python3?\s+(?P<script>benchmarks/\S+)(?P<rest>.*)$")


def code_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, text, inline?) of every line in a fenced or indented code block, and every inline code span
    (one that goes on over a line break is joined: it counts from the line it starts on)."""
    out: list[tuple[int, str, bool]] = []
    fenced, indented, previous_blank = False, False, True
    open_span, open_n = "", 0  # an inline span not yet closed at the end of its line
    for n, line in enumerate(text.splitlines(), 1):
        if open_span and not line.strip():
            open_span = ""  # a paragraph ends: an unclosed backtick was a literal one
        if line.lstrip().startswith("```"):
            fenced = not fenced
            indented = False
            previous_blank = False
            continue
        if fenced:
            out.append((n, line, False))
            continue
        if indented and not line.strip():
            pass  # a blank line inside an indented block
        elif line.startswith("    ") and (indented or previous_blank):
            indented = True
            out.append((n, line, False))
        else:
            indented = False
            if open_span:
                if "`" not in line:
                    open_span += " " + line.strip()
                    continue
                closing, line = line.split("`", 1)
                out.append((open_n, open_span + " " + closing.strip(), True))
                open_span = ""
            out.extend((n, span, True) for span in re.findall(r"`([^`]+)`", line))
            if line.count("`") % 2:
                open_span, open_n = line.rsplit("`", 1)[1].strip(), n
        previous_blank = not line.strip()
    return out


def commands(text: str) -> list[tuple[int, str]]:
    """Each command once, comments dropped, with its continuation lines (a trailing backslash, or a line that
    goes on with `[--flag` / `--flag`, as the Reference's synopsis does) joined on."""
    joined: list[list] = []
    last = None  # the line number of the block line the last command ended on
    for n, line, inline in code_lines(text):
        body = line.strip() if inline else re.sub(r"(^|\s)#.*$", "", line).strip()
        if not body:
            continue
        if (not inline and last == n - 1 and joined
                and (joined[-1][1].endswith("\\") or re.match(r"^\[?--?[A-Za-z]", body))):
            joined[-1][1] = joined[-1][1].rstrip("\\").rstrip() + " " + body
        else:
            joined.append([n, body])
        last = None if inline else n
    return [(n, body) for n, body in joined]


def flags_of(rest: str) -> list[str]:
    """The option strings a command line uses (placeholders' brackets and alternatives stripped)."""
    found = []
    for token in rest.split():
        token = token.strip("[](){}'\"")
        m = FLAG.match(token)
        if m and not re.match(r"^-\d", token):
            found.append(m.group(0))
    return found


def option_strings(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings}


def cli_subcommands() -> dict[str, set[str]]:
    from pneumonia_kfp.pipelines.cli import parser

    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: option_strings(sub) for name, sub in action.choices.items()}
    raise AssertionError("pneumonia-kfp's parser has no subcommands")


def makefile_targets_and_variables() -> tuple[set[str], set[str]]:
    text = MAKEFILE.read_text()
    targets = set()
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.$()/-][^:=#\t]*?)\s*:(?![=:])", line)
        if m and not line.startswith("\t"):
            targets.update(m.group(1).split())
    variables = set(re.findall(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]", text))
    return targets, variables


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def benchmark_options(script: Path, monkeypatch) -> set[str]:
    """The options of a benchmark's argparse parser: its main() runs until parse_args, which stops it."""
    module = runpy.run_path(str(script), run_name="readme_check")

    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        try:
            module["main"]()
        except _Parsed as parsed:
            return option_strings(parsed.parser)
    raise AssertionError(f"{script}: main() never parsed its arguments")


def check_cli(line: str, rest: str, subcommands: dict[str, set[str]], seen: set[str]) -> list[str]:
    words = rest.split()
    if not words or words[0].startswith("<") or words[0].endswith(":"):
        return []  # `pneumonia-kfp <command> --help`, a run's name, or an error message quoted
    name = words[0]
    if name not in subcommands:
        return [f"{line}\n    no subcommand {name!r} (there are {sorted(subcommands)})"]
    seen.add(name)
    unknown = [f for f in flags_of(" ".join(words[1:])) if f not in subcommands[name]]
    return [f"{line}\n    `pneumonia-kfp {name}` has no {', '.join(unknown)}"] if unknown else []


def check_make(line: str, rest: str, targets: set[str], variables: set[str], seen: set[str]) -> list[str]:
    words = [w.strip("[]") for w in shlex.split(rest.replace("'", ""))]
    goals = [w for w in words if w and "=" not in w and not w.startswith("-")]
    assigned = [w.split("=", 1)[0] for w in words if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)]
    seen.update(goals)
    return ([f"{line}\n    the Makefile has no target {goal!r}" for goal in goals if goal not in targets]
            + [f"{line}\n    the Makefile does not use {var}" for var in assigned if var not in variables])


def check_benchmark(line: str, script: str, rest: str, parsed: dict[str, set[str]], monkeypatch) -> list[str]:
    if not (ROOT / script).is_file():
        return [f"{line}\n    no {script}"]
    if script not in parsed:
        parsed[script] = benchmark_options(ROOT / script, monkeypatch)
    unknown = [f for f in flags_of(rest) if f not in parsed[script]]
    return [f"{line}\n    {script} has no {', '.join(unknown)}"] if unknown else []


def test_every_readme_command_exists(monkeypatch):
    """All stale commands at once: `pneumonia-kfp <subcommand>` and its flags against the CLI's parser,
    `make <target> VAR=...` against the Makefile, `.venv/bin/python benchmarks/X.py --flags` against X's parser."""
    subcommands = cli_subcommands()
    targets, variables = makefile_targets_and_variables()
    parsed: dict[str, set[str]] = {}
    stale, seen = [], {"cli": set(), "make": set(), "benchmark": set()}
    for n, line in commands(README.read_text()):
        if m := CLI.match(line):
            problems = check_cli(line, m.group("rest"), subcommands, seen["cli"])
        elif m := MAKE.match(line):
            problems = check_make(line, m.group("rest"), targets, variables, seen["make"])
        elif m := BENCHMARK.match(line):
            seen["benchmark"].add(m.group("script"))
            problems = check_benchmark(line, m.group("script"), m.group("rest"), parsed, monkeypatch)
        else:
            continue
        stale += [f"README.md:{n}: {problem}" for problem in problems]
    assert not stale, f"{len(stale)} stale command(s) in README.md:\n" + "\n".join(stale)
    # the extraction itself works: the README's main commands are among what it found
    assert {"run-local", "evaluate", "ingest", "compile", "submit", "gc", "verify"} <= seen["cli"], seen
    assert {"run", "test", "image", "base-image", "lint", "mutation"} <= seen["make"], seen
    # every benchmark is shown
    assert seen["benchmark"] == {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")}, seen


REPO_DIRS = "benchmarks|components|docs|images|manifests|pipelines|pneumonia_kfp|scripts|tests"
REPO_PATH = re.compile(rf"(?<![\w/.-])(?:\.\./)?((?:{REPO_DIRS})/[\w./-]*\w)")
NOT_PATHS = {"images/s"}  # the unit, images per second


def test_every_path_the_readme_names_exists():
    """Files and folders of this repository the README names (in commands and prose) exist, all missing at once."""
    missing = sorted({(n, path) for n, line in enumerate(README.read_text().splitlines(), 1)
                      for path in REPO_PATH.findall(line) if path not in NOT_PATHS and not (ROOT / path).exists()})
    missing += sorted({(n, link) for n, line in enumerate(README.read_text().splitlines(), 1)
                       for link in re.findall(r"\]\(([^)#:]+)\)", line) if not (ROOT / link).exists()})
    assert not missing, "README.md names paths that do not exist: " + ", ".join(f"{p} (line {n})" for n, p in missing)


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation other than - and _ dropped, spaces become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str, str]]:
    """(level, title, anchor) of every heading outside code blocks, duplicates numbered as GitHub does."""
    found, used, fenced = [], {}, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not (m := re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)):
            continue
        anchor = github_anchor(m.group(2))
        count = used.get(anchor, 0)
        used[anchor] = count + 1
        found.append((len(m.group(1)), m.group(2), anchor if count == 0 else f"{anchor}-{count}"))
    return found


def test_table_of_contents_reaches_every_section():
    text = README.read_text()
    sections = headings(text)
    anchors = {anchor for _, _, anchor in sections}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    dangling = [a for a in links if a not in anchors]
    toc = text[text.index("## Contents"):]
    toc = toc[:toc.index("\n## ", 1)]
    listed = re.findall(r"\]\(#([^)]+)\)", toc)
    missing = [(level, title) for level, title, anchor in sections
               if level in (2, 3) and anchor not in listed and title != "Contents"]
    assert not (dangling or missing), f"links to no heading: {dangling}; the table of contents lacks {missing}"


@pytest.mark.parametrize("text, expected", [
    ("Run every task in the image: `--runner docker`", "run-every-task-in-the-image---runner-docker"),
    ("1. Build and push the image", "1-build-and-push-the-image"),
    ("Decision thresholds (`--threshold-rule`)", "decision-thresholds---threshold-rule"),
])
def test_github_anchor(text, expected):
    assert github_anchor(text) == expected


def test_the_step_names_the_readme_gives_are_the_compiled_ones(tmp_path):
    """Section 7 tells users what to click in the KFP UI: the task names of the compiled YAML, no other."""
    import yaml

    from pneumonia_kfp.pipelines.cli import main

    assert main(["compile", "-o", str(tmp_path / "p.yaml")]) == 0
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    compiled = set()
    for dag in [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]:
        compiled |= {t["taskInfo"]["name"] for t in dag["tasks"].values()}
    text = README.read_text()
    section = text[text.index("### 7. Find the run"):]
    section = section[:section.index("\n## ", 1)]
    named = {m for m in re.findall(r"`([a-z][a-z0-9-]*)`", section) if m.endswith("-op") or m.startswith("for-loop")
             or m == "train-and-evaluate" or m.startswith("condition")}
    steps = {name for name in compiled if not name.startswith("condition")}
    assert named <= compiled, f"README names steps the compiled pipeline lacks: {sorted(named - compiled)}"
    assert steps <= named, f"README section 7 does not name the compiled steps {sorted(steps - named)}"


def test_the_layout_names_every_module():
    """A module added without a word in the README's Layout is a module the next engineer cannot find."""
    text = README.read_text()
    layout = text[text.index("## Layout"):]
    missing = [f"{folder}/{path.name}" for folder in ("pneumonia_kfp", "components", "pipelines")
               for path in sorted((ROOT / folder).glob("*.py"))
               if path.stem != "__init__" and not re.search(rf"\b{path.stem}\b", layout)]
    assert not missing, f"README's Layout does not name {missing}"
