"""The Dockerfile, .dockerignore and lock files read the way Docker and pip read them, and
the builder stage run without Docker, so tests can hold the image to what they check.

There is no Docker engine in the test run. What can be checked without one is checked
on the files themselves (`parse_dockerfile`, `DockerIgnore`, `read_lock`), and the
builder stage's own RUN lines are executed on this machine by `build_stage`: the same
commands, flags and lock files, in a directory standing in for the image's filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
BUILD_LOCK = ROOT / "requirements" / "build.txt"
COMPILE_LOCK = ROOT / "requirements" / "compile.txt"

#: PATH in the official python images, which `$PATH` in the Dockerfile extends.
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- the Dockerfile -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword in upper case, the rest of it with continuation lines
    joined, and the line it starts on."""

    keyword: str
    value: str
    line: int

    def json_list(self) -> list[str]:
        """The exec (JSON) form's arguments; ValueError for the shell form."""
        parsed = json.loads(self.value)
        if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
            raise ValueError(f"line {self.line}: not a JSON list of strings: {self.value}")
        return parsed


@dataclass
class Stage:
    """A build stage: its FROM image, its `AS` name and its instructions after FROM."""

    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        if not found:
            raise LookupError(f"no {keyword} in the stage starting on line {self.line}")
        return found[-1]

    def args(self) -> dict[str, str | None]:
        """ARG defaults of this stage (None: declared without one)."""
        result: dict[str, str | None] = {}
        for instruction in self.all("ARG"):
            result.update(stage_args(instruction))
        return result

    def env(self, initial: Mapping[str, str]) -> dict[str, str]:
        """The environment after this stage's ENV instructions, starting from `initial`;
        `$NAME` and `${NAME}` expand as Docker expands them."""
        result = dict(initial)
        for instruction in self.all("ENV"):
            for key, value in parse_env(instruction.value):
                result[key] = expand(value, result)
        return result

    def labels(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for instruction in self.all("LABEL"):
            for word in shlex.split(instruction.value):
                key, _, value = word.partition("=")
                result[key] = value
        return result


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile (default escape character, `\\`)."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and blank lines, also inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, value = " ".join(p for p in pending if p).partition(" ")
        pending = []
        instruction = Instruction(keyword.upper(), value.strip(), start)
        if instruction.keyword == "FROM":
            words = instruction.value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, start))
        elif stages:
            stages[-1].instructions.append(instruction)
        elif instruction.keyword != "ARG":  # only ARG may come before the first FROM
            raise ValueError(f"line {start}: {instruction.keyword} before FROM")
    return stages


def read_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    return parse_dockerfile(path.read_text())


def parse_env(value: str) -> list[tuple[str, str]]:
    """`ENV a=1 b="x y"` as pairs (also the old `ENV name value` form)."""
    words = shlex.split(value, posix=True)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [(key, val) for key, _, val in (w.partition("=") for w in words)]


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(value: str, env: Mapping[str, str]) -> str:
    return _VARIABLE.sub(lambda m: env.get(m[1] or m[2], ""), value)


@dataclass(frozen=True)
class Copy:
    """A COPY or ADD: its `--flag=value` options, sources and destination."""

    instruction: Instruction
    flags: dict[str, str]
    sources: list[str]
    dest: str


def parse_copy(instruction: Instruction) -> Copy:
    words = shlex.split(instruction.value)
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    if len(words) == 1 and words[0].startswith("["):
        words = json.loads(words[0])
    elif words and words[0].startswith("["):
        words = json.loads(" ".join(words))
    if len(words) < 2:
        raise ValueError(f"line {instruction.line}: {instruction.keyword} needs a source and dest")
    return Copy(instruction, flags, words[:-1], words[-1])


def copies(stage: Stage) -> list[Copy]:
    return [parse_copy(i) for i in stage.instructions if i.keyword in ("COPY", "ADD")]


# --- .dockerignore ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    text: str
    regex: re.Pattern[str]
    exclusion: bool  # a `!pattern`: puts back what an earlier pattern left out


def _compile(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as moby's patternmatcher compiles it: `*` and `?` stay
    within a path segment, `**` spans any number of them, `\\` escapes."""
    regex = "^"
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                regex += ".*" if i + 1 == len(pattern) else "(.*/)?"
            else:
                regex += "[^/]*"
        elif char == "?":
            regex += "[^/]"
        elif char in ".+()|{}$":
            regex += "\\" + char
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            regex += re.escape(pattern[i])
        else:
            regex += char
        i += 1
    return re.compile(regex + "$")


class DockerIgnore:
    """Which paths of the build context Docker leaves out, by moby's rules: patterns are
    cleaned paths relative to the context; a pattern matching a directory matches
    everything in it; the last pattern that matches decides."""

    def __init__(self, text: str) -> None:
        self.patterns: list[_Pattern] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
            line = os.path.normpath(line) if line else line
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
            self.patterns.append(_Pattern(line, _compile(line), exclusion))

    @classmethod
    def read(cls, path: Path = DOCKERIGNORE) -> DockerIgnore:
        return cls(path.read_text() if path.exists() else "")

    def excluded(self, path: str) -> bool:
        parents = path.split("/")[:-1]
        prefixes = ["/".join(parents[: i + 1]) for i in range(len(parents))]
        matched = False
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue  # only a match can change the verdict
            if pattern.regex.match(path) or any(pattern.regex.match(p) for p in prefixes):
                matched = not pattern.exclusion
        return matched


def context_files(
    ignore: DockerIgnore | None = None, *, tracked_only: bool = True, root: Path = ROOT
) -> set[str]:
    """The build context `docker build .` would send from a checkout: files git knows
    (with `tracked_only` False, also untracked ones git does not ignore), minus what
    .dockerignore leaves out."""
    ignore = ignore or DockerIgnore.read(root / ".dockerignore")
    command = ["git", "ls-files", "-z", "--cached"]
    if not tracked_only:
        command += ["--others", "--exclude-standard"]
    listed = subprocess.run(command, cwd=root, check=True, capture_output=True).stdout
    names = {n for n in listed.decode().split("\0") if n}
    return {n for n in names if (root / n).is_file() and not ignore.excluded(n)}


def sources_in_context(copy: Copy, context: Iterable[str]) -> dict[str, list[str]]:
    """For each source of a COPY from the build context, the context files it copies
    (a directory copies everything in it); wildcards are not supported here."""
    files = sorted(context)
    result: dict[str, list[str]] = {}
    for source in copy.sources:
        if any(c in source for c in "*?["):
            raise NotImplementedError(f"line {copy.instruction.line}: wildcard in {source!r}")
        path = os.path.normpath(source.lstrip("/"))
        result[source] = [f for f in files if f == path or f.startswith(path + "/")]
    return result


# --- the lock files -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """A locked requirement: `name==version` and its `--hash=sha256:` values."""

    name: NormalizedName
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def version(self) -> str:
        (spec,) = self.requirement.specifier
        return spec.version


def read_lock(path: Path) -> dict[NormalizedName, Pin]:
    """A pip requirements file in the lock's format: continuation lines joined, comments
    dropped; ValueError on a name locked twice."""
    pins: dict[NormalizedName, Pin] = {}
    for entry in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        text = entry.split("#", 1)[0].strip()
        if not text:
            continue
        words = text.split()
        hashes = tuple(w.removeprefix("--hash=") for w in words[1:] if w.startswith("--hash="))
        if len(hashes) != len(words) - 1:
            raise ValueError(f"{path.name}: unexpected option in {text!r}")
        requirement = Requirement(words[0])
        name = canonicalize_name(requirement.name)
        if name in pins:
            raise ValueError(f"{path.name}: {name} is locked twice")
        pins[name] = Pin(name, requirement, hashes)
    return pins


# --- the builder stage, run here ----------------------------------------------------------


@dataclass(frozen=True)
class BuiltStage:
    """The outcome of `build_stage`: where the stage's WORKDIR and its ARG values ended
    up on this machine."""

    workdir: Path
    args: dict[str, str]


#: Part of the cache key: bump it when `build_stage` changes what it produces.
_EMULATION_VERSION = "1"


def stage_fingerprint(stage: Stage, context: set[str], extra: Mapping[str, str]) -> str:
    """A digest of everything a stage's result depends on: its instructions, the bytes
    of every context file it copies, the interpreter that runs it and `extra` (build
    args, where it is built)."""
    digest = hashlib.sha256()
    for part in (_EMULATION_VERSION, sys.version, sys.executable, json.dumps(dict(extra))):
        digest.update(part.encode() + b"\0")
    for instruction in stage.instructions:
        digest.update(f"{instruction.keyword} {instruction.value}\0".encode())
    for copy in copies(stage):
        for files in sources_in_context(copy, context).values():
            for name in files:
                digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_stage(
    stage: Stage, context: set[str], root: Path, args: Mapping[str, str], log: Path
) -> BuiltStage:
    """Run `stage` as `docker build` would, with `root` standing in for the image's
    filesystem root.

    WORKDIR and COPY destinations land under `root`; COPY takes files from the build
    context only. RUN runs its shell form with `/bin/sh -c` in the WORKDIR, with the
    stage's ARG values (`args` overriding, as `--build-arg` does; absolute paths the
    RUN lines use must come from ARGs so that a test can move them) and ENV, and with
    `python` being the interpreter running the tests. Any other instruction is an
    error, so that one added to the stage is noticed here.
    """
    shim = root / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        # A script, not a symlink: a venv's python is only in its venv when called by path.
        (shim / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (shim / name).chmod(0o755)
    values: dict[str, str] = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', os.defpath)}"
    workdir = root
    with log.open("ab") as out:
        for instruction in stage.instructions:
            keyword = instruction.keyword
            if keyword == "ARG":
                for name, default in stage_args(instruction).items():
                    value = args.get(name, default)
                    if value is not None:
                        values[name] = env[name] = value
            elif keyword == "ENV":
                for key, value in parse_env(instruction.value):
                    env[key] = expand(value, env)
            elif keyword == "WORKDIR":
                workdir = root / expand(instruction.value, env).lstrip("/")
                workdir.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                _copy(parse_copy(instruction), context, workdir, root)
            elif keyword == "RUN":
                out.write(f"\n--- line {instruction.line}: RUN {instruction.value}\n".encode())
                out.flush()
                done = subprocess.run(
                    ["/bin/sh", "-c", instruction.value],
                    cwd=workdir,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
                if done.returncode != 0:
                    raise AssertionError(
                        f"Dockerfile line {instruction.line}: RUN exited {done.returncode}:\n"
                        f"{log.read_text()[-4000:]}"
                    )
            else:
                raise NotImplementedError(f"line {instruction.line}: {keyword} in the builder")
    return BuiltStage(workdir, values)


def stage_args(instruction: Instruction) -> dict[str, str | None]:
    """The names one ARG instruction declares, with their defaults (None: no default)."""
    result: dict[str, str | None] = {}
    for word in shlex.split(instruction.value):
        name, sep, default = word.partition("=")
        result[name] = default if sep else None
    return result


def _copy(copy: Copy, context: set[str], workdir: Path, root: Path) -> None:
    if "from" in copy.flags:
        raise NotImplementedError(f"line {copy.instruction.line}: COPY --from in the builder")
    dest = copy.dest
    target = root / dest.lstrip("/") if dest.startswith("/") else workdir / dest
    for source, files in sources_in_context(copy, context).items():
        if not files:
            raise AssertionError(f"line {copy.instruction.line}: {source!r} is not in the context")
        base = os.path.normpath(source.lstrip("/"))
        for name in files:
            if name == base:  # a file: into the directory `dest/`, or as `dest`
                out = target / Path(name).name if dest.endswith("/") else target
            else:  # a directory's contents go into dest
                out = target / os.path.relpath(name, base)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, out)


# --- the image's facts --------------------------------------------------------------------

_BASE = re.compile(r"python:(?P<version>3\.\d+\.\d+)-slim-(?P<distro>[a-z]+)@sha256:[0-9a-f]{64}")


def base_python_version(stages: list[Stage]) -> str:
    """The exact Python version of the pinned base image (`3.11.15`), from its tag."""
    match = _BASE.fullmatch(stages[0].base)
    if match is None:
        raise ValueError(f"base image {stages[0].base!r} is not python:X.Y.Z-slim-<distro>@sha256")
    return match["version"]


def marker_environment(python_version: str, machine: str = "x86_64") -> dict[str, str]:
    """Environment marker values inside the image on linux/`machine`."""
    return {
        "implementation_name": "cpython",
        "implementation_version": python_version,
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "python_full_version": python_version,
        "python_version": ".".join(python_version.split(".")[:2]),
        "sys_platform": "linux",
        "extra": "",
    }
