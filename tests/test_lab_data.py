import random

import numpy as np
import pytest
import torch

import gradwatch.lab.data as data_module
from gradwatch.errors import ConfigError, DataError
from gradwatch.lab.data import Dataset, iterate_minibatches, load_dataset, prepare_arrays


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


def _blobs(n: int = 60, n_features: int = 3, n_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    x = rng.normal(size=(n, n_features)) * 3.0 + 5.0 + y[:, None]
    return x, y


# --- digits ----------------------------------------------------------------------------------


def test_digits_loads_standardised(digits):
    assert digits.name == "digits"
    assert digits.n_classes == 10
    assert digits.n_features == 64
    assert digits.input_shape == (1, 8, 8)
    assert digits.n_train + digits.n_test == 1797
    assert digits.n_test == pytest.approx(0.2 * 1797, abs=10)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_test.dtype == torch.float32 and digits.y_test.dtype == torch.int64
    mean = digits.x_train.mean(0)
    std = digits.x_train.std(0, unbiased=False)
    varying = std > 0  # a few corner pixels are always blank: only centred
    assert varying.sum() >= 60
    assert mean.abs().max().item() < 1e-5
    assert torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-4)
    # test features use the train statistics: close to, not exactly, standard
    assert digits.x_test.mean().abs().item() < 0.1


def test_digits_split_is_stratified(digits):
    train = torch.bincount(digits.y_train, minlength=10).double()
    test = torch.bincount(digits.y_test, minlength=10).double()
    assert torch.all((test / (train + test) - 0.2).abs() < 0.01)
    assert sorted(digits.class_labels) == list(range(10))


def test_split_same_for_same_seed_different_for_another(digits):
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(again.x_train, digits.x_train)
    assert torch.equal(again.y_test, digits.y_test)
    assert other.n_test == digits.n_test
    assert not torch.equal(other.y_train, digits.y_train)
    assert not torch.equal(other.x_test, digits.x_test)


def test_train_and_test_are_disjoint_and_cover_everything():
    x = np.arange(100, dtype=float)[:, None]  # distinct values: an id per example
    ds = prepare_arrays(x, np.arange(100) % 4, seed=5)
    train, test = set(ds.x_train[:, 0].tolist()), set(ds.x_test[:, 0].tolist())
    assert len(train) == ds.n_train == 80 and len(test) == ds.n_test == 20
    assert not train & test


# --- mnist1d ---------------------------------------------------------------------------------


def test_mnist1d_generated_offline_cached_and_rng_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MNIST1D_NUM_SAMPLES", 500)  # ~0.4 s instead of ~3 s

    def no_download(*args, **kwargs):
        raise AssertionError("mnist1d must be generated, never downloaded")

    import mnist1d.data

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    monkeypatch.setattr(mnist1d.data, "requests", None)  # any network use would fail
    np.random.seed(7)
    random.seed(7)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    ds = load_dataset("mnist1d", seed=0, cache_dir=tmp_path)
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert ds.input_shape == (1, 40)
    assert ds.n_features == 40 and ds.n_classes == 10
    assert ds.n_train + ds.n_test == 500
    cache = tmp_path / "mnist1d_n500_seed42.npz"
    assert cache.is_file()
    assert not list(tmp_path.glob(".*partial"))

    monkeypatch.setattr(data_module, "_generate_mnist1d", no_download)  # now from the cache
    again = load_dataset("mnist1d", seed=0, cache_dir=tmp_path)
    assert torch.equal(again.x_train, ds.x_train)
    cache.write_bytes(b"not a zip")  # a broken cache is regenerated
    monkeypatch.undo()
    monkeypatch.setattr(data_module, "MNIST1D_NUM_SAMPLES", 500)
    repaired = load_dataset("mnist1d", seed=0, cache_dir=tmp_path)
    assert torch.equal(repaired.x_train, ds.x_train)


@pytest.mark.slow
def test_mnist1d_default_size_generated_once_then_cached(tmp_path, monkeypatch):
    # the times of generating and of reading the cache: bench/wallclock.py
    ds = load_dataset("mnist1d", cache_dir=tmp_path)
    assert ds.n_train + ds.n_test == 5000
    assert ds.n_test == 1000

    def regenerated(*args, **kwargs):
        raise AssertionError("the second load must read the cache, not generate again")

    monkeypatch.setattr(data_module, "_generate_mnist1d", regenerated)
    again = load_dataset("mnist1d", cache_dir=tmp_path)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


# --- user files ------------------------------------------------------------------------------


def test_npz_file(tmp_path):
    x, y = _blobs()
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y + 10)
    ds = load_dataset(path, seed=0)
    assert ds.name == "blobs"
    assert ds.n_classes == 3 and ds.class_labels == (10, 11, 12)
    assert ds.input_shape == (1, 3)
    assert set(ds.y_train.tolist()) == {0, 1, 2}
    assert ds.x_train.mean(0).abs().max().item() < 1e-5


def test_npz_image_shaped(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "imgs.npz"
    np.savez(path, x=rng.normal(size=(20, 2, 4, 4)).astype(np.float32), y=np.arange(20) % 2)
    ds = load_dataset(str(path))
    assert ds.input_shape == (2, 4, 4)
    assert ds.n_features == 32


@pytest.mark.parametrize("header", [True, False])
def test_csv_file_header_optional_string_labels(tmp_path, header):
    x, y = _blobs()
    names = np.array(["cat", "dog", "eel"])[y]
    lines = (["a,b,c,label"] if header else []) + [
        ",".join(f"{v:.6f}" for v in row) + f",{lab}" for row, lab in zip(x, names, strict=True)
    ]
    path = tmp_path / "animals.csv"
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path)
    assert ds.n_classes == 3 and ds.class_labels == ("cat", "dog", "eel")
    assert ds.n_features == 3 and ds.n_train + ds.n_test == 60


def test_csv_numeric_labels(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("".join(f"{i * 0.5},{i % 3}.0\n" for i in range(30)))
    ds = load_dataset(path)
    assert ds.class_labels == (0, 1, 2)


# --- errors ----------------------------------------------------------------------------------


def test_unknown_name_lists_builtins():
    with pytest.raises(DataError, match=r"unknown dataset 'cifar'; give a built-in name "
                       r"\(digits, mnist1d, shapeset\) or a path to a \.npz"):
        load_dataset("cifar")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data file '.*nope\.npz' not found; check the path"):
        load_dataset(tmp_path / "nope.npz")


def test_unreadable_npz(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_text("this is not a zip file")
    with pytest.raises(DataError, match=r"cannot read '.*bad\.npz' as \.npz: .*np\.savez"):
        load_dataset(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1,2\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; expected \.npz or \.csv"):
        load_dataset(path)


def test_missing_array_names_it_and_what_exists(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, x=np.zeros((4, 2)), labels=np.arange(4))
    with pytest.raises(DataError, match=r"has no array 'y'; found: 'x', 'labels'; save it with "
                       r"np\.savez\(path, x=features, y=labels\)"):
        load_dataset(path)


def test_object_arrays_refused(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, x=np.array([[1, "a"]] * 4, dtype=object), y=np.arange(4) % 2)
    with pytest.raises(DataError, match=r"cannot read '.*o\.npz'.*not object arrays"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        pytest.param(np.zeros((5, 2)), np.arange(4), r"x has 5 examples but y has 4 labels",
                     id="lengths"),
        pytest.param(np.ones((6, 2)), np.zeros(6, dtype=int),
                     r"y has a single class \(0, 6 examples\); a classifier needs at least 2",
                     id="single-class"),
        pytest.param(np.array([["a", "b"]] * 4), np.arange(4) % 2,
                     r"x has dtype <U1 \(text\); expected numbers", id="x-dtype"),
        pytest.param(np.zeros((0, 3)), np.zeros(0, dtype=int), r"the data set is empty \(0 exa",
                     id="empty"),
        pytest.param(np.zeros(6), np.arange(6) % 2, r"x has shape \(6,\); expected \(n_examples, "
                     r"n_features\).*x\.reshape\(-1, 1\)", id="x-1d"),
        pytest.param(np.zeros((6, 2)), np.eye(6), r"y has shape \(6, 6\); expected one label",
                     id="y-2d"),
        pytest.param(np.zeros((6, 2)), np.linspace(0, 1, 6), r"y has non-integer values such "
                     r"as 0\.2; expected class labels", id="y-continuous"),
        pytest.param(np.zeros((6, 2)), np.array([0, 1, 0, 1, 0, 2]),
                     r"class 2 \(1\) has fewer than 2 examples; a stratified", id="tiny-class"),
        pytest.param(np.zeros((6, 2), dtype=complex), np.arange(6) % 2,
                     r"x has dtype complex128 \(complex\)", id="complex"),
    ],
)
def test_bad_arrays(x, y, match):
    with pytest.raises(DataError, match=match):
        prepare_arrays(x, y, name="mine")


def test_nan_and_inf_counted_and_located():
    x, y = _blobs(n=30)
    x[4, 1] = np.nan
    x[9, 0] = np.inf
    x[9, 2] = np.nan
    with pytest.raises(DataError, match=r"mine: x has 3 non-finite value\(s\) \(2 NaN, 1 Inf\) "
                       r"in 2 example\(s\) and 3 feature\(s\); first at example 4, feature 1; "
                       r"examples: 4, 9; drop or impute"):
        prepare_arrays(x, y, name="mine")


def test_nan_in_npz_file_is_caught_before_training(tmp_path):
    x, y = _blobs()
    x[0, 0] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(DataError, match=r"nan: x has 1 non-finite value\(s\) \(1 NaN, 0 Inf\)"):
        load_dataset(path)


def test_csv_errors(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("1,2,0\n3,4,1\n5,1\n")
    with pytest.raises(DataError, match=r"data row 3 has 2 columns but the first has 3"):
        load_dataset(path)
    path = tmp_path / "text.csv"
    path.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(DataError, match=r"data row 2, column 2 is 'oops', not a number"):
        load_dataset(path)
    path = tmp_path / "empty.csv"
    path.write_text("a,b,label\n")
    with pytest.raises(DataError, match=r"has no data rows"):
        load_dataset(path)
    path = tmp_path / "one.csv"
    path.write_text("".join(f"{i},0\n" for i in range(10)))
    with pytest.raises(DataError, match=r"one: y has a single class \(0, 10 examples\)"):
        load_dataset(path)


def test_bad_seed_and_fraction():
    with pytest.raises(ConfigError, match=r"seed=-1; expected an integer >= 0"):
        load_dataset("digits", seed=-1)
    with pytest.raises(ConfigError, match=r"test_fraction=1\.5; expected a number in \(0, 1\)"):
        load_dataset("digits", test_fraction=1.5)


# --- minibatches -----------------------------------------------------------------------------


def test_iterate_minibatches_covers_epoch_once():
    x = torch.arange(10.0)[:, None]
    y = torch.arange(10)
    batches = list(iterate_minibatches(x, y, 4, torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in batches)
    again = list(iterate_minibatches(x, y, 4, torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat([b[1] for b in again]), seen)
    assert seen.tolist() != list(range(10))
    ordered = list(iterate_minibatches(x, y, 4, shuffle=False, drop_last=True))
    assert [b[1].tolist() for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_iterate_minibatches_errors():
    with pytest.raises(ConfigError, match=r"batch_size=0; expected an integer >= 1"):
        next(iterate_minibatches(torch.zeros(3, 1), torch.zeros(3), 0))
    with pytest.raises(DataError, match=r"x has 3 examples but y has 2 labels"):
        next(iterate_minibatches(torch.zeros(3, 1), torch.zeros(2), 1))
