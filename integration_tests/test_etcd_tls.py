"""TLS with client certificates against a dedicated etcd: certificates are made in the test."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters

from etcd_rdzv.factory import create_backend

pytestmark = pytest.mark.timeout(60)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_pem(directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def _issue(
    common_name: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    usage: list | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    signer_key, issuer_name = (key, _name(common_name)) if issuer is None else (issuer[0], issuer[1].subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return key, builder.sign(signer_key, hashes.SHA256())


@pytest.fixture
def pki(scratch_dir: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca = _issue("test-ca", None)
    server = _issue("etcd-server", ca, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client = _issue("rdzv-client", ca, [ExtendedKeyUsageOID.CLIENT_AUTH])
    other_ca = _issue("other-ca", None)
    paths = {}
    paths["ca"], _ = _write_pem(scratch_dir, "ca", *ca)
    paths["other_ca"], _ = _write_pem(scratch_dir, "other-ca", *other_ca)
    paths["server_cert"], paths["server_key"] = _write_pem(scratch_dir, "server", *server)
    paths["client_cert"], paths["client_key"] = _write_pem(scratch_dir, "client", *client)
    return paths


@pytest.fixture
def tls_etcd(etcd_server, pki):
    return etcd_server(
        [
            "--client-cert-auth",
            f"--trusted-ca-file={pki['ca']}",
            f"--cert-file={pki['server_cert']}",
            f"--key-file={pki['server_key']}",
        ],
        scheme="https",
    )


def _params(endpoint: str, **config: object) -> RendezvousParameters:
    return RendezvousParameters(
        backend="etcd_rdzv", endpoint=endpoint, run_id="tls-run", min_nodes=1, max_nodes=1, read_timeout=3, **config
    )


def test_connects_with_client_certificates(tls_etcd, pki):
    params = _params(
        tls_etcd.endpoint, protocol="https", ca_cert=pki["ca"], ssl_cert=pki["client_cert"], ssl_cert_key=pki["client_key"]
    )
    backend, store = create_backend(params)
    try:
        _, token, has_set = backend.set_state(b"secure")
        assert has_set
        assert backend.get_state() == (b"secure", token)
        store.set("k", "v")
        assert store.get("k") == b"v"
    finally:
        backend.close()


def test_refused_without_a_client_certificate(tls_etcd, pki):
    backend, _ = create_backend(_params(tls_etcd.endpoint, protocol="https", ca_cert=pki["ca"]))
    try:
        with pytest.raises(RendezvousConnectionError, match=tls_etcd.endpoint) as info:
            backend.get_state()
    finally:
        backend.close()
    assert "TLS" in str(info.value) or "tls" in str(info.value).lower()


def test_refuses_a_server_signed_by_another_ca(tls_etcd, pki):
    params = _params(
        tls_etcd.endpoint,
        protocol="https",
        ca_cert=pki["other_ca"],
        ssl_cert=pki["client_cert"],
        ssl_cert_key=pki["client_key"],
    )
    backend, _ = create_backend(params)
    try:
        with pytest.raises(RendezvousConnectionError, match="TLS handshake failed"):
            backend.get_state()
    finally:
        backend.close()


def test_plain_http_to_a_tls_server_fails_with_a_hint(tls_etcd):
    backend, _ = create_backend(_params(tls_etcd.endpoint))
    try:
        with pytest.raises(RendezvousConnectionError, match="protocol=https"):
            backend.get_state()
    finally:
        backend.close()
