"""A small Dockerfile parser (what the tests need to check a Dockerfile without a Docker engine)
and a .dockerignore matcher, written from the Dockerfile reference."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}


class DockerfileError(ValueError):
    pass


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts (1-based)


@dataclass(frozen=True)
class Copy:
    keyword: str  # COPY or ADD
    sources: tuple[str, ...]
    dest: str
    from_stage: str | None
    line: int


@dataclass
class Stage:
    image: str  # as written, variables expanded
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def copies(self) -> list[Copy]:
        return [parse_copy(i) for i in self.instructions if i.keyword in ("COPY", "ADD")]

    def runs(self) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == "RUN"]


@dataclass
class Dockerfile:
    directives: dict[str, str]
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def logical_lines(text: str) -> tuple[dict[str, str], list[Instruction]]:
    """Parser directives, then instructions with line continuations joined and comments gone."""
    directives: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):  # directives: only at the very top, `# key=value`
        m = re.fullmatch(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*", lines[i])
        if not m:
            break
        directives[m.group(1).lower()] = m.group(2)
        i += 1
    escape = directives.get("escape", "\\")
    out: list[Instruction] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(lines[i:], start=i + 1):
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment line inside a continuation is dropped
        if not current:
            start = number
        if stripped.endswith(escape):
            current.append(stripped[: -len(escape)].rstrip())
            continue
        current.append(stripped)
        text_line = " ".join(p for p in current if p)
        current = []
        keyword, _, args = text_line.partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            raise DockerfileError(f"line {start}: unknown instruction {keyword!r}")
        if "<<" in args and keyword.upper() in ("RUN", "COPY"):
            raise DockerfileError(f"line {start}: heredocs are not supported by this parser")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if current:
        raise DockerfileError("the file ends inside a line continuation")
    return directives, out


def _expand(text: str, values: dict[str, str | None]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        value = values.get(name)
        if value is None:
            raise DockerfileError(f"${name} has no value")
        return value

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, text)


def parse(text: str) -> Dockerfile:
    directives, instructions = logical_lines(text)
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform=")]
            if len(words) == 3 and words[1].lower() == "as":
                image, name = words[0], words[2]
            elif len(words) == 1:
                image, name = words[0], None
            else:
                raise DockerfileError(f"line {ins.line}: bad FROM {ins.args!r}")
            if name is not None and any(s.name == name for s in stages):
                raise DockerfileError(f"line {ins.line}: stage name {name!r} used twice")
            stages.append(Stage(_expand(image, global_args), name))
            continue
        if not stages:
            if ins.keyword != "ARG":
                raise DockerfileError(f"line {ins.line}: {ins.keyword} before the first FROM")
            key, sep, default = ins.args.partition("=")
            global_args[key.strip()] = default.strip().strip('"') if sep else None
            continue
        stages[-1].instructions.append(ins)
    if not stages:
        raise DockerfileError("no FROM")
    return Dockerfile(directives, global_args, stages)


def parse_copy(ins: Instruction) -> Copy:
    words: list[str]
    text = ins.args
    flags: dict[str, str] = {}
    while text.startswith("--"):
        word, _, text = text.partition(" ")
        key, _, value = word[2:].partition("=")
        flags[key] = value
        text = text.strip()
    if text.startswith("["):
        try:
            words = json.loads(text)
        except ValueError as exc:
            raise DockerfileError(f"line {ins.line}: bad JSON form: {exc}") from None
    else:
        words = shlex.split(text)
    if len(words) < 2:
        raise DockerfileError(f"line {ins.line}: {ins.keyword} needs a source and a destination")
    return Copy(ins.keyword, tuple(words[:-1]), words[-1], flags.get("from"), ins.line)


# ------------------------------------------------------------------------------ .dockerignore


def ignore_patterns(text: str) -> list[tuple[bool, str]]:
    """(is_exception, pattern) per line; comments and blank lines dropped."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip().strip("/")
        out.append((negate, re.sub(r"/+", "/", pattern)))
    return out


def _matches(pattern: str, path: str) -> bool:
    """Go's filepath.Match, plus `**` for any number of directories, as Docker does."""
    regex = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif c == "*":
            regex, i = regex + "[^/]*", i + 1
        elif c == "?":
            regex, i = regex + "[^/]", i + 1
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j]
            if body[:1] in ("^", "!"):
                body = "^" + body[1:]
            regex, i = regex + "[" + body + "]", j + 1
        else:
            regex, i = regex + re.escape(c), i + 1
    return re.fullmatch(regex, path) is not None


def is_ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether the build context leaves `path` out (the last matching pattern decides; a
    pattern that matches a directory leaves out everything below it)."""
    path = path.strip("/")
    parts = path.split("/")
    ignored = False
    for negate, pattern in patterns:
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(_matches(pattern, p) for p in prefixes):
            ignored = not negate
    return ignored
