"""The agent client's TLS settings for a plain-http agent: no CA is trusted, so a client that
skips loading certifi's bundle (a per-client cost the flow pays on every task) still fails
closed, and an https agent still needs its pinned certificate."""

from __future__ import annotations

import ssl

import httpx
import pytest

from aicert.tasks.platforms.agent_client import AgentClient


def _tls_context(client: AgentClient) -> ssl.SSLContext:
    transport = client._http._transport
    assert isinstance(transport, httpx.HTTPTransport)
    context: ssl.SSLContext = transport._pool._ssl_context
    return context


def test_plain_http_client_trusts_no_certificate_authority() -> None:
    with AgentClient("http://127.0.0.1:9") as client:
        context = _tls_context(client)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.cert_store_stats()["x509_ca"] == 0
        assert context.get_ca_certs() == []


def test_https_client_without_pinned_certificate_is_refused() -> None:
    with pytest.raises(ValueError, match="pinned channel certificate"):
        AgentClient("https://127.0.0.1:9")
