"""Image-folder task family on generated MiniImagenet-format and class-folder data sets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.spec import ImageFolderTask
from workers.tasks import DatasetError, build_task_family
from workers.tasks.image_folder import ImageFolderFamily, preprocess_image

S = 12
CSV_CLASSES = {"train": 6, "val": 3, "test": 3}
PER_CLASS = 6


def colour(c: int) -> tuple[int, int, int]:
    """A distinct colour per class, so a test can tell which class an image came from."""
    return (40 * (c % 6) + 20, 80 * (c // 6) + 30, 255 - 20 * c)


def write_image(path: Path, c: int, i: int, size: tuple[int, int] = (20, 16)) -> None:
    rng = np.random.default_rng(1000 * c + i)
    pixels = np.clip(np.array(colour(c)) + rng.integers(-8, 9, size=(size[1], size[0], 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """MiniImagenet format: images/ plus train/val/test.csv (6/3/3 classes of 6 JPEGs)."""
    root = tmp_path_factory.mktemp("mini")
    (root / "images").mkdir()
    c = 0
    for split, count in CSV_CLASSES.items():
        rows = ["filename,label"]
        for _ in range(count):
            label = f"n{c:08d}"
            for i in range(PER_CLASS):
                name = f"{label}{i:08d}.jpg"
                write_image(root / "images" / name, c, i)
                rows.append(f"{name},{label}")
            c += 1
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Class folders: 10 classes of 5 PNGs (plus a stray file and a hidden folder to ignore)."""
    root = tmp_path_factory.mktemp("folders")
    for c in range(10):
        (root / f"class{c}").mkdir()
        for i in range(5):
            write_image(root / f"class{c}" / f"{i}.png", c, i, size=(S, S))
    (root / "class0" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / "README").write_text("not a class")
    return root


def spec(path: Path, **fields) -> ImageFolderTask:
    fields = {"image_size": S, "ways": 3, "queries": 3, **fields}
    return ImageFolderTask(family="image_folder", path=str(path), **fields)


def test_csv_format_shapes_and_labels(mini):
    fam = ImageFolderFamily(spec(mini, shots=2, queries=3))
    assert fam.loss == "cross_entropy" and fam.input_shape == (3, S, S) and fam.output_dim == 3
    assert {name: len(classes) for name, classes in fam.splits.items()} == CSV_CLASSES
    task = fam.sample(0, 0, 0)
    assert task.x_support.shape == (6, 3, S, S) and task.x_query.shape == (9, 3, S, S)
    assert task.x_support.dtype == torch.float32 and task.y_query.dtype == torch.int64
    assert task.y_support.tolist() == [0, 0, 1, 1, 2, 2]
    assert task.y_query.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert 0.0 <= task.x_query.min() and task.x_query.max() <= 1.0
    # Support and query images of one label come from one class: their mean colours agree.
    means_s = task.x_support.mean(dim=(2, 3)).reshape(3, 2, 3).mean(1)
    means_q = task.x_query.mean(dim=(2, 3)).reshape(3, 3, 3).mean(1)
    assert torch.allclose(means_s, means_q, atol=0.03)
    assert len({tuple((m * 255).round().tolist()) for m in means_s}) == 3


def test_splits_use_their_own_classes(mini):
    fam = ImageFolderFamily(spec(mini))
    labels = {name: {c.label for c in classes} for name, classes in fam.splits.items()}
    assert not labels["train"] & labels["val"] and not labels["train"] & labels["test"]
    assert not labels["val"] & labels["test"]
    train_colours = {tuple(np.array(colour(c)) / 255) for c in range(6)}
    task = fam.sample(0, 0, 0, "test")
    for m in task.x_query.mean(dim=(2, 3)):
        assert min(np.abs(np.array(t) - m.numpy()).max() for t in train_colours) > 0.05


def test_grey_and_float64(mini):
    fam = ImageFolderFamily(spec(mini, channels=1), dtype=torch.float64)
    task = fam.sample(0, 0, 0)
    assert fam.input_shape == (1, S, S) and task.x_support.shape == (3, 1, S, S)
    assert task.x_support.dtype == torch.float64


def test_deterministic_and_distinct(mini):
    a = ImageFolderFamily(spec(mini)).sample(5, 1, 2, "val")
    fam = ImageFolderFamily(spec(mini))
    b = fam.sample(5, 1, 2, "val")
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    for other in (fam.sample(5, 1, 3, "val"), fam.sample(5, 2, 2, "val"), fam.sample(5, 1, 2, "train")):
        assert not torch.equal(a.x_query, other.x_query)


def test_decoded_images_are_cached_and_family_pickles(mini):
    fam = ImageFolderFamily(spec(mini))
    first = fam.sample(0, 0, 0)
    fam.sample(0, 0, 0)
    assert fam._pixels.cache_info().hits == 3 * 4  # the second task decoded nothing
    copy = pickle.loads(pickle.dumps(fam))
    assert all(torch.equal(u, v) for u, v in zip(first, copy.sample(0, 0, 0), strict=True))


def test_class_folders(folders):
    fam = ImageFolderFamily(spec(folders, ways=2, shots=1, queries=4, channels=1))
    sizes = {name: len(classes) for name, classes in fam.splits.items()}
    assert sizes == {"train": 6, "val": 2, "test": 2}
    names = [c.label for classes in fam.splits.values() for c in classes]
    assert sorted(names) == [f"class{c}" for c in range(10)]
    assert all(len(c.files) == 5 for classes in fam.splits.values() for c in classes)  # notes.txt ignored
    again = ImageFolderFamily(spec(folders, ways=2, shots=1, queries=4, channels=1))
    assert again.splits == fam.splits  # the split is a fixed function of the class names
    task = fam.sample(0, 0, 0, "test")
    assert task.x_support.shape == (2, 1, S, S) and task.x_query.shape == (8, 1, S, S)


def test_training_and_inference_preprocess_identically(folders):
    fam = ImageFolderFamily(spec(folders, ways=2))
    file = fam.splits["train"][0].files[0]
    with Image.open(file) as img:
        x = preprocess_image(img, S, 3)
    assert torch.equal(x, torch.from_numpy(fam._pixels(file)).float() / 255)


def test_preprocess_image():
    img = Image.new("RGBA", (30, 20), (0, 0, 0, 0))  # transparent: flattened onto white
    x = preprocess_image(img, 16, 3)
    assert x.shape == (3, 16, 16) and torch.all(x == 1.0)
    grey = preprocess_image(Image.new("RGB", (8, 8), (255, 0, 0)), 8, 1, dtype=torch.float64)
    assert grey.shape == (1, 8, 8) and grey.dtype == torch.float64 and 0.2 < grey[0, 0, 0] < 0.4


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match=r"^task\.path: .*nowhere") as info:
        ImageFolderFamily(spec(tmp_path / "nowhere"))
    assert info.value.field == "task.path"
    with pytest.raises(DatasetError, match=r"^task\.path: .*no class folders"):
        ImageFolderFamily(spec(tmp_path))


def copy_mini(mini: Path, target: Path) -> Path:
    (target / "images").mkdir(parents=True)
    for file in (mini / "images").iterdir():
        (target / "images" / file.name).symlink_to(file)
    for split in CSV_CLASSES:
        (target / f"{split}.csv").write_text((mini / f"{split}.csv").read_text())
    return target


def test_csv_referring_to_missing_image(mini, tmp_path):
    root = copy_mini(mini, tmp_path / "m")
    (root / "val.csv").write_text((root / "val.csv").read_text() + "n99999999.jpg,n00000006\n")
    with pytest.raises(DatasetError, match=r"^task\.path: .*val\.csv, line 20: image n99999999\.jpg"):
        ImageFolderFamily(spec(root))


def test_csv_format_problems(mini, tmp_path):
    root = copy_mini(mini, tmp_path / "m")
    (root / "test.csv").unlink()
    with pytest.raises(DatasetError, match=r"^task\.path: .*not test\.csv"):
        ImageFolderFamily(spec(root))
    (root / "test.csv").write_text("image,class\n")
    with pytest.raises(DatasetError, match="header must be 'filename,label'"):
        ImageFolderFamily(spec(root))


def test_unreadable_image(mini, tmp_path):
    root = copy_mini(mini, tmp_path / "m")
    name = (root / "train.csv").read_text().splitlines()[1].split(",")[0]
    (root / "images" / name).unlink()
    (root / "images" / name).write_bytes(b"not a jpeg")
    fam = ImageFolderFamily(spec(root, shots=1, queries=5))  # every image of a drawn class is read
    with pytest.raises(DatasetError, match=rf"^task\.path: cannot read image .*{name}"):
        for index in range(50):  # until the broken image's class is drawn
            fam.sample(0, 0, index)


def test_too_few_images_names_shots(mini, folders):
    with pytest.raises(DatasetError, match=r"^task\.shots: .*6 images, fewer than shots \+ queries = 7") as e:
        ImageFolderFamily(spec(mini, shots=2, queries=5))
    assert e.value.field == "task.shots"
    with pytest.raises(DatasetError, match=r"^task\.shots: "):
        ImageFolderFamily(spec(folders, ways=2, shots=1, queries=5))


def test_too_many_ways_names_ways(mini, folders):
    with pytest.raises(DatasetError, match=r"^task\.ways: 4-way .* 'val' has 3") as info:
        ImageFolderFamily(spec(mini, ways=4))
    assert info.value.field == "task.ways"
    with pytest.raises(DatasetError, match=r"^task\.ways: 3-way .* 'val' has 2"):
        ImageFolderFamily(spec(folders, ways=3))


def test_build_task_family(mini):
    fam = build_task_family(spec(mini), dtype=torch.float64)
    assert isinstance(fam, ImageFolderFamily) and fam.sample(0, 0, 0).x_query.dtype == torch.float64
