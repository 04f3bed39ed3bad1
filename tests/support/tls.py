"""A throw-away certificate authority for TLS tests, made with the ``openssl`` command.

One CA signs a server certificate (valid for 127.0.0.1 and localhost, so hostname checks pass)
and a client certificate (for mutual TLS). Keys are P-256 EC: fast to make, accepted everywhere.
Nothing here is secret beyond the test; the files live in the test's own tmp directory.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

VALID_DAYS = 2

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {sans}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path, openssl: str,
                   hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A CA, a server certificate for ``hosts`` and a client certificate, under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    sans = ", ".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    config = directory / "openssl.cnf"
    config.write_text(_CONFIG.format(sans=sans))

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30,
                       cwd=directory)

    def new_key(name: str) -> Path:
        path = directory / f"{name}.key"
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", str(path))
        path.chmod(0o600)
        return path

    ca_key = new_key("ca")
    ca_cert = directory / "ca.pem"
    run("req", "-config", str(config), "-x509", "-new", "-key", str(ca_key),
        "-subj", "/CN=edgescribe test CA", "-extensions", "ca", "-days", str(VALID_DAYS),
        "-out", str(ca_cert))

    def signed(name: str, subject: str, section: str) -> tuple[Path, Path]:
        key = new_key(name)
        csr, cert = directory / f"{name}.csr", directory / f"{name}.pem"
        run("req", "-config", str(config), "-new", "-key", str(key), "-subj", subject,
            "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", str(VALID_DAYS), "-extfile", str(config),
            "-extensions", section, "-out", str(cert))
        return cert, key

    server_cert, server_key = signed("server", f"/CN={hosts[0]}", "server")
    client_cert, client_key = signed("client", "/CN=edgescribe test client", "client")
    return TlsFiles(ca_cert, server_cert, server_key, client_cert, client_key)
