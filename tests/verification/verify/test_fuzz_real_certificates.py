"""A mutation fuzzer over the real certificates of every platform (tests/data/certificates/).

Each seed (a certificate made by a real certified run on the local, qemu and Azure-double
platforms) is mutated ``AICERT_FUZZ_MUTATIONS`` times in all (default 10,200, a third per
seed) by ``fuzzing.mutate``: JSON fields replaced, removed, duplicated, retyped, edited;
application events moved, swapped, dropped, duplicated, moved between PCRs or into the boot
log; TPMS_ATTEST, TPMT_SIGNATURE, TPMT_PUBLIC and the boot event log flipped, truncated, their
length fields changed, re-encoded with other content; the AK chain reordered, cut, swapped;
fields spliced from the other platforms' certificates. Every mutant is parsed and verified
with the seed's own options. Two properties must hold for every one:

- nothing but a ``VerificationError`` subclass escapes (any other exception fails the test,
  naming the mutation and how to rebuild it alone);
- a mutant that verifies shows exactly the seed's report (``report.to_dict()`` without
  ``verified_at_time``, which is the caller's ``at_time``, not the certificate's).

The run is deterministic: the seed ``AICERT_FUZZ_SEED`` (default ``FUZZ_SEED``) and the mutant's
index fix every choice; ``AICERT_FUZZ_CASE=<platform>:<index>`` runs that one mutant. A summary
(mutations per category, outcomes per exception type) is printed at the end of the session.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from aicert.errors import VerificationError
from aicert.model import Certificate
from aicert.tcg_eventlog import parse_event_log
from aicert.tpm_structures import parse_attest, parse_signature, parse_tpmt_public

from .fuzzing import (
    CATEGORIES,
    Context,
    Mutant,
    SeedDocument,
    marshal_attest,
    marshal_event_log,
    marshal_public,
    marshal_signature,
    mutate,
    split_header,
)
from .seeds import PLATFORMS, Seed, load_seed

FUZZ_SEED = 20261202
DEFAULT_MUTATIONS = 10_200
# Not from the certificate: the caller's at_time (the seeds pass their run's end).
CALLER_FIELDS = frozenset({"verified_at_time"})


def fuzz_seed() -> int:
    """The run's seed: ``AICERT_FUZZ_SEED``, else the fixed ``FUZZ_SEED``."""
    return int(os.environ.get("AICERT_FUZZ_SEED", FUZZ_SEED))


def mutations_per_seed() -> int:
    """``AICERT_FUZZ_MUTATIONS`` (default ``DEFAULT_MUTATIONS``) shared by the seeds."""
    total = int(os.environ.get("AICERT_FUZZ_MUTATIONS", DEFAULT_MUTATIONS))
    return -(-total // len(PLATFORMS))


def only_case() -> tuple[str, int] | None:
    """``AICERT_FUZZ_CASE=<platform>:<index>``: the one mutant to run, if set."""
    case = os.environ.get("AICERT_FUZZ_CASE")
    if not case:
        return None
    platform, index = case.split(":")
    return platform, int(index)


def report_view(report_dict: dict[str, object]) -> dict[str, object]:
    """What a report shows that comes from the certificate."""
    return {k: v for k, v in report_dict.items() if k not in CALLER_FIELDS}


@dataclass
class Summary:
    """What a campaign did, for the end-of-session summary."""

    per_category: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    per_platform: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # per category
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


SUMMARY = Summary()


@pytest.fixture(scope="module", autouse=True)
def print_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: the summary on the terminal, past output capturing (a module
    fixture's teardown is captured like a test's, and shown only with ``-rA``)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not SUMMARY.per_platform or reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        for line in summary_lines():
            reporter.write_line(line)


def summary_lines() -> list[str]:
    """The campaign's summary: mutations per seed and category, outcomes, what verified."""
    total = sum(SUMMARY.per_platform.values())
    lines = ["", f"== certificate fuzzer: seed {fuzz_seed()}, {total} mutations =="]
    for platform, count in SUMMARY.per_platform.items():
        lines.append(
            f"{platform}: {count} mutations in {SUMMARY.seconds[platform]:.1f} s "
            f"({SUMMARY.cpu_seconds[platform]:.1f} s of CPU)"
        )
    lines.append("mutations per category:")
    lines += [f"  {c:26} {n}" for c, n in sorted(SUMMARY.per_category.items())]
    lines.append("outcomes:")
    lines += [f"  {o:60} {n}" for o, n in SUMMARY.outcomes.most_common()]
    lines.append("accepted (with the seed's report), per seed and category:")
    lines += [f"  {c:34} {n}" for c, n in sorted(SUMMARY.accepted.items())]
    lines += [f"FAILED: {failure}" for failure in SUMMARY.failures[:20]]
    return lines


@pytest.fixture(scope="module")
def seeds() -> dict[str, Seed]:
    return {platform: load_seed(platform) for platform in PLATFORMS}


@pytest.fixture(scope="module")
def documents(seeds: dict[str, Seed]) -> dict[str, SeedDocument]:
    return {platform: SeedDocument.of(platform, seed.raw) for platform, seed in seeds.items()}


# -- the seeds themselves ------------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
def test_seed_verifies_with_its_stored_options(seeds: dict[str, Seed], platform: str) -> None:
    seed = seeds[platform]
    report = seed.verify()
    assert report.platform == platform
    assert report.boot_chain_attested == (platform != "local")
    assert {o.path: o.digest["sha256"] for o in report.outputs} == seed.outputs


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_marshallers_re_encode_the_seed_byte_for_byte(
    documents: dict[str, SeedDocument], platform: str
) -> None:
    """The re-encoding mutations change content, not encoding: unchanged, they round-trip."""
    document = documents[platform]
    attest = document.b64("attest")
    assert marshal_attest(parse_attest(attest)) == attest
    signature = document.b64("signature")
    assert marshal_signature(parse_signature(signature)) == signature
    public = document.b64("public")
    assert marshal_public(parse_tpmt_public(public)) == public
    if document.boot_log_raw is not None:
        log = parse_event_log(document.boot_log_raw)
        header, _ = split_header(document.boot_log_raw)
        assert marshal_event_log(header, list(log.events), log.banks) == document.boot_log_raw


# -- the campaign --------------------------------------------------------------------------------


def run_mutant(seed: Seed, expected: dict[str, object], mutant: Mutant) -> str:
    """The outcome of one mutant; raises ``AssertionError`` when a property is broken."""
    try:
        certificate = Certificate.from_json_bytes(mutant.data)
        if certificate == seed.certificate:
            return "unchanged once parsed"
        report = seed.verify(certificate)
    except VerificationError as error:
        return f"refused: {type(error).__name__}"
    except Exception as error:
        raise AssertionError(
            f"{type(error).__name__} escaped the verifier: {error}\n"
            + "".join(traceback.format_exception(error)[-6:])
        ) from error
    view = report_view(report.to_dict())
    if view != expected:
        changed = sorted(k for k in set(view) | set(expected) if view.get(k) != expected.get(k))
        shown = "; ".join(
            f"{k}: {json.dumps(expected.get(k), default=str)[:300]} -> "
            f"{json.dumps(view.get(k), default=str)[:300]}"
            for k in changed
        )
        raise AssertionError(f"ACCEPTED with a different report: {shown}")
    return "accepted, same report"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_mutants_are_refused_or_show_the_seeds_report(
    seeds: dict[str, Seed], documents: dict[str, SeedDocument], platform: str
) -> None:
    seed = seeds[platform]
    context = Context(
        seed=documents[platform],
        donors=[documents[p] for p in PLATFORMS if p != platform],
        run_seed=fuzz_seed(),
    )
    expected = report_view(seed.verify().to_dict())
    case = only_case()
    if case is None:
        indices: list[int] = list(range(mutations_per_seed()))
    else:  # AICERT_FUZZ_CASE: that one mutant, nothing of the other seeds
        indices = [case[1]] if case[0] == platform else []
    print(f"fuzz seed {fuzz_seed()} (AICERT_FUZZ_SEED), {len(indices)} mutants of {platform}")
    failures: list[str] = []
    started, cpu_started = time.monotonic(), time.process_time()
    for index in indices:
        mutant = mutate(context, index)
        SUMMARY.per_category[mutant.category] += 1
        try:
            outcome = run_mutant(seed, expected, mutant)
        except AssertionError as error:
            outcome = "FAILED"
            failures.append(
                f"{platform}:{index} {mutant.category}: {mutant.description}: {error}\n"
                f"  rebuild it alone: AICERT_FUZZ_SEED={fuzz_seed()} "
                f"AICERT_FUZZ_CASE={platform}:{index} pytest {__file__}"
            )
        SUMMARY.outcomes[outcome] += 1
        if outcome.startswith("accepted"):
            SUMMARY.accepted[f"{platform} {mutant.category}"] += 1
    SUMMARY.per_platform[platform] += len(indices)
    SUMMARY.seconds[platform] = time.monotonic() - started
    SUMMARY.cpu_seconds[platform] = time.process_time() - cpu_started
    SUMMARY.failures.extend(failures)
    assert not failures, f"{len(failures)} mutants broke a property:\n" + "\n".join(failures[:10])


def test_every_category_applies_to_every_seed(documents: dict[str, SeedDocument]) -> None:
    """Each mutation category makes a mutant of each seed that differs from it."""
    for platform in PLATFORMS:
        context = Context(
            seed=documents[platform],
            donors=[documents[p] for p in PLATFORMS if p != platform],
            run_seed=fuzz_seed(),
        )
        for index in range(len(CATEGORIES)):
            mutant = mutate(context, index)
            assert mutant.data != documents[platform].raw, (platform, mutant.category)


def test_mutants_are_reproducible(documents: dict[str, SeedDocument]) -> None:
    context = Context(seed=documents["azure"], donors=[documents["qemu"]], run_seed=7)
    again = Context(seed=documents["azure"], donors=[documents["qemu"]], run_seed=7)
    for index in range(0, 400, 7):
        assert mutate(context, index) == mutate(again, index)
