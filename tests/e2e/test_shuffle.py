"""Training data is shuffled: a new batch order every epoch, the same orders for the same seed.
(tests/e2e/test_train.py checks that two training runs with one seed train on the same batches.)"""

from __future__ import annotations

from skinray.data.datasets import synthetic_samples
from skinray.data.loading import to_ray_dataset


def _epoch_orders(seed: int | None, epochs: int = 3, dataset=None) -> list[list[str]]:
    """Image URIs in the order one Ray Train worker's shard yields them, epoch by epoch (Ray Train
    hands each worker a ``streaming_split`` shard and iterates it once per epoch)."""
    import ray.train

    if dataset is None:
        dataset = to_ray_dataset(synthetic_samples(40, seed=0), (16, 16), shuffle_seed=seed)
    # The trainer's ingest options (skinray.train.trainer._data_config): the decode tasks finish in
    # any order, and only preserve_order keeps the shuffled order (without it this test was flaky).
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    dataset.context.execution_options = options
    shard = dataset.streaming_split(1, equal=True)[0]
    return [
        [str(uri) for batch in shard.iter_batches(batch_size=8) for uri in batch["image_uri"]]
        for _ in range(epochs)
    ]


def test_order_differs_between_epochs_and_repeats_for_the_same_seed(ray_cluster):
    first, again, other = _epoch_orders(7), _epoch_orders(7), _epoch_orders(8)
    listing = sorted(first[0])
    for epoch in first:
        assert sorted(epoch) == listing  # every row once per epoch
    assert len({tuple(epoch) for epoch in first}) == 3  # each epoch its own order
    assert first == again  # the same seed, the same orders
    assert first != other
    assert first[0] != [str(u) for u in synthetic_samples(40, seed=0).rows["image_uri"].to_pylist()]


def test_no_seed_keeps_the_listing_order(ray_cluster):
    orders = _epoch_orders(None, epochs=2)
    listing = [str(u) for u in synthetic_samples(40, seed=0).rows["image_uri"].to_pylist()]
    assert orders == [listing, listing]


def test_a_restored_run_does_not_replay_the_first_epochs_orders(ray_cluster, tmp_path, monkeypatch):
    # Ray Train builds the training dataset at each worker-group start, and a restored run (a lost
    # worker, a restarted driver, --resume) starts the execution count, and so the orders, again
    # from the first epoch's (the same seed's orders, above): the seed is offset by the epoch
    # the run restores.
    import json

    import ray.data

    from skinray.data.loading import TrainingRows

    run = tmp_path / "train"
    monkeypatch.setattr(ray.data.DataContext.get_current(), "enable_progress_bars", False)
    rows = TrainingRows(synthetic_samples(40, seed=0), (16, 16), 7, run_folder=str(run))
    first_start = _epoch_orders(None, dataset=rows())
    assert first_start == _epoch_orders(7)  # nothing to restore: the run's seed
    for epochs in (2, 3):  # checkpoints after epochs 2 and 3: a restart restores epoch 3
        (run / f"checkpoint_{epochs}").mkdir(parents=True)
        history = [{"epoch": e + 1} for e in range(epochs)]
        (run / f"checkpoint_{epochs}" / "history.json").write_text(json.dumps(history))
    assert rows.seed() == 7 + 1_000_003 * 3
    restarted = rows()
    assert not restarted.context.enable_progress_bars  # the driver's settings, not the defaults
    restored = _epoch_orders(None, dataset=restarted)
    assert not {tuple(epoch) for epoch in restored} & {tuple(e) for e in first_start}
    assert sorted(restored[0]) == sorted(first_start[0])
    resumed = TrainingRows(synthetic_samples(40), (16, 16), 7, resume=str(run / "checkpoint_2"))
    assert resumed.seed() == 7 + 1_000_003 * 2
    assert TrainingRows(synthetic_samples(40), (16, 16), None, run_folder=str(run)).seed() is None
