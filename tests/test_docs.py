"""Every ```python and ```bash example of README.md and docs/*.md runs as written, so the docs cannot rot.

Each Markdown file runs in a fresh temporary folder (the repository's `examples/` and `benchmarks/` linked in, as
in a checkout), its blocks in document order, in one fresh Python process: the Python blocks share one namespace
(a later block may use an earlier block's names and files), the bash blocks run through `bash -e -o pipefail`
with the venv running the tests first on PATH (so `saelab` and `torchrun` are its commands) and this checkout's
saelab on PYTHONPATH. Nothing may reach a hub (HF_HUB_OFFLINE=1). A block that fails fails its file's test,
naming the block's file and line.

HTML comment lines right before a block's opening fence (invisible on GitHub) adapt it to the test:

    <!-- test: skip (REASON) -->                  the block is not run; it shows up as a skipped test with its reason
    <!-- test: append FLAGS -->                   FLAGS are appended to every saelab command of the block (not to
                                                  `--help` lines), e.g. a tiny budget for a run that takes minutes
    <!-- test: append saelab eval: FLAGS -->      ... only to the block's commands that contain this text from the
                                                  start of a word on (`saelab train --config examples/smollm2_e2e`,
                                                  `torchrun`; `$(which saelab)` counts as `saelab`)

Several lines may precede one block. An `append` that matches no command of its block, an unknown directive, a
directive that is not right before a fence, and a fence without a language are errors. The pages in SLOW_DOCS
train on the real model for minutes: they run with `pytest -m slow`. Output shown for
illustration goes in ```text blocks, which are not run (nor are yaml, json and other languages').
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_LANGUAGES = ("python", "bash")
OTHER_LANGUAGES = ("text", "yaml", "json")
MAX_SKIPS = 10  # skipping is for what cannot run here (uploads, several nodes, GPUs, installing): keep it rare
TIMEOUT = 900  # seconds per file

FENCE = re.compile(r"^```(?P<language>\S*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*test:\s*(?P<body>.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip\s+\((?P<reason>.+)\)$")
APPEND = re.compile(r"^append\s+(?:(?P<command>[^-:][^:]*?):\s+)?(?P<flags>--.+)$")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None = None
    appends: list[tuple[str, str]] = field(default_factory=list)  # (command prefix, flags)

    @property
    def where(self) -> str:
        return f"{_id(self.path)}:{self.line}"


def _id(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def parse(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file with the test directives right above them."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    pending: list[tuple[int, str]] = []  # directives waiting for their fence
    inside: Block | None = None
    for number, line in enumerate(lines, start=1):
        if inside is not None:
            if line.strip() == "```":
                blocks.append(inside)
                inside = None
            else:
                inside.code += line + "\n"
            continue
        fence = FENCE.match(line)
        directive = DIRECTIVE.match(line)
        if directive:
            pending.append((number, directive["body"]))
        elif fence:
            language = fence["language"]
            where = f"{_id(path)}:{number}"
            if language not in RUN_LANGUAGES + OTHER_LANGUAGES:
                raise ValueError(
                    f"{where}: a fence needs one of the languages {RUN_LANGUAGES + OTHER_LANGUAGES} "
                    f"(```text for output shown for illustration), got {language!r}"
                )
            inside = Block(path, number, language, "")
            for at, body in pending:
                apply_directive(inside, body, f"{_id(path)}:{at}")
            pending = []
        elif pending:
            at = pending[0][0]
            raise ValueError(f"{_id(path)}:{at}: a test directive must be right before a code fence")
    if inside is not None:
        raise ValueError(f"{inside.where}: unclosed code fence")
    if pending:
        raise ValueError(f"{_id(path)}:{pending[0][0]}: a test directive must be right before a fence")
    return blocks


def apply_directive(block: Block, body: str, where: str) -> None:
    skip, append = SKIP.match(body), APPEND.match(body)
    if block.language not in RUN_LANGUAGES:
        raise ValueError(f"{where}: test directives apply to python and bash blocks, not {block.language}")
    if skip:
        block.skip = skip["reason"].strip()
    elif append and block.language == "bash":
        block.appends.append(((append["command"] or "saelab").strip(), append["flags"].strip()))
    elif append:
        raise ValueError(f"{where}: `append` adds flags to shell commands; write small budgets into Python examples")
    else:
        raise ValueError(f"{where}: unknown test directive {body!r}; use `skip (reason)` or `append [command:] FLAGS`")


def _comment_start(line: str) -> int:
    """Index of an unquoted shell comment (` #`) in a line, or its length."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return len(line)


def commands_with_appends(block: Block) -> str:
    """The bash block's code with each `append` directive's flags added to the commands it names."""
    if not block.appends:
        return block.code
    logical: list[str] = []  # lines joined across trailing backslashes
    for line in block.code.splitlines():
        if logical and logical[-1].endswith("\\"):
            logical[-1] = logical[-1][:-1].rstrip() + " " + line.strip()
        else:
            logical.append(line)
    used = [False] * len(block.appends)
    out = []
    for line in logical:
        cut = _comment_start(line)
        command, comment = line[:cut].rstrip(), line[cut:]
        words = " " + command.replace("$(which saelab)", "saelab")
        flags = []
        if command.strip() and "--help" not in command.split():
            for i, (prefix, extra) in enumerate(block.appends):
                if f" {prefix}" in words:  # the prefix starts at a word: `saelab train --config examples/x`
                    flags.append(extra)
                    used[i] = True
        out.append(" ".join([command, *flags]) + ("  " + comment if comment else "") if flags else line)
    for (prefix, extra), hit in zip(block.appends, used, strict=True):
        if not hit:
            raise ValueError(f"{block.where}: `append {prefix}: {extra}` matches no command of the block")
    return "\n".join(out) + "\n"


DRIVER = r"""
import json, subprocess, sys, time
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    print(f"\n===== {block['where']} ({block['language']})", flush=True)
    start = time.perf_counter()
    if block["language"] == "python":
        # padded so that a traceback names the block's real line in the Markdown file
        exec(compile("\n" * block["line"] + block["code"], block["path"], "exec"), namespace)
    else:
        code = subprocess.run(["bash", "-e", "-x", "-o", "pipefail", "-c", block["code"]]).returncode
        if code:
            sys.exit(f"===== FAILED: the bash block at {block['where']} exited with {code}")
    print(f"===== {block['where']} took {time.perf_counter() - start:.1f} s", flush=True)
"""


def doc_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        MPLBACKEND="Agg",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_file(path: Path, folder: Path) -> subprocess.CompletedProcess:
    for name in ("examples", "benchmarks"):
        (folder / name).symlink_to(REPO / name)
    blocks = [
        {
            "where": b.where,
            "path": _id(b.path),
            "line": b.line,
            "language": b.language,
            "code": commands_with_appends(b) if b.language == "bash" else b.code,
        }
        for b in parse(path)
        if b.language in RUN_LANGUAGES and b.skip is None
    ]
    plan = folder.parent / f"{folder.name}-blocks.json"
    plan.write_text(json.dumps(blocks))
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(plan)],
        cwd=folder,
        env=doc_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
    )


SLOW_DOCS = {"docs/training.md", "docs/analysis.md", "docs/cli.md", "docs/evaluation.md"}
SLOW_DOCS |= {f"docs/eval-{name}.md" for name in ("absorption", "autointerp", "geometry", "probing")}  # the real
# model, minutes each; tests/test_eval_*.py cover the same code on tiny models, and README's suite example runs fast
"""Pages whose examples train and evaluate on the real model for minutes each: run with `pytest -m slow`."""


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=[pytest.mark.slow] if _id(p) in SLOW_DOCS else []) for p in DOC_FILES], ids=_id
)
def test_examples_run(path, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    result = run_file(path, folder)
    assert result.returncode == 0, f"an example of {_id(path)} failed:\n{result.stdout[-8000:]}"


def _parsed_or_empty(path: Path) -> list[Block]:
    """For collection: a file that does not parse yields nothing here and fails test_examples_run instead."""
    try:
        return parse(path)
    except ValueError:
        return []


def _skipped_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in _parsed_or_empty(path) if b.skip is not None]


@pytest.mark.parametrize("block", _skipped_blocks(), ids=lambda b: b.where)
def test_skipped_example(block):
    """Each skipped block is reported, with its reason, among pytest's skips (-rs)."""
    pytest.skip(f"{block.where} is not run: {block.skip}")


def test_docs_skip_few_examples():
    skipped = _skipped_blocks()
    runnable = [b for path in DOC_FILES for b in parse(path) if b.language in RUN_LANGUAGES]
    assert len(skipped) <= MAX_SKIPS, [b.where for b in skipped]
    assert len(runnable) - len(skipped) >= 3 * len(skipped)


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m[1]) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("path", DOC_FILES, ids=_id)
def test_links_resolve(path):
    """Relative links and images point at files that exist, and #anchors at headings of those files."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    broken = []
    for match in LINK.finditer(text):
        target = match["target"]
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            if resolved != (REPO / "docs" / "design.md"):  # written separately (issue 17)
                broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{_id(path)}: broken links {broken}"


def test_directives_are_checked(tmp_path):
    """The directive parser refuses what would silently not be tested."""

    def blocks_of(text: str) -> list[Block]:
        doc = tmp_path / "probe.md"
        doc.write_text(text)
        return parse(doc)

    with pytest.raises(ValueError, match="languages"):
        blocks_of("```\nsaelab train\n```\n")
    with pytest.raises(ValueError, match="unknown test directive"):
        blocks_of("<!-- test: skip -->\n```bash\nsaelab train\n```\n")
    with pytest.raises(ValueError, match="right before"):
        blocks_of("<!-- test: skip (x) -->\n\n```bash\nsaelab train\n```\n")
    block = blocks_of(
        "<!-- test: append saelab eval: --n_contexts 4 -->\n"
        "```bash\nsaelab train --out_dir a   # trains\nsaelab eval a/sae  # evaluates\n```\n"
    )[0]
    expected = "saelab train --out_dir a   # trains\nsaelab eval a/sae --n_contexts 4  # evaluates\n"
    assert commands_with_appends(block) == expected
    block = blocks_of("<!-- test: append torchrun: --x 1 -->\n```bash\nsaelab train\n```\n")[0]
    with pytest.raises(ValueError, match="matches no command"):
        commands_with_appends(block)
    block = blocks_of(
        "<!-- test: append --a 1 -->\n```bash\ntorchrun -n 2 $(which saelab) train \\\n    --b 2\n"
        "saelab train --help\n```\n"
    )[0]
    assert commands_with_appends(block) == "torchrun -n 2 $(which saelab) train --b 2 --a 1\nsaelab train --help\n"
