"""`pngrow export`: each task of small trained models as ONNX, run in ONNX Runtime against pngrow's PyTorch, and
NIC bitstreams crossing between the two both ways (all 24 Kodak images where ../shared is there)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from pngrow import load_shared_model
from pngrow.pipeline.cli import main
from pngrow.pipeline.export import TOLERANCE, export_model
from pngrow.pipeline.onnx_codec import OnnxCodec, OnnxUpscaler, load_task
from pngrow.workers.bitstream import BOUNDARY_MARGIN, CodedTile, IndexMismatch, LatentIndexes, pack, unpack
from pngrow.workers.models import load_model
from pngrow.workers.png import compact_task
from tests.tiny_models import tiny_models

KODAK = Path(__file__).parents[2].parent / "shared" / "datasets" / "kodak"
PHOTOS = {"astronaut": skimage.data.astronaut()[40:240, 100:390], "chelsea": skimage.data.chelsea()[:150, :200],
          "coffee": skimage.data.coffee()[100:300, 200:456]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Tiny NIC (q6, q2) and SISR (x2, x3) models and every task of each exported by the command line."""
    root = tmp_path_factory.mktemp("export")
    models = tiny_models(root / "models")
    for family in ("nic", "sisr"):
        assert main(["export", str(models[family]), "--out", str(root / f"{family}-onnx")]) == 0
    return {**models, "nic_onnx": root / "nic-onnx", "sisr_onnx": root / "sisr-onnx"}


@pytest.mark.slow
def test_every_sisr_task_matches_pytorch_in_onnx_runtime(exported) -> None:
    family, shared = load_model(exported["sisr"])
    model = load_shared_model(str(exported["sisr"]), progress=False)
    for task in ("x2", "x3"):
        manifest = json.loads((exported["sisr_onnx"] / task / "task.json").read_text())
        assert manifest["fingerprint"] == shared.fingerprint(task) and manifest["scale"] == int(task[1])
        assert manifest["max_difference"]["upscale"] <= TOLERANCE
        onnx = OnnxUpscaler(exported["sisr_onnx"] / task)
        compact = compact_task(shared.eval(), task)
        for size in ((17, 29), (64, 48)):  # sizes other than the traced one: the image size is dynamic
            lr = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(size[0]))
            sr = onnx.graph.run(None, {"lr": lr.numpy()})[0]
            with torch.no_grad():
                assert np.abs(sr - compact(lr).numpy()).max() <= TOLERANCE
        for photo in PHOTOS.values():
            ours, theirs = onnx.upscale(photo).astype(int), model.upscale(photo, task).astype(int)
            assert ours.shape == (photo.shape[0] * onnx.scale, photo.shape[1] * onnx.scale, 3)
            assert np.abs(ours - theirs).max() <= 1


def _cross(codec: OnnxCodec, model, image: np.ndarray, tile: int | None = None) -> int:
    """Misdecodes of ``image`` crossing both ways: a bitstream ONNX Runtime wrote decoded by pngrow, and the reverse,
    against the writer's own decode (one grey level of float rounding allowed)."""
    misdecodes = 0
    for written, own, other in ((codec.encode(image, tile), codec.decode, model.decompress),
                                (model.compress(image, codec.task, tile), model.decompress, codec.decode)):
        try:
            misdecodes += int(np.abs(own(written).astype(int) - other(written).astype(int)).max() > 1)
        except IndexMismatch:
            misdecodes += 1
    return misdecodes


@pytest.mark.slow
def test_nic_bitstreams_cross_between_onnx_runtime_and_pngrow_both_ways(exported) -> None:
    model = load_shared_model(str(exported["nic"]), progress=False)
    for task in ("q6", "q2"):
        codec = load_task(exported["nic_onnx"] / task)
        assert isinstance(codec, OnnxCodec)
        assert all(0 <= d <= TOLERANCE for d in codec.manifest["max_difference"].values())
        assert sum(_cross(codec, model, photo) for photo in PHOTOS.values()) == 0
        assert _cross(codec, model, PHOTOS["astronaut"], tile=128) == 0  # several tiles, the last ones partial
        data = codec.encode(PHOTOS["chelsea"])
        assert Path(exported["nic_onnx"] / task / "entropy.json").is_file() and unpack(data)[0]["task"] == task


@pytest.mark.slow
@pytest.mark.skipif(not KODAK.is_dir(), reason="../shared/datasets/kodak is not beside the repository")
def test_all_kodak_images_cross_both_ways_without_a_misdecode(exported) -> None:
    model = load_shared_model(str(exported["nic"]), progress=False)
    codec = load_task(exported["nic_onnx"] / "q2")
    images = sorted(KODAK.glob("*.png"))
    assert len(images) == 24
    assert sum(_cross(codec, model, np.array(Image.open(path).convert("RGB"))) for path in images) == 0


@pytest.mark.slow
def test_a_decoder_deriving_other_indexes_is_refused_in_one_line(exported, tmp_path: Path, capsys) -> None:
    """CompressAI issue 309: a runtime whose rounding moves a scale across a table boundary decodes garbage,
    silently. Pinned indexes cover a rounding's worth; here the decoder's scale table is moved 10% down (below the
    scales' lower bound, so that every index moves even on a tiny model): without the checksums it decodes other
    values without a word; with them, it and pngrow refuse the bitstream in one line."""
    codec = load_task(exported["nic_onnx"] / "q6")
    data = codec.encode(PHOTOS["coffee"], tile=128)
    shifted = load_task(exported["nic_onnx"] / "q6")
    shifted.scale_table = shifted.scale_table * np.float32(0.9)
    header, tiles = unpack(data)
    unchecked = CodedTile(tiles[0].strings, tiles[0].shape, None)
    assert not np.array_equal(shifted.decode_tile(unchecked), codec.decode_tile(tiles[0]))
    with pytest.raises(IndexMismatch, match=r"^tile \d+ of the bitstream: this decoder derives other entropy-coding"):
        shifted.decode(data)
    wrong = pack(header, [CodedTile(t.strings, t.shape, t.checksum ^ 1) for t in tiles])
    (tmp_path / "wrong.bin").write_bytes(wrong)
    assert main(["decompress", "--model", str(exported["nic"]), str(tmp_path / "wrong.bin"),
                 str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert "tile 0 of the bitstream: this decoder derives other entropy-coding indexes" in err
    assert err.count("\n") == 1 and not (tmp_path / "out.png").exists()


def _hyper_decoded(model, task: str, tile: CodedTile) -> LatentIndexes:  # noqa: ANN001
    """What pngrow derives from a coded tile's hyper-latent (its scales and its own indexes)."""
    return model.family.coding_indexes(model.network, task, {"strings": [[s] for s in tile.strings],
                                                             "shape": tile.shape})


@pytest.mark.slow
def test_the_runtimes_scales_differ_far_less_than_the_pinning_margin(exported) -> None:
    """The margin pinned indexes rest on: ONNX Runtime's and PyTorch's scales of the same hyper-latent differ by
    far less than BOUNDARY_MARGIN of the tile's largest scale (measured at full size: 3.6e-7 of it at most)."""
    model = load_shared_model(str(exported["nic"]), progress=False)
    for task in ("q6", "q2"):
        codec = load_task(exported["nic_onnx"] / task)
        for photo in PHOTOS.values():
            (tile,) = unpack(codec.encode(photo))[1]
            ours, theirs = codec.hyper_decode(tile)[0].scales, _hyper_decoded(model, task, tile).scales
            assert 0 < np.abs(ours).max() and np.abs(ours - theirs).max() <= BOUNDARY_MARGIN / 10 * np.abs(ours).max()


def _most_isolated(scales: np.ndarray) -> int:
    """The flat position of the scale, among the larger half, farthest from every other scale."""
    flat = scales.ravel().astype(np.float64)
    order = np.argsort(flat)
    ordered = flat[order]
    gaps = np.minimum(np.diff(ordered, prepend=-np.inf), np.diff(ordered, append=np.inf))
    gaps[ordered < ordered[-1] / 2] = 0
    return int(order[np.argmax(gaps)])


def _boundary_at(table: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """``table`` stretched so that its middle boundary lies at ``scale + offset`` (the tiny model's scales are all
    below CompressAI's first boundary, 0.11)."""
    moved = (table.astype(np.float64) * (scale / table[32])).astype(np.float32)
    moved[32] = np.float32(np.float64(scale) + offset)
    assert np.all(np.diff(moved) > 0)
    return moved


@pytest.mark.slow
@pytest.mark.parametrize(("onnx_offset", "torch_offset"), [(0.0, -1e-6), (1e-6, -1e-6)],
                         ids=["exactly-on-it-for-onnx-runtime", "either-side-by-1e-6"])
def test_a_scale_on_opposite_sides_of_a_boundary_in_the_two_runtimes_decodes_identically(
        exported, onnx_offset: float, torch_offset: float) -> None:
    """CompressAI issue 309, constructed: one latent's scale lies on a boundary (or just below it) for ONNX Runtime
    and just above it for PyTorch, by the offsets times the tile's largest scale (a runtime's rounding moves a scale
    up to 3.6e-7 of it). Each runtime derives another index for it than the other, and a bitstream either one writes
    pins the encoder's, so that the other decodes it to the encoder's own image."""
    task, photo = "q6", PHOTOS["chelsea"]
    codec, model = load_task(exported["nic_onnx"] / task), load_shared_model(str(exported["nic"]), progress=False)
    latent = codec.hyper_decode(unpack(codec.encode(photo))[1][0])[0]
    position = _most_isolated(latent.scales)
    scale, largest = latent.scales.ravel()[position], np.abs(latent.scales).max()
    codec.scale_table = _boundary_at(codec.scale_table, scale, onnx_offset * largest)
    codec.scale_bound = codec.scale_table[0]
    conditional = model.network.compact(task).model.gaussian_conditional
    table = _boundary_at(conditional.scale_table.numpy(), scale, torch_offset * largest)
    conditional.scale_table.copy_(torch.from_numpy(table))
    conditional.lower_bound_scale.bound.fill_(float(table[0]))
    for written, own, other, derives in (
            (codec.encode(photo), codec.decode, model.decompress, lambda t: _hyper_decoded(model, task, t)),
            (model.compress(photo, task), model.decompress, codec.decode, lambda t: codec.hyper_decode(t)[0])):
        (tile,) = unpack(written)[1]
        pinned = dict(tile.pinned)
        assert position in pinned and derives(tile).indexes.ravel()[position] != pinned[position]
        assert np.abs(own(written).astype(int) - other(written).astype(int)).max() <= 1


@pytest.mark.slow
def test_bitstreams_written_before_pinned_indexes_still_decode(exported) -> None:
    """As pngrow wrote them with checksums but no pinned indexes, and as it first wrote them, with neither."""
    model = load_shared_model(str(exported["nic"]), progress=False)
    codec = load_task(exported["nic_onnx"] / "q2")
    data = model.compress(PHOTOS["chelsea"], "q2", tile=64)
    header, tiles = unpack(data)
    assert header["boundary_margin"] == BOUNDARY_MARGIN and all(t.pinned is not None for t in tiles)
    for checked in (True, False):
        old = pack(header, [CodedTile(t.strings, t.shape, t.checksum if checked else None) for t in tiles])
        assert b"boundary_margin" not in old and (b"index_check" in old) == checked
        assert np.array_equal(model.decompress(old), model.decompress(data))
        assert np.array_equal(codec.decode(old), codec.decode(data))


@pytest.mark.slow
def test_the_onnx_codec_runs_without_pytorch(exported, tmp_path: Path) -> None:
    model = load_shared_model(str(exported["nic"]), progress=False)
    (tmp_path / "in.bin").write_bytes(model.compress(PHOTOS["astronaut"], "q6"))
    script = (f"import sys, numpy as np; from pngrow.pipeline.onnx_codec import load_task; "
              f"codec = load_task({str(exported['nic_onnx'] / 'q6')!r}); "
              f"image = codec.decode(open({str(tmp_path / 'in.bin')!r}, 'rb').read()); "
              f"np.save({str(tmp_path / 'out.npy')!r}, image); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[2])
    assert done.stdout.strip() == "False"
    assert np.array_equal(np.load(tmp_path / "out.npy"), model.decompress((tmp_path / "in.bin").read_bytes()))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{sisr}", "--task", "x4"], "unknown task 'x4' (tasks: x2, x3)"),
        (["{photo_dir}"], "is neither a pngrow model folder nor a pngrow pyfunc model"),
        (["{sisr}", "--out", "{file}/onnx"], "cannot be written: Not a directory"),
        (["{sisr}", "--opset", "99"], "opset 99 is not supported by ONNX Runtime"),
        (["{sisr}", "--opset", "17"], "opset 17 is not one pngrow exports"),
    ],
)
def test_bad_export_input_fails_with_one_line(exported, tmp_path: Path, capsys, args: list[str],
                                              message: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = ["--out", str(tmp_path / "onnx")] if "--out" not in args else []
    filled = [a.format(sisr=exported["sisr"], photo_dir=tmp_path, file=tmp_path / "file") for a in args]
    assert main(["export", *filled, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_promote_attaches_every_task_as_onnx_to_the_registered_version(exported, tmp_path: Path, capsys) -> None:
    from pngrow.pipeline import names
    from pngrow.pipeline.tracking import Tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(uri, "pngrow", artifact_root=str(tmp_path / "artifacts"))
    run_id = tracking.client.create_run(tracking.experiment_id).info.run_id
    tracking.log_shared_model(run_id, exported["sisr"])
    tracking.client.set_terminated(run_id)
    assert main(["promote", run_id, "--name", "sisr-onnx", "--onnx", "--tracking-uri", uri]) == 0
    assert f"its tasks as ONNX: runs:/{run_id}/onnx/sisr-onnx/1" in capsys.readouterr().out
    version = tracking.model_version("sisr-onnx", "1")
    folder = tracking.download_artifact(version.tags[names.ONNX], tmp_path / "downloaded")
    model = load_shared_model("models:/sisr-onnx@champion", tracking_uri=uri, progress=False)
    for task in ("x2", "x3"):
        onnx = OnnxUpscaler(folder / task)
        assert onnx.manifest["model"] == "models:/sisr-onnx/1"
        ours = onnx.upscale(PHOTOS["chelsea"]).astype(int)
        assert np.abs(ours - model.upscale(PHOTOS["chelsea"], task).astype(int)).max() <= 1


def test_export_model_refuses_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is neither a pngrow model folder"):
        export_model(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
