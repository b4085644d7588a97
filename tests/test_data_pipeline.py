"""Input pipeline: determinism, exact resume, process sharding, k-NN positives, padding."""

import itertools

import ml_collections
import numpy as np
import pytest

from stego_jax.data import batches, build_dataset, plan_step

N = 30


@pytest.fixture(scope="module")
def ds():
    cfg = ml_collections.ConfigDict({"data": dict(name="synthetic", root="", res=24, crop_type=None, n_train=N,
                                                  n_val=4, size=32, seed=0, n_classes=5)})
    return build_dataset(cfg, "train")


def take(it, k):
    return list(itertools.islice(it, k))


def test_synthetic_dataset_splits(ds):
    cfg = ml_collections.ConfigDict({"data": dict(name="synthetic", root="", res=24, crop_type=None, n_train=N,
                                                  n_val=4, size=32, seed=0, n_classes=5)})
    val = build_dataset(cfg, "val")
    assert len(val) == 4 and val.ids[0] == "synthetic-123-000000" and ds.ids[0] == "synthetic-0-000000"
    assert ds[0]["image"].shape == (24, 24, 3) and ds[0]["label"].shape == (24, 24)


def test_deterministic_for_seed(ds):
    a = take(batches(ds, batch_size=4, seed=7, num_workers=2), 5)
    b = take(batches(ds, batch_size=4, seed=7, num_workers=1), 5)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = take(batches(ds, batch_size=4, seed=8), 5)
    assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
    # the batch content is the dataset items at the planned indices
    np.testing.assert_array_equal(a[0]["image"][1], ds[int(a[0]["index"][1])]["image"])


def test_resume_equals_tail_of_uninterrupted_run(ds):
    knn = (np.arange(N)[:, None] + np.arange(10)[None, :]) % N
    full = take(batches(ds, batch_size=4, seed=3, knn=knn), 12)  # crosses epochs (7 steps per epoch)
    resumed = take(batches(ds, batch_size=4, seed=3, knn=knn, start_step=9), 3)
    for x, y in zip(full[9:], resumed):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_epochs_are_permutations_without_remainder(ds):
    steps_per_epoch = N // 8
    for epoch in range(3):
        idx = np.concatenate([plan_step(N, s, global_batch=8, seed=1)["index"]
                              for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)])
        assert len(idx) == steps_per_epoch * 8 and len(set(idx.tolist())) == len(idx)  # no repeats in an epoch
    e0 = plan_step(N, 0, global_batch=8, seed=1)["index"]
    e1 = plan_step(N, steps_per_epoch, global_batch=8, seed=1)["index"]
    assert not np.array_equal(e0, e1)  # reshuffled every epoch


def test_two_processes_cover_epoch_exactly_once(ds):
    per_proc = [take(batches(ds, batch_size=3, seed=5, process_index=p, process_count=2), N // 6)
                for p in range(2)]
    seen = np.concatenate([b["index"] for proc in per_proc for b in proc])
    assert sorted(seen.tolist()) == list(range(N))  # 5 steps x 6 = 30 = N: every example exactly once
    # each process holds the contiguous half of the global batch
    g = plan_step(N, 2, global_batch=6, seed=5)["index"]
    np.testing.assert_array_equal(per_proc[0][2]["index"], g[:3])
    np.testing.assert_array_equal(per_proc[1][2]["index"], g[3:])


def test_knn_positive_ranks(ds):
    knn = (np.arange(N)[:, None] + np.arange(10)[None, :]) % N  # knn[i, r] = i + r
    got = take(batches(ds, batch_size=5, seed=0, knn=knn, num_neighbors=7), 24)
    ranks = np.concatenate([(b["index_pos"] - b["index"]) % N for b in got])
    assert ranks.min() == 1 and ranks.max() == 7 and set(ranks.tolist()) == set(range(1, 8))
    b = got[0]
    np.testing.assert_array_equal(b["image_pos"][2], ds[int(b["index_pos"][2])]["image"])
    np.testing.assert_array_equal(b["label_pos"][2], ds[int(b["index_pos"][2])]["label"])
    # both processes draw the same ranks for the same global slots
    p1 = take(batches(ds, batch_size=5, seed=0, knn=knn, process_index=1, process_count=2), 1)[0]
    g = plan_step(N, 0, global_batch=10, seed=0, knn=knn)
    np.testing.assert_array_equal(p1["index_pos"], g["index_pos"][5:])


def test_bad_knn_table(ds):
    with pytest.raises(ValueError, match=r"shape \(29, 10\).*\[30, k\]"):
        next(batches(ds, batch_size=4, seed=0, knn=np.zeros((29, 10), int)))
    with pytest.raises(ValueError, match="at least 8"):
        next(batches(ds, batch_size=4, seed=0, knn=np.zeros((30, 5), int)))


def test_eval_order_with_padding(ds):
    got = list(batches(ds, batch_size=4, seed=0, shuffle=False, drop_remainder=False, process_count=2,
                       process_index=0))
    assert len(got) == 4  # ceil(30 / 8)
    last = plan_step(N, 3, global_batch=8, seed=0, shuffle=False, drop_remainder=False)
    np.testing.assert_array_equal(last["mask"], [True] * 6 + [False] * 2)
    np.testing.assert_array_equal(last["index"][:6], np.arange(24, 30))
    real = np.concatenate([plan_step(N, s, global_batch=8, seed=0, shuffle=False, drop_remainder=False)["index"][
        plan_step(N, s, global_batch=8, seed=0, shuffle=False, drop_remainder=False)["mask"]] for s in range(4)])
    np.testing.assert_array_equal(real, np.arange(N))


def test_too_small_dataset_message(ds):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(batches(ds, batch_size=16, seed=0, process_count=2))
