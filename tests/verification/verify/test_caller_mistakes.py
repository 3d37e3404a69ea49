"""A caller's mistakes are named as such: wrong trust roots, reference values or ``at_time``.

They are not the certificate's fault, so they are ``TypeError`` (wrong kind of argument) or
``ValueError`` (right kind, unusable value) naming the argument, never a
``VerificationError`` a caller would report as "the certificate is invalid". ``aicert
verify`` exits 2 (bad input) for unreadable or invalid ``--trust-root`` and
``--reference-values`` files, without a traceback.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aicert.errors import VerificationError

from .factory import MadeCertificate
from .test_cli import Files, aicert_cli, files  # noqa: F401  (the fixture)


def _private_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _raises(
    exception: type[Exception], match: str, call: Callable[[], object]
) -> pytest.ExceptionInfo[Exception]:
    with pytest.raises(exception, match=match) as raised:
        call()
    assert not isinstance(raised.value, VerificationError)
    return raised


# -- trusted_roots -------------------------------------------------------------------------


@pytest.mark.parametrize("root", [42, None, 3.5, object()], ids=["int", "None", "float", "object"])
def test_a_root_of_the_wrong_type_is_a_type_error(base: MadeCertificate, root: Any) -> None:
    _raises(
        TypeError,
        r"trusted_roots\[0\] must be an x509.Certificate",
        lambda: base.verify(trusted_roots=[root]),
    )


def test_the_second_root_is_named_by_its_index(base: MadeCertificate) -> None:
    _raises(
        TypeError,
        r"trusted_roots\[1\]",
        lambda: base.verify(trusted_roots=[base.trust_root_pem, 7]),
    )


@pytest.mark.parametrize("kind", [str, Path, bytes])
def test_one_root_instead_of_a_list_is_a_type_error(
    base: MadeCertificate, tmp_path: Path, kind: Callable[[str], Any]
) -> None:
    root = tmp_path / "root.pem"
    root.write_text(base.trust_root_pem)
    value = kind(str(root)) if kind is not bytes else base.trust_root_pem.encode()
    _raises(
        TypeError, "trusted_roots must be a list of roots", lambda: base.verify(trusted_roots=value)
    )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00\x01random bytes, not PEM\xff", "no certificate in PEM data|not a PEM certificate"),
        (b"", "not a PEM certificate"),
        (_private_key_pem(), "no certificate in PEM data|not a PEM certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            "not a PEM certificate",
        ),
    ],
    ids=["random", "empty", "private-key", "garbage-in-armor"],
)
def test_a_root_file_that_is_not_a_certificate_is_a_value_error(
    base: MadeCertificate, tmp_path: Path, content: bytes, match: str
) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(content)
    raised = _raises(
        ValueError, rf"trusted_roots\[0\] {root}: ", lambda: base.verify(trusted_roots=[root])
    )
    assert raised.match(match)


def test_a_pem_text_that_is_not_a_certificate_is_a_value_error(base: MadeCertificate) -> None:
    key = _private_key_pem().decode()
    _raises(ValueError, r"trusted_roots\[0\] PEM data: ", lambda: base.verify(trusted_roots=[key]))


def test_a_root_path_that_is_a_folder_is_a_value_error(
    base: MadeCertificate, tmp_path: Path
) -> None:
    _raises(
        ValueError,
        r"trusted_roots\[0\] .*cannot read: Is a directory",
        lambda: base.verify(trusted_roots=[tmp_path]),
    )


def test_a_root_path_that_is_absent_is_a_value_error(base: MadeCertificate, tmp_path: Path) -> None:
    _raises(
        ValueError,
        r"trusted_roots\[0\] .*absent.pem: cannot read",
        lambda: base.verify(trusted_roots=[tmp_path / "absent.pem"]),
    )


def test_a_huge_root_file_is_refused_unread(base: MadeCertificate, tmp_path: Path) -> None:
    root = tmp_path / "huge.pem"
    with root.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    _raises(ValueError, "larger than 1048576 bytes", lambda: base.verify(trusted_roots=[root]))


# -- reference_values ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [str, Path])
def test_a_reference_values_path_is_a_type_error_naming_the_argument(
    base: MadeCertificate, tmp_path: Path, kind: Callable[[str], Any]
) -> None:
    path = kind(str(tmp_path / "reference-values.json"))
    _raises(
        TypeError,
        "reference_values must be a reference-value set .*load_reference_values",
        lambda: base.verify(reference_values=path),
    )


def test_a_list_of_paths_names_the_index(base: MadeCertificate, tmp_path: Path) -> None:
    _raises(
        TypeError,
        r"reference_values\[0\] must be a reference-value set, not PosixPath",
        lambda: base.verify(reference_values=[tmp_path / "reference-values.json"]),
    )


def test_reference_values_of_another_type_is_a_type_error(base: MadeCertificate) -> None:
    _raises(TypeError, "reference_values must be", lambda: base.verify(reference_values=42))  # type: ignore[arg-type]


# -- at_time ---------------------------------------------------------------------------------


def test_at_time_as_a_string_is_a_type_error(base: MadeCertificate) -> None:
    _raises(
        TypeError,
        "at_time must be a datetime, not str",
        lambda: base.verify(at_time="2026-01-01T00:00:00Z"),
    )  # type: ignore[arg-type]


def test_a_naive_at_time_is_a_value_error(base: MadeCertificate) -> None:
    naive = datetime.now(UTC).replace(tzinfo=None)
    _raises(ValueError, "at_time has no timezone", lambda: base.verify(at_time=naive))


@pytest.mark.parametrize(
    "at_time",
    [
        datetime(9999, 12, 31, 23, 59, tzinfo=timezone(-timedelta(hours=23, minutes=59))),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=23, minutes=59))),
        datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ],
    ids=["9999 -23:59", "0001 +23:59", "1999"],
)
def test_an_at_time_out_of_range_is_a_value_error(base: MadeCertificate, at_time: datetime) -> None:
    _raises(ValueError, "at_time .* is outside 2000-01-01", lambda: base.verify(at_time=at_time))


def test_an_at_time_with_an_offset_is_judged_in_utc(base: MadeCertificate) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    at_time = base.params.finished_at.astimezone(india)
    report = base.verify(at_time=at_time)
    assert report.verified_at_time == at_time
    assert report.verified_at_time.utcoffset() == timedelta(0)


# -- the command line: exit 2 for bad input files ----------------------------------------------


def _cli_verify(files: Files, *options: str | Path) -> subprocess.CompletedProcess[str]:  # noqa: F811
    return aicert_cli("verify", files.proof, "--allow-dev-platform", *options)


@pytest.mark.parametrize(
    "make_root",
    [
        lambda tmp: tmp,  # a folder
        lambda tmp: tmp / "absent.pem",
        lambda tmp: (tmp / "random.pem").write_bytes(b"\x00random\xff") and tmp / "random.pem",
        lambda tmp: (tmp / "key.pem").write_bytes(_private_key_pem()) and tmp / "key.pem",
    ],
    ids=["folder", "absent", "random", "private-key"],
)
def test_cli_bad_trust_root_exits_2_without_traceback(
    files: Files,  # noqa: F811
    tmp_path: Path,
    make_root: Callable[[Path], Path],
) -> None:
    folder = tmp_path / "roots"
    folder.mkdir()
    root = make_root(folder)
    result = _cli_verify(files, "--trust-root", root)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "trusted_roots[0]" in result.stderr and str(root) in result.stderr


@pytest.mark.parametrize(
    "content",
    [None, b"", b"{not json", b'{"platform": "qemu"}'],
    ids=["absent", "empty", "not-json", "invalid"],
)
def test_cli_bad_reference_values_exits_2_without_traceback(
    files: Files,  # noqa: F811
    tmp_path: Path,
    content: bytes | None,
) -> None:
    path = tmp_path / "reference-values.json"
    if content is not None:
        path.write_bytes(content)
    result = _cli_verify(files, "--trust-root", files.root, "--reference-values", path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"reference values {path}" in result.stderr
