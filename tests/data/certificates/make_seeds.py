"""Regenerate the seed certificates of every platform by real certified runs, in one command.

    .venv/bin/python tests/data/certificates/make_seeds.py [--attempts N] [local qemu azure]

Each seed is the certificate of a test that makes one and verifies it, captured when that test
passes (nothing is re-implemented here: the seeds are exactly what the suite certifies):

- local: ``tests/aicert_flows/test_certify_flow.py``: a small git project certified through the
  Prefect flow on the local platform (swtpm, Docker), verified with the platform CA.
- qemu: ``tests/tasks/platforms/qemu/test_qemu_certify.py``: the bundled example certified
  through the flow on a real VM (OVMF + swtpm vTPM under qemu tcg), verified with the boot chain.
- azure: ``tests/tasks/platforms/azure/test_azure_certify_flow.py``: the flow against the local
  double of Azure's ARM API, the agent on a swtpm dressed as an Azure vTPM (generated root, not
  Microsoft's: stored here and passed as a trusted root), a real shim boot log.

One pytest session (a process of its own) runs the three (one Prefect server, one base image),
then each captured seed is verified with its stored options before it replaces the old one. A
platform whose test failed is tried again in a fresh session (``--attempts``, default 2: a qemu
boot can time out on a loaded machine); one that still fails keeps its old seed and the script
exits 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:  # run as a script: make ``tests`` importable
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402

from aicert.hashing import hash_tree  # noqa: E402
from aicert.model import Certificate  # noqa: E402
from tests.verification.verify.seeds import (  # noqa: E402
    CERTIFICATE_FILE,
    CERTIFICATES,
    PLATFORMS,
    SEED_FILE,
    load_seed,
)

Platform = Literal["local", "qemu", "azure"]

# The test that makes and verifies each platform's certificate; its fixtures are read when
# it has passed.
SOURCES: dict[Platform, str] = {
    "local": "tests/aicert_flows/test_certify_flow.py::test_output_bom_verifies_with_the_sdk",
    "qemu": (
        "tests/tasks/platforms/qemu/test_qemu_certify.py::"
        "test_certificate_verifies_with_the_boot_chain"
    ),
    "azure": (
        "tests/tasks/platforms/azure/test_azure_certify_flow.py::"
        "test_flow_certifies_and_the_certificate_verifies_as_azure"
    ),
}


@dataclass(frozen=True)
class Captured:
    """What a passed test's fixtures held: the files of one seed."""

    certificate: Path
    trust_root: Path
    reference_values: Path | None
    outputs: Path  # the folder of the certified model outputs


def _capture(platform: Platform, funcargs: dict[str, object]) -> Captured:
    # Attribute names of the fixtures' dataclasses (CertifiedRun, CertifiedOnQemu,
    # AzureFlowRun + Published): read loosely, checked by the verification below.
    if platform == "local":
        from aicert.tasks.platforms.local.provider import platform_ca_certificate_path

        run = funcargs["certified"]
        return Captured(
            certificate=Path(run.bom),  # type: ignore[attr-defined]
            trust_root=platform_ca_certificate_path(run.home),  # type: ignore[attr-defined]
            reference_values=None,
            outputs=Path(run.outputs_dir),  # type: ignore[attr-defined]
        )
    if platform == "qemu":
        run = funcargs["certified_on_qemu"]
        image = funcargs["guest_image"]
        return Captured(
            certificate=Path(run.certificate),  # type: ignore[attr-defined]
            trust_root=Path(run.platform_ca),  # type: ignore[attr-defined]
            reference_values=Path(image.manifest),  # type: ignore[attr-defined]
            outputs=Path(run.model),  # type: ignore[attr-defined]
        )
    run = funcargs["certified"]
    published = funcargs["published"]
    result = cast(dict[str, dict[str, str]], run.result)  # type: ignore[attr-defined]
    return Captured(
        certificate=Path(result["certificate"]["path"]),
        trust_root=Path(published.root_pem),  # type: ignore[attr-defined]
        reference_values=Path(published.reference_values),  # type: ignore[attr-defined]
        outputs=Path(cast(dict[str, str], run.result)["workspace"]) / "outputs",  # type: ignore[attr-defined]
    )


class SeedCapture:
    """A pytest plugin: when a source test passes, copy its certificate and trust material
    into a staging folder (the run's temporary folders are gone after the session)."""

    def __init__(self, staging: Path, wanted: tuple[Platform, ...]) -> None:
        self.staging = staging
        self.by_test = {SOURCES[p].rsplit("::", 1)[1]: p for p in wanted}
        self.staged: dict[Platform, Path] = {}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        result = yield  # re-raises when the test failed: nothing is captured then
        platform = self.by_test.get(item.name)
        if platform is not None:
            self.staged[platform] = self._stage(
                platform, _capture(platform, getattr(item, "funcargs", {}))
            )
        return result

    def _stage(self, platform: Platform, captured: Captured) -> Path:
        folder = self.staging / platform
        folder.mkdir(parents=True)
        shutil.copyfile(captured.certificate, folder / CERTIFICATE_FILE)
        root_name = "azure-like-root.pem" if platform == "azure" else "platform-ca.pem"
        shutil.copyfile(captured.trust_root, folder / root_name)
        if captured.reference_values is not None:
            shutil.copyfile(captured.reference_values, folder / "reference-values.json")
        certificate = Certificate.from_json_bytes((folder / CERTIFICATE_FILE).read_bytes())
        manifest = {
            "platform": platform,
            "made_by": SOURCES[platform],
            "made_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "trusted_roots": [root_name],
            "reference_values": (
                "reference-values.json" if captured.reference_values is not None else None
            ),
            "allow_dev_platform": platform == "local",
            # The AK certificates of the local and qemu platform CA live one day: the seeds
            # are judged at the end of their run, as a verifier does by default.
            "at_time": certificate.run.finished_at.isoformat(),
            "outputs": {d.path: d.sha256 for d in hash_tree(captured.outputs)},
        }
        (folder / SEED_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return folder


# How long a qemu VM of the seeds session may take to boot: the provider's 180 s is too short
# on a loaded 2-core machine (the observation boot of a freshly built image and the run's
# boot have both passed it there); what the VM measures does not depend on how long it took.
SEED_BOOT_TIMEOUT_S = 600.0


def capture(staging: Path, wanted: tuple[Platform, ...]) -> int:
    """One pytest session over the source tests of ``wanted``, staging what passed."""
    from aicert.tasks.platforms.qemu.provider import QemuProvider

    keyword_defaults = QemuProvider.__init__.__kwdefaults__ or {}
    if "boot_timeout_s" in keyword_defaults:
        keyword_defaults["boot_timeout_s"] = SEED_BOOT_TIMEOUT_S
    plugin = SeedCapture(staging, wanted)
    return int(
        pytest.main(
            # A qemu test's setup builds and observes a changed guest image, then certifies:
            # longer than the suite's 600 s per test on a loaded machine.
            ["-p", "no:cacheprovider", "-q", "--timeout", "2400", "--rootdir", str(REPO_ROOT)]
            + [str(REPO_ROOT / SOURCES[p]) for p in wanted],
            plugins=[plugin],
        )
    )


def install(platform: Platform, folder: Path) -> str | None:
    """Replace the stored seed of ``platform`` by the staged one if it verifies with its
    stored options and its report names the outputs the run produced; else keep the old one
    and say why."""
    target = CERTIFICATES / platform
    backup = CERTIFICATES / f".old-{platform}"
    if target.exists():
        target.rename(backup)
    shutil.move(folder, target)
    try:
        seed = load_seed(platform)
        report = seed.verify()
        measured = {o.path: o.digest["sha256"] for o in report.outputs}
        if measured != seed.outputs:
            raise AssertionError(f"outputs {measured} differ from the run's {seed.outputs}")
    except Exception as exc:
        shutil.rmtree(target)
        if backup.exists():
            backup.rename(target)
        return f"the captured seed does not verify: {exc!r}"
    shutil.rmtree(backup, ignore_errors=True)
    return None


def main(argv: list[str]) -> int:
    if argv[:1] == ["--capture-into"]:  # one attempt, in a process of its own
        return capture(Path(argv[1]), tuple(cast(Platform, p) for p in argv[2:]))
    attempts = 2
    if argv[:1] == ["--attempts"]:
        attempts, argv = int(argv[1]), argv[2:]
    wanted = tuple(cast(Platform, p) for p in (argv or PLATFORMS))
    unknown = [p for p in wanted if p not in PLATFORMS]
    if unknown:
        print(f"unknown platform(s) {unknown}; choose from {PLATFORMS}", file=sys.stderr)
        return 2
    started = time.monotonic()
    remaining = list(wanted)
    for attempt in range(1, attempts + 1):
        # A fresh process per attempt: a fresh Prefect server, fixtures and VMs. Under load
        # a qemu boot can time out (deployments/qemu/README.md); the next attempt boots again.
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=CERTIFICATES) as name:
            status = subprocess.run(
                [sys.executable, __file__, "--capture-into", name, *remaining],
                cwd=REPO_ROOT,
                check=False,
            ).returncode
            for platform in list(remaining):
                staged = Path(name) / platform
                if not staged.is_dir():
                    print(f"{platform}: its test failed (attempt {attempt}, pytest {status})")
                    continue
                problem = install(platform, staged)
                if problem is not None:
                    print(f"{platform}: {problem}", file=sys.stderr)
                    continue
                remaining.remove(platform)
                print(
                    f"{platform}: {(CERTIFICATES / platform).relative_to(REPO_ROOT)} <- "
                    f"{SOURCES[platform]}"
                )
        if not remaining:
            break
    print(f"seeds made in {time.monotonic() - started:.0f} s")
    if remaining:
        print(f"NOT regenerated (old seeds kept): {remaining}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
