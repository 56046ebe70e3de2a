"""gRPC over TLS with tritonserver's flags (`--grpc-use-ssl`, `--grpc-use-ssl-mutual`,
`--grpc-server-cert`, `--grpc-server-key`, `--grpc-root-cert`) and tritonclient's
`ssl=True` options. Certificates are made for the test with the `openssl` command."""
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import Kiln, refused_start

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs():
    d = tempfile.mkdtemp()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Kiln test CA",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    with open(os.path.join(d, "client.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={'localhost' if who == 'server' else 'client'}",
                "-keyout", f"{who}.key", "-out", f"{who}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}.crt", cwd=d)
    yield {n: os.path.join(d, n) for n in os.listdir(d)}
    shutil.rmtree(d, ignore_errors=True)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def infer(client):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    ins = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(a)
    np.testing.assert_array_equal(client.infer("simple", ins).as_numpy("OUTPUT0"), 2 * a)


def tls_flags(certs, *extra):
    return (f"--grpc-server-cert={certs['server.crt']}", f"--grpc-server-key={certs['server.key']}", *extra)


def test_tls_serves_clients_that_trust_the_ca(certs):
    k = Kiln("--grpc-use-ssl=true", *tls_flags(certs))
    try:
        c = grpcclient.InferenceServerClient(url=k.grpc_url, ssl=True, root_certificates=certs["ca.crt"])
        assert c.is_server_live()
        infer(c)
        # A plaintext client gets no answer from a TLS port.
        plain = grpcclient.InferenceServerClient(url=k.grpc_url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
    finally:
        k.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_root_ca(certs):
    k = Kiln("--grpc-use-ssl-mutual=true", *tls_flags(certs, f"--grpc-root-cert={certs['ca.crt']}"))
    try:
        c = grpcclient.InferenceServerClient(url=k.grpc_url, ssl=True, root_certificates=certs["ca.crt"],
                                             private_key=certs["client.key"], certificate_chain=certs["client.crt"])
        infer(c)
        anonymous = grpcclient.InferenceServerClient(url=k.grpc_url, ssl=True, root_certificates=certs["ca.crt"])
        with pytest.raises(InferenceServerException):
            anonymous.is_server_live(client_timeout=5)
    finally:
        k.stop()


def test_missing_or_bad_files_stop_the_start(certs):
    assert "--grpc-server-key" in refused_start("--grpc-use-ssl=1", f"--grpc-server-cert={certs['server.crt']}")
    assert "cannot read --grpc-server-cert" in refused_start("--grpc-use-ssl=true", "--grpc-server-cert=/nonexistent",
                                                            f"--grpc-server-key={certs['server.key']}")
    # A key that is not the certificate's.
    out = refused_start("--grpc-use-ssl=true", f"--grpc-server-cert={certs['server.crt']}",
                        f"--grpc-server-key={certs['ca.crt']}")
    assert "cannot serve TLS" in out
    assert "--grpc-root-cert" in refused_start("--grpc-use-ssl-mutual=true", *tls_flags(certs))
