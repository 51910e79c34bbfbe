"""TLS settings -> SSL contexts: the modes, and certificate problems reported as config errors."""

from __future__ import annotations

import ssl

import pytest

from pypool import tls
from pypool.config import ConfigError, parse_config
from tests.unit._minimal_config import MINIMAL
from tests.integration._certs import make_certificates

BASE = MINIMAL


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def config(general: str, path: str = "pypool.toml"):
    return parse_config(BASE.format(general=general), path)


def files(certs) -> str:
    return f'tls_certificate = "{certs.cert}"\ntls_private_key = "{certs.key}"'


def test_modes(certs):
    assert not tls.client_tls(config("")).offered  # allow, but no certificate: nothing to offer
    allow = tls.client_tls(config(files(certs)))
    assert allow.offered and not allow.required and allow.context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert tls.client_tls(config(files(certs) + '\nclient_tls_mode = "require"')).required
    assert not tls.client_tls(config(files(certs) + '\nclient_tls_mode = "disable"')).offered


def test_missing_and_mismatched_files_name_the_key(certs, tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        tls.client_tls(config(f'tls_certificate = "{tmp_path}/nope.crt"\ntls_private_key = "{certs.key}"'))
    assert str(excinfo.value).startswith("pypool.toml: general.tls_certificate: cannot read")
    other = make_certificates(tmp_path / "other")
    with pytest.raises(ConfigError, match="general.tls_private_key: certificate and private key do not load"):
        tls.client_tls(config(f'tls_certificate = "{certs.cert}"\ntls_private_key = "{other.key}"'))
    with pytest.raises(ConfigError, match="general.server_tls_ca_file: cannot load CA certificates"):
        tls.client_tls(config(f'server_tls = true\nverify_server_certificate = true\n'
                              f'server_tls_ca_file = "{tmp_path}/none.crt"'))


def test_server_contexts(certs):
    assert tls.server_context(config("").general) is None
    unverified = tls.server_context(config("server_tls = true").general)
    assert unverified.verify_mode == ssl.CERT_NONE and not unverified.check_hostname
    verified = tls.server_context(config(f'server_tls = true\nverify_server_certificate = true\n'
                                         f'server_tls_ca_file = "{certs.ca}"').general)
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
