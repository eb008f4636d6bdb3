"""TLS for every port a process serves: gRPC and HTTP (front doors, ``/metrics``).

Certificates come from PEM files (a Kubernetes Secret mounted as a volume, e.g. the one
cert-manager keeps renewed: ``tls.crt``, ``tls.key``, ``ca.crt``). Changed files are picked up
without a restart: each new connection checks (at most once a second) whether a file changed,
and if the new certificate and key form a valid pair they serve every later handshake;
connections already open keep the certificate they started with. A half-written rotation (a
key that does not match the certificate yet) is ignored until it is complete.

With ``client_ca_file``, clients may present a certificate signed by one of its CAs; with
``require_client_cert`` they must (mutual TLS), on top of any API key the service asks for.

    config = TlsConfig(cert_file="tls.crt", key_file="tls.key")
    port = server.add_secure_port("0.0.0.0:50051", grpc_server_credentials(config))
    context = server_ssl_context(config)        # for aiohttp, http.server, ...
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from rlhf.config import option

log = logging.getLogger(__name__)

# Seconds between two looks at the files; a rotation is served at most this much later.
CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = option(
        "", "PEM certificate (chain) the server presents; empty: no TLS (plaintext)"
    )
    key_file: str = option("", "PEM private key of cert_file")
    client_ca_file: str = option(
        "", "PEM CA certificates that sign client certificates (enables client-certificate auth)"
    )
    require_client_cert: bool = option(
        False, "refuse clients without a certificate signed by client_ca_file (mutual TLS)"
    )

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls: set both cert_file and key_file, or neither")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls: client_ca_file needs cert_file and key_file")
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError("tls: require_client_cert needs client_ca_file")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class Material:
    """One consistent reading of the files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def _signature(paths: list[str]) -> tuple[tuple[int, int, int], ...]:
    # os.stat follows symlinks: a Secret volume's atomic "..data" swap changes the inode.
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class CertificateFiles:
    """The certificate, key and client CA files, re-read when they change (thread-safe)."""

    def __init__(self, config: TlsConfig) -> None:
        if not config.enabled:
            raise ValueError("TLS is not configured (tls.cert_file / tls.key_file)")
        self.config = config
        self._paths = [config.cert_file, config.key_file]
        if config.client_ca_file:
            self._paths.append(config.client_ca_file)
        self._lock = threading.Lock()
        self._next_check = 0.0
        signature, material = self._read()
        if material is None:
            raise ValueError(
                f"tls: {config.cert_file} and {config.key_file} are not a certificate and its key"
            )
        self._signature = signature
        self.material = material
        self.version = 0  # increases with every change picked up

    def _read(self) -> tuple[tuple[tuple[int, int, int], ...], Material | None]:
        """The files' signature and contents; contents None when the pair does not match."""
        before = _signature(self._paths)
        cfg = self.config
        try:
            # Checks that the key belongs to the certificate (and both parse).
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                cfg.cert_file, cfg.key_file
            )
        except ssl.SSLError as exc:
            log.warning("tls: %s / %s not usable yet: %s", cfg.cert_file, cfg.key_file, exc)
            return before, None
        material = Material(
            Path(cfg.cert_file).read_bytes(),
            Path(cfg.key_file).read_bytes(),
            Path(cfg.client_ca_file).read_bytes() if cfg.client_ca_file else None,
        )
        if _signature(self._paths) != before:
            return before, None  # changed while being read: the next look takes it
        return before, material

    def refresh(self) -> bool:
        """Re-reads the files if they changed (at most once per CHECK_INTERVAL_S); True when
        new material was picked up."""
        with self._lock:
            now = time.monotonic()
            if now < self._next_check:
                return False
            self._next_check = now + CHECK_INTERVAL_S
            try:
                if _signature(self._paths) == self._signature:
                    return False
                signature, material = self._read()
            except OSError as exc:
                log.warning("tls: cannot read the certificate files: %s", exc)
                return False
            if material is None:
                return False
            self._signature = signature
            self.material = material
            self.version += 1
        log.info("tls: certificate files changed; new connections use the new certificate")
        return True


def _grpc_config(material: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )


def grpc_server_credentials(
    config: TlsConfig, files: CertificateFiles | None = None
) -> grpc.ServerCredentials:
    """Server credentials that follow changes of the files (checked on new connections)."""
    files = files or CertificateFiles(config)
    served = files.version

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        files.refresh()
        if files.version == served:
            return None  # keep the current certificate
        served = files.version
        return _grpc_config(files.material)

    return grpc.dynamic_ssl_server_credentials(
        _grpc_config(files.material),
        fetch,
        require_client_authentication=config.require_client_cert,
    )


def _ssl_context(config: TlsConfig, client_ca: bytes | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain only takes paths; it fails (and the caller keeps the previous context)
    # if the files changed into a pair that does not match.
    context.load_cert_chain(config.cert_file, config.key_file)
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL
    return context


def server_ssl_context(config: TlsConfig, files: CertificateFiles | None = None) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for an HTTP server (aiohttp, http.server, ...) that serves
    changed files to new connections: its handshake callback, which runs for every client
    with or without SNI, swaps in a context built from the new files."""
    certs = files or CertificateFiles(config)
    outer = _ssl_context(config, certs.material.client_ca)
    lock = threading.Lock()
    built = {certs.version: outer}  # the context for the newest version picked up

    def on_hello(conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: object) -> None:
        certs.refresh()
        with lock:
            version = certs.version
            if version not in built:
                try:
                    context = _ssl_context(config, certs.material.client_ca)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("tls: keeping the previous certificate: %s", exc)
                    return
                built.clear()
                built[version] = context
            context = next(iter(built.values()))
        if context is not outer:
            conn.context = context

    outer.sni_callback = on_hello
    return outer
