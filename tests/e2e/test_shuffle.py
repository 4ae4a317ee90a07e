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


def test_a_restarted_worker_group_does_not_replay_the_first_epochs_orders(ray_cluster):
    # Ray Train builds the training dataset at each worker-group start; a group restarted after a
    # lost worker starts the execution count, and so the orders, again from the first epoch's
    # (the same seed's orders, above), unless the start gets its own seed.
    from skinray.train.trainer import TrainingRows

    rows = TrainingRows(synthetic_samples(40, seed=0), (16, 16), shuffle_seed=7)
    first_start = _epoch_orders(None, dataset=rows())
    assert first_start == _epoch_orders(7)  # the first start: the run's seed
    restarted = _epoch_orders(None, dataset=rows())
    assert not {tuple(epoch) for epoch in restarted} & {tuple(e) for e in first_start}
    assert sorted(restarted[0]) == sorted(first_start[0])
    unshuffled = TrainingRows(synthetic_samples(40, seed=0), (16, 16), shuffle_seed=None)
    assert unshuffled.seed() is None
