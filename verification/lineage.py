"""Lineage: following a certified input (``certifiedBy``) back to the certificate that made it.

A run whose resource is an output of an earlier certificate measures an
``aicert.input.certified-resource`` event: the file's SHA-256, the parent certificate's
SHA-256 (``certificate_sha256`` below), the parent's run id and the output path. Verifying the
child proves that binding; this module checks it against the parents the caller supplies:
each parent is verified with the child's trust policy, recursively (depth and cycles bounded),
its digest must be the bound one, and it must certify that output path with that digest.

A link whose parent was not supplied is reported as unverified (``LineageLink.parent`` is
None), or refused with ``require_lineage``. A supplied parent that is the parent of no link is
refused: the caller gave the wrong certificate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from aicert.appevents import CertifiedResourceEvent, ResourceEvent
from aicert.canonical import canonical_sha256
from aicert.errors import (
    LineageCertificateDigestError,
    LineageCycleError,
    LineageDepthError,
    LineageMissingParentError,
    LineageOutputError,
    LineageParentError,
    LineageUnusedParentError,
    VerificationError,
)
from aicert.model import Certificate, load

if TYPE_CHECKING:
    from aicert.verify import VerificationReport

# Links from a certificate to its furthest ancestor: deeper is refused (a pretrain ->
# fine-tune -> evaluate chain is 2; 32 leaves room for long fine-tuning histories).
MAX_LINEAGE_DEPTH = 32
# Parents one verification takes: each is verified once, however many links name it.
MAX_PARENTS = 1024

ParentCertificate = Certificate | str | os.PathLike[str]
"""A parent given to the verifier: a parsed certificate, or the path of its file."""


def certificate_sha256(certificate: Certificate) -> str:
    """The certificate's identity in a lineage link: SHA-256 of the RFC 8785 canonical JSON
    of the certificate as parsed (so whitespace or key order of the file do not matter, any
    change to a value does).

    Args:
        certificate: a parsed certificate.

    Returns:
        64 lowercase hex characters.
    """
    return canonical_sha256(json.loads(certificate.to_json_bytes())).hex()


@dataclass(frozen=True)
class LineageNode:
    """A parent certificate that verified, and its own links."""

    run_id: str
    project: str
    platform: str
    certificate_sha256: str
    links: tuple[LineageLink, ...]
    # The parent's measured resources (data, weights) as (destination, sha256): what the
    # chain goes back to.
    resources: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, object]:
        """The node as JSON values (``VerificationReport.to_dict``'s ``lineage`` entries)."""
        return {
            "run_id": self.run_id,
            "project": self.project,
            "platform": self.platform,
            "certificate_sha256": self.certificate_sha256,
            "resources": [{"name": name, "sha256": digest} for name, digest in self.resources],
            "links": [link.to_dict() for link in self.links],
        }


@dataclass(frozen=True)
class LineageLink:
    """One certified input: what the child measured, and the verified parent (None: the
    parent was not supplied, so the link is unverified)."""

    destination: str
    url: str
    sha256: str
    certificate_sha256: str
    run_id: str
    output: str
    parent: LineageNode | None = None

    @property
    def verified(self) -> bool:
        """Whether the parent was supplied, verified and certifies this output."""
        return self.parent is not None

    @classmethod
    def from_event(cls, event: CertifiedResourceEvent) -> LineageLink:
        """The unverified link a certified-resource event binds."""
        return cls(
            destination=event.destination,
            url=event.url,
            sha256=event.sha256,
            certificate_sha256=event.certificate_sha256,
            run_id=event.run_id,
            output=event.output,
        )

    def to_dict(self) -> dict[str, object]:
        """The link as JSON values, with its parent's subtree when verified."""
        return {
            "destination": self.destination,
            "url": self.url,
            "sha256": self.sha256,
            "certificate_sha256": self.certificate_sha256,
            "run_id": self.run_id,
            "output": self.output,
            "verified": self.verified,
            "parent": None if self.parent is None else self.parent.to_dict(),
        }


def measured_links(resources: Iterable[ResourceEvent]) -> tuple[LineageLink, ...]:
    """The unverified links of a replayed log's resources (the certified ones)."""
    return tuple(
        LineageLink.from_event(resource)
        for resource in resources
        if isinstance(resource, CertifiedResourceEvent)
    )


def load_parents(parents: Iterable[ParentCertificate]) -> list[Certificate]:
    """The caller's parents as certificates (paths are read and parsed).

    Raises:
        TypeError: ``parents`` is one certificate or path rather than a list, or holds
            something else.
        ValueError: more than ``MAX_PARENTS``.
        MalformedCertificateError: a parent file is not a certificate.
    """
    if isinstance(parents, Certificate | str | bytes | os.PathLike):
        raise TypeError(
            f"parents must be a list of certificates or paths, not one {type(parents).__name__}"
        )
    loaded: list[Certificate] = []
    for index, parent in enumerate(parents):
        if isinstance(parent, Certificate):
            loaded.append(parent)
        elif isinstance(parent, str | os.PathLike):
            loaded.append(load(parent))
        else:
            raise TypeError(
                f"parents[{index}] must be a Certificate or a path, not {type(parent).__name__}"
            )
        if len(loaded) > MAX_PARENTS:
            raise ValueError(f"parents: more than {MAX_PARENTS} certificates")
    return loaded


VerifyParent = Callable[[Certificate], "VerificationReport"]
"""Verifies one parent with the child's trust policy (no parents, no lineage requirement)."""


class _Walk:
    """One lineage walk: the supplied parents by run id, each verified at most once."""

    def __init__(
        self, parents: Sequence[Certificate], verify_parent: VerifyParent, require: bool
    ) -> None:
        self.by_run: dict[str, list[tuple[str, Certificate]]] = {}
        for parent in parents:
            entry = (certificate_sha256(parent), parent)
            self.by_run.setdefault(parent.run.id, []).append(entry)
        self.verify_parent = verify_parent
        self.require = require
        self.used: set[str] = set()
        self.verified: dict[str, VerificationReport] = {}

    def links(
        self, links: Sequence[LineageLink], path: tuple[str, ...], owner: str
    ) -> tuple[LineageLink, ...]:
        """``owner``'s links (its certificate SHA-256 last on ``path``), each checked."""
        if links and len(path) > MAX_LINEAGE_DEPTH:
            raise LineageDepthError(
                f"lineage: more than {MAX_LINEAGE_DEPTH} links from the certificate to "
                f"an ancestor (at run {links[0].run_id})"
            )
        return tuple(self.link(link, path, owner) for link in links)

    def link(self, link: LineageLink, path: tuple[str, ...], owner: str) -> LineageLink:
        where = (
            f"lineage link {link.destination} of run {owner} "
            f"(parent run {link.run_id}, output {link.output})"
        )
        if link.certificate_sha256 in path:
            raise LineageCycleError(
                f"{where}: certificate {link.certificate_sha256} is its own ancestor"
            )
        candidates = self.by_run.get(link.run_id, [])
        if not candidates:
            if self.require:
                raise LineageMissingParentError(
                    f"{where}: its parent certificate was not supplied, the link is unverified"
                )
            return link
        parent = next((c for d, c in candidates if d == link.certificate_sha256), None)
        if parent is None:
            supplied = ", ".join(d for d, _ in candidates)
            raise LineageCertificateDigestError(
                f"{where}: the child bound certificate SHA-256 {link.certificate_sha256}, "
                f"the supplied certificate(s) of run {link.run_id} have {supplied} "
                "(edited, or another certificate)"
            )
        self.used.add(link.certificate_sha256)
        report = self._verified(link, parent, where)
        _check_output(report, link, where)
        node = LineageNode(
            run_id=report.run_id,
            project=report.project,
            platform=report.platform,
            certificate_sha256=link.certificate_sha256,
            links=self.links(report.lineage, (*path, link.certificate_sha256), report.run_id),
            resources=tuple(
                (item.name, item.digest["sha256"])
                for item in report.inputs
                if item.kind == "resource"
            ),
        )
        return replace(link, parent=node)

    def _verified(self, link: LineageLink, parent: Certificate, where: str) -> VerificationReport:
        report = self.verified.get(link.certificate_sha256)
        if report is None:
            try:
                report = self.verify_parent(parent)
            except VerificationError as exc:
                raise LineageParentError(
                    f"{where}: the parent certificate does not verify: {type(exc).__name__}: {exc}"
                ) from exc
            self.verified[link.certificate_sha256] = report
        return report


def _check_output(report: VerificationReport, link: LineageLink, where: str) -> None:
    """The parent certifies ``link.output`` with the digest the child measured."""
    output = next((o for o in report.outputs if o.path == link.output), None)
    if output is None:
        raise LineageOutputError(f"{where}: the parent certifies no output {link.output}")
    if output.digest["sha256"] != link.sha256:
        raise LineageOutputError(
            f"{where}: the parent certifies {link.output} as {output.digest['sha256']}, "
            f"the child measured {link.sha256}"
        )


def follow_lineage(
    certificate: Certificate,
    links: Sequence[LineageLink],
    parents: Sequence[Certificate],
    verify_parent: VerifyParent,
    *,
    require_lineage: bool = False,
) -> tuple[LineageLink, ...]:
    """Check every link of a verified certificate against the supplied parents.

    Args:
        certificate: the child (already verified).
        links: its measured links (``measured_links``).
        parents: the supplied parent certificates, any depth of the lineage.
        verify_parent: verifies one parent with the child's trust policy.
        require_lineage: refuse a link whose parent was not supplied.

    Returns:
        The links, each with its verified parent subtree (or unverified).

    Raises:
        LineageError: the subclass naming the failed link (see ``aicert.errors``).
    """
    walk = _Walk(parents, verify_parent, require_lineage)
    result = walk.links(links, (certificate_sha256(certificate),), certificate.run.id)
    for digests in walk.by_run.values():
        for digest, parent in digests:
            if digest not in walk.used:
                raise LineageUnusedParentError(
                    f"parent {parent.run.id} (certificate {digest}) is the parent of no "
                    "lineage link: the wrong parent was supplied"
                )
    return result


def lineage_rows(links: Sequence[LineageLink], depth: int = 0) -> list[tuple[int, LineageLink]]:
    """The tree as (depth, link) rows in order, for a table (each link, then its parent's)."""
    rows: list[tuple[int, LineageLink]] = []
    for link in links:
        rows.append((depth, link))
        if link.parent is not None:
            rows += lineage_rows(link.parent.links, depth + 1)
    return rows
