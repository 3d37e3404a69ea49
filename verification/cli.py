"""The ``aicert`` command. ``verify``, ``inspect`` and ``reference-values ...`` (boot
reference-value sets, :mod:`aicert.reference_values_cli`) need only the verifier; the builder's
commands (``run``, ``cleanup``, ``image``) are added through the ``aicert.cli`` entry-point
group when the ``flows`` extra is installed.

Exit codes: 0 success, 1 verification or run failure, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from cryptography import x509
from rich.console import Console
from rich.table import Table

import aicert
from aicert.errors import MalformedCertificateError, PlatformError, VerificationError
from aicert.gpus import GPU_FACTS_NOTE, GpuEvent
from aicert.lineage import lineage_rows
from aicert.metrics import thresholds_of
from aicert.policy import VerificationPolicy, load_policy
from aicert.reference_value_sets import PlatformReferenceValues, load_reference_values
from aicert.reference_values_cli import app as reference_values_app
from aicert.trust_anchors import load_trust_roots

app = typer.Typer(
    name="aicert",
    help="Verifiable provenance for AI models: certify training runs, verify certificates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
error_console = Console(stderr=True)
app.add_typer(reference_values_app, name="reference-values")


TrustRootOption = Annotated[
    list[Path] | None,
    typer.Option("--trust-root", help="PEM of a trusted AK root (local/qemu platform CA)."),
]
"""``--trust-root``, shared by every command that verifies a certificate."""
ReferenceValuesOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--reference-values",
        help="A reference-value set (reference-values.json): judges a qemu or Azure boot.",
    ),
]
"""``--reference-values``, shared by every command that verifies a certificate."""
AllowDevPlatformOption = Annotated[
    bool,
    typer.Option(help="Accept a local-platform certificate (no boot chain attested)."),
]
"""``--allow-dev-platform``, shared by every command that verifies a certificate."""


def load_trust_options(
    trust_root: list[Path] | None, reference_values: list[Path] | None, *, as_json: bool = False
) -> tuple[list[x509.Certificate], list[PlatformReferenceValues]]:
    """The trust roots and reference-value sets named on the command line, loaded.

    These are the verifier's own inputs: an unreadable or invalid file is bad input (exit 2,
    the file named), not a certificate that failed verification.

    Args:
        trust_root: the ``--trust-root`` PEM files.
        reference_values: the ``--reference-values`` files.
        as_json: report a failure as a JSON object (``--json``).
    """
    try:
        roots = load_trust_roots(trust_root or [])
        references = [load_reference_values(path) for path in reference_values or []]
    except (ValueError, PlatformError) as exc:
        fail(exc, as_json, code=2)
    return roots, references


def _short(digest: str) -> str:
    return digest[:16] + "…"


def _io_table(report: aicert.VerificationReport) -> Table:
    table = Table(title="What the certificate binds (sha256 shortened: --json for all)")
    for column in ("", "kind", "name", "version", "size"):
        table.add_column(column, overflow="fold")
    table.add_column("sha256", no_wrap=True)
    for item in report.inputs:
        version = item.version or ""
        if item.kind == "source" and "sha1" in item.digest:
            version = f"{version} @{item.digest['sha1'][:12]}".strip()
        table.add_row(
            "in",
            item.kind,
            item.name,
            version,
            "" if item.size is None else str(item.size),
            _short(item.digest["sha256"]),
        )
    for output in report.outputs:
        table.add_row(
            "out", "file", output.path, "", str(output.size), _short(output.digest["sha256"])
        )
    return table


def _lineage_table(report: aicert.VerificationReport) -> Table:
    """The lineage as a tree: each certified input, then its parent's own certified inputs."""
    table = Table(title="Lineage (certified inputs and the certificates that produced them)")
    for column in ("input", "from run", "output", "sha256", "parent", "parent's resources"):
        table.add_column(column, overflow="fold")
    for depth, link in lineage_rows(report.lineage):
        status = "[green]verified[/green]" if link.verified else "[yellow]unverified[/yellow]"
        resources = link.parent.resources if link.parent is not None else ()
        table.add_row(
            "  " * depth + ("└ " if depth else "") + link.destination,
            link.run_id,
            link.output,
            _short(link.sha256),
            status,
            "\n".join(f"{name} {_short(digest)}" for name, digest in resources),
        )
    return table


def _metrics_table(report: aicert.VerificationReport) -> Table:
    """The results file's metrics: bound by the quote, not read from a file."""
    table = Table(title="Certified metrics (from the measured results file)")
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right")
    for name, value in sorted(report.metrics.items()):
        table.add_row(name, f"{value:g}")
    return table


def _gpus_table(gpus: GpuEvent) -> Table:
    """The GPUs the job had, under a title that says what they are: nvidia-smi's answer,
    measured and bound, not attested hardware."""
    table = Table(
        title=f"GPUs {GPU_FACTS_NOTE} (driver {gpus.driver_version}, CUDA {gpus.cuda_version})"
    )
    for column in ("index", "model", "uuid", "memory MiB"):
        table.add_column(column, overflow="fold")
    for device in gpus.devices:
        table.add_row(str(device.index), device.name, device.uuid, str(device.memory_total_mib))
    return table


@app.command()
def verify(
    certificate: Annotated[Path, typer.Argument(help="The certificate (proof) JSON file.")],
    trust_root: TrustRootOption = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="A model file or folder to re-hash.")
    ] = None,
    expect: Annotated[
        list[str] | None,
        typer.Option("--expect", help="NAME=SHA256: an input the certificate must contain."),
    ] = None,
    allow_dev_platform: AllowDevPlatformOption = False,
    reference_values: ReferenceValuesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    parent: Annotated[
        list[Path] | None,
        typer.Option(
            "--parent",
            help="A parent certificate of a certified input (any depth of the lineage).",
        ),
    ] = None,
    require_lineage: Annotated[
        bool, typer.Option(help="Fail when a certified input's parent is not supplied.")
    ] = False,
    expect_metric: Annotated[
        list[str] | None,
        typer.Option(
            "--expect-metric", help="NAME>=NUMBER (>=, <=, >, <, ==): a certified metric's bound."
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help=(
                "A verification policy, JSON or YAML (aicert-policy/v1; YAML needs PyYAML): "
                "every failed rule is named."
            ),
        ),
    ] = None,
) -> None:
    """Verify a certificate offline; exit 0 only when every check passed."""
    expected: dict[str, str] = {}
    for item in expect or []:
        name, sep, digest = item.rpartition("=")
        if not sep or not name:
            error_console.print(f"[red]--expect {item!r}: use NAME=SHA256[/red]")
            raise typer.Exit(2)
        expected[name] = digest
    roots, references = load_trust_options(trust_root, reference_values, as_json=as_json)
    try:
        thresholds = thresholds_of(expect_metric or [])
        rules: VerificationPolicy | None = None if policy is None else load_policy(policy)
    except ValueError as exc:
        fail(exc, as_json, code=2)
    try:
        report = aicert.load(certificate).verify(
            reference_values=references,
            trusted_roots=roots,
            expected_inputs=expected or None,
            allow_dev_platform=allow_dev_platform,
            model=model,
            parents=parent or [],
            require_lineage=require_lineage,
            expected_metrics=thresholds,
            policy=rules,
        )
    except MalformedCertificateError as exc:
        fail(exc, as_json, code=2)
    except VerificationError as exc:
        fail(exc, as_json, code=1)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console.print(f"[bold green]VERIFIED[/bold green] {certificate} (run {report.run_id})")
    for check in report.checks:
        # Not attested: the dev platform's boot, and GPUs only nvidia-smi vouched for.
        if (check.name == "platform" and not report.boot_chain_attested) or check.name == "gpus":
            console.print(f"  [yellow]![/yellow] {check.name}: {check.detail}")
        else:
            console.print(f"  [green]✓[/green] {check.name}: {check.detail}")
    console.print(_io_table(report))
    if report.gpus is not None:
        console.print(_gpus_table(report.gpus))
    if report.metrics:
        console.print(_metrics_table(report))
    if report.lineage:
        console.print(_lineage_table(report))


def fail(exc: Exception, as_json: bool, code: int) -> NoReturn:
    """Report ``exc`` as NOT VERIFIED (or as the ``--json`` error object) and exit ``code``.

    Args:
        exc: the error; its type name and message are shown.
        as_json: print ``{"verified": false, "error": ..., "message": ...}`` instead.
        code: the exit code (1 not verified, 2 bad input).
    """
    if as_json:
        print(json.dumps({"verified": False, "error": type(exc).__name__, "message": str(exc)}))
    else:
        error_console.print(f"[bold red]NOT VERIFIED[/bold red] {type(exc).__name__}: {exc}")
    raise typer.Exit(code)


@app.command()
def inspect(
    certificate: Annotated[Path, typer.Argument(help="The certificate (proof) JSON file.")],
) -> None:
    """Show what a certificate claims, WITHOUT verifying it (use `aicert verify` for that)."""
    try:
        cert = aicert.load(certificate)
    except MalformedCertificateError as exc:
        error_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(f"[bold]{certificate}[/bold]  format {cert.format}  [yellow](not verified)[/]")
    run = cert.run
    console.print(
        f"run {run.id}  project {run.project}  platform {cert.platform.kind}  "
        f"exit {run.exit_code}  {run.duration_ms / 1000:.1f} s  runtime {run.runtime_version}"
    )
    console.print(f"started {run.started_at.isoformat()}  finished {run.finished_at.isoformat()}")
    table = Table(title="Claimed inputs and outputs")
    for column in ("", "kind", "name", "size", "sha256"):
        table.add_column(column, overflow="fold")
    for item in cert.inputs:
        table.add_row(
            "in", item.kind, item.name, str(item.size or ""), _short(item.digest["sha256"])
        )
    for output in cert.outputs:
        table.add_row("out", "file", output.path, str(output.size), _short(output.digest["sha256"]))
    console.print(table)
    console.print(
        f"{len(cert.event_log)} events; AK chain of {len(cert.attestation.ak.certificate_chain)}"
    )


CLI_PLUGIN_GROUP = "aicert.cli"
"""Entry-point group of the commands other parts add: each entry is a ``register(app)``
callable that adds its commands to the ``aicert`` Typer app (the builder's ``run``,
``cleanup``, ``image`` come from ``aicert.flows.cli`` this way). The verifier itself imports
none of them."""


def _register_plugin_commands() -> list[str]:
    """Add every installed plugin's commands; return why the plugins that failed to import
    did (a verifier-only install lacks the builder's dependencies: ``aicert verify`` must still
    work there)."""
    failures = []
    for entry in entry_points(group=CLI_PLUGIN_GROUP):
        try:
            register = entry.load()
        except ImportError as exc:
            failures.append(f"the {entry.name!r} commands ({entry.value}) are unavailable: {exc}")
            continue
        register(app)
    return failures


def _command_names() -> set[str]:
    names = {
        command.name or (command.callback.__name__.replace("_", "-") if command.callback else "")
        for command in app.registered_commands
    }
    return names | {group.name for group in app.registered_groups if group.name}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # The seed's form `aicert --output-bom proof.json` means `aicert run --output-bom ...`.
    if args and args[0].startswith("--") and args[0] not in ("--help", "--version"):
        args.insert(0, "run")
    failures = _register_plugin_commands()
    if failures and args and not args[0].startswith("-") and args[0] not in _command_names():
        # An unknown command may be one a plugin would have added: say why it is missing.
        for failure in failures:
            error_console.print(f"[yellow]{failure}[/yellow]")
    app(args=args, prog_name="aicert")


if __name__ == "__main__":
    main()
