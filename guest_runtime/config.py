"""The run configuration (``aicert.yaml``): the seed's format, validated before anything runs.

Every error names the field and, when the config came from a YAML file, the line, so a
typo'd key or a ``..`` in a destination path is caught before a machine is provisioned.

The YAML is read strictly (``strict_yaml``: bounded size and depth, no anchors, aliases,
merge or duplicate keys). Every number has documented bounds (``Limits``), and the image
reference follows Docker's grammar.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from aicert.gpus import MAX_GPUS
from aicert.guest_runtime.config_problems import validation_problems
from aicert.guest_runtime.strict_yaml import (
    MAX_CONFIG_BYTES,
    Location,
    compose_strict,
    yaml_problem,
)
from aicert.model import MAX_OUTPUT_FILES

DEFAULT_BASE_IMAGE = "aicert/python-base:bookworm"
WORKSPACE = PurePosixPath("/workspace")
DEFAULT_OUTPUTS = "/workspace/outputs"
SUPPORTED_PYTHON = "3.11"  # the base image is Debian bookworm, whose python3 is 3.11

# -- bounds (documented in the README's configuration section) ---------------------------------
MIN_CPUS = 0.01  # Docker refuses less than 0.01 CPU
MAX_CPUS = 1024.0
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # Docker's minimum memory limit (6 MiB)
MAX_MEMORY_BYTES = 16 * 1024**4  # 16 TiB: more than any single machine offers
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600  # 30 days
MAX_PIDS = 4_194_304  # Linux's largest pid_max (2**22)
# Within what one certificate can list (the agent refuses more output files than this).
MAX_MIN_OUTPUT_FILES = MAX_OUTPUT_FILES
MAX_RESOURCES = 1000
MAX_ENV_VARIABLES = 1000
MAX_COMMAND_ARGUMENTS = 1000
MAX_TEXT_CHARS = 8192  # a URL, a path, a command argument, an environment value
MAX_IMAGE_REFERENCE_CHARS = 255 + 1 + 128 + 1 + 71  # name, :tag, @sha256:digest

# Docker's image reference grammar, as one regex. Source: the grammar documented in
# github.com/distribution/reference (reference.go) and its regexp.go (ReferenceRegexp):
#   reference      := name [ ":" tag ] [ "@" digest ]
#   name           := [domain "/"] remote-name
#   domain         := host [":" port-number]
#   host           := domain-name | "[" IPv6address "]"
#   domain-name    := domain-component ("." domain-component)*
#   remote-name    := path-component ("/" path-component)*
#   path-component := [a-z0-9]+ (separator [a-z0-9]+)*   separator := [._] | "__" | "-"+
#   tag            := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
# The digest is narrowed to what Docker accepts for sha256 (64 lowercase hex); the name is at
# most 255 characters (NameTotalLengthMax). re.ASCII: Go's \w is ASCII, Python's is Unicode.
IMAGE_REFERENCE = re.compile(
    r"""
    (?P<name>
        (?:
            (?:
                (?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])
                (?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*
            | \[[a-fA-F0-9:]+\]
            )
            (?::[0-9]+)?
            /
        )?
        [a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*
        (?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*
    )
    (?::(?P<tag>\w[\w.-]{0,127}))?
    (?:@(?P<digest>sha256:[0-9a-f]{64}))?
    """,
    re.VERBOSE | re.ASCII,
)
MAX_IMAGE_NAME_CHARS = 255

_MEMORY_SIZE = re.compile(r"([0-9]{1,20})([bkmg]?)", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


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
    git_repo: Annotated[str, Field(alias="gitRepo", min_length=1, max_length=MAX_TEXT_CHARS)]
    tag: Text | None = None
    branch: Text | None = None
    commit: str | None = None
    subdirectory: Text | None = None

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


class CertifiedBy(_ConfigModel):
    """``certifiedBy`` of a resource: the certificate whose output the file is.

    The builder writes ``certificate`` (a path relative to the config file, or an http(s)
    URL) and ``output`` (one of that certificate's output paths). Before the run the
    orchestrator verifies that certificate with the run's trust policy and fills in
    ``certificateSha256`` and ``runId``; the agent measures both (an
    ``aicert.input.certified-resource`` event) and refuses a link that was not resolved.
    """

    certificate: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    output: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
    certificate_sha256: Annotated[str | None, Field(alias="certificateSha256")] = None
    run_id: Annotated[str | None, Field(alias="runId", max_length=128)] = None

    @field_validator("certificate")
    @classmethod
    def _certificate(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("certificate must be a path or an http(s) URL")
        if re.match(r"^[a-z][a-z0-9+.-]*://", value) and not re.match(r"^https?://", value):
            raise ValueError("certificate must be a path or an http:// or https:// URL")
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        return _relative_posix_path(value, "output")

    @field_validator("certificate_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("certificateSha256 must be 64 lowercase hexadecimal characters")
        return value

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}", value):
            raise ValueError(f"runId {value!r} is not a run id")
        return value

    @property
    def resolved(self) -> bool:
        """Whether the orchestrator verified the certificate and filled in its digest."""
        return self.certificate_sha256 is not None and self.run_id is not None


class Resource(_ConfigModel):
    """A file downloaded by the agent, measured, and mounted read-only for the job."""

    type: Literal["file"] = "file"
    url: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    destination_path: Annotated[str, Field(alias="destinationPath", max_length=MAX_TEXT_CHARS)]
    sha256: str | None = None
    certified_by: Annotated[CertifiedBy | None, Field(alias="certifiedBy")] = None

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


def memory_bytes(size: str) -> int:
    """Bytes in a Docker memory size (``512m``, ``4g``, ``1048576``); ValueError if malformed."""
    match = _MEMORY_SIZE.fullmatch(size)
    if match is None:
        raise ValueError("memory must be a size such as 512m or 4g")
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()]


class Limits(_ConfigModel):
    """The training container's limits; every one bounded (``MIN_*``/``MAX_*`` above).

    Numbers are strict: YAML's ``yes`` or ``1.5`` is not silently taken for an integer.
    """

    cpus: Annotated[float, Field(strict=True, ge=MIN_CPUS, le=MAX_CPUS)] | None = None
    memory: Annotated[str, Field(max_length=32)] | None = None
    timeout_seconds: Annotated[
        int, Field(alias="timeoutSeconds", strict=True, ge=1, le=MAX_TIMEOUT_SECONDS)
    ] = 3600
    pids: Annotated[int, Field(strict=True, ge=1, le=MAX_PIDS)] = 4096

    @field_validator("memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is None:
            return value
        size = memory_bytes(value)
        if not MIN_MEMORY_BYTES <= size <= MAX_MEMORY_BYTES:
            raise ValueError(
                f"memory must be between 6m (Docker's minimum) and 16384g, got {value!r}"
            )
        return value


class Outputs(_ConfigModel):
    """``outputs`` as a mapping: the folder and how many files the run must leave in it.

    ``outputs: /workspace/outputs`` (the seed's form) is the same as ``{path: ..., minFiles:
    0}``; the mapping is measured as written, so a verifier sees the requirement.
    """

    path: Text = DEFAULT_OUTPUTS
    min_files: Annotated[
        int, Field(alias="minFiles", strict=True, ge=0, le=MAX_MIN_OUTPUT_FILES)
    ] = 0

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _outputs_path(value)


def _outputs_path(value: str) -> str:
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts or not path.is_relative_to(WORKSPACE):
        raise ValueError("outputs must be an absolute path under /workspace")
    for reserved in ("src", "resources"):
        if path == WORKSPACE or path.is_relative_to(WORKSPACE / reserved):
            raise ValueError(f"outputs must not be /workspace or inside /workspace/{reserved}")
    return str(path)


def _outputs_form(value: Any) -> str:
    # A mapping is the ``Outputs`` form; anything else is validated (and refused) as a path.
    return "mapping" if isinstance(value, dict | Outputs) else "path"


class RunConfig(_ConfigModel):
    """The validated ``aicert.yaml``. Its canonical JSON is measured into PCR 14."""

    kind: Literal["python"] = "python"
    name: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    python_version: Annotated[str, Field(alias="pythonVersion")] = SUPPORTED_PYTHON
    source: GitSource
    python_entry_point: Annotated[Text | None, Field(alias="pythonEntryPoint")] = None
    command: Annotated[list[Text], Field(max_length=MAX_COMMAND_ARGUMENTS)] | None = None
    resources: Annotated[list[Resource], Field(max_length=MAX_RESOURCES)] = []
    image: Annotated[str, Field(max_length=MAX_IMAGE_REFERENCE_CHARS)] = DEFAULT_BASE_IMAGE
    outputs: Annotated[
        Annotated[Text, Tag("path")] | Annotated[Outputs, Tag("mapping")],
        Discriminator(_outputs_form),
    ] = DEFAULT_OUTPUTS
    limits: Limits = Limits()
    # NVIDIA GPUs passed to the job (Docker's --gpus N: devices 0 to N-1), described by the
    # agent's nvidia-smi in the certificate (aicert.gpus). A count, never "all": the config,
    # and so the certificate, say how many GPUs the job was meant to have.
    gpus: Annotated[int, Field(strict=True, ge=0, le=MAX_GPUS)] = 0
    env: Annotated[dict[str, Text], Field(max_length=MAX_ENV_VARIABLES)] = {}
    # An output file (relative to the outputs folder) of metric name -> number: its parsed
    # metrics are measured with it (aicert.metrics), and the verified report shows them.
    results: Text | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError(
                "name must be 1 to 63 characters: lowercase letters, digits and '-', "
                f"starting with a letter or a digit (got {value!r})"
            )
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        match = IMAGE_REFERENCE.fullmatch(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a Docker image reference ([registry[:port]/]name[:tag]"
                "[@sha256:digest]; lowercase name components)"
            )
        if len(match.group("name")) > MAX_IMAGE_NAME_CHARS:
            raise ValueError(f"the image name is longer than {MAX_IMAGE_NAME_CHARS} characters")
        return value

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_count(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() == "all":
                raise ValueError(
                    f"{value!r} is not accepted: give how many GPUs the job gets (0 to "
                    f"{MAX_GPUS}), so that the certificate says how many it was meant to have"
                )
            raise ValueError(f"{value!r} is text: give a whole number of GPUs, 0 to {MAX_GPUS}")
        return value

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
    def _outputs(cls, value: str | Outputs) -> str | Outputs:
        return value if isinstance(value, Outputs) else _outputs_path(value)

    @field_validator("results")
    @classmethod
    def _results(cls, value: str | None) -> str | None:
        return None if value is None else _relative_posix_path(value, "results")

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
    def outputs_path(self) -> str:
        """The outputs folder in the container (``outputs`` or ``outputs.path``)."""
        return self.outputs.path if isinstance(self.outputs, Outputs) else self.outputs

    @property
    def min_output_files(self) -> int:
        """How many files the run must leave in its outputs (``outputs.minFiles``, else 0)."""
        return self.outputs.min_files if isinstance(self.outputs, Outputs) else 0

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
        """What PCR 14 records: the validated config, defaults filled in, in YAML's names.

        A config without ``results``, a resource without ``certifiedBy``, is recorded without
        the key, as before the field existed (so such a config measures as it always did).
        """
        form = self.model_dump(mode="json", by_alias=True)
        if form.get("results") is None:
            form.pop("results", None)
        for resource in form["resources"]:
            if resource.get("certifiedBy") is None:
                resource.pop("certifiedBy", None)
        return form


# The allowed range of each number, as the out-of-range message gives it.
_RANGES: dict[Location, str] = {
    ("limits", "cpus"): f"{MIN_CPUS} to {MAX_CPUS:g} CPUs",
    ("limits", "timeoutSeconds"): f"1 to {MAX_TIMEOUT_SECONDS} seconds (30 days)",
    ("limits", "pids"): f"1 to {MAX_PIDS} processes (Linux's largest pid_max)",
    ("gpus",): f"0 to {MAX_GPUS} GPUs",
    ("outputs", "minFiles"): f"0 to {MAX_MIN_OUTPUT_FILES} files",
}


def _validate(data: Any, root: yaml.Node | None, source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, root, _RANGES), source) from None


def parse_config(data: Any, *, text: str | None = None, source: str = "config") -> RunConfig:
    """Validate a configuration given as data; ``text``, the YAML it came from, adds lines.

    Raises:
        ConfigError: every problem, each naming the field (and line).
    """
    root = None
    if text is not None:
        try:
            root = compose_strict(text)[1]
        except yaml.YAMLError:
            root = None  # the caller parsed it; without the tree, errors just have no line
    return _validate(data, root, source)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate an ``aicert.yaml``; raise ConfigError naming the field and line.

    The file is read strictly (``strict_yaml.strict_yaml_load``), at most ``MAX_CONFIG_BYTES``
    of it.
    """
    config_path = Path(path)
    try:
        with config_path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], str(config_path)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"larger than {MAX_CONFIG_BYTES} bytes"], str(config_path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], str(config_path)) from None
    try:
        data, root = compose_strict(text)
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_problem(exc)], str(config_path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of fields"], str(config_path))
    return _validate(data, root, str(config_path))


def resolve_certificate_paths(config: RunConfig, config_dir: Path) -> RunConfig:
    """Make each relative ``certifiedBy.certificate`` path absolute, relative to the config
    file's folder (URLs are kept)."""
    resources = []
    for resource in config.resources:
        link = resource.certified_by
        if link is None or re.match(r"^https?://", link.certificate):
            resources.append(resource)
            continue
        absolute = str((config_dir / link.certificate).resolve())
        resources.append(
            resource.model_copy(
                update={"certified_by": link.model_copy(update={"certificate": absolute})}
            )
        )
    return config.model_copy(update={"resources": resources})


def resolve_local_source(config: RunConfig, config_dir: Path) -> RunConfig:
    """Make a relative local ``gitRepo`` absolute, relative to the config file's folder."""
    repo = config.source.git_repo
    if re.match(r"^[a-z][a-z0-9+.-]*://", repo) or re.match(r"^[\w.-]+@[\w.-]+:", repo):
        return config
    absolute = (config_dir / repo).resolve()
    source = config.source.model_copy(update={"git_repo": str(absolute)})
    return config.model_copy(update={"source": source})
