import json
import os

import pytest
import torch
from PIL import Image

from fasterrcnn_ext.data import CLASS_NAMES, CocoDetection, SyntheticShapes, collate, find_annotation_file


def test_synthetic_is_deterministic_per_seed():
    a, b, c = SyntheticShapes(6, seed=3), SyntheticShapes(6, seed=3), SyntheticShapes(6, seed=4)
    for i in range(6):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(6))


def test_synthetic_targets_are_torchvision_format_and_inside_the_image():
    ds = SyntheticShapes(40, image_size=(96, 128), seed=1)
    seen = set()
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 96, 128) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        b = t["boxes"]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 128).all() and (b[:, 3] <= 96).all()
        assert ((t["labels"] >= 1) & (t["labels"] <= len(CLASS_NAMES))).all()
        seen.update(t["labels"].tolist())
    assert seen == set(range(1, len(CLASS_NAMES) + 1))  # every class appears


def test_synthetic_cache_gives_the_same_items():
    plain, cached = SyntheticShapes(3, seed=5), SyntheticShapes(3, seed=5, cache=True)
    for _ in range(2):
        for i in range(3):
            assert torch.equal(plain[i][0], cached[i][0])
    with pytest.raises(IndexError):
        plain[3]


@pytest.mark.parametrize("kwargs", [dict(num_images=-1), dict(num_images=2, image_size=8),
                                    dict(num_images=2, max_objects=0), dict(num_images=2, object_size=(0.5, 0.2))])
def test_synthetic_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticShapes(**kwargs)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    synthetic = SyntheticShapes(5, image_size=80, seed=7)
    synthetic.write_coco(root, "train2017")
    return root, synthetic


def test_coco_dataset_reads_what_synthetic_wrote(coco_dir):
    root, synthetic = coco_dir
    ds = CocoDetection(root, "train")
    assert find_annotation_file(root, "train").endswith("instances_train2017.json")
    assert ds.class_names == CLASS_NAMES and ds.num_classes == len(CLASS_NAMES) + 1 and len(ds) == 5
    for i in range(5):
        (image, t), (ref_image, ref) = ds[i], synthetic[i]
        assert torch.equal(image, ref_image)  # PNG is lossless
        assert torch.equal(t["boxes"], ref["boxes"]) and torch.equal(t["labels"], ref["labels"])
        assert t["image_id"] == ref["image_id"]


def test_coco_dataset_hflip(coco_dir):
    root, synthetic = coco_dir
    ds = CocoDetection(root, "train", hflip=1.0)
    image, t = ds[0]
    ref_image, ref = synthetic[0]
    assert torch.equal(image, ref_image.flip(-1))
    w = image.shape[-1]
    assert torch.equal(t["boxes"][:, [0, 2]], w - ref["boxes"][:, [2, 0]])


def test_coco_dataset_maps_sparse_category_ids_and_drops_crowd_and_empty_boxes(tmp_path):
    os.makedirs(tmp_path / "annotations")
    os.makedirs(tmp_path / "images")
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "b.png")
    gt = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}],
          "categories": [{"id": 90, "name": "z"}, {"id": 3, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 2, 10, 5], "iscrowd": 0},
                          {"id": 2, "image_id": 7, "category_id": 3, "bbox": [1, 2, 0, 5], "iscrowd": 0},
                          {"id": 3, "image_id": 7, "category_id": 3, "bbox": [1, 2, 5, 5], "iscrowd": 1},
                          {"id": 4, "image_id": 7, "category_id": 3, "bbox": [30, 20, 50, 50], "iscrowd": 0}]}
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(gt))
    ds = CocoDetection(str(tmp_path), "val")
    assert ds.category_ids == (3, 90) and ds.class_names == ("a", "z")
    _, t = ds[0]
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].tolist() == [[1, 2, 11, 7], [30, 20, 40, 30]]  # clipped to the image
    _, t = ds[1]  # an image with no boxes: a negative
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and len(targets) == 2


def test_coco_bad_files_name_the_file(tmp_path, coco_dir):
    with pytest.raises(FileNotFoundError, match="instances_train"):
        CocoDetection(str(tmp_path), "train")
    os.makedirs(tmp_path / "annotations")
    (tmp_path / "annotations" / "instances_train.json").write_text("{not json")
    with pytest.raises(ValueError, match="instances_train.json"):
        CocoDetection(str(tmp_path), "train")
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="categories"):
        CocoDetection(str(tmp_path), "train")

    root, _ = coco_dir
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(root, broken)
    os.remove(broken / "train2017" / "000002.png")
    (broken / "train2017" / "000003.png").write_bytes(b"not a png")
    ds = CocoDetection(str(broken), "train")
    with pytest.raises(FileNotFoundError, match="000002.png"):
        ds[1]
    with pytest.raises(ValueError, match="000003.png"):
        ds[2]
    skipping = CocoDetection(str(broken), "train", skip_bad_images=True)
    with pytest.warns(UserWarning) as record:
        _, t = skipping[1]
    assert t["image_id"] == 4  # the next readable image: 000002 is missing, 000003 corrupt
    warned = " ".join(str(w.message) for w in record)
    assert "000002.png" in warned and "000003.png" in warned
