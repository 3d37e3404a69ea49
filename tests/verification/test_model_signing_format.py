"""The model_signing statement and bundle against the real ``model_signing`` library.

The statement built from measured records must be the one ``model_signing`` builds when it
signs the same folder itself, and a bundle around a signature made outside the library (here a
software key; the TPM path is in tests/guest_runtime/test_tpm_signing.py) must pass its
certificate verification.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import model_signing
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from aicert.hashing import FileDigest, hash_tree
from aicert.model_signing_format import (
    ModelSigningFormatError,
    ModelStatement,
    dsse_pae,
    model_signing_bundle,
    model_statement,
)

FOLDER_FILES = {
    "a-c": b"sorted after a/x by component, before it as a string",
    "a/x": b"nested",
    "sub/b.bin": bytes(range(256)),
    "sub2": b"",
    "donn\u00e9es.csv": b"x,y\n1,2\n",
    ".gitignore": b"*.tmp\n",
    ".git/HEAD": b"ref: refs/heads/main\n",
}
JsonObject = dict[str, Any]  # parsed JSON: its shape is what the tests check
SIGNED_PATHS = ["a/x", "a-c", "donn\u00e9es.csv", "sub/b.bin", "sub2"]


@dataclass(frozen=True)
class SoftwareSigner:
    """A P-256 key certified by a root CA, both files on disk for model_signing."""

    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]  # leaf first, then the root
    key_path: Path
    leaf_path: Path
    root_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signing,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not signing,
        crl_sign=not signing,
        encipher_only=False,
        decipher_only=False,
    )


def certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey],
    *,
    ca: bool,
    path_length: int | None = 0,
    backdate: dt.timedelta = dt.timedelta(minutes=5),
) -> x509.Certificate:
    """A certificate shaped like the platform CA's (CA) or its AK certificates (leaf)."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer[0]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(_key_usage(signing=not ca), critical=True)
        .sign(issuer[1], hashes.SHA256())
    )


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> SoftwareSigner:
    folder = tmp_path_factory.mktemp("software-signer")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = certificate("root", root_key.public_key(), ("root", root_key), ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate("signer", key.public_key(), ("root", root_key), ca=False)
    paths = {name: folder / f"{name}.pem" for name in ("key", "leaf", "root")}
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths["leaf"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths["root"].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return SoftwareSigner(key, [leaf, root], paths["key"], paths["leaf"], paths["root"])


def write_folder(folder: Path, files: dict[str, bytes] = FOLDER_FILES) -> Path:
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "my-model")


def statement_of_bundle(path: Path) -> JsonObject:
    bundle = json.loads(path.read_text())
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def parsed(statement: ModelStatement) -> JsonObject:
    """The statement as a verifier reads it: its payload, parsed."""
    return json.loads(statement.payload)


def sign_with_model_signing(model_dir: Path, signer: SoftwareSigner) -> Path:
    """What ``model_signing sign certificate MODEL`` does (the CLI ignores its own output)."""
    signature = model_dir / "model.sig"
    model_signing.signing.Config().use_certificate_signer(
        private_key=signer.key_path,
        signing_certificate=signer.leaf_path,
        certificate_chain=[signer.root_path],
    ).set_hashing_config(
        model_signing.hashing.Config().set_ignored_paths(paths=["model.sig"])
    ).sign(model_dir, signature)
    return signature


def verify_with_model_signing(model_dir: Path, root_path: Path) -> None:
    """What ``model_signing verify certificate MODEL --signature MODEL/model.sig`` does."""
    model_signing.verifying.Config().use_certificate_verifier(
        certificate_chain=[root_path]
    ).set_hashing_config(
        model_signing.hashing.Config().set_ignored_paths(paths=["model.sig"])
    ).verify(model_dir, model_dir / "model.sig")


def software_bundle(
    model_dir: Path, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]
) -> bytes:
    statement = model_statement(model_dir.name, hash_tree(model_dir, exclude=["model.sig"]))
    signature = key.sign(statement.pae, ec.ECDSA(hashes.SHA256()))
    return model_signing_bundle(statement.payload, signature, chain)


# -- the statement is model_signing's ---------------------------------------------------------


def test_statement_equals_the_one_model_signing_builds(
    model_dir: Path, signer: SoftwareSigner
) -> None:
    ours = model_statement(model_dir.name, hash_tree(model_dir))
    theirs = statement_of_bundle(sign_with_model_signing(model_dir, signer))
    # The tool lists ignore_paths in a frozenset's (per-process) order; ours are sorted.
    serialization_args = theirs["predicate"]["serialization"]
    serialization_args["ignore_paths"].sort()
    assert ours.statement == theirs
    assert parsed(ours) == ours.statement
    resources = parsed(ours)["predicate"]["resources"]
    assert [resource["name"] for resource in resources] == SIGNED_PATHS
    assert ours.ignored == (".git/HEAD", ".gitignore")


def test_pae_is_the_dsse_v1_encoding(model_dir: Path) -> None:
    # That model_signing checks signatures over this encoding: the bundle tests below.
    assert dsse_pae(b"hello", "text/plain") == b"DSSEv1 10 text/plain 5 hello"
    statement = model_statement(model_dir.name, hash_tree(model_dir))
    header = b"DSSEv1 28 application/vnd.in-toto+json %d " % len(statement.payload)
    assert statement.pae == header + statement.payload


def test_empty_folder_has_the_digest_of_nothing() -> None:
    statement = model_statement("empty", [])
    subject = parsed(statement)["subject"][0]
    assert subject["digest"]["sha256"] == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


# -- a bundle signed outside model_signing passes its verification ----------------------------


def test_software_signed_bundle_verifies_and_a_changed_file_does_not(
    model_dir: Path, signer: SoftwareSigner
) -> None:
    (model_dir / "model.sig").write_bytes(software_bundle(model_dir, signer.key, signer.chain))
    verify_with_model_signing(model_dir, signer.root_path)
    (model_dir / "sub2").write_bytes(b"changed")
    with pytest.raises(ValueError, match=r"Hash mismatch for .*sub2"):
        verify_with_model_signing(model_dir, signer.root_path)


def test_bundle_from_another_root_is_refused(
    model_dir: Path, signer: SoftwareSigner, tmp_path: Path
) -> None:
    (model_dir / "model.sig").write_bytes(software_bundle(model_dir, signer.key, signer.chain))
    # Same subject, another key; valid since before the leaf, as the tool checks the chain
    # at the leaf's notBefore (a root made after the leaf is refused as "not yet valid").
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = certificate(
        "root", other_key.public_key(), ("root", other_key), ca=True, backdate=dt.timedelta(1)
    )
    other_root = tmp_path / "other-root.pem"
    other_root.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(Exception, match="certificate signature failure"):
        verify_with_model_signing(model_dir, other_root)


def test_chain_shapes_the_tool_builds(
    model_dir: Path, signer: SoftwareSigner, tmp_path: Path
) -> None:
    signature = model_dir / "model.sig"
    # The leaf alone: the root given on the command line is its issuer.
    signature.write_bytes(software_bundle(model_dir, signer.key, signer.chain[:1]))
    verify_with_model_signing(model_dir, signer.root_path)
    # Through an intermediate CA, which the bundle must carry.
    root_key, intermediate_key, key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    root = certificate("root", root_key.public_key(), ("root", root_key), ca=True, path_length=1)
    intermediate = certificate("ca", intermediate_key.public_key(), ("root", root_key), ca=True)
    leaf = certificate("signer", key.public_key(), ("ca", intermediate_key), ca=False)
    root_path = tmp_path / "root.pem"
    root_path.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    for chain in ([leaf, intermediate], [leaf, intermediate, root]):
        signature.write_bytes(software_bundle(model_dir, key, chain))
        verify_with_model_signing(model_dir, root_path)
    signature.write_bytes(software_bundle(model_dir, key, [leaf]))
    with pytest.raises(Exception, match="unable to get local issuer certificate"):
        verify_with_model_signing(model_dir, root_path)


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([FileDigest("a", 1, "0" * 64), FileDigest("a", 1, "1" * 64)], "duplicate path"),
        ([FileDigest("model.sig", 1, "0" * 64)], "where the signature"),
        ([FileDigest("../a", 1, "0" * 64)], "not a relative POSIX path"),
        ([FileDigest("a//b", 1, "0" * 64)], "not a relative POSIX path"),
        ([FileDigest("/a", 1, "0" * 64)], "not a relative POSIX path"),
        ([FileDigest("a", 1, "0" * 63)], "SHA-256"),
        ([FileDigest("a", 1, "A" * 64)], "SHA-256"),
    ],
)
def test_malformed_records_are_refused(files: list[FileDigest], message: str) -> None:
    with pytest.raises(ModelSigningFormatError, match=message):
        model_statement("model", files)


def test_signature_elsewhere_in_the_folder() -> None:
    files = [FileDigest("model.sig", 1, "0" * 64), FileDigest("sig/x", 1, "1" * 64)]
    with pytest.raises(ModelSigningFormatError, match="where the signature"):
        model_statement("model", files, signature_name="sig")
    statement = model_statement("model", files, signature_name="sig/y")
    serialization_args = parsed(statement)["predicate"]["serialization"]
    assert serialization_args["ignore_paths"] == [
        ".git",
        ".gitattributes",
        ".github",
        ".gitignore",
        "sig/y",
    ]


def test_bundle_needs_an_ecdsa_leaf(signer: SoftwareSigner) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_leaf = certificate("rsa", rsa_key.public_key(), ("root", root_key), ca=False)
    with pytest.raises(ModelSigningFormatError, match="only ECDSA"):
        model_signing_bundle(b"{}", b"sig", [rsa_leaf])
    with pytest.raises(ModelSigningFormatError, match="empty"):
        model_signing_bundle(b"{}", b"sig", [])
