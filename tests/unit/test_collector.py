"""No full collection from the command's start to the first step; then one, start-up's survivors frozen and the
thresholds back; a collector someone else turned off stays off."""

import gc

import pytest

from ftcluster import collector


@pytest.fixture
def restore_gc():
    enabled, thresholds = gc.isenabled(), gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    (gc.enable if enabled else gc.disable)()


def test_full_collections_are_held_until_the_first_step_then_run_again(restore_gc):
    gc.enable()
    thresholds = gc.get_threshold()
    collector.hold()
    held = gc.get_threshold()
    assert held[:2] == thresholds[:2] and held[2] == collector.NEVER  # young generations still collected
    survivor = [object() for _ in range(100)]
    collector.after_first_step()
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() >= len(survivor)
    collector.release()
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0


def test_a_collector_turned_off_elsewhere_is_left_alone(restore_gc):
    gc.disable()
    thresholds = gc.get_threshold()
    collector.hold()
    assert gc.get_threshold() == thresholds
    collector.after_first_step()
    collector.release()
    assert not gc.isenabled() and gc.get_threshold() == thresholds


def test_a_run_that_fails_before_its_first_step_gets_its_thresholds_back(restore_gc):
    gc.enable()
    thresholds = gc.get_threshold()
    collector.hold()
    collector.release()
    assert gc.get_threshold() == thresholds
