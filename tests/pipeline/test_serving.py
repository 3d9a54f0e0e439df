"""The pyfunc model as `mlflow models serve` serves it: JSON requests with base64 images, both families, errors that
leave the server up; and the logged model's environment (pngrow shipped as code, only PyPI requirements)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import skimage.data
from PIL import Image

from pngrow import load_shared_model
from pngrow.pipeline import names, shared_model
from pngrow.pipeline.registry import promote
from pngrow.pipeline.shared_model import RequestError, _image_array, decode_base64, signature
from pngrow.pipeline.tracking import Tracking, using

BIN = Path(sys.executable).parent
START_TIMEOUT = 150  # seconds for `mlflow models serve` to answer /ping on a busy 2-core machine


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(text: str) -> np.ndarray:
    """The pixels of a base64 PNG answer, checked to be a PNG."""
    data = base64.b64decode(text, validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return np.array(Image.open(io.BytesIO(data)))


def test_base64_and_images_are_read_or_refused_in_one_line() -> None:
    image = skimage.data.astronaut()[:8, :10]
    text = b64(png(image))
    assert np.array_equal(_image_array(text), image)
    wrapped = "data:image/png;base64," + "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert np.array_equal(_image_array(wrapped), image)
    assert np.array_equal(_image_array(image.astype(np.int64).tolist()), image)
    with pytest.raises(ValueError, match=r"^image is not base64 \(12 characters starting 'not base64!!'\)$"):
        _image_array("not base64!!")
    with pytest.raises(RequestError, match="^image .5 bytes. is not a readable image: not an image PIL can read$"):
        _image_array(b64(b"hello"))
    with pytest.raises(RequestError, match=r"must be base64 or bytes of an encoded image, or a uint8 H x W x 3 array"):
        _image_array(np.zeros((4, 4), np.uint8))
    with pytest.raises(RequestError, match="^bitstream is not base64"):
        decode_base64("%%%", "bitstream")
    assert signature("nic").inputs.input_names() == ["task", "image", "bitstream"]
    assert signature("sisr").outputs.input_names() == ["task", "image", "scale"]


class Server:
    """`mlflow models serve` in its own process group, ended by its PID."""

    def __init__(self, model_uri: str, log: Path, env: dict[str, str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        # The scoring server runs `uvicorn` from PATH: the venv's bin must be on it.
        env = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("PYTHONPATH", None)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        pytest.fail(f"mlflow models serve did not answer /ping in {START_TIMEOUT} s:\n{self.log.read_text()[-3000:]}")

    def post(self, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + "/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the CLI and the uvicorn it started
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_model_dirs: dict[str, Path]) -> dict:
    """The session's tiny SISR and NIC models (``folder_sisr``, ``folder_nic``), logged as pyfunc models into a
    SQLite store (SISR also registered)."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking = Tracking(uri, "serving", artifact_root=str(root / "artifacts"))
    out = {"root": root, "tracking_uri": uri}
    for family in ("sisr", "nic"):
        out[f"folder_{family}"] = tiny_model_dirs[family]
        run = tracking.client.create_run(tracking.experiment_id)
        out[family] = tracking.log_shared_model(run.info.run_id, tiny_model_dirs[family])
        tracking.client.set_terminated(run.info.run_id)
        with using(uri):
            out[f"{family}_path"] = Path(mlflow.artifacts.download_artifacts(out[family],
                                                                             dst_path=str(root / f"{family}-model")))
    with using(uri):
        version = mlflow.register_model(out["sisr"], "sisr-shared")
    tracking.set_alias("sisr-shared", "champion", version.version)
    return out


@pytest.mark.slow
def test_the_logged_model_installs_and_loads_without_the_project(logged: dict) -> None:
    model = logged["sisr_path"]
    requirements = (model / "requirements.txt").read_text().split()
    assert "pngrow" not in " ".join(requirements)
    assert {r.split("==")[0] for r in requirements} >= {"torch", "compressai", "safetensors", "pillow", "numpy",
                                                         "pandas", "mlflow", "pyyaml"}
    assert all("==" in r and "+" not in r for r in requirements)
    assert (model / "code" / "pngrow" / "workers" / "restoration.py").is_file()
    assert (model / "code" / "pngrow" / "pipeline" / "api.py").is_file()
    # A fresh Python outside the project, with the editable install's finder taken away: pngrow cannot be imported
    # until the model is loaded, and then it is the copy the model ships.
    script = f"""
import sys, base64, io
import numpy as np
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
try:
    import pngrow
    raise SystemExit("pngrow importable before the model loads: " + pngrow.__file__)
except ImportError:
    pass
import mlflow.pyfunc
model = mlflow.pyfunc.load_model({str(model)!r})
import pngrow
print(pngrow.__file__)
image = (np.arange(12 * 10 * 3) % 251).astype(np.uint8).reshape(12, 10, 3)
one = model.predict({{"task": "x2", "image": image}})                   # a dict with an array
many = model.predict({{"task": ["x2", "x3"], "image": [image, image]}})  # columns of arrays
print(one["image"][0] == many["image"][0], many["scale"].tolist())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=logged["root"], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    location, answer = result.stdout.split("\n")[-3:-1]
    assert Path(location).is_relative_to(model / "code" / "pngrow")
    assert answer == "True [2, 3]"


@pytest.mark.slow
def test_served_models_answer_json_requests_and_refuse_bad_ones(logged: dict, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": logged["tracking_uri"]}
    sisr = Server("models:/sisr-shared@champion", tmp_path / "sisr.log", env)
    nic = Server(logged["nic"], tmp_path / "nic.log", {**env, "PNGROW_MAX_REQUEST_PIXELS": "5000"})
    try:
        sisr.wait()
        nic.wait()
        image = skimage.data.astronaut()[100:148, 200:264]  # 48 x 64
        photo = b64(png(image))
        local = load_shared_model(str(logged["folder_sisr"]), progress=False)

        # SISR: every JSON form MLflow reads; the answer is a base64 PNG of the folder model's output.
        status, body = sisr.post({"dataframe_records": [{"task": "x2", "image": photo}]})
        assert status == 200, body
        [answer] = body["predictions"]
        assert answer["task"] == "x2" and answer["scale"] == 2
        assert np.array_equal(decoded(answer["image"]), local.upscale(image, "x2"))
        assert decoded(answer["image"]).shape == (96, 128, 3)
        status, body = sisr.post({"inputs": {"task": ["x2", "x3"], "image": [photo, photo]}})
        assert status == 200 and [p["scale"] for p in body["predictions"]] == [2, 3]
        assert np.array_equal(decoded(body["predictions"][1]["image"]), local.upscale(image, "x3"))
        status, body = sisr.post({"dataframe_split": {"columns": ["task", "image"], "data": [["x3", photo]]}})
        assert status == 200 and decoded(body["predictions"][0]["image"]).shape == (144, 192, 3)

        # Bad requests: one line each naming the problem, and the server answers the next good request.
        huge = b64(png(np.zeros((4096, 4096, 3), np.uint8)))  # 16.8 megapixels, a few kB of PNG
        for request, message in (
            ({"task": "x9", "image": photo}, "task 'x9' is not one of this model's tasks: x2, x3"),
            ({"task": "x2", "image": b64(b"hello")}, "image (5 bytes) is not a readable image"),
            ({"task": "x2", "image": "not base64!!"}, "image is not base64"),
            ({"task": "x2", "image": huge}, "image has 4096x4096 = 16,777,216 pixels, over the limit of 16,000,000"),
        ):
            status, body = sisr.post({"dataframe_records": [request]})
            assert status == 400 and message in body["message"], (status, body)  # README: HTTP 400
            status, body = sisr.post({"dataframe_records": [{"task": "x2", "image": photo}]})
            assert status == 200 and body["predictions"][0]["image"] == answer["image"]

        # NIC: compress answers the bitstream, its size and the decoded image; decompressing that bitstream gives
        # the same image, and so does the folder model (bitstreams move between the served and the Python model).
        nic_local = load_shared_model(str(logged["folder_nic"]), progress=False)
        status, body = nic.post({"dataframe_records": [{"task": "q2", "image": photo}]})
        assert status == 200, body
        [compressed] = body["predictions"]
        data = base64.b64decode(compressed["bitstream"])
        assert compressed["task"] == "q2" and compressed["bytes"] == len(data)
        assert compressed["bpp"] == pytest.approx(8 * len(data) / (48 * 64))
        assert np.array_equal(decoded(compressed["image"]), nic_local.decompress(data))
        assert np.array_equal(decoded(compressed["image"]), nic_local.restore(image, "q2"))
        status, body = nic.post({"dataframe_records": [{"bitstream": compressed["bitstream"]}]})
        assert status == 200, body
        [restored] = body["predictions"]
        assert restored["task"] == "q2" and restored["image"] == compressed["image"]
        assert restored["bytes"] == len(data) and restored["bitstream"] is None
        status, body = nic.post({"inputs": {"bitstream": [b64(nic_local.compress(image, "q6"))]}})
        assert status == 200 and body["predictions"][0]["task"] == "q6"

        for request, message in (
            ({"dataframe_records": [{"task": "q3", "image": photo}]}, "task 'q3' is not one of this model's tasks"),
            ({"dataframe_records": [{"bitstream": b64(b"hello")}]}, "not a pngrow bitstream (bad magic bytes)"),
            ({"dataframe_records": [{"task": "q6", "image": b64(b"\x89PNG\r\n\x1a\n")}]}, "is not a readable image"),
            ({"inputs": {"task": ["q6", "q6"], "image": [photo, photo]}},
             "rows 0-1 of the request have 6,144 pixels together, over the request limit of 5,000"),
        ):
            status, body = nic.post(request)
            assert status == 400 and message in body["message"], (status, body)  # README: HTTP 400
            status, body = nic.post({"dataframe_records": [{"task": "q2", "image": photo}]})
            assert status == 200 and body["predictions"][0]["bitstream"] == compressed["bitstream"]
    finally:
        sisr.stop()
        nic.stop()


@pytest.mark.slow
def test_promote_logs_a_model_from_before_serving_again(logged: dict) -> None:
    """A run whose pyfunc model an older pngrow logged (no signature, `pngrow==0.1.0` required) is promoted with a
    servable model, logged again from that model's checkpoint."""
    uri = logged["tracking_uri"]
    tracking = Tracking(uri, "serving")
    run_id = tracking.client.create_run(tracking.experiment_id).info.run_id
    checkpoint = shutil.copytree(logged["folder_sisr"], logged["root"] / "legacy" / "checkpoint")
    with using(uri), mlflow.start_run(run_id=run_id):
        old = mlflow.pyfunc.log_model(name="shared_model", python_model=shared_model.__file__,
                                      artifacts={"checkpoint": str(checkpoint)}, pip_requirements=["pngrow==0.1.0"])
    tracking.log(run_id, tags={names.MODEL_URI: old.model_uri})
    tracking.client.set_terminated(run_id)
    version = promote(tracking, run_id, "legacy", alias=None)
    with using(uri):
        info = mlflow.models.get_model_info(f"models:/legacy/{version.version}")
        model = Path(mlflow.artifacts.download_artifacts(f"models:/legacy/{version.version}",
                                                         dst_path=str(logged["root"] / "legacy-model")))
    assert info.model_uri != old.model_uri and info.signature == signature("sisr")
    assert "pngrow" not in (model / "requirements.txt").read_text() and (model / "code" / "pngrow").is_dir()
    assert tracking.run(run_id).data.tags[names.MODEL_URI] == version.source
