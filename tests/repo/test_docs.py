"""The README and the docs/ pages cannot drift from the project: the README reads in five
minutes and links every page; every relative link and image resolves (a `#anchor` to a heading
by GitHub's slug rule); external links use https; every command they show names modules,
scripts, repository files, params keys and presets that exist, and only flags its CLI's
`--help` lists; and every `pipeline.x.y` / `pipeline/x.py` in backticks exists.

What counts as a command: each line of a ```bash / ```sh / ```shell / ```console block (lines
ending in `\\` joined, a quote left open continued, `# comments`, a leading `$ ` and here-doc
bodies dropped), and each inline `code` span that starts like one (`uv run`, `python`, `dvc`,
`torchrun`, `bash`, `bench/<script>.py ...`, `pipeline.<name> --flag`). Files are checked only
under bench/, pipeline/, tests/ and .ci/, plus params.yaml and dvc.yaml: outputs (data/,
models/, reports/), placeholders (`<name>`, `/path/to`, `...`) and files a command creates are
not. The helpers import only the standard library and yaml."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MAX_README_LINES = 200
SHELLS = {"bash", "sh", "shell", "console"}
CHECKED_PREFIXES = ("bench/", "pipeline/", "tests/", ".ci/")
CHECKED_FILES = {"params.yaml", "dvc.yaml"}
PLACEHOLDER = "PLACEHOLDER"


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md page."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def rel(path: Path, root: Path = ROOT) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# --- Markdown: fenced blocks, prose, code spans, links, headings --------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # of its first content line
    lines: tuple[str, ...]


FENCE = re.compile(r"^(\s*)(```|~~~)\s*([\w+-]*)")


def split_fences(text: str) -> tuple[str, list[Block]]:
    """The prose (fenced lines blanked, so line numbers hold) and the fenced blocks."""
    prose: list[str] = []
    blocks: list[Block] = []
    fence: tuple[str, str, str, int] | None = None  # indent, marker, lang, first line
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = (match.group(1), match.group(2), match.group(3).lower(), number + 1)
            body = []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence[1]):
            blocks.append(Block(fence[2], fence[3], tuple(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            indent = fence[0]
            body.append(line[len(indent) :] if line.startswith(indent) else line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


CODE_SPAN = re.compile(r"`([^`]+?)`")


def code_spans(prose: str) -> list[tuple[int, str]]:
    """Inline code spans of the prose (one may wrap a line, not a paragraph): (line, text)."""
    spans = []
    for match in CODE_SPAN.finditer(prose):
        if "\n\n" not in match.group(1):
            spans.append((prose.count("\n", 0, match.start()) + 1, match.group(1)))
    return spans


def without_code(prose: str) -> str:
    """The prose with its code spans blanked (same length: offsets and lines hold)."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)


LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[tuple[int, str]]:
    """Every [text](target) and ![alt](target) outside code: (line, target)."""
    prose = without_code(split_fences(text)[0])
    return [(prose.count("\n", 0, m.start()) + 1, m.group(2)) for m in LINK.finditer(prose)]


HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax to its text, lowercase, punctuation other than
    `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated one gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for line in split_fences(text)[0].splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links and images of `path` whose file (or folder) is missing, that leave the
    repository, or whose #anchor is not a heading of the target."""
    problems = []
    text = path.read_text()
    for line, target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        name, _, anchor = target.partition("#")
        dest = (path.parent / name).resolve() if name else path.resolve()
        where = f"{rel(path, root)}:{line}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no such file or folder")
        elif not dest.is_relative_to(root.resolve()):
            problems.append(f"{where}: outside the repository")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            problems.append(f"{where}: no heading #{anchor} in {rel(dest, root.resolve())}")
    return problems


HTTP = re.compile(r"http://([^\s)\"'`]*)")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "<host>", "0.0.0.0")


def insecure_links(path: Path, root: Path = ROOT) -> list[str]:
    """http:// links and bare URLs in the prose that are not this machine's examples."""
    text = path.read_text()
    prose = without_code(split_fences(text)[0])
    targets = [(line, t) for line, t in links(text) if t.startswith("http://")]
    targets += [(prose.count("\n", 0, m.start()) + 1, m.group(0)) for m in HTTP.finditer(prose)]
    return sorted(
        {
            f"{rel(path, root)}:{line}: {url}: use https://"
            for line, url in targets
            if not url.removeprefix("http://").startswith(LOCAL_HOSTS)
        }
    )


# --- Commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str


def strip_comments(text: str) -> str:
    """Shell comments out: a `#` that starts a word outside quotes, to the end of its line."""
    out: list[str] = []
    quote = ""
    comment = False
    for i, char in enumerate(text):
        if comment:
            if char == "\n":
                comment = False
                out.append(char)
            continue
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"" and (i == 0 or text[i - 1] != "\\"):
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            comment = True
            continue
        out.append(char)
    return "".join(out)


def tokens(command: str) -> list[str]:
    """Shell words and operators (`&&`, `|`, `;`, `>`, ...); `<placeholders>` become one word."""
    command = re.sub(r"<[A-Za-z][^<>\n]*?>", PLACEHOLDER, strip_comments(command))
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")


def block_commands(lines: tuple[str, ...]) -> list[tuple[int, str]]:
    """A shell block's logical command lines: (offset of the first line, text)."""
    found: list[tuple[int, str]] = []
    buffer, start, heredoc = "", 0, ""
    for offset, raw in enumerate(lines):
        if heredoc:
            heredoc = "" if raw.strip() == heredoc else heredoc
            continue
        line = raw[2:] if raw.startswith("$ ") else raw
        if not buffer:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = offset
        buffer = f"{buffer}\n{line}" if buffer else line
        if buffer.rstrip().endswith("\\"):
            buffer = buffer.rstrip()[:-1] + " "
            continue
        try:
            tokens(buffer)
        except ValueError:  # a quote left open: the command goes on
            continue
        found.append((start, " ".join(strip_comments(buffer).split())))
        match = HEREDOC.search(strip_comments(buffer))
        heredoc = match.group(1) if match else ""
        buffer = ""
    if buffer:
        found.append((start, " ".join(strip_comments(buffer).split())))
    return found


INLINE_COMMAND = re.compile(r"^(uv run |\.uv/bin/uv run |python3? |dvc |torchrun |bash )")


def commands(path: Path, root: Path = ROOT) -> list[Command]:
    """Every command of a Markdown file: the shell blocks' lines and the inline commands."""
    doc = rel(path, root)
    prose, blocks = split_fences(path.read_text())
    found = [
        Command(doc, block.line + offset, text)
        for block in blocks
        if block.lang in SHELLS
        for offset, text in block_commands(block.lines)
    ]
    for line, span in code_spans(prose):
        span = " ".join(span.split())
        if re.match(r"^bench/\w+\.py( |$)", span):
            span = f"python {span}"
        elif re.match(r"^pipeline(\.\w+)+ -", span):
            span = f"python -m {span}"
        if INLINE_COMMAND.match(span):
            found.append(Command(doc, line, span))
    return found


@dataclass
class Call:
    """One simple command of a command line, its wrappers (`uv run`, `sudo`, VAR=x) removed."""

    words: list[str]

    @property
    def cli(self) -> tuple[str, ...] | None:
        """How Python runs it: ('-m', module) or (script,), for pipeline/ and bench/ only."""
        words = self.words
        if words and words[0] == "torchrun" and "-m" in words:
            words = ["python", *words[words.index("-m") :]]
        if len(words) < 2 or not re.fullmatch(r"python(3(\.\d+)?)?", words[0]):
            return None
        if words[1] == "-m" and len(words) > 2 and words[2].split(".")[0] in ("pipeline", "bench"):
            return None if PLACEHOLDER in words[2] else ("-m", words[2])
        if words[1].endswith(".py") and words[1].startswith("bench/"):
            return (words[1],)
        return None

    @property
    def args(self) -> list[str]:
        """The CLI's arguments, up to a bare `--` (what follows is passed on)."""
        cli = self.cli
        if cli is None:
            return []
        words = self.words
        if words[0] == "torchrun":
            words = words[words.index("-m") - 1 :]
        rest = words[1 + len(cli) :]
        return rest[: rest.index("--")] if "--" in rest else rest

    @property
    def flags(self) -> list[str]:
        return sorted(
            {w.strip("[]").split("=")[0] for w in self.args if w.strip("[]").startswith("--")}
        )

    @property
    def positional(self) -> str | None:
        args = self.args
        return args[0] if args and not args[0].startswith("-") else None


SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")", "{", "}", "!"}


def calls(command: str) -> list[Call]:
    """The simple commands of a command line."""
    found: list[list[str]] = [[]]
    words = tokens(command)
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in SEPARATORS or set(word) <= set(";&|()") and word:
            found.append([])
        elif set(word) <= set("<>&") and ("<" in word or ">" in word):
            skip = True  # a redirection: its target is no argument
        else:
            found[-1].append(word)
    out = []
    for call in found:
        while call and (re.match(r"^[A-Za-z_]\w*=", call[0]) or call[0] in ("export", "time")):
            call = call[1:]
        if call[:1] == ["sudo"]:
            call = call[3:] if call[1:2] == ["-u"] else call[1:]
        if call[:2] in (["uv", "run"], [".uv/bin/uv", "run"]):
            call = call[2:]
        if call:
            out.append(Call(call))
    return out


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file `python -m name` runs: name.py, or name/__main__.py for a package."""
    base = root.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return base / "__main__.py" if (base / "__main__.py").is_file() else None


def param_problem(key: str, params: dict) -> str | None:
    """Why `-S key=...` would not set an existing key of params.yaml (None: it would). Hydra's
    `+key` adds a key: only its parent must exist."""
    if ":" in key and key.split(":", 1)[0].endswith((".yaml", ".yml")):
        key = key.split(":", 1)[1]
    adding = key.startswith("+")
    parts = key.lstrip("+~").split(".")
    node: object = params
    for part in parts[:-1] if adding else parts:
        if not isinstance(node, dict):
            return f"{key}: not a key of params.yaml"
        hit = part if part in node else int(part) if part.isdigit() and int(part) in node else None
        if hit is None:
            return f"{key}: not a key of params.yaml"
        node = node[hit]
    return None


def set_params(call: Call) -> list[str]:
    """The keys `dvc exp run -S key=value` / `--set-param key=value` sets."""
    words = call.words
    if words[:3] != ["dvc", "exp", "run"]:
        return []
    keys = []
    for i, word in enumerate(words):
        value = None
        if word in ("-S", "--set-param") and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(("-S=", "--set-param=")):
            value = word.split("=", 1)[1]
        if value is not None:
            keys.append(value.split("=", 1)[0])
    return keys


def is_checked_path(word: str) -> bool:
    return PLACEHOLDER not in word and (word.startswith(CHECKED_PREFIXES) or word in CHECKED_FILES)


def call_problems(call: Call, root: Path = ROOT) -> list[str]:
    """What in one simple command does not exist: module, script, file, params key, preset."""
    problems = []
    cli = call.cli
    words = call.words
    if cli is not None and cli[0] == "-m" and module_file(cli[1], root) is None:
        problems.append(f"{cli[1]}: no module (no .py, no package with __main__.py)")
    script = root / words[1] if words[0] in ("bash", "sh") and len(words) > 1 else None
    if script is not None and script.suffix == ".sh" and script.is_file():
        body = script.read_text()  # a shell script has no --help: its flags are in its text
        problems += [
            f"{words[1]}: {w}: not in the script"
            for w in words[2:]
            if w.startswith("--") and w.split("=")[0] not in body
        ]
    for word in words[1:]:
        for path in (word, word.split("=", 1)[1] if word.startswith("--") and "=" in word else ""):
            path = path.strip("[]")
            if path and is_checked_path(path) and not (root / path).exists():
                problems.append(f"{path}: no such file or folder")
    keys = [key for key in set_params(call) if PLACEHOLDER not in key]
    if keys:
        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
        problems += [why for key in keys if (why := param_problem(key, params))]
    presets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--preset"]
    tools = (("-m", "pipeline.preset"), ("-m", "pipeline.baseline"))
    if cli in tools and call.positional not in (None, "default"):
        presets.append(call.positional)
    for name in presets:
        if PLACEHOLDER not in name and not (root / "pipeline/presets" / f"{name}.yaml").is_file():
            problems.append(f"--preset {name}: no pipeline/presets/{name}.yaml")
    return problems


def command_problems(paths: list[Path], root: Path = ROOT) -> list[str]:
    """Every command of `paths` that names something missing, one line each."""
    out = []
    for path in paths:
        for command in commands(path, root):
            for call in calls(command.text):
                for problem in call_problems(call, root):
                    out.append(f"{command.doc}:{command.line}: `{command.text}`: {problem}")
    return out


# --- Names in backticks ------------------------------------------------------------------------

DOTTED = re.compile(r"(?<![\w./-])pipeline(?:\.[A-Za-z_]\w*)+")
SLASHED = re.compile(r"(?<![\w./-])(?:pipeline|bench)/[\w./-]*")


def name_problem(name: str, root: Path = ROOT) -> str | None:
    """Why `pipeline.x.y` names no module or package (None: it does; one trailing attribute
    is allowed and must be a word of that module's source)."""
    parts = name.split(".")
    for cut in range(len(parts), 1, -1):
        base = root.joinpath(*parts[:cut])
        source = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if source.is_file():
            rest = parts[cut:]
            if not rest:
                return None
            if len(rest) == 1 and re.search(rf"\b{re.escape(rest[0])}\b", source.read_text()):
                return None
            return f"{name}: {'.'.join(rest)} is not in {rel(source, root)}"
    return f"{name}: no such module"


def missing_names(path: Path, root: Path = ROOT) -> list[str]:
    """`pipeline.x.y` names and pipeline/ or bench/ paths in the prose's code spans that do not
    exist."""
    out = []
    for line, span in code_spans(split_fences(path.read_text())[0]):
        for name in DOTTED.findall(span):
            if why := name_problem(name, root):
                out.append(f"{rel(path, root)}:{line}: `{span}`: {why}")
        for found in SLASHED.findall(span):
            found = found.rstrip(".")
            if not (root / found).exists():
                out.append(f"{rel(path, root)}:{line}: `{span}`: {found}: no such file or folder")
    return out


# --- The tests ---------------------------------------------------------------------------------


def test_the_readme_reads_in_five_minutes():
    """The README holds at most 200 lines; the rest lives in docs/."""
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md: {lines} lines (at most {MAX_README_LINES})"


def test_every_docs_page_is_linked_from_the_readme():
    """A page nobody links is a page nobody reads."""
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for _, target in links((ROOT / "README.md").read_text())
    }
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ holds no page"
    unlinked = [rel(p) for p in pages if p.resolve() not in linked]
    assert not unlinked, f"README.md links none of {unlinked}"


def test_every_page_starts_with_a_title_and_a_summary_and_leads_back():
    """A docs page opens with `# Title`, a one-line summary, and a link back to the README."""
    problems = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        lines = page.read_text().splitlines()
        if not lines or not lines[0].startswith("# "):
            problems.append(f"{rel(page)}: does not start with a `# Title`")
        elif len(lines) < 3 or lines[1] or not lines[2].strip() or lines[2].startswith("#"):
            problems.append(f"{rel(page)}: no summary under its title")
        if not any(t.partition("#")[0] == "../README.md" for _, t in links(page.read_text())):
            problems.append(f"{rel(page)}: no link back to ../README.md")
    assert not problems, "\n".join(problems)


def test_every_relative_link_and_image_resolves():
    """Each relative link and image of the README and docs/ names a file or folder of the
    repository, and a `#anchor` names a heading of its Markdown target."""
    problems = [p for path in doc_files() for p in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_the_link_checker_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    """The checker itself: a missing file, a missing heading, and what passes."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code`: heading, here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#a-code-heading-here) [ok](#page)\n"
        "![gone](missing.png) [bad](other.md#nowhere) [web](https://example.org/x#y)\n"
        "`[not a link](in-code.md)`\n\n```bash\n[not a link either](in-block.md)\n```\n"
    )
    problems = broken_links(page, tmp_path)
    assert len(problems) == 2, problems
    assert "page.md:4: (missing.png): no such file or folder" in problems[0]
    assert "no heading #nowhere in other.md" in problems[1]


def test_external_links_use_https():
    """http:// only for this machine's examples (127.0.0.1, localhost)."""
    problems = [p for path in doc_files() for p in insecure_links(path)]
    assert not problems, "\n".join(problems)


def test_every_command_names_what_exists():
    """Each command of the README and docs/ runs a module or script that exists, names files
    under bench/ pipeline/ tests/ .ci/ (and params.yaml, dvc.yaml) that exist, sets only keys
    params.yaml has (`dvc exp run -S key=value`), and names presets pipeline/presets/ holds."""
    found = [c for path in doc_files() for c in commands(path)]
    assert len(found) > 20, f"only {len(found)} commands found: the collector is broken"
    problems = command_problems(doc_files())
    assert not problems, "\n".join(problems)


def test_the_command_checker_sees_what_does_not_exist(tmp_path):
    """The checker itself: a missing module, script, file, params key and preset are named,
    with the doc, its line and the command; placeholders and outputs are not checked."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```bash\n"
        "uv run python -m pipeline.nothing --x  # a comment's quote\n"
        "uv run dvc exp run -S lr=0.1 -S no.such.key=1 \\\n  -S '+dataset.folder.mapping.128=2'\n"
        "uv run python bench/nothing.py --preset no-such-preset\n"
        "cat pipeline/nothing.yaml data/raw/whatever.png > reports/out.md\n"
        "cat > x.ini <<'EOF'\npython -m pipeline.in_a_heredoc\nEOF\n"
        "uv run python -m pipeline.preset <preset> --source /path/to/DRIVE.zip\n"
        "```\n\nThen `uv run python -m pipeline.plan` and `dvc exp run -S <key>=<value>`.\n"
    )
    problems = command_problems([page], ROOT)
    culprits = [
        "page.md:4: `uv run python -m pipeline.nothing --x`: pipeline.nothing: no module",
        "page.md:5: ",
        "no.such.key: not a key of params.yaml",
        "page.md:7: `uv run python bench/nothing.py --preset no-such-preset`: bench/nothing.py: "
        "no such file or folder",
        "--preset no-such-preset: no pipeline/presets/no-such-preset.yaml",
        "page.md:8: `cat pipeline/nothing.yaml",
    ]
    for culprit in culprits:
        assert any(culprit in p for p in problems), (culprit, problems)
    assert len(problems) == 5, problems


_HELP: dict[tuple[str, ...], str] = {}


def help_text(argv: tuple[str, ...]) -> str:
    """`python <argv> --help`, once per argv, from the repository root."""
    if argv not in _HELP:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.run(
            [sys.executable, *argv, "--help"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        _HELP[argv] = proc.stdout if proc.returncode == 0 else f"FAILED: {proc.stderr[-2000:]}"
    return _HELP[argv]


@pytest.mark.slow
def test_every_flag_of_a_documented_command_is_in_its_help():
    """Each `--flag` a doc gives a `python -m pipeline.X` or `bench/X.py` command appears in
    that CLI's `--help` (a subcommand's, e.g. `bench/results.py run --help`, when the command
    names one)."""
    problems = []
    for path in doc_files():
        for command in commands(path):
            for call in calls(command.text):
                if call.cli is None or not call.flags:
                    continue
                argv = call.cli
                top = help_text(argv)
                if top.startswith("FAILED"):
                    problems.append(f"{command.doc}:{command.line}: {' '.join(argv)} --help {top}")
                    continue
                choices = {
                    c for group in re.findall(r"\{([\w,-]+)\}", top) for c in group.split(",")
                }
                if call.positional in choices:
                    argv = (*argv, call.positional)
                text = help_text(argv)
                for flag in call.flags:
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                        problems.append(
                            f"{command.doc}:{command.line}: `{command.text}`: {flag}: not in "
                            f"`{' '.join(argv)} --help`"
                        )
    assert not problems, "\n".join(problems)


def test_module_names_and_paths_in_backticks_exist():
    """`pipeline.x.y` (a module or package, plus at most one attribute it defines) and
    `pipeline/...` or `bench/...` paths in the docs' code spans exist."""
    problems = [p for path in doc_files() for p in missing_names(path)]
    assert not problems, "\n".join(problems)


def test_the_name_checker_sees_a_missing_module_attribute_and_path(tmp_path):
    """The checker itself."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n`pipeline.report.tables` `pipeline.autoconf.rules`\n"
        "`pipeline/presets/<name>.yaml`\n"
        "`pipeline.nowhere` `pipeline.core.config.no_such_attribute` `bench/nothing.py`\n"
    )
    problems = missing_names(page, ROOT)
    assert len(problems) == 3, problems
    assert "page.md:5: `pipeline.nowhere`: pipeline.nowhere: no such module" in problems[0]
    assert "no_such_attribute is not in pipeline/core/config.py" in problems[1]
    assert "bench/nothing.py: no such file or folder" in problems[2]
