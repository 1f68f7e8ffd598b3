"""model.datasets: synthetic / CVUSA / CVACT readers and PairDataset, on fixture trees built here."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model.config import L2LTRConfig
from model.datasets import DatasetError, PairDataset, PairRecord, load_split, read_cvact, read_cvusa, read_synthetic


def _img(path, h=32, w=32, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _synthetic(tmp_path, n=4):
    root = tmp_path / "world"
    (root / "splits").mkdir(parents=True)
    rows = []
    for i in range(n):
        pid = f"{i:06d}"
        _img(root / "bingmap" / f"{pid}.png", 64, 64, i)
        _img(root / "streetview" / f"{pid}.jpg", 32, 128, 100 + i)
        rows.append(f"{pid},bingmap/{pid}.png,streetview/{pid}.jpg,{47.0 + i * 1e-4:.8f},{8.5:.8f}")
    header = "id,aerial,ground,lat,lon\n"
    (root / "splits" / "train.csv").write_text(header + "\n".join(rows[:3]) + "\n")
    (root / "splits" / "val.csv").write_text(header + rows[3] + "\n")
    return root


def test_synthetic_reader(tmp_path):
    root = _synthetic(tmp_path)
    tr = read_synthetic(root, "train")
    va = load_split("synthetic", root, "val")
    assert [r.id for r in tr] == ["000000", "000001", "000002"]
    assert len(va) == 1 and va[0].lat == pytest.approx(47.0003) and va[0].lon == pytest.approx(8.5)
    assert tr[0].aerial_path == str(root / "bingmap" / "000000.png")
    assert tr[0].ground_path == str(root / "streetview" / "000000.jpg")
    assert len(read_synthetic(root, "all")) == 4


def test_synthetic_reader_with_tile_centres(tmp_path):
    """A grid region's pairs (scripts/grid_pairs.py) name each tile's centre beside the camera."""
    root = _synthetic(tmp_path)
    path = root / "splits" / "train.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",tile_lat,tile_lon"] + [x + ",47.0002,8.5003" for x in lines[1:]]) + "\n")
    records = read_synthetic(root, "train")
    assert [(r.tile_lat, r.tile_lon) for r in records] == [(47.0002, 8.5003)] * 3
    assert read_synthetic(root, "val")[0].tile_lat is None  # the plain header: no tile centres
    path.write_text(path.read_text() + "000009,bingmap/000000.png,streetview/000000.jpg,47,8.5,91,8.5\n")
    with pytest.raises(DatasetError, match=rf"{path}:5: tile_lat 91.0 is out of range"):
        read_synthetic(root, "train")
    path.write_text(path.read_text().replace(",91,8.5", ""))
    with pytest.raises(DatasetError, match=rf"{path}:5: expected 7 columns"):
        read_synthetic(root, "train")


@pytest.mark.parametrize("line,msg", [
    ("000009,bingmap/x.png,streetview/x.jpg,47.0", "expected 5 columns"),
    ("000009,bingmap/x.png,streetview/x.jpg,abc,8.5", "lat 'abc' is not a number"),
    ("000009,bingmap/x.png,streetview/x.jpg,95,8.5", "out of range"),
    ("000009,/etc/x.png,streetview/x.jpg,47,8.5", "must be relative"),
    ("000000,bingmap/000000.png,streetview/000000.jpg,47,8.5", "duplicate id"),
])
def test_synthetic_malformed_line_names_file_and_line(tmp_path, line, msg):
    root = _synthetic(tmp_path)
    path = root / "splits" / "train.csv"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(DatasetError) as e:
        read_synthetic(root, "train")
    assert f"{path}:5" in str(e.value) and msg in str(e.value)


def test_synthetic_missing_file_and_split(tmp_path):
    root = _synthetic(tmp_path)
    (root / "streetview" / "000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"train\.csv:3: image file .*000001\.jpg does not exist"):
        read_synthetic(root, "train")
    with pytest.raises(DatasetError, match="split file .*test.csv does not exist"):
        read_synthetic(root, "test")
    (root / "splits" / "val.csv").write_text("id,ground,aerial,lat,lon\n")
    with pytest.raises(DatasetError, match=r"val\.csv:1: header"):
        read_synthetic(root, "val")


def _cvusa(tmp_path, n=3, polar=False):
    root = tmp_path / "CVUSA"
    (root / "splits").mkdir(parents=True)
    lines = []
    for i in range(n):
        pid = f"{i + 1:07d}"
        _img(root / "bingmap" / "19" / f"{pid}.jpg", 48, 48, i)
        _img(root / "streetview" / "panos" / f"{pid}.jpg", 24, 96, i + 50)
        if polar:
            _img(root / "polarmap" / "19" / f"{pid}.png", 28, 154, i + 70)
        lines.append(f"bingmap/19/{pid}.jpg,streetview/panos/{pid}.jpg,annotations/{pid}.png")
    (root / "splits" / "train-19zl.csv").write_text("\n".join(lines[:2]) + "\n")
    (root / "splits" / "val-19zl.csv").write_text(lines[2] + "\n")
    return root


def test_cvusa_reader(tmp_path):
    root = _cvusa(tmp_path, polar=True)
    tr = read_cvusa(root, "train")
    assert [r.id for r in tr] == ["0000001", "0000002"] and tr[0].lat is None
    assert tr[0].aerial_path.endswith("bingmap/19/0000001.jpg")
    assert tr[0].ground_path.endswith("streetview/panos/0000001.jpg")
    pol = load_split("cvusa", root, "val", polar=True)
    assert pol[0].aerial_path.endswith("polarmap/19/0000003.png") and pol[0].aerial_is_polar


def test_cvusa_errors(tmp_path):
    root = _cvusa(tmp_path)
    split = root / "splits" / "train-19zl.csv"
    split.write_text(split.read_text() + "just-one-field\n")
    with pytest.raises(DatasetError, match=r"train-19zl\.csv:3: expected"):
        read_cvusa(root, "train")
    split.write_text("streetview/panos/0000001.jpg,bingmap/19/0000001.jpg,x\n")
    with pytest.raises(DatasetError, match=r"train-19zl\.csv:1: first column .* not under bingmap/"):
        read_cvusa(root, "train")
    (root / "bingmap" / "19" / "0000003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"val-19zl\.csv:1: image file .*0000003\.jpg does not exist"):
        read_cvusa(root, "val")
    with pytest.raises(DatasetError, match="polarmap"):
        read_cvusa(root, "val", polar=True)


def _cvact(tmp_path, ids=("aaa", "bbb", "ccc", "ddd")):
    from scipy.io import savemat

    root = tmp_path / "CVACT"
    for i, pid in enumerate(ids):
        _img(root / "streetview" / f"{pid}_grdView.jpg", 24, 96, i)
        _img(root / "satview_polish" / f"{pid}_satView_polish.jpg", 48, 48, i + 9)
    savemat(str(root / "ACT_data.mat"), {
        "panoIds": np.array(list(ids)),
        "utm": np.arange(2 * len(ids), dtype=np.float64).reshape(-1, 2) + 690000.0,
        "trainSet": {"trainInd": np.array([[1], [2]], dtype=np.float64)},
        "valSet": {"valInd": np.array([[3]], dtype=np.float64)},
        "valSetAll": {"valInd": np.array([[3], [4]], dtype=np.float64)},
    })
    return root


def test_cvact_reader(tmp_path):
    root = _cvact(tmp_path)
    tr = read_cvact(root, "train")
    assert [r.id for r in tr] == ["aaa", "bbb"]
    assert tr[0].ground_path.endswith("streetview/aaa_grdView.jpg")
    assert tr[0].aerial_path.endswith("satview_polish/aaa_satView_polish.jpg")
    assert tr[1].utm == (690002.0, 690003.0) and tr[1].lat is None
    assert [r.id for r in load_split("cvact", root, "val")] == ["ccc"]
    assert [r.id for r in read_cvact(root, "valAll")] == ["ccc", "ddd"]


def test_cvact_errors(tmp_path):
    from scipy.io import savemat

    root = _cvact(tmp_path)
    (root / "satview_polish" / "ddd_satView_polish.jpg").unlink()
    with pytest.raises(DatasetError, match=r"valSetAll\.valInd, panoIds\[3\]='ddd'.*ddd_satView_polish\.jpg"):
        read_cvact(root, "valAll")
    with pytest.raises(DatasetError, match="not 'test'"):
        read_cvact(root, "test")
    savemat(str(root / "ACT_data.mat"), {"panoIds": np.array(["aaa"]), "trainSet": {"trainInd": np.array([[2]])}})
    with pytest.raises(DatasetError, match=r"trainSet\.trainInd index 2 outside 1\.\.1"):
        read_cvact(root, "train")
    with pytest.raises(DatasetError, match="variable 'valSet' missing"):
        read_cvact(root, "val")
    (root / "ACT_data.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="cannot read MAT file"):
        read_cvact(root, "train")


def test_load_split_unknown(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_split("vigor", tmp_path, "train")
    with pytest.raises(DatasetError, match="does not exist"):
        load_split("synthetic", tmp_path / "nope", "train")


def test_pair_dataset_tensors_and_errors(tmp_path):
    root = _synthetic(tmp_path)
    cfg = L2LTRConfig.named("tiny")
    ds = PairDataset(read_synthetic(root, "train"), cfg)
    assert len(ds) == 3
    item = ds[1]
    assert item["index"] == 1
    assert tuple(item["ground"].shape) == (3, *cfg.ground_size)
    assert tuple(item["aerial"].shape) == (3, *cfg.aerial_size)
    assert item["ground"].dtype.is_floating_point
    # polar-flagged aerial images are only resized
    rec = PairRecord("p", ds.records[0].ground_path, ds.records[0].aerial_path, aerial_is_polar=True)
    assert tuple(PairDataset([rec], cfg)[0]["aerial"].shape) == (3, *cfg.aerial_size)
    # a broken image names the file
    (root / "bingmap" / "000002.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"pair 000002: cannot load aerial image .*000002\.png"):
        ds[2]
    with pytest.raises(IndexError):
        ds[3]


def test_pair_dataset_in_dataloader(tmp_path):
    import torch

    root = _synthetic(tmp_path)
    ds = PairDataset(read_synthetic(root, "all"), L2LTRConfig.named("tiny"))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["ground"].shape[0] == 4 and batch["index"].tolist() == [0, 1, 2, 3]
