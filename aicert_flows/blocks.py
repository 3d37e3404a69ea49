"""Prefect blocks of AICert: a stored run configuration and the platforms' settings.

``AicertRunConfig`` keeps an ``aicert.yaml`` on the Prefect server, so a deployment can run
``certify-training`` with ``config_block=<name>`` instead of a file on the worker.
``LocalPlatform``, ``QemuPlatform`` (and ``AzurePlatform``, ``GcpPlatform``) hold a
provider's settings; the flow takes a saved one's name as ``platform_block``. They are
registered through the ``prefect.collections`` entry point (``prefect block register -m
aicert.flows``). This module imports no TPM or Docker library: the Prefect server imports it
at start-up to register the block types.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from textwrap import dedent
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field

from aicert.tasks.platforms.qemu.provider import (
    DEFAULT_BOOT_TIMEOUT_S as DEFAULT_QEMU_BOOT_TIMEOUT_S,
)
from aicert.tasks.platforms.qemu.provider import (
    DEFAULT_MEMORY_MIB as DEFAULT_QEMU_MEMORY_MIB,
)
from aicert.tasks.platforms.qemu.provider import (
    DEFAULT_SMP as DEFAULT_QEMU_SMP,
)

__all__ = [
    "DOCUMENTATION_URL",
    "AicertRunConfig",
    "LocalPlatform",
    "PlatformBlock",
    "QemuPlatform",
    "load_platform_block",
]

if TYPE_CHECKING:
    from aicert.guest_runtime.config import RunConfig
    from aicert.tasks.platforms.base import Provider
    from aicert.tasks.platforms.local.provider import LocalProvider
    from aicert.tasks.platforms.qemu.provider import QemuProvider

# The documentation site's address (mkdocs.yml ``site_url``): the blocks' documentation links
# and logos are pages and files of that site (docs/blocks.md, docs/assets/logos/). A logo
# cannot travel with the package: Prefect types ``logo_url`` as an http(s) URL and refuses a
# ``data:`` URI.
DOCUMENTATION_URL = "https://aicert.mithrilsecurity.io/en/latest/"
BLOCKS_PAGE_URL = f"{DOCUMENTATION_URL}blocks/"
LOGOS_URL = f"{DOCUMENTATION_URL}assets/logos/"
MAX_CONFIG_YAML_BYTES = 256 * 1024

# Words the UI titles spell their own way (acronyms, product names); others are lower case.
_TITLE_WORDS = {"vm": "VM", "id": "ID", "os": "OS", "vnet": "VNet", "ssh": "SSH", "tpm": "TPM"}


def field_title(name: str, _info: object = None) -> str:
    """The UI title of a field without one: sentence case, acronyms kept ("VM size",
    "Subnet ID"), rather than Prefect's title case ("Vm Size", "Subnet Id")."""
    words = [_TITLE_WORDS.get(word, word) for word in name.split("_")]
    first = words[0] if words[0] in _TITLE_WORDS.values() else words[0].capitalize()
    return " ".join([first, *words[1:]])


def fenced_python(code: str) -> str:
    """A code example as the Prefect UI's "paste this snippet" box reads it: it shows only
    the first fenced ``python`` block (``BLOCK_NAME`` replaced by the block's name)."""
    return f"```python\n{dedent(code).strip()}\n```"


class AicertRunConfig(Block):
    """The run configuration of a certified training (the ``aicert.yaml`` text).

    Its ``load_config()`` validates it exactly as ``aicert run --config`` does, so a typo is
    reported with the field's name before anything is provisioned.
    """

    _block_type_name = "AICert Run Config"
    _block_type_slug = "aicert-run-config"
    _documentation_url = f"{BLOCKS_PAGE_URL}#aicert-run-config"
    _logo_url = f"{LOGOS_URL}aicert-run-config.svg"
    _description = (
        "The configuration of an AICert certified training run: source repository, "
        "resources, image, limits (the aicert.yaml text)."
    )
    _code_example = fenced_python(
        """
        from aicert.flows import AicertRunConfig

        run_config = AicertRunConfig.load("BLOCK_NAME")
        config = run_config.load_config()  # validated as `aicert run --config` does
        """
    )

    config_yaml: str = Field(
        ...,
        title="aicert.yaml",
        description="The run configuration as YAML text, in the format of aicert.yaml.",
        # No schema hint: Prefect's UI (v2, the default) edits every string in a textarea
        # that grows with its content, so the YAML keeps its lines in the form. (Its block
        # page prints values as plain text, lines joined: nothing in the schema changes that.)
    )
    base_dir: str | None = Field(
        default=None,
        title="Base folder",
        description=(
            "Folder that a relative local source.gitRepo path is resolved against "
            "(on the machine that runs the flow)."
        ),
    )

    def load_config(self) -> RunConfig:
        """The validated configuration; raises ``ConfigError`` naming the field (and line)."""
        import yaml

        from aicert.guest_runtime.config import ConfigError, parse_config, resolve_local_source
        from aicert.guest_runtime.strict_yaml import strict_yaml_load

        source = f"block {self._block_document_name or self.get_block_type_slug()}"
        if len(self.config_yaml.encode()) > MAX_CONFIG_YAML_BYTES:
            raise ConfigError([f"config_yaml: larger than {MAX_CONFIG_YAML_BYTES} bytes"], source)
        try:
            data: Any = strict_yaml_load(self.config_yaml)  # no aliases, no duplicate keys
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}:" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError([f"config_yaml:{where} invalid YAML: {problem}"], source) from None
        if not isinstance(data, dict):
            raise ConfigError(["config_yaml: the top level must be a mapping of fields"], source)
        config = parse_config(data, text=self.config_yaml, source=source)
        if (
            _is_local_path(config.source.git_repo)
            and not Path(config.source.git_repo).is_absolute()
        ):
            if self.base_dir is None:
                raise ConfigError(
                    [
                        f"source.gitRepo: {config.source.git_repo!r} is a relative local path; "
                        "set base_dir on the block or give an absolute path or a URL"
                    ],
                    source,
                )
            return resolve_local_source(config, Path(self.base_dir).expanduser())
        return config


def _is_local_path(repo: str) -> bool:
    # The rule of guest_runtime.config.resolve_local_source: a URL scheme or an scp-like
    # "user@host:" address is remote, anything else is a path on the flow's machine.
    return not (re.match(r"^[a-z][a-z0-9+.-]*://", repo) or re.match(r"^[\w.-]+@[\w.-]+:", repo))


class PlatformBlock(Block, ABC):
    """Settings of a platform; ``provider()`` gives the flow its provider. (An interface:
    Prefect does not register block classes that list ``ABC`` among their bases.)"""

    _block_schema_capabilities: ClassVar[list[str]] = ["aicert-platform"]
    model_config = ConfigDict(field_title_generator=field_title)

    @abstractmethod
    def provider(self) -> Provider:
        """A provider configured with these settings."""

    @classmethod
    def get_code_example(cls) -> str | None:
        """The example the Prefect UI shows: load a saved block, make its provider (the same
        for every platform, so written once here; a ``_code_example`` still wins)."""
        if cls._code_example is not None:
            return super().get_code_example()
        variable = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()  # local_platform
        return fenced_python(
            f"from aicert.flows import {cls.__name__}\n\n"
            f'{variable} = {cls.__name__}.load("BLOCK_NAME")\n'
            f"provider = {variable}.provider()  # what the flow provisions machines with\n"
        )


def _home_folder(home: str | None) -> Path | None:
    """A block's ``home`` setting as a folder; ``None`` (empty) leaves the provider's default."""
    return Path(home).expanduser() if home else None


class LocalPlatform(PlatformBlock):
    """Settings of the ``local`` AICert platform: a software TPM and the host's Docker engine.

    It attests what the AICert agent measured but no boot chain, so its certificates verify
    only when the verifier allows the development platform.
    """

    _block_type_name = "AICert Local Platform"
    _block_type_slug = "aicert-local-platform"
    _documentation_url = f"{BLOCKS_PAGE_URL}#aicert-local-platform"
    _logo_url = f"{LOGOS_URL}aicert-local-platform.svg"
    _description = (
        "Settings of the AICert local platform (a software TPM started per run and the "
        "host's Docker engine)."
    )

    home: str | None = Field(
        default=None,
        title="AICert home",
        description=(
            "Folder for the CAs, per-run TPM state, workspaces and logs; "
            "empty means $AICERT_HOME or ~/.aicert."
        ),
    )
    agent_start_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        title="Agent start timeout (seconds)",
        description="How long to wait for a run's guest agent to answer after it was started.",
    )

    keep_spare_tpm: bool = Field(
        default=True,
        title="Keep a spare TPM",
        description=(
            "Manufacture the next run's software TPM in the background while a run trains "
            "(saves about a second of provisioning per run)."
        ),
    )

    def provider(self) -> LocalProvider:
        """The local provider with these settings."""
        from aicert.tasks.platforms.local.provider import LocalProvider

        return LocalProvider(
            _home_folder(self.home),
            agent_start_timeout_s=self.agent_start_timeout_seconds,
            keep_spare_tpm=self.keep_spare_tpm,
        )


class QemuPlatform(PlatformBlock):
    """Settings of the ``qemu`` AICert platform: a VM booted with OVMF and a swtpm vTPM from
    the reproducible guest image, so firmware, kernel, initrd and command line are measured
    and checked against the image's reference values."""

    _block_type_name = "AICert qemu Platform"
    _block_type_slug = "aicert-qemu-platform"
    _documentation_url = f"{BLOCKS_PAGE_URL}#aicert-qemu-platform"
    _logo_url = f"{LOGOS_URL}aicert-qemu-platform.svg"
    _description = (
        "Settings of the AICert qemu platform (OVMF + swtpm vTPM, the guest image built by "
        "`aicert image build-guest`, measured boot checked against its reference values)."
    )

    home: str | None = Field(
        default=None,
        title="AICert home",
        description="Folder for the CAs, guest images and runs; empty means $AICERT_HOME.",
    )
    image: str | None = Field(
        default=None,
        title="Guest image",
        description="Image id (qemu-...), folder or manifest; empty means the last one built.",
    )
    accel: Literal["auto", "tcg", "kvm"] | None = Field(
        default=None,
        title="Accelerator",
        description=(
            "auto: KVM when a probe boots the firmware under it on this host, else software "
            "emulation (tcg; a VM that dies of KVM is booted again with tcg); empty means "
            "$AICERT_QEMU_ACCEL, else auto."
        ),
    )
    memory_mib: int = Field(
        default=DEFAULT_QEMU_MEMORY_MIB,
        ge=512,
        le=1024 * 1024,
        title="Memory (MiB)",
        description="Guest memory; the image's reference values were observed with one size.",
    )
    cpus: int = Field(
        default=DEFAULT_QEMU_SMP,
        ge=1,
        le=256,
        title="Virtual CPUs",
        description="Guest CPUs; like memory, part of the VM shape the reference values hold for.",
    )
    boot_timeout_seconds: float = Field(
        default=DEFAULT_QEMU_BOOT_TIMEOUT_S,
        gt=0,
        le=3600,
        title="Boot timeout (seconds)",
        description="A VM whose agent does not answer by then is torn down and reported.",
    )
    scratch_gib: float | None = Field(
        default=None,
        gt=0,
        le=2048,
        title="Scratch disk (GiB)",
        description=(
            "Size of each run's scratch disk (unpacked inputs, the guest's images, workspace, "
            "outputs; sparse, deleted at teardown); empty means twice the staged inputs plus "
            "8 GiB."
        ),
    )

    def provider(self) -> QemuProvider:
        """The qemu provider with these settings."""
        from aicert.tasks.platforms.qemu.provider import QemuProvider

        return QemuProvider(
            self.image,
            _home_folder(self.home),
            accel=self.accel,
            memory_mib=self.memory_mib,
            smp=self.cpus,
            boot_timeout_s=self.boot_timeout_seconds,
            scratch_gib=self.scratch_gib,
        )


def load_platform_block(name: str) -> PlatformBlock:
    """Load a platform block by ``<type-slug>/<name>``, or a ``LocalPlatform`` by bare name."""
    block = Block.load(name) if "/" in name else LocalPlatform.load(name)
    if not isinstance(block, PlatformBlock):
        raise TypeError(f"platform_block: {name!r} is a {type(block).__name__}, not a platform")
    return block


try:  # Prefect finds a block type only once its class is imported.
    from aicert.flows.azure_platform import AzurePlatform
except ImportError:  # the [azure] extra is not installed
    pass
else:
    __all__ += ["AzurePlatform"]
try:
    from aicert.flows.gcp_platform import GcpPlatform
except ImportError:  # the [gcp] extra is not installed
    pass
else:
    __all__ += ["GcpPlatform"]
