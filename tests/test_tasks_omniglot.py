"""Omniglot task family on a tiny generated copy of the official zips (one test reads the real data)."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from workers.spec import OmniglotTask, SinusoidTask
from workers.tasks import DatasetError, build_task_family
from workers.tasks import omniglot as om
from workers.tasks.omniglot import OmniglotFamily, preprocess_image

# background: 2 alphabets x 3 characters; evaluation: 2 alphabets x 2 characters (10 in all)
LAYOUT = {"images_background": {"Alpha": 3, "Beta": 3}, "images_evaluation": {"Gamma": 2, "Delta": 2}}
S = 16


def drawing(rng: np.random.Generator) -> bytes:
    """A 105x105 black-on-white mode-1 PNG with a few random strokes, like the real files."""
    img = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(5, 100, size=4))
        draw.line((x0, y0, x1, y1), fill=0, width=int(rng.integers(2, 6)))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def write_fake_omniglot(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    number = 0
    for top, alphabets in LAYOUT.items():
        with zipfile.ZipFile(folder / f"{top}.zip", "w") as archive:
            for alphabet, count in alphabets.items():
                for c in range(1, count + 1):
                    number += 1
                    for d in range(1, 21):
                        archive.writestr(f"{top}/{alphabet}/character{c:02d}/{number:04d}_{d:02d}.png",
                                         drawing(rng))
    return folder


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    return write_fake_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(autouse=True)
def _fresh_memory():
    om.clear_memory_cache()
    yield
    om.clear_memory_cache()


def family(root: Path, cache: Path, **fields) -> OmniglotFamily:
    spec = OmniglotTask(family="omniglot", **{"image_size": S, **fields})
    return OmniglotFamily(spec, data_root=root, cache_dir=cache)


def test_shapes_dtypes_labels(fake_root, tmp_path):
    fam = family(fake_root, tmp_path, ways=5, shots=2, queries=3)
    assert fam.loss == "cross_entropy" and fam.input_shape == (1, S, S) and fam.output_dim == 5
    task = fam.sample(0, 0, 0)
    assert task.x_support.shape == (10, 1, S, S) and task.x_query.shape == (15, 1, S, S)
    assert task.x_support.dtype == torch.float32 and task.y_support.dtype == torch.int64
    assert task.y_support.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert task.y_query.tolist() == sum(([k] * 3 for k in range(5)), [])
    for x in (task.x_support, task.x_query):
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5  # ink is bright
        assert x.mean() < 0.5  # mostly paper (0.0)
    assert family(fake_root, tmp_path).sample(0, 0, 0).x_support.shape == (5, 1, S, S)  # defaults: 1 shot


def test_float64(fake_root, tmp_path):
    spec = OmniglotTask(family="omniglot", image_size=S)
    fam = OmniglotFamily(spec, data_root=fake_root, cache_dir=tmp_path, dtype=torch.float64)
    a = fam.sample(0, 0, 0)
    assert a.x_query.dtype == torch.float64
    b = family(fake_root, tmp_path).sample(0, 0, 0)
    assert torch.equal(a.x_query.float(), b.x_query)


def test_deterministic_and_distinct(fake_root, tmp_path):
    fam = family(fake_root, tmp_path)
    a, b = fam.sample(3, 7, 1, "train"), family(fake_root, tmp_path).sample(3, 7, 1, "train")
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    for other in (fam.sample(3, 7, 2), fam.sample(3, 8, 1), fam.sample(4, 7, 1), fam.sample(3, 7, 1, "test")):
        assert not torch.equal(a.x_query, other.x_query)


def find_class(data: om.OmniglotData, image: np.ndarray) -> tuple[int, int]:
    """The (character, quarter turns) whose drawing is exactly ``image``."""
    for c in range(len(data.characters)):
        for d in range(om.DRAWINGS):
            for k in range(4):
                if np.array_equal(np.rot90(data.images[c, d], k), image):
                    return c, k
    raise AssertionError("image not found in the data")


def test_paper_split_disjoint_with_rotations(fake_root, tmp_path):
    fam = family(fake_root, tmp_path, ways=4, shots=1, queries=1)
    train, test = set(fam.characters["train"].tolist()), set(fam.characters["test"].tolist())
    assert len(train) == round(10 * 1200 / 1623) == 7 and len(test) == 3
    assert not train & test and train | test == set(range(10))
    assert np.array_equal(fam.characters["val"], fam.characters["test"])
    assert len(fam.classes["train"]) == 28 and len(fam.classes["test"]) == 12
    for c in train:  # each character is four classes, one per rotation
        assert sorted(fam.classes["train"][fam.classes["train"][:, 0] == c, 1].tolist()) == [0, 1, 2, 3]
    turns_seen = set()
    for split, allowed in (("train", train), ("test", test)):
        for index in range(3):
            task = fam.sample(0, 0, index, split)
            pixels = (task.x_support * 255).round().to(torch.uint8).numpy()[:, 0]
            found = [find_class(fam.data, p) for p in pixels]  # (ways,) in label order
            assert {c for c, _ in found} <= allowed
            assert len(set(found)) == 4  # the classes of a task are distinct
            turns_seen |= {k for _, k in found}
    assert turns_seen == {0, 1, 2, 3}


def test_official_split(fake_root, tmp_path):
    fam = family(fake_root, tmp_path, ways=3, split="official")
    assert fam.characters["train"].tolist() == list(range(6))  # the background alphabets
    assert fam.characters["test"].tolist() == list(range(6, 10))
    assert len(fam.classes["train"]) == 6 and set(fam.classes["train"][:, 1]) == {0}  # no rotations
    assert fam.data.characters[0] == "images_background/Alpha/character01"
    assert fam.sample(0, 0, 0, "test").x_query.shape == (45, 1, S, S)


def test_cache_written_once_and_reused(fake_root, tmp_path, monkeypatch):
    first = family(fake_root, tmp_path)
    assert family(fake_root, tmp_path).data.images is first.data.images  # shared within a process
    (npy,) = tmp_path.glob(f"omniglot_{S}px_*.npy")
    assert npy.with_suffix(".json").is_file()
    assert np.load(npy).shape == (10, 20, S, S)
    om.clear_memory_cache()

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(om, "decode_zips", no_decoding)
    second = family(fake_root, tmp_path)
    assert isinstance(second.data.images, np.memmap)
    assert all(torch.equal(u, v) for u, v in zip(first.sample(0, 1, 2), second.sample(0, 1, 2), strict=True))
    with pytest.raises(AssertionError, match="cache should have been used"):
        family(fake_root, tmp_path, image_size=S + 4)  # another size is another cache


def test_truncated_cache_is_rebuilt(fake_root, tmp_path):
    family(fake_root, tmp_path)
    om.clear_memory_cache()
    (npy,) = tmp_path.glob("*.npy")
    npy.write_bytes(npy.read_bytes()[:1000])
    assert family(fake_root, tmp_path).data.images.shape == (10, 20, S, S)


def test_training_and_inference_preprocess_identically(fake_root, tmp_path):
    fam = family(fake_root, tmp_path)
    with zipfile.ZipFile(fake_root / "images_evaluation.zip") as archive:
        with Image.open(io.BytesIO(archive.read("images_evaluation/Delta/character02/0010_05.png"))) as img:
            x = preprocess_image(img, S)
    assert x.shape == (1, S, S) and x.dtype == torch.float32
    c = fam.data.characters.index("images_evaluation/Delta/character02")
    assert torch.equal(x[0], torch.from_numpy(np.array(fam.data.images[c, 4])).float() / 255)


def test_preprocess_pixel_convention():
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # transparent background counts as paper
    ImageDraw.Draw(img).rectangle((10, 10, 29, 29), fill=(0, 0, 0, 255))  # black ink
    x = preprocess_image(img, 20, dtype=torch.float64)
    assert x.shape == (1, 20, 20) and x.dtype == torch.float64
    assert x[0, 10, 10] == 1.0 and x[0, 0, 0] == 0.0


def test_missing_folder_names_the_field(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=r"^task\.path: ") as info:
        OmniglotFamily(OmniglotTask(family="omniglot", path=str(missing)), data_root=None, cache_dir=tmp_path)
    assert info.value.field == "task.path"
    assert str(missing) in str(info.value) and "MAML_DATA_ROOT" in str(info.value)
    with pytest.raises(DatasetError, match="MAML_DATA_ROOT"):
        OmniglotFamily(OmniglotTask(family="omniglot"), data_root=None, cache_dir=tmp_path)


def test_missing_zip_is_named(fake_root, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "images_background.zip").symlink_to(fake_root / "images_background.zip")
    with pytest.raises(DatasetError, match="missing images_evaluation.zip"):
        family(tmp_path / "half", tmp_path)


def test_data_root_may_hold_an_omniglot_folder(fake_root, tmp_path):
    parent = tmp_path / "data"
    parent.mkdir()
    (parent / "omniglot").symlink_to(fake_root)
    assert family(parent, tmp_path / "cache").folder == parent / "omniglot"


def test_too_many_ways_names_the_field(fake_root, tmp_path):
    with pytest.raises(DatasetError, match=r"^task\.ways: 13-way .* 'test' .* only 12") as info:
        family(fake_root, tmp_path, ways=13)
    assert info.value.field == "task.ways"
    with pytest.raises(DatasetError, match=r"^task\.ways: "):
        family(fake_root, tmp_path, ways=5, split="official")  # 4 evaluation characters, no rotations


def test_dataset_error_pickles():
    err = pickle.loads(pickle.dumps(DatasetError("task.ways", "too many")))
    assert isinstance(err, ValueError) and err.field == "task.ways" and str(err) == "task.ways: too many"


def test_build_task_family(fake_root, tmp_path):
    fam = build_task_family(OmniglotTask(family="omniglot", image_size=S), data_root=fake_root,
                            cache_dir=tmp_path / "cache")
    assert isinstance(fam, OmniglotFamily) and list((tmp_path / "cache").glob("*.npy"))
    with pytest.raises(DatasetError, match=r"^task\.path: no Omniglot folder is configured"):
        build_task_family(OmniglotTask(family="omniglot", image_size=S))  # no default data root of its own
    sinusoid = build_task_family(SinusoidTask(), dtype=torch.float64)
    assert sinusoid.loss == "mse" and sinusoid.sample(0, 0, 0).x_support.dtype == torch.float64


def test_without_a_cache_dir_nothing_is_written(fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fam = build_task_family(OmniglotTask(family="omniglot", image_size=S), data_root=fake_root)
    assert fam.data.images.shape == (10, 20, S, S) and not isinstance(fam.data.images, np.memmap)
    assert list(tmp_path.iterdir()) == []
    again = build_task_family(OmniglotTask(family="omniglot", image_size=S), data_root=fake_root)
    assert again.data.images is fam.data.images  # decoded once per process


@pytest.mark.data
def test_real_omniglot(omniglot_root, dataset_cache):
    # A session-wide cache (MAML_CACHE_DIR or ~/.cache/maml-service): built once (seconds), then reused.
    fam = family(omniglot_root, dataset_cache, image_size=28)
    data = fam.data
    assert data.images.shape == (1623, 20, 28, 28) and data.background == 964
    assert len(set(data.characters)) == 1623
    assert len(fam.characters["train"]) == 1200 and len(fam.characters["test"]) == 423
    assert len(fam.classes["train"]) == 4800 and len(fam.classes["test"]) == 1692
    task = fam.sample(0, 0, 0)
    assert task.x_support.shape == (5, 1, 28, 28) and task.x_query.shape == (75, 1, 28, 28)
    assert 0.02 < task.x_query.mean() < 0.3  # thin ink strokes on empty paper
    big = family(omniglot_root, dataset_cache, image_size=28, ways=20, shots=1, queries=5)
    for split in ("train", "test"):
        t = big.sample(1, 2, 3, split)
        assert t.x_support.shape == (20, 1, 28, 28) and t.y_query.shape == (100,)
    official = family(omniglot_root, dataset_cache, image_size=28, ways=20, split="official")
    assert len(official.classes["train"]) == 964 and len(official.classes["test"]) == 659
