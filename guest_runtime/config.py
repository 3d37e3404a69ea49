"""The run configuration (``aicert.yaml``): the seed's format, validated before anything runs.

Every error names the field and, when the config came from a YAML file, the line, so a
typo'd key or a ``..`` in a destination path is caught before a machine is provisioned.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_BASE_IMAGE = "aicert/python-base:bookworm"
WORKSPACE = PurePosixPath("/workspace")
SUPPORTED_PYTHON = "3.11"  # the base image is Debian bookworm, whose python3 is 3.11


class ConfigError(ValueError):
    """The run configuration is invalid; the message names the field (and line)."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


class _ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def _relative_posix_path(value: str, field: str) -> str:
    if not value or "\x00" in value or "\\" in value:
        raise ValueError(f"{field} must be a non-empty relative path")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValueError(f"{field} must be relative, not absolute ({value!r})")
    if any(part == ".." for part in path.parts):
        raise ValueError(f"{field} must not contain '..' ({value!r})")
    if path.parts and path.parts[0] == ".":
        path = PurePosixPath(*path.parts[1:])
    if not path.parts:
        raise ValueError(f"{field} must name a file, not '.'")
    return str(path)


class GitSource(_ConfigModel):
    """The training code: a git repository (URL or local path) at a tag, branch or commit."""

    type: Literal["git"] = "git"
    git_repo: Annotated[str, Field(alias="gitRepo", min_length=1)]
    tag: str | None = None
    branch: str | None = None
    commit: str | None = None
    subdirectory: str | None = None

    @field_validator("tag", "branch")
    @classmethod
    def _valid_ref_name(cls, value: str | None) -> str | None:
        # git check-ref-format rules that matter here; refuse what could be an option.
        if value is None:
            return value
        if (
            not value
            or value.startswith(("-", "/"))
            or ".." in value
            or value.endswith((".lock", "/", "."))
            or re.search(r"[\x00-\x20~^:?*\[\\\x7f]|@\{", value)
        ):
            raise ValueError(f"{value!r} is not a valid git ref name")
        return value

    @field_validator("commit")
    @classmethod
    def _valid_commit(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{7,40}", value):
            raise ValueError("commit must be 7 to 40 lowercase hex characters")
        return value

    @field_validator("subdirectory")
    @classmethod
    def _valid_subdirectory(cls, value: str | None) -> str | None:
        return None if value is None else _relative_posix_path(value, "subdirectory")

    @model_validator(mode="after")
    def _one_ref(self) -> GitSource:
        given = [name for name in ("tag", "branch", "commit") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give at most one of tag, branch, commit (got {', '.join(given)})")
        return self

    @property
    def ref(self) -> str | None:
        return self.commit or self.tag or self.branch


class Resource(_ConfigModel):
    """A file downloaded by the agent, measured, and mounted read-only for the job."""

    type: Literal["file"] = "file"
    url: Annotated[str, Field(min_length=1)]
    destination_path: Annotated[str, Field(alias="destinationPath")]
    sha256: str | None = None

    @field_validator("url")
    @classmethod
    def _supported_scheme(cls, value: str) -> str:
        if not re.match(r"^(https?|file)://", value):
            raise ValueError("url must start with http://, https:// or file://")
        return value

    @field_validator("destination_path")
    @classmethod
    def _safe_destination(cls, value: str) -> str:
        return _relative_posix_path(value, "destinationPath")

    @field_validator("sha256")
    @classmethod
    def _hex_sha256(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("sha256 must be 64 hexadecimal characters")
        return value.lower()


class Limits(_ConfigModel):
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None
    memory: str | None = None
    timeout_seconds: Annotated[int, Field(alias="timeoutSeconds", gt=0)] = 3600
    pids: Annotated[int, Field(gt=0)] = 4096

    @field_validator("memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9]+[bkmgBKMG]?", value):
            raise ValueError("memory must be a size such as 512m or 4g")
        return value


class RunConfig(_ConfigModel):
    """The validated ``aicert.yaml``. Its canonical JSON is measured into PCR 14."""

    kind: Literal["python"] = "python"
    name: Annotated[str | None, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")] = None
    python_version: Annotated[str, Field(alias="pythonVersion")] = SUPPORTED_PYTHON
    source: GitSource
    python_entry_point: Annotated[str | None, Field(alias="pythonEntryPoint")] = None
    command: list[str] | None = None
    resources: list[Resource] = []
    image: str = DEFAULT_BASE_IMAGE
    outputs: str = "/workspace/outputs"
    limits: Limits = Limits()
    gpus: Annotated[int, Field(ge=0)] = 0
    env: dict[str, str] = {}

    @field_validator("python_version", mode="before")
    @classmethod
    def _python_version(cls, value: Any) -> str:
        text = str(value).strip()
        if text in {"11", "3.11"}:
            return SUPPORTED_PYTHON
        raise ValueError(
            f"Python {text} is not available: the base image (Debian bookworm) has Python 3.11"
        )

    @field_validator("python_entry_point")
    @classmethod
    def _entry_point(cls, value: str | None) -> str | None:
        return None if value is None else _relative_posix_path(value, "pythonEntryPoint")

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("command must not be empty")
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not path.is_absolute() or ".." in path.parts or not path.is_relative_to(WORKSPACE):
            raise ValueError("outputs must be an absolute path under /workspace")
        for reserved in ("src", "resources"):
            if path == WORKSPACE or path.is_relative_to(WORKSPACE / reserved):
                raise ValueError(f"outputs must not be /workspace or inside /workspace/{reserved}")
        return str(path)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return value

    @model_validator(mode="after")
    def _entry_or_command(self) -> RunConfig:
        if self.python_entry_point and self.command:
            raise ValueError("give pythonEntryPoint or command, not both")
        destinations = [r.destination_path for r in self.resources]
        duplicates = {d for d in destinations if destinations.count(d) > 1}
        if duplicates:
            raise ValueError(
                f"resources: destinationPath repeated: {', '.join(sorted(duplicates))}"
            )
        return self

    # -- derived values ------------------------------------------------------------------

    @property
    def entry_command(self) -> list[str]:
        if self.command:
            return list(self.command)
        return ["python3", str(WORKSPACE / "src" / (self.python_entry_point or "src/main.py"))]

    def project_name(self) -> str:
        """A stable slug (``^[a-z0-9-]+$``) for artifact keys and container names."""
        if self.name:
            return self.name
        base = self.source.subdirectory or self.source.git_repo.rstrip("/")
        base = base.rsplit("/", 1)[-1].removesuffix(".git")
        slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
        return slug[:63] or "project"

    def measured_form(self) -> dict[str, Any]:
        """What PCR 14 records: the validated config, defaults filled in, in YAML's names."""
        return self.model_dump(mode="json", by_alias=True)


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each YAML key/item path to its 1-based line, for error messages."""
    lines: dict[tuple[str | int, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                lines[(*path, key)] = key_node.start_mark.line + 1
                walk(value_node, (*path, key))
                lines[(*path, key)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*path, index))

    if root is not None:
        walk(root, ())
    return lines


def _field_path(location: tuple[str | int, ...]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def parse_config(data: Any, *, text: str | None = None, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = _line_index(text) if text is not None else {}
        problems = []
        for error in exc.errors():
            location = tuple(part for part in error["loc"] if part not in ("function-after",))
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field (check the spelling)"
            elif error["type"] == "missing":
                message = "required field is missing"
            line = None
            probe = location
            while probe and line is None:
                line = lines.get(probe)
                probe = probe[:-1]
            where = f" (line {line})" if line else ""
            problems.append(f"{_field_path(location)}{where}: {message}")
        raise ConfigError(problems, source) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate an ``aicert.yaml``; raise ConfigError naming the field and line."""
    config_path = Path(path)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], str(config_path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], str(config_path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}invalid YAML: {problem}"], str(config_path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of fields"], str(config_path))
    return parse_config(data, text=text, source=str(config_path))


def resolve_local_source(config: RunConfig, config_dir: Path) -> RunConfig:
    """Make a relative local ``gitRepo`` absolute, relative to the config file's folder."""
    repo = config.source.git_repo
    if re.match(r"^[a-z][a-z0-9+.-]*://", repo) or re.match(r"^[\w.-]+@[\w.-]+:", repo):
        return config
    absolute = (config_dir / repo).resolve()
    source = config.source.model_copy(update={"git_repo": str(absolute)})
    return config.model_copy(update={"source": source})
