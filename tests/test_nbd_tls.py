"""STARTTLS: a self-signed certificate made in the test, qemu-img and nbdinfo
as TLS clients, and a TLS-only server refusing every option before STARTTLS."""
from __future__ import annotations

import json
import shutil
import ssl

import pytest

import vdisk
from vdisk.nbd import protocol as P
from vdisk_testkit.nbd_client import Client
from vdisk_testkit.nbd_helpers import needs_clients, run, serve_process  # noqa: F401 - a fixture

pytestmark = [needs_clients, pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl CLI")]

MiB = 1 << 20


@pytest.fixture
def certs(tmp_path):
    """DIR with server-cert.pem, server-key.pem and ca-cert.pem (the same self-signed cert)."""
    d = tmp_path / "pki"
    d.mkdir()
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout", d / "server-key.pem", "-out", d / "server-cert.pem")
    shutil.copy(d / "server-cert.pem", d / "ca-cert.pem")
    return d


def test_starttls_with_qemu_img_and_nbdinfo(tmp_path, certs, serve_process):
    img = str(tmp_path / "disk.vdk")
    with vdisk.create(img, 8 * MiB) as d:
        d.pwrite(b"\x77" * MiB, MiB)
    srv = serve_process(img, "--listen", "127.0.0.1:0", "--tls-cert", certs / "server-cert.pem",
                        "--tls-key", certs / "server-key.pem", tcp=True)
    host, port = srv.address
    info = json.loads(run("qemu-img", "info", "--output=json", "--object",
                          f"tls-creds-x509,id=tls0,dir={certs},endpoint=client", "--image-opts",
                          f"driver=nbd,host={host},port={port},export=disk,tls-creds=tls0").stdout)
    assert info["virtual-size"] == 8 * MiB
    out = run("qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
              "-c", "read -P 0x77 1M 1M", "--image-opts",
              f"driver=nbd,host={host},port={port},export=disk,tls-creds=tls0")
    assert "read 1048576/1048576" in out.stdout and "verification" not in out.stdout, out.stdout
    listing = json.loads(run("nbdinfo", "--json", "--list", f"nbds://{host}:{port}/?tls-certificates={certs}").stdout)
    assert listing["TLS"] is True and [e["export-name"] for e in listing["exports"]] == ["disk"]
    # without TLS the client gets nothing: every option before STARTTLS is refused
    r = run("nbdinfo", "--json", f"nbd://{host}:{port}/disk", check=False)
    assert r.returncode != 0
    c = Client((host, port))
    c.greeting()
    for opt, data in ((P.NBD_OPT_LIST, b""), (P.NBD_OPT_GO, Client.info_data("disk")),
                      (P.NBD_OPT_STRUCTURED_REPLY, b""), (P.NBD_OPT_EXTENDED_HEADERS, b"")):
        assert c.option(opt, data)[-1][0] == P.NBD_REP_ERR_TLS_REQD
    c.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 4) + b"disk")
    assert c.closed_by_server()                           # EXPORT_NAME cannot be refused: a disconnect
    c.close()
    # STARTTLS from the raw client, then the session goes on inside TLS
    c = Client((host, port))
    c.greeting()
    assert c.option(P.NBD_OPT_STARTTLS)[-1][0] == P.NBD_REP_ACK
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    assert c.list_exports() == ["disk"]
    assert c.option(P.NBD_OPT_STARTTLS)[-1][0] == P.NBD_REP_ERR_INVALID
    c.close()
    assert srv.stop() == 0


@pytest.fixture
def ca_pki(tmp_path):
    """A CA, a server and a client certificate it signed, laid out as qemu's
    tls-creds-x509 wants (ca-cert.pem, client-cert.pem, client-key.pem)."""
    d = tmp_path / "ca"
    d.mkdir()
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", d / "ca-key.pem", "-out", d / "ca-cert.pem")
    for who, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{who}.ext").write_text(ext + "\n")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
            "-keyout", d / f"{who}-key.pem", "-out", d / f"{who}.csr")
        run("openssl", "x509", "-req", "-in", d / f"{who}.csr", "-CA", d / "ca-cert.pem", "-CAkey", d / "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-extfile", d / f"{who}.ext", "-out", d / f"{who}-cert.pem")
    return d


def test_tls_ca_requires_a_client_certificate(tmp_path, ca_pki, serve_process):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, MiB).close()
    srv = serve_process(img, "--listen", "127.0.0.1:0", "--tls-cert", ca_pki / "server-cert.pem",
                        "--tls-key", ca_pki / "server-key.pem", "--tls-ca", ca_pki / "ca-cert.pem", tcp=True)
    host, port = srv.address
    # qemu with the client certificate in its creds dir: accepted
    info = json.loads(run("qemu-img", "info", "--output=json", "--object",
                          f"tls-creds-x509,id=tls0,dir={ca_pki},endpoint=client", "--image-opts",
                          f"driver=nbd,host={host},port={port},export=disk,tls-creds=tls0").stdout)
    assert info["virtual-size"] == MiB
    # a client without a certificate: the handshake fails, the server logs it and goes on
    c = Client((host, port))
    c.greeting()
    assert c.option(P.NBD_OPT_STARTTLS)[-1][0] == P.NBD_REP_ACK
    ctx = ssl.create_default_context(cafile=str(ca_pki / "ca-cert.pem"))
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        c.list_exports()
    c.close()
    ctx.load_cert_chain(str(ca_pki / "client-cert.pem"), str(ca_pki / "client-key.pem"))
    c = Client((host, port))
    c.greeting()
    assert c.option(P.NBD_OPT_STARTTLS)[-1][0] == P.NBD_REP_ACK
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    assert c.list_exports() == ["disk"]
    c.close()
    assert srv.stop() == 0
    assert "TLS handshake failed" in srv.stderr()
